"""The job's lock: one run of a job at a time, whatever else is running."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from batchgpt.errors import LockedError, StateError


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobLock:
    """An exclusive flock on the job's state folder. The kernel drops it when the holder
    dies, however it dies, so a stale lock never needs cleaning up by hand."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot use the job's lock {self.path}: {exc.strerror}") from None
        # `holder` (batchgpt status) takes a shared lock for an instant to look: a run
        # starting in that instant must not be turned away with exit 75 ("unknown"
        # holder), so try again for up to ~0.1 s before deciding the lock is held.
        for pause in (0.0, 0.01, 0.02, 0.03, 0.04):
            time.sleep(pause)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
        else:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockedError(
                f"another batchgpt run holds this job's lock ({self.path}): {holder or 'unknown'}"
            ) from None
        self._fd = fd
        with contextlib.suppress(OSError):  # who holds it is for `status`; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, started {now_iso()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(state_dir: Path) -> str | None:
        """Who holds the lock now (None when nobody does); for `batchgpt status`."""
        path = state_dir / "lock"
        if not path.exists():
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return "unknown (the lock file can't be read)"
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                except OSError:
                    return "unknown"
            except OSError:
                return "unknown (the lock file can't be locked)"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
