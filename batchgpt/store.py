"""The checkpoint: which row has which result, kept so that a killed run loses nothing
and a rerun pays for nothing twice.

Layout, next to the output file ``out/summarize.jsonl``::

    out/summarize.jsonl            results, Batch API output lines, appended as they come
    out/summarize.failures.jsonl   rows that failed, rewritten from the state at each run's end
    out/summarize.summary.json     the last run's summary
    out/summarize.state/rows.sqlite  one row per custom_id: request hash, status, where its
                                     output line is, usage — the index of what is done
    out/summarize.state/lock       held (flock) by the running process

Why this shape: the output file is the only copy of each result (a million results are
not stored twice), and SQLite (stdlib, WAL) gives a crash-safe index that answers "is
this row done, and for which request?" without reading the output back.

The write order is what makes it crash-safe (group commit): results are appended to the
output, the output is flushed and fsynced, and only then is one SQLite transaction
committed that marks those rows done and records the output's new committed size. On
open, anything in the output past the committed size (a torn line, lines whose commit
never happened) is cut off; those rows were never marked done, so they are sent again —
they are exactly the rows that were in flight at the crash. A worker's concurrency slot
is held until its result is committed, so "in flight" is bounded by the concurrency.

A result that is replaced (its request changed, or a retried failure) leaves a dead line
in the output; the output is then compacted (rewritten without dead lines, swapped in by
rename) so it never holds a custom_id twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.errors import LockedError, StateError
from batchgpt.pricing import Usage

OK = 1
FAILED = 2
SCHEMA_VERSION = "1"
LOOKUP_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    custom_id TEXT PRIMARY KEY,
    req_hash TEXT NOT NULL,
    status INTEGER NOT NULL,          -- 1 succeeded, 2 failed
    transient INTEGER NOT NULL DEFAULT 0,  -- failed for a reason that may pass
    off INTEGER,                      -- output line position (succeeded rows)
    len INTEGER,
    line BLOB,                        -- the failures-file line (failed rows)
    error_code TEXT,
    attempts INTEGER NOT NULL,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    run_id INTEGER,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT,
    pid INTEGER,
    summary TEXT
);
"""


@dataclass(frozen=True, slots=True)
class Known:
    """What the checkpoint holds for one custom_id."""

    status: int
    req_hash: str
    transient: bool


@dataclass(slots=True)
class _Pending:
    custom_id: str
    req_hash: str
    status: int
    line: bytes
    attempts: int
    model: str | None = None
    usage: Usage | None = None
    error_code: str | None = None
    transient: bool = False
    done: asyncio.Future[None] | None = None


@dataclass
class Totals:
    succeeded: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    usage_by_model: dict[str, Usage] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return sum(self.usage_by_model.values(), Usage())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobLock:
    """An exclusive flock on the job's state folder. The kernel drops it when the holder
    dies, however it dies, so a stale lock never needs cleaning up by hand."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # `holder` (batchgpt status) takes a shared lock for an instant to look: a run
        # starting in that instant must not be turned away with exit 75 ("unknown"
        # holder), so try again for up to ~0.1 s before deciding the lock is held.
        for pause in (0.0, 0.01, 0.02, 0.03, 0.04):
            time.sleep(pause)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
        else:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockedError(
                f"another batchgpt run holds this job's lock ({self.path}): {holder or 'unknown'}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {now_iso()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(state_dir: Path) -> str | None:
        """Who holds the lock now (None when nobody does); for `batchgpt status`."""
        path = state_dir / "lock"
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class Store:
    """Checkpoint, output and failures of one job. Not thread-safe by itself: the runner
    calls it from one event loop; the one blocking step (append + fsync + commit) runs in
    a worker thread under a lock."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.output = Path(job.output)
        self.failures_path = job.failures_path
        self.state_dir = job.state_dir
        self.db_path = self.state_dir / "rows.sqlite"
        self._db: sqlite3.Connection | None = None
        self._lock = JobLock(self.state_dir)
        self._io = threading.Lock()
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._out_fd: int | None = None
        self._out_size = 0
        self.run_id: int | None = None
        self.replaced = 0

    # -- opening ------------------------------------------------------------------------
    def open_readonly(self) -> None:
        """For status and dry runs: no lock, no repair, no writes — safe beside a run.
        A job that never ran reads as an empty checkpoint."""
        if self.db_path.exists():
            try:
                self._db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True,
                                           check_same_thread=False)
                self._db.execute("SELECT COUNT(*) FROM meta").fetchone()
            except sqlite3.DatabaseError as exc:
                raise StateError(f"{self.db_path}: checkpoint unreadable: {exc}") from None
        else:
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
            self._db.executescript(_SCHEMA)

    def open(self, *, lock: bool = True) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {exc.filename}: {exc.strerror}") from None
        if lock:
            self._lock.acquire()
        try:
            self._db = self._connect(self.db_path)
            self._recover()
            self._check_writable()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateError(f"{self.db_path}: checkpoint unreadable: {exc}") from None
        except BaseException:
            self.close()  # release the lock and the database on any other failure too
            raise

    def _check_writable(self) -> None:
        """Fail before anything is sent when results could not be written: a paid answer
        that can't be stored is lost. Without this, an unwritable output was only noticed
        at the first result (after paying for it), and the runner kept sending; an
        unwritable folder crashed with a traceback when the failures file was written.
        Opens an existing output for appending (and closes it: nothing is created or
        changed), and creates and removes a file in its folder, where the output, the
        failures and summary files are created or swapped in."""
        try:
            if self.output.exists():
                os.close(os.open(self.output, os.O_WRONLY | os.O_APPEND))
            fd, probe = tempfile.mkstemp(prefix=f".{self.output.name}.", suffix=".probe",
                                         dir=self.output.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StateError(
                f"cannot write {exc.filename or self.output}: {exc.strerror}; nothing was "
                "sent, and results written so far are safe"
            ) from None

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        return db

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("checkpoint is not open")
        return self._db

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _recover(self) -> None:
        """Bring the output back to exactly what the checkpoint says is done."""
        db = self.db
        tmp = self._meta("compact_tmp")
        if tmp:  # a compaction committed its offsets; finish the swap if it didn't happen
            if Path(tmp).exists():
                os.replace(tmp, self.output)
            db.execute("DELETE FROM meta WHERE key = 'compact_tmp'")
        committed = int(self._meta("output_size", "0") or 0)
        try:
            actual = self.output.stat().st_size
        except FileNotFoundError:
            actual = 0
        if actual < committed:
            done = db.execute("SELECT COUNT(*) FROM rows WHERE status = ?", (OK,)).fetchone()[0]
            raise StateError(
                f"{self.output} is shorter than the checkpoint records ({actual} < {committed} "
                f"bytes): results were removed outside batchgpt, and {done} rows the checkpoint "
                "counts as done may be gone. Restore the file, or start over with --fresh "
                "(which sends every row again)."
            )
        if actual > committed:
            try:
                with self.output.open("r+b") as fh:  # torn or uncommitted tail: not done
                    fh.truncate(committed)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:  # e.g. a read-only output: an error, not a traceback
                raise StateError(
                    f"cannot repair {self.output} (cut its {actual - committed} uncommitted "
                    f"bytes): {exc.strerror}; nothing was sent"
                ) from None
        self._out_size = committed
        if int(self._meta("dead_lines", "0") or 0):
            self._compact()

    def close(self) -> None:
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
        if self._db is not None:
            self._db.close()
            self._db = None
        self._lock.release()

    def reset(self) -> None:
        """--fresh: forget every result. Only called with the lock held."""
        self.db.execute("DELETE FROM rows")
        self.db.execute("DELETE FROM meta WHERE key IN ('output_size', 'dead_lines')")
        for path in (self.output, self.failures_path, self.job.summary_path):
            path.unlink(missing_ok=True)
        self._out_size = 0

    # -- reading ------------------------------------------------------------------------
    def lookup(self, ids: list[str]) -> dict[str, Known]:
        out: dict[str, Known] = {}
        for i in range(0, len(ids), LOOKUP_BATCH):
            chunk = ids[i : i + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            for cid, req_hash, status, transient in self.db.execute(
                f"SELECT custom_id, req_hash, status, transient FROM rows "
                f"WHERE custom_id IN ({marks})",
                chunk,
            ):
                out[cid] = Known(status, req_hash, bool(transient))
        return out

    def lookup_unsettled(self, rows: list[tuple[str, str]]) -> dict[str, Known | None]:
        """Given (custom_id, request hash) pairs, what the checkpoint holds for each row
        that is not simply done: None for a row it has never seen, its Known for a row
        that failed or whose result is for another request. A row left out succeeded for
        this very request; on a resume that is nearly every row, so the comparison is one
        join in SQLite per batch instead of a Python object per row (see ``lookup``)."""
        out: dict[str, Known | None] = {}
        for i in range(0, len(rows), LOOKUP_BATCH):
            chunk = rows[i : i + LOOKUP_BATCH]
            values = ",".join(["(?,?)"] * len(chunk))
            for cid, status, req_hash, transient in self.db.execute(
                f"WITH batch(cid, h) AS (VALUES {values}) "
                "SELECT batch.cid, rows.status, rows.req_hash, rows.transient "
                "FROM batch LEFT JOIN rows ON rows.custom_id = batch.cid "
                "WHERE rows.custom_id IS NULL OR rows.status != ? OR rows.req_hash != batch.h",
                [x for pair in chunk for x in pair] + [OK],
            ):
                out[cid] = None if status is None else Known(status, req_hash, bool(transient))
        return out

    def totals(self) -> Totals:
        t = Totals()
        db = self.db
        for status, n in db.execute("SELECT status, COUNT(*) FROM rows GROUP BY status"):
            if status == OK:
                t.succeeded = n
            elif status == FAILED:
                t.failed = n
        for code, n in db.execute(
            "SELECT error_code, COUNT(*) FROM rows WHERE status = ? GROUP BY error_code",
            (FAILED,),
        ):
            t.failed_by_code[code or "unknown"] = n
        for model, p, c, cached, reasoning in db.execute(
            "SELECT model, SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
            "SUM(reasoning_tokens) FROM rows WHERE status = ? GROUP BY model",
            (OK,),
        ):
            t.usage_by_model[model or ""] = Usage(
                prompt_tokens=p or 0, completion_tokens=c or 0, total_tokens=(p or 0) + (c or 0),
                cached_tokens=cached or 0, reasoning_tokens=reasoning or 0,
            )
        return t

    def last_run(self) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, started_at, finished_at, outcome, pid FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return {"id": row[0], "started_at": row[1], "finished_at": row[2], "outcome": row[3],
                "pid": row[4]}

    # -- runs -----------------------------------------------------------------------------
    def start_run(self) -> int:
        cur = self.db.execute(
            "INSERT INTO runs (started_at, pid) VALUES (?, ?)", (now_iso(), os.getpid())
        )
        self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def finish_run(self, outcome: str, summary: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE runs SET finished_at = ?, outcome = ?, summary = ? WHERE id = ?",
            (now_iso(), outcome, json.dumps(summary), self.run_id),
        )

    # -- writing: group commit ----------------------------------------------------------
    def start_writer(self) -> None:
        self._wakeup = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name="batchgpt-store")

    async def stop_writer(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._flusher is None:
            return
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        await self._flusher
        self._flusher = None

    async def put_success(
        self, custom_id: str, req_hash: str, line: bytes, attempts: int, model: str | None,
        usage: Usage,
    ) -> None:
        """Returns once the result is durably in the output and marked done."""
        await self._put(_Pending(custom_id, req_hash, OK, line, attempts, model, usage))

    async def put_failure(
        self, custom_id: str, req_hash: str, line: bytes, attempts: int, error_code: str,
        transient: bool,
    ) -> None:
        await self._put(_Pending(custom_id, req_hash, FAILED, line, attempts,
                                 error_code=error_code, transient=transient))

    async def _put(self, item: _Pending) -> None:
        if self._flusher is None or self._wakeup is None:
            raise StateError("store writer is not running")
        item.done = asyncio.get_running_loop().create_future()
        self._queue.append(item)
        self._wakeup.set()
        await asyncio.shield(item.done)

    _closing = False

    async def _flush_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._queue:
                batch, self._queue = self._queue, []
                try:
                    await asyncio.to_thread(self._commit, batch)
                except BaseException as exc:  # fail every waiter, don't hang them
                    err = exc if isinstance(exc, StateError) else StateError(
                        f"cannot write results: {exc}")
                    for item in batch:
                        if item.done is not None and not item.done.done():
                            item.done.set_exception(err)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for item in batch:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(None)
            if self._closing and not self._queue:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        """Append successes to the output, fsync, then mark the batch done in one
        transaction. Runs in a worker thread."""
        with self._io:
            if self._out_fd is None:
                self._out_fd = os.open(self.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                       0o644)
            offsets: dict[int, tuple[int, int]] = {}
            chunks = []
            pos = self._out_size
            for i, item in enumerate(batch):
                if item.status == OK:
                    offsets[i] = (pos, len(item.line))
                    chunks.append(item.line)
                    pos += len(item.line)
            if chunks:
                data = b"".join(chunks)
                try:
                    written = os.write(self._out_fd, data)
                    while written < len(data):
                        written += os.write(self._out_fd, data[written:])
                    os.fsync(self._out_fd)
                except OSError as exc:
                    # Leave the checkpoint as it was: the partial tail is cut on the next open.
                    raise StateError(
                        f"cannot write {self.output}: {exc.strerror}; results written so far "
                        "are safe, rerun to continue"
                    ) from None
            db = self.db
            now = time.time()
            dead = 0
            ids = [item.custom_id for item in batch]
            previous = {
                cid: status
                for cid, status in _select_status(db, ids)
            }
            db.execute("BEGIN")
            try:
                for i, item in enumerate(batch):
                    if previous.get(item.custom_id) == OK:
                        dead += 1
                    off, length = offsets.get(i, (None, None))
                    u = item.usage or Usage()
                    db.execute(
                        "INSERT OR REPLACE INTO rows (custom_id, req_hash, status, transient, off, "
                        "len, line, error_code, attempts, model, prompt_tokens, completion_tokens, "
                        "cached_tokens, reasoning_tokens, run_id, updated_at) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (item.custom_id, item.req_hash, item.status, int(item.transient), off,
                         length, None if item.status == OK else item.line, item.error_code,
                         item.attempts, item.model, u.prompt_tokens, u.completion_tokens,
                         u.cached_tokens, u.reasoning_tokens, self.run_id, now),
                    )
                db.execute("INSERT OR REPLACE INTO meta VALUES ('output_size', ?)", (str(pos),))
                if dead:
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('dead_lines', "
                        "COALESCE((SELECT CAST(value AS INTEGER) FROM meta "
                        "WHERE key = 'dead_lines'), 0) + ?)",
                        (dead,),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._out_size = pos
            self.replaced += dead

    # -- finishing ----------------------------------------------------------------------
    def finalize(self) -> None:
        """After a run: drop superseded lines from the output, rewrite the failures file."""
        with self._io:
            if int(self._meta("dead_lines", "0") or 0):
                self._compact()
            self._write_failures()

    def _compact(self) -> None:
        """Rewrite the output with only the live line of each succeeded row."""
        if self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
        db = self.db
        tmp = self.output.with_name(self.output.name + ".compact")
        updates: list[tuple[int, str]] = []
        pos = 0
        with self.output.open("rb") as src, tmp.open("wb") as dst:
            for cid, off, length in db.execute(
                "SELECT custom_id, off, len FROM rows WHERE status = ? ORDER BY off", (OK,)
            ):
                src.seek(off)
                dst.write(src.read(length))
                if off != pos:
                    updates.append((pos, cid))
                pos += length
            dst.flush()
            os.fsync(dst.fileno())
        db.execute("BEGIN")
        db.executemany("UPDATE rows SET off = ? WHERE custom_id = ?", updates)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('output_size', ?)", (str(pos),))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('dead_lines', '0')")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('compact_tmp', ?)", (str(tmp),))
        db.execute("COMMIT")
        os.replace(tmp, self.output)
        db.execute("DELETE FROM meta WHERE key = 'compact_tmp'")
        self._out_size = pos

    def _write_failures(self) -> None:
        tmp = self.failures_path.with_name(self.failures_path.name + ".tmp")
        count = 0
        with tmp.open("wb") as fh:
            for (line,) in self.db.execute(
                "SELECT line FROM rows WHERE status = ? ORDER BY updated_at, custom_id", (FAILED,)
            ):
                fh.write(line)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        if count:
            os.replace(tmp, self.failures_path)
        else:
            tmp.unlink()
            self.failures_path.unlink(missing_ok=True)


def _select_status(db: sqlite3.Connection, ids: Iterable[str]) -> Iterator[tuple[str, int]]:
    ids = list(ids)
    for i in range(0, len(ids), LOOKUP_BATCH):
        chunk = ids[i : i + LOOKUP_BATCH]
        marks = ",".join("?" * len(chunk))
        yield from db.execute(
            f"SELECT custom_id, status FROM rows WHERE custom_id IN ({marks})", chunk
        )
