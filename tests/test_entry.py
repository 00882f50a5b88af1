"""The ``batchgpt`` command's entry point: ``--version`` without loading the CLI, anything
else handed to it unchanged."""

from __future__ import annotations

import subprocess
import sys

from batchgpt import __version__

PROBE = """
import sys
sys.argv = ["batchgpt", *sys.argv[1:]]
from batchgpt.entry import main
try:
    main()
finally:
    print("loaded:", sorted(m for m in ("typer", "pydantic", "batchgpt.cli", "openai")
                             if m in sys.modules), file=sys.stderr)
"""


def _entry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, timeout=60)


def test_version_answers_without_loading_the_cli_or_the_sdk() -> None:
    done = _entry("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"batchgpt {__version__}\n"
    assert "loaded: []" in done.stderr


def test_every_other_command_line_goes_to_the_cli() -> None:
    done = _entry("status", "--help")
    assert done.returncode == 0, done.stderr
    assert "What a job has done so far" in done.stdout
    assert "Traceback" not in done.stderr
