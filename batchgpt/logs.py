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

import errno
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from batchgpt.files import NotRegularFile, file_kind

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


def open_log_file(path: str | os.PathLike[str]) -> io.TextIOWrapper:
    """``path`` opened for appending text, created if missing. Anything but a regular file
    is refused (NotRegularFile): a FIFO would block the open until a reader appears (a
    cron job hung before it starts) or feed a reader that may go away, and a device is
    not a log. The open itself never blocks (``O_NONBLOCK``; a FIFO with no reader fails
    at once) and the file is checked again once open."""
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX only
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | nonblock | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, or a socket
            raise NotRegularFile(path, file_kind(os.stat(path).st_mode) or "a special file"
                                 ) from None
        raise
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise NotRegularFile(path, kind)
    if nonblock:
        os.set_blocking(fd, True)
    return open(fd, "a", encoding="utf-8")


class _LogFileHandler(logging.FileHandler):
    """A FileHandler whose file is opened by :func:`open_log_file`."""

    def _open(self) -> io.TextIOWrapper:
        return open_log_file(self.baseFilename)


def setup_logging(fmt: str, log_file: Path | None, verbose: bool) -> None:
    """Logs to stderr and, with ``log_file``, to that file too. Raises OSError (with the
    stderr handler in place, to report it) when the file can't be opened, and
    NotRegularFile when it is not a regular file."""
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
        file_handler = _LogFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(
            formatter if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        )
        logger.addHandler(file_handler)
