"""Sharded jobs: ``batchgpt run JOB --shard K/N`` runs the rows whose id hashes to K of N.

N machines (a Kubernetes Indexed Job, N cron lines) each run one part of one job. A row's
part is a BLAKE2b digest of its ``custom_id`` modulo N: the same on every machine, every
Python and every run (Python's ``hash()`` of a str is salted per process, so it would
not do). Each part is a job of its own on disk, with its own output, failures, summary,
state folder and lock, named after the job's output:

=====================================  ===============================================
``out/x.jsonl`` (the job's output)     the merged output (``batchgpt merge JOB``)
``out/x.part-K-of-N.jsonl``            part K's output
``out/x.part-K-of-N.failures.jsonl``   its failures
``out/x.part-K-of-N.summary.json``     its summary
``out/x.part-K-of-N.state/``           its index and lock
=====================================  ===============================================

Every part reads and checks the whole input (a duplicate id across parts is still a
duplicate; a bad line anywhere still stops every part before anything is sent), and plans
and sends only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from batchgpt.config import JobConfig
from batchgpt.errors import StateError
from batchgpt.source import InputFile, ResumeAt, ScannedRow

__all__ = ["Shard", "ShardInput", "check_sharding", "part_counts", "part_job", "part_output",
           "shard_input", "shard_of"]

MAX_SHARDS = 100_000
_SPEC = re.compile(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0 ≤ index < count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/8"`` → Shard(2, 8); a ValueError saying what is expected otherwise."""
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ValueError(f"--shard takes K/N, part K of N counted from 0 (e.g. 0/4), not "
                             f"{text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= count <= MAX_SHARDS:
            raise ValueError(f"--shard {text}: N must be between 1 and {MAX_SHARDS:,}")
        if index >= count:
            raise ValueError(f"--shard {text}: K must be 0 to {count - 1} (parts are counted "
                             f"from 0: {count} parts are 0/{count} to {count - 1}/{count})")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, custom_id: str) -> bool:
        return shard_of(custom_id, self.count) == self.index


def shard_of(custom_id: str, count: int) -> int:
    """The part (0 … count − 1) a row belongs to: stable across runs and machines."""
    digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % count


def part_output(output: Path, shard: Shard) -> Path:
    """``out/x.jsonl`` → ``out/x.part-K-of-N.jsonl`` (the failures, summary and state
    folder follow from it as they do from any output)."""
    stem, suffix = (output.stem, output.suffix) if output.suffix == ".jsonl" else (
        output.name, "")
    return output.with_name(f"{stem}.part-{shard.index}-of-{shard.count}{suffix}")


def part_job(job: JobConfig, shard: Shard | None) -> JobConfig:
    """The job as part ``shard`` runs it: the same job writing to the part's files."""
    if shard is None:
        return job
    return job.model_copy(update={"output": part_output(job.output, shard)})


def part_counts(output: Path) -> set[int]:
    """The N of every part's files (``x.part-K-of-N.*``) next to ``output``."""
    stem = output.stem if output.suffix == ".jsonl" else output.name
    pattern = re.compile(re.escape(stem) + r"\.part-(\d+)-of-(\d+)(?:\.|$)")
    counts: set[int] = set()
    if output.parent.is_dir():
        for entry in output.parent.iterdir():
            match = pattern.match(entry.name)
            if match:
                counts.add(int(match.group(2)))
    return counts


def check_sharding(job: JobConfig, shard: Shard | None) -> None:
    """Refuse a run whose rows another sharding of the job holds the results of: a part
    of N beside parts of M, or beside an unsharded run's output (or a merge of M parts),
    or an unsharded run beside parts. Each has its own index, so it would pay for every
    row again."""
    counts = part_counts(job.output)
    if shard is None:
        if counts:
            shown = " and ".join(str(n) for n in sorted(counts))
            raise StateError(
                f"{job.job_name} is sharded (parts of {shown} next to {job.output}): an "
                "unsharded run would send every row again. Run its parts with --shard K/N "
                "and join them with `batchgpt merge`, or move the parts' files away")
        return
    other = sorted(counts - {shard.count})
    if other:
        raise StateError(
            f"--shard {shard}: the parts of {job.job_name} next to {job.output} are of "
            f"{' and '.join(str(n) for n in other)} shards (files {job.output.stem}.part-K-of-"
            f"{other[0]}.*): a part of {shard.count} would send their rows again. Run "
            f"--shard K/{other[0]}, or move their files away")
    output = Path(job.output)
    has_results = (output.exists() and output.stat().st_size > 0) or (
        job.state_dir / "rows.sqlite").exists()
    if not has_results:
        return
    try:
        merged = json.loads((job.state_dir / "merged.json").read_bytes()).get("parts")
    except (OSError, ValueError, AttributeError):
        merged = None
    if merged != shard.count:
        what = ("the results of an unsharded run" if merged is None
                else f"a merge of {merged} parts")
        raise StateError(
            f"--shard {shard}: {output} holds {what} of {job.job_name}: a part would send "
            "those rows again. Run the job as it was run, or move that output (and "
            f"{job.state_dir}) away")


class ShardInput(InputFile):
    """The input as one part sees it: every line checked, only the part's rows yielded."""

    def __init__(self, job: JobConfig, shard: Shard) -> None:
        super().__init__(job)
        self.shard = shard

    def scan(self, resume: ResumeAt | None = None) -> Iterator[ScannedRow]:
        """Every line checked (from ``resume`` on: a verified prefix is valid, and its rows
        of this part done), only this part's rows yielded."""
        holds = self.shard.holds
        for scanned in super().scan(resume):
            if holds(scanned.custom_id):
                yield scanned


def shard_input(job: JobConfig, shard: Shard | None) -> InputFile:
    """The run's input: all of it, or part ``shard`` of it."""
    return InputFile(job) if shard is None else ShardInput(job, shard)
