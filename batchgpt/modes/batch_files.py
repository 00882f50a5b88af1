"""Packing pending rows into the provider's Batch API input files.

One file per model (the Batch API refuses a file whose lines name several), each within
the job's ``batch.max_lines`` and ``batch.max_bytes``, and, after a batch failed on the
provider's enqueued-token limit, within a prompt-token size that halves each time
(``max_tokens``). Rows keep their input order inside a file, so a validation error that
names a line number names a row."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from batchgpt.source import Row
from batchgpt.store.batches import CarriedRow
from batchgpt.store.output_log import encode_line

ENDPOINT = "/v1/chat/completions"


def request_line(row: Row) -> bytes:
    """The row as a Batch API request line: the body exactly as online mode sends it."""
    return encode_line({"custom_id": row.custom_id, "method": "POST", "url": ENDPOINT,
                        "body": row.body})


@dataclass
class Part:
    """The rows of one future file. Its lines go to an unnamed temporary file (in the
    job's state folder, gone when closed or killed), so a 190 MB part is never held in
    memory; the SDK streams it from there."""

    model: str
    folder: Path
    rows: list[CarriedRow] = field(default_factory=list)
    size: int = 0
    prompt_tokens: int = 0
    worst_usd: float = 0.0
    _file: IO[bytes] | None = None

    def write(self, line: bytes) -> None:
        if self._file is None:
            # closed by close(), which the submitter always calls
            self._file = tempfile.TemporaryFile(dir=self.folder, prefix="batch-part-")  # noqa: SIM115
        self._file.write(line)
        self.size += len(line)

    def file(self) -> IO[bytes]:
        """The file, rewound, to upload."""
        assert self._file is not None, "an empty part is never uploaded"
        self._file.flush()
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Packer:
    """Fills one open part per model; :meth:`add` hands back a part that is full."""

    def __init__(self, folder: Path, max_lines: int, max_bytes: int,
                 max_tokens: int | None) -> None:
        self.folder = folder
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self._open: dict[str, Part] = {}

    def fits_alone(self, line: bytes) -> bool:
        return len(line) <= self.max_bytes

    def add(self, model: str, row: CarriedRow, line: bytes, prompt_tokens: int,
            worst_usd: float) -> Part | None:
        """Add a row; the part it could not join (now closed) when that one was full."""
        part = self._open.get(model)
        closed = None
        if part is not None and part.rows and (
                len(part.rows) >= self.max_lines or part.size + len(line) > self.max_bytes
                or (self.max_tokens is not None
                    and part.prompt_tokens + prompt_tokens > self.max_tokens)):
            closed = part
            part = None
        if part is None:
            part = self._open[model] = Part(model, self.folder)
        part.rows.append(row)
        part.write(line)
        part.prompt_tokens += prompt_tokens
        part.worst_usd += worst_usd
        return closed

    def rest(self) -> Iterator[Part]:
        """The parts still open (no longer open to rows)."""
        parts, self._open = list(self._open.values()), {}
        yield from (p for p in parts if p.rows)

    def discard(self) -> None:
        """Close the parts still open (a stop: they are not submitted)."""
        for part in self._open.values():
            part.close()
        self._open = {}
