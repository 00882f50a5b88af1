"""What happens to a bug: one line for the user, the traceback in a file.

An unexpected exception is a bug in batchgpt, never the user's fault, and a cron log full
of a Python traceback helps nobody. The CLI (and a run's workers) write the traceback,
with every secret of the run removed, to a file next to the job's state and print one
line naming the error and the file; the exit code is 70 (EX_SOFTWARE). Results already
committed are untouched: they are in the output.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path


def write_crash_report(exc: BaseException, folder: Path | None,
                       scrub: Callable[[str], str] | None = None) -> Path:
    """Write ``exc``'s traceback to ``folder/crash-<UTC time>.txt`` (the system's temp
    folder when ``folder`` is None or can't be written) and return the file's path."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if scrub is not None:
        text = scrub(text)
    name = f"crash-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}.txt"
    for where in (folder, Path(tempfile.gettempdir())):
        if where is None:
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            path = where / name
            with path.open("w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(path, 0o600)
            return path
        except OSError:
            continue
    raise OSError("cannot write a crash report anywhere")
