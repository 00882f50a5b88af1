"""Client overhead: requests/s and CPU per request, batchgpt vs the bare openai SDK.

Run: ``python benchmarks/overhead.py [--requests 5000] [--concurrency 64 256] [--repeat 3]``
(about 2 minutes), and ``--profile`` to also profile one batchgpt run and say where its
CPU goes. Loopback only, no key. Results: docs/performance.md, "Pacing and client
overhead (issue 3)".

The simulator runs in its own process (``python -m batchgpt.simulator --no-record``)
with zero latency and no limits, so the client's CPU is the bottleneck. Two clients send
the same requests (a one-message chat, ``max_tokens: 16``) at the same concurrency:

* **sdk**: the bare SDK loop: ``AsyncOpenAI(max_retries=0, http_client=
  DefaultAioHttpClient(...))`` (the same construction as ``batchgpt/client.py``) and C
  tasks calling ``chat.completions.with_raw_response.create(...)`` and reading
  ``raw.content``: no parsing, pacing, checkpoint or output.
* **batchgpt**: ``run_job(job, RunOptions())`` in-process on a 5,000-row input, the job
  with ``limits: {concurrency: C}`` and no rpm/tpm (so the limiter is a pass-through),
  timed from the call to its return: planning, store open, sending, checkpointing,
  summary and the failures file included.

Per run it prints requests/s, the client process's CPU (``time.process_time()``, all
threads, so the checkpoint's writer thread is counted) per 1,000 requests, and the
simulator's CPU per 1,000 requests (from /proc/PID/stat): the simulator shares the two
cores, so its cost is part of what caps the rate. Each row is the median run, by
requests/s, of ``--repeat`` runs (a fresh output folder each time).

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from batchgpt import JobConfig, RunOptions
from batchgpt.client import ChatClient
from batchgpt.runner import run_job

KEY_ENV = "BATCHGPT_BENCH_KEY"
CLIENTS = ["sdk", "client", "batchgpt", "sdk-post", "aiohttp"]


# -- the simulator in its own process (same as benchmarks/utilisation.py) --------------

class SimProcess:
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

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (busy jiffies in /proc/stat)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = parts[3] + parts[4]  # idle + iowait
    return (sum(parts) - idle) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall, client CPU, simulator CPU and everyone else's CPU over one measurement.
    Other engineers' tests share this machine: ``others`` says how many cores they took."""

    def __init__(self, sim: SimProcess) -> None:
        self.sim = sim

    def __enter__(self) -> Meter:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.s0, self.m0 = self.sim.cpu_s(), machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.sim_cpu = self.sim.cpu_s() - self.s0
        self.others = max(0.0, machine_busy_s() - self.m0 - self.cpu - self.sim_cpu)


QUIET_CORES = 0.3


async def wait_quiet(max_wait_s: float = 90.0) -> None:
    """Wait until the rest of the machine uses less than QUIET_CORES cores (other people's
    test runs share it), for at most max_wait_s; measure anyway after that (the table's
    ``others`` column then shows it)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        m0, c0 = machine_busy_s(), time.process_time()
        await asyncio.sleep(1.0)
        others = machine_busy_s() - m0 - (time.process_time() - c0)
        if others < QUIET_CORES or time.monotonic() > deadline:
            return


def body_for(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Row {i}. Say something short."}],
            "max_tokens": 16}


@dataclass
class Measure:
    client: str
    concurrency: int
    requests: int
    wall_s: float
    cpu_s: float
    sim_cpu_s: float
    others_s: float = 0.0
    ok: bool = True
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_per_k(self) -> float:
        return self.cpu_s / self.requests * 1000

    @property
    def others_cores(self) -> float:
        return self.others_s / self.wall_s

    @property
    def sim_per_k(self) -> float:
        return self.sim_cpu_s / self.requests * 1000


# -- the two clients ---------------------------------------------------------------------

def sdk_client(base_url: str, concurrency: int) -> openai.AsyncOpenAI:
    import httpx2

    return openai.AsyncOpenAI(
        api_key="sk-bench-not-a-real-key", base_url=base_url, max_retries=0, timeout=30,
        http_client=openai.DefaultAioHttpClient(
            limits=httpx2.Limits(max_connections=concurrency,
                                 max_keepalive_connections=concurrency)))


async def run_sdk(sim: SimProcess, n: int, concurrency: int, mode: str = "sdk") -> Measure:
    """The bare loop. ``sdk``: ``with_raw_response.create`` (what batchgpt/client.py calls);
    ``sdk-post``: the SDK's lower-level ``client.post("/chat/completions", body=...,
    cast_to=httpx2.Response)``, which skips ``create``'s TypedDict transform of the params
    but keeps the SDK's headers, error classes and transport; ``aiohttp``: no SDK at all,
    one aiohttp.ClientSession posting JSON bytes (the floor)."""
    import aiohttp
    import httpx2

    counter = iter(range(n))
    errors = 0
    client = sdk_client(sim.base_url, concurrency)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        headers={"Authorization": "Bearer sk-bench-not-a-real-key"})
    url = sim.base_url + "/chat/completions"
    chat = ChatClient(base_url=sim.base_url, api_key="sk-bench-not-a-real-key", timeout_s=30,
                      max_connections=concurrency)

    async def one(i: int) -> bool:
        body = body_for(i)
        if mode == "client":
            attempt = await chat.complete({"model": "gpt-4o-mini", **body})
            return attempt.success is not None
        if mode == "sdk":
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=body["messages"],
                extra_body={"max_tokens": body["max_tokens"]})
            _ = raw.content
            return True
        if mode == "sdk-post":
            resp = await client.post("/chat/completions", body={"model": "gpt-4o-mini", **body},
                                     cast_to=httpx2.Response)
            _ = resp.content
            return True
        data = json.dumps({"model": "gpt-4o-mini", **body}).encode()
        async with session.post(url, data=data,
                                headers={"Content-Type": "application/json"}) as r:
            _ = await r.read()
            return r.status == 200

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            try:
                ok = await one(i)
            except openai.APIError:
                ok = False
            errors += not ok

    await client.models.list()  # connection set-up of the first request is not timed alone
    await chat.complete({"model": "gpt-4o-mini", **body_for(0)})
    await wait_quiet()
    with Meter(sim) as m:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    await chat.aclose()
    await session.close()
    return Measure(mode, concurrency, n, m.wall, m.cpu, m.sim_cpu, m.others, ok=errors == 0,
                   note=f"{errors} errors" if errors else "")


def write_job(folder: Path, n: int, concurrency: int, base_url: str) -> Path:
    with (folder / "input.jsonl").open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i:06d}", **body_for(i)}) + "\n")
    job = folder / "bench.yaml"
    job.write_text(
        "name: bench\ninput: input.jsonl\noutput: out/bench.jsonl\nmodel: gpt-4o-mini\n"
        f"limits: {{concurrency: {concurrency}}}\ntimeout_s: 30\n"
        f"api: {{base_url: \"{base_url}\", api_key_env: {KEY_ENV}}}\n")
    return job


async def run_batchgpt(sim: SimProcess, n: int, concurrency: int,
                       profiler: cProfile.Profile | None = None) -> Measure:
    with tempfile.TemporaryDirectory(prefix="bgpt-ovh-") as tmp:
        job = JobConfig.load(write_job(Path(tmp), n, concurrency, sim.base_url))
        await wait_quiet()
        with Meter(sim) as m:
            if profiler is not None:
                profiler.enable()
            result = await run_job(job, RunOptions())
            if profiler is not None:
                profiler.disable()
        lines = Path(job.output).read_text().splitlines()
        ids = {json.loads(line)["custom_id"] for line in lines}
    ok = result.outcome == "completed" and len(lines) == n == len(ids)
    note = "" if ok else (f"outcome={result.outcome} lines={len(lines)} unique={len(ids)} "
                          f"errors={result.summary['this_run']['errors_by_code']}")
    return Measure("batchgpt", concurrency, n, m.wall, m.cpu, m.sim_cpu, m.others, ok=ok,
                   note=note)


# -- profiling ---------------------------------------------------------------------------

CATEGORIES = [  # (label, substrings of "file:function"), first match wins
    ("checkpoint: fsync", ("{built-in method posix.fsync}",)),
    ("checkpoint: sqlite", ("sqlite3", "batchgpt/store.py")),
    ("json (dumps/loads)", ("json/", "{built-in method _json", "_json.")),
    ("pydantic", ("pydantic",)),
    ("limiter", ("batchgpt/limiter.py",)),
    ("logging", ("logging/",)),
    ("openai SDK (request build, response wrap)", ("/openai/",)),
    ("httpx2 / aiohttp transport", ("/httpx2/", "/aiohttp/", "/multidict/", "/yarl/",
                                    "/anyio/", "/h11/", "/httpcore/", "/sniffio/")),
    ("asyncio event loop + sockets", ("asyncio/", "selectors.py", "{method 'poll'",
                                      "{method 'send'", "{method 'recv", "socket")),
    ("batchgpt runner/client/report", ("batchgpt/",)),
    ("uuid / hashing", ("uuid.py", "hashlib", "_hashlib")),
]


def categorize(stats: pstats.Stats) -> tuple[dict[str, float], float]:
    totals: dict[str, float] = defaultdict(float)
    grand = 0.0
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{filename}:{func}"
        grand += tt
        for label, needles in CATEGORIES:
            if any(n in key for n in needles):
                totals[label] += tt
                break
        else:
            totals["other (python stdlib, builtins)"] += tt
    return totals, grand


class CommitTimer:
    """Times the checkpoint's group commit (which runs in a worker thread the profiler
    does not see) by wrapping Store._commit and os.fsync for the duration of one run."""

    def __init__(self) -> None:
        self.commits = 0
        self.rows = 0
        self.wall = 0.0
        self.thread_cpu = 0.0
        self.fsyncs = 0
        self.fsync_wall = 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from batchgpt import store as store_mod

        orig_commit = store_mod.Store._commit
        orig_fsync = os.fsync
        timer = self

        def commit(self_: Any, batch: list[Any]) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                orig_commit(self_, batch)
            finally:
                with timer._lock:
                    timer.commits += 1
                    timer.rows += len(batch)
                    timer.wall += time.perf_counter() - t0
                    timer.thread_cpu += time.thread_time() - c0

        def fsync(fd: int) -> None:
            t0 = time.perf_counter()
            try:
                orig_fsync(fd)
            finally:
                with timer._lock:
                    timer.fsyncs += 1
                    timer.fsync_wall += time.perf_counter() - t0

        store_mod.Store._commit = commit  # type: ignore[method-assign]
        os.fsync = fsync
        try:
            yield
        finally:
            store_mod.Store._commit = orig_commit  # type: ignore[method-assign]
            os.fsync = orig_fsync


async def profile(sim: SimProcess, n: int, concurrency: int, top: int) -> None:
    timer = CommitTimer()
    prof = cProfile.Profile()
    with timer.installed():
        m = await run_batchgpt(sim, n, concurrency, prof)
    stats = pstats.Stats(prof)
    totals, grand = categorize(stats)
    print(f"\n== profile: batchgpt, {n:,} requests, concurrency {concurrency} "
          f"(cProfile, main thread) ==")
    print(f"under the profiler: {m.rps:,.0f} req/s, process CPU {m.cpu_s:.2f} s "
          f"(the profiler itself roughly doubles CPU; shares matter, not absolutes)")
    print(f"{'where (own time, main thread)':<44} {'s':>7} {'share':>6} {'ms/1k req':>9}")
    for label, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{label:<44} {t:>7.2f} {100 * t / grand:>5.1f}% {t / n * 1e6:>9.1f}")
    print(f"{'total':<44} {grand:>7.2f}")
    print(f"\ncheckpoint writer thread (not in the profile above): {timer.commits:,} group "
          f"commits for {timer.rows:,} rows ({timer.rows / max(1, timer.commits):.1f} "
          f"rows/commit), wall {timer.wall:.2f} s, thread CPU {timer.thread_cpu:.2f} s "
          f"({timer.thread_cpu / n * 1e6:.0f} ms per 1k rows); "
          f"{timer.fsyncs:,} fsyncs, {timer.fsync_wall:.2f} s in fsync")
    print(f"\ntop {top} functions by cumulative time:")
    stats.sort_stats("cumulative").print_stats(top)
    print(f"top {top} functions by own time:")
    stats.sort_stats("tottime").print_stats(top)


# -- main --------------------------------------------------------------------------------

def print_table(rows: list[Measure], repeat: int) -> None:
    print(f"\n== overhead: simulator latency 0, no limits; the median run (by req/s) of "
          f"{repeat} ==")
    head = (f"{'client':<9} {'conc':>4} {'requests':>8} {'req/s':>7} {'CPU s/1k req':>12} "
            f"{'client busy':>11} {'sim CPU s/1k':>12} {'others':>6}  check")
    print(head)
    print("-" * len(head))
    for m in rows:
        print(f"{m.client:<9} {m.concurrency:>4} {m.requests:>8,} {m.rps:>7,.0f} "
              f"{m.cpu_per_k:>12.3f} {100 * m.cpu_s / m.wall_s:>10.0f}% {m.sim_per_k:>12.3f} "
              f"{m.others_cores:>6.2f}  {'ok' if m.ok else 'BAD'} {m.note}")
    by = {(m.client, m.concurrency): m for m in rows}
    for c in sorted({m.concurrency for m in rows}):
        s = by.get(("sdk", c))
        if s is None:
            continue
        for other, what in (("client", "batchgpt.client.ChatClient.complete() alone vs"),
                            ("batchgpt", "batchgpt (everything) vs"),
                            ("sdk-post", "client.post (no params transform) vs"),
                            ("aiohttp", "bare aiohttp (no SDK) vs")):
            o = by.get((other, c))
            if o is not None:
                print(f"concurrency {c}: {what} the bare SDK create(): CPU "
                      f"{o.cpu_per_k - s.cpu_per_k:+.3f} s per 1k requests "
                      f"({100 * (o.cpu_per_k / s.cpu_per_k - 1):+.0f} %), rate "
                      f"{100 * o.rps / s.rps:.0f} %")
    print("CPU = time.process_time() of the client process (all its threads); client busy = "
          "that CPU / wall (100 % = one core);\nsim CPU = the simulator process (shares the same "
          "2 cores); others = cores used by other processes on the machine meanwhile.")


def median_measure(ms: list[Measure]) -> Measure:
    ms = sorted(ms, key=lambda m: m.rps)
    mid = ms[len(ms) // 2]
    mid.ok = all(m.ok for m in ms)
    mid.note = "; ".join(m.note for m in ms if m.note)
    return mid


async def main_async(a: argparse.Namespace) -> None:
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"openai {openai.__version__}", flush=True)
    rows: list[Measure] = []
    with SimProcess() as sim:
        await run_sdk(sim, 300, 16)  # warm-up: imports, first connections
        if not a.profile_only:
            for c in a.concurrency:
                for client in a.clients:
                    got = []
                    for _ in range(a.repeat):
                        print(f"running: {client} concurrency {c} ...", file=sys.stderr,
                              flush=True)
                        if client == "batchgpt":
                            got.append(await run_batchgpt(sim, a.requests, c))
                        else:
                            got.append(await run_sdk(sim, a.requests, c, client))
                    rows.append(median_measure(got))
            print_table(rows, a.repeat)
        if a.profile or a.profile_only:
            await profile(sim, a.requests, a.concurrency[0], a.top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", nargs="+", default=CLIENTS, choices=CLIENTS)
    p.add_argument("--profile", action="store_true", help="also profile one batchgpt run")
    p.add_argument("--profile-only", action="store_true")
    p.add_argument("--top", type=int, default=25)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
