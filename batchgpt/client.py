"""One ChatCompletion attempt through the official openai SDK, reduced to an outcome.

Built once per run (never at import), with the SDK's own retries off (``max_retries=0``):
batchgpt's limiter and retry engine must see every attempt, or attempts multiply unseen.
The aiohttp transport is used because it costs about half the CPU per request of the
default one; the request goes through the SDK's generic ``post`` (auth, base URL,
timeouts, typed errors) with the body as the exact JSON to send, and the response is read
raw and parsed once with ``json.loads`` rather than through the SDK's pydantic models,
which the output file doesn't need (docs/decisions.md, docs/performance.md).

Whatever the server says is treated as hostile on its way to the files: every
:class:`~batchgpt.retry.Failure` built here (message, code, type, request id, body,
headers, exception text) and every reply in which the key occurs pass through the run's
:class:`~batchgpt.redact.Redactor` first (a proxy's 401 may echo ``Bearer sk-…``), text is
redacted *before* it is cut to length (so no key prefix survives a cut), and a body too
deeply nested to parse is a retryable ``invalid_response``, not a crash.
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

from batchgpt.limiter import CASE_INSENSITIVE
from batchgpt.redact import Redactor
from batchgpt.retry import Failure, Kind
from batchgpt.source import has_surrogate

CASE_INSENSITIVE.add(httpx2.Headers)


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
    """Sends one request at a time per call; safe to share across tasks.

    ``redact`` holds the run's secrets; the client always adds its own ``api_key`` to it,
    so a caller that passes none is protected too. It adds a password in ``base_url`` as
    well, which only a caller using ChatClient directly can pass: a job refuses a base URL
    with a user name or password (``api.base_url`` and ``OPENAI_BASE_URL`` alike, see
    :func:`batchgpt.credentials.base_url_problem`).
    """

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str,
        timeout_s: float,
        max_connections: int = 256,
        organization: str | None = None,
        project: str | None = None,
        redact: Redactor | None = None,
    ) -> None:
        self._timeout = timeout_s
        self._redact = (redact or Redactor()).with_secrets(api_key, _url_password(base_url))
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
        redact = self._redact
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
                return Attempt(None, Failure(Kind.CONNECTION, _human(
                    redact, f"connection failed: {dropped}", 500)), latency)
            return Attempt(None, Failure(Kind.TIMEOUT, f"no answer within {self._timeout:g}s"),
                           latency)
        except openai.APIConnectionError as exc:
            latency = time.perf_counter() - start
            cause = exc.__cause__ or exc
            return Attempt(None, Failure(Kind.CONNECTION, _human(
                redact, f"connection failed: {type(cause).__name__}: {cause}", 500)), latency)
        except openai.APIStatusError as exc:
            latency = time.perf_counter() - start
            return Attempt(None, _status_failure(exc, redact), latency)
        except openai.APIError as exc:  # e.g. a response the SDK could not read
            latency = time.perf_counter() - start
            return Attempt(None, Failure(Kind.DECODE, _human(
                redact, f"unreadable response: {exc}", 500)), latency)
        latency = time.perf_counter() - start
        return self._reply(raw.status_code, raw.headers, raw.content, latency)

    def _reply(self, status: int, headers: Mapping[str, str], content: bytes,
               latency: float) -> Attempt:
        """A non-error HTTP answer reduced to an Attempt: a chat.completion is a success,
        anything else a retryable ``invalid_response``. Shared by both transports
        (:mod:`batchgpt.transport`), so a reply means the same whichever sent it."""
        redact = self._redact
        request_id = headers.get("x-request-id")
        if request_id is not None:
            request_id = _human(redact, request_id, 200)
        try:
            parsed = json.loads(content)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past parsing
            parsed = None
        missing = _not_a_completion(parsed)
        if missing is not None:
            # Redact before cutting: a key across the cut would leave its prefix behind.
            head = redact.data(content[:200 + _MARGIN])[:200].decode("utf-8", "replace")
            return Attempt(
                None,
                Failure(Kind.DECODE, _human(redact, f"HTTP {status} with a body that "
                        f"is not a chat.completion ({missing}): {head!r}", 500),
                        status=status, headers=redact.headers(headers),
                        request_id=request_id),
                latency,
            )
        if redact.found_in_json(content):  # rare; a few bytes.find on the hot path
            cleaned = redact.value(parsed)
            if not isinstance(cleaned, dict):  # too deep to clean: keep none of it
                return Attempt(None, Failure(
                    Kind.DECODE, f"HTTP {status} with a chat.completion too deeply "
                    "nested to clean of secrets", status=status,
                    headers=redact.headers(headers), request_id=request_id), latency)
            parsed = cleaned
        return Attempt(Success(parsed, headers, request_id, latency), None, latency)


def _not_a_completion(parsed: object) -> str | None:
    """Why a 2xx body is not a chat.completion batchgpt can store as an answer, or None
    when it is one: a JSON object whose ``choices`` is a non-empty list whose first choice
    has a ``message`` object. (A ``choices: []`` reply holds no answer: recorded as a
    success, the row would never be sent again.)"""
    if not isinstance(parsed, dict):
        return "not a JSON object"
    choices = parsed.get("choices")
    if not isinstance(choices, list):
        return "no choices list"
    if not choices:
        return "no choice in it"
    first = choices[0]
    if not isinstance(first, dict) or not isinstance(first.get("message"), dict):
        return "its first choice has no message"
    return None


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


def _status_failure(exc: openai.APIStatusError, redact: Redactor) -> Failure:
    """A Failure from an error status, with every string the server chose redacted."""
    body: object = exc.body
    try:  # keep the body as the server sent it ({"error": {...}}), not the SDK's unwrapping
        raw = exc.response.json()
        if isinstance(raw, dict):
            body = raw
    except (ValueError, RecursionError):
        pass
    text = exc.response.text if exc.response is not None else ""
    return status_failure(exc.status_code, exc.response.headers, body, text, exc.message,
                          exc.request_id, redact)


def status_failure(status: int, headers: Mapping[str, str], body: object, text: str,
                   fallback: str, request_id: str | None, redact: Redactor) -> Failure:
    """A Failure from an error status: ``body`` the parsed error body (else the text),
    ``text`` the body as text, ``fallback`` the message when neither has one. Every
    string the server chose is redacted; both transports end here."""
    body = redact.value(body)  # code, type and message below come from the clean copy
    err = body.get("error", body) if isinstance(body, dict) else None
    code = type_ = param = None
    message = ""
    if isinstance(err, dict):
        code = _label(err.get("code"))
        type_ = _label(err.get("type"))
        param = _label(err.get("param"))
        message = _human(redact, _str(err.get("message")) or "", MAX_MESSAGE_CHARS)
    if not message:  # a gateway's HTML page, say: its start is the message
        message = _human(redact, text or fallback, 300)
    return Failure(
        Kind.HTTP,
        message,
        status=status,
        code=code,
        type=type_,
        headers=redact.headers(headers),
        body=body,
        request_id=None if request_id is None else _human(redact, request_id, 200),
        param=param,
    )


# Bytes read past a cut so that a secret straddling it is still seen whole.
_MARGIN = 1024
# A server's error message goes to logs, the summary and the checkpoint: this much of it.
MAX_MESSAGE_CHARS = 2000


def _human(redact: Redactor | None, text: str, limit: int) -> str:
    r"""Server text made safe for a message, a log line and the checkpoint: redacted, then
    cut to ``limit`` characters (in that order, so no prefix of a secret survives the
    cut), and with lone surrogates (legal in JSON as ``\ud800``, but not encodable as
    UTF-8, so they would break a log file or a SQLite column) replaced by ``?``."""
    if redact is not None:
        text = redact.text(text)
    text = text[:limit]
    return text.encode("utf-8", "replace").decode("utf-8") if has_surrogate(text) else text


def _label(value: object) -> str | None:
    """An error ``code`` or ``type`` (from the already redacted body): it becomes a
    metrics label and a checkpoint column, so a hostile server gets at most 100
    characters of it, cleaned of lone surrogates like a message."""
    text = _str(value)
    return None if text is None else _human(None, text, 100)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _url_password(base_url: str | None) -> str | None:
    """The password in ``https://user:password@host/…``, a secret like the key (for
    direct users of ChatClient: a job's base URL never has one)."""
    if not base_url:
        return None
    try:
        return httpx2.URL(base_url).password or None
    except Exception:  # an unparseable URL has no password to protect, and fails later
        return None
