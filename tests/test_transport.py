"""``api.transport``: the lean aiohttp path and the SDK path are the same to everything
after them.

Each answer a server can give (a completion, every error status of OpenAI's table, a
429 with ``retry-after``, ``x-should-retry``, garbage, an empty body, a hang past the
timeout, a dropped connection) is sent to both transports by a real HTTP server on
loopback, and the two :class:`~batchgpt.client.Attempt` objects must agree on everything
the retry decision, the circuit breaker, the limiter and the files read. The request the
server receives must be the same too: URL, body bytes and the SDK's headers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from batchgpt.client import Attempt
from batchgpt.config import ApiSettings, RetryPolicy
from batchgpt.retry import decide
from batchgpt.transport import LeanClient, make_client

KEY = "sk-transport-test-0123456789"
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "hi"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def _error(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


# case → (status, body, extra headers)
ANSWERS: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "200": (200, json.dumps(COMPLETION).encode(), {}),
    "200 garbage": (200, b"<html>not json</html>", {"content-type": "text/html"}),
    "200 no choices": (200, b'{"object": "chat.completion", "choices": []}', {}),
    "400": (400, _error("bad messages", "invalid_request_error", None, "messages"), {}),
    "401": (401, _error("Incorrect API key", "invalid_request_error", "invalid_api_key"), {}),
    "403": (403, _error("no access", "invalid_request_error", "unsupported_country"), {}),
    "404": (404, _error("The model does not exist", "invalid_request_error",
                        "model_not_found"), {}),
    "429 retry-after": (429, _error("Rate limit reached", "requests", "rate_limit_exceeded"),
                        {"retry-after": "2", "x-ratelimit-limit-requests": "60",
                         "x-ratelimit-remaining-requests": "0"}),
    "429 quota": (429, _error("You exceeded your quota", "insufficient_quota",
                              "insufficient_quota"), {}),
    "500": (500, _error("server error", "server_error", None), {}),
    "502 html": (502, b"<html><body>Bad gateway</body></html>", {"content-type": "text/html"}),
    "503 empty": (503, b"", {}),
    "400 list body": (400, b"[1, 2, 3]", {}),
    "500 should-retry false": (500, _error("no", "server_error", None),
                               {"x-should-retry": "false"}),
    "400 should-retry true": (400, _error("try again", "invalid_request_error", None),
                              {"x-should-retry": "true"}),
}


class Server:
    """A loopback server answering each request with the case its last user message
    names, and recording what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.received.append((request.path, dict(request.headers), raw))
        case = json.loads(raw)["messages"][-1]["content"]
        if case == "hang":
            await asyncio.sleep(30)  # past the client's timeout: the client gives up
        if case == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        status, body, headers = ANSWERS[case]
        headers = {"x-request-id": "req_123", "content-type": "application/json", **headers}
        return web.Response(status=status, body=body, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.stop()


async def _both(server: Server, case: str, timeout_s: float = 5) -> tuple[Attempt, Attempt]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": case}]}
    out = []
    for transport in ("aiohttp", "sdk"):
        client = make_client(transport, base_url=server.url, api_key=KEY, timeout_s=timeout_s,
                             organization="org-x", project="proj-y")
        try:
            out.append(await client.complete(body))
        finally:
            await client.aclose()
    return out[0], out[1]


def _seen_by_the_run(attempt: Attempt) -> dict[str, Any]:
    """What the runner reads of an attempt: outcome, the retry decision, the codes and
    texts that go to the files, the headers the limiter learns from."""
    policy = RetryPolicy()
    if attempt.success is not None:
        s = attempt.success
        return {"ok": True, "body": s.body, "request_id": s.request_id,
                "limit": s.headers.get("x-ratelimit-limit-requests")}
    f = attempt.failure
    assert f is not None
    d = decide(f, 1, policy, 0.5)
    return {"kind": f.kind, "status": f.status, "error_code": f.error_code, "code": f.code,
            "type": f.type, "param": f.param, "message": f.message, "body": f.body,
            "request_id": f.request_id, "rate_limit": f.is_rate_limit,
            "decision": (d.action, d.delay_s, d.transient, d.pause_s, d.slow_down, d.reason),
            "retry_after": f.headers.get("retry-after")}


@pytest.mark.parametrize("case", list(ANSWERS))
async def test_every_answer_is_the_same_attempt_through_either_transport(
    server: Server, case: str
) -> None:
    lean, sdk = await _both(server, case)
    assert _seen_by_the_run(lean) == _seen_by_the_run(sdk)


async def test_a_hang_past_the_timeout_is_a_timeout_through_either_transport(
    server: Server,
) -> None:
    lean, sdk = await _both(server, "hang", timeout_s=0.2)
    assert _seen_by_the_run(lean) == _seen_by_the_run(sdk)
    assert lean.failure is not None and lean.failure.error_code == "timeout"


async def test_a_dropped_connection_is_a_connection_error_through_either_transport(
    server: Server,
) -> None:
    """The texts differ (aiohttp's exception names against the SDK's), the outcome not."""
    lean, sdk = await _both(server, "drop")
    for attempt in (lean, sdk):
        assert attempt.failure is not None
        assert attempt.failure.error_code == "connection_error"
        assert KEY not in attempt.failure.message
    seen = [_seen_by_the_run(a) for a in (lean, sdk)]
    for s in seen:
        del s["message"]
    assert seen[0] == seen[1]


async def test_the_server_receives_the_same_request_from_either_transport(
    server: Server,
) -> None:
    """URL, body bytes (non-ASCII kept as UTF-8) and the SDK's headers: the key, the
    organization, the project, the SDK's user agent and its x-stainless headers."""
    body = {"model": "gpt-4o-mini", "temperature": 0.5,
            "messages": [{"role": "user", "content": "200"}], "metadata": {"k": "héllo ☃"}}
    for transport in ("aiohttp", "sdk"):
        client = make_client(transport, base_url=server.url, api_key=KEY, timeout_s=5,
                             organization="org-x", project="proj-y")
        try:
            assert (await client.complete(body)).success is not None
        finally:
            await client.aclose()
    (lean_path, lean_headers, lean_body), (sdk_path, sdk_headers, sdk_body) = server.received
    assert lean_path == sdk_path == "/v1/chat/completions"
    assert lean_body == sdk_body
    assert "héllo ☃".encode() in lean_body

    def sdk_chosen(headers: dict[str, str]) -> dict[str, str]:
        lower = {k.lower(): v for k, v in headers.items()}
        return {k: v for k, v in lower.items() if k not in ("host", "content-length")}

    assert sdk_chosen(lean_headers) == sdk_chosen(sdk_headers)
    assert sdk_chosen(lean_headers)["authorization"] == f"Bearer {KEY}"
    assert sdk_chosen(lean_headers)["openai-organization"] == "org-x"
    assert sdk_chosen(lean_headers)["openai-project"] == "proj-y"


async def test_the_lean_client_is_the_default_and_sdk_is_the_sdks_own_path() -> None:
    lean = make_client("aiohttp", base_url="http://127.0.0.1:9/v1", api_key=KEY, timeout_s=1)
    sdk = make_client("sdk", base_url="http://127.0.0.1:9/v1", api_key=KEY, timeout_s=1)
    try:
        assert ApiSettings().transport == "aiohttp"
        assert isinstance(lean, LeanClient)
        assert not isinstance(sdk, LeanClient)
    finally:
        await lean.aclose()
        await sdk.aclose()
