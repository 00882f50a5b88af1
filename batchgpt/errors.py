"""The errors batchgpt raises on purpose, the exit codes, and what the CLI does with them.

::

    BatchGPTError                 anything batchgpt reports to the user without a traceback
    ├── ConfigError               the job file or a setting is wrong (exit 1, nothing sent)
    ├── InputError                input lines are wrong; carries every problem found (exit 1)
    ├── StateError                the output or checkpoint can't be used (exit 1)
    └── LockedError               another run holds this job's lock (exit 75)

Row-level failures (a 400 for one record, a request too large for the TPM limit) are not
exceptions that travel up: they become rows of the failures file, and the run goes on.
Anything else that reaches the CLI is a bug: one line, a traceback file, exit 70.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    """The process's exit status: a public surface (cron and systemd scripts test it)."""

    OK = 0  # every row succeeded
    ERROR = 1  # could not run, or stopped: bad job file or input, key, quota, storage
    USAGE = 2  # command-line usage error
    ROWS_FAILED = 3  # finished; some rows failed permanently (see the failures file)
    BUDGET = 4  # stopped by limits.max_cost_usd
    BATCH_PENDING = 5  # mode: batch: batches still running at the provider; run again later
    ROWS_RETRYABLE = 6  # finished; some rows failed for a reason that may pass: rerun later
    SOFTWARE = 70  # an internal error (EX_SOFTWARE): a bug; a traceback file is named
    LOCKED = 75  # another run of the job holds its lock (EX_TEMPFAIL)
    SIGINT = 130
    SIGTERM = 143


class BatchGPTError(Exception):
    """Base class: the message is for a human and never holds a secret."""

    exit_code = 1


class ConfigError(BatchGPTError):
    pass


@dataclass(frozen=True)
class InputProblem:
    """One thing wrong with one input line."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class InputError(BatchGPTError):
    def __init__(self, problems: list[InputProblem], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        text = "\n".join(str(p) for p in problems)
        if more:
            text += f"\n… and {more} more problem(s) not shown"
        super().__init__(text)


class StateError(BatchGPTError):
    pass


class LockedError(BatchGPTError):
    exit_code = ExitCode.LOCKED


class RequestTooLarge(BatchGPTError):
    """One request costs more tokens than the whole tokens-per-minute limit: it can never
    be sent, so its row fails alone."""

    def __init__(self, cost: int, limit: float) -> None:
        self.cost = cost
        self.limit = limit
        super().__init__(
            f"request needs about {cost} tokens, more than the whole tokens-per-minute "
            f"limit of {limit:g}; it can never be sent at this limit"
        )
