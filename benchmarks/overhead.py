"""Client overhead: requests/s and CPU per request, batchgpt vs the bare openai SDK.

Run: ``python benchmarks/overhead.py [--requests 5000] [--concurrency 64 256] [--repeat 3]
[--profile]`` (about 6 minutes with --profile). Loopback only, no key. Results and the
conclusions drawn from them: docs/performance.md, "Pacing and client overhead (issue 3)"
and "Speed (issue 13)". Issue 13's target is printed as ``batchgpt vs aiohttp: ...
ratio N.NNx`` (batchgpt's CPU a request over a bare aiohttp loop's, paired per round), and
the end-to-end table (``--no-e2e`` skips it) runs ``batchgpt run JOB`` through the CLI for
each ``api.transport`` against a bare aiohttp script, each a process of its own.

The simulator runs in its own process (``python -m batchgpt.simulator --no-record``)
with zero latency and no limits, so the client's CPU is the bottleneck. Every client
sends the same requests (a one-message chat, ``max_tokens: 16``) at the same
concurrency C; each is timed around the sending only (the client is built first):

* ``sdk``: the bare SDK loop, ``AsyncOpenAI(max_retries=0, http_client=
  DefaultAioHttpClient(...))`` as batchgpt/client.py builds it, and C tasks calling
  ``chat.completions.with_raw_response.create(...)`` and reading ``raw.content``;
* ``batchgpt``: ``run_job(job, RunOptions())`` in-process on a 5,000-row input, the job
  with ``limits: {concurrency: C}`` and no rpm/tpm (the limiter is a pass-through),
  timed from the call to its return: planning, store, sending, checkpointing (fsync
  included), summary and failures file;
* variants, at the first concurrency only (``--variants-everywhere`` for all), to split
  the cost and to measure changes without editing batchgpt (they are applied by
  monkeypatching inside this process): ``sdk-post`` (the SDK's lower-level
  ``client.post("/chat/completions", body=..., cast_to=httpx2.Response)``, which is what
  batchgpt/client.py calls since commit 5398347: it skips create()'s TypedDict
  transform), ``client`` (batchgpt's ChatClient.complete in a bare loop),
  ``batchgpt+gc`` (run_job after ``gc.freeze()`` with a gen-0 threshold of 50,000, a
  proposed fix), ``batchgpt-create`` (run_job with the create() call batchgpt made
  before 5398347, to show what that change bought) and ``aiohttp`` (a bare aiohttp
  session, no SDK: the floor).

Per client it prints requests/s, the client process's CPU per request
(``time.process_time()``: all threads, so the checkpoint's writer thread is counted), how
much of that was the cyclic garbage collector (``gc.callbacks``), the simulator's CPU per
request (/proc/PID/stat; it shares the two cores) and the cores other processes used
meanwhile. The machine is shared: before each run the script waits (``--quiet-wait``,
20 s) for the others to go quiet and runs the clients interleaved in ``--repeat`` rounds
(each run's figures go to stderr). Even with nothing else running, identical runs differ
by ±20 % on this VM, so the table gives medians over the rounds and the range of req/s,
and each comparison is the median of per-round ratios (a client and its baseline ran a
minute apart). The header names the git commit and any uncommitted change under
batchgpt/, since the figures belong to the code they measured.

``--profile`` adds a cProfile of one batchgpt run, broken down by component (cumulative
time of entry points such as the SDK's request building, the limiter, the store), and
times the checkpoint's group commits and fsyncs, which run in a worker thread.

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from batchgpt import JobConfig, RunOptions
from batchgpt.client import Attempt, ChatClient
from batchgpt.runner import run_job
from batchgpt.transport import make_client

KEY_ENV = "BATCHGPT_BENCH_KEY"
CLIENTS = ["aiohttp", "batchgpt", "batchgpt-sdk", "sdk", "sdk-post", "client", "lean-client",
           "batchgpt+gc", "batchgpt-create"]
# The others (variants) run at the first concurrency only.
MAIN_CLIENTS = ("aiohttp", "batchgpt", "batchgpt-sdk", "sdk")


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


def provenance() -> str:
    """The commit measured, and any uncommitted change to batchgpt/ (other engineers edit
    the tree while benchmarks run)."""
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
        self.gc_s = 0.0
        self.gc_runs = 0
        self._gc_t0 = 0.0

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0
            self.gc_runs += 1

    def __enter__(self) -> Meter:
        gc.callbacks.append(self._gc)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.s0, self.m0 = self.sim.cpu_s(), machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._gc)
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.sim_cpu = self.sim.cpu_s() - self.s0
        self.others = max(0.0, machine_busy_s() - self.m0 - self.cpu - self.sim_cpu)


QUIET_CORES = 0.3
QUIET_WAIT_S = 20.0  # --quiet-wait


async def wait_quiet(max_wait_s: float | None = None) -> None:
    """Wait until the rest of the machine uses less than QUIET_CORES cores (other people's
    test runs share it), for at most max_wait_s; measure anyway after that (the table's
    ``others`` column then shows it)."""
    deadline = time.monotonic() + (QUIET_WAIT_S if max_wait_s is None else max_wait_s)
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
    gc_s: float = 0.0
    ok: bool = True
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_per_k(self) -> float:
        return self.cpu_s / self.requests * 1000

    @property
    def gc_per_k(self) -> float:
        return self.gc_s / self.requests * 1000

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
    chat = make_client("aiohttp" if mode == "lean-client" else "sdk", base_url=sim.base_url,
                       api_key="sk-bench-not-a-real-key", timeout_s=30,
                       max_connections=concurrency)

    async def one(i: int) -> bool:
        body = body_for(i)
        if mode in ("client", "lean-client"):
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
    return Measure(mode, concurrency, n, m.wall, m.cpu, m.sim_cpu, m.others, m.gc_s,
                   ok=errors == 0, note=f"{errors} errors" if errors else "")


def write_job(folder: Path, n: int, concurrency: int, base_url: str,
              transport: str = "aiohttp") -> Path:
    with (folder / "input.jsonl").open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i:06d}", **body_for(i)}) + "\n")
    job = folder / "bench.yaml"
    job.write_text(
        "name: bench\ninput: input.jsonl\noutput: out/bench.jsonl\nmodel: gpt-4o-mini\n"
        f"limits: {{concurrency: {concurrency}}}\ntimeout_s: 30\n"
        f"api: {{base_url: \"{base_url}\", api_key_env: {KEY_ENV}, transport: {transport}}}\n")
    return job


async def _complete_via_create(self: ChatClient, body: Mapping[str, Any]) -> Attempt:
    """ChatClient.complete as it was before commit 5398347 (success path exactly; errors
    simplified, none occur here): ``chat.completions.with_raw_response.create`` with the
    extra parameters in ``extra_body``. Only for the ``batchgpt-create`` measurement, which
    shows what moving to ``post()`` bought; batchgpt itself is untouched."""
    from batchgpt.client import Success, _status_failure
    from batchgpt.retry import Failure, Kind

    sdk = self._sdk
    timeout = self._timeout
    start = time.perf_counter()
    extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=body["model"], messages=body["messages"], extra_body=extra or None,
            timeout=timeout)
    except openai.APIStatusError as exc:
        return Attempt(None, _status_failure(exc), time.perf_counter() - start)
    except openai.APIError as exc:
        return Attempt(None, Failure(Kind.CONNECTION, f"{exc}"[:500]),
                       time.perf_counter() - start)
    latency = time.perf_counter() - start
    headers = raw.headers
    try:
        parsed = json.loads(raw.content)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
        return Attempt(None, Failure(Kind.DECODE, "not a chat.completion",
                                     status=raw.status_code, headers=headers), latency)
    return Attempt(Success(parsed, headers, raw.request_id, latency), None, latency)


@contextlib.contextmanager
def patched_complete(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    original = ChatClient.complete
    ChatClient.complete = _complete_via_create  # type: ignore[method-assign]
    try:
        yield
    finally:
        ChatClient.complete = original  # type: ignore[method-assign]


GC_THRESHOLD = (50_000, 20, 100)


@contextlib.contextmanager
def tuned_gc(enabled: bool) -> Iterator[None]:
    """What fix 2 in docs/performance.md proposes for the run: ``gc.freeze()`` (objects
    alive at the start, imports included, are never scanned again) and a gen-0 threshold
    of 50,000 instead of 700. A run makes almost no cyclic garbage (measured: ~15
    objects per 5,000 requests), so collections are pure traversal cost."""
    if not enabled:
        yield
        return
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


async def run_batchgpt(sim: SimProcess, n: int, concurrency: int,
                       profiler: cProfile.Profile | None = None, via_create: bool = False,
                       gc_tuned: bool = False, transport: str = "aiohttp") -> Measure:
    if via_create:
        transport = "sdk"  # the variant patches the SDK path's ChatClient.complete
    with tempfile.TemporaryDirectory(prefix="bgpt-ovh-") as tmp:
        job = JobConfig.load(write_job(Path(tmp), n, concurrency, sim.base_url, transport))
        await wait_quiet()
        with patched_complete(via_create), tuned_gc(gc_tuned), Meter(sim) as m:
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
    name = ("batchgpt" + ("-create" if via_create else "") + ("+gc" if gc_tuned else "")
            + ("-sdk" if transport == "sdk" and not via_create else ""))
    return Measure(name, concurrency, n, m.wall, m.cpu, m.sim_cpu, m.others, m.gc_s, ok=ok,
                   note=note)


# -- profiling ---------------------------------------------------------------------------

# Components of one batchgpt run, as the cumulative main-thread time of entry points
# (coroutines are only timed while they run, so awaiting is not counted). (label, file, function,
# caller file, caller function); the caller narrows "json.loads" to the one in client.py.
Entry = tuple[str, str, str, str | None, str | None]
COMPONENTS: list[Entry] = [
    ("LeanClient.complete (api.transport: aiohttp), all of it", "batchgpt/transport.py",
     "complete", None, None),
    ("  ChatClient._reply (parse, check, redact check)", "batchgpt/client.py", "_reply",
     None, None),
    ("ChatClient.complete (api.transport: sdk), all of it", "batchgpt/client.py", "complete",
     None, None),
    ("  SDK create(): params transform (gone since 5398347)", "openai/_utils/_transform.py",
     "async_maybe_transform", None, None),
    ("  SDK: build request (options, headers, URL, body)", "openai/_base_client.py",
     "_build_request", None, None),
    ("  httpx2 send + aiohttp transport", "httpx2/_client.py", "send", None, None),
    ("  json.loads of the reply (client.py)", "json/__init__.py", "loads",
     "batchgpt/client.py", "complete"),
    ("runner: _succeed (output line, usage, cost)", "batchgpt/runner.py", "_succeed",
     None, None),
    ("  json.dumps of the output line", "json/__init__.py", "dumps", "batchgpt/runner.py",
     "_succeed"),
    ("  uuid4 for the line id", "uuid.py", "uuid4", "batchgpt/runner.py", "_succeed"),
    ("  Usage.from_response (pydantic)", "batchgpt/pricing.py", "from_response", None, None),
    ("  store.put_success (queue + future)", "batchgpt/store.py", "put_success", None, None),
    ("limiter: acquire + observe + record_success", "batchgpt/limiter.py", "acquire", None,
     None),
    ("", "batchgpt/limiter.py", "observe", None, None),
    ("", "batchgpt/limiter.py", "record_success", None, None),
    ("Row.cost (request_cost per attempt)", "batchgpt/source.py", "cost", None, None),
    ("dispatch (reading pending rows, tasks)", "batchgpt/runner.py", "dispatch", None, None),
    ("Slots acquire/release (asyncio.Condition)", "batchgpt/runner.py", "acquire", None, None),
    ("", "batchgpt/runner.py", "release", None, None),
    ("store writer loop (main-thread side)", "batchgpt/store.py", "_flush_loop", None, None),
    ("planning: make_plan (read, hash, lookup)", "batchgpt/plan.py", "make_plan", None, None),
    ("finish: finalize + summary", "batchgpt/store.py", "finalize", None, None),
    ("", "batchgpt/report.py", "build_summary", None, None),
    ("", "batchgpt/report.py", "write_summary", None, None),
    ("logging", "logging/__init__.py", "_log", None, None),
]


def _matches(key: Any, file: str, func: str) -> bool:
    return file in key[0] and key[2] == func


def components(stats: pstats.Stats) -> tuple[list[tuple[str, float]], float]:
    """[(label, cumulative seconds)] for COMPONENTS (rows with an empty label add to the
    row above), and the profile's total."""
    raw = stats.stats  # type: ignore[attr-defined]
    # The default (wall-clock) timer is cheap, so it distorts least; time asleep in epoll
    # is not work, so it is left out of the total.
    total = sum(v[2] for k, v in raw.items() if "poll' of 'select.epoll" not in k[2])
    out: list[tuple[str, float]] = []
    for label, file, func, cfile, cfunc in COMPONENTS:
        t = 0.0
        for key, (_cc, _nc, _tt, ct, callers) in raw.items():
            if not _matches(key, file, func):
                continue
            if cfile is None:
                t += ct
            else:
                t += sum(v[3] for ck, v in callers.items()
                         if cfunc is not None and _matches(ck, cfile, cfunc))
        if label:
            out.append((label, t))
        else:
            out[-1] = (out[-1][0], out[-1][1] + t)
    return out, total


class CommitTimer:
    """Times the checkpoint's group commit (which runs in a worker thread the profiler
    does not see) by wrapping GroupWriter._commit and os.fsync for the duration of one run."""

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
        from batchgpt.store import writer as writer_mod

        orig_commit = writer_mod.GroupWriter._commit
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

        writer_mod.GroupWriter._commit = commit  # type: ignore[method-assign]
        os.fsync = fsync
        try:
            yield
        finally:
            writer_mod.GroupWriter._commit = orig_commit  # type: ignore[method-assign]
            os.fsync = orig_fsync


async def profile(sim: SimProcess, n: int, concurrency: int, top: int) -> None:
    """cProfile one batchgpt run and print where its main-thread time goes (asleep in
    epoll excluded), plus the checkpoint thread's cost."""
    timer = CommitTimer()
    prof = cProfile.Profile()
    with timer.installed():
        m = await run_batchgpt(sim, n, concurrency, prof)
    stats = pstats.Stats(prof)
    rows, total = components(stats)
    print(f"\n== profile: batchgpt, {n:,} requests, concurrency {concurrency} "
          "(cProfile; main thread, idle excluded) ==")
    print(f"under the profiler: {m.rps:,.0f} req/s, {m.cpu_per_k:.2f} s CPU per 1k requests "
          "(the profiler inflates call-heavy code, the SDK's\ntransform most: read shares "
          "and compare with the unprofiled A/B table above)")
    print(f"{'component (cumulative; indented = part of the row above)':<58} "
          f"{'ms/1k req':>9} {'share':>6}")
    for label, t in rows:
        print(f"{label:<58} {t / n * 1e6:>9.0f} {100 * t / total:>5.1f}%")
    print(f"{'main thread, total':<58} {total / n * 1e6:>9.0f} {100.0:>5.1f}%")
    print(f"\ncheckpoint writer thread (not in the profile): {timer.commits:,} group commits "
          f"for {timer.rows:,} rows ({timer.rows / max(1, timer.commits):.1f} rows/commit), "
          f"{timer.wall / max(1, timer.commits) * 1000:.1f} ms wall per commit, thread CPU "
          f"{timer.thread_cpu:.2f} s ({timer.thread_cpu / n * 1e6:.0f} ms per 1k rows); "
          f"{timer.fsyncs:,} fsyncs, {timer.fsync_wall / max(1, timer.fsyncs) * 1000:.1f} ms "
          "each on average")
    if top:
        print(f"\ntop {top} functions by own time:")
        stats.sort_stats("tottime").print_stats(top)


# -- end to end: the CLI, start-up included, against a bare aiohttp script ---------------

PEER_SCRIPT = r"""
import asyncio, json, sys
import aiohttp

async def main(path, out, url, key, conc):
    rows = [json.loads(line) for line in open(path)]
    todo = iter(rows)
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc),
                                     headers=headers) as session:
        with open(out, "w") as fh:
            async def worker():
                for row in todo:
                    body = {"model": "gpt-4o-mini", "messages": row["messages"],
                            "max_tokens": row["max_tokens"]}
                    async with session.post(url, data=json.dumps(body).encode()) as r:
                        reply = await r.json()
                    fh.write(json.dumps({"custom_id": row["id"], "response": reply}) + "\n")
            await asyncio.gather(*(worker() for _ in range(conc)))

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
"""


def _child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit code) of a subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if proc.stderr is not None:
        proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def end_to_end(sim: SimProcess, n: int, concurrency: int, repeat: int) -> None:
    """``batchgpt run JOB`` through the CLI (a fresh process: start-up, imports, plan,
    sending, checkpoint, summary) for each transport, against a bare aiohttp script in a
    process of its own (start-up included) sending the same requests to the same server,
    interleaved; the ratios are per round."""
    env = dict(os.environ, **{KEY_ENV: "sk-bench-not-a-real-key"})
    got: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(repeat):
        for name in ("peer", "aiohttp", "sdk"):
            with tempfile.TemporaryDirectory(prefix="bgpt-e2e-") as tmp:
                folder = Path(tmp)
                job = write_job(folder, n, concurrency, sim.base_url,
                                "aiohttp" if name == "peer" else name)
                if name == "peer":
                    script = folder / "peer.py"
                    script.write_text(PEER_SCRIPT)
                    cmd = [sys.executable, str(script), str(folder / "input.jsonl"),
                           str(folder / "out.jsonl"), sim.base_url + "/chat/completions",
                           env[KEY_ENV], str(concurrency)]
                    out = folder / "out.jsonl"
                else:
                    cmd = [sys.executable, "-m", "batchgpt.cli", "run", str(job)]
                    out = folder / "out" / "bench.jsonl"
                wall, cpu, code = _child(cmd, env)
                lines = out.read_text().count("\n") if out.exists() else 0
                if code != 0 or lines != n:
                    print(f"  {name}: exit {code}, {lines} lines", file=sys.stderr)
                got[name].append((wall, cpu))
    print(f"\n== end to end, {n:,} requests, concurrency {concurrency}, start-up included "
          f"(load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}) ==")
    print(f"{'client':<38} {'wall s':>7} {'req/s':>7} {'CPU s':>7} {'CPU ms/req':>10} "
          f"{'CPU ÷ peer':>10} {'req/s ÷ peer':>12}")
    labels = {"peer": "bare aiohttp script (the peer)",
              "aiohttp": "batchgpt run (api.transport: aiohttp)",
              "sdk": "batchgpt run (api.transport: sdk)"}
    for name in ("peer", "aiohttp", "sdk"):
        runs = got[name]
        cpu_ratio = _median([c / p[1] for (_, c), p in zip(runs, got["peer"], strict=True)])
        rate_ratio = _median([p[0] / w for (w, _), p in zip(runs, got["peer"], strict=True)])
        wall = _median([w for w, _ in runs])
        cpu = _median([c for _, c in runs])
        print(f"{labels[name]:<38} {wall:>7.2f} {n / wall:>7,.0f} {cpu:>7.2f} "
              f"{cpu / n * 1000:>10.3f} {cpu_ratio:>10.2f} {rate_ratio:>12.2f}")


# -- main --------------------------------------------------------------------------------

LEGEND = {
    "aiohttp": "bare aiohttp.ClientSession, no SDK (the floor)",
    "batchgpt": "run_job() as it is in the working tree (api.transport: aiohttp, the default)",
    "batchgpt-sdk": "run_job() with api.transport: sdk (through the SDK's post())",
    "sdk": "bare SDK loop: chat.completions.with_raw_response.create()",
    "sdk-post": "bare SDK loop: client.post(..., cast_to=httpx2.Response), the call "
                "batchgpt/client.py makes",
    "client": "batchgpt.client.ChatClient.complete() in a bare loop (the SDK path)",
    "lean-client": "batchgpt.transport.LeanClient.complete() in a bare loop",
    "batchgpt+gc": "run_job() with gc.freeze() + gen-0 threshold 50,000 (proposed fix)",
    "batchgpt-create": "run_job() with ChatClient.complete calling create() as before "
                       "commit 5398347",
}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(got: dict[tuple[int, str], list[Measure]], order: list[tuple[int, str]],
                repeat: int) -> None:
    """Medians over the rounds (each column on its own), the range of req/s, and for the
    comparisons the median of the per-round ratios: a client and its baseline ran in the
    same round, a minute apart, so a slow spell of the machine hits both."""
    print(f"\n== overhead: simulator latency 0, no limits; medians of {repeat} rounds "
          f"(load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}) ==")
    head = (f"{'client':<16} {'conc':>4} {'requests':>8} {'req/s':>7} {'(min-max)':>13} "
            f"{'CPU s/1k':>9} {'of it GC':>8} {'busy':>5} {'sim s/1k':>9} {'others':>6}  check")
    print(head)
    print("-" * len(head))
    for key in order:
        ms = got[key]
        c, client = key
        rps = [m.rps for m in ms]
        ok = all(m.ok for m in ms)
        notes = "; ".join(m.note for m in ms if m.note)
        span = f"({min(rps):,.0f}-{max(rps):,.0f})"
        print(f"{client:<16} {c:>4} {ms[0].requests:>8,} {_median(rps):>7,.0f} {span:>13} "
              f"{_median([m.cpu_per_k for m in ms]):>9.3f} "
              f"{_median([m.gc_per_k for m in ms]):>8.3f} "
              f"{100 * _median([m.cpu_s / m.wall_s for m in ms]):>4.0f}% "
              f"{_median([m.sim_per_k for m in ms]):>9.3f} "
              f"{max(m.others_cores for m in ms):>6.2f}  {'ok' if ok else 'BAD'} {notes}")
    print()
    for c in sorted({k[0] for k in order}):
        for other, base in (("batchgpt", "aiohttp"), ("batchgpt-sdk", "aiohttp"),
                            ("lean-client", "aiohttp"), ("batchgpt", "batchgpt-sdk"),
                            ("batchgpt", "sdk"), ("batchgpt", "sdk-post"),
                            ("batchgpt", "client"), ("sdk-post", "sdk"),
                            ("client", "sdk-post"), ("aiohttp", "sdk-post"),
                            ("batchgpt+gc", "batchgpt"), ("batchgpt-create", "batchgpt")):
            o, b = got.get((c, other)), got.get((c, base))
            if not o or not b:
                continue
            pairs = list(zip(o, b, strict=False))
            d_cpu = _median([x.cpu_per_k - y.cpu_per_k for x, y in pairs])
            r_cpu = _median([x.cpu_per_k / y.cpu_per_k for x, y in pairs])
            r_rate = _median([x.rps / y.rps for x, y in pairs])
            print(f"concurrency {c}: {other} vs {base}: CPU {d_cpu:+.3f} s/1k "
                  f"({100 * (r_cpu - 1):+.0f} %, ratio {r_cpu:.2f}x), rate x{r_rate:.2f}")
    print()
    for name in sorted({k[1] for k in order}, key=list(LEGEND).index):
        print(f"  {name:<16} {LEGEND[name]}")
    print("CPU s/1k = time.process_time() of the client process (all its threads) per 1,000 "
          "requests (= ms per request);\nof it GC = time in the cyclic garbage collector "
          "(gc.callbacks); busy = client CPU / wall (100 % = one core);\nsim s/1k = the "
          "simulator process's CPU; others = the most cores other processes on this shared "
          "machine used during any\nof the rounds. Comparisons: median over rounds of the "
          "paired differences/ratios.")


async def main_async(a: argparse.Namespace) -> None:
    global QUIET_WAIT_S
    QUIET_WAIT_S = a.quiet_wait
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"openai {openai.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; {provenance()}",
          flush=True)
    with SimProcess() as sim:
        await run_sdk(sim, 300, 16)  # warm-up: imports, first connections
        if not a.profile_only:
            # Rounds interleave the clients, so a burst of load from elsewhere on the
            # machine hits all of them alike rather than one client's every repeat.
            got: dict[tuple[int, str], list[Measure]] = defaultdict(list)  # in round order
            for r in range(a.repeat):
                for c in a.concurrency:
                    for client in a.clients:
                        if (c != a.concurrency[0] and client not in MAIN_CLIENTS
                                and not a.variants_everywhere):
                            continue
                        print(f"round {r + 1}/{a.repeat}: {client}, concurrency {c} ...",
                              file=sys.stderr, flush=True)
                        if client.startswith("batchgpt"):
                            m = await run_batchgpt(sim, a.requests, c,
                                                   via_create="-create" in client,
                                                   gc_tuned="+gc" in client,
                                                   transport="sdk" if client.endswith("-sdk")
                                                   else "aiohttp")
                        else:
                            m = await run_sdk(sim, a.requests, c, client)
                        got[(c, client)].append(m)
                        print(f"  {m.rps:7,.0f} req/s {m.cpu_per_k:6.3f} s/1k CPU "
                              f"(GC {m.gc_per_k:.3f}), sim {m.sim_per_k:.3f} s/1k, "
                              f"others {m.others_cores:.2f} cores"
                              + (f"  {m.note}" if m.note else ""), file=sys.stderr, flush=True)
            order = [(c, client) for c in a.concurrency for client in a.clients
                     if (c, client) in got]
            print_table(got, order, a.repeat)
        if a.e2e and not a.profile_only:
            end_to_end(sim, a.requests, a.concurrency[0], a.repeat)
        if a.profile or a.profile_only:
            await profile(sim, a.requests, a.concurrency[0], a.top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", nargs="+", default=CLIENTS, choices=CLIENTS)
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="before each run, wait up to this many seconds for other processes "
                   f"to use < {QUIET_CORES} cores")
    p.add_argument("--variants-everywhere", action="store_true",
                   help="run every client at every concurrency (default: variants at the "
                   "first concurrency only)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false",
                   help="skip the end-to-end CLI comparison")
    p.add_argument("--profile", action="store_true", help="also profile one batchgpt run")
    p.add_argument("--profile-only", action="store_true")
    p.add_argument("--top", type=int, default=0, help="with --profile: also list the top N "
                   "functions by own time")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
