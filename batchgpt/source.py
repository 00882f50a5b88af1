"""Input JSONL → the exact request each row sends.

A file holds one of three line forms (the job's ``input_format``, or ``auto``: by the keys
of its first valid line):

1. Batch API request line ``{"custom_id", "method", "url", "body"}`` — the file a user
   would upload to OpenAI's Batch API runs here unchanged; body values win over the job's
   ``model``/``params`` defaults. (auto: it has ``custom_id`` and an object ``body``.)
2. Chat line ``{"id", "messages", ...params}`` — a conversation; other keys are per-line
   request parameters. (auto: ``messages`` is a list of objects that each have a ``role``.)
3. Template record ``{"id", ...fields}`` — rendered through the job's ``prompt`` by plain
   field substitution. (auto: anything else, so a record may have a field named ``body``.)

Every row's request is canonicalised and hashed: the hash is what ties a stored result
to the request that produced it, so an edited prompt or parameter is noticed on resume.
The file is read in binary and by byte offset so a second pass can fetch just the
pending lines of a million-line file without holding it in memory; it must therefore be a
regular file (not a pipe, which can be read once).

Input is data the job's author did not write: every line that can't become a request the
server can read (JSON that Python reads but a server doesn't — NaN, Infinity, 1e999 —, text
that is not valid UTF-8 once decoded — a lone surrogate from a ``\ud800`` escape —,
numbers or nesting too large to read) is a ``file:line:`` problem before anything is sent.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import math
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from batchgpt.config import JobConfig, template_parts
from batchgpt.errors import ConfigError, InputError, InputProblem
from batchgpt.files import NotRegularFile, open_regular
from batchgpt.tokens import output_cap, prompt_tokens, request_cost

MAX_PROBLEMS = 50
# A request's output cap and choice count, sanity-bounded: the token estimate, the dry run's
# cost and the budget multiply them (10**400 would make every figure infinite).
CAP_KEYS = ("max_tokens", "max_completion_tokens", "n")
MAX_CAP = 100_000_000
# Deepest nesting of arrays and objects a line may have (the line's own object is level
# 1). Far beyond any real request, far below what Python's recursion limit lets the JSON
# encoder and the HTTP client serialise.
MAX_DEPTH = 100
CHAT_URLS = {"/v1/chat/completions", "/chat/completions"}
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

Form = Literal["batch", "chat", "template"]
FORM_NAMES: dict[str, str] = {
    "batch": "a Batch API line", "chat": "a chat line", "template": "a template record",
}
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"

log = logging.getLogger(__name__)


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
        try:
            return request_cost(self.body)
        except (TypeError, ValueError, OverflowError):
            # an 'n' that is not a number: the server refuses the request (a 400, a
            # failed row); until then it is counted as one choice
            return request_cost({k: v for k, v in self.body.items() if k != "n"})

    @property
    def prompt_tokens(self) -> int:
        return prompt_tokens(self.body.get("messages"))

    @property
    def max_output_tokens(self) -> int | None:
        return output_cap(self.body)


class RowError(ValueError):
    """What is wrong with one line (the caller adds file and line)."""


class MissingField(RowError):
    """A line without a field the job uses (in its prompt, its id template, or its
    id_field): a problem of the line, unless no line has the field — then it is the job
    file's (see InputFile.scan)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class MissingModel(RowError):
    """A line whose request has no model: the line's problem, unless no line names a model
    and the job sets none — then the job file's."""


# What a line's problem is about, when it may turn out to be the job file's:
# ("field", name) or ("model",); None for everything else.
Tag = tuple[str, ...] | None


def _canonical(body: dict[str, Any]) -> str:
    """The request as the hash sees it. ``allow_nan=False`` changes no output: it only
    raises ValueError on NaN and infinities, which are not JSON."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def request_hash(body: dict[str, Any]) -> str:
    """Raises UnicodeEncodeError (a lone surrogate), ValueError (NaN, an infinity) or
    RecursionError for a body that can't be sent."""
    return hashlib.sha256(_canonical(body).encode()).hexdigest()[:32]


# How json.dumps(..., ensure_ascii=False) writes a string (the C function where available).
_json_string = json.encoder.encode_basestring
# json.dumps(value, ensure_ascii=False) for a template field that is not a string, without
# building an encoder per call, refusing NaN and infinities.
_json_value = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
# Strings a splice (below) must reproduce exactly: empty, quotes, escapes, control
# characters, non-ASCII, the separators JSON treats specially.
_SPLICE_PROBES = ("", "x", 'a "quoted" \\ back\\slash\n\t\r\b\f', "\x00\x1f\x7f",
                  "ünïcødé ✓ 日本 \u2028\u2029 \U0001f600", "{}[],:")

class RowBuilder:
    """Turns one parsed JSON line into a :class:`Row`, given the job's defaults."""

    __slots__ = ("_base", "_chat_skip", "_fixed", "_id_key", "_id_parts", "_job", "_parts",
                 "_splice", "id_fields")

    def __init__(self, job: JobConfig) -> None:
        self._job = job
        self._fixed: Form | None = None if job.input_format == "auto" else job.input_format
        # The prompt as (literal text, field name or None) pairs: rendering is a join, not
        # ``str.format_map``. The job refused at load what plain substitution can't do.
        self._parts = tuple(template_parts(job.prompt if job.prompt is not None else "{text}"))
        # A record's id: the field `_id_key` ('id', or the job's id_field), or, with the
        # job's `id` template, `_id_parts` rendered (then `_id_key` is None).
        self._id_key: str | None = None if job.id is not None else job.id_field or "id"
        self._id_parts = template_parts(job.id) if job.id is not None else []
        #: Fields the job's id is made of, when the job says (id_field, id).
        self.id_fields: list[str] = (
            [job.id_field] if job.id_field is not None
            else list(dict.fromkeys(f for _, f in self._id_parts if f is not None))
        )
        # A chat line's keys that are not request parameters: its id's fields among them.
        self._chat_skip = frozenset(("id", "messages", "metadata", *self.id_fields))
        base: dict[str, Any] = {}
        if job.model is not None:
            base["model"] = job.model
        base.update(job.params)
        self._base = base
        _check_job_values(job)
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

    def form(self, record: Any) -> Form | None:
        """The form a parsed line is read as: the job's ``input_format``, or by its keys;
        None for a line that is not an object."""
        if not isinstance(record, dict):
            return None
        if self._fixed is not None:
            return self._fixed
        if "custom_id" not in record and "messages" not in record:
            return "template"  # the usual case, decided without a call
        return _form_of(record)

    def scan(self, record: Any, line: int, offset: int, form: Form | None = None
             ) -> ScannedRow:
        """What planning needs of a row: its id and request hash, with every check
        :meth:`build` makes (the same RowError). The request is built only if asked for."""
        if form is None:
            form = self.form(record)
        splice = self._splice
        if form == "template" and splice is not None:
            custom_id, content = self._render(record)  # the checks of _template
            try:
                data = (splice[0] + _json_string(content) + splice[1]).encode()
            except UnicodeEncodeError:
                raise RowError(self._unencodable(record, "template")) from None
            digest = hashlib.sha256(data).hexdigest()[:32]
            return ScannedRow(custom_id, digest, offset, line, record, self)
        row = self.build(record, line, form)
        return ScannedRow(row.custom_id, row.request_hash, offset, line, row=row)

    def build(self, record: Any, line: int, form: Form | None = None) -> Row:
        if form is None:
            form = self.form(record)
        if form is None:
            raise RowError(f"a line must be a JSON object, not {type(record).__name__}")
        if form == "batch":
            custom_id, body = self._batch(record)
        elif form == "chat":
            custom_id, body = self._chat(record)
        else:
            custom_id, body = self._template(record)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise MissingModel("no model: set `model` in the job file or in the line's body")
        if body.get("stream"):
            raise RowError("'stream': true is not supported in a batch")
        for key in CAP_KEYS:  # what every estimate and the budget multiply by
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and not (
                    0 <= value <= MAX_CAP):
                raise RowError(f"'{key}' is out of range: at most {MAX_CAP:,}")
        try:
            digest = request_hash(body)
        except UnicodeEncodeError:
            raise RowError(self._unencodable(record, form)) from None
        except RecursionError:
            raise RowError(TOO_DEEP) from None
        except ValueError:  # allow_nan=False
            raise RowError(self._non_finite(record, form)) from None
        return Row(custom_id, line, body, digest)

    def mixed(self, record: dict[str, Any], form: Form, file_form: Form, first: int) -> str:
        """The problem of a line whose form is not the file's."""
        return (f"{_describe(record, form, file_form)}, but line {first} is "
                f"{FORM_NAMES[file_form]}: one file holds one form; set input_format to choose")

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
        if not isinstance(url, str) or url not in CHAT_URLS:
            raise RowError(f"'url' must be \"/v1/chat/completions\", not {url!r}")
        body = record["body"]
        if not isinstance(body, dict):
            raise RowError("'body' must be a JSON object")
        _check_messages(body.get("messages"), "body.messages")
        return custom_id, {**self._base, **body}

    def _chat(self, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        custom_id = self._record_id(record, "chat line")
        if "messages" not in record:
            raise RowError("chat line without 'messages' (a list of {'role', 'content'})")
        messages = record["messages"]
        _check_messages(messages, "messages")
        if self._job.system is not None and messages[0].get("role") not in ("system",
                                                                            "developer"):
            messages = [{"role": "system", "content": self._job.system}, *messages]
        skip = self._chat_skip
        params = {k: v for k, v in record.items() if k not in skip}
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
        """A template line's id and user message: the prompt's literal text and its
        fields' values, joined (a field that is not a string is written as JSON)."""
        key = self._id_key
        if key is None:
            custom_id = self._template_id(record)
        else:
            try:
                value = record[key]
            except KeyError:
                raise self._without_id(record) from None
            custom_id = _id(value, key)
        pieces: list[str] = []
        for literal, name in self._parts:
            pieces.append(literal)
            if name is None:
                continue
            try:
                value = record[name]
            except KeyError:
                raise MissingField(self._without_field(record, name), name) from None
            if not isinstance(value, str):
                try:
                    value = _json_value(value)
                except RecursionError:
                    raise RowError(TOO_DEEP) from None
                except ValueError:
                    raise RowError(_non_finite_in(value, name)
                                   or f"field '{name}' can't be written as JSON") from None
            pieces.append(value)
        return custom_id, "".join(pieces)

    def _record_id(self, record: dict[str, Any], what: str) -> str:
        """A template record's or chat line's id (``what`` names the line's form)."""
        key = self._id_key
        if key is None:
            return self._template_id(record)
        if key not in record:
            if key == "id":
                raise RowError(f"{what} without 'id'")
            raise MissingField(f"{what} without '{key}', the job's id_field"
                               f"{_did_you_mean(key, record)}", key)
        return _id(record[key], key)

    def _template_id(self, record: dict[str, Any]) -> str:
        """The id the job's ``id`` template makes of a record: its fields' values (each a
        string or an integer) joined with the template's literal text."""
        pieces: list[str] = []
        for literal, name in self._id_parts:
            pieces.append(literal)
            if name is None:
                continue
            try:
                value = record[name]
            except KeyError:
                raise MissingField(f"missing field '{name}' used by the job's id", name
                                   ) from None
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise RowError(f"field '{name}' used by the job's id must be a string or an "
                               f"integer, not {_json_kind(value)}")
            pieces.append(value if isinstance(value, str) else str(value))
        text = "".join(pieces)
        if not text.strip():
            raise RowError(f"the id is empty: the job's id template {_short(self._job.id)!r} "
                           f"gives {text!r} for this record")
        if not text.isascii() and has_surrogate(text):
            raise RowError(_surrogate_message("id", text))
        return text

    # -- what to say -----------------------------------------------------------------------
    def _without_id(self, record: dict[str, Any]) -> RowError:
        key = self._id_key
        if key is not None and key != "id":
            return MissingField(f"record without '{key}', the job's id_field"
                                f"{_did_you_mean(key, record)}", key)
        if self._fixed is not None:
            return RowError("template record without 'id' (input_format: template)")
        if "custom_id" in record:
            return RowError("line without 'id': it has 'custom_id' but "
                            + _why_not_batch(record) + ", so it is not a Batch API line")
        return RowError("line without 'id' (or 'custom_id' for a Batch API line)")

    def _without_field(self, record: dict[str, Any], name: str) -> str:
        if self._job.prompt is not None:
            return f"missing field '{name}' used by the job's prompt"
        message = ("template line without 'text' (the job has no `prompt`, so a record's "
                   "'text' is the message)")
        if self._fixed is not None:
            return message
        if "messages" in record:
            return f"{message}; not a chat line either: {_why_not_chat(record['messages'])}"
        return f"{message}, and no 'messages'"

    def _sent_parts(self, record: dict[str, Any], form: Form) -> list[tuple[str, Any]]:
        """The parts of a line that go into its request, with their names in the line."""
        if form == "batch":
            return [("body", record.get("body"))]
        if form == "chat":
            return [(k, v) for k, v in record.items() if k not in self._chat_skip
                    or k == "messages"]
        return [(name, record[name]) for _, name in self._parts
                if name is not None and name in record]

    def _unencodable(self, record: dict[str, Any], form: Form) -> str:
        for name, value in self._sent_parts(record, form):
            found = _find(value, has_surrogate, _key_path("", name))
            if found is not None:
                return _surrogate_message(*found)
        return "the request cannot be written as UTF-8 (a lone surrogate)"

    def _non_finite(self, record: dict[str, Any], form: Form) -> str:
        for name, value in self._sent_parts(record, form):
            message = _non_finite_in(value, name)
            if message:
                return message
        return "the request holds a number that is not finite (NaN or Infinity)"


def _form_of(record: dict[str, Any]) -> Form:
    """auto: a Batch API line has 'custom_id' and an object 'body'; a chat line has
    'messages', a list of objects that each have a 'role'; anything else is a template
    record."""
    if "custom_id" in record and isinstance(record.get("body"), dict):
        return "batch"
    messages = record.get("messages")
    if isinstance(messages, list) and all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        return "chat"
    return "template"


def _why_not_batch(record: dict[str, Any]) -> str:
    if "custom_id" not in record:
        return "no 'custom_id'"
    return "no 'body'" if "body" not in record else "its 'body' is not an object"


def _why_not_chat(messages: Any) -> str:
    if not isinstance(messages, list):
        return "its 'messages' is not a list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"its 'messages[{i}]' is not an object"
        if "role" not in message:
            return f"its 'messages[{i}]' has no 'role'"
    return "its 'messages' is a conversation"  # pragma: no cover - it would be a chat line


def _describe(record: dict[str, Any], form: Form, versus: Form) -> str:
    """A line's form and what makes it that form rather than ``versus``."""
    if form == "batch":
        return "a Batch API line (it has 'custom_id' and an object 'body')"
    if form == "chat":
        return "a chat line (it has 'messages')"
    if versus == "batch":
        return f"a template record ({_why_not_batch(record)})"
    if "messages" in record:
        return f"a template record ({_why_not_chat(record['messages'])})"
    return "a template record (no 'messages')"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else type(value).__name__


def _short(text: str | None, limit: int = 60) -> str:
    """Data from a record, fit for a one-line message: cut to ``limit`` characters, and
    line breaks and other control characters escaped (a problem is one line)."""
    text = text or ""
    text = text if len(text) <= limit else text[:limit] + "…"
    if text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _did_you_mean(name: str, record: dict[str, Any]) -> str:
    """"; did you mean 'ticket_id'?" when the record has a field close to ``name``."""
    close = _close_field(name, record)
    return f"; did you mean '{close}'?" if close else ""


def _close_field(name: str, fields: Any) -> str | None:
    names = [f for f in fields if isinstance(f, str)]
    for f in names:
        if f.lower() == name.lower():
            return f
    found = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return found[0] if found else None


def _id(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowError(f"'{key}' must be a string or an integer")
    text = str(value)
    if not text.strip():
        raise RowError(f"'{key}' is empty")
    if not text.isascii() and has_surrogate(text):
        raise RowError(_surrogate_message(key, text))
    return text


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{where}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"'{where}[{i}]' must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RowError(f"'{where}[{i}].role' must be one of {sorted(ROLES)}, not {role!r}")
        if "content" not in message and role != "assistant":
            raise RowError(f"'{where}[{i}]' has no 'content'")


# -- values that JSON text can hold but a request can't -------------------------------------
def has_surrogate(value: Any) -> bool:
    """A string that can't be written as UTF-8: it holds a lone surrogate (what a JSON
    escape like "\\ud800" without its other half decodes to)."""
    if not isinstance(value, str) or value.isascii():
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _key_path(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _find(value: Any, test: Callable[[Any], bool], path: str) -> tuple[str, Any] | None:
    """The first value or object key under ``value`` that passes ``test``, with its path
    (``messages[0].content``); without recursion, so no depth can break it."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if test(item):
            return where, item
        if isinstance(item, dict):
            children = []
            for key, child in item.items():
                inner = _key_path(where, key)
                if test(key):
                    return inner, key
                children.append((inner, child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend((_key_path(where, i), child)
                         for i, child in reversed(list(enumerate(item))))
    return None


def _surrogate_message(where: str, text: str) -> str:
    char = next(c for c in text if "\ud800" <= c <= "\udfff")
    return (f"'{where}' cannot be written as UTF-8: it holds the lone surrogate "
            f"\\u{ord(char):04x} (half of a UTF-16 pair, from a broken JSON escape)")


def _non_finite_in(value: Any, path: str) -> str:
    """The problem of the first NaN or infinity under ``value`` ('' if there is none)."""
    found = _find(value, _is_non_finite, path)
    if found is None:
        return ""
    where, number = found
    name = "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"
    return (f"'{where}' is {name}, which is not a JSON number (NaN, Infinity and numbers "
            "too large for a double, like 1e999, can't be sent)")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (without recursion)."""
    if not isinstance(value, dict | list):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _check_job_values(job: JobConfig) -> None:
    """The job's own strings and numbers go into every request: the same rules."""
    for where, value in (("model", job.model), ("system", job.system),
                         ("prompt", job.prompt), ("params", job.params)):
        found = _find(value, has_surrogate, where)
        if found is not None:
            raise ConfigError(_surrogate_message(*found))
        message = _non_finite_in(value, where)
        if message:
            raise ConfigError(message)


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


@dataclass(frozen=True, slots=True)
class ResumeAt:
    """Where :meth:`InputFile.scan` starts when the lines before are known valid: the byte
    ``offset`` of the next line, the number of the last line before it, the file's form
    and the line its first valid row is on (for the mixed-forms message)."""

    offset: int
    line: int
    form: Form
    first: int


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

    @property
    def record(self) -> dict[str, Any] | None:
        """The parsed input line, kept by a template row whose hash was spliced (its
        request is built only if :attr:`row` is asked for, which drops it); None for a
        row whose request was built by the scan."""
        return self._record


def _unreadable(exc: ValueError) -> str:
    """The problem of a line json could not read (other than a JSONDecodeError)."""
    if "integer string conversion" in str(exc):  # Python's limit on an integer's digits
        return f"a number with thousands of digits, more than can be read (the limit is " \
               f"{_int_digits()})"
    return f"invalid JSON: {exc}"


def _int_digits() -> int:
    get = getattr(sys, "get_int_max_str_digits", None)
    return int(get()) if get is not None else 4300


class _FirstRows:
    """What the bad lines before the first valid one had, to tell a job file's mistake from
    the input's: a field the job uses that *no* record has (``{txt}`` for ``text``), or no
    model in the job and none named by any line. Once a line is valid there can be no such
    mistake — that line has every field and a model — so only the lines before it are
    shown here, and the usual path (a valid file) never is.

    ``fields``: per form, each field the job uses and the job-file key that uses it;
    ``unseen``: those no line of that form has had so far."""

    __slots__ = ("fields", "first", "model_named", "records", "unseen", "valid")

    def __init__(self, builder: RowBuilder) -> None:
        job = builder._job
        id_key = "id_field" if job.id_field is not None else "id"
        id_fields = {f: id_key for f in builder.id_fields}
        prompt_fields = {f: "prompt" for _, f in builder._parts if f is not None}
        self.fields: dict[Form, dict[str, str]] = {
            "template": {**prompt_fields, **id_fields}, "chat": id_fields, "batch": {},
        }
        self.unseen: dict[Form, set[str]] = {k: set(v) for k, v in self.fields.items()}
        self.first: dict[Form, tuple[int, dict[str, Any]]] = {}
        self.records = 0
        self.model_named = False
        self.valid = False

    def note(self, record: Any, form: Form, line: int) -> None:
        """A line that is not valid (before the first that is), read as ``form``."""
        if not isinstance(record, dict):
            return
        self.records += 1
        self.first.setdefault(form, (line, record))
        unseen = self.unseen[form]
        if unseen:
            unseen.difference_update([f for f in unseen if f in record])
        if not self.model_named:
            holder = record.get("body") if form == "batch" else record
            model = holder.get("model") if form != "template" and isinstance(holder, dict) \
                else None
            self.model_named = isinstance(model, str) and bool(model)

    def job_file_mistakes(self, job: JobConfig, input_name: str
                          ) -> tuple[list[str], list[tuple[str, ...]]]:
        """The job file's mistakes (one message each, naming its line) and the tags of the
        per-line problems they account for."""
        if self.valid or not self.records:
            return [], []
        messages: list[str] = []
        resolved: list[tuple[str, ...]] = []
        for form, (line, record) in self.first.items():
            for field, key in self.fields[form].items():
                if field in self.unseen[form] and ("field", field) not in resolved:
                    messages.append(self._missing(job, key, field, input_name, line, record))
                    resolved.append(("field", field))
        if job.model is None and not self.model_named:
            messages.append(f"{job.where()}: no model: set `model:` in the job file; no line "
                            f"of {input_name} names one")
            resolved.append(("model",))
        return messages, resolved

    @staticmethod
    def _missing(job: JobConfig, key: str, field: str, input_name: str, line: int,
                 record: dict[str, Any]) -> str:
        fields = [f for f in record if isinstance(f, str)]
        close = _close_field(field, fields)
        listed = ", ".join(_short(f, 30) for f in fields[:12]) + (", …" if len(fields) > 12
                                                                    else "")
        hint = (f"; did you mean '{close}'? (line {line}'s fields: {listed})" if close
                else f" (line {line}'s fields: {listed})")
        nowhere = f"no record in {input_name} has a field '{field}'"
        if key == "prompt" and job.prompt is None:
            example = next((f for f in fields if f.isidentifier()
                            and f not in ("id", job.id_field)), "text")
            message = (f"{job.where()}: the job has no `prompt`, so a record's 'text' is its "
                       f"message, but {nowhere}{hint}; set `prompt:` to a template over "
                       f"the records' fields, e.g. prompt: \"{{{_short(example, 30)}}}\"")
            if job.input_format == "auto" and "messages" in record:
                message += (f"; and line {line} is not a chat line either: "
                            f"{_why_not_chat(record['messages'])}")
            return message
        uses = f"id_field is '{field}'" if key == "id_field" else f"{key} uses {{{field}}}"
        return f"{job.where(key)}: {uses}, but {nowhere}{hint}"


class InputFile:
    """A JSONL input, read twice: :meth:`scan` validates every line and yields what resume
    needs; :meth:`read_at` rebuilds the rows that are pending, by byte offset."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.path = Path(job.input)
        self.builder = RowBuilder(job)
        # A budget with an unknown price, or a likely misspelling.
        for check in [c for c in (job.model_price_check(),) if c is not None] + \
                job.fallback_price_checks():
            if check.fatal:
                raise ConfigError(check.message)
            log.warning("%s", check.message)

    def _open(self) -> io.BufferedReader:
        """The input, opened for reading once it is known to be a regular file: opening a
        pipe would block until something writes to it (in the event loop, deaf to
        SIGTERM), and a pipe can't be read twice or by position anyway."""
        name = str(self.path)
        try:
            return open_regular(self.path)
        except NotRegularFile as exc:
            raise InputError([InputProblem(
                name, 0, f"input is {exc.kind}, not a regular file: it is read twice, by "
                "position (every line checked first, then the lines to send read again by "
                "byte offset), so it must be a regular file; write the data to a file first")]
            ) from None
        except FileNotFoundError:
            raise InputError([InputProblem(name, 0, "input file not found")]) from None
        except OSError as exc:
            raise InputError(
                [InputProblem(name, 0, f"cannot read input: {exc.strerror}")]
            ) from None

    def scan(self, resume: ResumeAt | None = None) -> Iterator[ScannedRow]:
        """Validate the whole file; yield each valid row. Raises InputError at the end if
        any line was bad (so nothing is sent for a file with a problem anywhere).

        ``resume``: validate only from a byte offset on, the file before it being a
        verified prefix (:mod:`batchgpt.prefix`): valid, free of duplicate ids, and of
        the form given. The caller checks the rows read for ids of the prefix.

        A mistake of the job file that every line shows — a field the prompt (or the id)
        uses that no record has, no model anywhere — is one ConfigError naming the job
        file's line, not a problem per input line (see :class:`_FirstRows`); the input's
        other problems follow it."""
        # Problems found, first ones kept: those that may turn out to be the job file's
        # (tagged) apart, per tag, so that dropping them can't hide another problem.
        problems: list[InputProblem] = []
        untagged = 0
        held: dict[tuple[str, ...], list[InputProblem]] = {}
        held_count: dict[tuple[str, ...], int] = {}
        # 64-bit hashes of ids in a flat array: 8-16 bytes a row, not the ids. The line a
        # duplicate first appeared on is looked up again only when there is one.
        seen = _KeySet()
        duplicates: dict[str, list[int]] = {}
        name = str(self.path)
        first_rows = _FirstRows(self.builder)
        bad = False

        def problem(line: int, msg: str, tag: Tag = None) -> None:
            nonlocal untagged, bad
            bad = True
            if tag is None:
                untagged += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(InputProblem(name, line, msg))
                return
            count = held_count[tag] = held_count.get(tag, 0) + 1
            if count <= MAX_PROBLEMS:
                held.setdefault(tag, []).append(InputProblem(name, line, msg))

        if resume is not None:
            first_rows.valid = True  # the prefix holds valid rows
        for scanned in self._rows(problem, first_rows, resume):
            custom_id = scanned.custom_id
            if not seen.add(_id_key(custom_id)):
                duplicates.setdefault(custom_id, []).append(scanned.line)
                problem(scanned.line, f"duplicate id {custom_id!r}")
                continue
            if not bad:
                yield scanned
        mistakes, resolved = first_rows.job_file_mistakes(self.job, name)
        if not (bad or mistakes):
            return
        for tag in resolved:
            held.pop(tag, None)
            held_count.pop(tag, None)
        problems.extend(p for kept in held.values() for p in kept)
        problems.sort(key=lambda p: p.line)  # stable: a line's own order stays
        more = untagged + sum(held_count.values()) - min(len(problems), MAX_PROBLEMS)
        problems = problems[:MAX_PROBLEMS]
        if duplicates:
            problems = self._name_first_lines(problems, duplicates)
        if mistakes:
            text = "\n".join([*mistakes, *(str(p) for p in problems)])
            if more:
                text += f"\n… and {more} more problem(s) in the input not shown"
            raise ConfigError(text)
        raise InputError(problems, more)

    def _rows(self, problem: Callable[[int, str, Tag], None],
              first_rows: _FirstRows | None = None, resume: ResumeAt | None = None,
              ) -> Iterator[ScannedRow]:
        """Every valid row of the file (duplicates included); every other non-blank line
        goes to ``problem``. The first valid row's form is the file's (with
        ``input_format: auto``): a line of another form is a problem. Until that first
        valid row, each bad line is also shown to ``first_rows``."""
        builder = self.builder
        form_of = builder.form
        scan_row = builder.scan
        auto = self.job.input_format == "auto"
        file_form: Form | None = None
        first = 0
        offset = 0
        start_line = 1
        if resume is not None:
            offset, start_line = resume.offset, resume.line + 1
            file_form, first = resume.form, resume.first
        with self._open() as fh:
            if offset:
                fh.seek(offset)
            for number, raw in enumerate(fh, start=start_line):
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
                    problem(number, "not UTF-8 text", None)
                    continue
                except json.JSONDecodeError as exc:
                    problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})", None)
                    continue
                except ValueError as exc:
                    problem(number, _unreadable(exc), None)
                    continue
                except RecursionError:
                    problem(number, TOO_DEEP, None)
                    continue
                form = form_of(record)  # by the keys alone: no depth can break it
                try:
                    # Nesting can't exceed the number of brackets: counting them (in C)
                    # spares the walk for all but the rare line with many. The whole line
                    # counts, sent or not: the runner parses it again, deeper in the stack,
                    # where a line nested nearly as deep as this parse allows would not parse.
                    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(
                        record, MAX_DEPTH
                    ):
                        raise RowError(TOO_DEEP)
                    if form != file_form and auto and file_form is not None and form is not None:
                        raise RowError(builder.mixed(record, form, file_form, first))
                    scanned = scan_row(record, number, start, form)
                except RowError as exc:
                    tag: Tag = None
                    if isinstance(exc, MissingField):
                        tag = ("field", exc.field)
                    elif isinstance(exc, MissingModel):
                        tag = ("model",)
                    problem(number, str(exc), tag)
                    if file_form is None and first_rows is not None and form is not None:
                        first_rows.note(record, form, number)
                    continue
                except RecursionError:  # pragma: no cover - MAX_DEPTH keeps it away
                    problem(number, TOO_DEEP, None)
                    continue
                if file_form is None:
                    file_form, first = form, number
                    if first_rows is not None:
                        first_rows.valid = True
                yield scanned

    def _name_first_lines(
        self, problems: list[InputProblem], duplicates: dict[str, list[int]]
    ) -> list[InputProblem]:
        first: dict[str, int] = {}
        for scanned in self._rows(lambda line, msg, tag: None):
            custom_id = scanned.custom_id
            if custom_id in duplicates and custom_id not in first:
                first[custom_id] = scanned.line
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
