"""What a job will cost and how long it must take, before anything is sent (dry run).

The prompt side is an estimate (four characters a token, as OpenAI counts for its
limits); the completion side is a range: nothing at the least, ``max_tokens × n`` at the
most. Rows without ``max_tokens`` have no upper bound, and the estimate says so. Each row
is priced at the model it names (the job's ``model``, or a Batch API or chat line's own),
so a file mixing models is estimated as it will be billed.

The dry run also shows one request exactly as it will be sent (the first pending row's
JSON body): a template that renders wrongly, a parameter in the wrong place or the wrong
model are seen before they are paid for.
"""

from __future__ import annotations

import json
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.params import unknown_price_hint
from batchgpt.plan import Plan
from batchgpt.pricing import Usage, cost_usd, resolve_price
from batchgpt.redact import Redactor
from batchgpt.source import InputFile


def _cost(prompt: int, completion: int, model: str, job: JobConfig) -> float | None:
    # mode: batch is priced at the model's Batch rates
    return cost_usd(Usage(prompt_tokens=prompt, completion_tokens=completion,
                          total_tokens=prompt + completion), resolve_price(model, job.pricing),
                    batch=job.mode == "batch")


def estimate(job: JobConfig, plan: Plan) -> dict[str, Any]:
    models = plan.by_model
    priced = list(models) if models else ([job.model] if job.model else [])
    unknown = sorted(m for m in priced if resolve_price(m, job.pricing) is None)
    if plan.models_overflow:
        unknown.append(f"({plan.models_overflow:,} rows naming models beyond the first "
                       f"{len(models):,})")
    low: float | None = None
    high: float | None = None
    if not unknown:
        low = high = 0.0
        for model, load in models.items():
            low += _cost(load.prompt_tokens, 0, model, job) or 0.0
            high += _cost(load.prompt_tokens, load.max_completion_tokens, model, job) or 0.0
        if plan.uncapped:
            high = None
    minutes = []
    if job.limits.rpm:
        minutes.append(plan.to_send / job.limits.rpm)
    if job.limits.tpm:
        minutes.append((plan.prompt_tokens + plan.max_completion_tokens) / job.limits.tpm)
    return {
        "job": job.job_name,
        "model": job.model,
        "rows": plan.rows,
        "already_done": plan.done,
        "failed_kept": plan.failed_kept,
        "pending": plan.to_send,
        "deferred": plan.deferred,
        "new": plan.new,
        "retried": plan.retrying,
        "changed": plan.changed,
        "changed_kept": plan.changed_kept,
        "requests": plan.requests(),
        "models": {m: load.rows for m, load in sorted(models.items())},
        "estimated_prompt_tokens": plan.prompt_tokens,
        "max_completion_tokens": None if plan.uncapped else plan.max_completion_tokens,
        "rows_without_max_tokens": plan.uncapped,
        "cost_usd": {"min": low, "max": high},
        "price_known": not unknown,
        "unpriced_models": unknown,
        "min_wall_time_s": round(max(minutes) * 60, 1) if minutes else None,
        "mode": job.mode,
    }


def sample_request(plan: Plan, source: InputFile) -> dict[str, Any]:
    """The first pending row's request body, exactly as it will be POSTed to
    ``/chat/completions``, and which row it is; None when nothing is pending. The run's
    key (a key pasted into ``params`` is sent as written) is shown ``[REDACTED]``."""
    if not plan.to_send:
        return {"sample_request": None, "sample_request_row": None}
    row = next(source.read_at(iter([(plan.offsets[0], plan.lines[0])])))
    redact = Redactor.for_key(source.job.api.api_key_env)
    return {"sample_request": redact.clean(row.body),
            "sample_request_row": {"custom_id": redact.clean(row.custom_id),
                                   "line": row.line}}


def render_estimate(est: dict[str, Any]) -> str:
    def money(v: float | None) -> str:
        return "unknown" if v is None else f"${v:,.4f}"

    cost = est["cost_usd"]
    lines = [
        f"dry run of {est['job']} (nothing sent)",
        f"  rows in input            {est['rows']:,}",
        f"  already done             {est['already_done']:,}",
    ]
    if est.get("failed_kept"):
        lines.append(f"  failed before            {est['failed_kept']:,} (not sent again without "
                     "--retry-failed)")
    lines.append(f"  to send                  {est['pending']:,}")
    parts = [f"{est.get(k, 0):,} {label}" for k, label in
             (("new", "new"), ("retried", "retried"), ("changed", "changed since their result"))
             if est.get(k)]
    if parts:
        lines.append(f"    of which               {', '.join(parts)}")
    if est.get("changed_kept"):
        lines.append(f"  changed but kept         {est['changed_kept']:,} (on_change: keep)")
    if est.get("deferred"):
        lines.append(f"  left for later (--limit) {est['deferred']:,}")
    lines += [
        f"  prompt tokens (est.)     {est['estimated_prompt_tokens']:,}",
        "  completion tokens (max)  " + (
            f"{est['max_completion_tokens']:,}" if est["max_completion_tokens"] is not None
            else f"unbounded ({est['rows_without_max_tokens']} rows set no max_tokens)"),
        f"  cost                     {money(cost['min'])} – {money(cost['max'])}",
    ]
    models = est.get("models") or {}
    if len(models) > 1:
        lines.append("  models                   " + ", ".join(
            f"{m} ({n:,} rows)" for m, n in models.items()))
    if not est["price_known"]:
        unknown = est.get("unpriced_models") or [est["model"]]
        lines.append(f"  price unknown for {unknown_price_hint([str(m) for m in unknown])}")
    budget = est.get("budget")
    if budget is not None:
        lines.append(f"  budget                   {money(budget['spent_usd'])} of "
                     f"${budget['max_cost_usd']:g} spent by earlier runs; "
                     f"{money(budget['remaining_usd'])} left")
    if est["min_wall_time_s"] is not None:
        lines.append(f"  minimum wall time        {est['min_wall_time_s']:,}s at the job's limits")
    aside = est.get("would_set_aside")
    if aside is not None:
        if aside:
            lines.append("  --fresh would set aside (nothing is moved by a dry run):")
            lines.extend(f"    {src} → {dst}" for src, dst in aside.items())
        else:
            lines.append("  --fresh would set nothing aside: no previous results")
    sample = est.get("sample_request")
    where = est.get("sample_request_row")
    if sample is not None and where is not None:
        lines.append(f"  sample request: row {where['custom_id']} (line {where['line']}), the "
                     "JSON body sent to /chat/completions:")
        body = json.dumps(sample, indent=2, ensure_ascii=False)
        lines.extend("    " + line for line in body.splitlines())
    return "\n".join(lines)
