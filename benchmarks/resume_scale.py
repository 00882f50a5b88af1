"""Resume at scale: how long ``batchgpt run JOB`` takes, and how much memory, to find out
that a 1,000,000-row job has nothing left to do, and to reach its first new row when
1,000 rows were appended.

Run: ``python benchmarks/resume_scale.py`` (about 4 minutes, 2 of them building the state;
``--rows 200000`` for a quick look, ``--profile`` to add a cProfile of the no-op resume,
``--keep`` to keep the files).
Numbers are in docs/performance.md, "Scale (issue 4)".

What it does, in a temp folder under /tmp (removed at the end):

1. writes a 1,000,000-line template-form input (``{"id", "text"}``, ~200-char texts);
2. builds the COMPLETED state for it with batchgpt's own Store, the write path a run uses
   (``GroupWriter._commit``'s steps: output lines appended and fsynced, then one SQLite
   transaction),
   in batches of 50,000 rows, with the simulator's reply for each row — nothing is sent;
3. starts the simulator as a separate process and times ``batchgpt run JOB`` (a
   subprocess under /usr/bin/time: start to exit, peak RSS) three times; the simulator must
   receive zero requests. Targets: ≤ 3 s, ≤ 150 MB (issue 13; the first resume after
   the state is built reads everything and records the verified prefix);
4. appends 1,000 new rows and times the run until the first new request reaches the
   simulator (polling its ``/_sandbox/stats``), then to exit; exactly 1,000 requests.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from batchgpt.config import JobConfig
from batchgpt.pricing import Usage
from batchgpt.simulator import completion_for
from batchgpt.source import InputFile
from batchgpt.store import Store
from batchgpt.store.index import NewResult

WORDS = [
    "council", "budget", "river", "school", "market", "weather", "harbour", "festival",
    "museum", "railway", "library", "hospital", "bridge", "election", "farmers", "theatre",
    "stadium", "airport", "forest", "coast", "report", "residents", "plan", "approved",
    "delayed", "opened", "announced", "warned", "expected",
]
COMMIT_BATCH = 50_000
TARGET_S = 3.0
TARGET_MB = 150.0


def write_input(path: Path, start: int, n: int, seed: int) -> None:
    """Template-form lines ``{"id", "text"}``; each text ~200 characters, unique (it
    starts with the row number), drawn from a pool of random word sequences."""
    rng = random.Random(seed)
    pool = []
    for _ in range(997):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 200:
            words.append(rng.choice(WORDS))
        pool.append(" ".join(words))
    with path.open("a", encoding="utf-8") as fh:
        for i in range(start, start + n):
            text = f"Story {i}: {pool[i % len(pool)]}"[:199] + "."
            fh.write(json.dumps({"id": f"r{i:07d}", "text": text}) + "\n")


def write_job(folder: Path, base_url: str) -> Path:
    job = {
        "name": "resume_scale",
        "input": "input.jsonl",
        "output": "out/resume_scale.jsonl",
        "model": "gpt-4o-mini",
        "prompt": "Summarize in one sentence:\n\n{text}",
        "params": {"max_tokens": 60, "temperature": 0.2},
        "limits": {"concurrency": 64},
        "timeout_s": 30,
        "api": {"base_url": base_url},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def build_completed_state(job_path: Path) -> int:
    """Every row of the input succeeded: output lines + checkpoint, as a run writes them."""
    job = JobConfig.load(job_path)
    store = Store(job)
    store.open()
    store.start_run()
    batch: list[tuple[NewResult, bytes]] = []
    n = 0

    def commit(items: list[tuple[NewResult, bytes]]) -> None:
        start, fingerprint = store.out.append(b"".join(data for _, data in items))
        for result, data in items:
            result.off = start
            start += len(data)
        store.index.commit([r for r, _ in items], [], store.run_id,
                           output_size=store.out.size, output_crc=store.out.crc,
                           fingerprint=fingerprint.dumps())

    try:
        for scanned in InputFile(job).scan():
            row = scanned.row
            reply = completion_for(row.body)
            usage = Usage.from_response(reply["usage"])
            line = {"id": f"batch_req_{n + len(batch):032x}", "custom_id": row.custom_id,
                    "response": {"status_code": 200, "request_id": f"req_{n + len(batch):032x}",
                                 "body": reply}, "error": None}
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            batch.append((NewResult(row.custom_id, row.request_hash, 0, len(data), 1,
                                    reply["model"], usage), data))
            if len(batch) >= COMMIT_BATCH:
                commit(batch)
                n += len(batch)
                batch = []
        if batch:
            commit(batch)
            n += len(batch)
        store.finish_run("completed", "{}")
    finally:
        store.close()
    return n


class SimulatorProcess:
    """``python -m batchgpt.simulator`` on a free port, bodies not recorded."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchgpt.simulator", "--port", "0", "--no-record"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.base_url = line.strip().rsplit(" ", 1)[-1]
        self.root = self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_sandbox/stats", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.root}/_sandbox/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def timed_run(job_path: Path, sim: SimulatorProcess | None = None,
              extra: list[str] | None = None) -> dict[str, Any]:
    """Start ``batchgpt run`` and wait for it; wall time, peak RSS, and (given a simulator)
    when its first request arrived."""
    return measure([sys.executable, "-m", "batchgpt.cli", "run", str(job_path), *(extra or [])],
                   job_path.parent, sim)


def measure(cmd: list[str], folder: Path, sim: SimulatorProcess | None = None,
            ) -> dict[str, Any]:
    """Run cmd under /usr/bin/time (peak RSS, CPU); wall time measured here.

    Not ``wait4``/``RUSAGE_CHILDREN`` on a direct child: Linux records the memory the
    child had before ``exec`` (a copy, or with vfork the very mm, of this parent) in its
    ``ru_maxrss``, so a child of a big parent reports the parent's size. ``time`` is a
    small process, so its child starts small."""
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    env.pop("OPENAI_BASE_URL", None)
    err_path, time_path = folder / "stderr.txt", folder / "time.txt"
    timer = shutil.which("time") or "/usr/bin/time"
    if not Path(timer).exists():
        sys.exit("needs GNU time (/usr/bin/time) for peak RSS: apt-get install time")
    with err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([timer, "-o", str(time_path), "-f", "%M %U %S", *cmd],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    first = None
    if sim is not None:
        while proc.poll() is None and first is None:
            if sim.stats()["requests"] > 0:
                first = time.perf_counter() - t0
            else:
                time.sleep(0.005)
    code = proc.wait()
    wall = time.perf_counter() - t0
    fields = time_path.read_text().split()[-3:]  # "Command exited with non-zero status" first
    return {"exit": code, "wall_s": wall, "first_request_s": first,
            "max_rss_mb": int(fields[0]) / 1024, "cpu_s": float(fields[1]) + float(fields[2]),
            "stderr": err_path.read_text(encoding="utf-8", errors="replace")}


def uptime() -> str:
    """The machine's load averages (1, 5, 15 min), printed with every figure."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def breakdown(job_path: Path) -> dict[str, float]:
    """The no-op resume's steps, timed in this process (the CLI adds its start-up)."""
    from batchgpt.plan import make_plan

    job = JobConfig.load(job_path)
    out: dict[str, float] = {}
    t = time.perf_counter()
    store = Store(job)
    store.open()
    out["open (lock, repair, checks)"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        plan = make_plan(job, InputFile(job), store, retry_failed=False, limit=None)
        out["plan (scan + validate + hash + look up)"] = time.perf_counter() - t
        assert plan.to_send == 0
        t = time.perf_counter()
        store.totals()
        out["totals (usage over the checkpoint)"] = time.perf_counter() - t
        t = time.perf_counter()
        store.finalize()
        out["finalize (failures file)"] = time.perf_counter() - t
    finally:
        store.close()
    return out


def profile_noop(job_path: Path, top: int) -> None:
    """The no-op resume in this process under cProfile (same code path as the CLI)."""
    from batchgpt.runner import RunOptions, run_job_sync

    prof = cProfile.Profile()
    prof.enable()
    result = run_job_sync(job_path, RunOptions())
    prof.disable()
    print(f"\ncProfile of the no-op resume ({result.outcome}), top {top} by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--new", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    a = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="batchgpt-resume-", dir="/tmp"))
    sim = SimulatorProcess()
    try:
        job_path = write_job(folder, sim.base_url)
        t = time.perf_counter()
        write_input(folder / "input.jsonl", 0, a.rows, a.seed)
        size = (folder / "input.jsonl").stat().st_size
        print(f"input: {a.rows:,} rows, {size / 1e6:.0f} MB "
              f"({time.perf_counter() - t:.1f}s to write)")
        t = time.perf_counter()
        n = build_completed_state(job_path)
        out = folder / "out" / "resume_scale.jsonl"
        db = folder / "out" / "resume_scale.state" / "rows.sqlite"
        print(f"state: {n:,} rows done, output {out.stat().st_size / 1e6:.0f} MB, checkpoint "
              f"{db.stat().st_size / 1e6:.0f} MB ({time.perf_counter() - t:.1f}s to build)")

        print(f"load: {uptime()}")
        # The state was written directly, so no plan has verified a prefix yet: the first
        # resume reads everything (and records the verified prefix); the next ones don't.
        first = timed_run(job_path)
        assert first["exit"] == 0, first["stderr"]
        print(f"first resume (full scan, records the verified prefix): wall "
              f"{first['wall_s']:.2f}s, CPU {first['cpu_s']:.2f}s, peak RSS "
              f"{first['max_rss_mb']:.0f} MB")
        runs = []
        for _ in range(a.repeat):
            r = timed_run(job_path)
            assert r["exit"] == 0, r["stderr"]
            assert "nothing to do" in r["stderr"], r["stderr"]
            runs.append(r)
        sent = sim.stats()["requests"]
        assert sent == 0, f"the simulator received {sent} requests on a no-op resume"
        walls = [r["wall_s"] for r in runs]
        rss = max(r["max_rss_mb"] for r in runs)
        print(f"\nno-op resume of {a.rows:,} done rows ({a.repeat} runs, prefix verified): wall "
              f"{min(walls):.2f}s min / {statistics.median(walls):.2f}s median "
              f"(target ≤ {TARGET_S:g}s: {'met' if max(walls) <= TARGET_S else 'MISSED'}), "
              f"CPU {statistics.median(r['cpu_s'] for r in runs):.2f}s, peak RSS {rss:.0f} MB "
              f"(target ≤ {TARGET_MB:g} MB: {'met' if rss <= TARGET_MB else 'MISSED'}), "
              f"requests received: {sent}")
        base = timed_run(job_path, extra=["--help"])
        print(f"  (for scale: `batchgpt run --help`, i.e. start-up and imports alone: "
              f"{base['wall_s']:.2f}s, {base['max_rss_mb']:.0f} MB)")

        print("  where the time goes, in-process: " + ", ".join(
            f"{step} {secs:.2f}s" for step, secs in breakdown(job_path).items()))
        if a.profile:
            profile_noop(job_path, 25)

        write_input(folder / "input.jsonl", a.rows, a.new, a.seed)
        sim.reset()
        r = timed_run(job_path, sim)
        assert r["exit"] == 0, r["stderr"]
        sent = sim.stats()["requests"]
        assert sent == a.new, f"expected {a.new} requests, the simulator received {sent}"
        print(f"\n{a.new:,} rows appended to {a.rows:,} done: first new request reached the "
              f"simulator after {r['first_request_s']:.2f}s; run finished in {r['wall_s']:.2f}s "
              f"({sent:,} requests), peak RSS {r['max_rss_mb']:.0f} MB")
        after = [timed_run(job_path) for _ in range(2)]
        print(f"the two no-op resumes after that (the run that sent the appended rows "
              f"extended the verified prefix over them): {after[0]['wall_s']:.2f}s, "
              f"{after[1]['wall_s']:.2f}s, peak RSS {after[0]['max_rss_mb']:.0f} MB; "
              f"load: {uptime()}")
    finally:
        sim.stop()
        if a.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
