"""How much of an RPM / TPM limit batchgpt keeps busy, and how many 429s it draws.

Run: ``python benchmarks/utilisation.py [--seconds 36] [--latency 0.05] [--only TEXT..]``
(about 4 minutes with the defaults; loopback only, no key). Results and conclusions:
docs/performance.md, "Pacing and client overhead (issue 3)".

Each case starts the simulator in its own process (``python -m batchgpt.simulator
--no-record``) enforcing a limit with a 1 s window (OpenAI quantizes limits the same way)
and a fixed latency (50 ms unless the case says otherwise), writes a job file whose
``limits`` name the same limit, and runs it in-process with ``run_job(job, RunOptions())``.
The input has enough rows for about ``--seconds`` seconds at the limit (half that for
most cases). The cases:

* rpm 1,200 / 6,000 / 30,000 and tpm 600,000, with the job configured at the limit (the
  tpm rows' costs vary 10x, and their ``request_cost`` sum is checked against the tokens
  the simulator charged);
* the same limits with **no** ``limits`` in the job: the limiter must learn them from the
  ``x-ratelimit-limit-*`` headers of the first responses;
* rpm 6,000 with 3 s latency: 300 requests must be in flight, more than the default
  concurrency ceiling of 256.

How the rate is measured: a sampler task GETs the simulator's ``/_sandbox/stats`` every
0.5 s and records (time, requests received, 429s, tokens charged). Requests are counted
when they arrive and 429s are answered at once, so received − 429s is the number the
simulator *admitted* so far; tokens are charged on admission. The achieved rate is the
slope of admitted requests (RPM cases) or charged tokens (TPM cases) between the first
sample at least ``WARM_S`` after the run started and the last sample at least ``COOL_S``
before it ended, so the start-up (the limiter starts empty and, when learning, sends one
request first) and the tail (the last rows, stragglers behind a retry) are left out.
Over a window of T seconds a server with a 1 s bucket can admit up to (T + 1) seconds'
worth, so a steady figure a little above 100 % is possible. "whole" is admitted over
the whole run's wall time. The 429 share is over every request the simulator saw.

Every case also checks the run's bookkeeping: all rows succeeded, the output holds each
custom_id exactly once, and batchgpt's 429 count matches the simulator's. The machine is
shared, so the CPU that other processes used meanwhile is printed too.

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


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (busy jiffies in /proc/stat)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(parts) - parts[3] - parts[4]) / os.sysconf("SC_CLK_TCK")


def provenance() -> str:
    """The commit measured, and any uncommitted change to batchgpt/."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "batchgpt"], capture_output=True, text=True,
                               check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


async def wait_quiet(max_wait_s: float, quiet_cores: float = 0.3) -> None:
    """Wait (at most max_wait_s) until other processes use less than quiet_cores cores:
    the machine is shared, and a CPU-bound neighbour slows the client down."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        m0, c0 = machine_busy_s(), time.process_time()
        await asyncio.sleep(1.0)
        if machine_busy_s() - m0 - (time.process_time() - c0) < quiet_cores:
            return


@dataclass
class Sample:
    t: float
    requests: int  # counted when a request arrives
    ok: int  # counted when answered (one latency later)
    rejected: int  # 429, answered at once
    tokens: int  # charged when a request is admitted

    @property
    def admitted(self) -> int:
        """Requests let through so far, counted at arrival (no other errors occur here)."""
        return self.requests - self.rejected


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
    latency: float | None = None  # None: --latency


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
    if case.latency is not None:
        latency = case.latency
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
        m0, c0, s0 = machine_busy_s(), time.process_time(), sim.cpu_s()
        t0 = time.perf_counter()
        result = await run_job(job, RunOptions())
        t1 = time.perf_counter()
        cpu, sim_cpu = time.process_time() - c0, sim.cpu_s() - s0
        others = max(0.0, machine_busy_s() - m0 - cpu - sim_cpu) / (t1 - t0)
        stop.set()
        await sampling
        final = sampler.samples[-1]
        out_ids = [json.loads(line)["custom_id"]
                   for line in Path(job.output).read_text().splitlines()]
    summary = result.summary
    run = summary["this_run"]
    if case.measure == "rpm":
        limit = float(case.sim_rpm or 0)
        per_s, measured_s = steady_slope(sampler.samples, t0, t1, "admitted")
        whole = final.admitted / (t1 - t0) * 60
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
        "latency": latency,
        "client_busy": cpu / (t1 - t0),
        "others": others,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'case':<39} {'rows':>6} {'limit':>16} {'steady':>8} {'whole':>7} "
            f"{'wall/ideal s':>13} {'reqs':>6} {'429s':>5} {'429 %':>6} {'CPU':>4} "
            f"{'others':>6}  check")
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
        print(f"{r['case']:<39} {r['rows']:>6,} {limit:>16} {r['steady_pct']:>7.1f}% "
              f"{r['whole_pct']:>6.1f}% {r['wall_s']:>6.1f}/{r['ideal_s']:<6.1f} "
              f"{r['requests']:>6,} {r['r429']:>5,} {r['pct429']:>5.2f}% "
              f"{100 * r['client_busy']:>3.0f}% {r['others']:>6.2f}  {check}")
    print()
    print(f"steady = rate the simulator admitted between t+{WARM_S:g}s and end-{COOL_S:g}s, "
          "as % of the limit (a 1 s bucket lets a window\nof T s hold up to T+1 s' worth, so "
          "a little over 100 % is possible); whole = over the whole run (start and tail "
          "included).")
    print("wall/ideal = run time vs rows (or their tokens) / limit. 429 % = share of all "
          "requests the simulator saw. CPU = batchgpt's process CPU / wall (100 % = one "
          "core);\nothers = cores used meanwhile by other processes on the machine. 'check' = "
          "all rows succeeded, each custom_id once in the output, batchgpt's 429 count == the "
          "simulator's.")
    for r in results:
        if r["unit"] == "tok/min":
            print(f"{r['case']}: tokens charged by the simulator {r['charged_tokens']:,} vs "
                  f"request_cost() sum of the input {r['expected_tokens']:,}")


CASES = [
    Case("rpm 1,200 (job rpm 1,200)", sim_rpm=1200, job_limits={"rpm": 1200}),
    Case("rpm 6,000 (job rpm 6,000)", sim_rpm=6000, job_limits={"rpm": 6000}),
    Case("tpm 600,000 (job tpm 600,000)", sim_tpm=600_000, job_limits={"tpm": 600_000},
         measure="tpm"),
    # 500 req/s: does one client process keep up (CPU) on this machine?
    Case("rpm 30,000 (job rpm 30,000)", sim_rpm=30_000, job_limits={"rpm": 30_000},
         share=0.5),
    Case("rpm 6,000 (job: no limits, learned)", sim_rpm=6000, job_limits={}, share=0.5),
    Case("rpm 1,200 (job: no limits, learned)", sim_rpm=1200, job_limits={}, share=0.5),
    Case("tpm 600,000 (job: no limits, learned)", sim_tpm=600_000, job_limits={},
         measure="tpm", share=0.5),
    # 100 req/s x 3 s latency = 300 requests in flight, above the default ceiling of 256
    # (runner.DEFAULT_MAX_CONCURRENCY): what a 6,000-RPM account with slow replies gets.
    Case("rpm 6,000, latency 3 s (job rpm 6,000)", sim_rpm=6000, job_limits={"rpm": 6000},
         share=0.5, latency=3.0),
]


def set_burst(burst_s: float) -> None:
    """Make the runner build its RateLimiter with this burst (an experiment for a proposed
    fix; batchgpt's own default is untouched on disk)."""
    import functools

    from batchgpt import limiter, limits

    # The runner builds its limiter through batchgpt.limits.make_limiter.
    limits.RateLimiter = functools.partial(limiter.RateLimiter,  # type: ignore[misc]
                                           burst_s=burst_s)


async def main_async(args: argparse.Namespace) -> None:
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    if args.burst is not None:
        set_burst(args.burst)
    chosen = [c for c in CASES if not args.only or any(o in c.name for o in args.only)]
    results = []
    for case in chosen:
        await wait_quiet(args.quiet_wait)
        print(f"running: {case.name} ...", file=sys.stderr, flush=True)
        results.append(await run_case(case, args.seconds * case.share, args.latency))
    import openai

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, openai "
          f"{openai.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; {provenance()}")
    burst = "" if args.burst is None else f", limiter burst_s={args.burst:g} (experiment)"
    print(f"\n== utilisation{burst}: simulator window 1 s, latency {args.latency * 1000:.0f} ms "
          f"(unless the case says otherwise), rows for ~{args.seconds:g} s per case (the first "
          "three; the others half) ==")
    print_table(results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=36.0,
                   help="rows for this long per case (most cases: half)")
    p.add_argument("--latency", type=float, default=0.05, help="simulator latency, seconds")
    p.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    p.add_argument("--quiet-wait", type=float, default=3.0, help="before each case, wait up "
                   "to this many seconds for other processes to go quiet")
    p.add_argument("--burst", type=float, help="experiment: build the limiter with this "
                   "burst_s instead of batchgpt's default")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
