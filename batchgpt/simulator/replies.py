"""What the sandbox says, beyond echoing the prompt: JSON that fits the request's schema,
seeded bad first answers for the output checks, and models that always fail.

* :func:`instance_for` builds a JSON value from a ``response_format`` JSON Schema and the
  prompt (an ``enum`` picks by a hash of the prompt, a string is the prompt's first
  sentence), so a test can check what a row's answer must be.
* :class:`ReplyFaults`: a seeded share of *first* answers comes back as invalid JSON (cut
  in half), truncated (``finish_reason: length``), content-filtered, refused, or carrying
  one of ``denied_terms``. A follow-up turn to such an answer (batchgpt's re-ask: the
  spoiled answer as the assistant's turn, then a user turn) gets a clean answer.
* ``failing_models``: a model answered with 503 (overloaded, every time) or 404
  (``model_not_found``), to exercise fallbacks.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REFUSAL = "I'm sorry, but I can't help with that request."
FILTERED = "[sandbox] (this answer was stopped by the content filter)"
MAX_DEPTH = 8


class ReplyFaults(BaseModel):
    """Shares of first answers spoiled, each a probability (they must sum to ≤ 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    invalid_json_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    truncated_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    content_filter_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    refusal_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    denied_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    denied_terms: list[str] = Field(default_factory=lambda: ["CONFIDENTIAL"], min_length=1)
    # Spoil only the answers of these models (empty: every model's), so a fallback model
    # can answer well where the job's model keeps failing the checks.
    only_models: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rates_fit(self) -> ReplyFaults:
        if self.total_rate() > 1.0 + 1e-9:
            raise ValueError("reply fault rates must sum to at most 1")
        return self

    def total_rate(self) -> float:
        return (self.invalid_json_rate + self.truncated_rate + self.content_filter_rate
                + self.refusal_rate + self.denied_rate)

    def pick(self, u: float) -> str | None:
        """The fault for a first answer whose seeded draw is ``u`` in [0, 1), or None."""
        edge = 0.0
        for name, rate in (("invalid_json", self.invalid_json_rate),
                           ("truncated", self.truncated_rate),
                           ("content_filter", self.content_filter_rate),
                           ("refusal", self.refusal_rate), ("denied", self.denied_rate)):
            edge += rate
            if u < edge:
                return name
        return None


FailingStatus = Literal[404, 503]


def parse_reply_faults(text: str, terms: list[str] | None = None) -> ReplyFaults:
    """``invalid_json=0.2,truncated=0.1,content_filter=0.05,refusal=0.05,denied=0.1``
    (the command-line form); raises ValueError naming what is wrong."""
    names = ("invalid_json", "truncated", "content_filter", "refusal", "denied")
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"{part!r}: expected NAME=RATE with NAME one of {', '.join(names)}")
        try:
            values[f"{name.strip()}_rate"] = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: the rate must be a number from 0 to 1") from None
    if terms:
        values["denied_terms"] = terms
    return ReplyFaults(**values)


def parse_failing_model(text: str) -> tuple[str, FailingStatus]:
    """``MODEL=503`` or ``MODEL=404`` (the command-line form)."""
    model, sep, status = text.rpartition("=")
    if not sep or not model or status.strip() not in ("404", "503"):
        raise ValueError(f"{text!r}: expected MODEL=503 (always overloaded) or MODEL=404 "
                         "(model not found)")
    return model, 404 if status.strip() == "404" else 503


def instance_for(schema: Any, text: str, sentence: str, depth: int = 0) -> Any:
    """A JSON value that satisfies the common shapes of ``schema`` (objects with
    properties, arrays, enums, strings, numbers), built from the prompt."""
    if not isinstance(schema, Mapping) or depth > MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[zlib.crc32(text.encode()) % len(enum)]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return instance_for(options[0], text, sentence, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), Mapping)):
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        return {name: instance_for(sub, text, sentence, depth + 1)
                for name, sub in props.items()}
    if kind == "array":
        n = max(1, int(schema.get("minItems") or 1))
        return [instance_for(schema.get("items"), text, sentence, depth + 1)
                for _ in range(min(n, 3))]
    if kind == "string":
        value = sentence or "sandbox"
        limit = schema.get("maxLength")
        return value[:limit] if isinstance(limit, int) and limit >= 0 else value
    if kind == "integer":
        return len(text.split())
    if kind == "number":
        return round(len(text) / 100, 2)
    if kind == "boolean":
        return True
    return None


def spoil(reply: dict[str, Any], fault: str, terms: list[str], u: float) -> str:
    """Spoil every choice of ``reply`` (a chat.completion) with ``fault``, in place;
    returns the text a follow-up's assistant turn will quote back."""
    said = ""
    for choice in reply["choices"]:
        message = choice["message"]
        content = message.get("content") or ""
        if fault == "invalid_json":
            content = content[: max(1, len(content) // 2)]
        elif fault == "truncated":
            content = content[: max(1, len(content) // 2)]
            choice["finish_reason"] = "length"
        elif fault == "content_filter":
            content = FILTERED
            choice["finish_reason"] = "content_filter"
        elif fault == "refusal":
            message["refusal"] = REFUSAL
            content = None
        elif fault == "denied":
            term = terms[int(u * 1e6) % len(terms)]
            content = _with_term(content, term)
        message["content"] = content
        said = content if content is not None else REFUSAL
    return said


def _with_term(content: str, term: str) -> str:
    """The term in the answer, keeping JSON valid when the answer is JSON."""
    try:
        value = json.loads(content)
    except ValueError:
        return f"{content} {term}"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                value[key] = f"{item} {term}"
                return json.dumps(value, ensure_ascii=False)
        value["note"] = term
        return json.dumps(value, ensure_ascii=False)
    return json.dumps([value, term], ensure_ascii=False)


def follows_up(messages: list[Any], spoiled: set[str]) -> bool:
    """Whether the request answers one of the sandbox's spoiled answers: its last turn is
    the user's, right after an assistant turn quoting such an answer."""
    if len(messages) < 2:
        return False
    before, last = messages[-2], messages[-1]
    if not (isinstance(before, Mapping) and isinstance(last, Mapping)):
        return False
    said = before.get("content")
    return (before.get("role") == "assistant" and last.get("role") == "user"
            and isinstance(said, str) and said in spoiled)


def model_failure(model: str, status: FailingStatus) -> tuple[int, str, str, str]:
    """(status, message, type, code) of a failing model's answer."""
    if status == 404:
        return (404, f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found")
    return (503, f"The model `{model}` is overloaded (sandbox: always). Please try again "
            "later.", "server_error", "engine_overloaded")
