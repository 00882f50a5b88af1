"""One ChatCompletion attempt through the official openai SDK, reduced to an outcome.

Built once per run (never at import), with the SDK's own retries off (``max_retries=0``):
batchgpt's limiter and retry engine must see every attempt, or attempts multiply unseen.
The aiohttp transport is used because it costs about half the CPU per request of the
default one; the request goes through the SDK's generic ``post`` (auth, base URL,
timeouts, typed errors) with the body as the exact JSON to send, and the response is read
raw and parsed once with ``json.loads`` rather than through the SDK's pydantic models,
which the output file doesn't need (docs/decisions.md, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2  # the openai SDK's HTTP layer, installed with it
import openai

# Re-exported: the runner resolves the key and base URL through this module.
from batchgpt.credentials import SANDBOX_KEY as SANDBOX_KEY
from batchgpt.credentials import resolve_credentials as resolve_credentials
from batchgpt.retry import Failure, Kind


@dataclass(frozen=True, slots=True)
class Success:
    body: dict[str, Any]  # the chat.completion as the server sent it
    headers: Mapping[str, str]
    request_id: str | None
    latency_s: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """Either a success or a failure, with the headers to pace by in both cases."""

    success: Success | None
    failure: Failure | None
    latency_s: float

    @property
    def headers(self) -> Mapping[str, str]:
        if self.success is not None:
            return self.success.headers
        return self.failure.headers if self.failure is not None else {}


class ChatClient:
    """Sends one request at a time per call; safe to share across tasks."""

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str,
        timeout_s: float,
        max_connections: int = 256,
        organization: str | None = None,
        project: str | None = None,
    ) -> None:
        self._timeout = timeout_s
        http_client = _http_client(max_connections)
        self._sdk = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            organization=organization,
            project=project,
            max_retries=0,
            timeout=timeout_s,
            http_client=http_client,
        )

    async def aclose(self) -> None:
        await self._sdk.close()

    async def complete(self, body: Mapping[str, Any]) -> Attempt:
        start = time.perf_counter()
        try:
            # The SDK's own request path (auth, base URL, headers, timeouts, the typed
            # errors) without `chat.completions.create`'s parameter transformation, which
            # cost ~40 % of the client's CPU per request here (docs/performance.md) and
            # adds nothing: the body is already the exact JSON to send, and any parameter
            # an OpenAI-compatible server accepts passes through unchanged.
            raw = await self._sdk.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                options={"timeout": self._timeout},
            )
        except openai.APITimeoutError as exc:
            latency = time.perf_counter() - start
            dropped = _connection_cause(exc)
            if dropped is not None:  # the aiohttp transport reports drops as timeouts
                return Attempt(None, Failure(Kind.CONNECTION, f"connection failed: {dropped}"),
                               latency)
            return Attempt(None, Failure(Kind.TIMEOUT, f"no answer within {self._timeout:g}s"),
                           latency)
        except openai.APIConnectionError as exc:
            latency = time.perf_counter() - start
            cause = exc.__cause__ or exc
            return Attempt(None, Failure(Kind.CONNECTION, f"connection failed: "
                                         f"{type(cause).__name__}: {cause}"[:500]), latency)
        except openai.APIStatusError as exc:
            latency = time.perf_counter() - start
            return Attempt(None, _status_failure(exc), latency)
        except openai.APIError as exc:  # e.g. a response the SDK could not read
            latency = time.perf_counter() - start
            return Attempt(None, Failure(Kind.DECODE, f"unreadable response: {exc}"[:500]),
                           latency)
        latency = time.perf_counter() - start
        headers = raw.headers
        request_id = headers.get("x-request-id")
        try:
            parsed = json.loads(raw.content)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
            text = raw.content[:200].decode("utf-8", "replace")
            return Attempt(
                None,
                Failure(Kind.DECODE, f"HTTP {raw.status_code} with a body that is not a "
                        f"chat.completion: {text!r}", status=raw.status_code,
                        headers=headers, request_id=request_id),
                latency,
            )
        return Attempt(Success(parsed, headers, request_id, latency), None, latency)


def _http_client(max_connections: int) -> Any:
    """The SDK's aiohttp transport with a pool big enough for the concurrency cap."""
    return openai.DefaultAioHttpClient(
        limits=httpx2.Limits(max_connections=max_connections,
                             max_keepalive_connections=max_connections)
    )


def _connection_cause(exc: BaseException) -> str | None:
    """The aiohttp connection error behind an exception, unless it is a timeout."""
    import aiohttp

    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 10:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
            cause, asyncio.TimeoutError | aiohttp.ServerTimeoutError
        ):
            return f"{type(cause).__name__}: {cause}"[:300]
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


def _status_failure(exc: openai.APIStatusError) -> Failure:
    body: object = exc.body
    try:  # keep the body as the server sent it ({"error": {...}}), not the SDK's unwrapping
        raw = exc.response.json()
        if isinstance(raw, dict):
            body = raw
    except ValueError:
        pass
    err = body.get("error", body) if isinstance(body, dict) else None
    code = type_ = None
    message = ""
    if isinstance(err, dict):
        code = _str(err.get("code"))
        type_ = _str(err.get("type"))
        message = _str(err.get("message")) or ""
    if not message:
        text = exc.response.text[:300] if exc.response is not None else ""
        message = text or exc.message
    return Failure(
        Kind.HTTP,
        message,
        status=exc.status_code,
        code=code,
        type=type_,
        headers=exc.response.headers,
        body=body,
        request_id=exc.request_id,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
