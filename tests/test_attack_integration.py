"""Adversarial review of issues 11-14 together: the lean transport against the SDK's,
the verified prefix, and the features' combinations. Real loopback servers, no mocks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from batchgpt.transport import make_client

KEY = "sk-attackall-0123456789abcdef"
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "hi"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Proxy:
    """A forward proxy on loopback that answers every request itself with a completion
    (what reaches it is what the client sent through the proxy)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(str(request.url))
        return web.json_response(COMPLETION)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    await p.start()
    yield p
    assert p._runner is not None
    await p._runner.cleanup()


@pytest.mark.parametrize("transport", ["sdk", "aiohttp"])
async def test_either_transport_sends_through_the_proxy_the_environment_names(
    proxy: Proxy, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY is honoured by the SDK (httpx trusts the environment); the lean
    transport, the default, must not go around a corporate proxy (or fail to reach the
    API at all where only the proxy can)."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    client = make_client(transport, base_url="http://api.batchgpt-test.invalid/v1",
                         api_key=KEY, timeout_s=5)
    try:
        attempt = await client.complete(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    finally:
        await client.aclose()
    assert attempt.failure is None, attempt.failure
    assert proxy.seen == ["http://api.batchgpt-test.invalid/v1/chat/completions"]
