"""``batchgpt export``: one row per input record, in input order, joined with its result.

The output file holds results in completion order, one line per succeeded row, in the
Batch API's shape; failures are in another file; pending rows are nowhere. What a user
wants is a table: each record's own fields beside its reply, its status, its usage and
cost. Building it must not need the job in memory (a million rows), so it streams:

* the input is read in order with the same :meth:`InputFile.scan` a run uses (the same
  checks, ids and request hashes; an input a run would refuse is refused here too),
  500 rows at a time;
* for each batch, one SQL query asks the index what it holds (:meth:`Store.lookup`), and
  the result lines are read from the output at the offsets it records, each checked to be
  the line of its id (:func:`line_is_result_of`): an output changed behind the index is
  refused, never exported wrong;
* the store is opened read-only (:meth:`Store.open_readonly`): no lock, no repair, no
  write of any file, safe beside a running job.

Columns, in order (:data:`STATUS_COLUMNS` after the record's own):

* template records: the record's fields (a field named like one of the columns below, or
  whose name starts with ``input.``, is renamed ``input.<name>``: every field gets a
  column of its own); chat and Batch API lines: ``custom_id`` and ``last_user_message``;
* ``content`` (the first choice's message), then ``json.<key>`` for each top-level key of
  the reply parsed as JSON, when the job asks for JSON replies (:func:`validates_json`);
* ``status`` (``succeeded``, ``failed``, ``pending``), ``stale``, ``error_code``,
  ``error_message``, ``model``, ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``cost_usd``.

``stale`` is true for a result that answers an earlier version of the row's request (the
prompt, the model or the record changed since): it is still exported, since it is what
the output holds and was paid for, with ``status: succeeded``; a run with
``on_change: rerun`` would send the row again. When that new request failed, its error
is in ``error_code``/``error_message`` beside the older result.

CSV and Parquet need their columns before the first row is written, and a JSONL input
may add a field on any line. The columns are those of the first :data:`LOOKAHEAD` rows
(the union of their fields, in the order first seen), which are read before anything is
written. A field first seen after them is left out of CSV and Parquet, with one warning
at the end naming it; JSONL writes every row with all of its own fields. A first pass
collecting the union of every row's keys would cost another read of the input, and for
the ``json.<key>`` columns another parse of the whole output (about 10 % and 30 % of the
export's time at a million rows; benchmarks/export_scale.py).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batchgpt.config import JobConfig
from batchgpt.errors import ConfigError, ExitCode, StateError
from batchgpt.files import open_regular
from batchgpt.params import asks_for_json
from batchgpt.pricing import Price, cost_usd, resolve_price, split_batch_key
from batchgpt.source import InputFile, ScannedRow
from batchgpt.store import Store, StoredFailure, StoredResult, StoredRow
from batchgpt.store.index import clean_text
from batchgpt.store.output_log import encode_line, fsync_dir, line_is_result_of

log = logging.getLogger("batchgpt")

FORMATS = ("jsonl", "csv", "parquet")
BATCH = 500  # rows per index lookup (the index's own batch size)
LOOKAHEAD = 1_000  # rows read before the first is written: CSV and Parquet columns
ROW_GROUP = 20_000  # Parquet rows per row group (what is held in memory at once)
READ_GAP = 64 << 10  # result lines closer than this are read in one pread
READ_SPAN = 4 << 20  # ... up to this many bytes at once

STATUS_COLUMNS = ("status", "stale", "error_code", "error_message", "model",
                  "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")
RESERVED = frozenset(("content", *STATUS_COLUMNS))  # a record field of such a name is renamed
PARQUET_HINT = "pip install 'batchgpt[parquet]'"


class UsageError(ConfigError):
    """A command-line option the export can't follow (a format, a field name): exit 2."""

    exit_code = ExitCode.USAGE


def validates_json(job: JobConfig) -> bool:
    """Whether the job's replies are JSON, to be split into ``json.<key>`` columns: the job
    asks for them with ``params.response_format`` (``json_object`` or ``json_schema``), or
    its ``validate`` block checks them as JSON (``json: true`` or a ``json_schema``)."""
    checks = job.validation
    if checks is not None and (checks.json_ or checks.json_schema is not None):
        return True
    if checks is not None and checks.json_ is False:
        return False
    return asks_for_json(job.params.get("response_format"))


# -- what one row's state is ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RowState:
    """One row's status, given its current request and what the index holds for it."""

    status: str  # succeeded | failed | pending
    stale: bool  # the result answers an earlier version of the row's request
    result: StoredResult | None  # the result in the output (None: none)
    failure: StoredFailure | None  # the failure of the row's current request (None: none)


def row_state(request_hash: str, stored: StoredRow | None) -> RowState:
    """A result counts whatever request it answered (it is in the output and was paid
    for), flagged stale when that was an earlier one. A failure counts only when it is
    the current request's (or taken over from the failures file, hash unknown, as a run
    would read it): the failure of an older request says nothing of this one, which a
    run would send — pending."""
    if stored is None:
        return RowState("pending", False, None, None)
    result, failure = stored.result, stored.failure
    if failure is not None and failure.req_hash not in (request_hash, None):
        failure = None
    if result is not None:
        stale = result.req_hash is not None and result.req_hash != request_hash
        return RowState("succeeded", stale, result, failure if stale else None)
    if failure is not None:
        return RowState("failed", False, None, failure)
    return RowState("pending", False, None, None)


def reply_content(body: Any) -> Any:
    """The first choice's message content (None when there is none: a tool call, a
    refusal, a body of another shape)."""
    try:
        return body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None


def failure_error(failure: StoredFailure) -> dict[str, Any]:
    """The ``error`` object of a failures-file line (code, message, status, attempts, ...);
    the index keeps the code, so it is there even when the line is not readable."""
    try:
        obj = json.loads(failure.line)
        error = obj.get("error") if isinstance(obj, dict) else None
    except (ValueError, RecursionError):
        error = None
    out: dict[str, Any] = dict(error) if isinstance(error, dict) else {}
    out.setdefault("code", failure.error_code)
    out.setdefault("attempts", failure.attempts)
    out.setdefault("retryable", failure.transient)
    return out


class Pricer:
    """Cost of one row's usage through :func:`cost_usd` (the one place pricing rules
    live), each model's price resolved once and each (models, token counts) priced once:
    rows of one job repeat the same counts often, and building the usage and pricing it in
    exact decimals is most of an export's time otherwise. The memo is bounded."""

    MEMO = 1 << 16

    def __init__(self, overrides: dict[str, Price]) -> None:
        self._overrides = overrides
        self._prices: dict[str, Price | None] = {}
        self._memo: dict[tuple[str | None, str | None, int, int, int], float | None] = {}

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model not in self._prices:
            self._prices[model] = resolve_price(model, self._overrides)
        return self._prices[model]

    def cost(self, result: StoredResult, requested: str | None) -> float | None:
        """USD of a result at the answering model's price; when that model has none (a
        served alias), the requested model's; None when neither is known."""
        key = (result.model, requested, result.prompt_tokens, result.completion_tokens,
               result.cached_tokens)
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            pass
        # An answer of the Batch API is kept as `model@batch` and priced at Batch rates.
        model, batch = split_batch_key(result.model or "")
        value = cost_usd(result.usage, self.price(model) or self.price(requested), batch=batch)
        if len(memo) >= self.MEMO:
            memo.clear()
        memo[key] = value
        return value


# -- reading results from the output ------------------------------------------------------

class ResultReader:
    """Reads result lines from the output at the index's offsets, a batch at a time:
    lines close together (nearly always: results are appended about in input order) are
    read with one ``pread``. Every line is checked to be its id's."""

    def __init__(self, path: Path, job_path_hint: str, index_path: Path) -> None:
        self.path = path
        self._hint = job_path_hint
        self._index_path = index_path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            self._fd = None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, wanted: list[tuple[str, int, int]]) -> dict[str, bytes]:
        """``{custom_id: line}`` for (custom_id, offset, length) triples."""
        out: dict[str, bytes] = {}
        if not wanted:
            return out
        wanted.sort(key=lambda w: w[1])
        i = 0
        while i < len(wanted):
            start = wanted[i][1]
            end = start + wanted[i][2]
            j = i + 1
            while j < len(wanted):
                _, off, length = wanted[j]
                if off - end > READ_GAP or off + length - start > READ_SPAN:
                    break
                end = max(end, off + length)
                j += 1
            data = self._pread(start, end - start)
            for cid, off, length in wanted[i:j]:
                line = data[off - start: off - start + length]
                if not line_is_result_of(line, cid):
                    raise self.changed(cid, off)
                out[cid] = line
            i = j
        return out

    def _pread(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            return b""
        chunks = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def changed(self, custom_id: str, offset: int) -> StateError:
        return StateError(
            f"{self.path}: the line at byte {offset} is not the result of {custom_id!r} that "
            "the index records there: the output no longer matches its index (it changed "
            "while being read, e.g. compacted by a run going on beside, or the index is "
            "damaged). The export stopped (with -o, nothing was written). Run "
            f"`batchgpt run {self._hint}` once so that it re-indexes the output (it then "
            "sends the rows still pending; `--limit 1` sends at most one), and export again; "
            f"if this persists, move {self._index_path} aside first: the next run rebuilds "
            "it from the output and sends nothing twice"
        )


# -- joining records and results ------------------------------------------------------------

@dataclass
class ExportStats:
    """What an export wrote (for the closing line on stderr)."""

    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    stale: int = 0
    columns: list[str] = field(default_factory=list)  # written
    available: list[str] = field(default_factory=list)  # the table's, from its first rows
    dropped: dict[str, int] = field(default_factory=dict)  # field left out → first line
    path: Path | None = None

    def describe(self) -> str:
        where = str(self.path) if self.path is not None else "stdout"
        text = (f"exported {self.rows:,} rows to {where}: {self.succeeded:,} succeeded, "
                f"{self.failed:,} failed, {self.pending:,} pending")
        if self.stale:
            text += (f"; {self.stale:,} results answer an earlier version of their row's "
                     "request (stale: true)")
        return text


# Record fields starting so are renamed too: the export's own columns (``json.…``), and
# the renamed fields' (``input.…``), so that no two fields ever share a column.
_RENAMED_PREFIXES = ("json.", "input.")


def record_columns(record: dict[str, Any]) -> dict[str, Any]:
    """A template record's fields as columns; one named like a column of the export's
    own (``status``, ``content``, ``json.…``) becomes ``input.<name>``, and so does one
    whose name starts with ``input.`` (``input.status`` becomes ``input.input.status``).
    The renaming is one-to-one and the same on every row: every field keeps its value
    in a column of its own, whatever other fields a record has."""
    if RESERVED.isdisjoint(record) and not any(
            k.startswith(_RENAMED_PREFIXES) for k in record):
        return record
    return {(f"input.{k}" if k in RESERVED or k.startswith(_RENAMED_PREFIXES) else k): v
            for k, v in record.items()}


def last_user_message(body: dict[str, Any]) -> Any:
    """The content of a request's last user message (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content
                               if isinstance(p, dict) and isinstance(p.get("text"), str))
            return content
    return None


class Joiner:
    """Streams ``(line, row)`` for every input row, in input order, from an open store."""

    def __init__(self, job: JobConfig, store: Store, reader: ResultReader,
                 stats: ExportStats) -> None:
        self.job = job
        self.store = store
        self.adopting = store.has_unadopted()
        self.reader = reader
        self.stats = stats
        self.source = InputFile(job)
        self.json_mode = validates_json(job)
        self.pricer = Pricer(job.pricing)
        self._template: bool | None = None  # the file's form, from its first row

    @property
    def template(self) -> bool:
        """The input holds template records (or nothing has been read yet)."""
        return self._template is not False

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        scan = self.source.scan()
        first = next(scan, None)  # the scan opens the input first: never a FIFO or a folder
        if first is None:
            return
        with open_regular(self.source.path) as raw:
            batch = [first]
            for scanned in scan:
                batch.append(scanned)
                if len(batch) >= BATCH:
                    yield from self._join(batch, raw)
                    batch = []
            if batch:
                yield from self._join(batch, raw)

    def _record(self, scanned: ScannedRow, raw: IO[bytes]) -> tuple[dict[str, Any], str | None]:
        """The row's own columns and the model its request names. A template record is
        the one the scan parsed (kept where its hash was spliced), else read again at its
        offset (the scan built its request, and kept that instead: a job whose defaults
        make no splice); a chat or Batch API line's request was built by the scan."""
        record = scanned.record
        if self._template is None:
            first = _line_at(raw, scanned) if record is None else record
            self._template = self.source.builder.form(first) == "template"
        if self._template:
            if record is None:
                record = _line_at(raw, scanned)
            return record_columns(record), self.job.model
        body = scanned.row.body
        model = body.get("model")
        return ({"custom_id": scanned.custom_id, "last_user_message": last_user_message(body)},
                model if isinstance(model, str) else None)

    def _join(self, batch: list[ScannedRow], raw: IO[bytes]
              ) -> Iterator[tuple[int, dict[str, Any]]]:
        if self.adopting:  # results taken over: which request each answers (in memory)
            self.store.adopt([(s.custom_id, s.request_hash) for s in batch])
        stored = self.store.lookup([s.custom_id for s in batch])
        states = [row_state(s.request_hash, stored.get(s.custom_id)) for s in batch]
        lines = self.reader.read([(s.custom_id, st.result.off, st.result.len)
                                  for s, st in zip(batch, states, strict=True)
                                  if st.result is not None])
        stats = self.stats
        for scanned, state in zip(batch, states, strict=True):
            row, requested = self._record(scanned, raw)
            result, failure = state.result, state.failure
            code = message = None
            if failure is not None:
                error = failure_error(failure)
                code, message = _text(error.get("code")), _text(error.get("message"))
            if result is None:
                row["content"] = None
                row.update(status=state.status, stale=False, error_code=code,
                           error_message=message, model=requested, prompt_tokens=None,
                           completion_tokens=None, total_tokens=None, cost_usd=None)
            else:
                content = reply_content(_body(lines[scanned.custom_id]))
                row["content"] = content
                if self.json_mode and isinstance(content, str):
                    parsed = _json_object(content)
                    if parsed is not None:
                        for key, value in parsed.items():
                            row[f"json.{key}"] = value
                p, c = result.prompt_tokens, result.completion_tokens
                row.update(status=state.status, stale=state.stale, error_code=code,
                           error_message=message, model=result.model or requested,
                           prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                           cost_usd=self.pricer.cost(result, requested))
            stats.rows += 1
            if state.status == "succeeded":
                stats.succeeded += 1
                stats.stale += state.stale
            elif state.status == "failed":
                stats.failed += 1
            else:
                stats.pending += 1
            yield scanned.line, row


def _line_at(raw: IO[bytes], scanned: ScannedRow) -> Any:
    """The input line the scan read at ``scanned.offset``, parsed again (a BOM on line 1
    is the scan's to skip too)."""
    raw.seek(scanned.offset)
    text = raw.readline().decode("utf-8")
    return json.loads(text.removeprefix("\ufeff") if scanned.line == 1 else text)


def _body(line: bytes) -> Any:
    try:
        obj = json.loads(line.decode("utf-8"))  # str: json.loads skips guessing the encoding
        return obj["response"]["body"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return None


def _json_object(content: str) -> dict[str, Any] | None:
    """The reply parsed as a JSON object; None when it is not one (a model that ignored
    the format, a reply cut by max_tokens)."""
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


@contextlib.contextmanager
def opened(job: JobConfig, job_hint: str) -> Iterator[tuple[Store, ResultReader]]:
    """The job's store, read-only, and its output opened for reading: writes, locks and
    repairs nothing. An index behind the output (a run killed before it recorded its last
    results) is brought in line on an in-memory copy, as ``status`` does."""
    store = Store(job)
    store.open_readonly()
    try:
        report = store.recovery
        if report.taken_over or report.lost or report.torn_bytes or report.unreadable_lines:
            for message in report.messages(store.out.path, dry=True):
                log.warning("%s (a run would do so; read as it is now)", message)
        with ResultReader(store.out.path, job_hint, store.db_path) as reader:
            yield store, reader
    finally:
        store.close()


# -- columns ------------------------------------------------------------------------------------

def columns_of(rows: Sequence[dict[str, Any]], json_mode: bool, template: bool) -> list[str]:
    """The columns of a table whose first rows are ``rows``: the record's fields and the
    JSON keys, each in the order first seen, around the export's own."""
    record: dict[str, None] = {} if template else {"custom_id": None,
                                                   "last_user_message": None}
    keys: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith("json."):  # a record's own "json.x" was renamed
                keys[key] = None
            elif key not in RESERVED:
                record[key] = None
    return [*record, "content", *(keys if json_mode else ()), *STATUS_COLUMNS]


def parse_fields(text: str | None, available: Sequence[str]) -> list[str] | None:
    """``--fields a,b``: the columns to write, in that order. Unknown names are an error
    that lists the available ones."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--fields: no field named; available: " + ", ".join(available))
    known = set(available)
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, available, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"--fields: unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(hints)}; available: {', '.join(available)}")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UsageError(f"--fields: {name!r} is named twice")
    return names


# -- writers -------------------------------------------------------------------------------------

Rows = Iterator[tuple[int, dict[str, Any]]]


def _cell(value: Any) -> str:
    """A CSV cell: text as is, nothing as empty, true/false, numbers as Python writes
    them, objects and lists as JSON."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(rows: Rows, sink: IO[bytes], fields: list[str] | None) -> None:
    """One JSON object per row: every field of the row (nothing is left out), or exactly
    ``fields``."""
    write = sink.write
    buf: list[bytes] = []
    for _, row in rows:
        buf.append(encode_line(row if fields is None else {f: row.get(f) for f in fields}))
        if len(buf) >= BATCH:
            write(b"".join(buf))
            buf = []
    write(b"".join(buf))


def _checked(rows: Rows, stats: ExportStats) -> Iterator[dict[str, Any]]:
    """Rows, noting the fields not among the table's columns (``stats.available``: left
    out of CSV and Parquet)."""
    known = set(stats.available)
    width = len(known)
    dropped = stats.dropped
    for line, row in rows:
        if len(row) > width or not known.issuperset(row):
            for key in row:
                if key not in known and key not in dropped:
                    dropped[key] = line
        yield row


# Columns whose values are always text, numbers or empty: the csv module writes them as
# they are (None as empty, numbers with str()), no conversion needed.
_PLAIN = frozenset(("status", "error_code", "error_message", "model", "prompt_tokens",
                    "completion_tokens", "total_tokens", "cost_usd"))


def write_csv(rows: Rows, sink: IO[bytes], columns: list[str], stats: ExportStats) -> None:
    """RFC 4180 quoting (stdlib ``csv``), UTF-8, ``\\n`` line ends; cells as :func:`_cell`
    writes them."""
    text = io.TextIOWrapper(sink, encoding="utf-8", errors="backslashreplace", newline="",
                            write_through=False)
    convert = [i for i, c in enumerate(columns) if c not in _PLAIN]
    cell = _cell

    def cells(row: dict[str, Any]) -> list[Any]:
        values = list(map(row.get, columns))
        for i in convert:
            value = values[i]
            if value is not None and type(value) is not str:
                values[i] = cell(value)
        return values

    try:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(map(cells, _checked(rows, stats)))
        text.flush()
    finally:
        text.detach()


_INT_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")


def pyarrow_modules() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a ConfigError saying how to install them (an
    optional extra: most users never need it, and it is a large wheel)."""
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ConfigError(f"--format parquet needs pyarrow, which is not installed: "
                          f"{PARQUET_HINT}") from None
    return pa, pq


def write_parquet(rows: Rows, sink: IO[bytes], columns: list[str], stats: ExportStats) -> None:
    """Row groups of :data:`ROW_GROUP` rows, written as they fill. Every column but the
    counts (int64), the cost (float64) and ``stale`` (bool) is a string: a JSONL field may
    hold a number on one line and text on the next, and a Parquet column has one type, so
    record fields and JSON values that are not text are written as JSON."""
    pa, pq = pyarrow_modules()
    types = {c: pa.string() for c in columns}
    types.update({c: pa.int64() for c in _INT_COLUMNS if c in types})
    if "cost_usd" in types:
        types["cost_usd"] = pa.float64()
    if "stale" in types:
        types["stale"] = pa.bool_()
    schema = pa.schema([(c, types[c]) for c in columns])
    converters: list[Callable[[Any], Any]] = [
        _as_is if c in _INT_COLUMNS or c in ("cost_usd", "stale") else _string
        for c in columns]
    writer = pq.ParquetWriter(sink, schema)
    try:
        group: list[list[Any]] = [[] for _ in columns]
        pairs = list(zip(columns, converters, group, strict=True))
        n = 0
        for row in _checked(rows, stats):
            for name, convert, values in pairs:
                values.append(convert(row.get(name)))
            n += 1
            if n >= ROW_GROUP:
                writer.write_table(_table(pa, schema, group))
                for values in group:
                    values.clear()
                n = 0
        if n or not stats.rows:
            writer.write_table(_table(pa, schema, group))
    finally:
        writer.close()


def _as_is(value: Any) -> Any:
    return value


def _string(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    return _cell(value)


def _table(pa: Any, schema: Any, group: list[list[Any]]) -> Any:
    arrays = []
    for f, values in zip(schema, group, strict=True):
        try:
            arrays.append(pa.array(values, type=f.type))
        except UnicodeEncodeError:  # a lone surrogate a server sent: kept, escaped
            arrays.append(pa.array([clean_text(v) if isinstance(v, str) else v
                                    for v in values], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# -- the command ----------------------------------------------------------------------------------

def check_destination(job: JobConfig, dest: Path, job_file: Path | None) -> None:
    """``-o`` must not replace the input, the job file or any of the job's own files (the
    output is the only copy of paid results), nor be a folder."""
    real = os.path.realpath(dest)
    own = [job.input, job.output, job.failures_path, job.summary_path]
    if job_file is not None:
        own.append(job_file)
    for path in own:
        if real == os.path.realpath(path):
            raise ConfigError(f"-o {dest} is the job's own {path.name}: an export must not "
                              "replace it; write it to another file")
    state = os.path.realpath(job.state_dir)
    if real.startswith(state + os.sep):
        raise ConfigError(f"-o {dest} is inside the job's state folder {job.state_dir}")
    if dest.is_dir():
        raise ConfigError(f"-o {dest} is a folder; name a file")


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside ``dest``, renamed over it once complete and fsynced: a
    reader of ``dest`` sees the previous file or the whole new one, and a failed export
    leaves no half file."""
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise StateError(f"cannot write {dest}: {exc.strerror}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open would create it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export(job: JobConfig, *, fmt: str = "jsonl", fields: str | None = None,
           dest: Path | None = None, job_file: Path | None = None,
           stdout: IO[bytes] | None = None) -> ExportStats:
    """Write the job's table to ``dest`` (atomically) or ``stdout``. Raises ConfigError
    for a bad format, field list or destination, StateError when the output does not
    match its index, InputError for an input a run would refuse."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet":
        pyarrow_modules()  # before anything is read
    if dest is not None:
        check_destination(job, dest, job_file)
    elif fmt == "parquet" and stdout is None and sys.stdout.isatty():
        raise UsageError("Parquet is a binary format: write it to a file with -o PATH")
    stats = ExportStats(path=dest)
    hint = str(job_file) if job_file is not None else "JOB"
    with opened(job, hint) as (store, reader):
        joiner = Joiner(job, store, reader, stats)
        rows = joiner.rows()
        head: list[tuple[int, dict[str, Any]]] = []
        for item in rows:
            head.append(item)
            if len(head) >= LOOKAHEAD:
                break
        columns = columns_of([r for _, r in head], joiner.json_mode, joiner.template)
        selected = parse_fields(fields, columns)
        stats.available = columns
        stats.columns = selected or columns

        def all_rows() -> Rows:
            yield from head
            head.clear()
            yield from rows

        def write(sink: IO[bytes]) -> None:
            if fmt == "jsonl":
                write_jsonl(all_rows(), sink, selected)
            elif fmt == "csv":
                write_csv(all_rows(), sink, stats.columns, stats)
            else:
                write_parquet(all_rows(), sink, stats.columns, stats)

        if dest is not None:
            with atomic_file(dest) as fh:
                write(fh)
        else:
            out = stdout if stdout is not None else _stdout()
            write(out)
            out.flush()
    if stats.dropped:
        names = list(stats.dropped.items())
        shown = ", ".join(f"{k!r} (first on line {line})" for k, line in names[:10])
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        log.warning("%d field%s not in the first %s rows left out of the %s columns: %s%s; "
                    "--format jsonl keeps every field", len(names),
                    "s" if len(names) > 1 else "", f"{LOOKAHEAD:,}", fmt.upper(), shown, more)
    return stats


def _stdout() -> IO[bytes]:
    sys.stdout.flush()
    return sys.stdout.buffer
