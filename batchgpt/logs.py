"""Logging: a human line on a terminal, one typed JSON object per event for cron.

Code that reports something a machine may want to read calls :func:`event` with a
name and typed fields (numbers as numbers, the summary as an object); the fields travel
on the log record (``extra=``), never inside the message. The text format prints the
message only, so the human line stays as it was; :class:`JsonFormatter` prints the event,
its fields and the message, and nothing has to parse a message back into numbers.

The events and their fields are a public surface, listed in the README ("JSON log
events"): add fields, never rename them.

Only the CLI calls :func:`setup_logging`; a library user configures logging as they like
(the fields are on each record as ``record.event`` and ``record.fields``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

_job: str | None = None  # the job name added to every JSON line once the CLI knows it


def event(logger: logging.Logger, level: int, name: str, msg: str, *args: object,
          **fields: Any) -> None:
    """Log ``msg % args`` for people and, for machines, the event ``name`` with ``fields``
    (JSON types only: str, int, float, bool, None, lists and dicts of them)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, extra={"event": name, "fields": fields})


def bind_job(name: str | None) -> None:
    """Name the job on every JSON line from now on (the CLI calls it once the job file is
    read, so even a store warning or an error carries ``job``)."""
    global _job
    _job = name


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "event", "job", <the event's fields>..., "msg"}`` on one line.
    A record logged without :func:`event` is ``"event": "log"``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
        }
        if _job is not None:
            out["job"] = _job
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in ("ts", "level", "event", "msg"):
                    out[key] = value
        out["msg"] = record.getMessage()
        try:
            return json.dumps(out, ensure_ascii=False, allow_nan=False, default=str)
        except ValueError:  # NaN or an infinity somewhere: JSON has no spelling for them
            return json.dumps(_finite(out), ensure_ascii=False, default=str)


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def setup_logging(fmt: str, log_file: Path | None, verbose: bool) -> None:
    bind_job(None)
    logger = logging.getLogger("batchgpt")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(
            formatter if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        )
        logger.addHandler(file_handler)
