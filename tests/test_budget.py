"""limits.max_cost_usd: the accounting on its own (:class:`batchgpt.budget.Budget`), then
whole runs through the CLI against the simulator.

The CLI tests price gpt-4o-mini at $1,000 per 1M tokens ($0.001 a token) so that a few
rows make round, visible sums. Every row of ``articles(9)`` has the same length, so every
row has the same worst case (its prompt estimate plus ``max_tokens``) and the simulator
answers each at the same real cost: how many rows a cap lets through is then exact.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import pytest

from batchgpt.budget import Budget, Verdict, billed_model, unpriced, worst_case
from batchgpt.pricing import Price
from batchgpt.simulator import Simulator
from batchgpt.tokens import prompt_tokens
from tests.conftest import JobFiles, articles, write_jsonl

# -- the accounting ------------------------------------------------------------------------


def test_rows_are_admitted_while_their_worst_case_fits_what_is_left() -> None:
    budget = Budget(cap=1.0)
    assert budget.admit(0.4)[0] is Verdict.ADMIT
    assert budget.admit(0.4)[0] is Verdict.ADMIT
    assert budget.reserved == pytest.approx(0.8)
    assert budget.remaining == pytest.approx(0.2)
    assert budget.outstanding == 2


def test_a_row_that_does_not_fit_waits_while_rows_are_in_flight() -> None:
    budget = Budget(cap=1.0)
    _, first = budget.admit(0.6)
    assert first is not None
    verdict, reservation = budget.admit(0.6)
    assert (verdict, reservation) == (Verdict.WAIT, None)  # nothing reserved for it
    budget.settle(first, 0.1)  # the first row cost far less than its worst case
    assert budget.admit(0.6)[0] is Verdict.ADMIT  # 0.1 spent + 0.6 reserved ≤ 1.0


def test_a_row_that_does_not_fit_with_nothing_in_flight_is_refused() -> None:
    budget = Budget(cap=1.0)
    _, row = budget.admit(0.6)
    assert row is not None
    budget.settle(row, 0.5)
    assert budget.admit(0.6) == (Verdict.REFUSE, None)
    assert budget.spent == 0.5 and budget.reserved == 0.0


def test_a_reservation_is_never_taken_back_by_a_later_refusal() -> None:
    """The old runner stopped the run when one row didn't fit next to the rows in flight,
    and the rows it had admitted but not yet sent were cancelled with it: a cap below
    concurrency × a row's worst case sent nothing. Asking is free: only ADMIT reserves."""
    budget = Budget(cap=0.005)
    held = [budget.admit(0.002)[1] for _ in range(2)]
    assert all(r is not None for r in held)
    assert budget.admit(0.002)[0] is Verdict.WAIT
    assert budget.outstanding == 2 and budget.reserved == pytest.approx(0.004)


def test_sums_are_exact_three_reservations_of_ten_cents_fit_a_thirty_cent_cap() -> None:
    assert 0.1 + 0.1 + 0.1 > 0.3  # summed as floats they would not
    budget = Budget(cap=0.3)
    assert [budget.admit(0.1)[0] for _ in range(4)] == [Verdict.ADMIT] * 3 + [Verdict.WAIT]
    assert budget.remaining == 0.0


def test_what_earlier_runs_spent_counts_against_the_cap() -> None:
    budget = Budget(cap=0.10, spent_before=0.09)
    assert budget.remaining == pytest.approx(0.01)
    assert budget.admit(0.02) == (Verdict.REFUSE, None)
    assert budget.spent_this_run == 0.0 and budget.spent == 0.09


def test_settle_charges_the_real_cost_and_an_unknown_cost_at_the_worst_case() -> None:
    budget = Budget(cap=1.0, spent_before=0.25)
    _, a = budget.admit(0.3)
    _, b = budget.admit(0.2)
    assert a is not None and b is not None
    budget.settle(a, 0.05)
    budget.settle(b, None)  # unknown: never loosens the cap
    assert budget.spent_this_run == pytest.approx(0.25)
    assert budget.spent == pytest.approx(0.5)
    assert budget.reserved == 0.0 and budget.outstanding == 0


def test_release_charges_nothing_and_each_reservation_closes_once() -> None:
    budget = Budget(cap=1.0)
    _, row = budget.admit(0.3)
    assert row is not None
    budget.release(row)  # the row failed: a failed request is not billed
    budget.release(row)
    budget.settle(row, 0.3)  # too late: it is closed
    assert (budget.spent, budget.reserved, budget.outstanding) == (0.0, 0.0, 0)


def test_a_request_given_up_on_the_wire_is_charged_at_its_worst_case() -> None:
    """A second signal abandons requests in flight: they may have been billed, so their
    worst case counts as spent (and as unanswered, kept apart by the index for the next
    runs' cap) — never released as if nothing was sent."""
    budget = Budget(1.0)
    _, r = budget.admit(0.25)
    assert r is not None
    budget.abandon(r)
    assert budget.spent == 0.25 and budget.unanswered == 0.25 and budget.reserved == 0
    budget.release(r)  # closes once: nothing changes
    assert budget.spent == 0.25


def test_without_a_cap_everything_is_admitted_and_spend_is_still_counted() -> None:
    budget = Budget(cap=None)
    _, row = budget.admit(1e9)
    assert row is not None and budget.remaining is None
    budget.settle(row, 0.01)
    assert budget.spent_this_run == 0.01


def test_a_worst_case_is_the_prompt_plus_the_output_cap_at_the_models_price() -> None:
    pricing = {"m": Price(input=1.0, output=2.0)}
    assert worst_case("m", 1_000_000, 500_000, pricing) == pytest.approx(2.0)
    assert worst_case("m", 0, None, pricing) == pytest.approx(256 * 2.0 / 1e6)  # the reserve
    assert worst_case("unknown-model", 10, 10, pricing) is None


def test_a_served_alias_without_a_price_is_billed_as_the_requested_model() -> None:
    assert billed_model("proxy/fast", "gpt-4o-mini", {}) == "gpt-4o-mini"
    # A dated snapshot of the family, or another priced model, is billed as served.
    assert billed_model("gpt-4o-mini-2024-07-18", "gpt-4o-mini", {}) == "gpt-4o-mini-2024-07-18"
    assert billed_model("gpt-4o", "gpt-4o-mini", {}) == "gpt-4o"
    # Nobody knows either price: the server's name is kept (reported as cost unknown).
    assert billed_model("proxy/fast", "my-llama", {}) == "proxy/fast"


def test_unpriced_names_each_unknown_model_once() -> None:
    assert unpriced(["x", "gpt-4o-mini", "x", "a"], {}) == ["a", "x"]


# -- through the CLI -----------------------------------------------------------------------

PRICING = {"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}  # $0.001 a token
MAX_TOKENS = 50


def row_worst_case() -> float:
    """The worst case of one row of articles(9): its prompt estimate plus max_tokens."""
    text = articles(1)[0]["text"]
    prompt = prompt_tokens([{"role": "user", "content": f"Summarize: {text}"}])
    return (prompt + MAX_TOKENS) * 0.001


def row_cost(job: JobFiles) -> float:
    """What the simulator charged for one row (each row costs the same)."""
    usages = {json.dumps(r["response"]["body"]["usage"], sort_keys=True) for r in job.results()}
    assert len(usages) == 1
    usage = json.loads(usages.pop())
    return float(Decimal(usage["total_tokens"]) * Decimal("0.001"))


def capped(job: JobFiles, cap: float, **overrides: Any) -> Any:
    return job.write(pricing=PRICING, limits={"concurrency": 8, "max_cost_usd": cap},
                     params={"max_tokens": MAX_TOKENS}, **overrides)


def test_a_cap_below_concurrency_times_a_rows_worst_case_sends_what_fits(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Concurrency 8, a row's worst case $0.073, a cap of $0.20 (under three worst
    cases): rows go one at a time against what is left, each reply gives back what its
    reservation didn't cost, and the run stops only when nothing is in flight and the
    next row's worst case no longer fits. The old runner sent nothing here, on every run."""
    job.write(articles(9))
    path = capped(job, 0.20)
    result = cli("run", path)
    assert result.exit_code == 4, result.output

    worst, cost = row_worst_case(), row_cost(job)
    assert worst > cost
    # The k-th row was admitted at (k-1)·cost spent, and the run stopped at k·cost spent.
    sent = math.floor((0.20 - worst) / cost + 1e-9) + 1
    assert sent == 4
    assert len(job.results()) == sim.stats.requests == sent  # every admitted row was sent
    summary = job.summary()
    assert summary["stopped"] == "budget" and summary["outcome"] == "stopped"
    assert summary["cost_usd"] == pytest.approx(sent * cost)
    assert summary["cost_usd"] <= 0.20 < summary["cost_usd"] + worst
    assert summary["requests"]["pending"] == 9 - sent
    assert "more than the $0.0480 left" in result.output


def test_the_cap_covers_the_jobs_spend_over_all_its_runs(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """Three runs at a $0.20 cap spend $0.20 at most, not $0.60; a higher cap then
    continues, and a lower one sends nothing."""
    job.write(articles(9))
    path = capped(job, 0.20)
    assert cli("run", path).exit_code == 4
    spent = job.summary()["cost_usd"]
    for _ in range(2):
        again = cli("run", path)
        assert again.exit_code == 4, again.output
        assert "the job has spent $0.1520 of limits.max_cost_usd $0.2 over its runs" \
            in again.output
    assert sim.stats.requests == 4
    assert job.summary()["cost_usd"] == pytest.approx(spent)
    assert job.summary()["this_run"]["requests"]["sent"] == 0

    path = capped(job, 0.10)
    assert cli("run", path).exit_code == 4
    assert sim.stats.requests == 4

    path = capped(job, 1.00)
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests == 9
    assert job.summary()["cost_usd"] == pytest.approx(9 * row_cost(job))


def test_replaced_results_count_against_the_cap_they_were_paid_for(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    job.write(articles(9))
    path = job.write(pricing=PRICING, params={"max_tokens": MAX_TOKENS})
    assert cli("run", path).exit_code == 0
    paid = job.summary()["cost_usd"]
    assert paid == pytest.approx(9 * row_cost(job))

    # Every row's request changes; the cap leaves less than one row's worst case over
    # what the first results cost, although none of them will be in the output once
    # replaced.
    path = capped(job, paid + row_worst_case() / 2, prompt="Summarize briefly: {text}")
    result = cli("run", path)
    assert result.exit_code == 4, result.output
    assert sim.stats.requests == 9
    assert job.summary()["requests"]["succeeded"] == 0  # the old results are for old requests


def test_a_served_alias_with_no_price_is_billed_at_the_requested_models_price(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """A server answering ``proxy/fast`` for gpt-4o-mini used to be "cost unknown", and
    spent past the cap unseen."""
    sim.config.model_alias = "proxy/fast"
    job.write(articles(9))
    path = capped(job, 0.20)
    result = cli("run", path)
    assert result.exit_code == 4, result.output
    assert {r["response"]["body"]["model"] for r in job.results()} == {"proxy/fast"}
    summary = job.summary()
    assert summary["cost_unknown_models"] == []
    assert summary["cost_usd"] == pytest.approx(4 * row_cost(job))
    assert summary["cost_usd"] <= 0.20
    # The next run starts from that spend, which is priced too: nothing more is sent.
    assert cli("run", path).exit_code == 4
    assert sim.stats.requests == 4


@pytest.mark.parametrize("form", ["batch", "chat"])
def test_lines_naming_an_unpriced_model_are_refused_before_anything_is_sent(
    job: JobFiles, sim: Simulator, cli: Any, form: str
) -> None:
    def line(i: int, model: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"Row {i}."}]
        if form == "batch":
            return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": messages}}
        return {"id": f"r{i}", "model": model, "messages": messages}

    write_jsonl(job.input, [line(1, "gpt-4o-mini"), line(2, "mystery-x"), line(3, "mystery-x"),
                            line(4, "mystery-y")])
    path = job.write(limits={"max_cost_usd": 5})
    result = cli("run", path)
    assert result.exit_code == 1, result.output
    assert ("the prices of models 'mystery-x' (2 rows to send), 'mystery-y' (1 row to send) "
            "are unknown") in result.output
    assert sim.stats.requests == 0
    assert not job.output.exists()
    # Without the cap the same file runs (cost reported as unknown).
    path = job.write(limits={"concurrency": 8})
    assert cli("run", path).exit_code == 0
    assert job.summary()["cost_unknown_models"] == ["mystery-x", "mystery-y"]


def test_a_cap_over_earlier_results_of_an_unpriced_model_is_refused(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """The job total can't be known, so neither can what is left of the cap."""
    path = job.write(articles(3), model="my-llama")
    assert cli("run", path).exit_code == 0
    write_jsonl(job.input, articles(4))
    path = job.write(model="gpt-4o-mini", limits={"max_cost_usd": 5})
    result = cli("run", path)
    assert result.exit_code == 1
    assert "'my-llama' is unknown (earlier results of this job)" in result.output
    assert sim.stats.requests == 3


def test_the_dry_run_says_what_is_left_of_the_cap(job: JobFiles, sim: Simulator,
                                                   cli: Any) -> None:
    job.write(articles(9))
    path = capped(job, 0.20)
    assert cli("run", path).exit_code == 4
    est = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert est["budget"]["max_cost_usd"] == 0.20
    assert est["budget"]["spent_usd"] == pytest.approx(job.summary()["cost_usd"])
    assert est["budget"]["remaining_usd"] == pytest.approx(0.20 - job.summary()["cost_usd"])
    assert "spent by earlier runs" in cli("run", path, "--dry-run").output


def test_fresh_starts_the_spend_over_but_still_refuses_an_unpriced_model(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    job.write(articles(9))
    path = capped(job, 0.20)
    assert cli("run", path).exit_code == 4
    assert cli("run", path, "--fresh", "--yes").exit_code == 4  # the earlier spend is set aside
    assert sim.stats.requests == 8
    path = capped(job, 0.20, model="mystery-model")
    result = cli("run", path, "--fresh", "--yes")
    assert result.exit_code == 1
    assert "the price of model 'mystery-model' is unknown" in result.output
    assert sim.stats.requests == 8


def test_an_input_naming_a_new_model_on_every_line_is_not_priced_row_by_row(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan keeps figures for so many distinct models (a hostile input must not grow
    it by one entry a line); with a cap, rows beyond them are refused as unpriced."""
    import batchgpt.plan

    monkeypatch.setattr(batchgpt.plan, "MAX_MODELS", 2)
    lines = [{"id": f"r{i}", "model": "gpt-4o-mini" if i < 3 else f"m{i}",
              "messages": [{"role": "user", "content": f"{i}."}]} for i in range(6)]
    write_jsonl(job.input, lines)
    path = job.write(limits={"max_cost_usd": 5}, pricing={
        f"m{i}": {"input": 1.0, "output": 1.0} for i in range(3, 6)})
    result = cli("run", path)
    assert result.exit_code == 1
    assert "2 rows beyond the first 2 distinct models" in result.output
    assert sim.stats.requests == 0
    # Without a cap, the estimate says it can't price them.
    path = job.write(limits={"concurrency": 8})
    est = json.loads(cli("run", path, "--dry-run", "--json").stdout)
    assert est["models"] == {"gpt-4o-mini": 3, "m3": 1}
    assert est["unpriced_models"] == ["(2 rows naming models beyond the first 2)"]
    assert est["cost_usd"] == {"min": None, "max": None}
