"""Memory of a whole run: is batchgpt's RSS flat in the number of rows?

Run: ``python benchmarks/run_memory.py`` (a few minutes; ``--sizes 20000 80000`` for a
quick look). Numbers are in docs/performance.md, "Scale (issue 4)".

For each size (default 50,000 and 200,000 rows; template-form input, ~200-char texts) it
starts a fresh zero-latency simulator as a separate process (``python -m
batchgpt.simulator --port 0 --no-record``: no limits, bodies not kept), runs ``batchgpt run
JOB`` as a subprocess under ``/usr/bin/time`` and reports peak RSS, wall time and rows/s,
plus RSS samples (``/proc/PID/status``) at each quarter of the output, which show whether
memory grows as rows are done. Everything lives in a temp folder under /tmp, removed at
the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume_scale import SimulatorProcess, write_input

CONCURRENCY = 64


def write_job(folder: Path, base_url: str) -> Path:
    job = {
        "name": "run_memory",
        "input": "input.jsonl",
        "output": "out/run_memory.jsonl",
        "model": "gpt-4o-mini",
        "prompt": "Summarize in one sentence:\n\n{text}",
        "params": {"max_tokens": 60, "temperature": 0.2},
        "limits": {"concurrency": CONCURRENCY},
        "timeout_s": 30,
        "api": {"base_url": base_url},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def child_of(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def line_count(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def one_size(rows: int, seed: int) -> dict[str, float | list[tuple[int, float]]]:
    folder = Path(tempfile.mkdtemp(prefix="batchgpt-mem-", dir="/tmp"))
    sim = SimulatorProcess()
    try:
        job_path = write_job(folder, sim.base_url)
        write_input(folder / "input.jsonl", 0, rows, seed)
        out = folder / "out" / "run_memory.jsonl"
        time_path, err_path = folder / "time.txt", folder / "stderr.txt"
        timer = shutil.which("time") or "/usr/bin/time"
        env_cmd = [timer, "-o", str(time_path), "-f", "%M %U %S", sys.executable, "-m",
                   "batchgpt.cli", "run", str(job_path)]
        env = dict(os.environ, OPENAI_API_KEY="sk-bench")
        env.pop("OPENAI_BASE_URL", None)
        samples: list[tuple[int, float]] = []
        marks = [rows * q // 4 for q in (1, 2, 3)]
        with err_path.open("wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(env_cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        pid = None
        while proc.poll() is None:
            pid = pid or child_of(proc.pid)
            if pid is not None and marks:
                done = line_count(out)
                if done >= marks[0]:
                    mem = rss_mb(pid)
                    if mem is not None:
                        samples.append((done, mem))
                    marks.pop(0)
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        code = proc.returncode
        if code != 0:
            sys.exit(f"batchgpt exited {code}:\n{err_path.read_text()[-3000:]}")
        fields = time_path.read_text().split()[-3:]
        sent = sim.stats()["requests"]
        assert sent == rows, f"expected {rows} requests, the simulator received {sent}"
        assert line_count(out) == rows
        return {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall,
                "max_rss_mb": int(fields[0]) / 1024,
                "cpu_s": float(fields[1]) + float(fields[2]), "samples": samples}
    finally:
        sim.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    results = [one_size(n, a.seed) for n in a.sizes]
    print(f"{'rows':>9} {'peak RSS':>9} {'wall':>8} {'rows/s':>8} {'CPU':>8}   RSS during the run")
    for r in results:
        during = ", ".join(f"{mem:.0f} MB at {done:,}" for done, mem in r["samples"])  # type: ignore[union-attr]
        print(f"{r['rows']:>9,} {r['max_rss_mb']:>6.0f} MB {r['wall_s']:>7.1f}s "
              f"{r['rows_per_s']:>8,.0f} {r['cpu_s']:>7.1f}s   {during}")
    if len(results) > 1:
        small, big = results[0], results[-1]
        growth = big["max_rss_mb"] - small["max_rss_mb"]  # type: ignore[operator]
        extra = big["rows"] - small["rows"]  # type: ignore[operator]
        print(f"\npeak RSS grew {growth:+.1f} MB for {extra:,} more rows "
              f"({growth * 1024 * 1024 / extra:+.1f} bytes a row)")


if __name__ == "__main__":
    main()
