"""The job file: what to run, against what, how fast, and where the results go.

A job is a YAML file that cron can drive. Every key is declared here, so a misspelt key is
an error that names the key, its line, and the closest real key — a typo in ``limits``
must not silently run a job at unlimited speed.
"""

from __future__ import annotations

import difflib
import json
import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from batchgpt.errors import ConfigError
from batchgpt.pricing import Price

# Request keys batchgpt sets itself; a job's `params` may not set them.
RESERVED_PARAMS = {"messages": "write messages in the input file", "stream": "streaming is not "
                   "supported in batches", "model": "use the job's `model` key"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """The account's limits for this model. Leave `rpm`/`tpm` out to learn them from the
    server's ``x-ratelimit-limit-*`` headers."""

    rpm: PositiveInt | None = Field(None, description="Requests per minute to stay under.")
    tpm: PositiveInt | None = Field(None, description="Tokens per minute to stay under.")
    concurrency: PositiveInt | None = Field(
        None, description="Ceiling on requests in flight (default: what the limits need)."
    )
    max_cost_usd: PositiveFloat | None = Field(
        None, description="Stop dispatching before the spend could exceed this (USD)."
    )


class RetryPolicy(_Strict):
    """How often and how patiently a retryable failure is tried again."""

    max_attempts: PositiveInt = Field(6, description="Attempts per row, the first included.")
    initial_delay_s: PositiveFloat = Field(1.0, description="Backoff before the 2nd attempt.")
    max_delay_s: PositiveFloat = Field(60.0, description="Cap on one backoff delay.")
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
    params: dict[str, Any] = Field(
        default_factory=dict, description="ChatCompletion parameters for every row."
    )
    limits: Limits = Field(default_factory=Limits)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: PositiveFloat = Field(60.0, description="Timeout of one request, in seconds.")
    api: ApiSettings = Field(default_factory=ApiSettings)
    pricing: dict[str, Price] = Field(
        default_factory=dict, description="USD per 1M tokens, overriding the built-in table."
    )
    on_change: Literal["rerun", "keep", "error"] = Field(
        "rerun",
        description="A row whose request changed since its result was written: send it again "
        "(rerun), keep the old result (keep), or refuse to run (error).",
    )

    def model_post_init(self, __context: Any) -> None:
        for key, why in RESERVED_PARAMS.items():
            if key in self.params:
                raise ValueError(f"params.{key} is not allowed: {why}")
        if self.prompt is not None:
            template_fields(self.prompt)  # raises on a malformed template

    # -- derived -----------------------------------------------------------------------
    @property
    def job_name(self) -> str:
        return self.name or "job"

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
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: job file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
        return cls.from_yaml(text, path)

    @classmethod
    def from_yaml(cls, text: str, path: Path) -> JobConfig:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a job file is a mapping of keys (name, input, ...)")
        lines = _key_lines(node)
        data.setdefault("name", path.stem)
        try:
            job = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, path, lines)) from None
        base = path.resolve().parent
        return job.model_copy(update={
            "input": Path(os.path.normpath(base / job.input)),
            "output": Path(os.path.normpath(base / job.output)),
        })

    @classmethod
    def json_schema(cls) -> str:
        return json.dumps(cls.model_json_schema(), indent=2)


def template_fields(template: str) -> list[str]:
    """Field names a prompt template uses; raises ValueError on a malformed template."""
    names = []
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None:
                if field == "" or not field.isidentifier():
                    raise ValueError(
                        f"prompt: '{{{field}}}' is not a field name; use {{name}} for a record's "
                        "field and {{{{ }}}} for a literal brace"
                    )
                names.append(field)
    except ValueError as exc:
        if str(exc).startswith("prompt:"):
            raise
        raise ValueError(
            f"prompt: malformed template ({exc}); use {{{{ }}}} for a literal brace"
        ) from None
    return names


def _key_lines(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line, for error messages."""
    out: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, str(key_node.value))
                out[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    if node is not None:
        walk(node, ())
    return out


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
        else:
            msg = err["msg"].removeprefix("Value error, ")
            prefix = f"'{dotted}': " if loc else ""
            messages.append(f"{where}: {prefix}{msg}")
    return "\n".join(messages)
