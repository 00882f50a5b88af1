"""What a job will cost and how long it must take, before anything is sent (dry run).

The prompt side is an estimate (four characters a token, as OpenAI counts for its
limits); the completion side is a range: nothing at the least, ``max_tokens × n`` at the
most. Rows without ``max_tokens`` have no upper bound, and the estimate says so.
"""

from __future__ import annotations

from typing import Any

from batchgpt.config import JobConfig
from batchgpt.plan import Plan
from batchgpt.pricing import Usage, cost_usd, resolve_price


def estimate(job: JobConfig, plan: Plan) -> dict[str, Any]:
    price = resolve_price(job.model, job.pricing) if job.model else None
    low = high = None
    if price is not None:
        low = cost_usd(Usage(prompt_tokens=plan.prompt_tokens,
                             total_tokens=plan.prompt_tokens), price)
        if not plan.uncapped:
            high = cost_usd(Usage(prompt_tokens=plan.prompt_tokens,
                                  completion_tokens=plan.max_completion_tokens,
                                  total_tokens=plan.prompt_tokens + plan.max_completion_tokens),
                            price)
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
        "estimated_prompt_tokens": plan.prompt_tokens,
        "max_completion_tokens": None if plan.uncapped else plan.max_completion_tokens,
        "rows_without_max_tokens": plan.uncapped,
        "cost_usd": {"min": low, "max": high},
        "price_known": price is not None,
        "min_wall_time_s": round(max(minutes) * 60, 1) if minutes else None,
    }


def render_estimate(est: dict[str, Any]) -> str:
    def money(v: float | None) -> str:
        return "unknown" if v is None else f"${v:,.4f}"

    cost = est["cost_usd"]
    lines = [
        f"dry run of {est['job']} (nothing sent)",
        f"  rows in input            {est['rows']:,}",
        f"  already done             {est['already_done']:,}",
        f"  to send                  {est['pending']:,}",
        f"  prompt tokens (est.)     {est['estimated_prompt_tokens']:,}",
        "  completion tokens (max)  " + (
            f"{est['max_completion_tokens']:,}" if est["max_completion_tokens"] is not None
            else f"unbounded ({est['rows_without_max_tokens']} rows set no max_tokens)"),
        f"  cost                     {money(cost['min'])} – {money(cost['max'])}",
    ]
    if not est["price_known"]:
        lines.append(f"  price of {est['model']} unknown: add a `pricing:` block to the job file")
    if est["min_wall_time_s"] is not None:
        lines.append(f"  minimum wall time        {est['min_wall_time_s']:,}s at the job's limits")
    aside = est.get("would_set_aside")
    if aside is not None:
        if aside:
            lines.append("  --fresh would set aside (nothing is moved by a dry run):")
            lines.extend(f"    {src} → {dst}" for src, dst in aside.items())
        else:
            lines.append("  --fresh would set nothing aside: no previous results")
    return "\n".join(lines)
