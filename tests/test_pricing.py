"""Prices, model-name resolution and cost arithmetic, checked against hand arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from batchgpt.pricing import (
    PRICES,
    PRICES_AS_OF,
    PRICES_SOURCE,
    Price,
    Usage,
    cost_usd,
    resolve_price,
)

M = 1_000_000

# (model, usage, batch, expected USD) — every expected figure worked out by hand from the
# reference price table.
COST_CASES: list[tuple[str, Usage, bool, float]] = [
    # 1M prompt at 0.15 + 0.5M completion at 0.60 = 0.15 + 0.30
    ("gpt-4o-mini", Usage(prompt_tokens=M, completion_tokens=M // 2), False, 0.45),
    # 0.6M uncached at 0.15 + 0.4M cached at 0.075 = 0.09 + 0.03
    ("gpt-4o-mini", Usage(prompt_tokens=M, cached_tokens=400_000), False, 0.12),
    # every prompt token cached: 1M at 1.25
    ("gpt-4o", Usage(prompt_tokens=M, cached_tokens=M), False, 1.25),
    # reasoning is part of completion: 1M completion at 4.40, not 1.8M
    (
        "o4-mini",
        Usage(completion_tokens=M, reasoning_tokens=800_000, total_tokens=M),
        False,
        4.40,
    ),
    # 2M prompt at 1.25 + 1M completion (0.9M of it reasoning) at 10.00
    (
        "gpt-5",
        Usage(prompt_tokens=2 * M, completion_tokens=M, reasoning_tokens=900_000),
        False,
        12.50,
    ),
    # batch: 1M prompt at 0.075 + 0.5M completion at 0.30
    ("gpt-4o-mini", Usage(prompt_tokens=M, completion_tokens=M // 2), True, 0.225),
    # batch cached keeps the cache discount: 1.25 * (1.25 / 2.50) = 0.625 per 1M
    ("gpt-4o", Usage(prompt_tokens=M, cached_tokens=M), True, 0.625),
    # gpt-5 batch cached: 0.625 * (0.125 / 1.25) = 0.0625 per 1M
    ("gpt-5", Usage(prompt_tokens=M, cached_tokens=M), True, 0.0625),
    # no batch row: half of 0.50 / 1.50
    ("gpt-3.5-turbo", Usage(prompt_tokens=M, completion_tokens=M), True, 1.00),
    # no cached rate: cached tokens bill at input, 0.50
    ("gpt-3.5-turbo", Usage(prompt_tokens=M, cached_tokens=M), False, 0.50),
    # tiny figures stay exact: 10 tokens at 0.05 per 1M
    ("gpt-5-nano", Usage(prompt_tokens=10), False, 0.0000005),
    ("gpt-4.1", Usage(), False, 0.0),
    # more cached than prompt is a server bug: bill the prompt, all of it as cached
    ("gpt-4.1", Usage(prompt_tokens=M, cached_tokens=3 * M), False, 0.50),
]


@pytest.mark.parametrize(("model", "usage", "batch", "expected"), COST_CASES)
def test_cost_matches_hand_arithmetic(
    model: str, usage: Usage, batch: bool, expected: float
) -> None:
    # Exact equality on purpose: the arithmetic is decimal, so 0.15 + 0.30 is 0.45.
    assert cost_usd(usage, PRICES[model], batch=batch) == expected


def test_unknown_price_gives_unknown_cost() -> None:
    assert cost_usd(Usage(prompt_tokens=M), resolve_price("my-local-llama")) is None


def test_summing_rows_first_keeps_the_total_exact() -> None:
    rows = [Usage(prompt_tokens=1_000, completion_tokens=500) for _ in range(1_000)]
    assert cost_usd(sum(rows, Usage()), PRICES["gpt-4o-mini"]) == 0.45
    assert sum(rows) == sum(rows, Usage())


RESOLVE_CASES: list[tuple[str, str | None]] = [
    ("gpt-4o", "gpt-4o"),
    ("gpt-4o-mini", "gpt-4o-mini"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-2024-11-20", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the prefix trap: not gpt-4o
    ("gpt-4.1-2025-04-14", "gpt-4.1"),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
    ("o3-2025-04-16", "o3"),
    ("o4-mini-2025-04-16", "o4-mini"),
    ("gpt-5-2025-08-07", "gpt-5"),
    ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),  # -MMDD style
    ("openai/gpt-4o", "gpt-4o"),
    ("openai/gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    # Other suffixes name other products, priced differently: unknown, not a wrong guess.
    ("gpt-4o-mini-x", None),
    ("gpt-4o-realtime-preview", None),
    ("o3-mini", None),
    ("o3-pro", None),
    ("gpt-5-pro", None),
    # Snapshots priced apart from their family (gpt-4o-2024-05-13 is 5.00/15.00).
    ("gpt-4o-2024-05-13", None),
    ("openai/gpt-4o-2024-05-13", None),
    ("gpt-3.5-turbo-1106", None),
    ("meta-llama/Llama-3.1-8B-Instruct", None),
    ("", None),
]


@pytest.mark.parametrize(("model", "family"), RESOLVE_CASES)
def test_resolve_price(model: str, family: str | None) -> None:
    expected = None if family is None else PRICES[family]
    assert resolve_price(model) is expected


CHEAP = Price(input=0.01, output=0.02)
OVERRIDE_CASES: list[tuple[str, dict[str, Price], Price | None]] = [
    ("gpt-4o", {"gpt-4o": CHEAP}, CHEAP),  # the job file beats the built-in row
    ("gpt-4o-2024-08-06", {"gpt-4o": CHEAP}, CHEAP),  # ... and prices its snapshots
    ("openai/gpt-4o", {"gpt-4o": CHEAP}, CHEAP),
    ("gpt-4o-mini", {"gpt-4o": CHEAP}, PRICES["gpt-4o-mini"]),  # no prefix capture
    ("gpt-4o-2024-05-13", {"gpt-4o-2024-05-13": CHEAP}, CHEAP),
    ("my-local-llama", {"my-local-llama": CHEAP}, CHEAP),
    ("my-local-llama", {}, None),
]


@pytest.mark.parametrize(("model", "overrides", "expected"), OVERRIDE_CASES)
def test_overrides(model: str, overrides: dict[str, Price], expected: Price | None) -> None:
    assert resolve_price(model, overrides) is expected


def test_table_has_every_reference_row_and_its_provenance() -> None:
    assert set(PRICES) == {
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3",
        "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-3.5-turbo",
    }  # fmt: skip
    assert PRICES_AS_OF == "2026-11"
    assert "LiteLLM" in PRICES_SOURCE
    assert PRICES["gpt-4o-mini"] == Price(
        input=0.15, output=0.60, cached_input=0.075, batch_input=0.075, batch_output=0.30
    )
    assert PRICES["gpt-3.5-turbo"] == Price(input=0.50, output=1.50)


@pytest.mark.parametrize("model", sorted(PRICES))
def test_table_rows_are_consistent(model: str) -> None:
    """Catches a transcription slip: every batch row of the source is exactly half price,
    and a cache discount never costs more than the uncached rate."""
    price = PRICES[model]
    if price.batch_input is not None:
        assert price.batch_input * 2 == pytest.approx(price.input)
    if price.batch_output is not None:
        assert price.batch_output * 2 == pytest.approx(price.output)
    if price.cached_input is not None:
        assert price.cached_input <= price.input


@pytest.mark.parametrize(
    "fields",
    [
        {"input": 1.0, "output": 2.0, "cached_inptu": 0.5},  # typo in a job file
        {"input": -1.0, "output": 2.0},
        {"input": float("nan"), "output": 2.0},
        {"input": 1.0},
    ],
)
def test_price_rejects_bad_job_file_rows(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Price.model_validate(fields)


def test_price_is_frozen() -> None:
    with pytest.raises(ValidationError):
        PRICES["gpt-4o"].input = 0.0


FROM_RESPONSE_CASES: list[tuple[dict[str, Any] | None, Usage]] = [
    (
        {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0},
        },
        Usage(
            prompt_tokens=1200,
            completion_tokens=300,
            total_tokens=1500,
            cached_tokens=1024,
            reasoning_tokens=192,
        ),
    ),
    # An OpenAI-compatible server: no details, no total.
    (
        {"prompt_tokens": 10, "completion_tokens": 5},
        Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
    ),
    (
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": None,
            "prompt_tokens_details": None,
            "completion_tokens_details": {"reasoning_tokens": None},
        },
        Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
    ),
    ({"prompt_tokens": 10.0, "completion_tokens": "5"}, Usage(prompt_tokens=10, total_tokens=10)),
    ({"prompt_tokens": -3, "completion_tokens": True}, Usage()),
    ({"prompt_tokens_details": [1, 2]}, Usage()),
    ({}, Usage()),
    (None, Usage()),
]


@pytest.mark.parametrize(("raw", "expected"), FROM_RESPONSE_CASES)
def test_usage_from_response(raw: dict[str, Any] | None, expected: Usage) -> None:
    assert Usage.from_response(raw) == expected


def test_usage_adds_field_by_field() -> None:
    a = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, cached_tokens=4)
    b = Usage(prompt_tokens=10, completion_tokens=20, total_tokens=30, reasoning_tokens=5)
    assert a + b == Usage(
        prompt_tokens=11, completion_tokens=22, total_tokens=33, cached_tokens=4,
        reasoning_tokens=5,
    )  # fmt: skip
    assert a == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, cached_tokens=4)
    with pytest.raises(TypeError):
        _ = a + 1
