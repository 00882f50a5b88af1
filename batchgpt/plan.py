"""Before anything is sent: validate the whole input and work out which rows to send.

One streaming pass over the input checks every line and asks the checkpoint, 500 ids at a
time, what it already holds. What comes out is the byte offsets of the pending lines (8
bytes a row), so a million-row resume needs neither the file nor the ids in memory.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from batchgpt.config import JobConfig
from batchgpt.errors import ConfigError
from batchgpt.source import InputFile, ScannedRow
from batchgpt.store import FAILED, OK, Known, Store

BATCH = 500
DONE = Known(OK, "", False)  # in _classify: "succeeded before, for this same request"


@dataclass
class Plan:
    rows: int = 0  # valid rows in the input
    done: int = 0  # succeeded before, for the same request
    failed_kept: int = 0  # failed permanently before; left alone without --retry-failed
    changed: int = 0  # request changed since its result: sent again (on_change: rerun)
    changed_kept: int = 0  # request changed, old result kept (on_change: keep)
    retrying: int = 0  # failed before; sent again
    new: int = 0
    deferred: int = 0  # pending but beyond --limit
    prompt_tokens: int = 0  # estimate over the rows to send
    max_completion_tokens: int = 0  # the most they may produce (max_tokens × n)
    uncapped: int = 0  # rows to send that set no max_tokens
    offsets: array[int] = field(default_factory=lambda: array("q"))
    lines: array[int] = field(default_factory=lambda: array("q"))
    changed_refused: int = 0  # request changed and on_change: error
    changed_examples: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> int:
        return len(self.offsets)

    def pending_positions(self) -> Iterator[tuple[int, int]]:
        return zip(self.offsets, self.lines, strict=True)


def make_plan(
    job: JobConfig, source: InputFile, store: Store, *, retry_failed: bool, limit: int | None
) -> Plan:
    """Raises InputError (every bad line) before returning anything, so a file with a
    problem anywhere sends nothing."""
    plan = Plan()
    batch: list[ScannedRow] = []
    for scanned in source.scan():
        batch.append(scanned)
        if len(batch) >= BATCH:
            _classify(job, store, batch, plan, retry_failed, limit)
            batch = []
    if batch:
        _classify(job, store, batch, plan, retry_failed, limit)
    if plan.changed_refused:
        raise ConfigError(
            f"{plan.changed_refused} rows changed since their result was written "
            f"(e.g. {', '.join(plan.changed_examples)}), and the job says on_change: error. "
            "Set on_change: rerun to send them again, or keep to keep the old results."
        )
    return plan


def _classify(
    job: JobConfig, store: Store, batch: list[ScannedRow], plan: Plan, retry_failed: bool,
    limit: int | None,
) -> None:
    unsettled = store.lookup_unsettled([(r.custom_id, r.request_hash) for r in batch])
    if not unsettled:  # the whole batch succeeded before, for the same requests
        plan.rows += len(batch)
        plan.done += len(batch)
        return
    for scanned in batch:
        plan.rows += 1
        k = unsettled.get(scanned.custom_id, DONE)
        if k is DONE:
            plan.done += 1
            continue
        if k is None:
            plan.new += 1
        elif k.req_hash != scanned.request_hash:
            if k.status == OK and job.on_change != "rerun":
                if job.on_change == "keep":
                    plan.changed_kept += 1
                    plan.done += 1
                else:
                    plan.changed_refused += 1
                    if len(plan.changed_examples) < 5:
                        plan.changed_examples.append(scanned.custom_id)
                continue
            plan.changed += 1
        elif k.status == OK:
            plan.done += 1
            continue
        elif k.status == FAILED:
            if not (k.transient or retry_failed):
                plan.failed_kept += 1
                continue
            plan.retrying += 1
        if limit is not None and len(plan.offsets) >= limit:
            plan.deferred += 1
            continue
        row = scanned.row  # the request is built only for the rows to send
        plan.offsets.append(scanned.offset)
        plan.lines.append(scanned.line)
        plan.prompt_tokens += row.prompt_tokens
        cap = row.max_output_tokens
        if cap is None:
            plan.uncapped += 1
        else:
            plan.max_completion_tokens += cap
