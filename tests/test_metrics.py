"""The metrics file: written with prometheus_client, read back with its own parser."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from batchgpt.metrics import LAST_SUCCESS_METRIC, OUTCOMES, write_metrics
from batchgpt.summary import Summary

LabelSet = tuple[tuple[str, str], ...]

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc).timestamp()
T1 = datetime(2026, 11, 23, 10, 5, tzinfo=timezone.utc).timestamp()
T2 = datetime(2026, 11, 24, 10, 5, tzinfo=timezone.utc).timestamp()

SUMMARY: dict[str, Any] = {
    "job": "summarize",
    "outcome": "completed",
    "started_at": "2026-11-23T10:00:00+00:00",
    "finished_at": "2026-11-23T10:05:00+00:00",
    "wall_time_s": 300.0,
    "stopped": None,
    "message": None,
    "requests": {"total": 120, "succeeded": 118, "failed": 2, "pending": 0},
    "failed_by_code": {"context_length_exceeded": 2},
    "usage": {
        "prompt_tokens": 50_000,
        "completion_tokens": 12_000,
        "total_tokens": 62_000,
        "cached_tokens": 8_000,
        "reasoning_tokens": 0,
    },
    "cost_usd": 0.0123,
    "cost_unknown_models": [],
    "output": "out/summarize.jsonl",
    "failures": "out/summarize.failures.jsonl",
    "this_run": {
        "requests": {"sent": 130, "succeeded": 118, "failed": 2, "retries": 10, "rate_limited": 3},
        "usage": {
            "prompt_tokens": 40_000,
            "completion_tokens": 10_000,
            "total_tokens": 50_000,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
        },
        "cost_usd": 0.0100,
        "wall_time_s": 299.5,
        "latency_s": {"p50": 0.8, "p95": 2.5, "p99": 4.0, "max": 9.75},
        "errors_by_code": {"server_error": 3, "context_length_exceeded": 2},
        "achieved_rpm": 26.0,
        "achieved_tpm": 10_000.0,
    },
}


def read(path: Path) -> dict[str, dict[LabelSet, float]]:
    """metric name → {labels other than job, sorted → value}; every sample must be labelled
    with the summary's job."""
    out: dict[str, dict[LabelSet, float]] = {}
    for family in text_string_to_metric_families(path.read_text(encoding="utf-8")):
        assert family.type == "gauge"
        assert len(family.documentation) > 20, family.name  # HELP a person can read
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("job") == "summarize"
            out.setdefault(sample.name, {})[tuple(sorted(labels.items()))] = sample.value
    return out


def summary(**changes: Any) -> Summary:
    result = copy.deepcopy(SUMMARY)
    result.update(changes)
    return Summary.model_validate(result)


def test_full_summary_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary())
    m = read(path)

    assert m["batchgpt_rows"] == {
        (("status", "succeeded"),): 118,
        (("status", "failed"),): 2,
        (("status", "pending"),): 0,
    }
    assert m["batchgpt_tokens"] == {
        (("kind", "prompt"),): 50_000,
        (("kind", "completion"),): 12_000,
        (("kind", "cached"),): 8_000,
        (("kind", "reasoning"),): 0,
        (("kind", "total"),): 62_000,
    }
    assert m["batchgpt_run_tokens"][(("kind", "total"),)] == 50_000
    assert m["batchgpt_cost_usd"] == {(): 0.0123}
    assert m["batchgpt_run_cost_usd"] == {(): 0.01}
    assert m["batchgpt_run_duration_seconds"] == {(): 299.5}
    assert m["batchgpt_run_requests"] == {
        (("result", "sent"),): 130,
        (("result", "succeeded"),): 118,
        (("result", "failed"),): 2,
        (("result", "retries"),): 10,
        (("result", "rate_limited"),): 3,
    }
    assert m["batchgpt_run_errors"] == {
        (("code", "server_error"),): 3,
        (("code", "context_length_exceeded"),): 2,
    }
    assert m["batchgpt_run_latency_seconds"] == {
        (("quantile", "0.5"),): 0.8,
        (("quantile", "0.95"),): 2.5,
        (("quantile", "0.99"),): 4.0,
        (("quantile", "1"),): 9.75,
    }
    assert m["batchgpt_run_outcome"] == {
        (("outcome", name),): (1.0 if name == "completed" else 0.0) for name in OUTCOMES
    }
    assert m["batchgpt_last_run_timestamp_seconds"] == {(): T1}
    assert m[LAST_SUCCESS_METRIC] == {(): T1}
    # The temporary file was renamed into place, not left behind for the collector.
    assert [p.name for p in tmp_path.iterdir()] == ["batchgpt.prom"]


def test_unknown_cost_is_omitted_not_zero(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    this_run = {**SUMMARY["this_run"], "cost_usd": None}
    write_metrics(path, summary(cost_usd=None, this_run=this_run))
    m = read(path)
    assert "batchgpt_cost_usd" not in m
    assert "batchgpt_run_cost_usd" not in m
    assert "batchgpt_cost_usd" not in path.read_text(encoding="utf-8")  # not even HELP
    assert m["batchgpt_rows"][(("status", "succeeded"),)] == 118


def test_last_success_survives_failed_runs(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary())  # completed at T1

    for outcome in ("failed_rows", "error", "interrupted"):
        write_metrics(path, summary(outcome=outcome, finished_at="2026-11-24T10:05:00Z"))
        m = read(path)
        assert m[LAST_SUCCESS_METRIC] == {(): T1}
        assert m["batchgpt_last_run_timestamp_seconds"] == {(): T2}
        assert m["batchgpt_run_outcome"][(("outcome", outcome),)] == 1.0
        assert m["batchgpt_run_outcome"][(("outcome", "completed"),)] == 0.0

    write_metrics(path, summary(finished_at="2026-11-24T10:05:00+00:00"))
    assert read(path)[LAST_SUCCESS_METRIC] == {(): T2}


def test_no_success_yet_means_no_last_success(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary(outcome="stopped"))
    m = read(path)
    assert LAST_SUCCESS_METRIC not in m
    assert m["batchgpt_last_run_timestamp_seconds"] == {(): T1}


def test_last_success_of_another_job_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary(job="translate"))
    write_metrics(path, summary(outcome="failed_rows"))
    assert LAST_SUCCESS_METRIC not in read(path)


def test_garbled_previous_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    path.write_text('batchgpt_last_success_timestamp_seconds{job="summarize" 1\n')
    write_metrics(path, summary(outcome="failed_rows"))
    m = read(path)
    assert LAST_SUCCESS_METRIC not in m
    assert m["batchgpt_run_outcome"][(("outcome", "failed_rows"),)] == 1.0


def test_none_figures_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    this_run = {**SUMMARY["this_run"], "latency_s": {"p50": 0.5, "p95": None, "p99": None,
                                                     "max": None}}
    write_metrics(path, summary(this_run=this_run))
    assert read(path)["batchgpt_run_latency_seconds"] == {(("quantile", "0.5"),): 0.5}


def test_timestamp_without_offset_is_utc(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary(finished_at="2026-11-23T10:05:00"))
    assert read(path)["batchgpt_last_run_timestamp_seconds"] == {(): T1}


@pytest.mark.parametrize(
    "bad",
    [{"job": None}, {"cost_usd": "a lot"}, {"requests": [1, 2]}, {"outcome": "budget_exceeded"},
     {"requests": {"total": 1, "succeeded": 1, "failed": 0, "pending": 0, "done": 1}}],
)
def test_a_summary_of_the_wrong_shape_is_refused_before_anything_is_written(
    bad: dict[str, Any]
) -> None:
    """The summary is typed once: a renamed or mistyped field is an error, never a metric
    that silently disappears."""
    with pytest.raises(ValidationError):
        summary(**bad)


def test_an_unreadable_timestamp_raises_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "batchgpt.prom"
    write_metrics(path, summary())
    before = path.read_text(encoding="utf-8")
    with pytest.raises(ValueError):
        write_metrics(path, summary(finished_at="yesterday"))
    assert path.read_text(encoding="utf-8") == before
