"""The job's durable state: the output (the record), its index, the failures file, the
lock. Next to ``output: out/summarize.jsonl``::

    out/summarize.jsonl              results, Batch API output lines — the durable record
    out/summarize.failures.jsonl     rows that failed, rewritten from the index at each run's end
    out/summarize.summary.json       the last run's summary
    out/summarize.state/rows.sqlite  the index (rebuildable from the output)
    out/summarize.state/lock         held (flock) by the running process

The parts, each in its own module: :mod:`.output_log` (append, fsync, verify, set aside,
compact), :mod:`.index` (SQLite), :mod:`.recover` (bring the index in line with the
output on open), :mod:`.writer` (group commit), :mod:`.lock`. :class:`Store` puts them
together in the order a run needs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from batchgpt.config import JobConfig
from batchgpt.errors import StateError
from batchgpt.files import file_kind, probe_writable
from batchgpt.pricing import price_usage
from batchgpt.store.index import (
    Index,
    Settled,
    StoredFailure,
    StoredResult,
    StoredRow,
    Totals,
    closed_cleanly,
    discard,
    forget_clean_close,
    open_or_none,
    record_clean_close,
)
from batchgpt.store.lock import JobLock, now_iso
from batchgpt.store.output_log import OutputChanged, OutputLog, encode_line, fsync_dir, stamp
from batchgpt.store.recover import Report, recover, trusted
from batchgpt.store.writer import GroupWriter

log = logging.getLogger("batchgpt")

ADOPT_IN_MEMORY = 100_000  # taken-over ids held as a set while planning (~10 MB at most)

__all__ = [
    "GroupWriter", "JobLock", "Settled", "Store", "StoredFailure", "StoredResult", "StoredRow",
    "Totals", "encode_line", "now_iso",
]


class Store:
    """Output, index, failures file and lock of one job, for one run (or one look)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        # Through a symlinked output to the file it names: appends follow the link anyway,
        # and a compaction must replace that file, not the link.
        self.out = OutputLog(Path(os.path.realpath(job.output)))
        self.failures_path = job.failures_path
        self.state_dir = job.state_dir
        self.db_path = self.state_dir / "rows.sqlite"
        self._index: Index | None = None
        self._lock = JobLock(self.state_dir)
        self.recovery = Report()
        self.dry = False
        self.writer: GroupWriter | None = None
        self.run_id: int | None = None

    @property
    def index(self) -> Index:
        if self._index is None:
            raise StateError("the job's state is not open")
        return self._index

    # -- opening ------------------------------------------------------------------------
    def open(self) -> None:
        """Lock the job, bring the index in line with the output (taking over results
        it missed, setting aside torn fragments, compacting), and check every file can
        be written — before anything is planned or sent."""
        check_paths(self.job)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.out.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {exc.filename}: {exc.strerror}") from None
        self._lock.acquire()
        try:
            index, why = open_or_none(self.db_path, verify=not closed_cleanly(self.db_path))
            forget_clean_close(self.db_path)
            if index is None:
                if why != "missing":
                    aside = discard(self.db_path)
                    log.warning("%s is %s; moved it to %s and rebuilding the index from %s",
                                self.db_path, why, aside, self.out.path)
                index = Index.open(self.db_path, verify=False)
            self._index = index
            self._check_owner(write=True)
            self.recovery = recover(self.out, index, self.failures_path, dry=False,
                                    index_was_lost=why is not None, bill_as=self._bill_as)
            for message in self.recovery.messages(self.out.path, dry=False):
                log.warning("%s", message)
            self._account_unseen_spend(index_was_lost=why is not None)
            if self._compaction_due():
                self._compact()  # (with spares, after the plan has picked among them)
            self._check_writable()
        except OSError as exc:
            self.close()
            raise StateError(f"cannot open the job's state: {exc.filename or ''} "
                             f"{exc.strerror}".strip()) from None
        except BaseException:
            self.close()
            raise

    def open_readonly(self) -> None:
        """For status and dry runs: no lock, no repair, no write of any file — safe beside
        a run. When the output needs recovering, it is done on an in-memory copy of the
        index, so the figures are those a real run would start from."""
        check_paths(self.job)
        self.dry = True
        index: Index | None = None
        lost = False
        if self.db_path.exists():
            try:
                index = Index.open_readonly(self.db_path,
                                            verify=not closed_cleanly(self.db_path))
            except Exception as exc:  # sqlite3 errors, a damaged or foreign file
                log.warning("%s is unreadable (%s); a run would rebuild it from %s",
                            self.db_path, exc, self.out.path)
                index, lost = None, True
        if index is None:
            index, lost = Index.in_memory(), True
        self._index = index
        self._check_owner(write=False)
        if lost and not self.out.exists() and not self.failures_path.exists():
            return
        if not lost and trusted(self.out.fingerprint(), index) and not index.unadopted_count():
            return
        if index.path is not None:  # the plan will record, in a copy, what it adopts
            index = index.copy_to_memory()
            self._index = index
        self.recovery = recover(self.out, index, self.failures_path, dry=True,
                                index_was_lost=lost, bill_as=self._bill_as)

    def _account_unseen_spend(self, *, index_was_lost: bool) -> None:
        """Spend the index's results do not show, kept apart for the cap: the in-flight
        allowance a killed run left on record (its requests on the wire may have been
        billed), and — when the index was lost — what the last summary says the job had
        paid beyond what the output's results account for (results replaced earlier)."""
        index = self.index
        unseen = index.meta_float("unseen_usd")
        allowance = index.meta_float("inflight_allowance_usd")
        if allowance:
            log.warning("the last run of %s ended with requests in flight (killed?): up to "
                        "$%.6f of them may have been billed; counted against "
                        "limits.max_cost_usd", self.job.job_name, allowance)
            unseen += allowance
        if index_was_lost:
            before = _summary_spend(self.job)
            now = price_usage(index.totals().spend_by_model, self.job.pricing,
                              known_only=True)[0] or 0.0  # never None with known_only
            if before is not None and before > now + 1e-9:
                log.warning("the index of %s was rebuilt from the output; the last summary "
                            "says $%.6f more was paid (results replaced before): counted "
                            "against limits.max_cost_usd", self.job.job_name, before - now)
                unseen += before - now
        if unseen != index.meta_float("unseen_usd") or allowance:
            index.set_meta(unseen_usd=repr(unseen), inflight_allowance_usd=None)

    def _bill_as(self, served: str | None) -> str | None:
        """A taken-over line is priced as a run prices its reply: a server alias with no
        price as the job's model (the line keeps what the server said)."""
        from batchgpt.budget import billed_model

        model = self.job.model
        return served if served is None or model is None else billed_model(
            served, model, self.job.pricing)

    def _check_owner(self, *, write: bool) -> None:
        """One output, one job: a second job writing the same output would treat the
        first one's rows as its own changed rows, send them again and compact the other's
        paid results away. A job is its name and, when loaded from a file, that file."""
        owner = self.index.meta("job")
        owner_file = self.index.meta("job_file")
        name, source = self.job.job_name, self.job.source
        other = owner is not None and owner != name
        if not other and owner_file is not None and source is not None:
            other = owner_file != str(source)
        if other:
            what = f"job '{owner}'" + (f" ({owner_file})" if owner_file else "")
            raise StateError(
                f"{self.out.path} holds the results of {what}, and this is job '{name}'"
                + (f" ({source})" if source else "") + ": two jobs must not share an "
                "output. Give this job its own `output:`. If it is the same job, renamed or "
                f"moved, remove {self.state_dir} (an index, rebuilt from the output: "
                "nothing is lost or sent again)"
            )
        if write:
            if owner is None:
                self.index.set_meta(job=name)
            if owner_file is None and source is not None:
                self.index.set_meta(job_file=str(source))

    def _check_writable(self) -> None:
        """Fail before anything is sent when results could not be written: a paid answer
        that can't be stored is lost. Opens an existing output for appending (and closes
        it), and creates and removes a file in its folder, where the failures and summary
        files are swapped in."""
        try:
            if self.out.exists():
                os.close(os.open(self.out.path, os.O_WRONLY | os.O_APPEND))
            probe_writable(self.out.path.parent, self.out.path.name)
        except OSError as exc:
            raise StateError(
                f"cannot write {exc.filename or self.out.path}: {exc.strerror}; nothing was "
                "sent, and results written so far are safe"
            ) from None

    def close(self) -> None:
        self.out.close()
        if self._index is not None:
            self._index.close()
            if not self.dry and self._index.path is not None:
                record_clean_close(self._index.path)
            self._index = None
        self._lock.release()

    # -- planning -------------------------------------------------------------------------
    def unsettled(self, rows: Sequence[tuple[str, str]]) -> dict[str, Settled]:
        return self.index.unsettled(rows)

    def has_unadopted(self) -> bool:
        """Whether results were taken over without a request hash. A few (the tail after a
        kill) are held as a set, so the plan filters its batches in memory; after a full
        rebuild, the plan asks the index batch by batch, once."""
        n = self.index.unadopted_count()
        self._unadopted = self.index.all_unadopted() if 0 < n <= ADOPT_IN_MEMORY else None
        return n > 0

    _unadopted: set[str] | None = None

    def adopt(self, rows: Sequence[tuple[str, str]]) -> None:
        """Results and failures taken over among ``rows`` meet these rows' requests (see
        ``Index.adopt``)."""
        if self._unadopted is not None:
            rows = [(cid, h) for cid, h in rows if cid in self._unadopted]
        if rows:
            self.index.adopt(rows)

    # -- --fresh --------------------------------------------------------------------------
    def previous_files(self) -> list[tuple[Path, Path]]:
        """(file, where --fresh would move it) for the output, failures and summary."""
        stem = self.job.output_stem
        files = [p for p in (Path(self.job.output), self.failures_path, self.job.summary_path)
                 if os.path.lexists(p)]
        ts, n = stamp(), 1
        while True:  # a name no earlier --fresh used (two in one second, say)
            tag = ts if n == 1 else f"{ts}.{n}"
            out = [(p, p.with_name(f"{stem.name}.previous-{tag}{p.name[len(stem.name):]}"))
                   for p in files]
            if not any(os.path.lexists(dst) for _, dst in out):
                return out
            n += 1

    def set_aside_previous(self) -> list[tuple[Path, Path]]:
        """--fresh: move the previous output, failures and summary aside (never delete a
        paid result) and empty the index."""
        moved = self.previous_files()
        self.out.close()
        for src, dst in moved:
            os.replace(src, dst)
        fsync_dir(self.out.path.parent)
        self.index.forget_all()
        self.out.start(0, 0)
        return moved

    # -- runs -----------------------------------------------------------------------------
    def start_run(self) -> int:
        self.run_id = self.index.start_run(now_iso())
        return self.run_id

    def finish_run(self, outcome: str, summary_json: str) -> None:
        if self.run_id is not None:
            self.index.finish_run(self.run_id, now_iso(), outcome, summary_json)

    def start_writer(self) -> GroupWriter:
        self.writer = GroupWriter(self.out, self.index, self.run_id)
        self.writer.start()
        return self.writer

    async def stop_writer(self) -> None:
        if self.writer is not None:
            await self.writer.stop()

    # -- finishing ----------------------------------------------------------------------
    def finalize(self) -> None:
        """After a run: drop superseded lines from the output (only when it is exactly
        what the index says), rewrite the failures file. Problems are logged, never
        raised: the results are safe in the output whatever happens here."""
        healthy = self.writer is None or self.writer.healthy
        if healthy and self._compaction_due():
            fp = self.out.fingerprint()
            if fp is not None and fp.size == self.out.size:
                self._compact()
        try:
            self._write_failures()
        except OSError as exc:
            log.warning("cannot write %s: %s", self.failures_path, exc.strerror)

    def _compaction_due(self) -> bool:
        """The output holds superseded lines, and no spare results wait to be picked
        among (with spares, the plan picks first)."""
        index = self.index
        return bool(index.meta_int("dead_lines")) and not index.spare_count()

    def _compact(self) -> None:
        """Rewrite the output with only the live line of each result: write the new file
        and fsync it; commit its offsets with a marker; rename it over the output; clear
        the marker. A kill at any step is finished or undone by the next open."""
        index = self.index
        try:
            moved, size, crc = self.out.write_compacted(index.live_ranges())
        except OutputChanged as exc:
            log.warning("not compacting: %s; the next run checks the whole output", exc)
            index.set_meta(fingerprint=None, output_crc=None)
            return
        except OSError as exc:  # a full disk: the compaction needs a second copy
            log.warning("not compacting %s (%s: %s): it keeps %d superseded lines, and the "
                        "next run tries again; every result is safe", self.out.path,
                        exc.filename or self.out.compact_path, exc.strerror,
                        index.meta_int("dead_lines"))
            return
        index.move_offsets(moved, output_size=size, output_crc=crc, dead_lines=0,
                           compacting=1, fingerprint=None)
        fp = self.out.swap_in_compacted()
        index.set_meta(compacting=None, fingerprint=fp.dumps())
        self.out.start(size, crc)

    def _write_failures(self) -> None:
        path = self.failures_path
        tmp = path.with_name(path.name + ".tmp")
        count = 0
        with tmp.open("wb") as fh:
            for line in self.index.failure_lines():
                fh.write(line)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        if count:
            os.replace(tmp, path)
        else:
            tmp.unlink()
            path.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------
    def totals(self) -> Totals:
        return self.index.totals()

    def failure_codes(self) -> dict[str, int]:
        return self.index.failure_codes()

    def lookup(self, ids: Sequence[str]) -> dict[str, StoredRow]:
        """What is stored for each of ``ids`` (export, show): results and failures, read
        in batches; ids with neither are left out."""
        return self.index.lookup(ids)


def _summary_spend(job: JobConfig) -> float | None:
    """What the job's last summary says it had paid (results, and spend no result
    records), or None when there is no readable summary of this job."""
    try:
        data = json.loads(job.summary_path.read_bytes()[:10_000_000])
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("job") != job.job_name:
        return None
    total = 0.0
    for key in ("cost_usd", "cost_unrecorded_usd"):
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and (
                0 <= value < 1e12):
            total += float(value)
    return total


def check_paths(job: JobConfig) -> None:
    """Refuse, before anything runs, an output that would destroy the input or the
    job's own state, and files that are not regular files (a FIFO would block)."""
    output = Path(os.path.realpath(job.output))
    inp = Path(os.path.realpath(job.input))
    state = Path(os.path.realpath(job.state_dir))
    if output == inp or _same_file(job.output, job.input):
        raise StateError(f"output {job.output} is the input file: writing results there "
                         "would destroy the input. Choose another `output:`")
    for own in (job.failures_path, job.summary_path):
        if Path(os.path.realpath(own)) == inp:
            raise StateError(f"input {job.input} is this job's own {own.name}, which every "
                             "run rewrites: copy it to another file first")
    if state == inp or state in inp.parents:
        raise StateError(f"input {job.input} is inside this job's state folder {job.state_dir}")
    for parent in output.parents:
        if parent.name.endswith(".state"):
            raise StateError(f"output {job.output} is inside a state folder ({parent}), "
                             "which batchgpt manages: choose an output outside it")
    for path in (job.output, job.failures_path, job.summary_path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"cannot use {path}: {exc.strerror}") from None
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise StateError(f"{path} exists and is {kind}, not a regular file")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

