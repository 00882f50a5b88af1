"""The sandbox's Files and Batches endpoints: enough of ``/v1/files`` and ``/v1/batches``
for the real openai SDK's ``client.files`` and ``client.batches`` resources.

- ``POST /v1/files`` (multipart: ``file``, ``purpose``), ``GET /v1/files`` (``purpose``,
  ``after``, ``limit``, ``order``; a cursor page), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content`` (the raw bytes), ``DELETE /v1/files/{id}``.
- ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first,
  ``after``/``limit``, ``has_more``), ``POST /v1/batches/{id}/cancel``.

A batch moves validating → in_progress → finalizing → completed as its age crosses
10 %, 90 % and 100 % of ``delay_s`` on the endpoints' clock (wall time plus whatever a
test added with :meth:`BatchEndpoints.advance`, so tests never sleep). Its lines are
answered when it ends, like chat requests (``completion_for``, the sandbox's poison
marker as a 400, its seeded ``server_error_rate`` as a 500), into an output file and an
error file in the provider's formats. Seeded per batch: expiry (``expire_rate``), with
``expire_done_fraction`` of the lines answered and the rest ``batch_expired`` in the
error file. A cancelled batch answers the share of its lines its age had reached.
Validation fails a batch whose file is not valid Batch API lines (one model, unique
``custom_id``), holds ``fail_validation_marker``, or would take the model's enqueued
prompt tokens past ``enqueued_token_limit`` (``token_limit_exceeded``).

What it saw is kept for tests: ``carried`` counts, per ``custom_id``, the batches
created with it; ``deleted`` lists the files deleted.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from batchgpt import tokens
from batchgpt.simulator.app import _error, _has_marker, _unit, completion_for

if TYPE_CHECKING:
    from batchgpt.simulator.app import Simulator

TERMINAL = ("completed", "failed", "expired", "cancelled")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW_S = 24 * 3600


class BatchSimConfig(BaseModel):
    """How the sandbox's Batch API behaves; mutable at runtime (tests change it between
    runs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    delay_s: float = Field(default=0.0, ge=0.0)
    expire_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    expire_done_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    enqueued_token_limit: int | None = Field(default=None, ge=1)
    fail_validation_marker: str | None = "__INVALID_BATCH__"
    seed: int = 0


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created: float  # on the endpoints' clock
    lines: list[dict[str, Any]]
    tokens: int
    model: str
    invalid: list[dict[str, Any]] | None
    expire: bool
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cancel_progress: float | None = None

    def as_json(self) -> dict[str, Any]:
        created = int(self.created)
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": None if not self.invalid or self.status != "failed" else {
                "object": "list", "data": self.invalid},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": created, "expires_at": created + WINDOW_S,
            "in_progress_at": self.times.get("in_progress"),
            "finalizing_at": self.times.get("finalizing"),
            "completed_at": self.times.get("completed"), "failed_at": self.times.get("failed"),
            "expired_at": self.times.get("expired"),
            "cancelling_at": self.times.get("cancelling"),
            "cancelled_at": self.times.get("cancelled"),
            "request_counts": {"total": len(self.lines),
                               "completed": self.counts.get("completed", 0),
                               "failed": self.counts.get("failed", 0)},
            "metadata": self.metadata,
        }


class BatchEndpoints:
    """The Files and Batches state of one simulator."""

    def __init__(self, sim: Simulator, config: BatchSimConfig | None = None) -> None:
        self.sim = sim
        self.config = config or BatchSimConfig()
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.carried: Counter[str] = Counter()
        self.deleted: list[str] = []
        self.offset = 0.0
        self._n = 0

    @classmethod
    def attach(cls, sim: Simulator, router: web.UrlDispatcher) -> BatchEndpoints:
        """Register the routes on ``router`` (before the catch-all); the simulator's
        ``batches`` attribute is the state, kept if it was set before start."""
        self: BatchEndpoints = getattr(sim, "batches", None) or cls(sim)
        for prefix in ("/v1", ""):
            router.add_post(f"{prefix}/files", self._upload)
            router.add_get(f"{prefix}/files", self._list_files)
            router.add_get(prefix + "/files/{id}", self._get_file)
            router.add_get(prefix + "/files/{id}/content", self._content)
            router.add_delete(prefix + "/files/{id}", self._delete)
            router.add_post(f"{prefix}/batches", self._create)
            router.add_get(f"{prefix}/batches", self._list_batches)
            router.add_get(prefix + "/batches/{id}", self._get_batch)
            router.add_post(prefix + "/batches/{id}/cancel", self._cancel)
        return self

    # -- time -----------------------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the batches' clock forward (tests: a day passes without sleeping)."""
        self.offset += seconds

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-sbx{self._n:06d}"

    # -- files ----------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            return _invalid("a multipart upload needs 'file' and 'purpose'", "file")
        f = _File(self._id("file"), upload.filename or "upload.jsonl", purpose,
                  upload.file.read(), int(self.now()))
        self.files[f.id] = f
        return web.json_response(f.as_json())

    async def _list_files(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        purpose = request.query.get("purpose")
        items = [f for f in self.files.values() if purpose in (None, f.purpose)]
        if request.query.get("order", "desc") == "desc":
            items.reverse()
        return _page(request, [f.as_json() for f in items], default_limit=10000)

    async def _get_file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["id"])
        return _no_such("File", request) if f is None else web.json_response(f.as_json())

    async def _content(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        f = self.files.get(request.match_info["id"])
        if f is None:
            return _no_such("File", request)
        return web.Response(body=f.data, content_type="application/octet-stream")

    async def _delete(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        f = self.files.pop(request.match_info["id"], None)
        if f is None:
            return _no_such("File", request)
        self.deleted.append(f.id)
        return web.json_response({"id": f.id, "object": "file", "deleted": True})

    # -- batches --------------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _invalid("the body must be a JSON object")
        f = self.files.get(str(body.get("input_file_id")))
        if f is None:
            return _invalid(f"No such File object: {body.get('input_file_id')}",
                            "input_file_id")
        endpoint = body.get("endpoint")
        if endpoint != "/v1/chat/completions":
            return _invalid("the sandbox batches /v1/chat/completions only", "endpoint")
        window = body.get("completion_window")
        if window != "24h":
            return _invalid("completion_window must be '24h'", "completion_window")
        metadata = body.get("metadata")
        lines, problems = _read_lines(f.data, endpoint, self.config.fail_validation_marker)
        model = str(lines[0]["body"].get("model")) if lines else ""
        prompt = sum(tokens.prompt_tokens(line["body"].get("messages")) for line in lines)
        if not problems:
            problems = self._token_limit(model, prompt)
        b = _Batch(self._id("batch"), f.id, endpoint, window,
                   metadata if isinstance(metadata, dict) else None, self.now(), lines,
                   prompt, model, problems or None,
                   _unit(self.config.seed, f.data) < self.config.expire_rate)
        if not problems:
            self.carried.update(line["custom_id"] for line in lines)
        self.batches[b.id] = b
        return web.json_response(b.as_json())

    def _token_limit(self, model: str, prompt: int) -> list[dict[str, Any]]:
        limit = self.config.enqueued_token_limit
        if limit is None:
            return []
        queued = 0
        for other in self.batches.values():
            self._step(other)
            if other.model == model and other.status in ACTIVE and not other.invalid:
                queued += other.tokens
        if queued + prompt <= limit:
            return []
        return [{"code": "token_limit_exceeded", "line": None, "param": None,
                 "message": f"Enqueued token limit reached for {model} in organization "
                            f"org-sandbox. Limit: {limit:,} enqueued tokens. Please try "
                            "again once some in_progress batches have been completed."}]

    def _batch(self, request: web.Request) -> _Batch | web.Response:
        """The batch the path names, brought up to date, or the error to answer."""
        refused = self._auth(request)
        if refused is not None:
            return refused
        b = self.batches.get(request.match_info["id"])
        if b is None:
            return _no_such("Batch", request)
        self._step(b)
        return b

    async def _get_batch(self, request: web.Request) -> web.Response:
        b = self._batch(request)
        return b if isinstance(b, web.Response) else web.json_response(b.as_json())

    async def _list_batches(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        items = list(self.batches.values())
        for b in items:
            self._step(b)
        items.reverse()  # newest first, as OpenAI lists them
        return _page(request, [b.as_json() for b in items], default_limit=20)

    async def _cancel(self, request: web.Request) -> web.Response:
        b = self._batch(request)
        if isinstance(b, web.Response):
            return b
        if b.status in TERMINAL:
            return _error(409, f"Cannot cancel a batch with status '{b.status}'.",
                          "invalid_request_error", None)
        if b.status != "cancelling":
            delay = self.config.delay_s
            b.cancel_progress = (min(1.0, (self.now() - b.created) / delay) if delay > 0
                                 else 1.0)
            b.status = "cancelling"
            b.times["cancelling"] = int(self.now())
        return web.json_response(b.as_json())

    # -- the state machine ----------------------------------------------------------------
    def _step(self, b: _Batch) -> None:
        """Bring ``b`` to the state its age says (answering its lines when it ends)."""
        if b.status in TERMINAL:
            return
        now = self.now()
        stamp = int(now)
        if b.invalid:
            b.status, b.times["failed"] = "failed", stamp
            return
        if b.status == "cancelling":
            self._finish(b, "cancelled", b.cancel_progress or 0.0, "batch_cancelled",
                         "This request was cancelled before it was executed.")
            return
        age = now - b.created
        delay = self.config.delay_s
        if age >= delay:
            b.times.setdefault("in_progress", stamp)
            b.times.setdefault("finalizing", stamp)
            if b.expire:
                self._finish(b, "expired", self.config.expire_done_fraction, "batch_expired",
                             "This request could not be executed before the completion "
                             "window expired.")
            else:
                self._finish(b, "completed", 1.0, "", "")
        elif age >= 0.9 * delay:
            b.status = "finalizing"
            b.times.setdefault("in_progress", stamp)
            b.times.setdefault("finalizing", stamp)
        elif age >= 0.1 * delay:
            b.status = "in_progress"
            b.times.setdefault("in_progress", stamp)

    def _finish(self, b: _Batch, status: str, fraction: float, code: str,
                message: str) -> None:
        done = math.floor(len(b.lines) * fraction + 1e-9)
        out: list[bytes] = []
        err: list[bytes] = []
        for i, line in enumerate(b.lines):
            if i >= done:
                err.append(_jsonl({"id": self._id("batch_req"), "custom_id": line["custom_id"],
                                   "response": None,
                                   "error": {"code": code, "message": message}}))
                continue
            status_code, body = self._answer(b, line["body"])
            entry = {"id": self._id("batch_req"), "custom_id": line["custom_id"],
                     "response": {"status_code": status_code,
                                  "request_id": self._id("req"), "body": body},
                     "error": None}
            (out if status_code == 200 else err).append(_jsonl(entry))
            b.counts["completed" if status_code == 200 else "failed"] = (
                b.counts.get("completed" if status_code == 200 else "failed", 0) + 1)
        stamp = int(self.now())
        if out:
            b.output_file_id = self._store(f"{b.id}_output.jsonl", b"".join(out))
        if err:
            b.error_file_id = self._store(f"{b.id}_error.jsonl", b"".join(err))
        b.status = status
        b.times[status] = stamp

    def _answer(self, b: _Batch, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        config = self.sim.config
        faults = config.faults
        marker = faults.poison_marker
        if marker and _has_marker(body.get("messages") or [], marker):
            return 400, {"error": {"message": "The sandbox refuses this request (poison "
                                   "marker).", "type": "invalid_request_error",
                                   "param": "messages", "code": "poison"}}
        if _unit(config.seed, b.id, json.dumps(body, sort_keys=True)) < faults.server_error_rate:
            return 500, {"error": {"message": "The server had an error while processing "
                                   "your request.", "type": "server_error", "param": None,
                                   "code": "server_error"}}
        return 200, completion_for(body, config.model_alias)

    def _store(self, name: str, data: bytes) -> str:
        f = _File(self._id("file"), name, "batch_output", data, int(self.now()))
        self.files[f.id] = f
        return f.id

    def _auth(self, request: web.Request) -> web.Response | None:
        key = self.sim.config.faults.api_key
        if key is not None and request.headers.get("Authorization", "") != f"Bearer {key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error",
                          "invalid_api_key")
        return None


def _read_lines(data: bytes, endpoint: str, marker: str | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's request lines, and the validation errors OpenAI would report."""
    lines: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def problem(code: str, number: int, message: str) -> None:
        if len(problems) < 10:
            problems.append({"code": code, "line": number, "param": None,
                             "message": message})

    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            problem("invalid_json_line", number, "This line is not parseable as valid JSON.")
            continue
        if (not isinstance(line, dict) or not isinstance(line.get("custom_id"), str)
                or not isinstance(line.get("body"), dict) or line.get("method") != "POST"):
            problem("invalid_request", number, "Each line needs custom_id, method POST, url "
                    "and body.")
            continue
        if line.get("url") != endpoint:
            problem("mismatched_endpoint", number, f"The url must be {endpoint}.")
        if line["custom_id"] in seen:
            problem("duplicate_custom_id", number, "The custom_id for this request is a "
                    "duplicate of another request.")
        seen.add(line["custom_id"])
        models.add(str(line["body"].get("model")))
        if len(models) > 1:
            problem("mismatched_model", number, "Every request of a batch must use the same "
                    "model.")
        if marker and marker in raw.decode("utf-8", "replace"):
            problem("invalid_request", number, "The sandbox refuses this line (validation "
                    "marker).")
        lines.append(line)
    if not lines and not problems:
        problem("empty_file", 0, "The input file is empty.")
    return lines, problems


def _page(request: web.Request, items: list[dict[str, Any]], default_limit: int
          ) -> web.Response:
    """A cursor page as the SDK reads it: ``data``, ``has_more``, ``after`` = an id."""
    try:
        limit = max(1, min(10000, int(request.query.get("limit", default_limit))))
    except ValueError:
        return _invalid("limit must be an integer", "limit")
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return web.json_response({
        "object": "list", "data": page, "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None})


def _jsonl(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _invalid(message: str, param: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", None, param)


def _no_such(what: str, request: web.Request) -> web.Response:
    return _error(404, f"No such {what} object: {request.match_info['id']}",
                  "invalid_request_error", None, "id")
