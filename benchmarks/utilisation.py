"""How much of an RPM / TPM limit batchgpt keeps busy, and how many 429s it draws.

Run: ``python benchmarks/utilisation.py [--seconds 50] [--latency 0.05]`` (about 4 minutes
with the defaults; loopback only, no key). Results and conclusions: docs/performance.md,
"Pacing and client overhead (issue 3)".

Each case starts the simulator in its own process (``python -m batchgpt.simulator
--no-record``) enforcing a limit with a 1 s window (as OpenAI quantizes limits) and a fixed
latency, writes a job file whose ``limits`` name the same limit (or none, in the
"learned" case, where the limiter must learn it from ``x-ratelimit-limit-*`` headers),
and runs it in-process with ``run_job(job, RunOptions())``. The input has enough rows for
about ``--seconds`` seconds at the limit.

How the rate is measured: a sampler task GETs the simulator's ``/_sandbox/stats`` every
0.5 s and records (time, requests answered 200, tokens charged, 429s). The achieved rate
is the slope of admitted requests (or charged tokens) between the first sample at least
``WARM_S`` after the run started and the last sample at least ``COOL_S`` before it
ended: the start-up (the limiter starts empty, so the first second is by design below
the limit) and the tail (the last rows, stragglers behind a retry) are left out. The
simulator counts a request when it *admits* it, so this is the server's view of the
rate. The 429 share is over every request the server saw during the whole run.

Every case also checks the run's bookkeeping: all rows succeeded, the output holds each
custom_id exactly once, and batchgpt's own 429 count matches the simulator's.

Numbers are printed, never asserted: timing depends on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from batchgpt import JobConfig, RunOptions
from batchgpt.runner import run_job
from batchgpt.tokens import request_cost

WARM_S = 5.0
COOL_S = 5.0
SAMPLE_EVERY_S = 0.5
KEY_ENV = "BATCHGPT_BENCH_KEY"  # a dummy key: the simulator takes any


# -- the simulator in its own process ---------------------------------------------------

class SimProcess:
    """``python -m batchgpt.simulator`` on a free loopback port."""

    def __init__(self, *args: str) -> None:
        self.args = ["--port", "0", "--no-record", *args]
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> SimProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchgpt.simulator", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"simulator did not start: {line!r} {err[-2000:]}")
        self.base_url = line.rsplit(" ", 1)[1].strip()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def cpu_s(self) -> float:
        """User + system CPU seconds the simulator process has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


@dataclass
class Sample:
    t: float
    requests: int
    ok: int
    rejected: int  # 429
    tokens: int


@dataclass
class Sampler:
    url: str
    samples: list[Sample] = field(default_factory=list)

    async def one(self, session: aiohttp.ClientSession) -> Sample:
        async with session.get(self.url) as resp:
            stats = await resp.json()
        by = stats["by_status"]
        return Sample(time.perf_counter(), stats["requests"], by.get("200", 0),
                      by.get("429", 0), stats["tokens_charged"])

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                self.samples.append(await self.one(session))
                if stop.is_set():
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


def steady_slope(samples: list[Sample], t0: float, t1: float, what: str) -> tuple[float, float]:
    """(per-second rate of ``what``, seconds measured) between t0 + WARM_S and t1 - COOL_S."""
    inside = [s for s in samples if t0 + WARM_S <= s.t <= t1 - COOL_S]
    if len(inside) < 2:
        return float("nan"), 0.0
    a, b = inside[0], inside[-1]
    return (getattr(b, what) - getattr(a, what)) / (b.t - a.t), b.t - a.t


# -- cases ----------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    sim_rpm: int | None = None
    sim_tpm: int | None = None
    job_limits: dict[str, int] = field(default_factory=dict)
    measure: str = "rpm"  # which limit the % is of
    share: float = 1.0  # of --seconds: the learned cases are about their start-up


def make_rows(case: Case, seconds: float, rng: random.Random) -> tuple[list[dict[str, Any]],
                                                                        int]:
    """Chat lines for about ``seconds`` at the limit, and their total TPM cost (the cost
    the simulator charges: batchgpt.tokens.request_cost)."""
    rows: list[dict[str, Any]] = []
    total_cost = 0
    if case.measure == "rpm":
        assert case.sim_rpm is not None
        n = round(case.sim_rpm / 60 * seconds)
        for i in range(n):
            body = {"messages": [{"role": "user", "content": f"Row {i}. Say something short."}],
                    "max_tokens": 16}
            rows.append({"id": f"r{i:06d}", **body})
            total_cost += request_cost(body)
        return rows, total_cost
    assert case.sim_tpm is not None
    budget = case.sim_tpm / 60 * seconds
    i = 0
    while total_cost < budget:
        # Costs vary 10x between rows (prompt ~30-330 tokens, max_tokens 100-1,400), so
        # the token bucket, not the request count, decides the pace.
        words = " ".join("lorem" for _ in range(rng.randint(20, 250)))
        body = {"messages": [{"role": "user", "content": f"Row {i}. {words}."}],
                "max_tokens": rng.randint(100, 1400)}
        rows.append({"id": f"t{i:06d}", **body})
        total_cost += request_cost(body)
        i += 1
    return rows, total_cost


def write_job(folder: Path, case: Case, rows: list[dict[str, Any]], base_url: str) -> Path:
    data = folder / "input.jsonl"
    with data.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    limits = ", ".join(f"{k}: {v}" for k, v in case.job_limits.items())
    job = folder / "bench.yaml"
    job.write_text(
        "name: bench\n"
        "input: input.jsonl\n"
        "output: out/bench.jsonl\n"
        "model: gpt-4o-mini\n"
        f"limits: {{{limits}}}\n"
        "retry: {max_attempts: 10}\n"
        "timeout_s: 30\n"
        f"api: {{base_url: \"{base_url}\", api_key_env: {KEY_ENV}}}\n"
    )
    return job


async def run_case(case: Case, seconds: float, latency: float) -> dict[str, Any]:
    rng = random.Random(3)
    sim_args = ["--latency", str(latency), "--window", "1"]
    if case.sim_rpm:
        sim_args += ["--rpm", str(case.sim_rpm)]
    if case.sim_tpm:
        sim_args += ["--tpm", str(case.sim_tpm)]
    rows, total_cost = make_rows(case, seconds, rng)
    with tempfile.TemporaryDirectory(prefix="bgpt-util-") as tmp, SimProcess(*sim_args) as sim:
        job_path = write_job(Path(tmp), case, rows, sim.base_url)
        job = JobConfig.load(job_path)
        sampler = Sampler(f"{sim.root}/_sandbox/stats")
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        t0 = time.perf_counter()
        result = await run_job(job, RunOptions())
        t1 = time.perf_counter()
        stop.set()
        await sampling
        final = sampler.samples[-1]
        out_ids = [json.loads(line)["custom_id"]
                   for line in Path(job.output).read_text().splitlines()]
    summary = result.summary
    run = summary["this_run"]
    if case.measure == "rpm":
        limit = float(case.sim_rpm or 0)
        per_s, measured_s = steady_slope(sampler.samples, t0, t1, "ok")
        whole = final.ok / (t1 - t0) * 60
    else:
        limit = float(case.sim_tpm or 0)
        per_s, measured_s = steady_slope(sampler.samples, t0, t1, "tokens")
        whole = final.tokens / (t1 - t0) * 60
    per_min = per_s * 60
    return {
        "case": case.name,
        "rows": len(rows),
        "limit": limit,
        "unit": "req/min" if case.measure == "rpm" else "tok/min",
        "steady": per_min,
        "steady_pct": 100 * per_min / limit,
        "measured_s": measured_s,
        "whole_pct": 100 * whole / limit,
        "ideal_s": (len(rows) / limit * 60 if case.measure == "rpm"
                    else total_cost / limit * 60),
        "wall_s": t1 - t0,
        "requests": final.requests,
        "r429": final.rejected,
        "pct429": 100 * final.rejected / max(1, final.requests),
        "client_429": run["requests"]["rate_limited"],
        "retries": run["requests"]["retries"],
        "expected_tokens": total_cost,
        "charged_tokens": final.tokens,
        "outcome": result.outcome,
        "succeeded": summary["requests"]["succeeded"],
        "output_lines": len(out_ids),
        "unique_ids": len(set(out_ids)),
        "p50": run["latency_s"]["p50"],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'case':<34} {'rows':>6} {'limit':>16} {'steady':>8} {'whole':>7} "
            f"{'wall/ideal s':>13} {'reqs':>6} {'429s':>5} {'429 %':>6}  check")
    print(head)
    print("-" * len(head))
    for r in results:
        ok = (r["outcome"] == "completed" and r["succeeded"] == r["rows"]
              and r["output_lines"] == r["rows"] == r["unique_ids"]
              and r["client_429"] == r["r429"])
        check = "ok" if ok else (
            f"BAD outcome={r['outcome']} succeeded={r['succeeded']} lines={r['output_lines']} "
            f"unique={r['unique_ids']} client429={r['client_429']}")
        limit = f"{r['limit']:,.0f} {r['unit']}"
        print(f"{r['case']:<34} {r['rows']:>6,} {limit:>16} {r['steady_pct']:>7.1f}% "
              f"{r['whole_pct']:>6.1f}% {r['wall_s']:>6.1f}/{r['ideal_s']:<6.1f} "
              f"{r['requests']:>6,} {r['r429']:>5,} {r['pct429']:>5.2f}%  {check}")
    print()
    print(f"steady = rate the simulator admitted between t+{WARM_S:g}s and end-{COOL_S:g}s, "
          "as % of the limit; whole = over the whole run (includes the empty-bucket start "
          "and the tail).")
    print("wall/ideal = run time vs rows (or their tokens) / limit. 429 % = share of all "
          "requests the simulator saw; 'check' = all rows succeeded, each custom_id once in "
          "the output, batchgpt's 429 count == simulator's.")
    for r in results:
        if r["unit"] == "tok/min":
            print(f"{r['case']}: tokens charged by the simulator {r['charged_tokens']:,} vs "
                  f"request_cost() sum of the input {r['expected_tokens']:,}")


CASES = [
    Case("rpm 1,200 (job rpm 1,200)", sim_rpm=1200, job_limits={"rpm": 1200}),
    Case("rpm 6,000 (job rpm 6,000)", sim_rpm=6000, job_limits={"rpm": 6000}),
    Case("tpm 600,000 (job tpm 600,000)", sim_tpm=600_000, job_limits={"tpm": 600_000},
         measure="tpm"),
    Case("rpm 6,000 (job: no limits, learned)", sim_rpm=6000, job_limits={}, share=0.5),
    Case("rpm 1,200 (job: no limits, learned)", sim_rpm=1200, job_limits={}, share=0.5),
    Case("tpm 600,000 (job: no limits, learned)", sim_tpm=600_000, job_limits={},
         measure="tpm", share=0.5),
]


async def main_async(args: argparse.Namespace) -> None:
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    chosen = [c for c in CASES if not args.only or any(o in c.name for o in args.only)]
    results = []
    for case in chosen:
        print(f"running: {case.name} ...", file=sys.stderr, flush=True)
        results.append(await run_case(case, args.seconds * case.share, args.latency))
    print(f"\n== utilisation: simulator window 1 s, latency {args.latency * 1000:.0f} ms, "
          f"rows for ~{args.seconds:g} s per case (learned cases: half) ==")
    print_table(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=50.0,
                   help="rows for this long per case (learned cases: half)")
    p.add_argument("--latency", type=float, default=0.05, help="simulator latency, seconds")
    p.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
