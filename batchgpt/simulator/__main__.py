"""``python -m batchgpt.simulator``: the sandbox in its own process (benchmarks)."""

from batchgpt.simulator.app import main

main()
