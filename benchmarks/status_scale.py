"""Status at scale: ``batchgpt status JOB``, ``batchgpt run JOB --dry-run`` and
``batchgpt --version`` on a 1,000,000-row job (issue 13's target: status and --version
≤ 0.5 s), through the installed command, start-up included.

Run: ``python benchmarks/status_scale.py`` (about 3 minutes, 2 of them building the state;
``--rows 200000`` for a quick look, ``--keep`` to keep the files).
Numbers are in docs/performance.md, "Status and dry run (issue 10)".

What it does, in a temp folder under /tmp (removed at the end): writes the input and
builds the completed state exactly as ``benchmarks/resume_scale.py`` does (nothing is
sent), runs the job once (nothing to send: the full scan, which records the verified
prefix), times each command three times (a subprocess under /usr/bin/time: start to exit,
peak RSS), alternating; then appends 1,000 new rows, checks that status and the dry run
count the same rows, and times them again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from resume_scale import build_completed_state, measure, write_input, write_job

NEW_ROWS = 1_000
REPEATS = 3


def counts(cmd: list[str], folder: Path) -> dict[str, Any]:
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=True).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(commands: dict[str, list[str]], folder: Path, title: str) -> None:
    """Each command REPEATS times, interleaved; median and range of the wall time."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for _ in range(REPEATS):
        for name, cmd in commands.items():
            result = measure(cmd, folder)
            assert result["exit"] == 0, result["stderr"]
            runs[name].append(result)
    print(f"\n{title}; {REPEATS} runs each (median, min-max); load {uptime()}\n")
    print("| command | wall s | CPU s | peak RSS MB |")
    print("|---|---|---|---|")
    for name, results in runs.items():
        wall = [r["wall_s"] for r in results]
        rss = [r["max_rss_mb"] for r in results]
        print(f"| `batchgpt {name}` | {statistics.median(wall):.2f} "
              f"({min(wall):.2f}–{max(wall):.2f}) | "
              f"{statistics.median(r['cpu_s'] for r in results):.2f} | "
              f"{statistics.median(rss):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batchgpt-status-"))
    try:
        job = write_job(folder, "http://127.0.0.1:9/v1")  # nothing is sent
        write_input(folder / "input.jsonl", 0, args.rows, seed=1)
        t0 = time.perf_counter()
        build_completed_state(job)
        print(f"built a completed {args.rows:,}-row state in {time.perf_counter() - t0:.0f}s")
        py = sys.executable
        exe = str(Path(py).parent / "batchgpt")  # the installed command (batchgpt.entry)
        first = measure([exe, "run", str(job)], folder)
        assert first["exit"] == 0, first["stderr"]
        print(f"first run on the built state (full scan; records the verified prefix): "
              f"{first['wall_s']:.2f}s, {first['max_rss_mb']:.0f} MB; load {uptime()}")

        commands = {
            "--version": [exe, "--version"],
            "status": [exe, "status", str(job)],
            "run --dry-run": [exe, "run", str(job), "--dry-run"],
            "run (no-op resume)": [exe, "run", str(job)],
        }
        table(commands, folder, f"{args.rows:,} rows, all done")

        write_input(folder / "input.jsonl", args.rows, NEW_ROWS, seed=2)
        status = counts([py, "-m", "batchgpt.cli", "status", str(job), "--json"],
                        folder)["requests"]
        dry = counts([py, "-m", "batchgpt.cli", "run", str(job), "--dry-run", "--json"],
                     folder)["requests"]
        assert status["pending"] == dry["pending"] == NEW_ROWS, (status, dry)
        assert {k: status[k] for k in dry} == dry, (status, dry)
        del commands["--version"], commands["run (no-op resume)"]
        table(commands, folder, f"{args.rows:,} rows done + {NEW_ROWS:,} appended")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
