"""What a run costs: a price table, model-name resolution, token counts and the arithmetic.

Why it is shaped this way:

- Prices change and this table ages, so a job file's ``pricing:`` block overrides any row
  (:func:`resolve_price`), and a model the table doesn't know gives a cost of ``None``
  ("unknown"), never an exception and never a guess: a wrong number in a cost report is
  worse than a missing one.
- The API answers with the *snapshot* name (``gpt-4o-mini-2024-07-18``) even when the job
  asked for the alias, so a dated snapshot resolves to its family's row. Only a date
  suffix is stripped: ``o3-mini``, ``gpt-5-pro`` or ``gpt-4o-realtime-preview`` are
  different products with different prices, and resolving them to ``o3``, ``gpt-5`` or
  ``gpt-4o`` by prefix would under-report their cost up to twelvefold. Snapshots known to
  be priced apart from their family (``gpt-4o-2024-05-13`` costs twice ``gpt-4o``) are
  refused the same way.
- Costs are computed in :class:`~decimal.Decimal` from the prices' decimal spelling, on
  token counts summed first (``Usage.__add__``), and turned into a float once at the end,
  so that 1,000,000 gpt-4o-mini prompt tokens cost exactly 0.15 and not
  0.15000000000000002, and per-row float error doesn't pile up over a million rows.

Example::

    >>> usage = Usage.from_response({"prompt_tokens": 1_000_000, "completion_tokens": 500_000})
    >>> cost_usd(usage, resolve_price("gpt-4o-mini-2024-07-18"))
    0.45
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

PRICES_AS_OF = "2026-11"
PRICES_SOURCE = "OpenAI pricing page, as mirrored in LiteLLM's price map, Nov 2026"


def not_a_boolean(value: Any) -> Any:
    """``value``, unless it is a boolean: where a setting wants a number, pydantic would
    read ``true`` as 1 — and YAML reads ``yes``, ``on`` and ``true`` as booleans, so
    ``max_cost_usd: yes`` would be a silent $1 cap. (A BeforeValidator.)"""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number (YAML reads yes/no, on/off and "
                         "true/false as booleans): write a number")
    return value


# A price is a finite, non-negative number of USD per 1M tokens.
_Rate = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(not_a_boolean)]


class Price(BaseModel):
    """USD per 1M tokens for one model.

    The same model validates a job file's ``pricing:`` block, hence ``extra="forbid"``: a
    typo such as ``cached_inptu`` must be an error, not a silently ignored field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: _Rate
    output: _Rate
    cached_input: _Rate | None = None
    """Cached prompt tokens; None bills them at ``input`` (no cache discount known)."""
    batch_input: _Rate | None = None
    """Batch API prompt tokens; None means half of ``input``, OpenAI's batch discount."""
    batch_output: _Rate | None = None
    """Batch API completion tokens; None means half of ``output``."""


PRICES: dict[str, Price] = {
    "gpt-4o": Price(
        input=2.50, output=10.00, cached_input=1.25, batch_input=1.25, batch_output=5.00
    ),
    "gpt-4o-mini": Price(
        input=0.15, output=0.60, cached_input=0.075, batch_input=0.075, batch_output=0.30
    ),
    "gpt-4.1": Price(
        input=2.00, output=8.00, cached_input=0.50, batch_input=1.00, batch_output=4.00
    ),
    "gpt-4.1-mini": Price(
        input=0.40, output=1.60, cached_input=0.10, batch_input=0.20, batch_output=0.80
    ),
    "gpt-4.1-nano": Price(
        input=0.10, output=0.40, cached_input=0.025, batch_input=0.05, batch_output=0.20
    ),
    "o3": Price(input=2.00, output=8.00, cached_input=0.50, batch_input=1.00, batch_output=4.00),
    "o4-mini": Price(
        input=1.10, output=4.40, cached_input=0.275, batch_input=0.55, batch_output=2.20
    ),
    "gpt-5": Price(
        input=1.25, output=10.00, cached_input=0.125, batch_input=0.625, batch_output=5.00
    ),
    "gpt-5-mini": Price(
        input=0.25, output=2.00, cached_input=0.025, batch_input=0.125, batch_output=1.00
    ),
    "gpt-5-nano": Price(
        input=0.05, output=0.40, cached_input=0.005, batch_input=0.025, batch_output=0.20
    ),
    # No cache discount and no batch row in the source table: cached tokens bill at
    # `input`, batch at the generic 50 %.
    "gpt-3.5-turbo": Price(input=0.50, output=1.50),
}
"""The built-in table (see ``PRICES_SOURCE``, ``PRICES_AS_OF``); keys are family names."""

# Dated snapshots whose price differs from their family's row (OpenAI's pricing page lists
# them apart: gpt-4o-2024-05-13 at 5.00/15.00, the older gpt-3.5-turbo snapshots at
# 1.00-1.50/2.00). Resolving them to the family would under-report, and the source table
# has no rows for them, so they resolve to None unless the job file prices them.
_PRICED_APART: frozenset[str] = frozenset(
    {"gpt-4o-2024-05-13", "gpt-3.5-turbo-0301", "gpt-3.5-turbo-0613", "gpt-3.5-turbo-1106"}
)

# "-2024-07-18" (current style) or "-0613" (older style, MMDD): a model's snapshot date,
# stripped to find its family's price (and by batchgpt.params, to find a slip's model).
DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def _candidate_names(model: str) -> list[str]:
    """Names to look up for ``model``, most specific first: as given; without a provider
    prefix ("openai/gpt-4o" → "gpt-4o"); and each of those without a date suffix."""
    names = [model]
    if "/" in model:
        names.append(model.rsplit("/", 1)[1])
    for name in list(names):
        family = DATE_SUFFIX.sub("", name)
        if family != name and family and name.rsplit("/", 1)[-1] not in _PRICED_APART:
            names.append(family)
    return names


@functools.lru_cache(maxsize=4096)
def _builtin_price(model: str) -> Price | None:
    """:func:`resolve_price` without overrides, remembered: it runs a few times per
    request (the budget's worst case, the result's cost)."""
    for name in _candidate_names(model):
        if name in PRICES:
            return PRICES[name]
    return None


def resolve_price(model: str, overrides: Mapping[str, Price] | None = None) -> Price | None:
    """The price for ``model``, or None when nobody knows it.

    ``overrides`` (the job file's ``pricing:`` block, keyed by model name) replace built-in
    rows of the same name. Each candidate name (exact, then without provider prefix, then
    without date suffix) is looked up in the overrides before the built-in table, so an
    override for ``gpt-4o`` also prices ``gpt-4o-2024-08-06``, while an exact built-in row
    (``gpt-4o-mini``) still beats an override for a shorter name (``gpt-4o``).

    Because only a date suffix is stripped and the rest must match a row exactly,
    ``gpt-4o-mini-2024-07-18`` can only become ``gpt-4o-mini``, never ``gpt-4o``; and a name
    with any other suffix (``gpt-4o-mini-x``, ``o3-pro``) is unknown rather than priced as a
    model it is not.
    """
    if not overrides:
        return _builtin_price(model)
    for name in _candidate_names(model):
        if overrides is not None and name in overrides:
            return overrides[name]
        if name in PRICES:
            return PRICES[name]
    return None


MAX_TOKEN_COUNT = 10**12
"""The most tokens one reply's ``usage`` field may claim. Far above any real reply (a
million-token context is 10**6), far below what breaks storage: SQLite's INTEGER holds
9.2 * 10**18, so even a million rows at this cap sum without overflow."""


def _count(value: Any, path: str, dropped: list[str]) -> int:
    """A token count from a server's JSON, or 0.

    Missing and null fields are 0 without a word: OpenAI-compatible servers (vLLM,
    llama.cpp, proxies) often omit them. Anything else that is not a non-negative integer
    up to ``MAX_TOKEN_COUNT`` (an integral float such as ``10.0`` counts as one) is 0 and
    its ``path`` is added to ``dropped``: ``10**30`` would overflow the checkpoint's
    INTEGER columns and stop the run, a negative, fractional, string, boolean or nested
    value is a broken server, and guessing would put a wrong number into a cost report.
    """
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_TOKEN_COUNT:
            return value
    elif isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_TOKEN_COUNT:
        return int(value)
    dropped.append(path)
    return 0


def _details(usage: Mapping[str, Any], key: str, dropped: list[str]) -> Mapping[str, Any]:
    details = usage.get(key)
    if details is None:
        return {}
    if isinstance(details, Mapping):
        return details
    dropped.append(key)
    return {}


class UsageReading(NamedTuple):
    """What :meth:`Usage.parse_response` read: the counts, and the fields whose values were
    not believable token counts (dotted paths such as ``"prompt_tokens"`` or
    ``"prompt_tokens_details.cached_tokens"``; empty when all was well)."""

    usage: Usage
    dropped: tuple[str, ...]


class Usage(BaseModel):
    """Token counts, as reported by ``usage`` of a chat.completion, or summed over rows.

    ``cached_tokens`` are part of ``prompt_tokens`` and ``reasoning_tokens`` are part of
    ``completion_tokens`` (OpenAI reports the details as breakdowns, not extra tokens).
    """

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)

    @classmethod
    def from_response(cls, usage: object) -> Usage:
        """Read a chat.completion ``usage`` object (as parsed JSON), whatever it holds.

        Missing, null or malformed fields count as 0, and a missing ``total_tokens`` is
        computed, because OpenAI-compatible servers (vLLM, llama.cpp, proxies) often send
        only ``prompt_tokens`` and ``completion_tokens``, or no ``usage`` at all. Values
        that are not non-negative integers up to ``MAX_TOKEN_COUNT`` count as 0 too;
        :meth:`parse_response` also says which fields those were, for a caller to log.
        """
        return cls.parse_response(usage).usage

    @classmethod
    def parse_response(cls, usage: object) -> UsageReading:
        """:meth:`from_response`, and which fields were dropped (see :class:`UsageReading`).

        A dropped ``total_tokens`` is recomputed from the prompt and completion counts, as
        a missing one is. A ``usage`` that is neither an object nor null is dropped whole
        (path ``"usage"``).
        """
        dropped: list[str] = []
        if usage is None:
            return UsageReading(cls(), ())
        if not isinstance(usage, Mapping):
            return UsageReading(cls(), ("usage",))
        prompt = _count(usage.get("prompt_tokens"), "prompt_tokens", dropped)
        completion = _count(usage.get("completion_tokens"), "completion_tokens", dropped)
        total = _count(usage.get("total_tokens"), "total_tokens", dropped) or prompt + completion
        cached = _count(
            _details(usage, "prompt_tokens_details", dropped).get("cached_tokens"),
            "prompt_tokens_details.cached_tokens", dropped)
        reasoning = _count(
            _details(usage, "completion_tokens_details", dropped).get("reasoning_tokens"),
            "completion_tokens_details.reasoning_tokens", dropped)
        # model_construct: every count was checked above, and validating again costs
        # more than the rest of reading a reply's usage (this runs once per result).
        return UsageReading(
            cls.model_construct(prompt_tokens=prompt, completion_tokens=completion,
                                total_tokens=total, cached_tokens=cached,
                                reasoning_tokens=reasoning),
            tuple(dropped),
        )

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage.model_construct(  # sums of valid counts are valid counts
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )

    def __radd__(self, other: object) -> Usage:
        """Lets ``sum(usages)`` start from its default 0."""
        if other == 0:
            return self
        return NotImplemented


_PER_MILLION = Decimal(1_000_000)


@functools.lru_cache(maxsize=1024)
def _dec(rate: float) -> Decimal:
    # From the float's shortest repr, i.e. the decimal a person typed (0.15, not
    # 0.1499999999999999944488848768742172978818416595458984375).
    return Decimal(repr(rate))


def cost_usd(usage: Usage, price: Price | None, *, batch: bool = False) -> float | None:
    """USD for ``usage`` at ``price``; None when the price is unknown.

    - Uncached prompt tokens (``prompt_tokens - cached_tokens``) bill at ``input``, cached
      ones at ``cached_input`` (``input`` when the model has no cache discount).
    - ``completion_tokens`` bill at ``output``. Reasoning tokens are *not* added again:
      OpenAI's ``completion_tokens`` already include them, and
      ``completion_tokens_details.reasoning_tokens`` only says how many of them were
      reasoning.
    - ``batch=True`` uses the Batch API rates, ``batch_input``/``batch_output``, or half of
      ``input``/``output`` when the row has none; cached prompt tokens in a batch get the
      same discount as outside it: ``batch_input * cached_input / input``.

    Call it once on summed usage (``sum(usages, Usage())``), not per row then summed: the
    result is a float, and the exact arithmetic only helps if it happens once.
    """
    if price is None:
        return None
    input_rate = _dec(price.input)
    output_rate = _dec(price.output)
    cached_rate = input_rate if price.cached_input is None else _dec(price.cached_input)
    if batch:
        half = Decimal("0.5")
        batch_in = input_rate * half if price.batch_input is None else _dec(price.batch_input)
        output_rate = output_rate * half if price.batch_output is None else _dec(price.batch_output)
        # With a zero input price the cache ratio is undefined; nothing to discount then.
        cached_rate = batch_in * cached_rate / input_rate if input_rate else batch_in
        input_rate = batch_in
    # A server reporting more cached than prompt tokens is wrong; bill no more than prompt.
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    uncached = usage.prompt_tokens - cached
    total = uncached * input_rate + cached * cached_rate + usage.completion_tokens * output_rate
    return float(total / _PER_MILLION)


BATCH_TAG = "@batch"
"""Marks usage answered through the Batch API where usage is kept by model (the index's
spend, a run's counters): ``gpt-4o-mini@batch`` is gpt-4o-mini at its Batch prices, so the
job's cost, the cap and the summary price each part at the rate that was paid."""


def batch_key(model: str) -> str:
    """The key usage answered through the Batch API is kept under (see ``BATCH_TAG``)."""
    return model + BATCH_TAG


def split_batch_key(key: str) -> tuple[str, bool]:
    """(model, answered through the Batch API) of a usage key."""
    if key.endswith(BATCH_TAG):
        return key[: -len(BATCH_TAG)], True
    return key, False


def price_usage(by_model: Mapping[str, Usage], pricing: Mapping[str, Price], *,
                known_only: bool = False) -> tuple[float | None, list[str]]:
    """The cost of usage spread over models, and the models that used tokens but have no
    price (``"(unnamed)"`` for ``""``). The cost is None when there is such a model,
    unless ``known_only``: then it is what the priced models cost, the unknown ones
    counted as 0 (the least that was paid). A key tagged ``@batch`` (:func:`batch_key`)
    is priced at the model's Batch prices."""
    total = 0.0
    unknown = []
    for key, usage in by_model.items():
        if usage.total_tokens == 0 and usage.prompt_tokens == 0:
            continue
        model, batch = split_batch_key(key)
        c = cost_usd(usage, resolve_price(model, pricing), batch=batch)
        if c is None:
            unknown.append(model or "(unnamed)")
        else:
            total += c
    return (None if unknown and not known_only else total), unknown
