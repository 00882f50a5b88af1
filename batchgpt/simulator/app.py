"""The built-in OpenAI-compatible simulator ("sandbox").

A real HTTP server speaking the Chat Completions API, so a new user can try batchgpt
without an API key and every test talks HTTP instead of a mock. It enforces RPM/TPM the way
OpenAI does (continuously refilled buckets, quantized to ``window_s``, counted with
:func:`batchgpt.tokens.request_cost` exactly as the client estimates), sends the same
rate-limit headers and error bodies, and injects faults (500, 503, dropped connections,
hangs, non-JSON bodies, quota exhaustion, poison rows, bad keys) that are decided from a
hash of the request body, so a run with the same seed fails the same way whatever order
concurrent requests arrive in. Benchmarks drive it at ~2,000 req/s, so the request path
does no logging and no work it can skip. See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import threading
import time
import zlib
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batchgpt import tokens
from batchgpt.params import asks_for_json, response_format_schema
from batchgpt.simulator.replies import (
    FailingStatus,
    ReplyFaults,
    follows_up,
    instance_for,
    model_failure,
    parse_failing_model,
    parse_reply_faults,
    spoil,
)

if TYPE_CHECKING:
    from batchgpt.simulator.batches import BatchEndpoints

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5-mini", "gpt-5-nano")
LABELS = ("positive", "negative", "neutral", "mixed")
ORG = "org-sandbox"
MAX_SENTENCE_CHARS = 500  # keeps echo replies small even for a huge unpunctuated prompt
GARBAGE_BODY = b"<html><body><h1>502 Bad Gateway</h1><p>sandbox gateway</p></body></html>"
_SENTENCE = re.compile(r"(.+?(?:[.!?](?=\s|$)|[。！？]))", re.S)
_ids = random.Random()  # ids only; never seeded, they are allowed to differ between runs


class FaultConfig(BaseModel):
    """Injected failures. Rates are probabilities per admitted request, applied in the
    order listed (they must sum to ≤ 1); the others are switches."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    server_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    overload_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    hang_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    hang_s: float = Field(default=3600.0, ge=0.0)
    garbage_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    quota_after: int | None = Field(default=None, ge=0)
    poison_marker: str | None = "__POISON__"
    api_key: str | None = None
    # A hostile or broken server, for tests of what batchgpt does with what it is told:
    # headers set on every answer (after the rate-limit headers, so they can override
    # them), a JSON patch deep-merged into every chat.completion (absurd usage, a lone
    # surrogate in the content, ...), and a proxy that answers every request with this
    # status and echoes the Authorization header it was given in the error message.
    headers: dict[str, str] = Field(default_factory=dict)
    # Bad first answers for the output checks, and models that always fail (fallbacks):
    # see batchgpt.simulator.replies.
    replies: ReplyFaults = ReplyFaults()
    failing_models: dict[str, FailingStatus] = Field(default_factory=dict)
    reply_patch: dict[str, Any] | None = None
    echo_auth_status: int | None = Field(default=None, ge=400, le=599)

    @model_validator(mode="after")
    def _rates_fit(self) -> FaultConfig:
        if self.total_rate() > 1.0 + 1e-9:
            raise ValueError("fault rates must sum to at most 1")
        return self

    def total_rate(self) -> float:
        return (self.server_error_rate + self.overload_rate + self.drop_rate
                + self.hang_rate + self.garbage_rate)


class SimulatorConfig(BaseModel):
    """How the sandbox behaves. Mutable at runtime (assignments are validated): the
    handler reads it on every request, so a test can e.g. give the quota back mid-run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    window_s: float = Field(default=1.0, gt=0.0, le=60.0)
    latency_s: float = Field(default=0.0, ge=0.0)
    latency_jitter_s: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    record: bool = True
    faults: FaultConfig = FaultConfig()  # pydantic copies model defaults per instance
    model_alias: str | None = None


def format_go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration`` at millisecond precision, as OpenAI's
    ``x-ratelimit-reset-*`` headers and "try again in" hints do: ``0s``, ``120ms``,
    ``1s``, ``9.816s``, ``6m0s``, ``1h2m3.5s``. Positive values round *up* to a whole
    millisecond so a hint never says to retry sooner than allowed."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(round(seconds * 1000.0, 6))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class SimulatorStats:
    """What the sandbox saw. ``by_status[0]`` counts requests that got no HTTP response:
    dropped by a fault, or abandoned by the client / the server stopping mid-wait."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokens_charged = 0
        self.spoiled: dict[str, int] = {}  # first answers spoiled, by fault

    def to_dict(self, bodies: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens_charged": self.tokens_charged,
            "spoiled": dict(sorted(self.spoiled.items())),
        }
        if bodies:
            out["bodies"] = list(self.bodies)
        return out


class _Bucket:
    """A token bucket of ``limit * window_s / 60`` refilled at ``limit / 60`` per second.
    It may go into debt: a request bigger than one window's capacity (but within the
    per-minute limit) is admitted when the bucket is full, then the debt paces what follows."""

    __slots__ = ("capacity", "key", "level", "limit", "rate", "stamp", "window")

    def __init__(self, limit: int, window_s: float, now: float) -> None:
        self.limit = limit
        self.window = window_s
        self.key = (limit, window_s)
        self.capacity = limit * window_s / 60.0
        self.rate = limit / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def need(self, amount: float) -> float:
        """What must be in the bucket to admit ``amount`` (never more than a full bucket)."""
        return min(amount, self.capacity)

    def wait(self, amount: float) -> float:
        return max(0.0, (self.need(amount) - self.level) / self.rate)

    def remaining(self) -> int:
        """What is left, scaled to the per-minute figure as OpenAI reports it."""
        return max(0, min(self.limit, int(self.level * 60.0 / self.window)))

    def reset(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


def _error(status: int, message: str, type_: str, code: str | None,
           param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type="application/json")


def _invalid(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", code, param)


def _validate(body: Any) -> web.Response | None:
    """Minimal validation: enough that the reply builder can't crash and a client bug
    shows up as the 400 OpenAI would send."""
    if not isinstance(body, dict):
        return _invalid("We could not parse the JSON body of your request. The request body "
                        "must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _invalid("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _invalid("Invalid 'messages': expected a non-empty array.", "messages",
                        "empty_array" if isinstance(messages, list) else None)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return _invalid(f"Missing required parameter: 'messages[{i}].role'.",
                            f"messages.[{i}].role", "missing_required_parameter")
    if body.get("stream"):
        return _invalid("streaming is not supported by the sandbox", "stream")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 1
                                  or (name == "n" and value > 128)):
            return _invalid(f"Invalid '{name}': expected an integer >= 1 (n <= 128).", name)
    return None


def _first_sentence(text: str) -> str:
    """The first sentence of the last paragraph: for the usual "Instruction:\n\n<text>"
    prompt that is the text's lede, which reads like a plausible summary."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    last = paragraphs[-1] if paragraphs else ""
    line = last.strip().split("\n", 1)[0].strip()
    match = _SENTENCE.match(line)
    sentence = match.group(1) if match else line
    return sentence[:MAX_SENTENCE_CHARS]


def _fit(content: str, cap: int) -> str:
    """The longest prefix of ``content`` whose token estimate is ≤ cap (about 4 chars a
    token); a binary search because wide characters count one token each."""
    lo, hi = 0, min(len(content), cap * tokens.CHARS_PER_TOKEN)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens.text_tokens(content[:mid]) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return content[:lo]


def completion_for(body: Mapping[str, Any], model: str | None = None,
                   question: list[Any] | None = None) -> dict[str, Any]:
    """The chat.completion the sandbox answers ``body`` with. Content and usage depend only
    on the body (ids and ``created`` don't): "[sandbox] " plus the first sentence of the last
    user message, or a small JSON object when ``response_format`` asks for JSON.
    ``question``: the messages to answer, when not the whole conversation (a follow-up to a
    spoiled answer is answered as the original question was)."""
    messages = body["messages"]
    text = ""
    for message in reversed(question if question is not None else messages):
        if message.get("role") == "user":
            text = tokens._content_text(message.get("content"))
            break
    sentence = _first_sentence(text)
    fmt = body.get("response_format")
    schema = response_format_schema(fmt)
    if schema is not None and (schema.get("properties") or schema.get("type")):
        content = json.dumps(instance_for(schema, text, sentence), ensure_ascii=False)
    elif asks_for_json(fmt):
        label = LABELS[zlib.crc32(text.encode()) % len(LABELS)]
        content = json.dumps({"sandbox": True, "label": label, "summary": sentence})
    else:
        content = "[sandbox] " + (sentence or "(no user message)")
    finish = "stop"
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if cap is not None and tokens.text_tokens(content) > cap:
        content, finish = _fit(content, cap), "length"
    n = body.get("n") or 1
    choice_tokens = tokens.text_tokens(content)
    prompt = tokens.prompt_tokens(messages)
    return {
        "id": f"chatcmpl-sbx-{_ids.getrandbits(96):024x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or body["model"],
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": content, "refusal": None},
             "finish_reason": finish, "logprobs": None}
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": choice_tokens * n,
            "total_tokens": prompt + choice_tokens * n,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": "fp_sandbox",
        "service_tier": "default",
    }


def _has_marker(messages: list[Any], marker: str) -> bool:
    return any(isinstance(m, dict) and marker in tokens._content_text(m.get("content"))
               for m in messages)


def _mask(key: str) -> str:
    return f"{key[:3]}***{key[-4:]}" if len(key) > 12 else "***"


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (not Python's salted hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Simulator:
    """One sandbox server on one event loop. All state changes happen between awaits on
    that loop, so no locks are needed."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.stats = SimulatorStats()
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._req_bucket: _Bucket | None = None
        self._tok_bucket: _Bucket | None = None
        self._seen: dict[bytes, int] = {}
        self._spoiled: set[str] = set()  # texts of spoiled answers: a follow-up is clean
        self._quota_used = 0
        self.batches: BatchEndpoints | None = None  # the Files and Batches state, once started

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = a free port) and return the base URL ending in /v1."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        from batchgpt.simulator.batches import BatchEndpoints
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)
        app.router.add_get("/_sandbox/stats", self._get_stats)
        app.router.add_post("/_sandbox/reset", self._post_reset)
        app.router.add_get("/_sandbox/config", self._get_config)
        app.router.add_post("/_sandbox/config", self._post_config)
        self.batches = BatchEndpoints.attach(self, app.router)  # /v1/files, /v1/batches
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # No access log: it would be the single biggest cost per request at 2,000 req/s.
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
        await site.start()
        self._runner = runner
        self._stopping = asyncio.Event()
        bound = runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening and end every waiting (hung or delayed) request at once: they are
        woken and drop their connection, so this returns promptly."""
        if self._runner is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    def reset_stats(self) -> None:
        """Zero the counters (requests still in flight stay counted in ``in_flight``).
        Limits, quota usage and the per-body attempt counters behind the faults keep
        running; :meth:`reset_state` resets those."""
        fresh = SimulatorStats()
        fresh.in_flight = fresh.max_in_flight = self.stats.in_flight
        self.stats = fresh

    def reset_state(self) -> None:
        """Refill the buckets, forget quota usage and how often each body was seen."""
        self._req_bucket = self._tok_bucket = None
        self._seen.clear()
        self._spoiled.clear()
        self._quota_used = 0

    # -- the hot path ----------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        status = 0
        try:
            response = await self._answer(request, started)
            if response is None:  # drop: close without a byte; the write below then fails
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=204)
            status = response.status
            return response
        finally:
            self.stats.in_flight -= 1
            by_status = self.stats.by_status
            by_status[status] = by_status.get(status, 0) + 1

    async def _answer(self, request: web.Request, started: float) -> web.Response | None:
        config = self.config
        faults = config.faults
        raw = await request.read()
        now = time.monotonic()
        buckets = self._buckets(config, now)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if config.record and isinstance(body, dict):
            self.stats.bodies.append(body)

        if faults.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {faults.api_key}":
                given = auth[7:] if auth.startswith("Bearer ") else ""
                msg = (f"Incorrect API key provided: {_mask(given)}. You can find your API key "
                       "at https://platform.openai.com/account/api-keys." if given else
                       "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).")
                return self._finish(_error(401, msg, "invalid_request_error", "invalid_api_key"),
                                    started, buckets, faults)
        if faults.echo_auth_status is not None:
            given = request.headers.get("Authorization", "")
            return self._finish(_error(faults.echo_auth_status,
                                       f"proxy: upstream refused the request (Authorization: "
                                       f"{given})", "proxy_error", "proxy_error"),
                                started, buckets, faults)
        invalid = _validate(body)
        if invalid is not None:
            return self._finish(invalid, started, buckets, faults)
        assert isinstance(body, dict)
        model = body["model"]
        failing = faults.failing_models.get(model)
        if failing is not None:
            status, message, type_, code = model_failure(model, failing)
            return self._finish(_error(status, message, type_, code), started, buckets, faults)
        marker = faults.poison_marker
        if marker and marker.encode() in raw and _has_marker(body["messages"], marker):
            return self._finish(_invalid(
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 131072 tokens. Please reduce the length of the messages.",
                "messages", "context_length_exceeded"), started, buckets, faults)
        if faults.quota_after is not None and self._quota_used >= faults.quota_after:
            return self._finish(_error(
                429, "You exceeded your current quota, please check your plan and billing "
                "details.", "insufficient_quota", "insufficient_quota"),
                started, buckets, faults)

        cost = tokens.request_cost(body)
        rejected = self._admit(buckets, cost, model)
        if rejected is not None:
            return self._finish(rejected, started, buckets, faults)
        self.stats.tokens_charged += cost

        outcome, delay = "reply", config.latency_s
        if faults.total_rate() > 0.0 or config.latency_jitter_s > 0.0:
            key = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                            ensure_ascii=False).encode()).digest()
            nth = self._seen.get(key, 0)
            self._seen[key] = nth + 1
            outcome = self._pick_fault(faults, _unit(config.seed, key.hex(), nth, "fault"))
            if config.latency_jitter_s > 0.0:
                delay += config.latency_jitter_s * _unit(config.seed, key.hex(), nth, "jitter")
        if outcome in ("reply", "hang"):
            self._quota_used += 1  # reserved now so concurrent requests can't overshoot
        if outcome == "hang":
            delay += faults.hang_s
        if delay > 0.0 and not await self._sleep(delay):
            return None  # the server is stopping: nobody will read the answer
        if outcome == "server_error":
            resp = _error(500, "The server had an error while processing your request. "
                          "Sorry about that!", "server_error", "server_error")
        elif outcome == "overload":
            resp = _error(503, "Slow Down: the engine is currently overloaded, please try "
                          "again later.", "server_error", "engine_overloaded")
        elif outcome == "drop":
            return None
        elif outcome == "garbage":
            resp = web.Response(status=200, body=GARBAGE_BODY, content_type="text/html")
        else:
            reply = self._reply(body, config)
            if faults.reply_patch:
                reply = _merge(reply, faults.reply_patch)
            resp = web.Response(body=json.dumps(reply).encode(), content_type="application/json")
        return self._finish(resp, started, self._buckets(config, time.monotonic()), faults)

    def _reply(self, body: dict[str, Any], config: SimulatorConfig) -> dict[str, Any]:
        """The answer; a seeded share of first answers spoiled (see replies.ReplyFaults),
        and a follow-up to a spoiled answer answered cleanly, as the original question."""
        rf = config.faults.replies
        if rf.total_rate() <= 0.0:
            return completion_for(body, config.model_alias)
        if follows_up(body["messages"], self._spoiled):
            return completion_for(body, config.model_alias, question=body["messages"][:-2])
        reply = completion_for(body, config.model_alias)
        if rf.only_models and body["model"] not in rf.only_models:
            return reply
        key = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False).encode()).hexdigest()
        u = _unit(config.seed, key, "reply")
        fault = rf.pick(u)
        if fault is not None:
            self._spoiled.add(spoil(reply, fault, rf.denied_terms, u))
            self.stats.spoiled[fault] = self.stats.spoiled.get(fault, 0) + 1
        return reply

    @staticmethod
    def _pick_fault(faults: FaultConfig, u: float) -> str:
        edge = 0.0
        for name, rate in (("server_error", faults.server_error_rate),
                           ("overload", faults.overload_rate), ("drop", faults.drop_rate),
                           ("hang", faults.hang_rate), ("garbage", faults.garbage_rate)):
            edge += rate
            if u < edge:
                return name
        return "reply"

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; False when it did."""
        assert self._stopping is not None
        if self._stopping.is_set():
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return False
        return True

    def _buckets(self, config: SimulatorConfig, now: float) -> tuple[_Bucket | None,
                                                                      _Bucket | None]:
        """The refilled buckets; rebuilt (full) when rpm, tpm or window_s changed."""
        out: list[_Bucket | None] = []
        for attr, limit in (("_req_bucket", config.rpm), ("_tok_bucket", config.tpm)):
            bucket: _Bucket | None = getattr(self, attr)
            if limit is None:
                bucket = None
            elif bucket is None or bucket.key != (limit, config.window_s):
                bucket = _Bucket(limit, config.window_s, now)
            else:
                bucket.refill(now)
            setattr(self, attr, bucket)
            out.append(bucket)
        return out[0], out[1]

    @staticmethod
    def _admit(buckets: tuple[_Bucket | None, _Bucket | None], cost: int,
               model: str) -> web.Response | None:
        """Charge both buckets and return None, or return the 429. A rejected request
        still costs one request (OpenAI counts failed requests) but no tokens."""
        req, tok = buckets
        if tok is not None and cost > tok.limit:
            if req is not None and req.level >= 1:
                req.level -= 1
            return _error(429, f"Request too large for {model} in organization {ORG} on tokens "
                          f"per min (TPM): Limit {tok.limit}, Requested {cost}. The input or "
                          "output tokens must be reduced in order to run successfully. Visit "
                          "https://platform.openai.com/account/rate-limits to learn more.",
                          "tokens", "rate_limit_exceeded")
        wait_r = req.wait(1) if req is not None else 0.0
        wait_t = tok.wait(cost) if tok is not None else 0.0
        if wait_r <= 0.0 and wait_t <= 0.0:
            if req is not None:
                req.level -= 1
            if tok is not None:
                tok.level -= cost
            return None
        if wait_r > 0.0:
            assert req is not None
            kind, bucket, label, asked = "requests", req, "requests per min (RPM)", 1
        else:
            assert tok is not None
            kind, bucket, label, asked = "tokens", tok, "tokens per min (TPM)", cost
        wait = max(wait_r, wait_t)
        used = bucket.limit - bucket.remaining()
        if req is not None and req.level >= 1:
            req.level -= 1
        resp = _error(429, f"Rate limit reached for {model} in organization {ORG} on {label}: "
                      f"Limit {bucket.limit}, Used {used}, Requested {asked}. Please try again "
                      f"in {format_go_duration(wait)}. Visit https://platform.openai.com/"
                      "account/rate-limits to learn more.", kind, "rate_limit_exceeded")
        resp.headers["retry-after"] = str(max(1, math.ceil(wait)))
        resp.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return resp

    @staticmethod
    def _finish(resp: web.Response, started: float,
                buckets: tuple[_Bucket | None, _Bucket | None],
                faults: FaultConfig) -> web.Response:
        headers = resp.headers
        headers["x-request-id"] = f"req_{_ids.getrandbits(128):032x}"
        headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))
        headers["openai-organization"] = ORG
        for dim, bucket in zip(("requests", "tokens"), buckets, strict=True):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{dim}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{dim}"] = str(bucket.remaining())
                headers[f"x-ratelimit-reset-{dim}"] = format_go_duration(bucket.reset())
        if faults.headers:
            headers.update(faults.headers)
        return resp

    # -- other endpoints -------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "sandbox"}
                for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def _get_stats(self, request: web.Request) -> web.Response:
        bodies = request.query.get("bodies", "") not in ("", "0", "false")
        return web.json_response(self.stats.to_dict(bodies=bodies))

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        if request.query.get("state", "") not in ("", "0", "false"):
            self.reset_state()
        return web.json_response({"ok": True})

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.model_dump())

    async def _post_config(self, request: web.Request) -> web.Response:
        """Merge a JSON patch into the config, e.g. ``{"faults": {"quota_after": null}}``."""
        try:
            patch = await request.json()
            if not isinstance(patch, dict):
                raise ValueError("expected a JSON object")
            self.config = SimulatorConfig.model_validate(_merge(self.config.model_dump(), patch))
        except (ValueError, ValidationError) as exc:
            return _invalid(f"bad sandbox config: {exc}")
        return web.json_response(self.config.model_dump())

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"Invalid URL ({request.method} {request.path})",
                      "invalid_request_error", "unknown_url")


class SimulatorThread:
    """Run a Simulator on its own event loop in a daemon thread, for sync code (CLI tests,
    the REPL). ``with SimulatorThread(cfg) as sim: ... sim.base_url``."""

    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.simulator = Simulator(config)
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="batchgpt-sandbox", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.simulator.start(self._host, self._port))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def __enter__(self) -> Simulator:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.simulator

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.simulator.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    sim = Simulator(config)
    url = await sim.start(host, port)
    print(f"batchgpt sandbox listening on {url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await sim.stop()


def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM (``batchgpt sandbox``). Port 0 picks a free port; the
    one line printed tells which."""
    asyncio.run(_serve(config, host, port))


def main(argv: list[str] | None = None) -> None:
    """``python -m batchgpt.simulator``: the sandbox in its own process (benchmarks)."""
    p = argparse.ArgumentParser(prog="python -m batchgpt.simulator",
                                description="batchgpt's OpenAI-compatible sandbox server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--window", type=float, default=1.0, help="limit quantum in seconds")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    p.add_argument("--jitter", type=float, default=0.0, help="extra uniform delay, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="don't keep request bodies")
    p.add_argument("--model-alias")
    for rate in ("server-error", "overload", "drop", "hang", "garbage"):
        p.add_argument(f"--{rate}-rate", type=float, default=0.0)
    p.add_argument("--hang-s", type=float, default=3600.0)
    p.add_argument("--quota-after", type=int)
    p.add_argument("--poison-marker", default="__POISON__")
    p.add_argument("--api-key", help="require this bearer key")
    p.add_argument("--reply-faults", default="",
                   help="e.g. invalid_json=0.2,truncated=0.1,denied=0.1 (first answers)")
    p.add_argument("--denied-term", action="append", default=[])
    p.add_argument("--fail-model", action="append", default=[], help="MODEL=503 or MODEL=404")
    a = p.parse_args(argv)
    try:
        config = SimulatorConfig(
            rpm=a.rpm, tpm=a.tpm, window_s=a.window, latency_s=a.latency,
            latency_jitter_s=a.jitter, seed=a.seed, record=not a.no_record,
            model_alias=a.model_alias,
            faults=FaultConfig(
                server_error_rate=a.server_error_rate, overload_rate=a.overload_rate,
                drop_rate=a.drop_rate, hang_rate=a.hang_rate, hang_s=a.hang_s,
                garbage_rate=a.garbage_rate, quota_after=a.quota_after,
                poison_marker=a.poison_marker or None, api_key=a.api_key,
                replies=parse_reply_faults(a.reply_faults, a.denied_term),
                failing_models=dict(parse_failing_model(m) for m in a.fail_model)))
    except (ValidationError, ValueError) as exc:
        p.error(str(exc))
    serve(config, a.host, a.port)

