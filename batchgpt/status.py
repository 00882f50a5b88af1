"""``batchgpt status``: what a job has done, read from its state only — no network, no
lock taken, safe while a run is going.

The rows are counted by the same plan a run (and ``--dry-run``) makes: the whole input
validated and matched against the index, read-only. So status and a dry run agree on
every number, rows whose request changed since their result included, and a status of a
million-row job costs what planning it costs (a dry run), not a line count that can't
tell a changed row from a done one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.errors import InputError
from batchgpt.plan import Plan, make_plan, not_in_input
from batchgpt.pricing import price_usage
from batchgpt.source import InputFile
from batchgpt.store import JobLock, Store
from batchgpt.summary import Summary

MAX_PROBLEMS_SHOWN = 5


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
        "started": job.state_dir.exists() or Path(job.output).exists(),
    }
    store = Store(job)
    store.open_readonly()
    problems: list[str] = []
    plan: Plan | None = None
    try:
        try:
            plan = make_plan(job, InputFile(job), store, retry_failed=False, limit=None,
                             refuse_changed=False)
        except InputError as exc:  # still show what the index knows
            problems = [str(p) for p in exc.problems[:MAX_PROBLEMS_SHOWN]]
            if len(exc.problems) + exc.more > MAX_PROBLEMS_SHOWN:
                problems.append(f"… {len(exc.problems) + exc.more - MAX_PROBLEMS_SHOWN} more "
                                "(run --dry-run to see them)")
        totals = store.totals()
        codes = store.failure_codes()
        last = _last_run(store)
        recovery = store.recovery
    finally:
        store.close()
    cost, unknown = price_usage(totals.spend_by_model, job.pricing)
    if cost is not None:  # with what the output's results don't record (see Summary)
        cost += totals.unseen_usd
    if plan is not None:
        requests: dict[str, Any] = plan.requests()
        requests["not_in_input"] = not_in_input(totals.results, plan.with_result)
    else:  # the input can't be read: what the index holds, nothing about the input
        requests = {"total": None, "succeeded": totals.results, "failed": totals.failures,
                    "pending": None, "changed": None}
    info.update(
        requests=requests,
        input_problems=problems,
        on_change=job.on_change,
        failed_by_code=codes,
        cost_unrecorded_usd=round(totals.unseen_usd, 6),
        usage=totals.usage.model_dump(),
        cost_usd=cost,
        cost_unknown_models=unknown,
        last_run=last,
        needs_recovery={"take_over": recovery.taken_over, "lost": recovery.lost,
                        "torn_bytes": recovery.torn_bytes},
    )
    if job.mode == "batch":
        from batchgpt.modes.batch_status import batch_rows

        info["batches"] = batch_rows(job)
    return info


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def render_status(info: dict[str, Any]) -> str:
    req = info["requests"]
    lines = [f"job {info['job']}  (output {info['output']})"]
    for problem in info["input_problems"]:
        lines.append(f"  input problem: {problem}")
    if not info["started"]:
        lines.append(f"  not started: {_n(req['total'])} rows pending")
        return "\n".join(lines)
    lines.append(f"  rows       {_n(req['total'])}")
    lines.append(f"  succeeded  {_n(req['succeeded'])}"
                 + (f"  ({req['changed_kept']:,} changed but kept: on_change: keep)"
                    if req.get("changed_kept") else ""))
    failed = f"  failed     {_n(req['failed'])}"
    if info["failed_by_code"]:
        failed += "  (" + ", ".join(f"{k} {v}" for k, v in info["failed_by_code"].items()) + ")"
    if req.get("retryable"):
        failed += f"; {req['retryable']:,} may pass: the next run sends them again"
    lines.append(failed)
    lines.append(f"  pending    {_n(req['pending'])}")
    if req.get("changed"):
        what = ("the next run refuses to start (on_change: error)"
                if info["on_change"] == "error" else "the next run sends them again")
        lines.append(f"  changed    {req['changed']:,} of them: their request changed since "
                     f"their result; {what}")
    if req.get("not_in_input"):
        lines.append(f"  {req['not_in_input']:,} results are for ids no longer in the input "
                     "(kept)")
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
    if info.get("batches"):
        from batchgpt.modes.batch_status import render_batches

        lines.extend(render_batches(info["batches"]))
    return "\n".join(lines)
