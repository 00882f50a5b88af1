"""The job file: what to run, against what, how fast, and where the results go.

A job is a YAML file that cron can drive. Every key is declared here, so a misspelt key is
an error that names the key, its line, and the closest real key — a typo in ``limits``
must not silently run a job at unlimited speed.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
import string
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from batchgpt.credentials import base_url_problem, header_value_problem
from batchgpt.errors import ConfigError
from batchgpt.files import NotRegularFile, open_regular
from batchgpt.params import PriceCheck, param_suggestion, price_check
from batchgpt.pricing import Price, not_a_boolean

try:  # libyaml's parser where PyYAML was built with it: 20x faster on a big file
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - pure-Python PyYAML
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

# Request keys batchgpt sets itself; a job's `params` may not set them.
RESERVED_PARAMS = {"messages": "write messages in the input file", "stream": "streaming is not "
                   "supported in batches", "model": "use the job's `model` key"}


# Keys of a job that mode: batch cannot honour (the reply checks and model fallbacks).
ONLINE_ONLY = ("validate", "fallback_models")


# A job file is a few keys; anything bigger is data that belongs in the input file.
MAX_JOB_FILE_BYTES = 1024 * 1024
# Deep enough for a JSON schema in params.response_format, far from Python's recursion limit.
MAX_YAML_DEPTH = 64
# Values (scalars and collections): a megabyte of `[1,1,1,...]` would take seconds to build.
MAX_YAML_VALUES = 100_000

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class SettingError(ValueError):
    """A validator's error whose message names the key itself. ``at`` is the key path
    below the validated field (``("temperature",)`` under ``params``), so that the
    message can name the line of the key at fault rather than of the field."""

    def __init__(self, message: str, at: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


class _Strict(BaseModel):
    # No NaN or infinity anywhere: `timeout_s: .inf` would never time out, and a NaN
    # compares false to every bound.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """No boolean where a number is wanted, in any model of the job file: pydantic's
        lax mode reads ``true`` as 1 (``limits: {max_cost_usd: yes}`` was a $1 cap)."""
        if isinstance(value, bool) and info.field_name is not None and _is_number(
                cls.model_fields[info.field_name].annotation):
            return not_a_boolean(value)
        return value


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is a number (int or float), optional or constrained."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_number(get_args(annotation)[0])
    if origin is Union or isinstance(annotation, types.UnionType):
        return any(_is_number(arg) for arg in get_args(annotation))
    return annotation in (int, float)


class Limits(_Strict):
    """The account's limits for this model. Leave `rpm`/`tpm` out to learn them from the
    server's ``x-ratelimit-limit-*`` headers."""

    rpm: PositiveInt | None = Field(
        None, le=10**9, description="Requests per minute to stay under."
    )
    tpm: PositiveInt | None = Field(None, le=10**12, description="Tokens per minute to stay under.")
    concurrency: PositiveInt | None = Field(
        None, le=100_000,
        description="Ceiling on requests in flight (default: what the limits need).",
    )
    max_cost_usd: PositiveFloat | None = Field(
        None, description="Stop dispatching before the spend could exceed this (USD)."
    )
    batch_queue_tokens: PositiveInt | None = Field(
        None, le=10**12, description="mode: batch: the most prompt tokens enqueued at the "
        "provider at once (its enqueued-token limit for the model).")
    redis_url: str | None = Field(
        None, description="Share rpm/tpm (and, with shared_budget, max_cost_usd) with every "
        "run on the same account and model through this Redis (redis://, rediss://, unix://; "
        "default: $BATCHGPT_REDIS_URL; none: this run paces alone).")
    shared_budget: bool = Field(
        False, description="max_cost_usd holds across every run of this job that shares the "
        "Redis (the parts of a sharded job).")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise SettingError("limits.redis_url must be a redis://, rediss:// or unix:// "
                               "URL (e.g. redis://127.0.0.1:6379/0)")
        return value


class BatchSettings(_Strict):
    """``mode: batch``: how rows are packed into the provider's Batch API files, and how
    often ``--wait`` polls. The defaults are OpenAI's limits (50,000 requests and 200 MB a
    file), the size kept a little under so that a file is never refused for its size."""

    completion_window: Literal["24h"] = Field(
        "24h", description="The provider's completion window (OpenAI offers 24h).")
    max_lines: PositiveInt = Field(
        50_000, le=50_000, description="Rows per uploaded file (the provider's limit).")
    max_bytes: PositiveInt = Field(
        190_000_000, le=200_000_000, description="Bytes per uploaded file (under 200 MB).")
    poll_interval_s: PositiveFloat = Field(
        60.0, le=86400, description="How often --wait polls the provider, in seconds.")


class RetryPolicy(_Strict):
    """How often and how patiently a retryable failure is tried again."""

    max_attempts: PositiveInt = Field(6, description="Attempts per row, the first included.")
    initial_delay_s: PositiveFloat = Field(
        1.0, le=3600, description="Backoff before the 2nd attempt."
    )
    max_delay_s: PositiveFloat = Field(60.0, le=3600, description="Cap on one backoff delay.")
    multiplier: float = Field(2.0, ge=1.0, description="Backoff growth per attempt.")
    jitter: float = Field(0.25, ge=0.0, le=1.0, description="Random fraction taken off a delay.")


class ApiSettings(_Strict):
    """Where requests go. The key itself never appears in a job file: only the name of the
    environment variable that holds it."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or OpenAI)."
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the key.")
    organization: str | None = None
    project: str | None = None
    transport: Literal["aiohttp", "sdk"] = Field(
        "aiohttp",
        description="How each request is sent: `aiohttp` (a lean HTTP session with the "
        "SDK's URL, headers and timeouts; less CPU a request) or `sdk` (through the openai "
        "SDK's own request path).",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is not None:
            problem = base_url_problem(value)
            if problem is not None:
                raise SettingError(f"api.base_url {problem}")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _check_api_key_env(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):  # never quoted: it may be a pasted key
            raise SettingError(
                "api.api_key_env must be the name of an environment variable (letters, "
                "digits and _, e.g. OPENAI_API_KEY), not the key itself: the key goes in "
                "that variable, never in the job file"
            )
        return value

    @field_validator("organization", "project")
    @classmethod
    def _check_header(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            problem = header_value_problem(value)
            if problem is not None:
                raise SettingError(f"api.{info.field_name} {problem}")
        return value


class ValidateSettings(_Strict):
    """Checks every reply must pass before it is a result (see :mod:`batchgpt.checks`).
    A reply that fails is re-asked (a follow-up turn quoting the problem) up to
    ``max_reasks`` times, then the row fails with ``invalid_output``. Files named here
    (a schema, a deny list) are read, and the schema and regex compiled, before anything
    is sent."""

    json_: bool | None = Field(
        None, alias="json", description="The reply must parse as JSON (implied by json_schema "
        "and by params.response_format of type json_object or json_schema).")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="JSON Schema (2020-12) the parsed reply must satisfy, or the path of "
        "a file holding it (default: params.response_format.json_schema.schema).")
    deny_words: list[str] | str | None = Field(
        None, description="Terms that must not appear in the reply (case-insensitive, any "
        "script), or the path of a UTF-8 file with one term a line.")
    regex: str | None = Field(None, description="The reply must match this (re.search).")
    max_chars: PositiveInt | None = Field(None, description="Longest reply accepted.")
    finish_reasons: list[str] | None = Field(
        None, min_length=1, description="finish_reason values accepted (e.g. [stop]); a "
        "content filter or a refusal is never accepted.")
    max_reasks: int = Field(1, ge=0, le=10, description="Follow-up turns before the row "
                            "fails (or falls back).")

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            import regex  # what batchgpt.checks compiles it with (a search with a timeout)

            try:
                regex.compile(value, regex.V0)
            except regex.error as exc:
                raise SettingError(f"validate.regex does not compile: {exc}") from None
        return value

    @model_validator(mode="after")
    def _json_for_schema(self) -> ValidateSettings:
        if self.json_ is False and self.json_schema is not None:
            raise SettingError("validate.json is false but validate.json_schema is set: a "
                               "schema needs JSON; drop one of them", at=("json",))
        return self

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict | str):
            raise SettingError(f"validate.json_schema is {_kind(value)}: give a JSON Schema "
                               "(a mapping) or the path of a file holding one")
        return value

    @field_validator("deny_words", mode="before")
    @classmethod
    def _deny_words_shape(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, term in enumerate(value):
                if not isinstance(term, str):
                    raise SettingError(f"validate.deny_words[{i}] is {_kind(term)}, not a "
                                       "term; write it in quotes", at=(str(i),))
        elif value is not None and not isinstance(value, str):
            raise SettingError(f"validate.deny_words is {_kind(value)}: give a list of terms "
                               "or the path of a file with one term a line")
        return value

    @field_validator("deny_words")
    @classmethod
    def _check_deny_words(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            for i, term in enumerate(value):
                if not term.strip():
                    raise SettingError(f"validate.deny_words[{i}] is empty: an empty term "
                                       "would match every reply", at=(str(i),))
        elif isinstance(value, str) and not value.strip():
            raise SettingError("validate.deny_words is empty: give a list of terms or the "
                               "path of a file with one term a line")
        return value


class JobConfig(_Strict):
    """A batch job. Relative paths are resolved against the job file's folder when loaded
    with :meth:`load`, so cron can run it from anywhere."""

    name: str | None = Field(None, description="Job name (default: the job file's stem).")
    input: Path = Field(description="JSONL input file.")
    input_format: Literal["auto", "batch", "chat", "template"] = Field(
        "auto", description="How to read the input's lines: auto (by their keys), batch, "
        "chat or template.")
    output: Path = Field(description="JSONL output file (Batch API output-line format).")
    model: str | None = Field(None, description="Model for rows that don't name one.")
    system: str | None = Field(None, description="System message for template and chat rows.")
    prompt: str | None = Field(
        None, description="Template over a record's fields, e.g. 'Summarize:\\n\\n{text}'."
    )
    id_field: str | None = Field(
        None, description="The field that holds a record's id, when it is not 'id' (template "
        "records and chat lines; not with `id`).")
    id: str | None = Field(
        None, description="A template over a record's fields that makes its id, e.g. "
        "'{shop}-{sku}' (template records and chat lines; not with `id_field`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="ChatCompletion parameters for every row."
    )
    limits: Limits = Field(default_factory=Limits)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: PositiveFloat = Field(
        60.0, le=86400, description="Timeout of one request, in seconds (at most a day)."
    )
    api: ApiSettings = Field(default_factory=ApiSettings)
    pricing: dict[str, Price] = Field(
        default_factory=dict, description="USD per 1M tokens, overriding the built-in table."
    )
    validate_: ValidateSettings | None = Field(
        None, alias="validate", description="Checks every reply must pass (JSON, JSON Schema, "
        "deny list, regex, length, finish reason), with re-asks.")
    fallback_models: list[str] = Field(
        default_factory=list, description="Models tried in order when the job's model fails "
        "a row for a reason another model may not share (server errors after retries, model "
        "not found, context length, content filter, invalid output).")
    on_change: Literal["rerun", "keep", "error"] = Field(
        "rerun",
        description="A row whose request changed since its result was written: send it again "
        "(rerun), keep the old result (keep), or refuse to run (error).",
    )
    mode: Literal["online", "batch"] = Field(
        "online", description="online: requests one by one, now; batch: the provider's Batch "
        "API (half price, results within the completion window).")
    batch: BatchSettings = Field(default_factory=BatchSettings)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_parts(value)
            except ValueError as exc:
                raise SettingError(f"prompt: {exc}") from None
        return value

    @field_validator("id_field")
    @classmethod
    def _check_id_field(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise SettingError("id_field is empty: name the field that holds a record's id")
        return value

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            fields = template_fields(value)
        except ValueError as exc:
            raise SettingError(f"id: {exc}") from None
        if not fields:
            raise SettingError(
                f"id: '{_short(value)}' uses no field, so every record would get the same "
                "id; write a template over the fields that tell records apart, e.g. "
                "id: \"{shop}-{sku}\" (or id_field: ticket_id for one field)"
            )
        return value

    @field_validator("params")
    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for key, why in RESERVED_PARAMS.items():
            if key in params:
                raise SettingError(f"params.{key} is not allowed: {why}", at=(key,))
        for key in params:
            suggestion = param_suggestion(str(key))
            if suggestion is not None:
                raise SettingError(
                    f"params.{key} is not a ChatCompletion parameter; did you mean "
                    f"'{suggestion}'? (a name not close to a known one is sent as written: "
                    "OpenAI-compatible servers take extra parameters)", at=(str(key),))
        return {key: _json_value(value, (key,)) for key, value in params.items()}

    @field_validator("fallback_models")
    @classmethod
    def _check_fallback_models(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, model in enumerate(value):
            if not model.strip():
                raise SettingError(f"fallback_models[{i}] is empty: name a model", at=(str(i),))
            if model in seen:
                raise SettingError(f"fallback_models names '{model}' twice", at=(str(i),))
            seen.add(model)
        return value

    @model_validator(mode="after")
    def _batch_mode_fits(self) -> JobConfig:
        """Settings that only an online run can honour are refused with ``mode: batch``
        rather than silently ignored: a batch is sent as it is, with no re-ask or other
        model between its request and its answer."""
        if self.mode == "batch":
            given = {"validate": self.validate_, "fallback_models": self.fallback_models}
            for key in ONLINE_ONLY:
                if given[key]:
                    raise SettingError(
                        f"{key} works in online mode only (each reply is checked, and "
                        "re-asked or sent to another model, as it arrives); a Batch API "
                        f"batch is sent and answered as a whole. Remove {key} or set "
                        "mode: online", at=(key,))
            if self.limits.shared_budget:
                raise SettingError(
                    "limits.shared_budget works in online mode only: in mode: batch each "
                    "part of a sharded job would hold max_cost_usd alone. Remove it, and "
                    "give each part its share of the cap, or set mode: online",
                    at=("limits", "shared_budget"))
        return self

    @model_validator(mode="after")
    def _one_id_rule(self) -> JobConfig:
        if self.id is not None and self.id_field is not None:
            raise SettingError(
                "id and id_field are mutually exclusive: id_field names the one field that "
                "holds a record's id, id builds it from several; keep one", at=("id",))
        return self

    # -- where a key is written -------------------------------------------------------------
    _file: Path | None = PrivateAttr(None)
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)

    def where(self, *key: str) -> str:
        """``jobs/x.yaml:7`` for the line of ``key`` in the job file (``where("params",
        "max_tokens")``), the file alone when the key isn't written there, and "the job"
        for a job not loaded from a file."""
        if self._file is None:
            return "the job"
        line = self._lines.get(key)
        return f"{self._file}:{line}" if line else str(self._file)

    def model_price_check(self) -> PriceCheck | None:
        """What to say about the price of the job's own ``model`` (None without one), the
        one decision of :func:`batchgpt.params.price_check`, the message starting with the
        job file's line of ``model``: a ``fatal`` check (a budget, an unknown price) is a
        ConfigError before anything is sent (:class:`batchgpt.source.InputFile` raises it,
        so every command that reads the input refuses the job), any other a warning given
        once. Models that input lines name, and those earlier results were billed as, are
        checked for a capped job by :func:`batchgpt.runner._spent_before`, once the input
        is planned."""
        if self.model is None:
            return None
        return price_check(self.model, pricing=self.pricing,
                           max_cost_usd=self.limits.max_cost_usd, where=self.where("model"))

    def fallback_price_checks(self) -> list[PriceCheck]:
        """:meth:`model_price_check` for each of ``fallback_models``: a fallback serves
        rows, so a capped job needs its price as much as the job model's."""
        checks = []
        for i, model in enumerate(self.fallback_models):
            check = price_check(model, pricing=self.pricing,
                                max_cost_usd=self.limits.max_cost_usd,
                                where=self.where("fallback_models", str(i)))
            if check is not None:
                checks.append(check)
        return checks

    @property
    def validation(self) -> ValidateSettings | None:
        """The ``validate`` block (a Python name that doesn't shadow pydantic's own)."""
        return self.validate_

    # -- derived -----------------------------------------------------------------------
    @property
    def job_name(self) -> str:
        return self.name or "job"

    @property
    def source(self) -> Path | None:
        """The job file it was loaded from (None when built in code): which job owns an
        output."""
        return None if self._file is None else self._file.resolve()

    @property
    def output_stem(self) -> Path:
        out = self.output
        return out.with_suffix("") if out.suffix == ".jsonl" else out

    @property
    def failures_path(self) -> Path:
        return Path(f"{self.output_stem}.failures.jsonl")

    @property
    def summary_path(self) -> Path:
        return Path(f"{self.output_stem}.summary.json")

    @property
    def state_dir(self) -> Path:
        return Path(f"{self.output_stem}.state")

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> JobConfig:
        """Read, validate and resolve a job file. Every problem is a ConfigError naming
        the file, the line and the key."""
        path = Path(path)
        return cls.from_yaml(_read_job_file(path), path)

    @classmethod
    def from_yaml(cls, text: str, path: Path) -> JobConfig:
        if len(text) > MAX_JOB_FILE_BYTES:
            raise ConfigError(_too_big(path, len(text.encode("utf-8", "surrogatepass"))))
        try:
            _check_events(text, path)
            loader = _JobLoader(text)
            try:
                node = loader.get_single_node()
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.reader.ReaderError as exc:  # a control character, say
            line = text[: exc.position].count("\n") + 1
            column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            raise ConfigError(f"{path}:{line}:{column}: the character #x{exc.character:x} "
                              "is not allowed in YAML text") from None
        except yaml.MarkedYAMLError as exc:
            raise ConfigError(yaml_problem(exc, text, path)) from None
        except yaml.YAMLError as exc:  # pragma: no cover - every error above has a mark
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a job file is a mapping of keys (name, input, ...)")
        lines = _key_lines(node, path)
        data.setdefault("name", path.stem)
        try:
            job = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, path, lines)) from None
        base = path.resolve().parent
        job = job.model_copy(update={
            "input": Path(os.path.normpath(base / job.input)),
            "output": Path(os.path.normpath(base / job.output)),
        })
        job._file = path
        job._lines = lines
        return job

    @classmethod
    def json_schema(cls) -> str:
        return json.dumps(cls.model_json_schema(), indent=2)


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """A prompt template as (literal text, field name or None) pairs, to render with
    plain concatenation: ``"".join(text + (record[f] if f else "") for text, f in parts)``.

    A template is field substitution and nothing else: ``{name}`` for a record's field,
    ``{{`` and ``}}`` for literal braces. Format specs and conversions (``{text:>10}``,
    ``{text!r}``) are refused with ValueError, as is anything that is not a field name:
    ``str.format`` would run them, and ``{text:>300000000}`` is a 300 MB prompt."""
    parts: list[tuple[str, str | None]] = []
    try:
        for literal, field, spec, conversion in string.Formatter().parse(template):
            if field is None:
                parts.append((literal, None))
                continue
            shown = f"{{{_short(field)}{'!' + _short(conversion) if conversion else ''}" + (
                f":{_short(spec)}}}" if spec else "}"
            )
            if not field.isidentifier() and field.strip().isidentifier() and not (
                spec or conversion
            ):
                raise ValueError(f"'{shown}': write the field name without spaces: "
                                 f"{{{_short(field.strip())}}}")
            if not field.isidentifier():
                whole = f"{{{field}{'!' + conversion if conversion else ''}" + (
                    f":{spec}}}" if spec else "}")
                raise ValueError(
                    f"'{shown}' is not a field name: a template puts a record's field where "
                    "it says {name}, and {{ and }} stand for literal braces; to send these "
                    f"braces as written, double them: {_short(_doubled(whole), 60)}"
                )
            if spec or conversion:
                raise ValueError(
                    f"'{shown}': format specs and conversions are not supported; a template "
                    "is field substitution only ({name} for a record's field), and {{ and }} "
                    "give literal braces"
                )
            parts.append((literal, field))
    except ValueError as exc:
        if str(exc).startswith("'{"):
            raise
        raise ValueError(
            f"malformed template ({exc}); use {{{{ and }}}} for literal braces"
        ) from None
    return parts


def template_fields(template: str) -> list[str]:
    """Field names a prompt template uses; raises ValueError on a malformed template
    (see :func:`template_parts`)."""
    return [field for _, field in template_parts(template) if field is not None]


def _doubled(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# -- reading the file --------------------------------------------------------------------
def _read_job_file(path: Path) -> str:
    """The job file's text. Refuses anything but a regular file before opening it (a FIFO
    would block the open forever, /dev/stdin would wait for a terminal), and anything
    over MAX_JOB_FILE_BYTES."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
    except ValueError:  # an embedded NUL byte
        raise ConfigError(f"{path}: not a valid file name") from None
    if info.st_size > MAX_JOB_FILE_BYTES:
        raise ConfigError(_too_big(path, info.st_size))
    try:
        fh = open_regular(path)
    except NotRegularFile as exc:
        raise ConfigError(f"{path}: not a regular file ({exc.kind}); a job file must be a "
                          "regular YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
    with fh:
        try:
            raw = fh.read(MAX_JOB_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise ConfigError(_too_big(path, len(raw)))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start + 1}); save the "
                          "job file as UTF-8") from None


def _too_big(path: Path, size: int) -> str:
    return (f"{path}: the job file is {size:,} bytes, more than the {MAX_JOB_FILE_BYTES:,} "
            "a job file may have; data belongs in the input file")


# -- YAML --------------------------------------------------------------------------------
def _check_events(text: str, path: Path) -> None:
    """Refuse aliases and deep nesting from the event stream, before anything is composed
    or constructed: a few hundred bytes of nested aliases (the "billion laughs") expand to
    gigabytes, and deep nesting exhausts the composer's recursion."""
    depth = values = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            values += 1
            if values > MAX_YAML_VALUES:
                line = event.start_mark.line + 1 if event.start_mark is not None else 1
                raise ConfigError(f"{path}:{line}: more than {MAX_YAML_VALUES:,} values; a job "
                                  "file is a few keys, data belongs in the input file")
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark is not None else 1
            raise ConfigError(
                f"{path}:{line}: YAML aliases (*{_short(str(event.anchor), 20)}) are not "
                "allowed in a job file; write the value out in full"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark is not None else 1
                raise ConfigError(f"{path}:{line}: nested more than {MAX_YAML_DEPTH} levels "
                                  "deep; a job file is a few keys")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


# What YAML counts as a line break, for finding a mark's line in the text.
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def yaml_problem(exc: yaml.MarkedYAMLError, text: str, path: Path) -> str:
    """A YAML syntax error as ``path:LINE:COLUMN: what is wrong``, in plain words for the
    usual slips (a tab, an unclosed quote or bracket, bad indentation, a ': ' inside a
    value, text after a closing quote) instead of the parser's "while scanning ... found
    character '\\t' that cannot start any token". Anything else keeps the parser's words
    after "not valid YAML". Written for both libyaml's and PyYAML's messages."""
    lines = _LINE_BREAK.split(text)
    problem = (exc.problem or "").strip()
    context = (exc.context or "").strip()
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{path}: not valid YAML: {problem or context}"
    if isinstance(exc, yaml.constructor.ConstructorError):  # a value, not the syntax
        return f"{path}:{mark.line + 1}: not valid YAML: {problem or context}"

    def line_of(m: yaml.Mark) -> str:
        return lines[m.line] if m.line < len(lines) else ""

    def char_at(m: yaml.Mark) -> str:
        line = line_of(m)
        return line[m.column] if 0 <= m.column < len(line) else ""

    def at(m: yaml.Mark, column: int | None = None) -> str:
        return f"{path}:{m.line + 1}:{(m.column if column is None else column) + 1}"

    start = exc.context_mark
    if char_at(mark) == "\t":
        return f"{at(mark)}: a tab character; YAML indents with spaces"
    if "cannot start any token" in problem:
        char = char_at(mark)
        return (f"{at(mark)}: a value can't start with '{char}' in YAML; put the value in "
                "quotes")
    if "end of stream" in problem and "quoted scalar" in context and start is not None:
        quote = char_at(start) or '"'
        return (f"{at(start)}: this quoted value is never closed: its closing {quote} is "
                "missing")
    if "unknown escape" in problem:
        line, column = line_of(mark), mark.column
        if char_at(mark) != "\\" and column > 0 and line[column - 1] == "\\":
            column -= 1
        escape = line[column:column + 2]
        return (f"{at(mark, column)}: '{escape}' is not an escape YAML knows in a \"...\" "
                "value; write a backslash as \\\\, or put the value in single quotes")
    if "flow sequence" in context or "flow mapping" in context:
        opening, closing = ("[", "]") if "sequence" in context else ("{", "}")
        where = start if start is not None else mark
        hint = (" (a template such as {text} must be in quotes: prompt: \"{text}\")"
                if opening == "{" else "")
        return (f"{at(where)}: this '{opening}' is never closed with '{closing}' (or its "
                f"items are not separated by commas){hint}")
    if "could not find expected ':'" in problem and start is not None:
        return (f"{at(start)}: this line has no ':' after its key; write key: value (a "
                "value that goes on over several lines must be indented under its key)")
    if "block scalar" in context:
        return (f"{at(mark)}: after '|' or '>' only '-', '+', an indentation digit or a "
                "comment may follow on the same line; the text goes on the lines below")
    if "mapping values are not allowed" in problem:
        before = line_of(mark)[: mark.column]
        if re.search(r":(\s|$)", before):
            return (f"{at(mark)}: a ': ' inside a value; put the value in quotes "
                    "(key: \"text: more text\")")
        return (f"{at(mark)}: this line is indented more than the line above it, so YAML "
                "reads it as part of that value; indent it like the keys next to it")
    if "block mapping" in context and ("expected key" in problem
                                       or "expected <block end>" in problem):
        line = line_of(mark)
        indent = len(line) - len(line.lstrip(" "))
        before = line[: mark.column].rstrip()
        if mark.column <= indent:
            if char_at(mark) == "-":
                return (f"{at(mark)}: a list item ('- ') where a key was expected; indent "
                        "it under the key it belongs to")
            return (f"{at(mark)}: the indentation of this line matches no key above it; "
                    "indent it like the keys next to it (with spaces)")
        if before.endswith(('"', "'")):
            quote = before[-1]
            inside = '\\"' if quote == '"' else "''"
            other = "single" if quote == '"' else "double"
            return (f"{at(mark)}: text after the closing {quote}: a quoted value ends at its "
                    f"closing quote; write {inside} for a {quote} inside it, or quote the "
                    f"value with {other} quotes")
        if before.endswith(("}", "]")):
            return (f"{at(mark)}: text after a closing '{before[-1]}': YAML read what "
                    "precedes it as a {...} mapping or [...] list; put a value that starts "
                    "with '{' or '[' in quotes (id: \"{shop}-{sku}\")")
        return (f"{at(mark)}: unexpected text; check the quoting and indentation of this "
                "line")
    if context and problem.startswith("but "):  # PyYAML: "expected X, but found Y"
        problem = f"{context}, {problem}"
    return f"{at(mark)}: not valid YAML: {problem or context}"


class _JobLoader(_SafeLoader):
    """SafeLoader whose values that Python cannot build (an integer of 5,000 digits, the
    date 2024-13-45) are YAML errors with a line, not a ValueError and a traceback."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({str(exc).split(';')[0][:100]})",
                node.start_mark,
            ) from None


def _key_lines(node: yaml.Node | None, path: Path) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line, for error messages.
    A key written twice in one mapping is an error: YAML would silently keep the last."""
    out: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, str(key_node.value))
                line = key_node.start_mark.line + 1
                if key in out:
                    raise ConfigError(f"{path}:{line}: duplicate key '{'.'.join(key)}' (first "
                                      f"on line {out[key]})")
                out[key] = line
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):  # items by index: fallback_models.1
            for i, item in enumerate(n.value):
                key = (*prefix, str(i))
                out.setdefault(key, item.start_mark.line + 1)
                walk(item, key)

    if node is not None:
        walk(node, ())
    return out


def _json_value(value: Any, at: tuple[str, ...]) -> Any:
    """``value`` as JSON will carry it (integer keys as strings, as ``json.dumps`` writes
    them; YAML reads ``logit_bias: {50256: -100}`` with integer keys), or SettingError
    naming the key path under ``params``."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return value
        raise SettingError(f"params.{_dotted(at)} is an integer beyond 64 bits, which the "
                           "server cannot read", at)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise SettingError(f"params.{_dotted(at)} is not a finite number; JSON has no NaN or "
                           "infinity", at)
    if isinstance(value, list):
        return [_json_value(v, (*at, f"[{i}]")) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise SettingError(f"params.{_dotted(at)} has a key that YAML reads as "
                                   f"{_kind(k)}; quote the key", at)
            out[str(k)] = _json_value(v, (*at, str(k)))
        return out
    raise SettingError(f"params.{_dotted(at)} is {_kind(value)}, which JSON cannot carry"
                       f"{_quote_hint(value)}", at)


def _dotted(at: tuple[str, ...]) -> str:
    return "".join(p if p.startswith("[") or not i else f".{p}" for i, p in enumerate(at))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, datetime.datetime):
        return "a timestamp"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    if isinstance(value, set | frozenset):
        return "a set (!!set)"
    if isinstance(value, float):
        return "a number"
    return f"a {type(value).__name__}"


def _quote_hint(value: Any) -> str:
    if isinstance(value, datetime.date):
        return "; quote it (\"2024-01-01\") to send it as a string"
    if isinstance(value, set | frozenset | tuple):
        return "; write a list"
    return ""


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] | None = JobConfig
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _explain(exc: ValidationError, path: Path, lines: Mapping[tuple[str, ...], int]) -> str:
    messages = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SettingError):  # the message names its key itself
            loc = (*loc, *cause.at)
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines),
                        None)
            messages.append(f"{path}:{line}: {cause.message}" if line else
                            f"{path}: {cause.message}")
            continue
        dotted = ".".join(loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            line = lines.get(loc[:n])
            if line is not None:
                break
        where = f"{path}:{line}" if line else str(path)
        if err["type"] == "extra_forbidden":
            known = _fields_at(tuple(err["loc"][:-1]))
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            parent = ".".join(loc[:-1])
            suggestion = f"{parent}.{close[0]}" if close and parent else (close or [""])[0]
            hint = f"; did you mean '{suggestion}'?" if close else (
                f"; known keys: {', '.join(known)}" if known else ""
            )
            messages.append(f"{where}: unknown key '{dotted}'{hint}")
        elif err["type"] == "missing":
            messages.append(f"{where}: missing required key '{dotted}'")
        elif err["type"] == "string_type" and isinstance(err.get("input"), dict | list):
            kind = "a {...} mapping" if isinstance(err["input"], dict) else "a [...] list"
            messages.append(f"{where}: '{dotted}' is {kind} in YAML, not text; put a value "
                            f"that starts with '{{' or '[' in quotes: {loc[-1]}: \"{{text}}\"")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            prefix = f"'{dotted}': " if loc else ""
            messages.append(f"{where}: {prefix}{msg}")
    return "\n".join(messages)
