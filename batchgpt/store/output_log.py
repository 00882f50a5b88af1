"""The output JSONL: the durable record of every result, append-only.

This file is the user's: it is the only copy of each paid result, it may be copied,
restored from a backup or edited by hand, and the checkpoint beside it is just an index
that can be rebuilt from it. So nothing here ever truncates or rewrites it except

* cutting back a write that failed half-way (the bytes past the start of that write are
  not a result anyone can use),
* moving a torn final fragment aside (written to a file named in the log first, then cut),
* an atomic compaction (a new file written, fsynced and renamed over the old one).

Each append is written whole, fsynced, and chained into a running CRC-32 of the file, so
a later open can prove that the prefix the checkpoint indexes is byte for byte what was
written (see :mod:`batchgpt.store.recover`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchgpt.errors import StateError

READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What ``stat`` says of the file. Equal fingerprints mean nobody touched the file
    since it was recorded: any write changes the size or the times, a copy or an editor's
    save-by-rename changes the inode, and ``ctime`` cannot be set back by hand."""

    size: int
    inode: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def dumps(self) -> str:
        return f"{self.size}:{self.inode}:{self.mtime_ns}:{self.ctime_ns}"


# json.dumps with options builds an encoder per call; one per process will do.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_line(obj: Any) -> bytes:
    """One JSON line. Readable UTF-8 where possible; a string that can't be encoded (a
    lone surrogate a server sent as ``\\ud800``, legal JSON) is kept escaped instead of
    stopping the run, so the result is stored rather than paid for again on every rerun."""
    try:
        return (_encode(obj) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class OutputChanged(StateError):
    """The output file is not what this process last wrote (removed, replaced, written
    to by someone else)."""


class OutputLog:
    """Appends results to the output and reads them back. Used from one thread at a time
    (the writer's), under the job's lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.size = 0  # where the next append lands
        self.crc = 0  # CRC-32 of bytes [0, size)

    # -- state --------------------------------------------------------------------------
    def fingerprint(self) -> Fingerprint | None:
        try:
            return Fingerprint.of(os.stat(self.path))
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self.path.exists()

    def start(self, size: int, crc: int) -> None:
        """Appends continue at ``size``, whose prefix has checksum ``crc``."""
        self.size = size
        self.crc = crc

    # -- appending ------------------------------------------------------------------------
    def append(self, data: bytes) -> tuple[int, Fingerprint]:
        """Write ``data`` at the end, fsync it, and return (its offset, the fingerprint
        after the write). On any failure the file is cut back to where the write began,
        so no partial line is left behind, and the error says what happened."""
        fd = self._open()
        start = self.size
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise OutputChanged(f"{self.path} was deleted (or replaced) during the run; "
                                "nothing more is written to it")
        if st.st_size != start:
            raise OutputChanged(
                f"{self.path} changed during the run ({st.st_size} bytes where batchgpt "
                f"wrote {start}); stopping so that no result is recorded at a wrong place"
            )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            after = os.fstat(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            same = os.stat(self.path).st_ino == after.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise OutputChanged(f"{self.path} was moved or replaced during the run; nothing "
                                "more is written to it")
        self.size = start + len(data)
        self.crc = zlib.crc32(data, self.crc)
        return start, Fingerprint.of(after)

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise StateError(f"cannot open {self.path}: {exc.strerror}") from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading --------------------------------------------------------------------------
    def checksum(self, size: int) -> int | None:
        """CRC-32 of the first ``size`` bytes, or None when the file is shorter."""
        crc = 0
        left = size
        try:
            with self.path.open("rb") as fh:
                while left > 0:
                    chunk = fh.read(min(READ_CHUNK, left))
                    if not chunk:
                        return None
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
        except FileNotFoundError:
            return None
        return crc

    def lines(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, line) for every line from ``start``, each with its newline; a final
        fragment without one comes last, as it is."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            fh.seek(start)
            offset = start
            for line in fh:
                yield offset, line
                offset += len(line)

    def read(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    # -- repair ---------------------------------------------------------------------------
    def set_aside(self, kind: str, data: Iterable[bytes]) -> Path:
        """Write ``data`` to a new file beside the output (``out/x.jsonl.torn-<UTC time>``),
        fsynced, before anything is removed from the output."""
        base = self.path.with_name(f"{self.path.name}.{kind}-{stamp()}")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}.{n}")
        with path.open("wb") as fh:
            for chunk in data:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return path

    def cut(self, size: int) -> None:
        """Cut the file to ``size`` bytes (only ever to drop what was set aside first)."""
        self.close()
        with self.path.open("r+b") as fh:
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())

    def add_newline(self) -> None:
        """A complete last line whose newline was lost (an editor): give it one back."""
        self.close()
        with self.path.open("ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- compaction -----------------------------------------------------------------------
    @property
    def compact_path(self) -> Path:
        return self.path.with_name(self.path.name + ".compact")

    def write_compacted(self, ranges: Iterable[tuple[str, int, int]]
                        ) -> tuple[list[tuple[int, str]], int, int]:
        """Copy the ``(custom_id, offset, length)`` ranges, in order, to the compaction
        file and fsync it. Each range is checked to be a whole line of that id before it
        is copied (a hand-edited output must not be trusted blindly). Returns the new
        offsets that moved, the new size and its CRC-32; raises OutputChanged on a range
        that is not what the index says."""
        self.close()
        tmp = self.compact_path
        discard_file(tmp)  # a stale one (or a link planted there) is never written through
        moved: list[tuple[int, str]] = []
        pos = 0
        crc = 0
        try:
            with self.path.open("rb") as src, tmp.open("xb") as dst:
                for custom_id, offset, length in ranges:
                    src.seek(offset)
                    line = src.read(length)
                    if not line_is_result_of(line, custom_id):
                        raise OutputChanged(
                            f"{self.path}: the line at byte {offset} is not the result of "
                            f"{custom_id!r} the checkpoint records there; the file was "
                            "changed outside batchgpt"
                        )
                    dst.write(line)
                    crc = zlib.crc32(line, crc)
                    if offset != pos:
                        moved.append((pos, custom_id))
                    pos += length
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            discard_file(tmp)  # a partial copy must not eat a full disk's last space
            raise
        return moved, pos, crc

    def swap_in_compacted(self) -> Fingerprint:
        """Rename the compaction file over the output and make the rename durable."""
        self.close()
        os.replace(self.compact_path, self.path)
        fsync_dir(self.path.parent)
        st = os.stat(self.path)
        return Fingerprint.of(st)


def line_is_result_of(line: bytes, custom_id: str) -> bool:
    """Whether ``line`` is one whole output line for ``custom_id``. Lines batchgpt writes
    start ``{"id":"batch_req_…","custom_id":<id>,``, so the usual check is a byte
    comparison; anything else is parsed."""
    if not line.endswith(b"\n"):
        return False
    head = b'"custom_id":' + json.dumps(custom_id, ensure_ascii=False).encode(
        "utf-8", "backslashreplace") + b","
    if line.find(head, 0, 80 + len(head)) > 0:
        return True
    parsed = parse_result_line(line)
    return parsed is not None and parsed.custom_id == custom_id


# -- the receipt in each line's id ----------------------------------------------------------

TAG_MARK = "b"  # the 13th hex digit of a tag; a uuid4's is always "4"


def answer_tag(custom_id: str, request_hash: str) -> str:
    """The 32 hex digits of a line's ``id`` (``batch_req_<tag>``): a digest of the row's id
    and the hash of the exact request the line answers.

    The output is the durable record, but a line alone does not say which request it
    answered, and the index that does can be lost, restored from an old backup, or
    outlived by an output restored from one. With the tag, a line proves it: a rebuild
    keeps a line as the answer to the current request only when its tag is that
    request's tag, so yesterday's answers to a changed prompt are never taken for today's
    (and today's are never sent again because an old index said otherwise).

    A tag must never be mistaken for another tool's random id (those lines are adopted as
    answers to the current request, as before): its 13th digit is fixed (a uuid4's is
    always "4") and its last four digits check the first 28, so a random 32-hex id passes
    for a tag once in about a million."""
    digest = hashlib.sha256(f"{custom_id}\x00{request_hash}".encode("utf-8", "surrogatepass")
                            ).hexdigest()
    head = digest[:12] + TAG_MARK + digest[13:28]
    return head + _tag_check(head)


def _tag_check(head: str) -> str:
    return hashlib.sha256(f"batchgpt-tag:{head}".encode()).hexdigest()[:4]


def line_id(custom_id: str, request_hash: str) -> str:
    return f"batch_req_{answer_tag(custom_id, request_hash)}"


def tag_of(line_id_value: object) -> str | None:
    """The tag in a line's ``id``, or None when the id is not one of ours (a uuid4 from an
    older batchgpt, the Batch API's own ids, a hand edit)."""
    if not isinstance(line_id_value, str) or not line_id_value.startswith("batch_req_"):
        return None
    tag = line_id_value[10:]
    if len(tag) != 32 or tag[12] != TAG_MARK or not _is_hex(tag):
        return None
    return tag if _tag_check(tag[:28]) == tag[28:] else None


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return text == text.lower()


@dataclass(frozen=True, slots=True)
class ParsedLine:
    custom_id: str
    model: str | None
    usage: Any  # the response body's `usage`, as sent
    tag: str | None  # the answer tag in its id, when it has one


def parse_result_line(line: bytes) -> ParsedLine | None:
    """A result line as batchgpt (or the Batch API) writes it: an object with a string
    ``custom_id`` and a ``response`` with status 200 and an object body. None for
    anything else (a torn or hand-broken line, a failure line)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    custom_id = obj.get("custom_id")
    response = obj.get("response")
    if not isinstance(custom_id, str) or not custom_id or not isinstance(response, dict):
        return None
    body = response.get("body")
    if response.get("status_code") != 200 or not isinstance(body, dict):
        return None
    model = body.get("model")
    return ParsedLine(custom_id, model if isinstance(model, str) else None, body.get("usage"),
                      tag_of(obj.get("id")))


def discard_file(path: Path) -> None:
    """Remove ``path`` if it is there, whatever it is (a dangling link included)."""
    if os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where not supported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
