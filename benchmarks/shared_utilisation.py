"""Several runs on one account: how much of its limit they use, and the 429s they draw,
each pacing alone versus sharing the limit through Redis (issue 14).

Run: ``python benchmarks/shared_utilisation.py [--seconds 24] [--limits 1200 6000]``
(about 3 minutes with the defaults; loopback only, no key; needs ``redis-server`` on
PATH). Results and conclusions: docs/performance.md, "Runs sharing one account".

Taken the way users run it: the simulator in its own process (``python -m
batchgpt.simulator``) enforcing an RPM limit with a 1 s window and 50 ms latency, a
redis-server of the benchmark's own, and each run a ``batchgpt run JOB`` process of its
own (its own job, input and output; the same base URL, key and model, so one account),
every job's ``limits.rpm`` set to the account's whole limit, as users write it. Per limit,
three cases, in the same sitting:

* **1 run** (the peer): one process alone on the account;
* **3 runs, alone**: three processes, no Redis: each paces at the whole limit;
* **3 runs, Redis**: the same three with ``limits.redis_url``.

The rate is measured as in ``benchmarks/utilisation.py`` (its sampler and simulator
process are reused): the slope of requests the simulator *admitted* between 5 s after
the start and 5 s before the end, as % of the limit, and as a ratio to the one-run peer;
the 429 share is over every request the simulator saw. Each case also checks that every
row of every run succeeded and is in its output once. Numbers are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from utilisation import Sampler, SimProcess, machine_busy_s, provenance, steady_slope

KEY_ENV = "BATCHGPT_BENCH_KEY"


class RedisProcess:
    def __init__(self, folder: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def write_job(folder: Path, rows: int, base_url: str, rpm: int, redis_url: str | None) -> Path:
    folder.mkdir(parents=True)
    with (folder / "input.jsonl").open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"r{i:06d}", "messages": [
                {"role": "user", "content": f"Row {i}. Say something short."}],
                "max_tokens": 16}) + "\n")
    limits = f"rpm: {rpm}" + (f", redis_url: \"{redis_url}\"" if redis_url else "")
    job = folder / "bench.yaml"
    job.write_text(
        "name: bench\ninput: input.jsonl\noutput: out/bench.jsonl\nmodel: gpt-4o-mini\n"
        f"limits: {{{limits}}}\nretry: {{max_attempts: 20}}\ntimeout_s: 30\n"
        f"api: {{base_url: \"{base_url}\", api_key_env: {KEY_ENV}}}\n")
    return job


async def run_case(rpm: int, runs: int, shared: bool, seconds: float) -> dict[str, Any]:
    rows = round(rpm / 60 * seconds / runs)
    with tempfile.TemporaryDirectory(prefix="bgpt-shared-") as tmp, \
            SimProcess("--latency", "0.05", "--window", "1", "--rpm", str(rpm)) as sim:
        redis = RedisProcess(Path(tmp)) if shared else None
        try:
            jobs = [write_job(Path(tmp) / f"run{i}", rows, sim.base_url, rpm,
                              redis.url if redis else None) for i in range(runs)]
            sampler = Sampler(f"{sim.root}/_sandbox/stats")
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop))
            m0 = machine_busy_s()
            t0 = time.perf_counter()
            procs = [await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchgpt.cli", "run", str(job),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                for job in jobs]
            codes = []
            for proc in procs:
                await proc.communicate()
                codes.append(proc.returncode)
            t1 = time.perf_counter()
            busy = (machine_busy_s() - m0) / (t1 - t0)
            stop.set()
            await sampling
            ok = codes == [0] * runs
            for job in jobs:
                out = [json.loads(line)["custom_id"] for line in
                       (job.parent / "out" / "bench.jsonl").read_text().splitlines()]
                ok = ok and len(out) == len(set(out)) == rows
        finally:
            if redis is not None:
                redis.stop()
    per_s, measured = steady_slope(sampler.samples, t0, t1, "admitted")
    final = sampler.samples[-1]
    return {"rpm": rpm, "runs": runs, "shared": shared, "rows": rows * runs,
            "steady_pct": 100 * per_s * 60 / rpm, "measured_s": measured,
            "requests": final.requests, "r429": final.rejected,
            "pct429": 100 * final.rejected / max(1, final.requests), "wall_s": t1 - t0,
            "busy_cores": busy, "ok": ok}


async def main_async(args: argparse.Namespace) -> None:
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    results = []
    for rpm in args.limits:
        for runs, shared in ((1, False), (3, False), (3, True)):
            print(f"running: rpm {rpm}, {runs} run(s), {'Redis' if shared else 'alone'} ...",
                  file=sys.stderr, flush=True)
            results.append(await run_case(rpm, runs, shared, args.seconds))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(load)} at the end, "
          f"Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{provenance()}")
    print(f"\n== runs on one account, each told the whole limit: simulator window 1 s, "
          f"latency 50 ms, rows for ~{args.seconds:g} s at the limit ==")
    head = (f"{'limit':>10} {'runs':>14} {'rows':>6} {'steady':>8} {'vs 1 run':>9} "
            f"{'reqs':>6} {'429s':>6} {'429 %':>7} {'wall s':>7} {'cores':>6}  check")
    print(head)
    print("-" * len(head))
    peer: dict[int, float] = {}
    for r in results:
        if r["runs"] == 1:
            peer[r["rpm"]] = r["steady_pct"]
        ratio = r["steady_pct"] / peer[r["rpm"]] if peer.get(r["rpm"]) else float("nan")
        what = f"{r['runs']} {'Redis' if r['shared'] else 'alone'}"
        print(f"{r['rpm']:>10,} {what:>14} {r['rows']:>6,} {r['steady_pct']:>7.1f}% "
              f"{ratio:>8.2f}x {r['requests']:>6,} {r['r429']:>6,} {r['pct429']:>6.2f}% "
              f"{r['wall_s']:>7.1f} {r['busy_cores']:>6.2f}  {'ok' if r['ok'] else 'BAD'}")
    print("\nsteady = requests the simulator admitted between t+5s and end-5s, as % of the "
          "limit; vs 1 run = that figure over the one-run peer's; 429 % = share of all "
          "requests\nthe simulator saw; cores = busy cores on the whole machine meanwhile "
          "(all runs, simulator, Redis, other users); check = every run exited 0 with each "
          "of its rows once.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=24.0, help="rows for this long at the limit")
    p.add_argument("--limits", type=int, nargs="+", default=[1200, 6000], help="RPM limits")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
