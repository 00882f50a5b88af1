"""Names a job can get slightly wrong, and what they were probably meant to be.

- **ChatCompletion parameters.** ``params: {max_token: 100}`` is a typo the server would
  answer with a 400 on every row (or, on a lenient server, ignore: a run without the cap
  the user asked for). A parameter that is not a known ChatCompletion parameter but is
  *close* to one is a job-file error with a did-you-mean (:func:`param_suggestion`); any
  other unknown name is sent as written, because OpenAI-compatible servers take extra
  parameters (vLLM's ``top_k``, llama.cpp's ``mirostat``). The known names are the openai
  SDK's ``CompletionCreateParams`` (read from the installed SDK when a name is not in the
  list below, which is that type's keys as of openai 3.57) plus ``stream``; extra
  parameters of common OpenAI-compatible servers that happen to be close to a known name
  (``top_k`` is one letter from ``top_p``) are listed in :data:`EXTRA_PARAMS` and never
  flagged.
- **Model names.** ``gpt4o-mini`` has no price, so its cost would be "unknown";
  :func:`priced_model_suggestion` finds the priced model it was probably meant to be, and
  :func:`price_check` is the one decision on what to say about a model without a price.

"Close" (:func:`is_close`) is deliberately narrow: the same name up to case, ``_``, ``-``
and spaces (``maxTokens``, ``max-tokens``), or one edit away (a letter added, dropped,
changed, or two swapped; two edits for names of ten characters or more). A guess that is
wrong would turn a valid extra parameter into an error, so a wider net is worse.
"""

from __future__ import annotations

import functools
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from batchgpt.pricing import DATE_SUFFIX, PRICES, Price, resolve_price

# openai 3.57's CompletionCreateParams (Base and Streaming), sorted. The installed SDK's
# list is added to it when a name is not found here (see known_params).
KNOWN_PARAMS: frozenset[str] = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
    "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
    "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs",
    "top_p", "user", "verbosity", "web_search_options",
})

# Parameters of OpenAI-compatible servers (vLLM, llama.cpp, TGI, OpenRouter, Together,
# DeepSeek) that are one or two edits from a known name: accepted as written.
EXTRA_PARAMS: frozenset[str] = frozenset({
    "top_k", "top_a", "min_p", "min_tokens", "models", "typical_p", "repetition_penalty",
    "repeat_penalty", "length_penalty", "best_of", "use_beam_search", "ignore_eos",
    "skip_special_tokens", "stop_token_ids", "include_stop_str_in_output", "echo",
    "prompt_logprobs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "chat_template", "chat_template_kwargs", "mirostat", "mirostat_tau", "mirostat_eta",
    "n_probs", "n_predict", "cache_prompt", "grammar", "json_schema", "reasoning",
    "thinking", "provider", "transforms", "route", "usage", "tfs_z",
})

_SEPARATORS = re.compile(r"[\s_\-.]+")


def _normal(name: str) -> str:
    return _SEPARATORS.sub("", name.lower())


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance between ``a`` and ``b`` (insertions, deletions,
    substitutions, and swaps of two neighbours), or ``limit + 1`` when it is more than
    ``limit`` (stopping early)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cost = 0 if ca == cb else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1]


def is_close(name: str, known: str) -> bool:
    """Whether ``name`` looks like a slip for ``known`` (see the module's docstring)."""
    if name == known:
        return False
    if _normal(name) == _normal(known):
        return True
    if len(known) <= 3:  # 'n', 'top': any one-letter change is another word
        return False
    limit = 1 if len(known) < 10 else 2
    return edit_distance(name.lower(), known, limit) <= limit


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``name`` is a slip for (see :func:`is_close`), the nearest if several."""
    found = [c for c in candidates if is_close(name, c)]
    if not found:
        return None
    return min(found, key=lambda c: (0 if _normal(c) == _normal(name) else 1,
                                     edit_distance(name.lower(), c, 2), c))


@functools.cache
def known_params() -> frozenset[str]:
    """KNOWN_PARAMS and the installed openai SDK's ``CompletionCreateParams`` keys (a
    newer SDK knows newer parameters). Imported only when needed: the SDK's types take a
    noticeable part of a second to import."""
    try:
        from openai.types.chat import completion_create_params as sdk

        names: set[str] = set()
        for kind in typing.get_args(sdk.CompletionCreateParams):
            names |= set(kind.__required_keys__) | set(kind.__optional_keys__)
    except Exception:  # pragma: no cover - an SDK without this module: the list above
        return KNOWN_PARAMS
    return KNOWN_PARAMS | names


def param_suggestion(name: str) -> str | None:
    """The known ChatCompletion parameter ``name`` is probably a slip for; None when
    ``name`` is known, a known extra parameter, or close to nothing (sent as written)."""
    if name in KNOWN_PARAMS or name in EXTRA_PARAMS:
        return None
    known = known_params()
    if name in known:
        return None
    return closest(name, known)


# -- model names and prices -----------------------------------------------------------------
def priced_model_suggestion(model: str, pricing: Mapping[str, Price] | None = None
                            ) -> str | None:
    """The priced model ``model`` is probably a slip for (``gpt4o-mini`` → ``gpt-4o-mini``),
    or None. A different digit is a different model, not a slip (``o1`` is not ``o3``,
    ``gpt-4.5`` is not ``gpt-4.1``), so only letters and separators may differ."""
    base = model.rsplit("/", 1)[-1]
    base = DATE_SUFFIX.sub("", base) or base
    names = sorted({*PRICES, *(pricing or {})})
    found = [n for n in names if is_close(base, n)
             and sorted(_digits(base)) == sorted(_digits(n))]
    return closest(base, found) if found else None


def _digits(text: str) -> list[str]:
    return [c for c in text if c.isdigit()]


@dataclass(frozen=True)
class PriceCheck:
    """What to say about a model whose price is unknown: ``fatal`` (refuse to run, before
    anything is sent) or a warning, and the message, which names where the model was set."""

    model: str
    fatal: bool
    message: str
    suggestion: str | None


def unknown_price_hint(models: Sequence[str], pricing: Mapping[str, Price] | None = None
                       ) -> str:
    """What to tell a user whose cost is unknown because of ``models``: a did-you-mean for
    a slip of a priced name, else how to give the price."""
    slips = [f"'{m}' (did you mean '{s}'?)" for m in models
             if (s := priced_model_suggestion(m, pricing)) is not None]
    if slips:
        return f"{', '.join(slips)}: no such priced model"
    return f"{', '.join(models)}: add a `pricing:` block to the job file"


def price_check(model: str, *, pricing: Mapping[str, Price], max_cost_usd: float | None,
                where: str) -> PriceCheck | None:
    """The one decision on what to say about a job's ``model`` without a price (see
    :meth:`batchgpt.config.JobConfig.model_price_check`; a capped job's other models,
    named by input lines or by earlier results, are refused by
    :func:`batchgpt.runner._spent_before`). None when the price is known, or when it is
    unknown, no budget is set, and the name is close to no priced model (the cost is then
    reported as unknown).

    - A budget (``limits.max_cost_usd``) needs every price: unknown is fatal, with a
      did-you-mean when the name is close to a priced model.
    - Without a budget an unknown price only makes the cost unknown: a warning, and only
      when there is a did-you-mean to give.

    ``where`` starts the message: ``"jobs/x.yaml:4"``, the job file's line of ``model``."""
    if resolve_price(model, pricing) is not None:
        return None
    suggestion = priced_model_suggestion(model, pricing)
    if max_cost_usd is not None:
        fix = (f"did you mean '{suggestion}'? (if not, add it under `pricing:` in the job "
               "file)" if suggestion else "add it under `pricing:` in the job file")
        return PriceCheck(model, True, f"{where}: limits.max_cost_usd is set but the price "
                          f"of model '{model}' is unknown: {fix}", suggestion)
    if suggestion is None:
        return None
    return PriceCheck(model, False, f"{where}: the price of model '{model}' is unknown; did "
                      f"you mean '{suggestion}'? (if the name is right, its cost is reported "
                      "as unknown; add it under `pricing:` to price it)", suggestion)


def asks_for_json(fmt: object) -> bool:
    """Whether a request's ``response_format`` asks for JSON (``json_object`` or
    ``json_schema``): the output checks, export's JSON columns and the sandbox all read
    it this one way."""
    return isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema")


def response_format_schema(fmt: object) -> dict[str, typing.Any] | None:
    """The JSON Schema a ``response_format`` of type ``json_schema`` carries, or None."""
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        inner = fmt.get("json_schema")
        if isinstance(inner, Mapping) and isinstance(inner.get("schema"), Mapping):
            return dict(inner["schema"])
    return None
