"""batchgpt: run large batches of OpenAI ChatCompletion requests — paced under the
account's limits, resumable after a kill, every record accounted for exactly once.

Library use::

    from batchgpt import JobConfig, RunOptions, run_job_sync

    result = run_job_sync("jobs/summarize.yaml", RunOptions(sandbox=True))
    print(result.outcome, result.summary["usage"])

Names are imported lazily, so ``python -m batchgpt.simulator`` doesn't pay for loading
the openai SDK it never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "JobConfig": "batchgpt.config",
    "BatchGPTError": "batchgpt.errors",
    "ConfigError": "batchgpt.errors",
    "InputError": "batchgpt.errors",
    "LockedError": "batchgpt.errors",
    "StateError": "batchgpt.errors",
    "RunOptions": "batchgpt.runner",
    "RunResult": "batchgpt.runner",
    "run_job": "batchgpt.runner",
    "run_job_sync": "batchgpt.runner",
}

if TYPE_CHECKING:
    from batchgpt.config import JobConfig
    from batchgpt.errors import BatchGPTError, ConfigError, InputError, LockedError, StateError
    from batchgpt.runner import RunOptions, RunResult, run_job, run_job_sync


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchgpt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "BatchGPTError",
    "ConfigError",
    "InputError",
    "JobConfig",
    "LockedError",
    "RunOptions",
    "RunResult",
    "StateError",
    "__version__",
    "run_job",
    "run_job_sync",
]
