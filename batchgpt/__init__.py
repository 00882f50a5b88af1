"""batchgpt: run large batches of OpenAI ChatCompletion requests — paced under the
account's limits, resumable after a kill, every record accounted for exactly once.

Library use::

    from batchgpt import JobConfig, RunOptions, run_job_sync

    result = run_job_sync("jobs/summarize.yaml", RunOptions(sandbox=True))
    print(result.outcome, result.summary["usage"])
"""

from batchgpt.config import JobConfig
from batchgpt.errors import BatchGPTError, ConfigError, InputError, LockedError, StateError
from batchgpt.runner import RunOptions, RunResult, run_job, run_job_sync

__version__ = "0.1.0"

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
