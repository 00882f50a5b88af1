"""``batchgpt merge JOB``: the parts of a sharded job, as one output, failures and summary.

Each part (``batchgpt run JOB --shard K/N``) writes its own files (see
:mod:`batchgpt.shard`). Once every part has run to the end, ``merge`` writes the job's own
``out/x.jsonl``, ``out/x.failures.jsonl`` and ``out/x.summary.json``: each id once (a
part's later line for an id wins, as in a part's own output), and the summary's totals
the sums of the parts'.

It refuses, naming them, while parts are **missing** (no summary: never run to the end)
or **incomplete** (their summary has pending rows, rows of the input as it is now are
not done in the part's files, or a run of the part holds its lock now), and when
``out/x.jsonl`` holds an unsharded run's results (an index beside it, and no mark of an
earlier merge): merging over it would drop those results. Each file is
written beside its target and renamed over it, so a failed merge leaves the previous
files as they were. It takes the job's lock (``out/x.state/lock``) meanwhile.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from batchgpt.config import JobConfig
from batchgpt.errors import StateError
from batchgpt.files import nonblank_lines
from batchgpt.pricing import Usage
from batchgpt.shard import Shard, part_job
from batchgpt.store.lock import JobLock, now_iso
from batchgpt.summary import Latency, ModelTotals, Outcome, Requests, RunRequests, Summary, ThisRun

__all__ = ["MergeResult", "find_parts", "merge"]

MARK = "merged.json"  # in the job's state folder: out/x.jsonl is a merge, of this many parts


@dataclass
class MergeResult:
    parts: int
    results: int
    failures: int
    summary: Summary
    duplicates: int = 0  # lines dropped because a later line of the same id was kept
    files: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        return (f"merged {self.parts} parts: {self.results:,} results into {self.files[0]}, "
                f"{self.failures:,} failures into {self.files[1]}, summary in {self.files[2]}")


def find_parts(job: JobConfig) -> int:
    """N, from the parts' files next to the output; StateError when there are none or
    they disagree (parts of 4 beside parts of 8: the job was re-sharded)."""
    output = job.output
    stem = output.stem if output.suffix == ".jsonl" else output.name
    pattern = re.compile(re.escape(stem) + r"\.part-(\d+)-of-(\d+)(?:\.|$)")
    counts = set()
    if output.parent.is_dir():
        for entry in output.parent.iterdir():
            match = pattern.match(entry.name)
            if match:
                counts.add(int(match.group(2)))
    if not counts:
        raise StateError(f"no parts of {job.job_name} next to {output} (files named "
                         f"{stem}.part-K-of-N.*, written by `batchgpt run JOB --shard K/N`)")
    if len(counts) > 1:
        raise StateError(f"the parts of {job.job_name} next to {output} are of "
                         f"{' and '.join(str(n) for n in sorted(counts))} shards: move the "
                         "files of the old sharding away, then merge")
    return counts.pop()


def _check_parts(job: JobConfig, count: int) -> list[Summary]:
    missing: list[str] = []
    incomplete: list[str] = []
    summaries: list[Summary] = []
    for index in range(count):
        shard = Shard(index, count)
        part = part_job(job, shard)
        rerun = f"`batchgpt run {job.where()} --shard {shard}`"
        holder = JobLock.holder(part.state_dir)
        if holder is not None:
            incomplete.append(f"{shard} (running now: {holder})")
            continue
        try:
            summary = Summary.model_validate_json(part.summary_path.read_bytes())
        except FileNotFoundError:
            missing.append(f"{shard} (no {part.summary_path}: {rerun})")
            continue
        except (OSError, ValueError) as exc:
            missing.append(f"{shard} ({part.summary_path} is unreadable: "
                           f"{type(exc).__name__}; {rerun})")
            continue
        if summary.requests.pending:
            incomplete.append(f"{shard} ({summary.requests.pending:,} rows pending: {rerun})")
            continue
        # The summary is of the part's last run: the input may have changed since.
        now = _part_requests(part, shard)
        if now["pending"] or now["total"] != summary.requests.total:
            incomplete.append(f"{shard} (its summary is older than its files or the "
                              f"input: {now['pending']:,} rows pending now: {rerun})")
            continue
        summaries.append(summary)
    if missing or incomplete:
        what = []
        if missing:
            what.append("missing parts: " + "; ".join(missing))
        if incomplete:
            what.append("incomplete parts: " + "; ".join(incomplete))
        raise StateError(f"cannot merge {job.job_name} yet: " + ". ".join(what) +
                         ". Nothing was written")
    return summaries


def _part_requests(part: JobConfig, shard: Shard) -> dict[str, int]:
    """The part's rows by state against the input as it is now (as ``status`` counts)."""
    from batchgpt.plan import make_plan
    from batchgpt.shard import ShardInput
    from batchgpt.store import Store

    store = Store(part)
    store.open_readonly()
    try:
        return make_plan(part, ShardInput(part, shard), store, retry_failed=False, limit=None,
                         refuse_changed=False).requests()
    finally:
        store.close()


def merge(job: JobConfig) -> MergeResult:
    """Merge the job's parts into its output, failures and summary (see the module)."""
    count = find_parts(job)
    job.state_dir.mkdir(parents=True, exist_ok=True)
    lock = JobLock(job.state_dir)
    lock.acquire()
    try:
        summaries = _check_parts(job, count)
        mark = job.state_dir / MARK
        if job.output.exists() and not mark.exists() and (
                job.state_dir / "rows.sqlite").exists():
            raise StateError(f"{job.output} holds the results of an unsharded run of "
                             f"{job.job_name}: move it (and {job.state_dir}) away first; "
                             "nothing was written")
        parts = [part_job(job, Shard(i, count)) for i in range(count)]
        results, dup_r = _merge_lines([p.output for p in parts], job.output)
        failures, dup_f = _merge_lines([p.failures_path for p in parts], job.failures_path)
        summary = _sum(job, summaries, count)
        _write_atomic(job.summary_path, summary.to_json().encode())
        _write_atomic(mark, json.dumps({"parts": count, "merged_at": now_iso()}).encode())
    finally:
        lock.release()
    return MergeResult(count, results, failures, summary, dup_r + dup_f,
                       [job.output, job.failures_path, job.summary_path])


def _merge_lines(sources: list[Path], target: Path) -> tuple[int, int]:
    """Write every line of ``sources`` to ``target``, each ``custom_id`` once (its last
    line wins). Two passes: the first finds each id's last line, the second copies."""
    last: dict[str, tuple[int, int]] = {}
    lines = 0
    for number, path in enumerate(sources):
        for position, custom_id, _ in _lines(path):
            last[custom_id] = (number, position)
            lines += 1
    tmp = target.with_name(f".{target.name}.merge")
    with tmp.open("wb") as out:
        for number, path in enumerate(sources):
            for position, custom_id, raw in _lines(path):
                if last[custom_id] == (number, position):
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    return len(last), lines - len(last)


def _lines(path: Path) -> Iterator[tuple[int, str, bytes]]:
    """(line number, custom_id, raw line) of each line of a part's file (none if absent)."""
    for number, raw in nonblank_lines(path):
        try:
            custom_id = json.loads(raw)["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise StateError(f"{path}:{number}: not a result line; run that part once more "
                             "(it repairs its files), then merge") from None
        yield number, str(custom_id), raw


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.merge")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sum(job: JobConfig, parts: list[Summary], count: int) -> Summary:
    """The job's summary: every count and cost the sum of the parts' (each model's share,
    re-asks, fallbacks and rows by mode too). Latency percentiles
    do not add up: only the largest maximum is kept; rates over different wall times
    neither: left out."""
    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(float(v or 0) for v in values)

    codes: Counter[str] = Counter()
    run_codes: Counter[str] = Counter()
    first: dict[str, str] = {}
    for p in parts:
        codes.update(p.failed_by_code)
        run_codes.update(p.this_run.errors_by_code)
        for code, message in p.this_run.first_error_by_code.items():
            first.setdefault(code, message)
    req = Requests(total=sum(p.requests.total for p in parts),
                   succeeded=sum(p.requests.succeeded for p in parts),
                   failed=sum(p.requests.failed for p in parts),
                   pending=sum(p.requests.pending for p in parts),
                   not_in_input=sum(p.requests.not_in_input for p in parts))
    runs = [p.this_run for p in parts]
    by_model: dict[str, ModelTotals] = {}
    for p in parts:
        for model, share in p.by_model.items():
            had = by_model.get(model)
            by_model[model] = share if had is None else ModelTotals(
                rows=had.rows + share.rows, usage=had.usage + share.usage,
                cost_usd=total([had.cost_usd, share.cost_usd]))

    def counted(values: list[dict[str, int]]) -> dict[str, int]:
        out: Counter[str] = Counter()
        for value in values:
            out.update(value)
        return dict(out)

    maxima = [r.latency_s.max for r in runs if r.latency_s.max is not None]
    this_run = ThisRun(
        requests=RunRequests(sent=sum(r.requests.sent for r in runs),
                             succeeded=sum(r.requests.succeeded for r in runs),
                             failed=sum(r.requests.failed for r in runs),
                             retries=sum(r.requests.retries for r in runs),
                             rate_limited=sum(r.requests.rate_limited for r in runs)),
        usage=sum((r.usage for r in runs), Usage()),
        cost_usd=total([r.cost_usd for r in runs]),
        wall_time_s=max((r.wall_time_s for r in runs), default=0.0),
        latency_s=Latency(max=max(maxima) if maxima else None),
        errors_by_code=dict(run_codes), first_error_by_code=first,
        achieved_rpm=None, achieved_tpm=None,
        reasks_by_reason=counted([r.reasks_by_reason for r in runs]),
        fallbacks_by_model=counted([r.fallbacks_by_model for r in runs]))
    outcome = (Outcome.RETRYABLE_ROWS if any(p.outcome is Outcome.RETRYABLE_ROWS for p in parts)
               else Outcome.FAILED_ROWS if req.failed else Outcome.COMPLETED)
    return Summary(
        job=job.job_name, outcome=outcome, stopped=None,
        message=f"merged from {count} parts", started_at=min(p.started_at for p in parts),
        finished_at=max(p.finished_at for p in parts),
        wall_time_s=max(p.wall_time_s for p in parts), requests=req,
        failed_by_code=dict(codes), usage=sum((p.usage for p in parts), Usage()),
        cost_usd=total([p.cost_usd for p in parts]),
        cost_unknown_models=sorted({m for p in parts for m in p.cost_unknown_models}),
        cost_unrecorded_usd=sum(p.cost_unrecorded_usd for p in parts), by_model=by_model,
        rows_by_mode=counted([p.rows_by_mode for p in parts]),
        this_run=this_run, output=str(job.output), failures=str(job.failures_path))
