"""The ``batchgpt`` command's entry point: ``batchgpt --version`` answers before the CLI
(typer, pydantic, the job-file models: ~0.25 s of imports) is loaded; everything else goes
to :func:`batchgpt.cli.main`."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from batchgpt import __version__

        print(f"batchgpt {__version__}")
        return
    from batchgpt.cli import main as cli_main

    cli_main()
