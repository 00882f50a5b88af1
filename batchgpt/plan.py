"""Before anything is sent: validate the whole input and work out which rows to send.

One streaming pass over the input checks every line and asks the index, 500 ids at a
time, what it already holds. What comes out is, per pending row, its byte offset, line
number and a 64-bit check of (id, request hash): 24 bytes a row, so a million-row resume
needs neither the file nor the ids in memory. The runner re-reads pending rows by offset
and compares each one's check with the plan's, so an input rewritten during the run is
noticed instead of sending the wrong rows.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchgpt import prefix
from batchgpt.config import JobConfig
from batchgpt.errors import ConfigError
from batchgpt.source import InputFile, Row, ScannedRow

if TYPE_CHECKING:
    from batchgpt.store import Store

BATCH = 500
# Distinct models the plan keeps figures for: a handful in any real input; a hostile one
# naming a new model on every line must not grow the plan by a million entries.
MAX_MODELS = 1000


def row_check(custom_id: str, request_hash: str) -> int:
    """The plan's fingerprint of a pending row (this process only: Python's str hash)."""
    return hash((custom_id, request_hash))


@dataclass
class ModelLoad:
    """What the rows to send ask of one model: for pricing the estimate and the budget."""

    rows: int = 0
    prompt_tokens: int = 0
    max_completion_tokens: int = 0  # over the rows that set a cap
    uncapped: int = 0  # rows that set no max_tokens


@dataclass
class Plan:
    rows: int = 0  # valid rows in the input
    done: int = 0  # succeeded before (for this request, or kept by on_change: keep)
    failed_kept: int = 0  # failed permanently before; left alone without --retry-failed
    changed: int = 0  # request changed since its result (or failure): sent again
    changed_kept: int = 0  # request changed, old result kept (on_change: keep)
    retrying: int = 0  # failed before; sent again
    new: int = 0
    deferred: int = 0  # pending but beyond --limit
    prompt_tokens: int = 0  # estimate over the rows to send
    max_completion_tokens: int = 0  # the most they may produce (max_tokens × n)
    uncapped: int = 0  # rows to send that set no max_tokens
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lines: array[int] = field(default_factory=lambda: array("q"))
    checks: array[int] = field(default_factory=lambda: array("q"))
    changed_refused: int = 0  # request changed and on_change: error
    changed_examples: list[str] = field(default_factory=list)
    failed_codes: Counter[str] = field(default_factory=Counter)  # of the failed_kept rows
    with_result: int = 0  # rows with a result in the output (for this request or another)
    failed_deferred: int = 0  # of the deferred rows, those still failed (in the failures file)
    # The rows to send, by the model they name (the job's, or a Batch API / chat line's
    # own): one entry per distinct model, so an unpriced one is refused before sending.
    by_model: dict[str, ModelLoad] = field(default_factory=dict)
    models_overflow: int = 0  # rows to send naming a model beyond the first MAX_MODELS
    # What batchgpt.prefix needs to extend the verified prefix once the run has sent the
    # rows (a writable plan's; None otherwise).
    verified: prefix.Tracker | None = field(default=None, repr=False, compare=False)

    @property
    def to_send(self) -> int:
        return len(self.offsets)

    def requests(self) -> dict[str, int]:
        """The input's rows by state, as ``status`` and ``--dry-run`` both report them
        (and as a run's summary counts them before it sends anything): ``succeeded`` for
        their current request (or kept by ``on_change: keep``), ``failed`` (for their
        current request; ``retryable`` of them the next run sends again), ``pending``
        (never answered for their current request), of which ``changed``: rows whose
        request changed since their result or failure."""
        failed = self.failed_kept + self.retrying
        return {
            "total": self.rows,
            "succeeded": self.done,
            "failed": failed,
            "pending": self.rows - self.done - failed,
            "changed": self.changed + self.changed_refused,
            "changed_kept": self.changed_kept,
            "retryable": self.retrying,
            "to_send": self.to_send,
        }


def planned_rows(plan: Plan, source: InputFile,
                 changed: Callable[[int, str], None]) -> Iterator[Row]:
    """The plan's rows to send, re-read by offset, each checked against the plan: an
    input rewritten or cut during the run must stop it, not send other rows than planned.
    At the first row that is not what was planned, ``changed(line, why)`` is called and
    the rows end."""
    rows = source.read_at(zip(plan.offsets, plan.lines, strict=True))
    for check, line in zip(plan.checks, plan.lines, strict=True):
        try:
            row: Row | None = next(rows)
        except Exception as exc:  # the line is gone, cut, or no longer valid
            row, why = None, f"{type(exc).__name__}: {exc}"[:200]
        else:
            why = "another row is there now"
        if row is None or row_check(row.custom_id, row.request_hash) != check:
            changed(line, why)
            return
        yield row


def not_in_input(results: int, in_input: int) -> int:
    """Results in the output for ids that are not rows of the input: all its ``results``
    (whatever their ids) less the ``in_input`` rows of the input that have one."""
    return max(0, results - in_input)


def make_plan(
    job: JobConfig, source: InputFile, store: Store | None, *, retry_failed: bool,
    limit: int | None, refuse_changed: bool = True,
) -> Plan:
    """Raises InputError (every bad line) before returning anything, so a file with a
    problem anywhere sends nothing. ``store`` None: plan as if nothing was ever done
    (--fresh validates the input this way before setting the old results aside).
    ``refuse_changed`` False (``status``): rows that ``on_change: error`` would refuse
    are counted in ``changed_refused`` instead of raising."""
    # Adopting taken-over results (giving them their row's request hash) writes to the
    # index, which a read-only look (status, --dry-run) must not do and, on an index opened
    # read-only, cannot. It changes nothing in the plan: a result without a hash counts as
    # done for the row's request either way (see Index.unsettled).
    # (A read-only store holds an in-memory copy whenever there is anything to adopt.)
    adopt = store is not None and store.has_unadopted()
    # Lines before a verified prefix's end are not read again (batchgpt.prefix).
    known = None if store is None or adopt else prefix.trusted(job, source, store)
    try:
        plan, tracker = _scan(job, source, store, retry_failed, limit, adopt, known)
    except prefix.Fallback:  # an id after the prefix has a result: read it all
        plan, tracker = _scan(job, source, store, retry_failed, limit, adopt, None)
    if plan.changed_refused and refuse_changed:
        raise ConfigError(
            f"{plan.changed_refused} rows changed since their result was written "
            f"(e.g. {', '.join(plan.changed_examples)}), and the job says on_change: error. "
            "Set on_change: rerun to send them again, or keep to keep the old results."
        )
    if store is not None and not store.dry:
        prefix.remember(job, source, store, tracker)
        plan.verified = tracker
    return plan


def _scan(job: JobConfig, source: InputFile, store: Store | None, retry_failed: bool,
          limit: int | None, adopt: bool, known: prefix.Trusted | None,
          ) -> tuple[Plan, prefix.Tracker]:
    """The plan's pass over the input: all of it, or (``known``) the lines after a
    verified prefix, whose rows count as done."""
    plan = Plan()
    tracker = prefix.Tracker(source, known)
    resume = None
    if known is not None:
        done = known.record.rows
        plan.rows = plan.done = plan.with_result = done
        resume = known.resume
    batch: list[ScannedRow] = []
    for scanned in source.scan(resume):
        batch.append(scanned)
        if len(batch) >= BATCH:
            if known is not None and store is not None:
                prefix.check_tail(store, known.record, batch)
            tracker.batch(batch, _classify(job, store, batch, plan, retry_failed, limit,
                                           adopt))
            batch = []
    if batch:
        if known is not None and store is not None:
            prefix.check_tail(store, known.record, batch)
        tracker.batch(batch, _classify(job, store, batch, plan, retry_failed, limit, adopt))
    return plan, tracker


def _classify(
    job: JobConfig, store: Store | None, batch: list[ScannedRow], plan: Plan,
    retry_failed: bool, limit: int | None, adopt: bool,
) -> int:
    """Count the batch's rows into the plan; returns how many of its first rows
    succeeded before for their very request (the verified prefix's rows)."""
    leading = 0
    if store is None:
        unsettled = None
    else:
        pairs = [(r.custom_id, r.request_hash) for r in batch]
        if adopt:
            store.adopt(pairs)
        unsettled = store.unsettled(pairs)
        if not unsettled:  # the whole batch succeeded before, for the same requests
            plan.rows += len(batch)
            plan.done += len(batch)
            plan.with_result += len(batch)
            return len(batch)
    for i, scanned in enumerate(batch):
        plan.rows += 1
        if unsettled is not None and scanned.custom_id not in unsettled:
            plan.done += 1  # left out by the index: succeeded for this very request
            plan.with_result += 1
            leading += leading == i
            continue
        s = None if unsettled is None else unsettled[scanned.custom_id]
        if s is None or not (s.has_result or s.has_failure):
            plan.new += 1
        elif s.has_result and job.on_change != "rerun":
            # An older result, and the job keeps it (or refuses to run).
            plan.with_result += 1
            if job.on_change == "keep":
                plan.changed_kept += 1
                plan.done += 1
            else:
                plan.changed_refused += 1
                if len(plan.changed_examples) < 5:
                    plan.changed_examples.append(scanned.custom_id)
            continue
        elif s.has_failure and s.failure_hash in (scanned.request_hash, None):
            # This very request failed before (None: taken over from the failures file).
            plan.with_result += s.has_result
            if not (s.transient or retry_failed):
                plan.failed_kept += 1
                plan.failed_codes[s.error_code or "unknown"] += 1
                continue
            plan.retrying += 1
        else:  # a result or a failure for another request
            plan.with_result += s.has_result
            plan.changed += 1
        if limit is not None and len(plan.offsets) >= limit:
            plan.deferred += 1
            plan.failed_deferred += s is not None and s.has_failure
            continue
        row = scanned.row  # the request is built only for the rows to send
        plan.offsets.append(scanned.offset)
        plan.lines.append(scanned.line)
        plan.checks.append(row_check(scanned.custom_id, scanned.request_hash))
        prompt = row.prompt_tokens
        plan.prompt_tokens += prompt
        cap = row.max_output_tokens
        model: str = row.body["model"]  # every valid row names one (source.py checks)
        load = plan.by_model.get(model)
        if load is None:
            if len(plan.by_model) >= MAX_MODELS:
                plan.models_overflow += 1
                load = ModelLoad()  # counted in the totals only
            else:
                load = plan.by_model[model] = ModelLoad()
        load.rows += 1
        load.prompt_tokens += prompt
        if cap is None:
            plan.uncapped += 1
            load.uncapped += 1
        else:
            plan.max_completion_tokens += cap
            load.max_completion_tokens += cap
    return leading
