"""The checkpoint of ``mode: batch``: every submission to the provider's Batch API and the
rows it carries, in ``<output stem>.state/batches.sqlite`` beside the index.

A submission goes through states, each recorded (committed, ``synchronous=FULL``) before
the step that may leave something at the provider, so that a kill anywhere leaves a
record the next run can match against what the provider holds::

    prepared   its rows are recorded; the file may or may not be uploaded yet
    uploaded   the input file is at the provider (``file_id``); no batch yet, or not known
    submitted  the batch exists (``batch_id``); polled until it ends
    collected  its output and error lines are in the job's output / failures; its rows
               are settled or pending again
    discarded  never became a batch (a kill before create): its uploaded file is deleted

The rows a submission carries are kept with their request hash and attempt number:
whatever the provider answers is matched to the request it answered, and a row is never
in two live submissions at once (``live_ids``). The provider's files are named after the
submission and its batch carries the submission id in its metadata, which is how a run
finds what a killed run left (:mod:`batchgpt.modes.batch`).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    sub_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT,
    provider_status TEXT,
    counts TEXT,
    created_at REAL NOT NULL,
    expires_at REAL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    worst_usd REAL NOT NULL,
    errors TEXT,
    files_left TEXT
);
CREATE TABLE IF NOT EXISTS carried (
    sub_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT,
    PRIMARY KEY (sub_id, custom_id)
);
CREATE INDEX IF NOT EXISTS carried_by_id ON carried (custom_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class SubState(str, enum.Enum):
    PREPARED = "prepared"
    UPLOADED = "uploaded"
    SUBMITTED = "submitted"
    COLLECTED = "collected"
    DISCARDED = "discarded"


LIVE = (SubState.PREPARED, SubState.UPLOADED, SubState.SUBMITTED)


class RowOutcome(str, enum.Enum):
    """What became of a row a submission carried."""

    SUCCEEDED = "succeeded"  # its result is in the output
    FAILED = "failed"  # in the failures file (for good, or retryable after its attempts)
    RETRY = "retry"  # a retryable error with attempts left: sent again in a later batch
    MISSING = "missing"  # not answered (expired, cancelled, lost): sent again, same attempt


@dataclass
class Submission:
    sub_id: str
    seq: int
    model: str
    state: SubState
    file_id: str | None
    batch_id: str | None
    provider_status: str | None
    counts: dict[str, int]
    created_at: float
    expires_at: float | None
    rows: int
    bytes: int
    prompt_tokens: int
    worst_usd: float
    errors: list[dict[str, Any]]
    files_left: list[str]

    @property
    def live(self) -> bool:
        return self.state in LIVE


@dataclass(frozen=True, slots=True)
class CarriedRow:
    custom_id: str
    request_hash: str
    attempt: int


class BatchLedger:
    """The submissions of one job. Every method commits before it returns."""

    def __init__(self, db: sqlite3.Connection, path: Path | None) -> None:
        self.db = db
        self.path = path

    @staticmethod
    def exists(state_dir: Path) -> bool:
        return (state_dir / "batches.sqlite").exists()

    @classmethod
    def open(cls, state_dir: Path) -> BatchLedger:
        path = state_dir / "batches.sqlite"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a submission recorded must survive power loss too, or a batch the
        # provider runs could be submitted again.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        return cls(db, path)

    @classmethod
    def open_readonly(cls, state_dir: Path) -> BatchLedger | None:
        """For ``status``: None when the job never ran in batch mode."""
        path = state_dir / "batches.sqlite"
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        return cls(db, path)

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------
    def prepare(self, sub_id: str, model: str, rows: Iterable[CarriedRow], *, size: int,
                prompt_tokens: int, worst_usd: float) -> Submission:
        """Record a submission and its rows before anything is uploaded."""
        rows = list(rows)
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM submissions").fetchone()[0]
            db.execute(
                "INSERT INTO submissions (sub_id, seq, model, state, created_at, rows, bytes, "
                "prompt_tokens, worst_usd, counts, errors, files_left) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', '[]', '[]')",
                (sub_id, seq, model, SubState.PREPARED.value, time.time(), len(rows), size,
                 prompt_tokens, worst_usd))
            db.executemany(
                "INSERT INTO carried (sub_id, custom_id, request_hash, attempt) "
                "VALUES (?, ?, ?, ?)",
                [(sub_id, r.custom_id, r.request_hash, r.attempt) for r in rows])
        found = self.get(sub_id)
        assert found is not None
        return found

    def set_uploaded(self, sub_id: str, file_id: str) -> None:
        self._update(sub_id, state=SubState.UPLOADED.value, file_id=file_id)

    def set_submitted(self, sub_id: str, batch_id: str, file_id: str | None) -> None:
        self._update(sub_id, state=SubState.SUBMITTED.value, batch_id=batch_id,
                     file_id=file_id)

    def set_status(self, sub_id: str, status: str, counts: dict[str, int],
                   expires_at: float | None, errors: list[dict[str, Any]]) -> None:
        self._update(sub_id, provider_status=status, counts=json.dumps(counts),
                     expires_at=expires_at, errors=json.dumps(errors))

    def set_files_left(self, sub_id: str, files: list[str]) -> None:
        """Provider files still to delete (the input, output and error files of a
        finished submission, or an uploaded file that never became a batch)."""
        self._update(sub_id, files_left=json.dumps(files))

    def discard(self, sub_id: str, files_left: list[str]) -> None:
        """Never became a batch: its rows are free again."""
        with self._tx() as db:
            db.execute("UPDATE submissions SET state = ?, files_left = ? WHERE sub_id = ?",
                       (SubState.DISCARDED.value, json.dumps(files_left), sub_id))
            db.execute("UPDATE carried SET outcome = ? WHERE sub_id = ? AND outcome IS NULL",
                       (RowOutcome.MISSING.value, sub_id))

    def settle_rows(self, sub_id: str, outcomes: dict[str, RowOutcome]) -> None:
        """Record what became of rows (their results are durably written first)."""
        with self._tx() as db:
            db.executemany("UPDATE carried SET outcome = ? WHERE sub_id = ? AND custom_id = ?",
                           [(o.value, sub_id, cid) for cid, o in outcomes.items()])

    def collected(self, sub_id: str, files_left: list[str]) -> None:
        """Every line read and taken; rows nothing answered are pending again."""
        with self._tx() as db:
            db.execute("UPDATE carried SET outcome = ? WHERE sub_id = ? AND outcome IS NULL",
                       (RowOutcome.MISSING.value, sub_id))
            db.execute("UPDATE submissions SET state = ?, files_left = ? WHERE sub_id = ?",
                       (SubState.COLLECTED.value, json.dumps(files_left), sub_id))

    def set_meta(self, key: str, value: str | None) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def forget_all(self) -> None:
        """``--fresh``: the job starts over (no submission may be live)."""
        with self._tx() as db:
            db.execute("DELETE FROM carried")
            db.execute("DELETE FROM submissions")
            db.execute("DELETE FROM meta")

    # -- reading --------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, sub_id: str) -> Submission | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM submissions WHERE sub_id = ?",
                              (sub_id,)).fetchone()
        return None if row is None else _submission(row)

    def submissions(self, *, live_only: bool = False) -> list[Submission]:
        where = (f" WHERE state IN ({', '.join('?' * len(LIVE))})" if live_only else "")
        args = [s.value for s in LIVE] if live_only else []
        return [_submission(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM submissions{where} ORDER BY seq", args)]

    def with_files_left(self) -> list[Submission]:
        return [s for s in self.submissions() if not s.live and s.files_left]

    def carried(self, sub_id: str) -> Iterator[CarriedRow]:
        """The rows of a submission in the order of its file's lines."""
        for cid, h, attempt in self.db.execute(
                "SELECT custom_id, request_hash, attempt FROM carried WHERE sub_id = ? "
                "ORDER BY rowid", (sub_id,)):
            yield CarriedRow(cid, h, attempt)

    def live_ids(self) -> set[str]:
        """Ids of rows in live submissions: the run must not submit them again."""
        live = [s.value for s in LIVE]
        return {cid for (cid,) in self.db.execute(
            "SELECT c.custom_id FROM carried c JOIN submissions s USING (sub_id) "
            f"WHERE s.state IN ({', '.join('?' * len(live))})", live)}

    def answered_errors(self, custom_id: str, request_hash: str) -> int:
        """How often this very request got an error answer in a batch (retried, or failed
        and sent again by a later run): its next attempt is one more."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM carried WHERE custom_id = ? AND request_hash = ? "
            "AND outcome IN (?, ?)", (custom_id, request_hash, RowOutcome.RETRY.value,
                                     RowOutcome.FAILED.value)).fetchone()
        return int(row[0])

    def _update(self, sub_id: str, **values: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            db.execute(f"UPDATE submissions SET {cols} WHERE sub_id = ?",
                       (*values.values(), sub_id))

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


_COLUMNS = ("sub_id, seq, model, state, file_id, batch_id, provider_status, counts, "
            "created_at, expires_at, rows, bytes, prompt_tokens, worst_usd, errors, files_left")


def _submission(row: tuple[Any, ...]) -> Submission:
    (sub_id, seq, model, state, file_id, batch_id, status, counts, created, expires, rows,
     size, prompt, worst, errors, files_left) = row
    return Submission(sub_id, seq, model, SubState(state), file_id, batch_id, status,
                      json.loads(counts or "{}"), created, expires, rows, size, prompt, worst,
                      json.loads(errors or "[]"), json.loads(files_left or "[]"))


def rows_by_mode(index: Any) -> dict[str, int]:
    """The job's results by the mode that answered them: a Batch API answer's model is
    kept tagged ``@batch`` (:func:`batchgpt.pricing.batch_key`). ``index`` is the job's
    :class:`~batchgpt.store.index.Index`."""
    from batchgpt.pricing import BATCH_TAG

    total, batch = index.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(model LIKE ?), 0) FROM results",
        ("%" + BATCH_TAG,)).fetchone()
    return {"online": int(total) - int(batch), "batch": int(batch)}
