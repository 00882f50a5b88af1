"""Exporting a 1,000,000-row job: how long ``batchgpt export JOB --format csv -o out.csv``
(and ``--format jsonl``) takes, and how much memory, through the CLI as a user runs it
(start-up included), against a floor measured in the same run; and whether its memory
stays flat (the same export of 100,000 rows, compared).

Run: ``python benchmarks/export_scale.py`` (about 4 minutes, 1 of them building the
state; ``--rows 200000 --small 20000`` for a quick look, ``--keep`` to keep the files).

What it does, in temp folders under /tmp (removed at the end):

1. writes a template-form input (``{"id", "text"}``, ~200-char texts) and builds the
   COMPLETED state for it with batchgpt's own Store (``resume_scale.build_completed_state``:
   output lines and index as a run writes them, the simulator's reply for each row;
   nothing is sent, no server is needed: an export never touches the network);
2. times ``batchgpt export`` to CSV and to JSONL as subprocesses under /usr/bin/time
   (wall time measured here, peak RSS from ``time``), ``--repeat`` times each, and checks
   every input row is in the file;
3. the floor, in a fresh process each (start-up included): a bare Python loop that reads
   the input and the output side by side (the output is in input order here, so no index
   is needed), ``json.loads`` each line of both, and writes the same columns with the
   stdlib ``csv`` (or one ``json.dumps`` per row): what any export in Python must at least
   do. And the cost of the rule batchgpt did *not* take for CSV columns: a first pass over
   the input collecting the union of every record's keys;
4. prints each figure and its ratio to the floor; then the same for ``--small`` rows and
   the peak RSS of both sizes side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resume_scale import build_completed_state, measure, write_input, write_job

# The floor: the same CSV columns, from the input and the output read side by side.
FLOOR_CSV = r"""
import csv, json, sys
inp, out, dest, rate_in, rate_out = sys.argv[1:6]
rate_in, rate_out = float(rate_in) / 1e6, float(rate_out) / 1e6
with open(inp, "rb") as fi, open(out, "rb") as fo, open(dest, "w", newline="") as fh:
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(["id", "text", "content", "status", "stale", "error_code", "error_message",
                "model", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"])
    for a, b in zip(fi, fo):
        rec = json.loads(a)
        body = json.loads(b)["response"]["body"]
        u = body["usage"]
        p, c = u["prompt_tokens"], u["completion_tokens"]
        w.writerow([rec["id"], rec["text"], body["choices"][0]["message"]["content"],
                    "succeeded", "false", "", "", body["model"], p, c, p + c,
                    p * rate_in + c * rate_out])
"""

FLOOR_JSONL = r"""
import json, sys
inp, out, dest, rate_in, rate_out = sys.argv[1:6]
rate_in, rate_out = float(rate_in) / 1e6, float(rate_out) / 1e6
with open(inp, "rb") as fi, open(out, "rb") as fo, open(dest, "w") as fh:
    for a, b in zip(fi, fo):
        rec = json.loads(a)
        body = json.loads(b)["response"]["body"]
        u = body["usage"]
        p, c = u["prompt_tokens"], u["completion_tokens"]
        rec.update(content=body["choices"][0]["message"]["content"], status="succeeded",
                   stale=False, error_code=None, error_message=None, model=body["model"],
                   prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                   cost_usd=p * rate_in + c * rate_out)
        fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
"""

UNION_PASS = r"""
import json, sys
keys = {}
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        for k in json.loads(line):
            keys[k] = None
"""


def count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 20), b""))


def build(rows: int, seed: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="batchgpt-export-", dir="/tmp"))
    job_path = write_job(folder, "http://127.0.0.1:9/v1")  # never contacted
    t = time.perf_counter()
    write_input(folder / "input.jsonl", 0, rows, seed)
    n = build_completed_state(job_path)
    out = folder / "out" / "resume_scale.jsonl"
    print(f"{n:,} rows: input {(folder / 'input.jsonl').stat().st_size / 1e6:.0f} MB, output "
          f"{out.stat().st_size / 1e6:.0f} MB, built in {time.perf_counter() - t:.0f}s")
    return job_path


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"wall_s": min(r["wall_s"] for r in runs),
            "median_s": statistics.median(r["wall_s"] for r in runs),
            "max_rss_mb": max(r["max_rss_mb"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs)}


def bench(job_path: Path, rows: int, repeat: int) -> dict[str, dict[str, Any]]:
    from batchgpt.pricing import resolve_price

    folder = job_path.parent
    price = resolve_price("gpt-4o-mini")
    assert price is not None
    rates = [str(price.input), str(price.output)]
    inp, out = folder / "input.jsonl", folder / "out" / "resume_scale.jsonl"
    found: dict[str, dict[str, Any]] = {}
    for fmt in ("csv", "jsonl"):
        dest = folder / f"export.{fmt}"
        runs = []
        for _ in range(repeat):
            r = measure([sys.executable, "-m", "batchgpt.cli", "export", str(job_path),
                         "--format", fmt, "-o", str(dest)], folder)
            assert r["exit"] == 0, r["stderr"]
            assert f"exported {rows:,} rows" in r["stderr"], r["stderr"]
            runs.append(r)
        assert count_lines(dest) == rows + (fmt == "csv")
        found[f"batchgpt export --format {fmt}"] = best(runs)
        dest.unlink()
        floor_dest = folder / f"floor.{fmt}"
        code = FLOOR_CSV if fmt == "csv" else FLOOR_JSONL
        floors = [measure([sys.executable, "-c", code, str(inp), str(out), str(floor_dest),
                           *rates], folder) for _ in range(repeat)]
        assert count_lines(floor_dest) == rows + (fmt == "csv")
        floor_dest.unlink()
        found[f"floor, {fmt}"] = best(floors)
    union = [measure([sys.executable, "-c", UNION_PASS, str(inp)], folder)
             for _ in range(repeat)]
    found["first pass: union of input keys"] = best(union)
    found["start-up: batchgpt export --help"] = best(
        [measure([sys.executable, "-m", "batchgpt.cli", "export", "--help"], folder)])
    return found


def report(rows: int, found: dict[str, dict[str, Any]]) -> None:
    print(f"\n{rows:>9,} rows                      wall: best / median     CPU  peak RSS  "
          "vs floor")
    floors = {fmt: found[f"floor, {fmt}"]
              for fmt in ("csv", "jsonl")}
    for name, r in found.items():
        ratio = ""
        for fmt, floor in floors.items():
            if name == f"batchgpt export --format {fmt}":
                ratio = f"{r['wall_s'] / floor['wall_s']:.1f}x"
        print(f"  {name:<34} {r['wall_s']:>7.2f}s / {r['median_s']:>6.2f}s {r['cpu_s']:>7.2f}s "
              f"{r['max_rss_mb']:>6.0f} MB  {ratio:>6}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100_000,
                   help="the smaller job, to compare peak RSS with (flat memory)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temp folders")
    a = p.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    folders = []
    try:
        results = {}
        for rows in (a.small, a.rows):
            job_path = build(rows, a.seed)
            folders.append(job_path.parent)
            results[rows] = bench(job_path, rows, a.repeat)
            report(rows, results[rows])
        print("\nflat memory: peak RSS of the same export at "
              f"{a.small:,} and {a.rows:,} rows")
        for fmt in ("csv", "jsonl"):
            small, large = (results[n][f"batchgpt export --format {fmt}"]["max_rss_mb"]
                            for n in (a.small, a.rows))
            print(f"  --format {fmt:<6} {small:>5.0f} MB → {large:>5.0f} MB "
                  f"({large - small:+.0f} MB for {a.rows // a.small}x the rows)")
        print(f"load at the end: {os.getloadavg()[0]:.2f}")
    finally:
        for folder in folders:
            if a.keep:
                print(f"kept {folder}")
            else:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
