"""What a run did and what it cost: counters kept during the run, the summary JSON, and
the short table printed at the end.

The summary has two halves: the job as a whole (the rows of its current input by state,
and what every run so far was charged, replaced results included) and this run alone
(counted as it went). Its shape is :class:`batchgpt.summary.Summary`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from batchgpt.params import unknown_price_hint
from batchgpt.pricing import Price, Usage, cost_usd, price_usage, resolve_price
from batchgpt.store.index import Totals
from batchgpt.summary import (
    Latency,
    ModelTotals,
    Outcome,
    PlanCounts,
    Recovery,
    Requests,
    RunRequests,
    StopReason,
    Summary,
    ThisRun,
)

LATENCY_SAMPLES = 20_000


@dataclass
class RunStats:
    """Counters of one run. Latencies are kept as a bounded reservoir (the first
    LATENCY_SAMPLES, then every k-th) so memory stays flat on a million rows."""

    sent: int = 0  # HTTP attempts made
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # every failed attempt, by code
    first_errors: dict[str, str] = field(default_factory=dict)  # code → its first message
    failed_codes: Counter[str] = field(default_factory=Counter)  # rows failed, by final code
    failed_retryable: int = 0  # rows failed for a reason that may pass
    usage_by_model: dict[str, Usage] = field(default_factory=dict)
    reasks: Counter[str] = field(default_factory=Counter)  # follow-up turns, by reason
    fallbacks: Counter[str] = field(default_factory=Counter)  # rows moved to a model
    latencies: list[float] = field(default_factory=list)
    _seen_latencies: int = 0

    def add_usage(self, model: str, usage: Usage) -> None:
        prev = self.usage_by_model.get(model)
        self.usage_by_model[model] = usage if prev is None else prev + usage

    def add_error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        self.first_errors.setdefault(code, message)

    def add_latency(self, seconds: float) -> None:
        self._seen_latencies += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(seconds)
        else:
            step = self._seen_latencies // LATENCY_SAMPLES + 1
            if self._seen_latencies % step == 0:
                self.latencies[self._seen_latencies % LATENCY_SAMPLES] = seconds

    @property
    def usage(self) -> Usage:
        return sum(self.usage_by_model.values(), Usage())


def by_model(totals: Totals, pricing: Mapping[str, Price]) -> dict[str, ModelTotals]:
    """Each model the job was charged for: results, tokens and cost (the models whose
    price is unknown have cost None)."""
    out = {}
    for model, usage in sorted(totals.spend_by_model.items()):
        rows = totals.results_by_model.get(model, 0)
        if not rows and usage.total_tokens == 0 and usage.prompt_tokens == 0:
            continue
        out[model or "(unnamed)"] = ModelTotals(
            rows=rows, usage=usage, cost_usd=cost_usd(usage, resolve_price(model, pricing)))
    return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def build_summary(
    *,
    job_name: str,
    outcome: Outcome,
    stopped: StopReason | None,
    message: str | None,
    started_at: str,
    finished_at: str,
    wall_time_s: float,
    requests: Requests,
    failed_by_code: Mapping[str, int],
    totals: Totals,
    stats: RunStats,
    pricing: Mapping[str, Price],
    output: Path,
    failures: Path,
    plan: PlanCounts | None,
    recovered: Recovery,
) -> Summary:
    """The job as a whole (the rows of its input, what every run so far was charged) and
    this run alone."""
    cum_cost, unknown = price_usage(totals.spend_by_model, pricing)
    if cum_cost is not None:  # what was charged, also where no result records it
        cum_cost += totals.unseen_usd
    run_cost, _ = price_usage(stats.usage_by_model, pricing)
    lat = sorted(stats.latencies)
    run_usage = stats.usage
    minutes = wall_time_s / 60 if wall_time_s > 0 else None
    return Summary(
        job=job_name,
        outcome=outcome,
        stopped=stopped,
        message=message,
        started_at=started_at,
        finished_at=finished_at,
        wall_time_s=round(wall_time_s, 3),
        requests=requests,
        failed_by_code=dict(sorted(failed_by_code.items())),
        usage=totals.usage,
        cost_usd=cum_cost,
        cost_unknown_models=unknown,
        cost_unrecorded_usd=round(totals.unseen_usd, 6),
        by_model=by_model(totals, pricing),
        this_run=ThisRun(
            requests=RunRequests(sent=stats.sent, succeeded=stats.succeeded,
                                 failed=stats.failed, retries=stats.retries,
                                 rate_limited=stats.rate_limited),
            usage=run_usage,
            cost_usd=run_cost,
            wall_time_s=round(wall_time_s, 3),
            latency_s=Latency(p50=percentile(lat, 0.50), p95=percentile(lat, 0.95),
                              p99=percentile(lat, 0.99), max=lat[-1] if lat else None),
            errors_by_code=dict(sorted(stats.errors.items())),
            first_error_by_code=dict(sorted(stats.first_errors.items())),
            achieved_rpm=round(stats.sent / minutes, 1) if minutes else None,
            achieved_tpm=round(run_usage.total_tokens / minutes, 1) if minutes else None,
            recovered=recovered,
            reasks_by_reason=dict(sorted(stats.reasks.items())),
            fallbacks_by_model=dict(sorted(stats.fallbacks.items())),
        ),
        output=str(output),
        failures=str(failures),
        plan=plan,
    )


_fsync = aiofiles.os.wrap(os.fsync)


async def write_summary(path: Path, summary: Summary) -> None:
    """Atomically (a monitoring script never reads half a file) and off the event loop
    (a slow disk must not stall requests still finishing during a graceful stop)."""
    tmp = path.with_name(path.name + ".tmp")
    async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
        await fh.write(summary.to_json())
        await fh.flush()
        await _fsync(fh.fileno())
    await aiofiles.os.replace(tmp, path)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def render_table(summary: Summary) -> str:
    req = summary.requests
    run = summary.this_run
    rreq = run.requests
    usage = summary.usage
    rusage = run.usage
    lat = run.latency_s
    rows = [
        ("", "this run", "job total"),
        ("succeeded", _n(rreq.succeeded), _n(req.succeeded)),
        ("failed", _n(rreq.failed), _n(req.failed)),
        ("pending", "", _n(req.pending)),
        ("requests sent", _n(rreq.sent), ""),
        ("retries / 429s", f"{_n(rreq.retries)} / {_n(rreq.rate_limited)}", ""),
        ("prompt tokens", _n(rusage.prompt_tokens), _n(usage.prompt_tokens)),
        ("completion tokens", _n(rusage.completion_tokens), _n(usage.completion_tokens)),
        ("total tokens", _n(rusage.total_tokens), _n(usage.total_tokens)),
        ("cost", _money(run.cost_usd), _money(summary.cost_usd)),
    ]
    if lat.p50 is not None and lat.p95 is not None:
        rows.append(("latency p50/p95", f"{lat.p50:.3f}s / {lat.p95:.3f}s", ""))
    rows.append(("wall time", f"{summary.wall_time_s:.1f}s", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"  {a:<{w0}}  {b:>{w1}}  {c:>12}".rstrip() for a, b, c in rows]
    if req.not_in_input:
        lines.append(f"  {req.not_in_input:,} results in the output are for ids no longer in "
                     "the input (kept)")
    if summary.cost_unknown_models:
        lines.append("  cost unknown for " + unknown_price_hint(summary.cost_unknown_models))
    if len(summary.by_model) > 1 or run.fallbacks_by_model:
        lines.append("  by model (job total):")
        for model, t in summary.by_model.items():
            lines.append(f"    {model}: {t.rows:,} rows, {t.usage.total_tokens:,} tokens, "
                         f"{_money(t.cost_usd)}")
    if run.reasks_by_reason:
        lines.append("  re-asks this run: " + ", ".join(
            f"{reason} ×{n}" for reason, n in run.reasks_by_reason.items()))
    if run.fallbacks_by_model:
        lines.append("  fallbacks this run: " + ", ".join(
            f"{model} ×{n}" for model, n in run.fallbacks_by_model.items()))
    if run.errors_by_code:
        lines.append("  errors this run:")
        for code, count in run.errors_by_code.items():
            first = run.first_error_by_code.get(code)
            lines.append(f"    {code} ×{count}" + (f": {_short(first)}" if first else ""))
    return "\n".join(lines)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
