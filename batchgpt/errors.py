"""The errors batchgpt raises on purpose, and what the CLI does with them.

::

    BatchGPTError                 anything batchgpt reports to the user without a traceback
    ├── ConfigError               the job file is wrong (exit 1, nothing sent)
    ├── InputError                input lines are wrong; carries every problem found (exit 1)
    ├── StateError                the checkpoint or output can't be read or written (exit 1)
    ├── LockedError               another run holds this job's lock (exit 75)
    └── RunStopped                the server said stop: auth, permission, quota (exit 1)

Row-level failures (a 400 for one record, a request too large for the TPM limit) are not
exceptions that travel up: they become rows of the failures file, and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    exit_code = 75


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


class RunStopped(BatchGPTError):
    """The server answered in a way that makes every further request pointless (bad key,
    no permission, out of quota)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
