"""Group commit: results reach the output and the index in batches, durably, in order.

Workers hand their row's outcome to :class:`GroupWriter` and wait. Whatever arrived while
the previous commit ran is committed next, in a worker thread: the results' lines are
appended to the output and fsynced, then one SQLite transaction records them (offsets,
usage, what was paid) together with the output's new size, CRC and fingerprint. Only then
do the workers' awaits return, so a row is never "done" before its line is durable, and a
worker that holds its concurrency slot until then bounds what a kill can cost.

The first failure stops the run: every waiting and later ``put`` raises a
:class:`StateError`. What it means for the results still coming in (from requests that
were already on the wire) depends on what failed:

* **the output** (a full disk, the file deleted or replaced): nothing more can be written;
  a failed append is cut back by the output log, so no partial line is left;
* **the index** (an SQLite error, the state folder removed): the output is fine, so every
  result that still arrives is appended to it, complete and fsynced, before its ``put``
  raises — and the next run takes those lines over. Nothing is recorded in the index from
  then on, and nothing is ever recorded at an offset that was not written.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass

from batchgpt.errors import StateError
from batchgpt.pricing import Usage
from batchgpt.store.index import Index, NewFailure, NewResult
from batchgpt.store.output_log import OutputLog


@dataclass(slots=True)
class _Item:
    result: NewResult | None
    failure: NewFailure | None
    line: bytes
    done: asyncio.Future[None]
    meta: dict[str, str | int] | None = None
    spend: tuple[str, Usage] | None = None  # a reply paid for and not kept (a re-ask's)


class IndexFailed(StateError):
    """The index can't be written; the output still can."""


class GroupWriter:
    def __init__(self, out: OutputLog, index: Index, run_id: int | None) -> None:
        self.out = out
        self.index = index
        self.run_id = run_id
        self.broken: StateError | None = None  # nothing more can be written
        self.unindexed: IndexFailed | None = None  # results go to the output only
        self.replaced = 0  # results this run replaced (their rows had an older result)
        self._queue: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._index_inode = _inode(index.path)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batchgpt-writer")

    async def stop(self) -> None:
        """Commit everything queued, then stop."""
        if self._task is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._task
        self._task = None

    async def put_result(self, custom_id: str, req_hash: str, line: bytes, attempts: int,
                         model: str | None, usage: Usage) -> None:
        """Returns once the result is durably in the output and recorded."""
        await self._put(NewResult(custom_id, req_hash, 0, len(line), attempts, model, usage),
                        None, line)

    async def put_failure(self, custom_id: str, req_hash: str, line: bytes, attempts: int,
                          error_code: str, transient: bool) -> None:
        await self._put(None, NewFailure(custom_id, req_hash, transient, error_code, attempts,
                                         line), line)

    async def put_spend(self, model: str, usage: Usage) -> None:
        """Record what a reply that is not kept cost (one an output check rejected): it
        was paid for, so the job's spend and its cap count it, in order with the results
        around it."""
        await self._put(None, None, b"", spend=(model, usage))

    @property
    def healthy(self) -> bool:
        """Every result so far is in the output and recorded in the index."""
        return self.broken is None and self.unindexed is None

    async def put_meta(self, **values: str | int) -> None:
        """Record values in the index's meta, in order with the results around them (the
        budget's in-flight allowance, before the requests it covers are sent)."""
        await self._put(None, None, b"", values)

    async def _put(self, result: NewResult | None, failure: NewFailure | None,
                   line: bytes, meta: dict[str, str | int] | None = None,
                   spend: tuple[str, Usage] | None = None) -> None:
        if self.broken is not None:
            raise self.broken
        if self._task is None:
            raise StateError("the result writer is not running")
        item = _Item(result, failure, line, asyncio.get_running_loop().create_future(), meta,
                     spend)
        self._queue.append(item)
        self._wakeup.set()
        await asyncio.shield(item.done)

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._queue:
                batch, self._queue = self._queue, []
                error: BaseException | None = None
                try:
                    if self.broken is not None:
                        raise self.broken
                    await asyncio.to_thread(self._commit, batch)
                except IndexFailed as exc:
                    self.unindexed = error = exc
                except StateError as exc:
                    self.broken = error = exc
                except Exception as exc:  # a bug or an unforeseen error: stop writing
                    self.broken = error = StateError(
                        f"cannot record results: {type(exc).__name__}: {exc}")
                for item in batch:
                    if not item.done.done():
                        if error is None:
                            item.done.set_result(None)
                        else:
                            item.done.set_exception(error)
            if self._closing and not self._queue:
                return

    def _commit(self, batch: list[_Item]) -> None:
        """Runs in a worker thread: append, fsync, then one transaction."""
        results: list[NewResult] = []
        failures: list[NewFailure] = []
        chunks: list[bytes] = []
        extra: dict[str, str | int] = {}
        spend: list[tuple[str, Usage]] = []
        for item in batch:
            if item.spend is not None:
                spend.append(item.spend)
            if item.result is not None:
                results.append(item.result)
                chunks.append(item.line)
            elif item.failure is not None:
                failures.append(item.failure)
            if item.meta:
                extra.update(item.meta)
        meta: dict[str, str | int] = {}
        if chunks:
            start, fingerprint = self.out.append(b"".join(chunks))
            pos = start
            for r in results:
                r.off = pos
                pos += r.len
            meta = {"output_size": self.out.size, "output_crc": self.out.crc,
                    "fingerprint": fingerprint.dumps()}
        meta.update(extra)
        if self.unindexed is not None:
            raise self.unindexed  # appended above: the next run takes these lines over
        kept = (f"; the {len(results)} results just written are kept in {self.out.path} "
                "and the next run takes them over") if results else ""
        self._check_state_folder(kept)
        try:
            self.replaced += self.index.commit(results, failures, self.run_id, spend=spend,
                                               **meta)
        except (sqlite3.Error, OverflowError, ValueError) as exc:
            raise IndexFailed(f"cannot record results in the checkpoint "
                              f"({type(exc).__name__}: {exc}){kept}") from None

    def _check_state_folder(self, kept: str) -> None:
        """The checkpoint (and the lock beside it) removed during the run: recording into
        a deleted file would be for nothing, and the lock no longer keeps a second run
        out. Stop instead; the output, the durable record, is untouched."""
        if self._index_inode is not None and _inode(self.index.path) != self._index_inode:
            folder = self.index.path.parent if self.index.path else "the state folder"
            raise IndexFailed(f"{folder} was removed or replaced during the run; stopping"
                              f"{kept}")


def _inode(path: object) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_ino  # type: ignore[arg-type]
    except OSError:
        return -1
