"""Input JSONL → the exact request each row sends.

Three line forms are accepted, told apart by their keys:

1. Batch API request line ``{"custom_id", "method", "url", "body"}`` — the file a user
   would upload to OpenAI's Batch API runs here unchanged; body values win over the job's
   ``model``/``params`` defaults.
2. Chat line ``{"id", "messages", ...params}`` — a conversation; other keys are per-line
   request parameters.
3. Template line ``{"id", ...fields}`` — rendered through the job's ``prompt``.

Every row's request is canonicalised and hashed: the hash is what ties a stored result
to the request that produced it, so an edited prompt or parameter is noticed on resume.
The file is read in binary and by byte offset so a second pass can fetch just the
pending lines of a million-line file without holding it in memory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgpt.config import JobConfig, template_fields
from batchgpt.errors import InputError, InputProblem
from batchgpt.tokens import output_cap, prompt_tokens, request_cost

MAX_PROBLEMS = 50
CHAT_URLS = {"/v1/chat/completions", "/chat/completions"}
BATCH_KEYS = {"custom_id", "method", "url", "body"}
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True, slots=True)
class Row:
    """One input record, ready to send."""

    custom_id: str
    line: int
    body: dict[str, Any]
    request_hash: str

    @property
    def cost(self) -> int:
        """Tokens it counts against TPM (see batchgpt.tokens)."""
        return request_cost(self.body)

    @property
    def prompt_tokens(self) -> int:
        return prompt_tokens(self.body.get("messages"))

    @property
    def max_output_tokens(self) -> int | None:
        return output_cap(self.body)


class RowError(ValueError):
    """What is wrong with one line (the caller adds file and line)."""


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body).encode()).hexdigest()[:32]


# How json.dumps(..., ensure_ascii=False) writes a string (the C function where available).
_json_string = json.encoder.encode_basestring
# Strings a splice (below) must reproduce exactly: empty, quotes, escapes, control
# characters, non-ASCII, the separators JSON treats specially.
_SPLICE_PROBES = ("", "x", 'a "quoted" \\ back\\slash\n\t\r\b\f', "\x00\x1f\x7f",
                  "ünïcødé ✓ 日本 \u2028\u2029 \U0001f600", "{}[],:")


class RowBuilder:
    """Turns one parsed JSON line into a :class:`Row`, given the job's defaults."""

    __slots__ = ("_base", "_fields", "_job", "_splice")

    def __init__(self, job: JobConfig) -> None:
        self._job = job
        self._fields = template_fields(job.prompt) if job.prompt is not None else ["text"]
        base: dict[str, Any] = {}
        if job.model is not None:
            base["model"] = job.model
        base.update(job.params)
        self._base = base
        self._splice = self._template_splice()

    def _template_splice(self) -> tuple[str, str] | None:
        """For template rows: the canonical JSON of the request before and after the user
        message's content, the one part that differs between two template rows. A row's
        hash is then sha256(before + JSON string of its content + after), which is
        :func:`request_hash` of its request without building the request (a resume of a
        million done rows needs their hashes, not their requests). None, and template rows
        take the full path, when the job's defaults make them invalid (no model,
        ``stream``) or when the splice doesn't reproduce ``request_hash`` on every probe."""
        model = self._base.get("model")
        if not isinstance(model, str) or not model or self._base.get("stream"):
            return None
        marker = "\ue000batchgpt-splice\ue001"
        try:
            canonical = _canonical(self._template_body(marker))
            before, found, after = canonical.partition(_json_string(marker))
            if not found or _json_string(marker) in after:
                return None
            for probe in _SPLICE_PROBES:
                if before + _json_string(probe) + after != _canonical(
                    self._template_body(probe)
                ):
                    return None
        except (TypeError, ValueError):  # params that don't serialise: the full path says so
            return None
        return before, after

    def scan(self, record: Any, line: int, offset: int) -> ScannedRow:
        """What planning needs of a row: its id and request hash, with every check
        :meth:`build` makes (the same RowError). The request is built only if asked for."""
        splice = self._splice
        if (splice is not None and type(record) is dict and "messages" not in record
                and record.keys().isdisjoint(BATCH_KEYS)):
            custom_id, content = self._render(record)  # the checks of _template
            text = splice[0] + _json_string(content) + splice[1]
            digest = hashlib.sha256(text.encode()).hexdigest()[:32]
            return ScannedRow(custom_id, digest, offset, line, record, self)
        row = self.build(record, line)
        return ScannedRow(row.custom_id, row.request_hash, offset, line, row=row)

    def build(self, record: Any, line: int) -> Row:
        if not isinstance(record, dict):
            raise RowError(f"a line must be a JSON object, not {type(record).__name__}")
        if BATCH_KEYS & record.keys():
            custom_id, body = self._batch(record)
        elif "messages" in record:
            custom_id, body = self._chat(record)
        else:
            custom_id, body = self._template(record)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise RowError("no model: set `model` in the job file or in the line's body")
        if body.get("stream"):
            raise RowError("'stream': true is not supported in a batch")
        return Row(custom_id, line, body, request_hash(body))

    # -- the three forms -----------------------------------------------------------------
    def _batch(self, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        missing = [k for k in ("custom_id", "body") if k not in record]
        if missing:
            raise RowError(f"Batch API line without {' and '.join(repr(m) for m in missing)}")
        custom_id = _id(record["custom_id"], "custom_id")
        method = record.get("method", "POST")
        if method != "POST":
            raise RowError(f"'method' must be \"POST\", not {method!r}")
        url = record.get("url", "/v1/chat/completions")
        if url not in CHAT_URLS:
            raise RowError(f"'url' must be \"/v1/chat/completions\", not {url!r}")
        body = record["body"]
        if not isinstance(body, dict):
            raise RowError("'body' must be a JSON object")
        _check_messages(body.get("messages"), "body.messages")
        return custom_id, {**self._base, **body}

    def _chat(self, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if "id" not in record:
            raise RowError("chat line without 'id'")
        custom_id = _id(record["id"], "id")
        messages = record["messages"]
        _check_messages(messages, "messages")
        if self._job.system is not None and messages[0].get("role") not in ("system",
                                                                            "developer"):
            messages = [{"role": "system", "content": self._job.system}, *messages]
        params = {k: v for k, v in record.items() if k not in ("id", "messages", "metadata")}
        if "stream" in params:
            raise RowError("'stream' is not supported in a batch")
        return custom_id, {**self._base, **params, "messages": messages}

    def _template(self, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        custom_id, content = self._render(record)
        return custom_id, self._template_body(content)

    def _template_body(self, content: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if self._job.system is not None:
            messages.append({"role": "system", "content": self._job.system})
        messages.append({"role": "user", "content": content})
        return {**self._base, "messages": messages}

    def _render(self, record: dict[str, Any]) -> tuple[str, str]:
        """A template line's id and user message."""
        if "id" not in record:
            raise RowError("line without 'id' (or 'custom_id' for a Batch API line)")
        custom_id = _id(record["id"], "id")
        values = {}
        for name in self._fields:
            if name not in record:
                if self._job.prompt is None:
                    raise RowError(
                        "template line without 'text' (the job has no `prompt`, so a "
                        "record's 'text' is the message), and no 'messages'"
                    )
                raise RowError(f"missing field '{name}' used by the job's prompt")
            value = record[name]
            values[name] = value if isinstance(value, str) else json.dumps(
                value, ensure_ascii=False
            )
        return custom_id, (self._job.prompt or "{text}").format_map(values)


def _id(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError(f"'{key}' must be a string or an integer")
    text = str(value)
    if not text.strip():
        raise RowError(f"'{key}' is empty")
    return text


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{where}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"'{where}[{i}]' must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"'{where}[{i}].role' must be one of {sorted(ROLES)}, not {role!r}")
        if "content" not in message and role != "assistant":
            raise RowError(f"'{where}[{i}]' has no 'content'")


_decoder = json.JSONDecoder()


def _loads(text: str) -> Any:
    """``json.loads(text)``, twice as fast for the usual line: one JSON value followed by
    nothing but JSON whitespace (``json.loads`` also strips whitespace with two regexes).
    Anything else is handed to ``json.loads`` itself, so the value or the error is always
    exactly the one it gives."""
    try:
        value, end = _decoder.raw_decode(text)
    except ValueError:
        return json.loads(text)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return json.loads(text)
    return value


if sys.hash_info.width >= 64:

    def _id_key(custom_id: str) -> int:
        """A nonzero 64-bit hash of an id, for duplicate detection within one scan:
        Python's own string hash (SipHash, in C), a third of the cost of blake2b."""
        return hash(custom_id) or 1

else:  # pragma: no cover - a 32-bit build's hash() would collide far too often

    def _id_key(custom_id: str) -> int:
        digest = hashlib.blake2b(custom_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True) or 1


class _KeySet:
    """A set of nonzero 64-bit keys in one flat array kept at most half full (linear
    probing): 8 to 16 bytes a key where a Python set of ints takes ~70, so a million ids
    take 17 MB instead of 70."""

    __slots__ = ("_mask", "_n", "_table")

    def __init__(self, bits: int = 16) -> None:
        self._table = array("q", bytes(8 << bits))
        self._mask = (1 << bits) - 1
        self._n = 0

    def add(self, key: int) -> bool:
        """Add key; False when it was there already."""
        table, mask = self._table, self._mask
        i = key & mask
        while True:
            slot = table[i]
            if slot == key:
                return False
            if not slot:
                break
            i = (i + 1) & mask
        table[i] = key
        self._n += 1
        if self._n * 2 > mask:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table
        bits = (self._mask + 1).bit_length()  # twice the slots
        self._table = table = array("q", bytes(8 << bits))
        self._mask = mask = (1 << bits) - 1
        for key in old:
            if key:
                i = key & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = key


class ScannedRow:
    """A valid row and where it starts in the file. ``row``, the full request, is built on
    first use: planning a resume needs only the id and request hash of rows already done."""

    __slots__ = ("_builder", "_record", "_row", "custom_id", "line", "offset", "request_hash")

    def __init__(self, custom_id: str, request_hash: str, offset: int, line: int,
                 record: dict[str, Any] | None = None, builder: RowBuilder | None = None,
                 row: Row | None = None) -> None:
        self.custom_id = custom_id
        self.request_hash = request_hash
        self.offset = offset
        self.line = line
        self._record = record
        self._builder = builder
        self._row = row

    @property
    def row(self) -> Row:
        if self._row is None:
            assert self._builder is not None
            self._row = self._builder.build(self._record, self.line)
            self._record = None
        return self._row


class InputFile:
    """A JSONL input, read twice: :meth:`scan` validates every line and yields what resume
    needs; :meth:`read_at` rebuilds the rows that are pending, by byte offset."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.path = Path(job.input)
        self.builder = RowBuilder(job)

    def _open(self) -> Any:
        try:
            return self.path.open("rb")
        except FileNotFoundError:
            raise InputError([InputProblem(str(self.path), 0, "input file not found")]) from None
        except OSError as exc:
            raise InputError(
                [InputProblem(str(self.path), 0, f"cannot read input: {exc.strerror}")]
            ) from None

    def scan(self) -> Iterator[ScannedRow]:
        """Validate the whole file; yield each valid row. Raises InputError at the end if
        any line was bad (so nothing is sent for a file with a problem anywhere)."""
        problems: list[InputProblem] = []
        extra = 0
        # 64-bit hashes of ids in a flat array: 8-16 bytes a row, not the ids. The line a
        # duplicate first appeared on is looked up again only when there is one.
        seen = _KeySet()
        duplicates: dict[str, list[int]] = {}
        name = str(self.path)
        scan_row = self.builder.scan

        def problem(line: int, msg: str) -> None:
            nonlocal extra
            if len(problems) < MAX_PROBLEMS:
                problems.append(InputProblem(name, line, msg))
            else:
                extra += 1

        with self._open() as fh:
            offset = 0
            for number, raw in enumerate(fh, start=1):
                start = offset
                offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                    if number == 1:
                        text = text.removeprefix("\ufeff")
                    record = _loads(text)
                except UnicodeDecodeError:
                    problem(number, "not UTF-8 text")
                    continue
                except json.JSONDecodeError as exc:
                    problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
                    continue
                try:
                    scanned = scan_row(record, number, start)
                except RowError as exc:
                    problem(number, str(exc))
                    continue
                custom_id = scanned.custom_id
                if not seen.add(_id_key(custom_id)):
                    duplicates.setdefault(custom_id, []).append(number)
                    problem(number, f"duplicate id {custom_id!r}")
                    continue
                if not problems:
                    yield scanned
        if problems:
            if duplicates:
                problems = self._name_first_lines(problems, duplicates)
            raise InputError(problems, extra)

    def _name_first_lines(
        self, problems: list[InputProblem], duplicates: dict[str, list[int]]
    ) -> list[InputProblem]:
        first: dict[str, int] = {}
        with self._open() as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    record = json.loads(raw)
                    custom_id = str(record.get("custom_id", record.get("id")))
                except (ValueError, AttributeError):
                    continue
                if custom_id in duplicates and custom_id not in first:
                    first[custom_id] = number
                    if len(first) == len(duplicates):
                        break
        out = []
        for p in problems:
            for custom_id, lines in duplicates.items():
                if p.line in lines and custom_id in first and first[custom_id] != p.line:
                    p = InputProblem(p.path, p.line, f"{p.message} (first on line "
                                     f"{first[custom_id]})")
                    break
            out.append(p)
        return out

    def read_at(self, offsets: Iterator[tuple[int, int]]) -> Iterator[Row]:
        """Rebuild rows at (offset, line) positions, in file order."""
        with self._open() as fh:
            for offset, line in offsets:
                fh.seek(offset)
                raw = fh.readline()
                yield self.builder.build(json.loads(raw), line)
