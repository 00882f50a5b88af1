"""``batchgpt show JOB ID``: everything about one row, to answer "what did it send, what
came back, and why did it fail?" without reading JSONL by hand.

The row is found by reading the input as a run does (:meth:`InputFile.scan`: the same
checks, the same rendered request and hash), so the request shown is the exact JSON body
a run sends (or sent, when its result is for this very request). What came back is read
from the output at the offset the index records (checked to be that row's line), and a
failure from its failures-file line kept in the index. The store is opened read-only:
nothing is written, locked or repaired.

An id that is not in the input may still have a result (rows removed from the input keep
theirs): it is shown, without a request. An id found nowhere is an error that suggests
the input's closest ids (:func:`difflib`-style ratios, computed while reading, so a
million-row input is not held in memory to suggest from).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.errors import BatchGPTError
from batchgpt.export import Pricer, failure_error, opened, reply_content, row_state
from batchgpt.redact import Redactor
from batchgpt.source import InputFile, Row

SUGGESTIONS = 3
CUTOFF = 0.6  # difflib.get_close_matches' default


class UnknownRow(BatchGPTError):
    """The id is neither in the input nor in the job's results."""


@dataclass
class _Closest:
    """The ``n`` ids closest to ``word`` among those offered, as ``get_close_matches``
    would rank them, keeping only ``n`` at a time."""

    word: str
    n: int = SUGGESTIONS
    best: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._matcher = SequenceMatcher()
        self._matcher.set_seq2(self.word)

    def offer(self, candidate: str) -> None:
        m = self._matcher
        m.set_seq1(candidate)
        if m.real_quick_ratio() >= CUTOFF and m.quick_ratio() >= CUTOFF:
            score = m.ratio()
            if score >= CUTOFF:
                if len(self.best) < self.n:
                    heapq.heappush(self.best, (score, candidate))
                else:
                    heapq.heappushpop(self.best, (score, candidate))

    def names(self) -> list[str]:
        return [name for _, name in sorted(self.best, reverse=True)]


def _find(job: JobConfig, custom_id: str) -> tuple[Row | None, str, list[str]]:
    """The row of ``custom_id`` (None if the input has none), its request hash, and the
    closest ids when it is not there."""
    closest = _Closest(custom_id)
    for scanned in InputFile(job).scan():
        if scanned.custom_id == custom_id:
            return scanned.row, scanned.request_hash, []
        closest.offer(scanned.custom_id)
    return None, "", closest.names()


def show_row(job: JobConfig, custom_id: str, job_hint: str = "JOB") -> dict[str, Any]:
    """Everything known about one row, as plain data (what ``--json`` prints)."""
    row, request_hash, close = _find(job, custom_id)
    with opened(job, job_hint) as (store, reader):
        if row is not None and store.has_unadopted():  # in memory: see Store.open_readonly
            store.adopt([(custom_id, request_hash)])
        stored = store.lookup([custom_id]).get(custom_id)
        if row is None and (stored is None or stored.result is None):
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownRow(f"no row {custom_id!r} in {job.input}{hint}")
        state = row_state(request_hash, stored)
        result, failure = state.result, state.failure
        line = None
        if result is not None:
            line = reader.read([(custom_id, result.off, result.len)])[custom_id]
    info: dict[str, Any] = {
        "job": job.job_name,
        "custom_id": custom_id,
        "input": str(job.input),
        "line": row.line if row is not None else None,
        "status": state.status,
        "on_change": job.on_change,
        "request": row.body if row is not None else None,
        "request_hash": request_hash or None,
        "attempts": None,
        "model": None,
        "reply": None,
        "error": None,
        "error_response": None,
        "usage": None,
        "cost_usd": None,
    }
    if row is None:
        info["status"] = "not_in_input"
    elif state.stale:
        info["status"] = "changed"
    if result is not None and line is not None:
        obj = json.loads(line)
        response = obj.get("response") if isinstance(obj, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        requested = row.body.get("model") if row is not None else None
        info.update(
            attempts=result.attempts,
            model=result.model,
            reply={"content": reply_content(body),
                   "request_id": response.get("request_id") if response else None,
                   "body": body},
            usage=result.usage.model_dump(),
            cost_usd=Pricer(job.pricing).cost(result, requested if isinstance(requested, str)
                                              else None),
        )
    if failure is not None:
        error = failure_error(failure)
        info["error"] = error
        info["error_response"] = _failure_response(failure.line)
        if result is None:
            info["attempts"] = error.get("attempts")
    # The key pasted into the job's params or the input is sent as written, but never
    # printed: cleaned with the run's key, as a run's logs are.
    redact = Redactor.for_key(job.api.api_key_env)
    return {key: redact.clean(value) for key, value in info.items()}


def _block(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return "\n".join("  " + line for line in text.splitlines())


_STATUS = {
    "succeeded": "succeeded",
    "pending": "pending: not sent yet (the next run sends it)",
    "not_in_input": "not in the input any more: its result is kept in the output",
}
_CHANGED = {
    "rerun": "the next run sends it again (on_change: rerun)",
    "keep": "its result is kept (on_change: keep)",
    "error": "a run refuses to start until this is settled (on_change: error)",
}


def render_row(info: dict[str, Any]) -> str:
    """The human-readable ``show``: status first, then the request, then what came back."""
    status = info["status"]
    error = info["error"]
    if status == "failed":
        kind = ("retryable: the next run sends it again" if error and error.get("retryable")
                else "permanent: a run sends it again only with --retry-failed")
        head = f"failed ({kind})"
    elif status == "changed":
        head = ("changed since its result: the reply below answers an earlier version of "
                f"this request; {_CHANGED.get(info['on_change'], '')}")
    else:
        head = _STATUS.get(status, status)
    where = f"line {info['line']} of {info['input']}" if info["line"] else info["input"]
    out = [f"{info['custom_id']}  ({where})", f"  status     {head}"]
    if error:
        what = f"{error.get('code')}: {error.get('message')}"
        if status == "changed":
            what = f"its new request failed: {what}"
        out.append(f"  error      {what}")
        if error.get("status") is not None:
            out.append(f"  HTTP       {error['status']}")
    if info["attempts"] is not None:
        out.append(f"  attempts   {info['attempts']}")
    if info["model"]:
        out.append(f"  model      {info['model']}")
    usage = info["usage"]
    if usage:
        out.append(f"  tokens     {usage['prompt_tokens']:,} prompt + "
                   f"{usage['completion_tokens']:,} completion = {usage['total_tokens']:,}")
        cost = info["cost_usd"]
        out.append("  cost       " + ("unknown (add `pricing:` to the job file)" if cost is None
                                      else f"${cost:.8f}"))
    if info["request"] is not None:
        sent = {"succeeded": "sent", "failed": "sent"}.get(status, "that the next run sends")
        if status == "changed" and info["on_change"] != "rerun":
            sent = "a run would send"
        out += ["", f"request (the exact JSON body {sent}):", _block(info["request"])]
    reply = info["reply"]
    if reply is not None:
        content = reply["content"]
        out += ["", "reply:", "  " + ("(no text)" if content is None else
                                      str(content).replace("\n", "\n  "))]
        out += ["", f"response body (request id {reply['request_id']}):", _block(reply["body"])]
    if info.get("error_response") is not None:
        out += ["", "server response:", _block(info["error_response"])]
    return "\n".join(out)


def _failure_response(line: bytes) -> Any:
    """The HTTP response a failures-file line keeps (None when there was none: a timeout,
    a dropped connection)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return obj.get("response") if isinstance(obj, dict) else None
