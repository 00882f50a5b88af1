"""``mode: batch``: the job's rows through the provider's Batch API, at half price.

A run never blocks on the provider. In order, it

1. **reconciles**: a submission a killed run left between upload and create (or between
   create and recording the batch) is matched against the provider's batches (by the
   submission id in their metadata) and files (by name): a batch found is recorded; a
   file that never became a batch is deleted and its rows are free again. Files of
   finished submissions still at the provider are deleted.
2. **polls** every recorded batch and **collects** the finished ones (completed, expired,
   cancelled, failed): each output or error line is taken into the output or failures
   file exactly as an online answer would be (same line, same index, same retry classes
   through :func:`batchgpt.retry.decide`); a retryable error with attempts left, and
   every row nothing answered (``batch_expired``, ``batch_cancelled``, a lost batch, a
   ``token_limit_exceeded`` failure) is pending again.
3. **submits** the pending rows not already at the provider: packed per model within
   ``batch.max_lines`` / ``batch.max_bytes`` (:mod:`.batch_files`), each submission's
   worst case counted against ``limits.max_cost_usd`` at Batch prices and its prompt
   tokens against ``limits.batch_queue_tokens`` before it is sent, and recorded in the
   ledger (:mod:`batchgpt.store.batches`) before upload, after upload and after create.

With ``--wait`` it then polls every ``batch.poll_interval_s`` until every row is settled;
without, it exits 5 while batches are running. Only the openai SDK's ``files`` and
``batches`` resources talk to the provider.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import hashlib
import json
import logging
import re
import signal
import uuid
from array import array
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgpt.budget import billed_model
from batchgpt.clock import Clock, SystemClock
from batchgpt.config import JobConfig
from batchgpt.credentials import resolve_credentials
from batchgpt.errors import BatchGPTError, ExitCode, StateError
from batchgpt.logs import event
from batchgpt.modes.batch_files import Packer, Part, request_line
from batchgpt.modes.lines import failure_line, failure_of, parse_line, result_line
from batchgpt.plan import Plan, planned_rows, row_check
from batchgpt.pricing import Usage, batch_key, cost_usd, price_usage, resolve_price
from batchgpt.redact import Redactor
from batchgpt.report import RunStats, render_table
from batchgpt.retry import Action, Failure, Kind, decide
from batchgpt.source import InputFile, Row
from batchgpt.store import Store, now_iso
from batchgpt.store.batches import (
    BatchLedger,
    CarriedRow,
    RowOutcome,
    Submission,
    SubState,
)
from batchgpt.summary import Outcome, StopReason
from batchgpt.tokens import DEFAULT_OUTPUT_RESERVE, output_cap, prompt_tokens

if TYPE_CHECKING:
    import openai

    from batchgpt.runner import RunOptions, RunResult

log = logging.getLogger("batchgpt")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
META_JOB = "batchgpt_job"
META_SUBMISSION = "batchgpt_submission"
# Which output the batch's rows belong to: the parts of a sharded job (and jobs of the same
# name elsewhere) share META_JOB, and must not adopt each other's batches.
META_OUTPUT = "batchgpt_output"
PART_TOKENS_META = "part_prompt_tokens"  # after token_limit_exceeded: smaller parts
UPLOAD_TIMEOUT_S = 600.0
UNANSWERED = ("batch_expired", "batch_cancelled")
WRITE_GROUP = 1000  # collected lines written together (one group commit of the store)


class Step(str, enum.Enum):
    """The points of a submission at which a kill leaves something to reconcile."""

    PREPARED = "prepared"  # rows recorded, nothing uploaded
    UPLOADED = "uploaded"  # the file is at the provider, not recorded
    UPLOAD_RECORDED = "upload_recorded"  # recorded, no batch yet
    CREATED = "created"  # the batch exists, not recorded
    SUBMIT_RECORDED = "submit_recorded"  # the batch is recorded
    COLLECT_WRITTEN = "collect_written"  # its lines are in the output, the ledger not told


# Called with each Step as a submission passes it. Tests set it (in a child process) to
# die at a chosen step, as a kill would; nothing else does.
STEP_HOOK: Callable[[Step], None] | None = None


class ProviderError(BatchGPTError):
    """A call to the provider's Files or Batches API failed (after the SDK's retries)."""


def _step(step: Step) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(step)


class BatchRun:
    """One run of a job in batch mode (or one ``batchgpt cancel``)."""

    def __init__(self, job: JobConfig, options: RunOptions, store: Store, plan: Plan,
                 source: InputFile) -> None:
        self.job = job
        self.options = options
        self.store = store
        self.plan = plan
        self.source = source
        self.clock: Clock = options.clock or SystemClock()
        # A new ledger (the job's first batch run, or its state folder lost): the
        # provider may hold batches of this job it does not know; reconcile adopts them.
        self.ledger_new = not BatchLedger.exists(job.state_dir)
        self.ledger = BatchLedger.open(job.state_dir)
        self.stats = RunStats()
        self.settled: set[str] = set()  # rows this run took a result or failure for
        self._planned: array[int] | None = None  # the plan's row checks, sorted
        self.redact = Redactor.for_key(job.api.api_key_env)
        self.client: openai.AsyncOpenAI | None = None
        self.stop_reason: StopReason | None = None
        self.stop_message: str | None = None
        self.stop_exit: int | None = None
        self.stopping = asyncio.Event()
        self.hold_submissions = False  # the enqueued-token limit was hit: wait for batches
        self.cancelled = False  # `batchgpt cancel`

    # -- the provider ---------------------------------------------------------------------
    @property
    def sdk(self) -> openai.AsyncOpenAI:
        assert self.client is not None, "connect() first"
        return self.client

    async def connect(self, base_url: str | None, key: str) -> None:
        import openai

        self.redact = self.redact.with_secrets(key)
        # The SDK's own retries (2, with backoff) are the only retry layer of these
        # control calls: no row is re-sent by them, only a file or a poll (a create is
        # never retried: see _submit).
        self.client = openai.AsyncOpenAI(
            api_key=key, base_url=base_url, organization=self.job.api.organization,
            project=self.job.api.project, timeout=self.job.timeout_s, max_retries=2)

    async def _call(self, what: str, coro: Any) -> Any:
        """One provider call; its failure a ProviderError whose message holds no key."""
        import openai

        try:
            return await coro
        except openai.APIError as exc:
            raise ProviderError(self.provider_message(what, exc)) from None

    def provider_message(self, what: str, exc: Exception) -> str:
        import openai

        if isinstance(exc, openai.APIStatusError):
            said = f"the provider refused to {what} (HTTP {exc.status_code}): {exc.message}"
        else:
            said = f"could not {what}: {type(exc).__name__}: {exc}"
        return self.redact.text(said)

    async def _delete_files(self, sub: Submission) -> None:
        """Delete a finished submission's files at the provider (a file already gone is
        fine); what could not be deleted is tried again by the next run."""
        import openai

        left = []
        for file_id in sub.files_left:
            try:
                await self.sdk.files.delete(file_id)
            except openai.NotFoundError:
                pass
            except openai.APIError as exc:
                log.warning("could not delete the provider's file %s (%s); the next run "
                            "tries again", file_id, self.redact.text(str(exc)))
                left.append(file_id)
        self.ledger.set_files_left(sub.sub_id, left)

    # -- 1. reconcile ---------------------------------------------------------------------
    async def reconcile(self) -> None:
        unsure = [s for s in self.ledger.submissions(live_only=True)
                  if s.state is not SubState.SUBMITTED]
        if self.ledger_new:
            for sub_id, batch in (await self._batches_of_job(own_output=True)).items():
                await self._adopt(sub_id, batch)
        if unsure:
            batches = await self._batches_of_job()
            files = await self._files_by_name()
            for sub in unsure:
                found = batches.get(sub.sub_id)
                if found is not None:
                    log.info("batch %s of submission %s was created by an interrupted run; "
                             "recorded, not submitted again", found.id, sub.sub_id)
                    self.ledger.set_submitted(sub.sub_id, found.id, found.input_file_id)
                    continue
                uploaded = set(files.get(self._filename(sub), []))
                if sub.file_id is not None:
                    uploaded.add(sub.file_id)
                log.info("submission %s was interrupted before its batch was created; its "
                         "%d rows are submitted again%s", sub.sub_id, sub.rows,
                         f" and its uploaded file {', '.join(sorted(uploaded))} deleted"
                         if uploaded else "")
                self.ledger.discard(sub.sub_id, sorted(uploaded))
        for sub in self.ledger.with_files_left():
            await self._delete_files(sub)

    async def _adopt(self, sub_id: str, batch: Any) -> None:
        """Record a batch of this job that the ledger does not know (its state folder
        was lost): its rows are read back from its input file, so it is collected, not
        submitted again. A batch whose input file is gone was collected before (a
        collection deletes it last)."""
        import openai

        from batchgpt.source import request_hash

        if self.ledger.get(sub_id) is not None:
            return
        rows: list[CarriedRow] = []
        model, prompt, worst = "", 0, 0.0
        try:
            async for raw in self._lines(batch.input_file_id):
                line = parse_line(raw)
                body = line.get("body") if line is not None else None
                if line is None or not isinstance(body, dict) or not isinstance(
                        line.get("custom_id"), str):
                    continue
                rows.append(CarriedRow(line["custom_id"], request_hash(body), 1))
                model = str(body.get("model"))
                tokens = prompt_tokens(body.get("messages"))
                prompt += tokens
                worst += _worst(model, tokens, output_cap(body), self.job) or 0.0
        except ProviderError as exc:
            if not isinstance(exc.__cause__, openai.NotFoundError):
                log.info("batch %s of this job: its input file cannot be read (%s); "
                         "left alone", batch.id, exc)
            return
        if not rows:
            return
        log.warning("batch %s of this job (%s, %d rows) is not in the job's state (the "
                    "state folder was lost?): adopted, so its rows are collected, not "
                    "submitted again", batch.id, batch.status, len(rows))
        self.ledger.prepare(sub_id, model, rows, size=0, prompt_tokens=prompt,
                            worst_usd=worst)
        self.ledger.set_submitted(sub_id, batch.id, batch.input_file_id)

    async def _batches_of_job(self, own_output: bool = False) -> dict[str, Any]:
        """The provider's batches of this job, by submission id (from their metadata);
        ``own_output``: only those of this output (not another part of a sharded job)."""
        found: dict[str, Any] = {}
        async for batch in self.sdk.batches.list(limit=100):
            meta = batch.metadata or {}
            if (meta.get(META_JOB) == self.job.job_name[:512] and META_SUBMISSION in meta
                    and (not own_output
                         or meta.get(META_OUTPUT) in (None, self._output_tag()))):
                found[meta[META_SUBMISSION]] = batch
        return found

    async def _files_by_name(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        async for f in self.sdk.files.list(purpose="batch"):
            found.setdefault(f.filename, []).append(f.id)
        return found

    def _output_tag(self) -> str:
        return hashlib.sha256(str(Path(self.job.output).resolve()).encode()).hexdigest()[:32]

    def _filename(self, sub: Submission) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.job.job_name)[:64]
        return f"batchgpt-{name}-{sub.sub_id}.jsonl"

    # -- 2. poll and collect --------------------------------------------------------------
    async def poll(self) -> None:
        import openai

        for sub in self.ledger.submissions(live_only=True):
            if sub.state is not SubState.SUBMITTED or self.stopping.is_set():
                continue
            assert sub.batch_id is not None
            try:
                batch = await self.sdk.batches.retrieve(sub.batch_id)
            except openai.NotFoundError:
                log.warning("batch %s is unknown to the provider (deleted, or another "
                            "account or sandbox); its %d rows are submitted again",
                            sub.batch_id, sub.rows)
                await self._collect(sub, None)
                continue
            except openai.APIError as exc:
                raise ProviderError(self.provider_message(
                    f"report on batch {sub.batch_id}", exc)) from None
            counts = batch.request_counts
            self.ledger.set_status(
                sub.sub_id, batch.status,
                {"total": counts.total, "completed": counts.completed,
                 "failed": counts.failed} if counts is not None else {},
                batch.expires_at, json.loads(self.redact.text(json.dumps(
                    [e.model_dump() for e in (batch.errors.data or [])]
                    if batch.errors is not None else []))))
            if batch.status in TERMINAL:
                await self._collect(sub, batch)

    async def _lines(self, file_id: str | None) -> AsyncIterator[bytes]:
        """A provider file's lines, streamed (an output file may be hundreds of MB), each
        cleaned of the key."""
        import httpx2
        import openai

        if file_id is None:
            return
        try:
            async with self.sdk.files.with_streaming_response.content(file_id) as response:
                rest = b""
                async for chunk in response.iter_bytes():
                    *lines, rest = (rest + chunk).split(b"\n")
                    for line in lines:
                        yield self.redact.data(line)
                if rest.strip():
                    yield self.redact.data(rest)
        except openai.APIError as exc:
            raise ProviderError(self.provider_message(f"send file {file_id}", exc)) from exc
        except httpx2.HTTPError as exc:  # the connection dropped while the file streamed
            raise ProviderError(self.provider_message(f"send file {file_id}", exc)) from exc

    async def _collect(self, sub: Submission, batch: Any) -> None:
        """Take a finished batch's lines into the output and failures files."""
        import openai

        rows = {r.custom_id: r for r in self.ledger.carried(sub.sub_id)}
        outcomes: dict[str, RowOutcome] = {}
        status = "lost" if batch is None else batch.status
        if batch is not None:
            writes: list[Coroutine[Any, Any, None]] = []
            for file_id in (batch.output_file_id, batch.error_file_id):
                try:
                    async for raw in self._lines(file_id):
                        write = self._take_line(sub, rows, raw, outcomes)
                        if write is not None:
                            writes.append(write)
                        if len(writes) >= WRITE_GROUP:
                            await _together(writes)
                except ProviderError as exc:
                    if not isinstance(exc.__cause__, openai.NotFoundError):
                        for write in writes:  # not taken: the next run reads them again
                            write.close()
                        raise
                    # Deleted or expired at the provider: asking again would fail on
                    # every run for ever. Its rows are unanswered, so sent again.
                    log.warning("batch %s: its output file %s is lost at the provider (%s); "
                                "the rows it answered are submitted again", sub.batch_id,
                                file_id, exc)
            await _together(writes)
            if status == "failed":
                await self._failed_validation(sub, batch, rows, outcomes)
        _step(Step.COLLECT_WRITTEN)
        self.ledger.settle_rows(sub.sub_id, outcomes)
        missing = len(rows) - len(outcomes)
        files = [f for f in (sub.file_id, getattr(batch, "output_file_id", None),
                             getattr(batch, "error_file_id", None)) if f]
        self.ledger.collected(sub.sub_id, files)
        done = sum(o is RowOutcome.SUCCEEDED for o in outcomes.values())
        event(log, logging.INFO, "batch_collected", "batch %s %s: %d rows succeeded, %d "
              "failed, %d to send again", sub.batch_id, status, done,
              sum(o is RowOutcome.FAILED for o in outcomes.values()),
              missing + sum(o is RowOutcome.RETRY for o in outcomes.values()),
              job=self.job.job_name, batch=sub.batch_id, status=status)
        collected = self.ledger.get(sub.sub_id)
        assert collected is not None
        await self._delete_files(collected)

    def _take_line(self, sub: Submission, rows: dict[str, CarriedRow], raw: bytes,
                   outcomes: dict[str, RowOutcome]) -> Coroutine[Any, Any, None] | None:
        """Decide what one line of a finished batch means for its row (recorded in
        ``outcomes`` at once, so a second line for the row is ignored); the write to the
        output or failures file it needs, to be awaited with others (one group commit)."""
        line = parse_line(raw)
        if line is None:
            return None
        carried = rows.get(str(line.get("custom_id")))
        if carried is None or carried.custom_id in outcomes:
            return None
        response = line.get("response")
        error = line.get("error")
        if isinstance(response, dict) and response.get("status_code") == 200 and isinstance(
                response.get("body"), dict):
            outcomes[carried.custom_id] = RowOutcome.SUCCEEDED
            return self._succeed(sub, carried, response)
        if not isinstance(response, dict) and isinstance(error, dict) and (
                error.get("code") in UNANSWERED):
            return None  # never executed: sent again, its attempt not counted
        failure = failure_of(response, error)
        decision = decide(failure, carried.attempt, self.job.retry)
        self.stats.add_error(failure.error_code, failure.message)
        if decision.action is Action.RETRY:
            self.stats.retries += 1
            outcomes[carried.custom_id] = RowOutcome.RETRY
            return None
        outcomes[carried.custom_id] = RowOutcome.FAILED
        # A stop-the-run answer (quota, key, model) is about the account, not the row: as
        # online, where it stops the run, the row is left for a later run.
        transient = decision.action is Action.STOP_RUN or (
            decision.action is Action.FAIL_ROW and decision.transient)
        return self._fail(carried, failure, transient)

    def _current(self, row: CarriedRow) -> bool:
        """Whether the row's request is the one the plan sends for it: not one the input
        changed (or removed) while its batch ran. (The plan's checks, sorted once.)"""
        if self._planned is None:
            self._planned = array("q", sorted(self.plan.checks))
        check = row_check(row.custom_id, row.request_hash)
        i = bisect.bisect_left(self._planned, check)
        return i < len(self._planned) and self._planned[i] == check

    async def _succeed(self, sub: Submission, row: CarriedRow, response: dict[str, Any]
                       ) -> None:
        held = self.store.unsettled([(row.custom_id, row.request_hash)])
        if row.custom_id not in held:
            return  # taken by a run killed before recording it
        body: dict[str, Any] = response["body"]
        echoed = body.get("model")
        model = batch_key(billed_model(echoed if isinstance(echoed, str) else sub.model,
                                       sub.model, self.job.pricing))
        usage = Usage.parse_response(body.get("usage")).usage
        request_id = response.get("request_id")
        line = result_line(row.custom_id, row.request_hash,
                           request_id if isinstance(request_id, str) else None, body)
        writer = self.store.writer
        assert writer is not None
        if not self._current(row):
            # The answer to a request the input no longer holds: paid for, so counted; kept
            # only for a row without any result (never in place of one), and the row's
            # current request is still to send.
            self.stats.add_usage(model, usage)
            if held[row.custom_id].has_result:
                await writer.put_spend(model, usage)
            else:
                await writer.put_result(row.custom_id, row.request_hash, line, row.attempt,
                                        model, usage)
            return
        await writer.put_result(row.custom_id, row.request_hash, line, row.attempt, model,
                                usage)
        self.settled.add(row.custom_id)
        self.stats.succeeded += 1
        self.stats.add_usage(model, usage)

    async def _fail(self, row: CarriedRow, failure: Failure, transient: bool) -> None:
        line = failure_line(row.custom_id, row.request_hash, failure, row.attempt, transient)
        stored = self.store.lookup([row.custom_id]).get(row.custom_id)
        if stored is not None and stored.failure is not None and stored.failure.line == line:
            return  # this very line was recorded by a run killed before the ledger knew
        current = self._current(row)
        if not current and stored is not None:
            return  # a request the input no longer holds: never in place of what is kept
        writer = self.store.writer
        assert writer is not None
        await writer.put_failure(row.custom_id, row.request_hash, line, row.attempt,
                                 failure.error_code, transient)
        if not current:
            return  # not this row's answer: its current request is still to send
        self.settled.add(row.custom_id)
        self.stats.failed += 1
        self.stats.failed_codes[failure.error_code] += 1
        if transient:
            self.stats.failed_retryable += 1

    async def _failed_validation(self, sub: Submission, batch: Any,
                                 rows: dict[str, CarriedRow],
                                 outcomes: dict[str, RowOutcome]) -> None:
        """A batch the provider refused whole. Its errors are reported; the enqueued-token
        limit sends its rows again later in smaller parts; an error naming a line fails
        that line's row (the others go again); any other error fails every row."""
        errors = list(batch.errors.data or []) if batch.errors is not None else []
        said = self.redact.text(
            "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                      for e in errors[:5]) or "no reason given")
        log.warning("%s", self.redact.text(f"batch {sub.batch_id} failed validation at the "
                                           f"provider: {said}"))
        if any(e.code == "token_limit_exceeded" for e in errors):
            others = [s for s in self.ledger.submissions(live_only=True)
                      if s.sub_id != sub.sub_id]
            if len(rows) == 1 and not others:
                # One row, nothing else of the job enqueued: no smaller part can pass.
                # It fails, retryable (the limit, or other jobs' batches, may change);
                # sent again, it would be refused again on every poll, for ever.
                (row,) = rows.values()
                outcomes[row.custom_id] = RowOutcome.FAILED
                await self._fail(row, Failure(
                    Kind.HTTP, said, 400, "token_limit_exceeded",
                    "invalid_request_error"), True)
                return
            tokens = max(1, sub.prompt_tokens // 2)
            self.ledger.set_meta(PART_TOKENS_META, str(tokens))
            self.hold_submissions = True
            log.warning("the provider's enqueued-token limit for %s is full: its %d rows are "
                        "submitted again in parts of at most %d prompt tokens, once running "
                        "batches have finished", sub.model, sub.rows, tokens)
            return
        order = list(rows.values())  # the file's order
        by_line = {e.line: e for e in errors if e.line}
        failing: list[tuple[CarriedRow, Failure]] = []
        for number, error in sorted(by_line.items()):
            if 1 <= number <= len(order):
                failing.append((order[number - 1], Failure(
                    Kind.HTTP, self.redact.text(str(error.message)), 400, str(error.code),
                    "invalid_request_error")))
        if not by_line:
            first = errors[0] if errors else None
            code = str(first.code) if first is not None else "batch_failed"
            failing = [(row, Failure(Kind.HTTP, said, 400, code, "invalid_request_error"))
                       for row in order]
        for row, _ in failing:
            outcomes[row.custom_id] = RowOutcome.FAILED
        for start in range(0, len(failing), WRITE_GROUP):
            await _together([self._fail(row, failure, False)
                             for row, failure in failing[start:start + WRITE_GROUP]])

    # -- 3. submit ------------------------------------------------------------------------
    def _pending_rows(self) -> Iterator[Row]:
        """The planned rows, re-read by offset and checked (:func:`planned_rows`)."""
        return planned_rows(self.plan, self.source, self._input_changed)

    def _input_changed(self, line: int, why: str) -> None:
        self.request_stop(StopReason.INPUT_CHANGED, f"{self.source.path}:{line}: the input "
                          f"changed during the run ({why}); nothing more is submitted. Rerun "
                          "to continue with the input as it is now", ExitCode.ERROR)

    def _spent(self) -> float:
        totals = self.store.totals()
        spent, _ = price_usage(totals.spend_by_model, self.job.pricing, known_only=True)
        return (spent or 0.0) + totals.unseen_usd

    async def submit(self) -> None:
        if self.hold_submissions and self.ledger.submissions(live_only=True):
            return
        self.hold_submissions = False
        job = self.job
        live = self.ledger.submissions(live_only=True)
        busy = self.ledger.live_ids()
        cap = job.limits.max_cost_usd
        room = None if cap is None else cap - self._spent() - sum(s.worst_usd for s in live)
        queued = sum(s.prompt_tokens for s in live)
        part_tokens = self.ledger.meta(PART_TOKENS_META)
        packer = Packer(job.state_dir, job.batch.max_lines, job.batch.max_bytes,
                        None if part_tokens is None else int(part_tokens))
        try:
            await self._pack_and_submit(packer, busy, room, queued, bool(live))
        finally:
            packer.discard()

    async def _pack_and_submit(self, packer: Packer, busy: set[str], room: float | None,
                               queued: int, live: bool) -> None:
        job = self.job
        cap = job.limits.max_cost_usd
        queue_cap = job.limits.batch_queue_tokens
        for row in self._pending_rows():
            if self.stopping.is_set():
                break
            if row.custom_id in busy or row.custom_id in self.settled:
                continue
            line = request_line(row)
            if not packer.fits_alone(line):
                await self._too_big(row, len(line))
                continue
            model: str = row.body["model"]
            prompt = row.prompt_tokens
            worst = _worst(model, prompt, row.max_output_tokens, job) or 0.0
            if room is not None and worst > room:
                self._budget_stop(row, worst, room, cap)
                break
            if queue_cap is not None and queued + prompt > queue_cap and (queued or live):
                log.info("limits.batch_queue_tokens: %d prompt tokens are enqueued; the rest "
                         "is submitted when batches finish", queued)
                break
            attempt = 1 + self.ledger.answered_errors(row.custom_id, row.request_hash)
            full = packer.add(model, CarriedRow(row.custom_id, row.request_hash, attempt),
                              line, prompt, worst)
            if room is not None:
                room -= worst
            queued += prompt
            if full is not None:
                await self._submit_part(full)
        for part in packer.rest():
            await self._submit_part(part)

    async def _too_big(self, row: Row, size: int) -> None:
        failure = Failure(Kind.TOO_LARGE, f"the request line is {size:,} bytes, more than "
                          f"batch.max_bytes ({self.job.batch.max_bytes:,}): it cannot go in a "
                          "Batch API file")
        await self._fail(CarriedRow(row.custom_id, row.request_hash, 1), failure, False)

    def _budget_stop(self, row: Row, worst: float, room: float, cap: float | None) -> None:
        self.request_stop(
            StopReason.BUDGET,
            f"budget: limits.max_cost_usd ${cap:g} leaves {_usd(max(0.0, room))} for new "
            f"submissions (what was spent, and the most the running batches may cost, "
            f"counted); the next row ({row.custom_id}) could cost up to {_usd(worst)} at "
            "Batch prices. Rerun with a higher cap to continue", ExitCode.BUDGET)

    async def _submit_part(self, part: Part) -> None:
        try:
            await self._submit(part)
        finally:
            part.close()

    async def _submit(self, part: Part) -> None:
        """Record, upload, create, record: see :mod:`batchgpt.store.batches`."""
        if self.stopping.is_set() and self.stop_reason is not StopReason.BUDGET:
            return
        sub = self.ledger.prepare(uuid.uuid4().hex[:20], part.model, part.rows,
                                  size=part.size, prompt_tokens=part.prompt_tokens,
                                  worst_usd=part.worst_usd)
        _step(Step.PREPARED)
        name = self._filename(sub)
        uploaded = await self._call(
            f"upload {name}", self.sdk.files.create(
                file=(name, part.file()), purpose="batch",
                timeout=max(UPLOAD_TIMEOUT_S, self.job.timeout_s)))
        _step(Step.UPLOADED)
        self.ledger.set_uploaded(sub.sub_id, uploaded.id)
        _step(Step.UPLOAD_RECORDED)
        try:
            # Never retried by the SDK: a create whose answer was lost (a timeout, a 5xx)
            # may have made the batch, and a retry would make a second one, paid twice.
            batch = await self._call(
                f"create the batch of {name}",
                self.sdk.with_options(max_retries=0).batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                    completion_window=self.job.batch.completion_window,
                    metadata={META_JOB: self.job.job_name[:512], META_SUBMISSION: sub.sub_id,
                              META_OUTPUT: self._output_tag()}))
        except ProviderError:
            batch = (await self._batches_of_job()).get(sub.sub_id)
            if batch is None:
                raise  # not made: the next run deletes the file and submits the rows
            log.info("the answer to creating batch %s was lost; it was created",
                     batch.id)
        _step(Step.CREATED)
        self.ledger.set_submitted(sub.sub_id, batch.id, uploaded.id)
        _step(Step.SUBMIT_RECORDED)
        self.stats.sent += len(part.rows)
        event(log, logging.INFO, "batch_submitted", "submitted batch %s: %d rows of %s "
              "(%s bytes, worst case %s at Batch prices)", batch.id, len(part.rows),
              part.model, f"{part.size:,}", _usd(part.worst_usd), job=self.job.job_name,
              batch=batch.id, rows=len(part.rows), model=part.model)

    # -- cancel ---------------------------------------------------------------------------
    async def cancel(self) -> int:
        """Ask the provider to cancel every running batch of the job; returns how many."""
        import openai

        n = 0
        for sub in self.ledger.submissions(live_only=True):
            if sub.state is not SubState.SUBMITTED or sub.batch_id is None:
                continue
            try:
                await self.sdk.batches.cancel(sub.batch_id)
                n += 1
            except openai.ConflictError:  # it ended meanwhile: collected below
                pass
            except openai.NotFoundError:
                pass
            except openai.APIError as exc:
                raise ProviderError(self.provider_message(
                    f"cancel batch {sub.batch_id}", exc)) from None
        return n

    # -- stopping, progress ---------------------------------------------------------------
    def request_stop(self, reason: StopReason, message: str, exit_code: int) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_message, self.stop_exit = reason, message, exit_code
            event(log, logging.WARNING, "stopping", "stopping: %s", message,
                  job=self.job.job_name, reason=reason.value, exit_code=int(exit_code))
        if reason is not StopReason.BUDGET:
            self.stopping.set()

    def on_signal(self, signum: int) -> None:
        code = ExitCode.SIGINT if signum == signal.SIGINT else ExitCode.SIGTERM
        self.request_stop(StopReason.SIGNAL, f"{signal.Signals(signum).name} received: "
                          "stopped waiting; the batches keep running at the provider and the "
                          "next run collects them", code)

    def running(self) -> tuple[int, int]:
        """(rows, batches) at the provider."""
        live = self.ledger.submissions(live_only=True)
        return sum(s.rows for s in live), len(live)

    def figures(self, started: float) -> dict[str, Any]:
        rows, _ = self.running()
        return {"done": self.stats.succeeded, "failed": self.stats.failed,
                "total": max(self.plan.to_send, self.stats.succeeded + self.stats.failed),
                "in_flight": rows, "rpm": 0.0, "tpm": 0.0,
                "cost_usd": price_usage(self.stats.usage_by_model, self.job.pricing)[0],
                "limit_rpm": None, "limit_tpm": None,
                "elapsed_s": self.clock.monotonic() - started, "eta_s": None}

    def log_progress(self) -> None:
        rows, batches = self.running()
        event(log, logging.INFO, "batch_progress", "batches: %d rows in %s running at the "
              "provider; this run: %d succeeded, %d failed", rows, _batches(batches),
              self.stats.succeeded, self.stats.failed, job=self.job.job_name,
              running_rows=rows, running_batches=batches, done=self.stats.succeeded,
              failed=self.stats.failed)

    async def wait(self, started: float) -> None:
        """``--wait``: poll every ``batch.poll_interval_s`` until nothing runs."""
        while self.ledger.submissions(live_only=True) and not self.stopping.is_set():
            if self.options.progress is not None:
                self.options.progress(self.figures(started))
            else:
                self.log_progress()
            sleep = asyncio.ensure_future(self.clock.sleep(self.job.batch.poll_interval_s))
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({sleep, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleep, stop):
                task.cancel()
            if self.stopping.is_set():
                break
            await self.poll()
            if self.stop_reason is None:
                await self.submit()


async def run_batch(job: JobConfig, options: RunOptions, store: Store, plan: Plan,
                    source: InputFile) -> RunResult:
    """A run of a ``mode: batch`` job on an open store and its plan (see the module). The
    spend a cap counts is read again before each submission (collecting changes it)."""
    return await _drive(job, options, store, plan, source, cancel=False)


async def cancel_job(job: JobConfig, options: RunOptions) -> RunResult:
    """``batchgpt cancel JOB``: cancel the job's running batches and collect what they
    finished (batches still cancelling are collected by the next run)."""
    from batchgpt.plan import make_plan
    from batchgpt.shard import part_job, shard_input

    job = part_job(job, options.shard)
    store = Store(job)
    store.open()
    try:
        source = shard_input(job, options.shard)
        plan = make_plan(job, source, store, retry_failed=False, limit=None)
        return await _drive(job, options, store, plan, source, cancel=True)
    finally:
        store.close()


async def _drive(job: JobConfig, options: RunOptions, store: Store, plan: Plan,
                 source: InputFile, *, cancel: bool) -> RunResult:
    run = BatchRun(job, options, store, plan, source)
    try:
        if options.fresh:
            if run.ledger.submissions(live_only=True):
                raise StateError(f"--fresh: {job.job_name} has batches running at the "
                                 f"provider; run `batchgpt cancel {job.source or job.job_name}"
                                 + (f" --shard {options.shard}" if options.shard else "")
                                 + "` first (it collects what they finished)")
            for src, dst in store.set_aside_previous():
                log.info("--fresh: moved %s to %s", src, dst)
            run.ledger.forget_all()
        return await _execute(run, cancel)
    finally:
        run.ledger.close()


async def _execute(run: BatchRun, cancel: bool) -> RunResult:
    import openai

    from batchgpt.runner import take_signals

    job, options, store, plan = run.job, run.options, run.store, run.plan
    started_at = now_iso()
    t0 = run.clock.monotonic()
    store.start_run()
    has_work = bool(plan.to_send or run.ledger.submissions(live_only=True)
                    or run.ledger.with_files_left())
    credentials = (resolve_credentials(job.api, None)
                   if has_work and not options.sandbox else None)
    event(log, logging.INFO, "plan", "%s: %d rows: %d done before, %d to send in batches "
          "(%d new, %d retried, %d changed since their result)", job.job_name, plan.rows,
          plan.done, plan.to_send, plan.new, plan.retrying, plan.changed, job=job.job_name,
          rows=plan.rows, done=plan.done, to_send=plan.to_send, new=plan.new,
          retried=plan.retrying, changed=plan.changed, changed_kept=plan.changed_kept,
          failed_kept=plan.failed_kept, deferred=plan.deferred)
    sim = None
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        if has_work:
            if options.sandbox:
                from batchgpt.simulator import Simulator, SimulatorConfig

                sim = Simulator(options.sandbox_config or SimulatorConfig())
                url = await sim.start()
                event(log, logging.INFO, "sandbox", "sandbox: built-in simulator at %s (no "
                      "API key used; its batches live as long as this run: use --wait)", url,
                      job=job.job_name, url=url)
                credentials = resolve_credentials(job.api, url)
            assert credentials is not None
            await run.connect(*credentials)
            installed = take_signals(loop, options, run.on_signal)
            store.start_writer()
            try:
                await run.reconcile()
                if cancel:
                    run.cancelled = True
                    n = await run.cancel()
                    log.info("cancel: asked the provider to cancel %d batches", n)
                await run.poll()
                if not cancel and run.stop_reason is None:
                    await run.submit()
                    if options.wait:
                        await run.wait(t0)
            except ProviderError as exc:
                run.request_stop(StopReason.PROVIDER, str(exc), ExitCode.ERROR)
            except openai.APIError as exc:  # listing, polling, cancelling
                run.request_stop(StopReason.PROVIDER, run.provider_message(
                    "answer the Batch API", exc), ExitCode.ERROR)
            except BatchGPTError as exc:  # a result could not be written
                run.request_stop(StopReason.STORAGE, str(exc), ExitCode.ERROR)
        else:
            log.info("nothing to send: every row is already accounted for")
    finally:
        await store.stop_writer()
        for sig in installed:
            loop.remove_signal_handler(sig)
        if run.client is not None:
            await run.client.close()
        if sim is not None:
            await sim.stop()
    store.finalize()
    return await _report(run, started_at, run.clock.monotonic() - t0)


async def _report(run: BatchRun, started_at: str, wall: float) -> RunResult:
    from batchgpt.runner import RunResult, _outcome_line, job_requests, job_summary, save_summary

    job, store, plan, stats = run.job, run.store, run.plan, run.stats
    totals = store.totals()
    requests = job_requests(store, plan, stats, totals)
    succeeded, failed = requests.succeeded, requests.failed
    rows, batches = run.running()
    message = run.stop_message
    if run.stop_reason is not None and run.stop_reason is not StopReason.BUDGET:
        outcome = (Outcome.INTERRUPTED if run.stop_reason is StopReason.SIGNAL
                   else Outcome.STOPPED)
        exit_code = run.stop_exit or ExitCode.ERROR
    elif batches:
        outcome, exit_code = Outcome.BATCH_PENDING, ExitCode.BATCH_PENDING
        message = (f"{rows:,} rows in {_batches(batches)} are still running at the provider; "
                   "run again later, or use --wait" + (f" ({message})" if message else ""))
    elif run.stop_reason is StopReason.BUDGET:
        outcome, exit_code = Outcome.STOPPED, ExitCode.BUDGET
    elif run.cancelled and requests.pending:
        outcome, exit_code = Outcome.STOPPED, ExitCode.OK
        run.stop_reason = StopReason.CANCELLED
        message = (f"cancelled: the batches' finished rows are collected; {requests.pending:,} "
                   "rows are pending (the next run submits them)")
    elif requests.pending:
        outcome, exit_code = Outcome.STOPPED, ExitCode.ERROR
        run.stop_reason = StopReason.INCOMPLETE
        message = f"{requests.pending} rows were not resolved; rerun to submit them"
    elif stats.failed_retryable:
        outcome, exit_code = Outcome.RETRYABLE_ROWS, ExitCode.ROWS_RETRYABLE
    elif failed:
        outcome, exit_code = Outcome.FAILED_ROWS, ExitCode.ROWS_FAILED
    else:
        outcome, exit_code = Outcome.COMPLETED, ExitCode.OK
    summary = job_summary(
        job, store, plan, stats, totals, requests, outcome=outcome,
        stopped=run.stop_reason if outcome is not Outcome.BATCH_PENDING else None,
        message=message, started_at=started_at, wall=wall)
    summary.batches_running = batches
    await save_summary(job, store, summary)
    if outcome is Outcome.BATCH_PENDING or run.stop_reason is StopReason.CANCELLED:
        line = f"{message}; output in {job.output}"
    elif outcome is Outcome.COMPLETED and not plan.to_send:
        line = f"nothing to do: all {succeeded} rows already succeeded"
    else:
        line = _outcome_line(summary)
    return RunResult(outcome, exit_code, summary, plan, message=line,
                     table=render_table(summary), output=Path(job.output),
                     failures_file=job.failures_path)


def _worst(model: str, prompt: int, cap: int | None, job: JobConfig) -> float | None:
    """The most a row may cost at Batch prices: the online worst case
    (:func:`batchgpt.budget.worst_case`) at the model's Batch rates."""
    out = DEFAULT_OUTPUT_RESERVE if cap is None else cap
    return cost_usd(Usage(prompt_tokens=prompt, completion_tokens=out,
                          total_tokens=prompt + out),
                    resolve_price(model, job.pricing), batch=True)


async def _together(writes: list[Coroutine[Any, Any, None]]) -> None:
    """Await writes together, so the store commits them as a group (one fsync), and
    empty the list. The first failure is raised once all have ended."""
    batch, writes[:] = list(writes), []
    results = await asyncio.gather(*batch, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _batches(n: int) -> str:
    return f"{n:,} batch" + ("" if n == 1 else "es")


def _usd(value: float) -> str:
    return f"${value:,.4f}" if abs(value) >= 0.01 or value == 0 else f"${value:.6f}"
