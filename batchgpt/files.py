"""Opening a file that must be a regular file, without ever blocking.

Inputs and job files are read from cron on paths users did not always choose: a FIFO (or
``/dev/stdin`` from a pipe) blocks ``open`` until a writer appears — inside the event loop,
deaf to SIGTERM — and a directory or a device is not data. So the path is ``stat``-ed
first, opened non-blocking (should it become a pipe between the two calls, the open still
returns) and ``fstat``-ed again.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


class NotRegularFile(OSError):
    """The path is something other than a regular file; ``kind`` says what."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        self.kind = kind
        super().__init__(f"{os.fspath(path)} is {kind}, not a regular file")


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, for a message; None for a regular one."""
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file. Raises NotRegularFile,
    or the OSError of stat or open (FileNotFoundError, PermissionError, ...)."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotRegularFile(path, kind)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise NotRegularFile(path, kind)
    return open(fd, "rb")


def probe_writable(folder: str | os.PathLike[str], name: str) -> None:
    """Create and remove a file in ``folder`` (``.<name>.…probe``): whether a file named
    ``name`` could be written, or swapped in, there. Raises the OSError of the attempt."""
    fd, probe = tempfile.mkstemp(prefix=f".{name}.", suffix=".probe", dir=folder)
    os.close(fd)
    os.unlink(probe)


def nonblank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of each line of a JSONL file that is not blank; nothing
    when the file does not exist (a job that wrote no result yet)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                yield number, raw
