"""A run's figures as a Prometheus metrics file, for batch jobs that run from cron.

A cron job has no process left to scrape when Prometheus comes by, so the figures go to a
file instead: node_exporter's textfile collector (``--collector.textfile.directory``)
exposes every ``*.prom`` file in its directory. ``prometheus_client.write_to_textfile``
writes a temporary file next to the target and renames it over the target, so the
collector never reads half a file; the temporary name doesn't end in ``.prom``, so it is
never collected either. Give :func:`write_metrics` a path ending in ``.prom``.

The file is rewritten whole on every run; the one figure carried over from the previous
file is ``batchgpt_last_success_timestamp_seconds``, so that an alert such as::

    time() - batchgpt_last_success_timestamp_seconds > 26 * 3600

keeps counting from the last good night through any number of failed ones.

Every metric carries a ``job`` label with the job's name. Prometheus attaches its own
``job`` label (the scrape job's name) to everything it scrapes, and with the default
``honor_labels: false`` it renames ours to ``exported_job``; query ``exported_job`` then,
or set ``honor_labels: true`` on the node_exporter scrape job.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from batchgpt.pricing import Usage
from batchgpt.summary import Outcome, Summary

__all__ = ["JOB_LABEL", "LAST_SUCCESS_METRIC", "OUTCOMES", "write_metrics"]

log = logging.getLogger(__name__)

JOB_LABEL = "job"
LAST_SUCCESS_METRIC = "batchgpt_last_success_timestamp_seconds"

# Every outcome gets a sample (1 for this run's, 0 for the others), so an alert can say
# `batchgpt_run_outcome{outcome="completed"} == 0` instead of testing for absence.
OUTCOMES = tuple(o.value for o in Outcome if o is not Outcome.DRY_RUN)

# (label values after `job`, value); a None value means "not known", and is left out.
_Samples = Iterable[tuple[tuple[str, ...], float | None]]


def _tokens(usage: Usage) -> _Samples:
    return [(("prompt",), usage.prompt_tokens), (("completion",), usage.completion_tokens),
            (("cached",), usage.cached_tokens), (("reasoning",), usage.reasoning_tokens),
            (("total",), usage.total_tokens)]


def write_metrics(path: str | os.PathLike[str], summary: Summary) -> None:
    """Write ``summary`` to ``path``, replacing the file.

    A figure that is None leaves its sample out rather than writing a 0 that would read
    as a fact: "cost unknown" (a model without a price) must not look like "free". The
    summary is the typed model the summary file is written from, and its fields are read
    as attributes, so a renamed field is a type error here, never a metric that silently
    disappears. OSError from writing the file is left to the caller.
    """
    job = summary.job
    requests = summary.requests
    this_run = summary.this_run
    run_requests = this_run.requests
    latency = this_run.latency_s
    errors = this_run.errors_by_code
    outcome = summary.outcome.value
    finished_at = _timestamp(summary.finished_at)
    run_duration: float | None = this_run.wall_time_s

    last_success = finished_at if summary.outcome is Outcome.COMPLETED else None
    if last_success is None:
        last_success = _previous_last_success(Path(path), job)

    registry = CollectorRegistry()

    def gauge(name: str, help_text: str, labels: tuple[str, ...], samples: _Samples) -> None:
        known = [(values, value) for values, value in samples if value is not None]
        if not known:
            return  # no HELP/TYPE lines for a metric with nothing to say
        metric = Gauge(name, help_text, (JOB_LABEL, *labels), registry=registry)
        for values, value in known:
            metric.labels(job, *values).set(value)

    gauge(
        "batchgpt_rows",
        "Input rows of the job by state, over all runs of it so far: succeeded, failed "
        "(given up on, listed in the failures file) or pending (not done yet; a later run "
        "resumes them).",
        ("status",),
        [(("succeeded",), requests.succeeded), (("failed",), requests.failed),
         (("pending",), requests.pending)],
    )
    gauge(
        "batchgpt_rows_by_mode",
        "Succeeded rows of the job by the mode that answered them: online (one request "
        "at a time) or batch (the provider's Batch API, mode: batch).",
        ("mode",),
        [((mode,), count) for mode, count in summary.rows_by_mode.items()],
    )
    gauge(
        "batchgpt_batches_running",
        "mode: batch: the job's batches still running at the provider after the last run.",
        (),
        [((), summary.batches_running)],
    )
    gauge(
        "batchgpt_tokens",
        "Tokens the job has used over all its runs, as reported by the API. cached is part "
        "of prompt and reasoning is part of completion.",
        ("kind",),
        _tokens(summary.usage),
    )
    gauge(
        "batchgpt_cost_usd",
        "Estimated USD the job has cost over all its runs, from batchgpt's price table or "
        "the job file's pricing block. Absent when the model's price is unknown.",
        (),
        [((), summary.cost_usd)],
    )
    gauge(
        "batchgpt_run_cost_usd",
        "Estimated USD the last run cost. Absent when the model's price is unknown.",
        (),
        [((), this_run.cost_usd)],
    )
    gauge(
        "batchgpt_run_tokens",
        "Tokens the last run used, as reported by the API.",
        ("kind",),
        _tokens(this_run.usage),
    )
    gauge(
        "batchgpt_run_duration_seconds",
        "How long the last run took, start to finish, in seconds.",
        (),
        [((), run_duration)],
    )
    gauge(
        "batchgpt_run_requests",
        "Requests of the last run: sent (every attempt, retries included), succeeded, "
        "failed (rows given up on), retries, and rate_limited (429 answers).",
        ("result",),
        [(("sent",), run_requests.sent), (("succeeded",), run_requests.succeeded),
         (("failed",), run_requests.failed), (("retries",), run_requests.retries),
         (("rate_limited",), run_requests.rate_limited)],
    )
    gauge(
        "batchgpt_run_errors",
        "Error answers in the last run by error code (server_error, "
        "context_length_exceeded, ...), retried or not.",
        ("code",),
        (((str(code),), float(count)) for code, count in errors.items()),
    )
    gauge(
        "batchgpt_model_rows",
        "Results each model answered over all runs of the job (a fallback model's rows "
        "included).",
        ("model",),
        [((model,), float(t.rows)) for model, t in summary.by_model.items()],
    )
    gauge(
        "batchgpt_model_cost_usd",
        "Estimated USD each model cost over all runs of the job (rejected replies and "
        "re-asks included). Absent for a model whose price is unknown.",
        ("model",),
        [((model,), t.cost_usd) for model, t in summary.by_model.items()],
    )
    gauge(
        "batchgpt_run_reasks",
        "Follow-up turns of the last run, by the reason the reply they answered was "
        "rejected (invalid_json, schema, denied_term, regex, too_long, truncated, "
        "content_filter, refusal).",
        ("reason",),
        [((reason,), float(n)) for reason, n in this_run.reasks_by_reason.items()],
    )
    gauge(
        "batchgpt_run_fallbacks",
        "Rows of the last run moved to each fallback model.",
        ("model",),
        [((model,), float(n)) for model, n in this_run.fallbacks_by_model.items()],
    )
    gauge(
        "batchgpt_run_latency_seconds",
        "Request latency in the last run, in seconds: median (0.5), 95th and 99th "
        "percentile, and the slowest request (1).",
        ("quantile",),
        [(("0.5",), latency.p50), (("0.95",), latency.p95), (("0.99",), latency.p99),
         (("1",), latency.max)],
    )
    gauge(
        "batchgpt_run_outcome",
        "How the last run ended, 1 for its outcome and 0 for the others: completed "
        "(every row succeeded), failed_rows (finished, but some rows failed for good), "
        "retryable_rows (finished, but some rows failed for reasons that may pass; a rerun "
        "sends them), interrupted (cut short, e.g. by Ctrl-C or SIGTERM; a rerun resumes), "
        "stopped (halted because going on was pointless or unsafe, e.g. bad key, no quota, "
        "a failed write), error (batchgpt itself failed), batch_pending (mode: batch: batches "
        "still running at the provider; a later run collects them).",
        ("outcome",),
        (((name,), 1.0 if name == outcome else 0.0) for name in OUTCOMES),
    )
    gauge(
        "batchgpt_last_run_timestamp_seconds",
        "When the last run finished, whatever its outcome, as a Unix timestamp.",
        (),
        [((), finished_at)],
    )
    gauge(
        LAST_SUCCESS_METRIC,
        "When a run last finished with every row succeeded, as a Unix timestamp; kept "
        "across failed runs. Alert on time() minus this.",
        (),
        [((), last_success)],
    )

    write_to_textfile(os.fspath(path), registry)


def _timestamp(value: str) -> float:
    """Unix time from an ISO 8601 string. A time without an offset is taken as UTC:
    batchgpt writes UTC, and guessing the local zone of whichever machine reads the
    report would move the figure by hours."""
    text = value.strip()
    if text.endswith(("Z", "z")):  # fromisoformat before Python 3.11 rejects "Z"
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _previous_last_success(path: Path, job: str) -> float | None:
    """The last-success time recorded for ``job`` in the file being replaced, if any.

    An unreadable or garbled old file is logged and treated as having none: losing the
    old value makes the staleness alert fire early, which is better than a run that fails
    at its very end over its metrics.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("can't read the previous metrics file %s: %s", path, exc)
        return None
    try:
        for family in text_string_to_metric_families(text):
            if family.name != LAST_SUCCESS_METRIC:
                continue
            for sample in family.samples:
                if sample.labels.get(JOB_LABEL) == job and not math.isnan(sample.value):
                    return float(sample.value)
    except ValueError as exc:  # the parser's only complaint about malformed text
        log.warning("ignoring unparsable previous metrics file %s: %s", path, exc)
    return None
