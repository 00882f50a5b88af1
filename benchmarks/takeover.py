"""Taking over a 1,000,000-line output: how long ``batchgpt run JOB`` takes, and how much
memory, to rebuild its index from the output when the state folder is lost, to take over
the tail the index missed after a kill, and to re-verify an output whose timestamps
changed — each through the CLI as a user runs it, start-up included, against a simulator
in another process that must receive nothing.

Run: ``python benchmarks/takeover.py`` (about 5 minutes, 2 of them building the state;
``--rows 200000`` for a quick look). Numbers are in docs/performance.md, "Taking over
the output (issue 8)".

The floor, measured in the same run: a bare Python loop that reads the same output and
``json.loads`` every line (what any rebuild written in Python must at least do), and
``zlib.crc32`` over the file (what the verification of an untouched prefix must at least
do). Each batchgpt figure is also given as a ratio to its floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resume_scale import (
    SimulatorProcess,
    build_completed_state,
    timed_run,
    write_input,
    write_job,
)

TAIL = 1_000


def floor_parse(path: Path) -> dict[str, Any]:
    """Read every line and json.loads it, in a fresh process (its start-up included)."""
    code = ("import json,sys\n"
            "n=0\n"
            "with open(sys.argv[1],'rb') as f:\n"
            "    for line in f:\n"
            "        json.loads(line); n+=1\n")
    return _timed([sys.executable, "-c", code, str(path)])


def floor_crc(path: Path) -> dict[str, Any]:
    code = ("import zlib,sys\n"
            "c=0\n"
            "with open(sys.argv[1],'rb') as f:\n"
            "    while (b := f.read(1 << 20)):\n"
            "        c = zlib.crc32(b, c)\n")
    return _timed([sys.executable, "-c", code, str(path)])


def _timed(cmd: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return {"wall_s": time.perf_counter() - t0}


def drop_tail_from_index(out: Path, db_path: Path, n: int) -> None:
    """The state a kill between an append and its commit leaves, n lines deep: the index
    behind the output by its last n results."""
    data = out.read_bytes()
    cut = len(data)
    for _ in range(n):
        cut = data.rindex(b"\n", 0, cut - 1) + 1
    ids = [json.loads(line)["custom_id"] for line in data[cut:].splitlines()]
    db = sqlite3.connect(db_path)
    with db:
        db.executemany("DELETE FROM results WHERE custom_id = ?", [(i,) for i in ids])
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_size'", (str(cut),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'output_crc'",
                   (str(zlib.crc32(data[:cut])),))
        db.execute("DELETE FROM meta WHERE key = 'fingerprint'")
    db.close()
    (db_path.parent / "rows.sqlite.closed").unlink(missing_ok=True)


def row(name: str, r: dict[str, Any], base: dict[str, Any] | None,
        floor: dict[str, Any] | None, note: str) -> str:
    """The run's wall time; what it took beyond the trusted no-op resume (start-up, plan,
    report: the same in every case); and that extra as a multiple of its floor."""
    extra = r["wall_s"] - base["wall_s"] if base else None
    extra_s = f"{extra:>+7.2f}s" if extra is not None else " " * 8
    ratio = f"{extra / floor['wall_s']:>6.1f}x" if floor and extra is not None else " " * 7
    return (f"{name:<44} {r['wall_s']:>7.2f}s {extra_s} {ratio} {r['cpu_s']:>7.2f}s "
            f"{r['max_rss_mb']:>6.0f} MB  {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    a = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="batchgpt-takeover-", dir="/tmp"))
    sim = SimulatorProcess()
    try:
        job_path = write_job(folder, sim.base_url)
        write_input(folder / "input.jsonl", 0, a.rows, a.seed)
        t = time.perf_counter()
        n = build_completed_state(job_path)
        out = folder / "out" / "resume_scale.jsonl"
        state = folder / "out" / "resume_scale.state"
        db = state / "rows.sqlite"
        size_mb = out.stat().st_size / 1e6
        print(f"state: {n:,} rows done, output {size_mb:.0f} MB "
              f"({time.perf_counter() - t:.1f}s to build); load {os.getloadavg()[0]:.2f}")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
        print(f"commit {commit}, {os.cpu_count()} cores\n")

        results: dict[str, list[dict[str, Any]]] = {}

        def run(name: str, prepare: Any, expect: str) -> None:
            for _ in range(a.repeat):
                prepare()
                r = timed_run(job_path)
                assert r["exit"] == 0, r["stderr"]
                assert expect in r["stderr"], r["stderr"][-2000:]
                results.setdefault(name, []).append(r)
            sent = sim.stats()["requests"]
            assert sent == 0, f"{name}: the simulator received {sent} requests"

        def nothing() -> None:
            pass

        def lose_state() -> None:
            shutil.rmtree(state, ignore_errors=True)

        def kill_tail() -> None:
            drop_tail_from_index(out, db, TAIL)

        def touch() -> None:
            os.utime(out)

        run("trusted (untouched output)", nothing, "nothing to do")
        run("state folder lost: full rebuild", lose_state, f"took over {n} results")
        run(f"index behind by {TAIL:,} lines: tail taken over", kill_tail,
            f"took over {TAIL} results")
        run("output touched: prefix re-verified by CRC", touch, "nothing to do")
        parse = [floor_parse(out) for _ in range(a.repeat)]
        crc = [floor_crc(out) for _ in range(a.repeat)]

        def med(rs: list[dict[str, Any]]) -> dict[str, Any]:
            return {k: statistics.median(r[k] for r in rs)
                    for k in ("wall_s", "cpu_s", "max_rss_mb") if k in rs[0]}

        fp = {"wall_s": statistics.median(r["wall_s"] for r in parse)}
        fc = {"wall_s": statistics.median(r["wall_s"] for r in crc)}
        print(f"== takeover of a {n:,}-line output ({size_mb:.0f} MB), through the CLI, "
              f"medians of {a.repeat} ==")
        print(f"{'case':<44} {'wall':>8} {'extra':>8} {'/floor':>7} {'CPU':>8} "
              f"{'peak RSS':>9}")
        base = med(results["trusted (untouched output)"])
        print(row("trusted (untouched output)", base, None, None, "no read of the output"))
        print(row("state folder lost: full rebuild",
                  med(results["state folder lost: full rebuild"]), base, fp,
                  "floor: read + json.loads every line"))
        key = f"index behind by {TAIL:,} lines: tail taken over"
        print(row(key, med(results[key]), base, fc, "floor: crc32 of the file"))
        print(row("output touched: prefix re-verified by CRC",
                  med(results["output touched: prefix re-verified by CRC"]), base, fc,
                  "floor: crc32 of the file"))
        print("extra = wall minus the trusted case's (start-up, plan and report are the same "
              "in every case); /floor = extra ÷ floor")
        print(f"{'floor: read + json.loads every line':<44} {fp['wall_s']:>7.2f}s")
        print(f"{'floor: crc32 of the file':<44} {fc['wall_s']:>7.2f}s")
        print("requests received by the simulator: 0 in every case")
    finally:
        sim.stop()
        if a.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
