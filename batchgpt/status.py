"""``batchgpt status``: what a job has done, read from its state only — no network, no
lock taken, safe while a run is going."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.files import open_regular
from batchgpt.pricing import Usage
from batchgpt.report import price_usage
from batchgpt.store import JobLock, Store
from batchgpt.summary import Summary


def _count_input_lines(job: JobConfig) -> int | None:
    try:
        with open_regular(job.input) as fh:  # never a FIFO: status must not block or drain it
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def _last_run(store: Store) -> dict[str, Any] | None:
    """The last run, with why it stopped read from its summary (the typed model)."""
    found = store.index.last_run()
    if found is None:
        return None
    run, summary_json = found
    run.update(stopped=None, message=None)
    if summary_json and summary_json != "{}":
        try:
            summary = Summary.model_validate_json(summary_json)
        except ValueError:  # a summary written by an older batchgpt
            return run
        run.update(stopped=summary.stopped.value if summary.stopped else None,
                   message=summary.message)
    return run


def job_status(job: JobConfig) -> dict[str, Any]:
    info: dict[str, Any] = {
        "job": job.job_name,
        "input": str(job.input),
        "output": str(job.output),
        "state": str(job.state_dir),
        "locked_by": JobLock.holder(job.state_dir) if job.state_dir.exists() else None,
    }
    rows = _count_input_lines(job)
    if not job.state_dir.exists() and not Path(job.output).exists():
        info.update(started=False, requests={"total": rows, "succeeded": 0, "failed": 0,
                                             "pending": rows},
                    failed_by_code={}, usage=None, cost_usd=None, last_run=None)
        return info
    store = Store(job)
    store.open_readonly()
    try:
        totals = store.totals()
        codes = store.failure_codes()
        last = _last_run(store)
        recovery = store.recovery
    finally:
        store.close()
    cost, unknown = price_usage(totals.spend_by_model, job.pricing)
    pending = None if rows is None else max(0, rows - totals.results - totals.failures)
    info.update(
        started=True,
        requests={"total": rows, "succeeded": totals.results, "failed": totals.failures,
                  "pending": pending},
        failed_by_code=codes,
        usage=sum(totals.spend_by_model.values(), Usage()).model_dump(),
        cost_usd=cost,
        cost_unknown_models=unknown,
        last_run=last,
        needs_recovery={"take_over": recovery.taken_over, "lost": recovery.lost,
                        "torn_bytes": recovery.torn_bytes},
    )
    return info


def render_status(info: dict[str, Any]) -> str:
    req = info["requests"]
    lines = [f"job {info['job']}  (output {info['output']})"]
    if not info["started"]:
        lines.append(f"  not started: {req['total']} rows pending")
        return "\n".join(lines)
    lines.append(f"  succeeded  {req['succeeded']:,}")
    failed = f"  failed     {req['failed']:,}"
    if info["failed_by_code"]:
        failed += "  (" + ", ".join(f"{k} {v}" for k, v in info["failed_by_code"].items()) + ")"
    lines.append(failed)
    lines.append(f"  pending    {req['pending'] if req['pending'] is not None else '?'}")
    u = info["usage"]
    lines.append(f"  tokens     {u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} "
                 f"completion = {u['total_tokens']:,}")
    cost = info["cost_usd"]
    lines.append("  cost       " + ("unknown (add `pricing:`)" if cost is None
                                    else f"${cost:,.4f}"))
    last = info["last_run"]
    if last:
        ended = f"finished {last['finished_at']}" if last["finished_at"] else "not finished"
        lines.append(f"  last run   started {last['started_at']}, {ended}, "
                     f"outcome {last['outcome'] or '-'}"
                     + (f" ({last['stopped']})" if last.get("stopped") else ""))
    lines.append(f"  lock       {'held: ' + info['locked_by'] if info['locked_by'] else 'free'}")
    return "\n".join(lines)
