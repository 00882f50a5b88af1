"""The pipeline: plan → pace → send → retry → checkpoint → report.

``run_job`` is the library entry point the CLI wraps. One run: lock the job's state and
bring its index in line with the output, validate the whole input and work out what is
pending (nothing is sent if any line is bad), then stream the pending rows through a
bounded set of workers. Each worker takes its row through the limiter, the client and the
retry decision until the row succeeds, fails for good, or the run stops; its concurrency
slot is held until the row's outcome is durably committed, which bounds what a kill can
cost. Every wait (backoff, the grace period, housekeeping) goes through a
:class:`~batchgpt.clock.Clock`, so tests drive time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from batchgpt import prefix
from batchgpt.breaker import CircuitBreaker, State, assess, threshold_for
from batchgpt.budget import Reservation, Verdict, billed_model, unpriced, worst_case
from batchgpt.checks import Checks, Rejection, reask_messages
from batchgpt.clock import Clock, SystemClock
from batchgpt.config import JobConfig
from batchgpt.credentials import OPENAI_BASE_URL, no_key_message, resolve_credentials, sent_no_key
from batchgpt.errors import BatchGPTError, ConfigError, ExitCode, RequestTooLarge, StateError
from batchgpt.files import nonblank_lines
from batchgpt.gctune import quiet_gc
from batchgpt.limits import SharedLimits, connect, make_budget, make_limiter
from batchgpt.logs import event
from batchgpt.modes.lines import failure_line, result_line
from batchgpt.plan import Plan, make_plan, not_in_input, planned_rows
from batchgpt.pricing import Usage, cost_usd, price_usage, resolve_price
from batchgpt.progress import eta_s, format_eta
from batchgpt.redact import Redactor
from batchgpt.report import RunStats, build_summary, render_table, write_summary
from batchgpt.retry import Action, Decision, Failure, Kind, decide, fallback_chain, falls_back
from batchgpt.shard import Shard, check_sharding, part_job, shard_input
from batchgpt.source import InputFile, Row
from batchgpt.store import Store, Totals, now_iso
from batchgpt.store.batches import rows_by_mode
from batchgpt.store.writer import IndexFailed
from batchgpt.summary import Outcome, PlanCounts, Recovery, Requests, StopReason, Summary
from batchgpt.tokens import DEFAULT_OUTPUT_RESERVE, prompt_tokens, request_cost

if TYPE_CHECKING:  # the openai SDK takes ~1.5 s to import: only runs that send load it
    from batchgpt.client import Attempt, ChatClient

log = logging.getLogger("batchgpt")

DEFAULT_MAX_CONCURRENCY = 1024
MIN_CONCURRENCY = 4
PROGRESS_EVERY_S = 10.0
HOUSEKEEPING_S = 0.5


@dataclass
class RunOptions:
    """How to run a job this time (the job file says what to run)."""

    sandbox: bool = False
    retry_failed: bool = False
    fresh: bool = False
    limit: int | None = None
    dry_run: bool = False
    handle_signals: bool = False  # install SIGINT/SIGTERM handlers (the CLI does)
    grace_s: float = 30.0  # after a first signal, how long in-flight requests may finish
    progress: Callable[[dict[str, Any]], None] | None = None  # called with live figures
    sandbox_config: Any = None  # a simulator.SimulatorConfig for --sandbox
    clock: Clock | None = None  # time for backoff, grace and housekeeping (tests: FakeClock)
    # Given the run's signal handler once it starts sending (what SIGINT/SIGTERM call with
    # handle_signals): code that embeds a run, or a test, interrupts it as a signal would
    # by calling handler(signal.SIGTERM), without sending a signal to the whole process.
    expose_signal_handler: Callable[[Callable[[int], None]], None] | None = None
    wait: bool = False  # mode: batch: poll until every row is settled (--wait)
    shard: Shard | None = None  # --shard K/N: only this part's rows, into its own files


@dataclass
class RunResult:
    """What a run (or a dry run) did, and where its results are.

    ``output`` is the job's output file and ``results()`` reads it back: library callers
    need not know the job file's layout to get at what they paid for."""

    outcome: Outcome
    exit_code: int
    report: Summary | None  # the summary, typed (None for a dry run)
    plan: Plan
    message: str = ""
    table: str = ""
    estimate: dict[str, Any] = field(default_factory=dict)
    set_aside: list[tuple[Path, Path]] = field(default_factory=list)
    output: Path | None = None  # the job's output (the results), whether or not it exists
    failures_file: Path | None = None  # the job's failures file

    @property
    def summary(self) -> dict[str, Any]:
        """The summary as the summary file holds it (JSON types), {} for a dry run."""
        return {} if self.report is None else self.report.model_dump(mode="json")

    def results(self) -> Iterator[dict[str, Any]]:
        """Every result of the job (this run's and earlier runs'), one parsed output line
        at a time, in the order they were written (completion order, not input order:
        match them by ``custom_id``). Streams: a million results in flat memory.

        The output holds one line per succeeded row once a run has ended (a result that
        replaced an older one is compacted in at the run's end). Reading it while a run
        of the same job is going sees the results written so far."""
        return _read_lines(self.output)

    def failures(self) -> Iterator[dict[str, Any]]:
        """The failures file, one parsed line per failed row, like :meth:`results`."""
        return _read_lines(self.failures_file)


def _read_lines(path: Path | None) -> Iterator[dict[str, Any]]:
    if path is None:
        return
    for number, raw in nonblank_lines(path):
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            raise StateError(f"{path}:{number}: not a result line; the next run of the job "
                             "sets such lines aside and repairs the file")
        yield line


class Slots:
    """A semaphore whose size can change while it is in use: the concurrency the limits
    need follows observed latency (Little's law: in flight = rate × latency)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use < self.limit)
            self.in_use += 1

    async def release(self) -> None:
        async with self._cond:
            self.in_use -= 1
            self._cond.notify()

    async def resize(self, limit: int) -> None:
        async with self._cond:
            grew = limit > self.limit
            self.limit = limit
            if grew:
                self._cond.notify(limit - self.in_use)


@dataclass(slots=True)
class _Held:
    """The budget reservation a row holds now: its first request's, then each re-ask's or
    fallback's in turn."""

    reservation: Reservation


class _Sent(NamedTuple):
    """How one request of a row ended: a reply, or the failure and the decision on it."""

    result: Attempt | None
    failure: Failure | None
    decision: Decision | None
    attempts: int


class _Run:
    """State of one run; the methods are the pipeline's stages."""

    def __init__(self, job: JobConfig, options: RunOptions, store: Store, plan: Plan,
                 source: InputFile, clock: Clock, spent_before: float = 0.0,
                 checks: Checks | None = None,
                 shared: SharedLimits | None = None) -> None:
        self.job = job
        self.checks = checks
        self.missing_models: set[str] = set()  # fallback jobs: models found not to exist
        self.options = options
        self.store = store
        self.plan = plan
        self.source = source
        self.clock = clock
        self.stats = RunStats()
        lim = job.limits
        self.limiter = make_limiter(job, clock, shared)
        self.cap = lim.concurrency or DEFAULT_MAX_CONCURRENCY
        self.slots = Slots(self._initial_concurrency())
        self.stop_reason: StopReason | None = None
        self.stop_message: str | None = None
        self.stop_exit: int | None = None
        self.stopping = asyncio.Event()
        self.abandon = asyncio.Event()
        self.waiting_tasks: set[asyncio.Task[None]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.latency_ema: float | None = None
        self.budget = make_budget(job, spent_before, shared)
        self.settled = asyncio.Event()  # a reservation came back: the dispatcher may retry
        self.allowance = 0.0  # in-flight spend on record in the index (capped runs)
        self.breaker = CircuitBreaker.for_job(job, threshold_for(self.cap))
        self.breaker_gate = asyncio.Condition()  # attempts held back while it decides
        self.client: ChatClient | None = None
        self.base_url = ""  # where requests go, for messages
        self.sent_no_key = False  # a base URL and an empty key variable: a placeholder
        self.redact = Redactor.for_key(job.api.api_key_env)
        self.warned_usage = False

    # -- concurrency --------------------------------------------------------------------
    def _rate_per_s(self) -> float | None:
        rpm, tpm = self.limiter.effective_rpm, self.limiter.effective_tpm
        rates = []
        if rpm:
            rates.append(rpm / 60)
        if tpm and self.plan.to_send:
            avg_cost = max(1.0, (self.plan.prompt_tokens + self.plan.max_completion_tokens
                                 + DEFAULT_OUTPUT_RESERVE * self.plan.uncapped)
                           / self.plan.to_send)
            rates.append(tpm / 60 / avg_cost)
        return min(rates) if rates else None

    def _initial_concurrency(self) -> int:
        if self.job.limits.concurrency:
            return self.cap
        if self.job.limits.rpm is None and self.job.limits.tpm is None:
            # Limits unknown: one request first, so the server's x-ratelimit-limit-*
            # headers are learned before a wave of requests can hit them (measured: a
            # first wave of 64 drew 10-20 % 429s on a 1,200-RPM account).
            return 1
        return min(self.cap, 64)

    def _target_concurrency(self) -> int:
        if self.latency_ema is None:  # nothing answered yet
            return self.slots.limit
        rate = self._rate_per_s()
        if rate is None:  # the server states no limits (vLLM, llama.cpp): the cap applies
            return self.cap
        want = math.ceil(rate * self.latency_ema * 1.5) + 2
        return max(MIN_CONCURRENCY, min(self.cap, want))

    # -- stopping -----------------------------------------------------------------------
    def request_stop(self, reason: StopReason, message: str, exit_code: int) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_message, self.stop_exit = reason, message, exit_code
            event(log, logging.WARNING, "stopping", "stopping: %s", message,
                  job=self.job.job_name, reason=reason.value, exit_code=int(exit_code))
        self.stopping.set()
        self.settled.set()  # a dispatcher waiting for the budget must see the stop
        for task in list(self.waiting_tasks):  # not on the wire: nothing to wait for
            task.cancel()

    def on_signal(self, signum: int) -> None:
        if self.stopping.is_set() and self.stop_reason is StopReason.SIGNAL:
            log.warning("second signal: abandoning requests in flight")
            self.abandon.set()
            for task in list(self.tasks):
                task.cancel()
            return
        name = signal.Signals(signum).name
        code = ExitCode.SIGINT if signum == signal.SIGINT else ExitCode.SIGTERM
        self.request_stop(
            StopReason.SIGNAL,
            f"{name} received: finishing requests in flight (up to {self.options.grace_s:g}s; "
            "a second signal abandons them)",
            code,
        )

    # -- budget -------------------------------------------------------------------------
    async def _admit(self, row: Row, body: dict[str, Any] | None = None
                     ) -> Reservation | None:
        """Reserve the most this row's request (``body``, by default the row's own) may
        cost, waiting for rows in flight to settle while it doesn't fit; None when the
        budget says stop (or the run stops meanwhile). See
        :class:`~batchgpt.budget.Budget` for the algorithm."""
        body = row.body if body is None else body
        prompt = (row.prompt_tokens if body["messages"] is row.body["messages"]
                  else prompt_tokens(body["messages"]))
        # None only for a model with no price, which a capped job refused before starting.
        worst = worst_case(body["model"], prompt, row.max_output_tokens,
                           self.job.pricing) or 0.0
        budget = self.budget
        while not self.stopping.is_set():
            verdict, reservation = budget.admit(worst)
            if verdict is Verdict.ADMIT:
                await self._cover_in_flight()
                return reservation
            if verdict is Verdict.REFUSE:
                what = (f"the next row ({row.custom_id})" if body is row.body else
                        f"the next request of row {row.custom_id} (a re-ask or a fallback "
                        "model; the row stays pending)")
                left = budget.remaining or 0.0
                this_run = _usd(budget.spent_this_run)
                self.request_stop(
                    StopReason.BUDGET,
                    f"budget: the job has spent {_usd(budget.spent)} of limits.max_cost_usd "
                    f"${self.job.limits.max_cost_usd:g} over its runs ({this_run} "
                    f"this run); {what} could cost up to {_usd(worst)}, "
                    f"more than the {_usd(max(0.0, left))} left. Rerun with a higher cap to "
                    "continue",
                    ExitCode.BUDGET,
                )
                return None
            self.settled.clear()
            await self.settled.wait()
        return None

    async def _cover_in_flight(self) -> None:
        """Before a capped run sends more than it has on record as in flight, record a
        larger allowance (twice what is reserved, so a handful of writes a run): a run
        killed with requests on the wire then leaves their worst case in the index, and
        the next run charges it against the cap (see Store.open) — a job killed every
        night must not get its whole cap again each time."""
        reserved = self.budget.reserved
        writer = self.store.writer
        if self.budget.cap is None or writer is None or reserved <= self.allowance:
            return
        self.allowance = reserved * 2
        await writer.put_meta(inflight_allowance_usd=repr(self.allowance))

    # -- the pipeline -------------------------------------------------------------------
    def pending_rows(self) -> Iterator[Row]:
        """The planned rows, re-read by offset and checked (:func:`planned_rows`)."""
        return planned_rows(self.plan, self.source, self._input_changed)

    def _input_changed(self, line: int, why: str) -> None:
        self.request_stop(
            StopReason.INPUT_CHANGED,
            f"{self.source.path}:{line}: the input changed during the run ({why}); "
            "nothing more is sent. Rerun to continue with the input as it is now",
            ExitCode.ERROR,
        )

    async def dispatch(self) -> None:
        for row in self.pending_rows():
            if self.stopping.is_set():
                break
            await self.slots.acquire()
            if self.stopping.is_set():
                await self.slots.release()
                break
            reservation = await self._admit(row)
            if reservation is None:
                await self.slots.release()
                break
            task = asyncio.create_task(self.work(row, reservation))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.wait(set(self.tasks))

    async def work(self, row: Row, reservation: Reservation) -> None:
        me = asyncio.current_task()
        assert me is not None
        held = _Held(reservation)
        try:
            await self._attempts(row, me, held)
        except asyncio.CancelledError:
            # The row stays pending: the next run sends it. If its request was on the wire
            # (not waiting in the limiter or a backoff) it may have been billed all the same.
            if me not in self.waiting_tasks:
                self.budget.abandon(held.reservation)
        except BatchGPTError as exc:  # a result could not be written: disk full, ...
            self.request_stop(StopReason.STORAGE, str(exc), ExitCode.ERROR)
        except Exception as exc:  # a bug must not keep spending: stop, keep what is done
            self._internal_error(exc, row)
        finally:
            self.waiting_tasks.discard(me)
            self.budget.release(held.reservation)  # no reply: nothing billed (no-op once settled)
            self.settled.set()
            await self.slots.release()

    def _internal_error(self, exc: Exception, row: Row) -> None:
        from batchgpt.crash import write_crash_report

        try:
            crash_file = write_crash_report(exc, self.job.state_dir, self.redact.text)
            where = f"; the traceback is in {crash_file}"
        except OSError:
            where = ""
        self.request_stop(
            StopReason.INTERNAL_ERROR,
            self.redact.text(f"internal error on row {row.custom_id!r}: "
                             f"{type(exc).__name__}: {exc}{where}"),
            ExitCode.SOFTWARE,
        )

    async def _attempts(self, row: Row, me: asyncio.Task[None], held: _Held) -> None:
        """Take the row through its models (the one it names, then ``fallback_models``)
        until one gives an accepted reply, the row fails, or the run stops. On each model:
        the request with its retries, then, while the output checks reject the reply and
        re-asks are left, a follow-up turn (see :mod:`batchgpt.checks`). Each request past
        the first is admitted by the budget on its own."""
        checks = self.checks
        models = fallback_chain(row.body["model"], self.job.fallback_models,
                                self.missing_models)
        attempts = 0
        for i, model in enumerate(models):
            has_next = i + 1 < len(models)
            own = model == row.body["model"]  # not when its model was found missing
            body = row.body if own else {**row.body, "model": model}
            # Counted when its first request is sent (not when the budget or a stop ends
            # the row before that).
            count: Callable[[], None] | None = None
            if not own:
                count = functools.partial(self.stats.fallbacks.update, (model,))
                if not await self._admit_more(row, body, held):
                    return
            request, reasks = body, 0
            while True:
                sent = await self._send(row, me, request, has_next, count)
                count = None
                if sent is None:  # the run is stopping: the row stays pending
                    return
                attempts += sent.attempts
                result, failure, decision, _ = sent
                if result is None:
                    assert failure is not None and decision is not None
                    if has_next and falls_back(failure, decision):
                        if failure.error_code == "model_not_found":
                            self.missing_models.add(model)
                        self._log_fallback(row, model, models[i + 1], failure.error_code)
                        break
                    if decision.action is Action.FAIL_ROW:
                        await self._fail(row, failure, attempts, decision.transient)
                    else:
                        self.request_stop(_stop_reason(decision.reason),
                                          self._stop_message(decision.reason, failure),
                                          ExitCode.ERROR)
                    return
                reply = result.success
                assert reply is not None
                rejection = checks.judge(reply.body, request) if checks is not None else None
                if rejection is None:
                    await self._succeed(row, result, attempts, held.reservation, model)
                    return
                await self._count_rejected(row, result, held.reservation, model, rejection)
                assert checks is not None
                if reasks < checks.max_reasks:
                    reasks += 1
                    count = functools.partial(self.stats.reasks.update,
                                              (rejection.reason.value,))
                    request = {**body, "messages": reask_messages(
                        body["messages"], reply.body, rejection, checks.schema_for(body))}
                    if not await self._admit_more(row, request, held):
                        return
                    continue
                if has_next:
                    self._log_fallback(row, model, models[i + 1], "invalid_output")
                    break
                await self._fail_invalid(row, result, rejection, attempts, reasks, model)
                return

    async def _send(self, row: Row, me: asyncio.Task[None], body: dict[str, Any],
                    has_fallback: bool, on_sent: Callable[[], None] | None = None
                    ) -> _Sent | None:
        """One request with its retries: a reply, or the failure that ended it and the
        decision on it (a retry never comes back), or None when the run stops first.
        ``on_sent`` is called when the first attempt goes on the wire."""
        assert self.client is not None
        policy = self.job.retry
        cost = row.cost if body is row.body or body["messages"] is row.body["messages"] \
            else request_cost(body)
        # The limiter paces the row's own model (with limits.redis_url, every run sharing
        # it): a fallback model's rate-limit headers, retry-after and 429s are about that
        # model's limit, and steer only this row's retries — unless the row's model was
        # found missing, and the fallback is what the run sends to in its place.
        paces = body["model"] == row.body["model"] or row.body["model"] in self.missing_models
        attempt = 0
        while True:
            attempt += 1
            self.waiting_tasks.add(me)
            if self.stopping.is_set():
                return None
            await self._pass_breaker()
            try:
                await self.limiter.acquire(cost)
            except RequestTooLarge as exc:
                self.waiting_tasks.discard(me)
                await self._breaker_withdraw()
                return _Sent(None, Failure(Kind.TOO_LARGE, str(exc)),
                             Decision(Action.FAIL_ROW), attempt - 1)
            if self.stopping.is_set():
                return None
            self.waiting_tasks.discard(me)
            self.stats.sent += 1
            if attempt == 1 and on_sent is not None:
                on_sent()
            result = await self.client.complete(body)
            self.stats.add_latency(result.latency_s)
            self._observe(result, paces)
            if result.success is not None:
                await self._judge(None, None)
                return _Sent(result, None, None, attempt)
            failure = result.failure
            assert failure is not None
            self.stats.add_error(failure.error_code, failure.message)
            if failure.is_rate_limit:
                self.stats.rate_limited += 1
            decision = decide(failure, attempt, policy)
            if decision.slow_down and paces:
                self.limiter.slow_down()
            if decision.pause_s and paces:
                self.limiter.pause(decision.pause_s)
            moves_on = has_fallback and falls_back(failure, decision)
            # May stop the run (the circuit breaker); a row that moves on to its next model
            # says nothing about the endpoint.
            await self._judge(failure, decision, neutral=moves_on)
            if decision.action is Action.RETRY:
                self.waiting_tasks.add(me)
                if self.stopping.is_set():
                    return None
                event(log, logging.DEBUG, "retry", "row %s: attempt %d failed (%s); retrying "
                      "in %.2fs", row.custom_id, attempt, failure.error_code, decision.delay_s,
                      job=self.job.job_name, row=row.custom_id, attempt=attempt,
                      error_code=failure.error_code, status=failure.status,
                      delay_s=round(decision.delay_s, 3))
                await self.clock.sleep(decision.delay_s)
                self.stats.retries += 1  # counted when made: a stop cancels the sleep
                continue
            return _Sent(None, failure, decision, attempt)

    async def _admit_more(self, row: Row, body: dict[str, Any], held: _Held) -> bool:
        """Admit one more request of a row (a re-ask, a fallback) by the budget: the row's
        reservation so far is settled or given back first. False when the run stops (the
        budget, a signal) before it is admitted: the row stays pending."""
        self.budget.release(held.reservation)  # a no-op once settled by a reply
        reservation = await self._admit(row, body)
        if reservation is None:
            return False
        held.reservation = reservation
        return True

    def _log_fallback(self, row: Row, model: str, to: str, why: str) -> None:
        event(log, logging.INFO, "fallback", "row %s: %s failed it (%s); trying %s",
              row.custom_id, model, why, to, job=self.job.job_name, row=row.custom_id,
              model=model, fallback=to, error_code=why)

    # -- circuit breaker ----------------------------------------------------------------
    async def _pass_breaker(self) -> None:
        """Wait while the breaker holds attempts back (it is deciding), then count this
        one as started."""
        breaker = self.breaker
        if not breaker.may_start():
            async with self.breaker_gate:
                await self.breaker_gate.wait_for(breaker.may_start)
        breaker.started()

    async def _breaker_withdraw(self) -> None:
        self.breaker.withdraw()
        async with self.breaker_gate:
            self.breaker_gate.notify_all()

    async def _judge(self, failure: Failure | None, decision: Decision | None,
                     neutral: bool = False) -> None:
        """Feed one attempt's outcome to the breaker; stop the run if it trips.
        ``neutral``: the outcome is about this model and this row, which moves on to its
        fallback model; it says nothing about the endpoint."""
        breaker = self.breaker
        if breaker.state is not State.ARMED:
            return
        stops = neutral or (decision is not None and decision.action is Action.STOP_RUN)
        if breaker.record(assess(failure, stops)):
            self.request_stop(StopReason.CIRCUIT_BREAKER, self._breaker_message(decision),
                              ExitCode.ERROR)
        async with self.breaker_gate:
            self.breaker_gate.notify_all()

    def _breaker_message(self, decision: Decision | None) -> str:
        breaker = self.breaker
        first = breaker.counted[0].signature
        if first.startswith("connection:"):
            check = "check api.base_url and that the server is up"
        elif first.startswith("http:4"):
            check = "check the job's model and params (and api.base_url)"
        else:
            check = "check the server, or the proxy in front of it"
        cause = breaker.cause.rstrip(". ")
        if len(cause) > 500:
            cause = cause[:499] + "…"
        message = (f"the first {breaker.threshold} requests to {self.base_url} all failed the "
                   f"same way, and none succeeded: {cause}. Nothing more is sent; {check}, "
                   "then rerun")
        if decision is not None and decision.action is Action.FAIL_ROW:
            message += (" (the rows that got this answer are in the failures file: a rerun "
                        "sends them again if their request changed, or with --retry-failed)")
        return self.redact.text(message)

    def _stop_message(self, reason: str, failure: Failure) -> str:
        if reason == "authentication" and self.sent_no_key:
            return no_key_message(self.job.api.api_key_env, self.base_url)
        return _stop_message(reason, failure)

    def _observe(self, result: Attempt, paces: bool = True) -> None:
        if paces:
            self.limiter.observe(result.headers)
        lat = result.latency_s
        self.latency_ema = lat if self.latency_ema is None else 0.9 * self.latency_ema + 0.1 * lat

    async def _succeed(self, row: Row, result: Attempt, attempts: int,
                       reservation: Reservation, requested: str) -> None:
        """``requested``: the model the reply was asked of (the row's, or a fallback)."""
        success = result.success
        assert success is not None
        body = success.body
        # The model the reply is billed as (the index's spend, the summary's cost, the
        # budget): the server's name for it, or the requested one when the server answers
        # with an alias that has no price. The output line keeps what the server said.
        model = self._billed(body, requested)
        usage = self._usage(row, body)
        line = result_line(row.custom_id, row.request_hash, success.request_id, body)
        writer = self.store.writer
        assert writer is not None
        try:
            await writer.put_result(row.custom_id, row.request_hash, line, attempts, model,
                                    usage)
        except IndexFailed:
            # In the output, kept, taken over by the next run: paid, and counted as such.
            self._count_success(model, usage, reservation)
            raise
        self.limiter.record_success()
        self._count_success(model, usage, reservation)

    def _usage(self, row: Row, body: dict[str, Any]) -> Usage:
        usage, dropped = Usage.parse_response(body.get("usage"))
        if dropped and not self.warned_usage:
            self.warned_usage = True
            log.warning("row %s: the server's usage held values that are not token counts "
                        "(%s); they are counted as 0 (logged once a run)", row.custom_id,
                        ", ".join(dropped))
        return usage

    def _billed(self, body: dict[str, Any], requested: str) -> str:
        echoed = body.get("model")
        return billed_model(echoed if isinstance(echoed, str) else requested, requested,
                            self.job.pricing)

    def _count_success(self, model: str, usage: Usage, reservation: Reservation) -> None:
        self.stats.succeeded += 1
        self._count_paid(model, usage, reservation)

    def _count_paid(self, model: str, usage: Usage, reservation: Reservation) -> None:
        self.stats.add_usage(model, usage)
        self.budget.settle(reservation, cost_usd(usage, resolve_price(model, self.job.pricing)))

    async def _count_rejected(self, row: Row, result: Attempt, reservation: Reservation,
                              requested: str, rejection: Rejection) -> None:
        """A reply the checks rejected was paid for all the same: its usage joins the
        run's, the job's spend (in the index, before anything else is sent for the row)
        and the budget."""
        success = result.success
        assert success is not None
        model = self._billed(success.body, requested)
        usage = self._usage(row, success.body)
        self._count_paid(model, usage, reservation)
        event(log, logging.DEBUG, "rejected", "row %s: %s rejected the reply (%s: %s)",
              row.custom_id, model, rejection.reason.value, rejection.detail,
              job=self.job.job_name, row=row.custom_id, model=model,
              reason=rejection.reason.value, detail=rejection.detail)
        writer = self.store.writer
        assert writer is not None
        await writer.put_spend(model, usage)

    async def _fail_invalid(self, row: Row, result: Attempt, rejection: Rejection,
                            attempts: int, reasks: int, model: str) -> None:
        """The row's last reply still failed its checks: a failure with the reason, the
        detail and that reply; ``--retry-failed`` sends it again, a plain rerun doesn't."""
        success = result.success
        assert success is not None
        asked = f" (after {reasks} re-ask{'s' if reasks != 1 else ''})" if reasks else ""
        failure = Failure(Kind.HTTP, f"{rejection.problem}{asked}", status=200,
                          code="invalid_output", type="invalid_output",
                          body=success.body, request_id=success.request_id)
        await self._fail(row, failure, attempts, False, extra={
            "reason": rejection.reason.value, "detail": rejection.detail,
            "model": self._billed(success.body, model), "reasks": reasks})

    async def _fail(self, row: Row, failure: Failure, attempts: int, transient: bool,
                    extra: dict[str, Any] | None = None) -> None:
        line = failure_line(row.custom_id, row.request_hash, failure, attempts, transient,
                            extra)
        writer = self.store.writer
        assert writer is not None
        await writer.put_failure(row.custom_id, row.request_hash, line, attempts,
                                 failure.error_code, transient)
        self.stats.failed += 1
        self.stats.failed_codes[failure.error_code] += 1
        if transient:
            self.stats.failed_retryable += 1
        event(log, logging.DEBUG, "row_failed", "row %s failed: %s (%s)", row.custom_id,
              failure.error_code, failure.message, job=self.job.job_name, row=row.custom_id,
              error_code=failure.error_code, status=failure.status, attempts=attempts,
              retryable=transient)

    async def housekeeping(self, total: int, started: float) -> None:
        """Resize concurrency to what the limits need, and report progress."""
        last_report = self.clock.monotonic()
        while True:
            await self.clock.sleep(HOUSEKEEPING_S)
            target = self._target_concurrency()
            if target != self.slots.limit:
                await self.slots.resize(target)
            now = self.clock.monotonic()
            figures = self.figures(total, started)
            if self.options.progress is not None:
                self.options.progress(figures)
            elif now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                self.log_progress(figures)

    def log_progress(self, f: dict[str, Any]) -> None:
        """The periodic progress line under cron: for people, and as a typed event."""
        event(log, logging.INFO, "progress",
              "progress: %d/%d done, %d failed, %d in flight, %.0f req/min, %.0f tok/min, "
              "cost %s, ETA %s", f["done"], f["total"], f["failed"],
              f["in_flight"], f["rpm"], f["tpm"], _usd(f["cost_usd"]), format_eta(f["eta_s"]),
              job=self.job.job_name, done=f["done"], failed=f["failed"], total=f["total"],
              in_flight=f["in_flight"], rpm=round(f["rpm"], 1), tpm=round(f["tpm"], 1),
              cost_usd=f["cost_usd"], eta_s=None if f["eta_s"] is None else round(f["eta_s"], 1),
              elapsed_s=round(f["elapsed_s"], 3), limit_rpm=f["limit_rpm"],
              limit_tpm=f["limit_tpm"])

    def figures(self, total: int, started: float) -> dict[str, Any]:
        """This run's live figures: ``done`` rows succeeded and ``failed`` rows failed of
        the ``total`` to send, requests in flight, achieved rates, spend, ETA."""
        elapsed = max(1e-6, self.clock.monotonic() - started)
        usage = self.stats.usage
        done, failed = self.stats.succeeded, self.stats.failed
        return {
            "done": done, "failed": failed, "total": total,
            "in_flight": self.slots.in_use, "rpm": self.stats.sent * 60 / elapsed,
            "tpm": usage.total_tokens * 60 / elapsed, "cost_usd": self.budget.spent_this_run,
            "limit_rpm": self.limiter.effective_rpm, "limit_tpm": self.limiter.effective_tpm,
            "elapsed_s": elapsed, "eta_s": eta_s(done + failed, total, elapsed),
        }


def _stop_reason(reason: str) -> StopReason:
    """Why :func:`batchgpt.retry.decide` stopped the run, as a StopReason: its reason
    names one ("quota", "authentication", "permission", "model not found", "invalid URL"),
    or it is the one other reason it stops for, a rate limit too long to wait out
    ("rate limit: the server asks to wait …")."""
    try:
        return StopReason(reason)
    except ValueError:
        return StopReason.RATE_LIMIT


def _usd(value: float | None) -> str:
    """Money in messages: four decimals, six below a cent (a $0.005 cap is common in
    smoke tests, and "$0.0000 left" would say nothing)."""
    if value is None:
        return "?"
    return f"${value:,.4f}" if abs(value) >= 0.01 or value == 0 else f"${value:.6f}"


def _stop_message(reason: str, failure: Failure) -> str:
    what = {
        "quota": "the account is out of quota or credit",
        "authentication": "the API key was refused",
        "permission": "the key has no permission for this request",
        "model not found": "the model does not exist or the key has no access to it",
        "invalid URL": "the endpoint does not exist: check api.base_url",
    }.get(reason, reason)
    return (f"{what} (HTTP {failure.status}, {failure.error_code}): {failure.message}. "
            "Nothing more is sent; rerun when it is fixed — finished rows are kept.")


async def run_job(job: JobConfig, options: RunOptions | None = None) -> RunResult:
    """Run (or resume) a job. Raises BatchGPTError for anything that stops it from
    running at all; everything else ends in a RunResult with an exit code."""
    options = options or RunOptions()
    check_sharding(job, options.shard)  # another sharding's results: refused, not paid again
    job = part_job(job, options.shard)
    shared: SharedLimits | None = None  # Redis, when the limits are shared through it
    checks = Checks.for_job(job)  # files read, schema and regex compiled: before anything
    store = Store(job)
    if options.dry_run:
        store.open_readonly()
        for message in store.recovery.messages(store.out.path, dry=True):
            log.warning("dry run: %s", message)
    else:
        store.open()
    try:
        source = shard_input(job, options.shard)
        # --fresh plans as if nothing was done, which validates the whole input before
        # anything is set aside.
        plan = make_plan(job, source, None if options.fresh else store,
                         retry_failed=options.retry_failed, limit=options.limit)
        if options.shard is not None:
            log.info("--shard %s: only the rows whose id hashes to part %d of %d, into %s",
                     options.shard, options.shard.index, options.shard.count, job.output)
        # --fresh sets the earlier results, and what they cost, aside with the job.
        spent_before = _spent_before(job, plan, None if options.fresh else store)
        orphans = 0 if options.fresh else not_in_input(store.totals().results, plan.with_result)
        if orphans and plan.new:
            event(log, logging.WARNING, "ids_changed",
                  "%s holds %d results for ids that are not in the input, and %d rows of the "
                  "input are new: if the rows' ids changed (`id`, `id_field`, or the records' "
                  "own ids), those rows are paid for again. Ids must be stable; %s",
                  job.output, orphans, plan.new,
                  "nothing was sent (dry run)" if options.dry_run else
                  "run --dry-run first to see what a run would send",
                  job=job.job_name, not_in_input=orphans, new=plan.new)
        if options.dry_run:
            from batchgpt.estimate import estimate, sample_request

            est = estimate(job, plan)
            est["requests"]["not_in_input"] = orphans
            if job.limits.max_cost_usd is not None:
                est["budget"] = {
                    "max_cost_usd": job.limits.max_cost_usd, "spent_usd": spent_before,
                    "remaining_usd": max(0.0, job.limits.max_cost_usd - spent_before)}
            est.update(sample_request(plan, source))
            if options.fresh:
                est["would_set_aside"] = {str(src): str(dst)
                                          for src, dst in store.previous_files()}
            return RunResult(Outcome.DRY_RUN, ExitCode.OK, None, plan, estimate=est,
                             output=Path(job.output), failures_file=job.failures_path)
        if job.mode == "batch":  # the provider's Batch API (batchgpt.modes.batch)
            from batchgpt.modes.batch import run_batch

            return await run_batch(job, options, store, plan, source)
        if plan.to_send:
            _refuse_live_batches(job, options.shard)
        # A missing or bad key: before anything moves.
        credentials = (resolve_credentials(job.api, None)
                       if plan.to_send and not options.sandbox else None)
        shared = await connect(job, credentials) if plan.to_send else None
        moved: list[tuple[Path, Path]] = []
        if options.fresh:
            moved = store.set_aside_previous()
            for src, dst in moved:
                log.info("--fresh: moved %s to %s", src, dst)
        result = await _execute(job, options, store, plan, source, spent_before, credentials,
                                checks, shared)
        result.set_aside = moved
        return result
    finally:
        if shared is not None:
            await shared.aclose()
        store.close()


def _refuse_live_batches(job: JobConfig, shard: Shard | None) -> None:
    """An online run of a job whose batches still run at the provider (its job file
    switched from ``mode: batch``) would send their rows again and pay for them twice."""
    from batchgpt.store.batches import BatchLedger

    ledger = BatchLedger.open_readonly(job.state_dir)
    if ledger is None:
        return
    try:
        live = ledger.submissions(live_only=True)
    finally:
        ledger.close()
    if live:
        rows = sum(s.rows for s in live)
        raise StateError(
            f"{job.job_name}: {rows:,} rows in {len(live):,} batches are still at the "
            "provider (mode: batch); an online run would pay for them again. Run the job "
            "with mode: batch until they are collected, or `batchgpt cancel "
            f"{job.source or job.job_name}" + (f" --shard {shard}" if shard else "")
            + "` and then run it with mode: batch once to collect what they finished")


def _settle_in_flight_record(store: Store, run: _Run) -> None:
    """Every request of the run has ended: the in-flight allowance goes back to 0, and what
    was given up on the wire (charged at its worst case) joins the spend no result
    records."""
    if run.allowance or run.budget.unanswered:
        index = store.index
        index.set_meta(inflight_allowance_usd=None, unseen_usd=repr(
            index.meta_float("unseen_usd") + run.budget.unanswered))


def _spent_before(job: JobConfig, plan: Plan, store: Store | None) -> float:
    """What the job was charged by earlier runs (none without ``store``), which a cap
    covers too. With a cap, a model with no price that input lines name, or that earlier
    results were billed as, is a ConfigError before anything is sent: its rows could spend
    past the cap unseen. (The job's own ``model`` was checked before the input was read:
    :meth:`JobConfig.model_price_check`, raised by :class:`InputFile`.)"""
    spent: float | None = 0.0
    unknown_before: list[str] = []
    if store is not None:
        totals = store.totals()
        spent, unknown_before = price_usage(totals.spend_by_model, job.pricing)
        spent = None if spent is None else spent + totals.unseen_usd
    if job.limits.max_cost_usd is None:
        return spent or 0.0
    where: dict[str, list[str]] = {}
    for model in unpriced(plan.by_model, job.pricing):
        rows = plan.by_model[model].rows
        where.setdefault(model, []).append(f"{rows:,} row{'s' if rows != 1 else ''} to send")
    for model in unknown_before:
        where.setdefault(model, []).append("earlier results of this job")
    if plan.models_overflow:
        where.setdefault(f"... {plan.models_overflow:,} rows beyond the first "
                         f"{len(plan.by_model):,} distinct models", []).append("not priced")
    if where:
        if len(where) == 1:
            ((model, places),) = where.items()
            what = f"the price of model '{model}' is unknown ({', '.join(places)})"
        else:
            what = "the prices of models " + ", ".join(
                f"'{m}' ({', '.join(w)})" for m, w in sorted(where.items())) + " are unknown"
        raise ConfigError(
            f"limits.max_cost_usd is set but {what}, so the cap could not be kept: add "
            f"{'it' if len(where) == 1 else 'them'} under `pricing:` in the job file (USD per "
            "1M tokens: input, output), or remove the cap. Nothing was sent."
        )
    return spent or 0.0


async def _execute(job: JobConfig, options: RunOptions, store: Store, plan: Plan,
                   source: InputFile, spent_before: float,
                   credentials: tuple[str | None, str] | None,
                   checks: Checks | None = None,
                   shared: SharedLimits | None = None) -> RunResult:
    """Send the plan's rows. ``credentials``: (base URL, key) as :func:`run_job` resolved
    them, None with ``--sandbox`` (the simulator's) or nothing to send."""
    clock = options.clock or SystemClock()
    started_at = now_iso()
    t0 = clock.monotonic()
    run = _Run(job, options, store, plan, source, clock, spent_before, checks, shared)
    store.start_run()
    describe = (f"{plan.rows} rows: {plan.done} done before, {plan.to_send} to send "
                f"({plan.new} new, {plan.retrying} retried, {plan.changed} changed since their "
                f"result)")
    if plan.failed_kept:
        describe += f", {plan.failed_kept} failed before (use --retry-failed to send again)"
    if plan.deferred:
        describe += f", {plan.deferred} left for later (--limit)"
    if plan.changed_kept:
        describe += f"; {plan.changed_kept} changed but kept (on_change: keep)"
    event(log, logging.INFO, "plan", "%s: %s", job.job_name, describe, job=job.job_name,
          rows=plan.rows, done=plan.done, to_send=plan.to_send, new=plan.new,
          retried=plan.retrying, changed=plan.changed, changed_kept=plan.changed_kept,
          failed_kept=plan.failed_kept, deferred=plan.deferred)
    cap = job.limits.max_cost_usd
    if cap is not None and plan.to_send:
        event(log, logging.INFO, "budget", "budget: %s of limits.max_cost_usd $%g spent by "
              "earlier runs; %s left", _usd(spent_before), cap,
              _usd(max(0.0, cap - spent_before)), job=job.job_name, max_cost_usd=cap,
              spent_usd=spent_before, remaining_usd=max(0.0, cap - spent_before),
              rows_without_max_tokens=plan.uncapped)
        if plan.uncapped:
            log.warning("budget: %d rows set no max_tokens; each is reserved at %d output "
                        "tokens, and one that writes more can take the spend past the cap "
                        "by the difference. Set max_tokens to make the cap exact",
                        plan.uncapped, DEFAULT_OUTPUT_RESERVE)

    sim = None
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    housekeeping: asyncio.Task[None] | None = None
    try:
        if plan.to_send:
            if options.sandbox:
                from batchgpt.simulator import Simulator, SimulatorConfig

                sim = Simulator(options.sandbox_config or SimulatorConfig())
                sandbox_url = await sim.start()
                event(log, logging.INFO, "sandbox", "sandbox: built-in simulator at %s (no API "
                      "key used)", sandbox_url, job=job.job_name, url=sandbox_url)
                credentials = resolve_credentials(job.api, sandbox_url)
            from batchgpt.transport import make_client

            assert credentials is not None, "run_job resolves them when there is a row to send"
            base_url, key = credentials
            run.base_url = base_url or OPENAI_BASE_URL
            run.sent_no_key = sent_no_key(key)
            run.redact = run.redact.with_secrets(key)
            run.client = make_client(job.api.transport, base_url=base_url, api_key=key,
                                     timeout_s=job.timeout_s, max_connections=run.cap,
                                     organization=job.api.organization,
                                     project=job.api.project, redact=run.redact)
            installed = take_signals(loop, options, run.on_signal)
            store.start_writer()
            housekeeping = asyncio.create_task(run.housekeeping(plan.to_send, t0))
            dispatch = asyncio.create_task(run.dispatch())
            with quiet_gc():  # batchgpt.gctune: 7-15 % of the CPU a request
                await _wait_with_grace(run, dispatch, options.grace_s)
            if options.progress is not None:
                options.progress(run.figures(plan.to_send, t0))  # the final frame
        else:
            log.info("nothing to send: every row is already accounted for")
    finally:
        if housekeeping is not None:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
        await store.stop_writer()
        _settle_in_flight_record(store, run)
        for installed_sig in installed:
            loop.remove_signal_handler(installed_sig)
        if run.client is not None:
            await run.client.aclose()
        if sim is not None:
            await sim.stop()
    store.finalize()
    prefix.after_run(job, source, store, plan, ok=run.stop_reason is None and (
        store.writer is None or store.writer.healthy), succeeded=run.stats.succeeded,
        replaced=store.writer.replaced if store.writer is not None else 0)
    return await _report(job, store, plan, run, started_at, clock.monotonic() - t0)


async def _report(job: JobConfig, store: Store, plan: Plan, run: _Run, started_at: str,
                  wall: float) -> RunResult:
    stats = run.stats
    totals = store.totals()
    # Rows of this input not resolved: those this run didn't get to, and those --limit left.
    unresolved = plan.to_send - stats.succeeded - stats.failed
    if run.stop_reason is None and unresolved:
        # Every path that leaves a row unresolved should have said why; never call it done.
        run.request_stop(StopReason.INCOMPLETE, f"{unresolved} rows were not resolved; rerun "
                         "to send them", ExitCode.ERROR)
    requests = job_requests(store, plan, stats, totals)
    succeeded, failed = requests.succeeded, requests.failed
    if run.stop_reason is not None:
        outcome = (Outcome.INTERRUPTED if run.stop_reason is StopReason.SIGNAL
                   else Outcome.ERROR if run.stop_reason is StopReason.INTERNAL_ERROR
                   else Outcome.STOPPED)
        exit_code = run.stop_exit or ExitCode.ERROR
    elif stats.failed_retryable:
        outcome, exit_code = Outcome.RETRYABLE_ROWS, ExitCode.ROWS_RETRYABLE
    elif failed:
        outcome, exit_code = Outcome.FAILED_ROWS, ExitCode.ROWS_FAILED
    else:
        outcome, exit_code = Outcome.COMPLETED, ExitCode.OK
    summary = job_summary(job, store, plan, stats, totals, requests, outcome=outcome,
                          stopped=run.stop_reason, message=run.stop_message,
                          started_at=started_at, wall=wall)
    await save_summary(job, store, summary)
    if outcome is Outcome.COMPLETED and not plan.to_send:
        outcome_line = f"nothing to do: all {succeeded} rows already succeeded"
    else:
        outcome_line = _outcome_line(summary)
    return RunResult(outcome, exit_code, summary, plan, message=outcome_line,
                     table=render_table(summary), output=Path(job.output),
                     failures_file=job.failures_path)


def take_signals(loop: asyncio.AbstractEventLoop, options: RunOptions,
                 handler: Callable[[int], None]) -> list[signal.Signals]:
    """Route SIGINT and SIGTERM to ``handler`` while a run sends (with
    ``handle_signals``), and give it to ``expose_signal_handler``; returns the signals to
    hand back to the loop at the end."""
    installed: list[signal.Signals] = []
    if options.handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler, sig)
                installed.append(sig)
    if options.expose_signal_handler is not None:
        options.expose_signal_handler(handler)
    return installed


def job_requests(store: Store, plan: Plan, stats: RunStats, totals: Totals) -> Requests:
    """The input's rows by state after a run that settled ``stats``' rows of ``plan``."""
    succeeded = plan.done + stats.succeeded
    failed = plan.failed_kept + plan.failed_deferred + stats.failed
    replaced = store.writer.replaced if store.writer is not None else 0
    in_input = plan.with_result + stats.succeeded - replaced
    return Requests(total=plan.rows, succeeded=succeeded, failed=failed,
                    pending=plan.rows - succeeded - failed,
                    not_in_input=not_in_input(totals.results, in_input))


def job_summary(job: JobConfig, store: Store, plan: Plan, stats: RunStats, totals: Totals,
                requests: Requests, *, outcome: Outcome, stopped: StopReason | None,
                message: str | None, started_at: str, wall: float) -> Summary:
    """The run's summary (online and batch mode alike)."""
    rec = store.recovery
    summary = build_summary(
        job_name=job.job_name, outcome=outcome, stopped=stopped,
        message=message, started_at=started_at, finished_at=now_iso(),
        wall_time_s=wall, requests=requests,
        failed_by_code=plan.failed_codes + stats.failed_codes, totals=totals, stats=stats,
        pricing=job.pricing, output=Path(job.output), failures=job.failures_path,
        plan=PlanCounts(to_send=plan.to_send, new=plan.new, retried=plan.retrying,
                        changed=plan.changed, changed_kept=plan.changed_kept,
                        already_done=plan.done, failed_kept=plan.failed_kept,
                        deferred=plan.deferred),
        recovered=Recovery(taken_over=rec.taken_over, lost=rec.lost,
                           set_aside=[str(p) for p in rec.set_aside]),
    )
    summary.rows_by_mode = rows_by_mode(store.index)
    return summary


async def save_summary(job: JobConfig, store: Store, summary: Summary) -> None:
    """Write the summary file and record the run's end; a failure is logged only (the
    results are safe in the output whatever happens here)."""
    try:
        await write_summary(job.summary_path, summary)
        store.finish_run(summary.outcome.value, summary.model_dump_json())
    except (OSError, BatchGPTError) as exc:
        log.warning("cannot write %s: %s", job.summary_path, getattr(exc, "strerror", exc))


async def _wait_with_grace(run: _Run, dispatch: asyncio.Task[None], grace_s: float) -> None:
    stop_wait = asyncio.create_task(run.stopping.wait())
    try:
        await asyncio.wait({dispatch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if dispatch.done():
            dispatch.result()
            return
        # Stopping: in-flight requests get the grace period (a signal) or finish (others).
        waits: set[asyncio.Task[Any]] = {dispatch, asyncio.create_task(run.abandon.wait())}
        if run.stop_reason is StopReason.SIGNAL:
            waits.add(asyncio.create_task(run.clock.sleep(grace_s)))
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits - {dispatch}:
            task.cancel()
        if dispatch not in done:
            for task in list(run.tasks):
                task.cancel()
            dispatch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
        else:
            dispatch.result()
    finally:
        stop_wait.cancel()


def _outcome_line(summary: Summary) -> str:
    req = summary.requests
    where = summary.output
    outcome = summary.outcome
    if outcome is Outcome.COMPLETED:
        extra = f", {req.pending} pending (--limit)" if req.pending else ""
        return f"done: {req.succeeded} rows succeeded{extra}; output in {where}"
    if outcome is Outcome.FAILED_ROWS:
        return (f"finished with {req.failed} failed rows ({req.succeeded} succeeded); "
                f"see {summary.failures}; output in {where}")
    if outcome is Outcome.RETRYABLE_ROWS:
        return (f"finished with {req.failed} failed rows ({req.succeeded} succeeded), some "
                f"for reasons that may pass: rerun later to send them again; see "
                f"{summary.failures}; output in {where}")
    if outcome is Outcome.INTERRUPTED:
        return (f"interrupted: {req.succeeded} succeeded, {req.pending} pending; rerun to "
                f"continue; output in {where}")
    stopped = summary.stopped.value if summary.stopped is not None else "?"
    return (f"stopped ({stopped}): {summary.message}; {req.succeeded} succeeded, "
            f"{req.pending} pending; output in {where}")


def run_job_sync(job: JobConfig | str | os.PathLike[str], options: RunOptions | None = None,
                 ) -> RunResult:
    """``run_job`` for synchronous callers, with or without a running event loop.

    Without one (a script), the run gets its own loop (``asyncio.run``). Inside one (a
    Jupyter cell, an async framework), ``asyncio.run`` would refuse, so the run goes to a
    worker thread with a loop of its own and this call waits for it; the caller's loop
    is blocked meanwhile, as by any synchronous call. ``await run_job(...)`` keeps it
    free. Signal handlers are never installed from the worker thread (only the main
    thread may), so ``handle_signals`` has no effect there."""
    if not isinstance(job, JobConfig):
        job = JobConfig.load(Path(job))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_job(job, options))
    loaded = job
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgpt-run") as pool:
        return pool.submit(lambda: asyncio.run(run_job(loaded, options))).result()


__all__ = ["BatchGPTError", "RunOptions", "RunResult", "run_job", "run_job_sync"]
