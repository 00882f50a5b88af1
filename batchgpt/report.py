"""What a run did and what it cost: counters kept during the run, the summary JSON, and
the short table printed at the end.

The summary has two halves: the job as a whole (every result in the output, cumulative
across resumed runs, read from the checkpoint) and this run alone (counted as it went).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from batchgpt.pricing import Price, Usage, cost_usd, resolve_price
from batchgpt.store import Totals

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
    errors: Counter[str] = field(default_factory=Counter)
    usage_by_model: dict[str, Usage] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    _seen_latencies: int = 0

    def add_usage(self, model: str, usage: Usage) -> None:
        prev = self.usage_by_model.get(model)
        self.usage_by_model[model] = usage if prev is None else prev + usage

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


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def price_usage(
    by_model: Mapping[str, Usage], overrides: Mapping[str, Price]
) -> tuple[float | None, list[str]]:
    """Cost of usage spread over models; (None, unknown models) if any model has no price
    and used tokens."""
    total = 0.0
    unknown = []
    for model, usage in by_model.items():
        if usage.total_tokens == 0 and usage.prompt_tokens == 0:
            continue
        c = cost_usd(usage, resolve_price(model, overrides))
        if c is None:
            unknown.append(model or "(unnamed)")
        else:
            total += c
    return (None if unknown else total), unknown


def build_summary(
    *,
    job_name: str,
    outcome: str,
    stopped: str | None,
    message: str | None,
    started_at: str,
    finished_at: str,
    wall_time_s: float,
    rows_total: int,
    totals: Totals,
    stats: RunStats,
    pricing: Mapping[str, Price],
    output: Path,
    failures: Path,
    pending: int,
) -> dict[str, Any]:
    cum_cost, unknown = price_usage(totals.usage_by_model, pricing)
    run_cost, _ = price_usage(stats.usage_by_model, pricing)
    lat = sorted(stats.latencies)
    run_usage = stats.usage
    minutes = wall_time_s / 60 if wall_time_s > 0 else None
    return {
        "job": job_name,
        "outcome": outcome,
        "stopped": stopped,
        "message": message,
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_time_s": round(wall_time_s, 3),
        "requests": {
            "total": rows_total,
            "succeeded": totals.succeeded,
            "failed": totals.failed,
            "pending": pending,
        },
        "failed_by_code": dict(sorted(totals.failed_by_code.items())),
        "usage": totals.usage.model_dump(),
        "cost_usd": cum_cost,
        "cost_unknown_models": unknown,
        "this_run": {
            "requests": {
                "sent": stats.sent,
                "succeeded": stats.succeeded,
                "failed": stats.failed,
                "retries": stats.retries,
                "rate_limited": stats.rate_limited,
            },
            "usage": run_usage.model_dump(),
            "cost_usd": run_cost,
            "wall_time_s": round(wall_time_s, 3),
            "latency_s": {
                "p50": percentile(lat, 0.50),
                "p95": percentile(lat, 0.95),
                "p99": percentile(lat, 0.99),
                "max": lat[-1] if lat else None,
            },
            "errors_by_code": dict(sorted(stats.errors.items())),
            "achieved_rpm": round(stats.sent / minutes, 1) if minutes else None,
            "achieved_tpm": round(run_usage.total_tokens / minutes, 1) if minutes else None,
        },
        "output": str(output),
        "failures": str(failures),
    }


_fsync = aiofiles.os.wrap(os.fsync)


async def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Atomically (a monitoring script never reads half a file) and off the event loop
    (a slow disk must not stall requests still finishing during a graceful stop)."""
    tmp = path.with_name(path.name + ".tmp")
    async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
        await fh.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        await fh.flush()
        await _fsync(fh.fileno())
    await aiofiles.os.replace(tmp, path)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def render_table(summary: Mapping[str, Any]) -> str:
    req = summary["requests"]
    run = summary["this_run"]
    rreq = run["requests"]
    usage = summary["usage"]
    rusage = run["usage"]
    lat = run["latency_s"]
    rows = [
        ("", "this run", "job total"),
        ("succeeded", _n(rreq["succeeded"]), _n(req["succeeded"])),
        ("failed", _n(rreq["failed"]), _n(req["failed"])),
        ("pending", "", _n(req["pending"])),
        ("requests sent", _n(rreq["sent"]), ""),
        ("retries / 429s", f"{_n(rreq['retries'])} / {_n(rreq['rate_limited'])}", ""),
        ("prompt tokens", _n(rusage["prompt_tokens"]), _n(usage["prompt_tokens"])),
        ("completion tokens", _n(rusage["completion_tokens"]), _n(usage["completion_tokens"])),
        ("total tokens", _n(rusage["total_tokens"]), _n(usage["total_tokens"])),
        ("cost", _money(run["cost_usd"]), _money(summary["cost_usd"])),
    ]
    if lat["p50"] is not None:
        rows.append(("latency p50/p95", f"{lat['p50']:.3f}s / {lat['p95']:.3f}s", ""))
    rows.append(("wall time", f"{summary['wall_time_s']:.1f}s", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"  {a:<{w0}}  {b:>{w1}}  {c:>12}".rstrip() for a, b, c in rows]
    if summary.get("cost_unknown_models"):
        lines.append(
            "  cost unknown for model(s) "
            + ", ".join(summary["cost_unknown_models"])
            + ": add a `pricing:` block to the job file"
        )
    if run["errors_by_code"]:
        codes = ", ".join(f"{k} {v}" for k, v in run["errors_by_code"].items())
        lines.append(f"  errors this run: {codes}")
    return "\n".join(lines)
