"""The live display's content (what a person sees on a terminal)."""

from __future__ import annotations

from batchgpt.progress import render


def test_progress_line_shows_done_failures_rates_against_limits_spend_and_eta() -> None:
    text = render({"done": 40, "failed": 2, "total": 100, "in_flight": 8, "rpm": 480.0,
                   "tpm": 90_000.0, "cost_usd": 0.0123, "limit_rpm": 500.0,
                   "limit_tpm": None, "elapsed_s": 21.0}).plain
    assert "42/100" in text
    assert "failed 2" in text
    assert "req/min 480/500" in text
    assert "tok/min 90,000" in text and "tok/min 90,000/" not in text
    assert "spent $0.0123" in text
    assert "ETA 29s" in text  # 58 rows left at 2 rows/s
