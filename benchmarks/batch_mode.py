"""Batch mode against online mode on the same input: the CLI as a user runs it, against
the simulator in another process. Online (the peer): one ``batchgpt run``. Batch: the run
that submits (exit 5) and the run that collects (exit 0; the simulator's batches finish
at the first poll). Wall time, CPU and peak RSS of each, and the job's cost, each batch
figure also as a ratio to online's.

Run: ``python benchmarks/batch_mode.py`` (``--rows 20000`` by default, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resume_scale import SimulatorProcess, timed_run, write_input, write_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    sim = SimulatorProcess()
    try:
        results: dict[str, Any] = {}
        for mode in ("online", "batch"):
            folder = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
            write_input(folder / "input.jsonl", 0, args.rows, seed=1)
            job_path = write_job(folder, sim.base_url)
            job = yaml.safe_load(job_path.read_text())
            job["mode"] = mode
            job_path.write_text(yaml.safe_dump(job, sort_keys=False))
            runs = [timed_run(job_path, sim)]
            if mode == "batch":
                runs.append(timed_run(job_path, sim))
            summary = json.loads((folder / "out" / "resume_scale.summary.json").read_text())
            for i, r in enumerate(runs):
                results[f"  {('submit', 'collect')[i]}"] = {
                    "exits": [r["exit"]], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                    "max_rss_mb": r["max_rss_mb"], "cost_usd": None, "succeeded": None,
                } if mode == "batch" else None
            results = {k: v for k, v in results.items() if v is not None}
            results[mode] = {
                "exits": [r["exit"] for r in runs],
                "wall_s": sum(r["wall_s"] for r in runs),
                "cpu_s": sum(r["cpu_s"] for r in runs),
                "max_rss_mb": max(r["max_rss_mb"] for r in runs),
                "cost_usd": summary["cost_usd"],
                "succeeded": summary["requests"]["succeeded"],
            }
    finally:
        sim.stop()
    print(f"rows: {args.rows:,}; load: {load}; {os.cpu_count()} cores")
    print(f"{'':10} {'exits':>8} {'wall s':>8} {'CPU s':>8} {'RSS MB':>8} {'cost $':>10}"
          f" {'rows':>8}")
    for mode in ("online", "batch", "  submit", "  collect"):
        r = results[mode]
        cost = "" if r["cost_usd"] is None else f"{r['cost_usd']:.5f}"
        rows = "" if r["succeeded"] is None else f"{r['succeeded']:,}"
        print(f"{mode:10} {','.join(map(str, r['exits'])):>8} {r['wall_s']:8.2f} "
              f"{r['cpu_s']:8.2f} {r['max_rss_mb']:8.0f} {cost:>10} {rows:>8}")
    on, b = results["online"], results["batch"]
    print(f"batch / online: wall {b['wall_s'] / on['wall_s']:.2f}x, CPU "
          f"{b['cpu_s'] / on['cpu_s']:.2f}x, RSS {b['max_rss_mb'] / on['max_rss_mb']:.2f}x, "
          f"cost {b['cost_usd'] / on['cost_usd']:.3f}x")


if __name__ == "__main__":
    main()
