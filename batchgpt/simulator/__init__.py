"""The built-in simulator: a real HTTP server speaking the parts of the OpenAI API that
batchgpt uses, with seeded faults, so a new user can try a job without a key and every
test talks to a real server over loopback.

``app.py`` holds the server (Chat Completions, models, the ``/_sandbox`` control routes);
capabilities that grow beside it (the Files and Batches endpoints, output faults for the
checks) live in their own modules and register their routes on the same app.
"""

from __future__ import annotations

from batchgpt.simulator.app import (
    FaultConfig,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    SimulatorThread,
    completion_for,
    format_go_duration,
    main,
    serve,
)

__all__ = [
    "FaultConfig",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "SimulatorThread",
    "completion_for",
    "format_go_duration",
    "main",
    "serve",
]
