"""Output checks: a reply is accepted, or rejected with a reason and the words of a re-ask.

An HTTP 200 is not yet a result. JSON cut off by ``max_tokens``, a content-filtered
reply, a refusal, a reply that misses the schema or carries a term the user's compliance
rules ban would otherwise land in the output as if it were an answer. :class:`Checks` is
built once per job from the ``validate`` block (files read, schema and regex compiled, so
a mistake is a job-file error before anything is sent) and then judges each reply with
:meth:`Checks.judge` — a pure function of the reply and the request it answered.

The checks run in this order, and the first that fails names the reason:

1. ``finish_reason: content_filter`` and a ``refusal`` are never an answer;
2. a ``finish_reason`` outside ``finish_reasons`` (``length`` is ``truncated``);
3. ``max_chars``; 4. JSON (a reply cut by ``length`` is ``truncated``, not
   ``invalid_json``: the fix is more tokens, not a better prompt); 5. the JSON Schema;
6. ``regex``; 7. the deny list.

A re-ask (:func:`reask_messages`) is the original messages, the rejected reply as the
assistant's turn, and a user turn quoting the problem — for a schema, the failing path and
the schema itself — so the model can correct rather than start over.

Deny lists use pyahocorasick (Aho–Corasick, C): 10,000 terms over 1 MB of replies in
~0.03 s, where a regex alternation of the same terms took ~18 s (``benchmarks/deny_words.py``,
``docs/decisions.md``). Matching is on casefolded text with no word boundaries, so terms
in scripts without spaces (Chinese, Japanese) match.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgpt.config import JobConfig, ValidateSettings
from batchgpt.errors import ConfigError
from batchgpt.files import NotRegularFile, open_regular
from batchgpt.params import asks_for_json, response_format_schema

log = logging.getLogger("batchgpt")

# A user's regex (validate.regex, a schema's pattern) gets this long on one reply.
PATTERN_TIMEOUT_S = 1.0
_slow_patterns: set[str] = set()
_patterns: dict[str, Any] = {}
_Validator: Any = None

# The schema quoted in a re-ask is cut here: a model needs its shape, not megabytes.
MAX_QUOTED_SCHEMA_CHARS = 8000
# A deny-list file bigger than this is not a list of terms.
MAX_DENY_FILE_BYTES = 64 * 1024 * 1024
REASK_PREFIX = "Your previous reply was rejected"


class Reason(str, enum.Enum):
    """Why a reply was rejected (``error.reason`` in the failures file)."""

    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    DENIED_TERM = "denied_term"
    REGEX = "regex"
    TOO_LONG = "too_long"
    TRUNCATED = "truncated"  # finish_reason: length
    CONTENT_FILTER = "content_filter"
    REFUSAL = "refusal"
    FINISH_REASON = "finish_reason"  # another finish_reason not in finish_reasons


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str  # the term found, the schema path, the finish reason, ...
    problem: str  # one sentence, quoted in the re-ask and the failures file
    choice: int = 0  # the index in ``choices`` of the rejected one


class DenyList:
    """Terms that must not appear in a reply: case-insensitive substring matching of every
    term at once (Aho–Corasick), so its cost is one pass over the reply whatever the
    number of terms."""

    __slots__ = ("_automaton", "size")

    def __init__(self, terms: Iterable[str]) -> None:
        import ahocorasick

        automaton = ahocorasick.Automaton()
        size = 0
        for term in terms:
            key = term.strip().casefold()
            if key and automaton.add_word(key, term.strip()):
                size += 1
        self.size = size
        if size:
            automaton.make_automaton()
        self._automaton = automaton

    def find(self, text: str) -> str | None:
        """The first term (as written in the list) found in ``text``, or None."""
        if not self.size or not text:
            return None
        for _end, term in self._automaton.iter(text.casefold()):
            return str(term)
        return None


class Checks:
    """The ``validate`` block, compiled. See the module docstring for the order."""

    def __init__(self, settings: ValidateSettings, schema: dict[str, Any] | None,
                 deny: DenyList | None) -> None:
        self.settings = settings
        self.json_wanted = settings.json_
        self.schema = schema
        self.deny = deny
        self.regex = compile_pattern(settings.regex) if settings.regex is not None else None
        self.max_chars = settings.max_chars
        self.finish_reasons = (frozenset(settings.finish_reasons)
                               if settings.finish_reasons is not None else None)
        self.max_reasks = settings.max_reasks
        # Schemas of rows that bring their own response_format, compiled once each.
        self._validators: dict[str, Any] = {}

    @classmethod
    def for_job(cls, job: JobConfig) -> Checks | None:
        """The job's checks (None without a ``validate`` block). Reads and compiles
        everything now: a ConfigError naming the job file's line otherwise."""
        settings = job.validation
        if settings is None:
            return None
        schema = settings.json_schema
        if isinstance(schema, str):
            schema = _read_schema_file(job, schema)
        where, name = job.where("validate", "json_schema"), "validate.json_schema"
        if schema is None and settings.json_ is not False:  # json: false checks no JSON
            schema = response_format_schema(job.params.get("response_format"))
            where = job.where("params", "response_format")
            name = "params.response_format.json_schema.schema"
        if schema is not None:
            problem = schema_problem(schema)
            if problem is not None:
                raise ConfigError(f"{where}: {name} {problem}")
        deny = None
        terms = settings.deny_words
        if isinstance(terms, str):
            terms = _read_deny_file(job, terms)
        if terms is not None:
            deny = DenyList(terms)
        checks = cls(settings, schema, deny)
        if schema is not None:
            checks._validators[_schema_key(schema)] = _validator(schema)
        return checks

    # -- judging ----------------------------------------------------------------------------
    def judge(self, reply: Mapping[str, Any], request: Mapping[str, Any]) -> Rejection | None:
        """None when every choice of ``reply`` (a chat.completion) passes every check for
        ``request`` (the body sent); else the first problem found."""
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices:
            return Rejection(Reason.INVALID_JSON if self._wants_json(request) else
                             Reason.FINISH_REASON, "no choices",
                             "the reply holds no choices")
        for i, choice in enumerate(choices):
            rejection = self._judge_choice(choice if isinstance(choice, dict) else {}, request)
            if rejection is not None:
                return dataclasses.replace(rejection, choice=i) if i else rejection
        return None

    def _judge_choice(self, choice: Mapping[str, Any], request: Mapping[str, Any]
                      ) -> Rejection | None:
        finish = choice.get("finish_reason")
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        if finish == "content_filter":
            return Rejection(Reason.CONTENT_FILTER, "content_filter",
                             "the reply was stopped by the content filter")
        refusal = message.get("refusal")
        if refusal:
            text = str(refusal)
            return Rejection(Reason.REFUSAL, text[:200], f"the model refused: {text[:500]}")
        if self.finish_reasons is not None and (not isinstance(finish, str)
                                                or finish not in self.finish_reasons):
            if finish == "length":
                return _truncated()
            return Rejection(Reason.FINISH_REASON, str(finish),
                             f"the reply ended with finish_reason {finish!r}, not one of "
                             f"{sorted(self.finish_reasons)}")
        content = reply_text(message)
        if self.max_chars is not None and len(content) > self.max_chars:
            return Rejection(Reason.TOO_LONG, str(len(content)),
                             f"the reply is {len(content):,} characters long; at most "
                             f"{self.max_chars:,} are allowed")
        if self._wants_json(request):
            try:
                parsed = json.loads(content)
            except (ValueError, RecursionError) as exc:
                if finish == "length":
                    return _truncated()
                if isinstance(exc, RecursionError):
                    exc = ValueError("nested too deeply")
                return Rejection(Reason.INVALID_JSON, str(exc)[:200],
                                 f"the reply is not valid JSON ({exc})")
            schema = self.schema_for(request)
            if schema is not None:
                rejection = _schema_rejection(self._validators[_schema_key(schema)], parsed,
                                              schema)
                if rejection is not None:
                    return rejection
        if self.regex is not None:
            try:
                matched = self.regex.search(content, timeout=PATTERN_TIMEOUT_S) is not None
            except TimeoutError:
                _warn_slow_pattern(self.regex.pattern)
                return Rejection(Reason.REGEX, self.regex.pattern[:200],
                                 f"the reply could not be matched against the pattern "
                                 f"{self.regex.pattern!r} within {PATTERN_TIMEOUT_S:g} s")
            if not matched:
                return Rejection(Reason.REGEX, self.regex.pattern[:200],
                                 f"the reply does not match the pattern {self.regex.pattern!r}")
        if self.deny is not None:
            term = next((t for text in _deny_texts(content, message)
                         if (t := self.deny.find(text)) is not None), None)
            if term is not None:
                return Rejection(Reason.DENIED_TERM, term,
                                 f"the reply contains the term {term!r}, which is not allowed")
        return None

    def _wants_json(self, request: Mapping[str, Any]) -> bool:
        if self.schema is not None or self.json_wanted:
            return True
        if self.json_wanted is False:  # said explicitly: not even for response_format
            return False
        return asks_for_json(request.get("response_format"))

    def schema_for(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        """The job's schema, else the one the row's own response_format carries (a Batch
        API input line may bring its own), compiled once per distinct schema; a schema that
        does not compile is not checked (the server refuses such a request anyway)."""
        if self.schema is not None:
            return self.schema
        schema = response_format_schema(request.get("response_format"))
        if schema is None:
            return None
        key = _schema_key(schema)
        if key not in self._validators:
            self._validators[key] = (_validator(schema) if schema_problem(schema) is None
                                     else None)
        return schema if self._validators[key] is not None else None


def reply_text(message: Mapping[str, Any]) -> str:
    """A reply message's text ("" for none, as with tool calls)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return json.dumps(content, ensure_ascii=False)


def _deny_texts(content: str, message: Mapping[str, Any]) -> Iterator[str]:
    """The texts of a reply the deny list must not find a term in: its content and its
    tool calls' arguments, each also as its JSON strings decoded when it is JSON with
    escapes (``\\u673a`` is the term 机 to whoever reads the JSON)."""
    texts = [content]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            texts.append(arguments)
    for text in texts:
        yield text
        if "\\" in text:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                continue
            yield "\n".join(_json_strings(value))


def _json_strings(value: Any) -> Iterator[str]:
    """Every string (keys included) in a parsed JSON value, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def reask_messages(messages: Sequence[Any], reply: Mapping[str, Any], rejection: Rejection,
                   schema: Mapping[str, Any] | None) -> list[Any]:
    """The follow-up turn: ``messages`` as first sent, the rejected reply as the
    assistant's turn, and a user turn quoting the problem (with the schema, for a schema
    failure)."""
    choices = reply.get("choices")
    first = (choices[rejection.choice] if isinstance(choices, list)
             and rejection.choice < len(choices) else {})
    message = first.get("message") if isinstance(first, dict) else None
    message = message if isinstance(message, dict) else {}
    said = reply_text(message) or str(message.get("refusal") or "")
    ask = f"{REASK_PREFIX}: {rejection.problem}."
    if rejection.reason is Reason.SCHEMA and schema is not None:
        quoted = json.dumps(schema, ensure_ascii=False)
        if len(quoted) > MAX_QUOTED_SCHEMA_CHARS:
            quoted = quoted[:MAX_QUOTED_SCHEMA_CHARS] + " …"
        ask += f"\nThe JSON Schema the reply must satisfy:\n{quoted}"
    ask += "\n" + _FIX[rejection.reason]
    return [*messages, {"role": "assistant", "content": said}, {"role": "user", "content": ask}]


_FIX = {
    Reason.INVALID_JSON: "Reply again with only the corrected JSON, nothing before or after it.",
    Reason.SCHEMA: "Reply again with only JSON that satisfies the schema.",
    Reason.DENIED_TERM: "Reply again without that term.",
    Reason.REGEX: "Reply again in the required format.",
    Reason.TOO_LONG: "Reply again, shorter.",
    Reason.TRUNCATED: "The reply was cut off: reply again, complete and shorter.",
    Reason.CONTENT_FILTER: "Reply again within the content policy.",
    Reason.REFUSAL: "Reply again with an answer to the original request if you can.",
    Reason.FINISH_REASON: "Reply again with a complete text answer.",
}


def _truncated() -> Rejection:
    return Rejection(Reason.TRUNCATED, "length",
                     "the reply was cut off at max_tokens (finish_reason 'length')")


def _schema_key(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


def compile_pattern(pattern: str) -> Any:
    """A user's pattern, compiled with the ``regex`` package (``re``'s syntax, version 0)
    rather than ``re``: its ``search`` takes a timeout, so a pattern that backtracks
    catastrophically on some reply (``(a|aa)+$``) rejects that reply instead of blocking
    the event loop — where even SIGTERM could not stop the run."""
    import regex

    return regex.compile(pattern, regex.V0)


def _warn_slow_pattern(pattern: str) -> None:
    if pattern not in _slow_patterns:
        _slow_patterns.add(pattern)
        log.warning("the pattern %r took more than %g s on a reply, which is rejected; "
                    "simplify it (nested repetition such as (a+)+ backtracks exponentially)",
                    pattern[:200], PATTERN_TIMEOUT_S)


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any
                     ) -> Iterator[Any]:
    """JSON Schema's ``pattern``, as jsonschema's own but with a timeout (see
    :func:`compile_pattern`)."""
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "string"):
        return
    try:
        found = _cached_pattern(pattern).search(instance, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        _warn_slow_pattern(pattern)
        yield ValidationError(f"{instance[:80]!r} could not be matched against {pattern!r} "
                              f"within {PATTERN_TIMEOUT_S:g} s")
        return
    if found is None:
        yield ValidationError(f"{instance[:200]!r} does not match {pattern!r}")


def _pattern_properties_keyword(validator: Any, patterns: Mapping[str, Any], instance: Any,
                                schema: Any) -> Iterator[Any]:
    """JSON Schema's ``patternProperties``, with the timeout of :func:`_pattern_keyword`
    (a key that can't be matched in time is taken as not matching)."""
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        compiled = _cached_pattern(pattern)
        for key, value in instance.items():
            try:
                found = compiled.search(key, timeout=PATTERN_TIMEOUT_S)
            except TimeoutError:
                _warn_slow_pattern(pattern)
                found = None
            if found is not None:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _cached_pattern(pattern: str) -> Any:
    compiled = _patterns.get(pattern)
    if compiled is None:
        compiled = _patterns[pattern] = compile_pattern(pattern)
    return compiled


def _validator(schema: Mapping[str, Any]) -> Any:
    global _Validator
    if _Validator is None:
        from jsonschema import Draft202012Validator, validators

        _Validator = validators.extend(Draft202012Validator, {
            "pattern": _pattern_keyword, "patternProperties": _pattern_properties_keyword})
    return _Validator(schema)


def _schema_rejection(validator: Any, instance: Any, schema: Mapping[str, Any]
                      ) -> Rejection | None:
    from jsonschema.exceptions import best_match

    try:
        error = best_match(validator.iter_errors(instance))
    except RecursionError:
        return Rejection(Reason.SCHEMA, "$", "the reply is nested too deeply to check "
                         "against the schema")
    if error is None:
        return None
    path = error.json_path
    return Rejection(Reason.SCHEMA, path, f"at {path}: {error.message[:500]}")


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema (2020-12), or None. Only local
    ``$ref``s: batchgpt never fetches a schema over the network."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object (a mapping) or the path of a file holding one"
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
        remote = _remote_ref(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"is not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}"
    except RecursionError:
        return "is nested too deeply to be checked"
    if remote is not None:
        return (f"uses $ref {remote!r}: only references inside the schema (#/...) are "
                "supported; batchgpt never fetches a schema over the network")
    return None


def _remote_ref(node: Any) -> str | None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        return next((r for v in node.values() if (r := _remote_ref(v)) is not None), None)
    if isinstance(node, list):
        return next((r for v in node if (r := _remote_ref(v)) is not None), None)
    return None


def _job_relative(job: JobConfig, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute() and job.source is not None:
        path = job.source.resolve().parent / path
    return path


def _read_text(job: JobConfig, key: str, value: str, what: str) -> tuple[Path, bytes]:
    path = _job_relative(job, value)
    where = job.where("validate", key)
    try:
        with open_regular(path) as f:
            data = f.read(MAX_DENY_FILE_BYTES + 1)
    except NotRegularFile as exc:
        raise ConfigError(f"{where}: validate.{key}: {path} is {exc.kind}, not a regular "
                          f"file ({what})") from None
    except FileNotFoundError:
        raise ConfigError(f"{where}: validate.{key}: {path} not found ({what})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: validate.{key}: cannot read {path}: "
                          f"{exc.strerror or exc}") from None
    if len(data) > MAX_DENY_FILE_BYTES:
        raise ConfigError(f"{where}: validate.{key}: {path} is larger than "
                          f"{MAX_DENY_FILE_BYTES // 2**20} MB; it should hold {what}")
    return path, data


def _read_schema_file(job: JobConfig, value: str) -> dict[str, Any]:
    path, data = _read_text(job, "json_schema", value, "a JSON Schema")
    try:
        schema = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{job.where('validate', 'json_schema')}: validate.json_schema: "
                          f"{path} is not UTF-8 text") from None
    except ValueError as exc:
        raise ConfigError(f"{job.where('validate', 'json_schema')}: validate.json_schema: "
                          f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{job.where('validate', 'json_schema')}: validate.json_schema: "
                          f"{path} is nested too deeply to be read as a JSON Schema") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{job.where('validate', 'json_schema')}: validate.json_schema: "
                          f"{path} must hold a JSON Schema object")
    return schema


def _read_deny_file(job: JobConfig, value: str) -> list[str]:
    path, data = _read_text(job, "deny_words", value, "one term a line")
    where = job.where("validate", "deny_words")
    terms = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: validate.deny_words: {path}:{number}: not UTF-8 "
                              "text") from None
        if line.strip():
            terms.append(line.strip())
    if not terms:
        raise ConfigError(f"{where}: validate.deny_words: {path} holds no terms (one term "
                          "a line)")
    return terms
