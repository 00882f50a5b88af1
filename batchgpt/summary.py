"""How a run ended and what it reports: the outcome and stop-reason enums, and the
summary's shape, typed once.

The summary JSON (``out/x.summary.json``, ``--json``) is read by users' scripts, the
metrics file and ``batchgpt status``; every one of them goes through :class:`Summary`,
so renaming a field is a type error in each reader instead of a metric that silently
disappears. The JSON keys are a public surface: add, never rename.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from batchgpt.pricing import Usage


class Outcome(str, enum.Enum):
    """How a run ended (``summary.outcome``, the metrics' ``outcome`` label)."""

    COMPLETED = "completed"  # every row of the input succeeded
    FAILED_ROWS = "failed_rows"  # finished; some rows failed permanently
    RETRYABLE_ROWS = "retryable_rows"  # finished; some rows failed for a reason that may pass
    INTERRUPTED = "interrupted"  # a signal; a rerun resumes
    STOPPED = "stopped"  # going on was pointless or unsafe (see StopReason)
    ERROR = "error"  # batchgpt itself failed (an internal error)
    BATCH_PENDING = "batch_pending"  # mode: batch: batches still running at the provider
    DRY_RUN = "dry_run"  # RunResult only: nothing was sent (never in a summary file)


class StopReason(str, enum.Enum):
    """Why a run stopped before every row was settled (``summary.stopped``)."""

    SIGNAL = "signal"
    BUDGET = "budget"
    QUOTA = "quota"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    MODEL_NOT_FOUND = "model not found"
    INVALID_URL = "invalid URL"
    RATE_LIMIT = "rate limit"  # a hint too long to wait out inside a run
    STORAGE = "storage"  # a result could not be written
    INPUT_CHANGED = "input changed"  # the input was rewritten during the run
    CIRCUIT_BREAKER = "circuit breaker"  # the first attempts all failed the same way
    INTERNAL_ERROR = "internal error"
    INCOMPLETE = "incomplete"  # rows left unresolved without another reason (a bug guard)
    PROVIDER = "provider"  # mode: batch: the provider's Files or Batches API failed
    CANCELLED = "cancelled"  # mode: batch: `batchgpt cancel` cancelled the running batches


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Requests(_Model):
    """Rows of the current input, by state, over every run of the job."""

    total: int
    succeeded: int
    failed: int
    pending: int
    # Results kept in the output for ids that are no longer in the input.
    not_in_input: int = 0


class RunRequests(_Model):
    sent: int  # HTTP attempts, retries included
    succeeded: int
    failed: int
    retries: int
    rate_limited: int


class Latency(_Model):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class Recovery(_Model):
    """What opening the job's state had to repair before anything was sent."""

    taken_over: int = 0  # results found in the output but not in the checkpoint
    lost: int = 0  # results the checkpoint recorded that are no longer in the output
    set_aside: list[str] = Field(default_factory=list)  # files holding removed fragments


class ThisRun(_Model):
    requests: RunRequests
    usage: Usage
    cost_usd: float | None
    wall_time_s: float
    latency_s: Latency
    errors_by_code: dict[str, int]
    first_error_by_code: dict[str, str] = Field(default_factory=dict)
    achieved_rpm: float | None
    achieved_tpm: float | None
    recovered: Recovery = Field(default_factory=Recovery)
    # The output checks (validate:): follow-up turns by the reason of the reply they
    # answered, and rows moved to each fallback model.
    reasks_by_reason: dict[str, int] = Field(default_factory=dict)
    fallbacks_by_model: dict[str, int] = Field(default_factory=dict)


class ModelTotals(_Model):
    """One model's share of the job, over all its runs."""

    rows: int  # results it answered (replaced ones included: they were paid for)
    usage: Usage  # everything it was paid for: results, replaced results, rejected replies
    cost_usd: float | None  # None: its price is unknown


class PlanCounts(_Model):
    to_send: int
    new: int
    retried: int
    changed: int
    changed_kept: int
    already_done: int
    failed_kept: int
    deferred: int


class Summary(_Model):
    job: str
    outcome: Outcome
    stopped: StopReason | None
    message: str | None
    started_at: str
    finished_at: str
    wall_time_s: float
    requests: Requests
    failed_by_code: dict[str, int]
    # What the job has been charged over all its runs: every result ever received,
    # replaced ones included (they were paid for).
    usage: Usage
    cost_usd: float | None
    cost_unknown_models: list[str]
    # Of cost_usd, what no result in the output records (USD): the cost of replaced
    # results from before the index was lost (read back from the previous summary), and the
    # worst case of requests sent and never answered (a killed run, abandoned requests).
    # cost_usd and the cap (limits.max_cost_usd) both count it; status reports the same.
    cost_unrecorded_usd: float = 0.0
    by_model: dict[str, ModelTotals] = Field(default_factory=dict)
    this_run: ThisRun
    output: str
    failures: str
    plan: PlanCounts | None = None
    # The job's succeeded rows by the mode that answered them ("online", "batch"), and,
    # in batch mode, the batches still running at the provider.
    rows_by_mode: dict[str, int] = Field(default_factory=dict)
    batches_running: int = 0

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
