"""The lean per-request transport (``api.transport: aiohttp``, the default).

The openai SDK's ``post()`` costs ~0.6 ms of CPU a request on the project's 2-core machine
(option models, header building, the httpx2 request and response objects over aiohttp),
several times what the HTTP exchange itself costs (docs/performance.md, issue 13). This
client sends the same POST with one shared :class:`aiohttp.ClientSession` instead, and
keeps the SDK as the source of everything that is configuration:

- the URL and the headers are those the SDK builds for ``POST /chat/completions`` (its
  ``_build_request`` after its ``_prepare_options``/``_prepare_request`` hooks, taken once
  per run): the ``Authorization`` header, ``OpenAI-Organization``/``OpenAI-Project``, the
  SDK's ``User-Agent`` and ``X-Stainless-*`` headers, its default headers;
- the body is serialised as the SDK serialises it (``json.dumps`` with
  ``ensure_ascii=False``, compact separators, no NaN);
- the timeout is the SDK's: ``timeout_s`` for connecting, waiting for a connection and
  each read (what the SDK's own aiohttp transport passes to aiohttp);
- the TLS settings are the SDK transport's own SSL context (``SSL_CERT_FILE``/
  ``SSL_CERT_DIR``, the system's store, truststore on macOS and Windows);
- the answer becomes the same :class:`~batchgpt.client.Attempt` through the same code
  (:meth:`ChatClient._reply`, :func:`batchgpt.client.status_failure`), so the retry
  decision, the circuit breaker, the rate-limit headers and redaction see the same thing.

Anything the lean path cannot reproduce falls back to the SDK path for the whole run:
an SDK client with custom auth (workload identity, a key provider), a proxy from the
environment for the base URL, or one whose request building fails or changes in a way
this module does not recognise. ``api.transport: sdk`` chooses the SDK path outright.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from batchgpt.client import Attempt, ChatClient, _human, status_failure
from batchgpt.limiter import CASE_INSENSITIVE
from batchgpt.retry import Failure, Kind

log = logging.getLogger("batchgpt")

PATH = "/chat/completions"
# Headers the HTTP layer sets itself per request; everything else the SDK built is sent.
_PER_REQUEST = frozenset({"content-length", "transfer-encoding", "host"})

CASE_INSENSITIVE.add(CIMultiDictProxy)  # aiohttp's response headers
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class LeanClient(ChatClient):
    """A :class:`ChatClient` whose ``complete`` bypasses the SDK's request building (see
    the module's docstring); built and closed exactly like one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_connections: int = kwargs.get("max_connections", 256)
        self._session: aiohttp.ClientSession | None = None
        self._url = ""
        self._headers: dict[str, str] = {}
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=self._timeout, sock_connect=self._timeout,
            sock_read=self._timeout)
        self._ready: asyncio.Lock | None = None
        self._lean: bool | None = None  # None: not decided yet; False: the SDK path

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super().aclose()

    async def _prepare(self) -> None:
        """Take the URL and headers from the SDK once, or settle on the SDK path."""
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self._lean is not None:
                return
            try:
                url, headers = await sdk_request_shape(self._sdk, self._timeout)
                ssl = None if url is None else direct_ssl(self._sdk, url)
            except Exception as exc:  # an SDK that builds requests some other way
                log.debug("lean transport unavailable (%s: %s); using the SDK's",
                          type(exc).__name__, exc)
                self._lean = False
                return
            if url is None or ssl is None:
                self._lean = False
                return
            self._url, self._headers = url, headers
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=ssl)
            self._session = aiohttp.ClientSession(connector=connector)
            self._lean = True

    async def complete(self, body: Mapping[str, Any]) -> Attempt:
        if not self._lean:
            if self._lean is None:
                await self._prepare()
            if not self._lean:
                return await super().complete(body)
        session = self._session
        assert session is not None
        data = _dumps(body).encode()
        start = time.perf_counter()
        try:
            async with session.post(self._url, data=data, headers=self._headers,
                                    timeout=self._client_timeout) as resp:
                content = await resp.read()
                status = resp.status
                headers = resp.headers
                charset = resp.charset
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return Attempt(None, Failure(Kind.TIMEOUT, f"no answer within {self._timeout:g}s"),
                           time.perf_counter() - start)
        except aiohttp.ClientError as exc:  # refused, reset, dropped, a cut body
            return Attempt(None, Failure(Kind.CONNECTION, _human(
                self._redact, f"connection failed: {type(exc).__name__}: {exc}", 500)),
                time.perf_counter() - start)
        latency = time.perf_counter() - start
        if status >= 400:
            return Attempt(None, _error(status, headers, content, charset, self._redact),
                           latency)
        return self._reply(status, headers, content, latency)


def _error(status: int, headers: Mapping[str, str], content: bytes, charset: str | None,
           redact: Any) -> Failure:
    """The Failure the SDK path builds for this error status (its ``APIStatusError``:
    the body parsed as JSON if it is, else its stripped text; the message ``Error code:
    N`` when the body has none)."""
    try:
        text = content.decode(charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        text = content.decode("utf-8", "replace")
    stripped = text.strip()
    body: object
    try:
        body = json.loads(stripped)
    except (ValueError, RecursionError):
        body = stripped
    return status_failure(status, headers, body, text, f"Error code: {status}",
                          headers.get("x-request-id"), redact)


async def sdk_request_shape(sdk: Any, timeout_s: float) -> tuple[str | None, dict[str, str]]:
    """The URL and headers the SDK would send ``POST /chat/completions`` with, built by
    the SDK itself (so its auth, organization, project and default headers are kept), or
    (None, {}) when the SDK authenticates per request in a way a fixed header set can't
    reproduce."""
    from openai._base_client import get_platform
    from openai._models import FinalRequestOptions
    from openai._utils import asyncify

    if sdk.custom_auth is not None:
        return None, {}
    if getattr(sdk, "_api_key_provider", None) is not None:
        return None, {}
    if sdk._platform is None:
        sdk._platform = await asyncify(get_platform)()
    options = FinalRequestOptions.construct(
        method="post", url=PATH, json_data={}, timeout=timeout_s)
    options = await sdk._prepare_options(options)
    request = sdk._build_request(options)
    await sdk._prepare_request(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _PER_REQUEST}
    return str(request.url), headers


def direct_ssl(sdk: Any, url: str) -> Any:
    """The TLS settings the SDK's own transport connects to ``url`` with (its verify
    and certificate store: ``SSL_CERT_FILE``/``SSL_CERT_DIR``, the system's), or None when
    the SDK would not connect directly: a proxy from the environment
    (``HTTP(S)_PROXY``/``ALL_PROXY`` less ``NO_PROXY``) is mounted for it, which the lean
    session does not reproduce, so the run keeps the SDK's path."""
    import httpx2

    http = sdk._client
    transport = http._transport_for_url(httpx2.URL(url))
    if transport is not http._transport:
        return None
    context = getattr(transport, "ssl_context", None)
    return context if context is not None else True


def make_client(transport: str, **kwargs: Any) -> ChatClient:
    """The run's client for ``api.transport``: ``sdk`` sends through the openai SDK,
    ``aiohttp`` through :class:`LeanClient`."""
    if transport == "sdk":
        return ChatClient(**kwargs)
    return LeanClient(**kwargs)
