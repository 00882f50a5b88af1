"""Packing pending rows into the provider's Batch API input files.

One file per model (the Batch API refuses a file whose lines name several), each within
the job's ``batch.max_lines`` and ``batch.max_bytes``, and, after a batch failed on the
provider's enqueued-token limit, within a prompt-token size that halves each time
(``max_tokens``). Rows keep their input order inside a file, so a validation error that
names a line number names a row."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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
    """The rows of one future file."""

    model: str
    rows: list[CarriedRow] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    prompt_tokens: int = 0
    worst_usd: float = 0.0

    def data(self) -> bytes:
        return b"".join(self.lines)


class Packer:
    """Fills one open part per model; :meth:`add` hands back a part that is full."""

    def __init__(self, max_lines: int, max_bytes: int, max_tokens: int | None) -> None:
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
            part = self._open[model] = Part(model)
        part.rows.append(row)
        part.lines.append(line)
        part.size += len(line)
        part.prompt_tokens += prompt_tokens
        part.worst_usd += worst_usd
        return closed

    def rest(self) -> Iterator[Part]:
        """The parts still open, each closed."""
        parts, self._open = list(self._open.values()), {}
        yield from (p for p in parts if p.rows)
