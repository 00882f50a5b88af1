"""The checkpoint's index: which row has which result, and which rows failed.

An index, not a record: every result it knows of is a line of the output file, and
:mod:`batchgpt.store.recover` can rebuild it from the output (and the failures file)
whenever it is missing, damaged or behind. What it adds is speed (a million-row resume
asks SQLite, not the output) and what the output cannot say: the request hash each result
was produced for, failures, attempts, and what was paid for results later replaced.

Tables::

    results   custom_id → request hash (NULL: taken over from the output, and checked
              against the row's request by its line's answer tag at the next plan; "~…":
              the line answers some other request), where its line is in the output
              (offset, length), attempts, model, token usage
    failures  custom_id → request hash, retryable or not, error code, attempts, the
              failures-file line. A row may have both: an older result kept in the
              output while its changed request failed (a failure never replaces a result)
    spare     after a rebuild: the other answers an id's lines hold (tagged for another
              request than its live line), kept until the next plan knows the row's
              request and picks the one that answers it
    spend     per model: usage of every result ever committed, replaced ones included
    meta      key → value: ``schema`` (the version); the job owning the output, ``job``
              (its name) and ``job_file`` (the file it was loaded from); the committed
              output, ``output_size``, ``output_crc`` (its CRC-32) and ``fingerprint``
              (its stat); ``replaced`` (results later replaced); ``dead_lines``
              (superseded lines the output still holds, for the next compaction);
              ``compacting`` (set while a compacted output is swapped in: the next open
              finishes or undoes it); ``unseen_usd`` (spend no result records, for the
              cap) and ``inflight_allowance_usd`` (a capped run's in-flight spend on
              record until it settles)
    runs      one row per run: start, end, outcome, summary
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgpt.pricing import Usage
from batchgpt.store.output_log import answer_tag

SCHEMA_VERSION = "2"
LOOKUP_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    custom_id TEXT PRIMARY KEY,
    req_hash TEXT,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    run_id INTEGER,
    updated_at REAL NOT NULL,
    tag TEXT                          -- the line's answer tag, kept while req_hash is NULL
);
CREATE TABLE IF NOT EXISTS failures (
    custom_id TEXT PRIMARY KEY,
    req_hash TEXT,
    transient INTEGER NOT NULL,
    error_code TEXT,
    attempts INTEGER NOT NULL,
    line BLOB NOT NULL,
    run_id INTEGER,
    updated_at REAL NOT NULL,
    tag TEXT
);
CREATE TABLE IF NOT EXISTS spare (
    custom_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (custom_id, tag)
);
CREATE TABLE IF NOT EXISTS spend (
    model TEXT PRIMARY KEY,
    results INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
-- Results taken over without a request hash, found without reading every result (each
-- plan, status and dry run asks whether there are any).
CREATE INDEX IF NOT EXISTS results_unadopted ON results (custom_id) WHERE req_hash IS NULL;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    outcome TEXT,
    pid INTEGER,
    summary TEXT
);
"""


# Adding to what was paid per model (an upsert: one row per model).
SPEND_INSERT = ("INSERT INTO spend (model, results, prompt_tokens, completion_tokens, "
                "cached_tokens, reasoning_tokens)")
SPEND_UPSERT = ("ON CONFLICT(model) DO UPDATE SET results = results + excluded.results, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "cached_tokens = cached_tokens + excluded.cached_tokens, "
                "reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens")


@dataclass(frozen=True, slots=True)
class Settled:
    """What the index holds for one row whose stored state is not simply "succeeded for
    this very request" (see :meth:`Index.unsettled`)."""

    result_hash: str | None  # hash of the request of its result, "" when there is none
    failure_hash: str | None  # hash of the request that failed, "" when there is none
    transient: bool  # the failure may pass
    error_code: str | None

    @property
    def has_result(self) -> bool:
        return self.result_hash != ""

    @property
    def has_failure(self) -> bool:
        return self.failure_hash != ""


@dataclass(slots=True)
class NewResult:
    custom_id: str
    req_hash: str | None
    off: int
    len: int
    attempts: int
    model: str | None
    usage: Usage
    tag: str | None = None  # with req_hash None: the line's answer tag


@dataclass(slots=True)
class NewFailure:
    custom_id: str
    req_hash: str | None
    transient: bool
    error_code: str
    attempts: int
    line: bytes
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A row's result as the index records it: where its line is in the output, and
    what it cost (what an export or ``show`` needs without parsing the line first)."""

    req_hash: str | None  # the request it answers; None: taken over, not adopted yet
    off: int
    len: int
    attempts: int
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def usage(self) -> Usage:
        return Usage.model_construct(  # counts were validated before they were stored
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            cached_tokens=self.cached_tokens, reasoning_tokens=self.reasoning_tokens)


@dataclass(frozen=True, slots=True)
class StoredFailure:
    """A row's failure as the index records it, with its failures-file line (which holds
    the message, HTTP status and the server's response)."""

    req_hash: str | None  # the request that failed; None: taken over from the failures file
    transient: bool
    error_code: str | None
    attempts: int
    line: bytes


@dataclass(frozen=True, slots=True)
class StoredRow:
    """Everything the index holds for one id: a result, a failure, or both (an older
    result kept while the row's changed request failed)."""

    result: StoredResult | None
    failure: StoredFailure | None


@dataclass
class Totals:
    results: int = 0  # results in the output, whatever their ids
    failures: int = 0
    spend_by_model: dict[str, Usage] = field(default_factory=dict)  # what was paid
    results_by_model: dict[str, int] = field(default_factory=dict)  # results it answered
    replaced: int = 0  # results later replaced by a newer one (paid, no longer in the output)
    # Spend no result records, in USD: what a lost index had recorded for replaced results
    # (read back from the last summary), and the worst case of requests a run gave up or
    # was killed with on the wire. Counted by a cap; see Store.open.
    unseen_usd: float = 0.0

    @property
    def usage(self) -> Usage:
        """The tokens of :attr:`spend_by_model`, summed over its models."""
        return sum(self.spend_by_model.values(), Usage())


def clean_text(value: str | None) -> str | None:
    """A string SQLite can store: a lone surrogate (a server may send one) would make
    the whole commit fail."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


class Index:
    """The SQLite index. One connection, used from one thread at a time."""

    def __init__(self, db: sqlite3.Connection, path: Path | None) -> None:
        self.db = db
        self.path = path
        db.create_function("answer_tag", 2, answer_tag, deterministic=True)
        self._depth = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None  # a read-only snapshot

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction; nested uses join the outer one, so a recovery can make
        many changes that all happen or none do."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK")
            raise
        self._depth = 0
        self.db.execute("COMMIT")

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> Index:
        """Open (creating if needed) for writing. ``verify`` runs SQLite's integrity
        check (0.7 s for a million rows here), which the caller skips when the file is
        exactly as batchgpt closed it. Raises sqlite3.DatabaseError on a file that is not
        a usable database; the caller rebuilds."""
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            index = cls(db, path)
            index._check(verify)
            index._create()
        except BaseException:
            db.close()
            raise
        return index

    @classmethod
    def open_readonly(cls, path: Path, *, verify: bool = True) -> Index:
        """For status and dry runs: a read that writes nothing at all — not even the
        ``-wal``/``-shm`` files SQLite adds beside a database it opens. With no write-ahead
        log present (no run going, none killed) the file is opened immutable; otherwise
        it and its log are copied to a temporary folder and the copy is read, so a run
        going on beside is neither disturbed nor half-read. Raises sqlite3.DatabaseError
        when unreadable."""
        wal = Path(str(path) + "-wal")
        tmp: tempfile.TemporaryDirectory[str] | None = None
        if wal.exists():
            tmp = tempfile.TemporaryDirectory(prefix="batchgpt-index-")
            copy = Path(tmp.name) / path.name
            shutil.copyfile(path, copy)
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(wal, Path(str(copy) + "-wal"))
            db = sqlite3.connect(copy, check_same_thread=False, isolation_level=None)
        else:
            db = sqlite3.connect(f"file:{path}?immutable=1", uri=True,
                                 check_same_thread=False, isolation_level=None)
        try:
            index = cls(db, path)
            index._tmp = tmp
            index._check(verify)
            if index.meta("schema") != SCHEMA_VERSION:  # an old layout: migrate a copy
                return index.copy_to_memory()
        except BaseException:
            db.close()
            if tmp is not None:
                tmp.cleanup()
            raise
        return index

    @classmethod
    def in_memory(cls) -> Index:
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        index = cls(db, None)
        index._create()
        return index

    def copy_to_memory(self) -> Index:
        """A writable copy (a dry run repairs the copy, never the file)."""
        mem = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self.db.backup(mem)
        self.close()
        index = Index(mem, None)
        index._create()
        return index

    def _check(self, verify: bool) -> None:
        """A file that is not a database fails at the first read. ``integrity_check``
        also finds same-length damage inside one (a flipped byte in an id no longer
        matches its index entry), which ``quick_check`` would miss."""
        self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        if verify:
            rows = self.db.execute("PRAGMA integrity_check(5)").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                raise sqlite3.DatabaseError("integrity_check: "
                                            + "; ".join(str(r[0]) for r in rows))

    def _create(self) -> None:
        db = self.db
        old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rows'"
                         ).fetchone()
        db.executescript(_SCHEMA)
        if old:
            self._migrate_v1()
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def _migrate_v1(self) -> None:
        """Schema 1 kept results and failures in one `rows` table (status 1 or 2)."""
        with self.transaction() as db:
            self._copy_v1(db)

    @staticmethod
    def _copy_v1(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT OR REPLACE INTO results SELECT custom_id, req_hash, off, len, attempts, "
            "model, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, run_id, "
            "updated_at, NULL FROM rows WHERE status = 1 AND off IS NOT NULL"
        )
        db.execute(
            "INSERT OR REPLACE INTO failures SELECT custom_id, req_hash, transient, error_code, "
            "attempts, COALESCE(line, X''), run_id, updated_at, NULL FROM rows WHERE status = 2"
        )
        db.execute(
            "INSERT OR REPLACE INTO spend SELECT COALESCE(model, ''), COUNT(*), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
            "SUM(reasoning_tokens) FROM results GROUP BY COALESCE(model, '')"
        )
        db.execute("DROP TABLE rows")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- meta -----------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: str | int | None) -> None:
        for key, value in values.items():
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def meta_float(self, key: str) -> float:
        try:
            value = float(self.meta(key) or 0)
        except ValueError:
            return 0.0
        return value if value == value and 0 <= value < 1e12 else 0.0  # NaN, absurd: 0

    def meta_int(self, key: str) -> int:
        try:
            return int(self.meta(key) or 0)
        except ValueError:
            return 0

    # -- planning -------------------------------------------------------------------------
    def unsettled(self, rows: Sequence[tuple[str, str]]) -> dict[str, Settled]:
        """Given (custom_id, request hash) pairs, what the index holds for each row that
        did not simply succeed for this very request. A row left out has a result for this
        request, or a result taken over from the output (hash NULL: see :meth:`adopt`);
        on a resume that is nearly every row, so this is one join per batch of ids."""
        out: dict[str, Settled] = {}
        for i in range(0, len(rows), LOOKUP_BATCH):
            chunk = rows[i : i + LOOKUP_BATCH]
            values = ",".join(["(?,?)"] * len(chunk))
            for cid, r_hash, has_r, f_hash, has_f, transient, code in self.db.execute(
                f"WITH batch(cid, h) AS (VALUES {values}) "
                "SELECT batch.cid, r.req_hash, r.custom_id IS NOT NULL, f.req_hash, "
                "f.custom_id IS NOT NULL, f.transient, f.error_code "
                "FROM batch LEFT JOIN results r ON r.custom_id = batch.cid "
                "LEFT JOIN failures f ON f.custom_id = batch.cid "
                "WHERE r.custom_id IS NULL OR (r.req_hash IS NOT NULL AND r.req_hash != batch.h)",
                [x for pair in chunk for x in pair],
            ):
                out[cid] = Settled(
                    result_hash=r_hash if has_r else "",
                    failure_hash=f_hash if has_f else "",
                    transient=bool(transient),
                    error_code=code,
                )
        return out

    def unadopted_count(self) -> int:
        return sum(int(self.db.execute(f"SELECT COUNT(*) FROM {t} WHERE req_hash IS NULL"
                                       ).fetchone()[0]) for t in ("results", "failures"))

    def all_unadopted(self) -> set[str]:
        return {cid for t in ("results", "failures") for (cid,) in self.db.execute(
            f"SELECT custom_id FROM {t} WHERE req_hash IS NULL")}

    def answered(self, lines: Sequence[tuple[str, NewResult]]) -> list[str]:
        """Of these taken-over lines, the ids whose line is tagged for the very request
        the index already holds an answer for: copies of a recorded answer."""
        out: list[str] = []
        tags = {cid: r.tag for cid, r in lines if r.tag is not None}
        ids = list(tags)
        for i in range(0, len(ids), LOOKUP_BATCH):
            chunk = ids[i : i + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            for cid, tag in self.db.execute(
                f"SELECT custom_id, answer_tag(custom_id, req_hash) FROM results "
                f"WHERE req_hash IS NOT NULL AND custom_id IN ({marks})", chunk):
                if tags[cid] == tag:
                    out.append(cid)
        return out

    def adopt(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Results and failures taken over from the files (no request hash) meet their
        row's current request. A result line tagged for this request — or with no tag
        (older outputs) — becomes its answer; else a spare line tagged for it does (the
        answer a killed run wrote but never recorded, found by a rebuild beside an older
        one); else the result is marked "~<tag>", which no request hash equals, so the
        row counts as changed. A failure is adopted the same way (no spares)."""
        with self.transaction() as db:
            dead = 0
            by_id = dict(pairs)
            ids = list(by_id)
            for i in range(0, len(ids), LOOKUP_BATCH):
                chunk = ids[i : i + LOOKUP_BATCH]
                marks = ",".join("?" * len(chunk))
                spares: dict[str, dict[str, tuple[Any, ...]]] = {}
                for cid, tag, *rest in db.execute(
                        f"SELECT custom_id, tag, off, len, model, prompt_tokens, "
                        f"completion_tokens, cached_tokens, reasoning_tokens FROM spare "
                        f"WHERE custom_id IN ({marks})", chunk):
                    spares.setdefault(cid, {})[tag] = tuple(rest)
                unadopted = db.execute(f"SELECT custom_id, tag FROM results WHERE req_hash "
                                       f"IS NULL AND custom_id IN ({marks})", chunk).fetchall()
                for cid, tag in unadopted:
                    h = by_id[cid]
                    want = answer_tag(cid, h)
                    spare = spares.get(cid, {}).get(want)
                    if tag is None or tag == want:
                        db.execute("UPDATE results SET req_hash = ?, tag = NULL "
                                   "WHERE custom_id = ?", (h, cid))
                    elif spare is not None:
                        off, length, model, p, c, cached, reasoning = spare
                        db.execute(
                            "UPDATE results SET req_hash = ?, tag = NULL, off = ?, len = ?, "
                            "model = ?, prompt_tokens = ?, completion_tokens = ?, "
                            "cached_tokens = ?, reasoning_tokens = ? WHERE custom_id = ?",
                            (h, off, length, model, p, c, cached, reasoning, cid))
                        dead += 1  # the line it was pointing at
                    else:
                        db.execute("UPDATE results SET req_hash = '~' || tag, tag = NULL "
                                   "WHERE custom_id = ?", (cid,))
                    n = len(spares.get(cid, {}))
                    dead += n - (spare is not None)
                db.execute(f"DELETE FROM spare WHERE custom_id IN ({marks})", chunk)
                db.executemany(
                    "UPDATE failures SET req_hash = CASE WHEN tag IS NULL OR tag = "
                    "answer_tag(custom_id, ?) THEN ? ELSE '~' || tag END, tag = NULL "
                    "WHERE custom_id = ? AND req_hash IS NULL",
                    [(by_id[c], by_id[c], c) for c in chunk])
            if dead:
                self.set_meta(dead_lines=self.meta_int("dead_lines") + dead)

    def spare_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM spare").fetchone()[0])

    # -- writing --------------------------------------------------------------------------
    def commit(self, results: list[NewResult], failures: list[NewFailure], run_id: int | None,
               spend: Sequence[tuple[str, Usage]] = (), **meta: str | int) -> int:
        """One transaction: results (each replacing any earlier result of its id, and
        clearing its failure), failures (never touching a result), what was paid (the
        results', and ``spend``: replies paid for and not kept), and the meta values given.
        Returns how many earlier results were replaced."""
        now = time.time()
        with self.transaction() as db:
            replaced = 0
            if results:
                ids = [r.custom_id for r in results]
                replaced = self._count_existing(ids)
                db.executemany(
                    "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(r.custom_id, r.req_hash, r.off, r.len, r.attempts, clean_text(r.model),
                      r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_tokens,
                      r.usage.reasoning_tokens, run_id, now, r.tag) for r in results],
                )
                if db.execute("SELECT 1 FROM failures LIMIT 1").fetchone() is not None:
                    db.executemany("DELETE FROM failures WHERE custom_id = ?",
                                   [(i,) for i in ids])
                self._add_spend(results)
            if spend:
                db.executemany(f"{SPEND_INSERT} VALUES (?,0,?,?,?,?) {SPEND_UPSERT}",
                               [(clean_text(m) or "", u.prompt_tokens, u.completion_tokens,
                                 u.cached_tokens, u.reasoning_tokens) for m, u in spend])
            if failures:
                db.executemany(
                    "INSERT OR REPLACE INTO failures VALUES (?,?,?,?,?,?,?,?,?)",
                    [(f.custom_id, f.req_hash, int(f.transient), clean_text(f.error_code),
                      f.attempts, f.line, run_id, now, f.tag) for f in failures],
                )
            if replaced:
                meta["dead_lines"] = self.meta_int("dead_lines") + replaced
                meta["replaced"] = self.meta_int("replaced") + replaced
            self.set_meta(**meta)
        return replaced

    def _count_existing(self, ids: list[str]) -> int:
        n = 0
        for i in range(0, len(ids), LOOKUP_BATCH):
            chunk = ids[i : i + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            n += self.db.execute(f"SELECT COUNT(*) FROM results WHERE custom_id IN ({marks})",
                                 chunk).fetchone()[0]
        return n

    def _add_spend(self, results: Iterable[NewResult]) -> None:
        by_model: dict[str, list[int]] = {}
        for r in results:
            acc = by_model.setdefault(clean_text(r.model) or "", [0, 0, 0, 0, 0])
            u = r.usage
            acc[0] += 1
            acc[1] += u.prompt_tokens
            acc[2] += u.completion_tokens
            acc[3] += u.cached_tokens
            acc[4] += u.reasoning_tokens
        self.db.executemany(f"{SPEND_INSERT} VALUES (?,?,?,?,?,?) {SPEND_UPSERT}",
                            [(m, *acc) for m, acc in by_model.items()])

    def move_offsets(self, moved: list[tuple[int, str]], **meta: str | int | None) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE results SET off = ? WHERE custom_id = ?", moved)
            self.set_meta(**meta)

    def forget_all(self) -> None:
        """--fresh: the job starts over (its previous output was set aside)."""
        with self.transaction() as db:
            db.execute("DELETE FROM results")
            db.execute("DELETE FROM failures")
            db.execute("DELETE FROM spare")
            db.execute("DELETE FROM spend")
            self.set_meta(output_size=0, output_crc=0, fingerprint=None, dead_lines=0,
                          replaced=0, unseen_usd=None, inflight_allowance_usd=None)

    # -- reading --------------------------------------------------------------------------
    def live_ranges(self) -> Iterator[tuple[str, int, int]]:
        """(custom_id, offset, length) of every result, in output order."""
        yield from self.db.execute("SELECT custom_id, off, len FROM results ORDER BY off")

    def lookup(self, ids: Sequence[str]) -> dict[str, StoredRow]:
        """What the index holds for each of ``ids`` (ids it knows nothing of are left
        out): two primary-key queries per 500 ids (results, then failures, which are few),
        so reading a million rows in input order costs 4,000 queries, not a million, and
        never the whole table in memory. Read-only."""
        results: dict[str, StoredResult] = {}
        failures: dict[str, StoredFailure] = {}
        for i in range(0, len(ids), LOOKUP_BATCH):
            chunk = ids[i : i + LOOKUP_BATCH]
            marks = ",".join("?" * len(chunk))
            for cid, *values in self.db.execute(
                "SELECT custom_id, req_hash, off, len, attempts, model, prompt_tokens, "
                "completion_tokens, cached_tokens, reasoning_tokens FROM results "
                f"WHERE custom_id IN ({marks})", chunk,
            ):
                results[cid] = StoredResult(*values)
            for cid, f_hash, transient, code, attempts, line in self.db.execute(
                "SELECT custom_id, req_hash, transient, error_code, attempts, line "
                f"FROM failures WHERE custom_id IN ({marks})", chunk,
            ):
                failures[cid] = StoredFailure(f_hash, bool(transient), code, attempts,
                                              bytes(line))
        out = {cid: StoredRow(result, failures.pop(cid, None))
               for cid, result in results.items()}
        out.update((cid, StoredRow(None, failure)) for cid, failure in failures.items())
        return out

    def failure_lines(self) -> Iterator[bytes]:
        for (line,) in self.db.execute("SELECT line FROM failures ORDER BY updated_at, custom_id"):
            yield bytes(line)

    def result_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def totals(self) -> Totals:
        t = Totals()
        t.results = self.result_count()
        t.failures = int(self.db.execute("SELECT COUNT(*) FROM failures").fetchone()[0])
        t.replaced = self.meta_int("replaced")
        # (A run's in-flight allowance counts until the run settles it: see Store.open.)
        t.unseen_usd = self.meta_float("unseen_usd") + self.meta_float("inflight_allowance_usd")
        for model, n, p, c, cached, reasoning in self.db.execute(
            "SELECT model, results, prompt_tokens, completion_tokens, cached_tokens, "
            "reasoning_tokens FROM spend"
        ):
            t.results_by_model[model or ""] = n
            t.spend_by_model[model or ""] = Usage(
                prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                cached_tokens=cached, reasoning_tokens=reasoning,
            )
        return t

    def failure_codes(self) -> dict[str, int]:
        return {code or "unknown": n for code, n in self.db.execute(
            "SELECT error_code, COUNT(*) FROM failures GROUP BY error_code")}

    # -- runs -----------------------------------------------------------------------------
    def start_run(self, started_at: str) -> int:
        cur = self.db.execute("INSERT INTO runs (started_at, pid) VALUES (?, ?)",
                              (started_at, os.getpid()))
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, finished_at: str, outcome: str, summary: str) -> None:
        self.db.execute("UPDATE runs SET finished_at = ?, outcome = ?, summary = ? WHERE id = ?",
                        (finished_at, outcome, summary, run_id))

    def last_run(self) -> tuple[dict[str, Any], str | None] | None:
        """The last run's row, and the summary it wrote (JSON) if it finished."""
        row = self.db.execute(
            "SELECT id, started_at, finished_at, outcome, pid, summary FROM runs "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return ({"id": row[0], "started_at": row[1], "finished_at": row[2], "outcome": row[3],
                 "pid": row[4]}, row[5])


def open_or_none(path: Path, *, verify: bool) -> tuple[Index | None, str | None]:
    """Open the index for writing, or (None, why) when it is missing or damaged."""
    if not path.exists():
        return None, "missing"
    try:
        return Index.open(path, verify=verify), None
    except sqlite3.DatabaseError as exc:
        return None, f"unreadable ({exc})"


def clean_close_record(path: Path) -> Path:
    return path.with_name(path.name + ".closed")


def record_clean_close(path: Path) -> None:
    """After a clean close: the database file's fingerprint, so the next open can skip
    the integrity check when nothing touched the file in between."""
    from batchgpt.store.output_log import Fingerprint

    try:
        if Path(str(path) + "-wal").exists():
            return  # not fully checkpointed: verify next time
        clean_close_record(path).write_text(Fingerprint.of(os.stat(path)).dumps())
    except OSError:
        pass


def closed_cleanly(path: Path) -> bool:
    """The database is exactly as batchgpt last closed it."""
    from batchgpt.store.output_log import Fingerprint

    try:
        recorded = clean_close_record(path).read_text()
        return recorded == Fingerprint.of(os.stat(path)).dumps()
    except OSError:
        return False


def forget_clean_close(path: Path) -> None:
    """Opened for writing: until the next clean close, a kill leaves it unverified."""
    clean_close_record(path).unlink(missing_ok=True)


def discard(path: Path) -> Path | None:
    """Move a damaged index aside (kept for a post-mortem, never reused)."""
    if not path.exists():
        return None
    from batchgpt.store.output_log import stamp

    aside = path.with_name(f"{path.name}.damaged-{stamp()}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = Path(str(path) + suffix)
        if extra.exists():
            os.replace(extra, Path(str(aside) + suffix))
    return aside


__all__ = [
    "Index", "NewFailure", "NewResult", "Settled", "StoredFailure",
    "StoredResult", "StoredRow", "Totals",
]
