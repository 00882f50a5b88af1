"""The ``batchgpt`` command: parse, call the library, render. No logic lives here.

Human-facing text (logs, the end-of-run table, the outcome line) goes to stderr, so
stdout carries only what a script asked for (``--json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from batchgpt import __version__
from batchgpt.config import JobConfig
from batchgpt.errors import BatchGPTError, ExitCode, InputError, StateError
from batchgpt.files import NotRegularFile, probe_writable
from batchgpt.logs import bind_job, event, setup_logging
from batchgpt.redact import Redactor
from batchgpt.shard import Shard

if TYPE_CHECKING:
    from batchgpt.simulator import SimulatorConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run large batches of OpenAI ChatCompletion requests: paced, resumable, accounted for.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger("batchgpt")

JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
P = ParamSpec("P")
R = TypeVar("R")
_crash_dir: Path | None = None  # where a traceback goes: the job's state folder, once known
_redactor = Redactor()  # what a crash report must not contain: the run's key, once known


class Interrupted(BaseException):
    """SIGINT or SIGTERM while a command holds them (:func:`_signals_end_the_command`):
    a BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it
    and every ``finally`` on the way out runs. ``outcome`` completes the line saying so."""

    def __init__(self, signum: int, outcome: str) -> None:
        super().__init__(signum)
        self.signum = signum
        self.outcome = outcome


# What each signal does unless a program changed it: only then is it taken over (a
# signal the parent set to be ignored, e.g. SIGINT of a background job, stays ignored).
_DEFAULT_HANDLERS = ((signal.SIGINT, signal.default_int_handler),
                     (signal.SIGTERM, signal.SIG_DFL))


@contextlib.contextmanager
def _signals_end_the_command(outcome: str) -> Iterator[None]:
    """SIGINT and SIGTERM end the command at once, through the ``finally`` blocks on the
    way (exit 130 / 143, an ``interrupted`` event: "interrupted (SIGTERM) <outcome>").
    Without this SIGTERM kills without a word and without cleaning up (an export's
    temporary file stays), and in a run asyncio's own SIGINT handling cancels only at the
    next ``await``, after the planning (so a Ctrl-C during a long one went on to send).
    Once a run starts sending the runner installs its own handlers (finish the requests
    in flight), which replace these and restore the defaults when done. On the way out
    the handlers found on the way in are put back."""

    def interrupted(signum: int, frame: FrameType | None) -> NoReturn:
        raise Interrupted(signum, outcome)

    taken: list[tuple[signal.Signals, Any]] = []
    try:
        for sig, default in _DEFAULT_HANDLERS:
            if signal.getsignal(sig) is default:
                taken.append((sig, signal.signal(sig, interrupted)))
    except ValueError:  # not the main thread (an embedding program): signals are its own
        pass
    try:
        yield
    finally:
        for sig, previous in taken:
            signal.signal(sig, previous)


def _say(level: int, name: str, message: str, **fields: Any) -> None:
    """One line on stderr, as the event ``name`` in the command's log format (and in its
    log file); plain text if logging is not set up yet."""
    if log.handlers:
        event(log, level, name, "%s", message, **fields)
    else:
        typer.echo(message, err=True)


def _guarded(command: Callable[P, R]) -> Callable[P, R]:
    """The top-level handler. A BatchGPTError is a message and its exit code; anything
    else is a bug: one line naming it and the file holding the traceback, exit 70. Never
    a traceback on the terminal or in a cron mail. Every line goes through the log, so
    that with ``--log-format json`` it is a JSON event, in the log file too."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer reports them
            raise
        except BatchGPTError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            _say(logging.WARNING, "interrupted",
                 "interrupted (SIGINT); results written so far are kept",
                 signal="SIGINT", exit_code=int(ExitCode.SIGINT))
            raise typer.Exit(ExitCode.SIGINT) from None
        except Interrupted as exc:
            name = signal.Signals(exc.signum).name
            code = ExitCode.SIGINT if exc.signum == signal.SIGINT else ExitCode.SIGTERM
            _say(logging.WARNING, "interrupted", f"interrupted ({name}) {exc.outcome}",
                 signal=name, exit_code=int(code))
            raise typer.Exit(code) from None
        except Exception as exc:
            from batchgpt.crash import write_crash_report

            scrub = _redactor.text
            crash: Path | None
            try:
                crash = write_crash_report(exc, _crash_dir, scrub)
                where = f"the traceback is in {crash}"
            except OSError:
                crash, where = None, "no traceback file could be written"
            _say(logging.ERROR, "internal_error",
                 scrub(f"internal error: {type(exc).__name__}: {exc} — a bug in batchgpt; "
                       f"{where}. Results already written are kept."),
                 error=type(exc).__name__, crash_file=None if crash is None else str(crash),
                 exit_code=int(ExitCode.SOFTWARE))
            raise typer.Exit(ExitCode.SOFTWARE) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"batchgpt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """batchgpt: run a job file of ChatCompletion requests."""


def _load(job_path: Path) -> JobConfig:
    global _crash_dir, _redactor
    job = JobConfig.load(job_path)  # a ConfigError is the command's: see _guarded
    _crash_dir = job.state_dir
    _redactor = Redactor.for_key(job.api.api_key_env)
    return job


def _check_writable_file(path: Path, what: str) -> None:
    """A file written after the run (metrics) must be writable before it starts: a paid
    run must not end in an error about its report."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise StateError(f"{what} {path} is a folder")
    try:
        probe_writable(folder, path.name)
    except OSError as exc:
        raise StateError(f"cannot write {what} {path}: {exc.strerror}; nothing was "
                         "sent") from None


def _fail(exc: BatchGPTError) -> NoReturn:
    if isinstance(exc, InputError):
        log.error("the input has problems; nothing was sent:\n%s", exc)
    else:
        log.error("%s", exc)
    raise typer.Exit(exc.exit_code)


@app.command()
@_guarded
def run(
    job_path: JobArg,
    sandbox: Annotated[bool, typer.Option(
        "--sandbox", help="Send to the built-in simulator (no API key needed).")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Also send rows that failed permanently before.")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Discard every result of this job and start over.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Don't ask (with --fresh).")] = False,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Send only the first N pending rows (a smoke test).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and estimate tokens, cost and time; send nothing.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary (or the dry-run estimate) as JSON on stdout.")] = False,
    log_format: Annotated[str, typer.Option(
        "--log-format", help="text or json.")] = "text",
    log_file: Annotated[Path | None, typer.Option(
        "--log-file", help="Also append logs to this file.")] = None,
    metrics_file: Annotated[Path | None, typer.Option(
        "--metrics-file", help="Write the run's figures in Prometheus text format.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every failed row.")
                       ] = False,
    sandbox_faults: Annotated[str | None, typer.Option(
        "--sandbox-faults", help="With --sandbox: spoil a seeded share of first answers, e.g. "
        "invalid_json=0.2,truncated=0.1,content_filter=0.05,refusal=0.05,denied=0.1.")
    ] = None,
    sandbox_denied_terms: Annotated[list[str] | None, typer.Option(
        "--sandbox-denied-term", help="With --sandbox-faults denied=...: a term the spoiled "
        "answers carry (repeatable).")] = None,
    sandbox_fail_models: Annotated[list[str] | None, typer.Option(
        "--sandbox-fail-model", help="With --sandbox: MODEL=503 or MODEL=404 always fails "
        "that model (to try fallback_models; repeatable).")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="mode: batch: poll the provider until every row is settled.")
                    ] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="K/N", help="Run only part K of N (from 0): the rows whose id "
        "hashes to K, into the part's own output, checkpoint and lock (`batchgpt merge JOB` "
        "joins the parts).")] = None,
) -> None:
    """Run a job, or resume it: rows that already succeeded are never sent again."""
    if log_format not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--log-format")
    part = _shard(shard)
    try:
        setup_logging(log_format, log_file, verbose)
    except OSError as exc:  # said on stderr alone, in the chosen format
        why = (f"it is {exc.kind}, not a regular file" if isinstance(exc, NotRegularFile)
               else exc.strerror or str(exc))
        _say(logging.ERROR, "log", f"cannot write the log file {log_file}: {why}; nothing "
             "was sent")
        raise typer.Exit(ExitCode.ERROR) from None
    job = _load(job_path)
    bind_job(job.job_name)
    if metrics_file is not None and not dry_run:
        _check_writable_file(metrics_file, "the metrics file")
    if fresh and not yes and not dry_run:
        if not sys.stdin.isatty():
            log.error("--fresh sets every result of %s aside and starts over; add --yes to "
                      "confirm", job.job_name)
            raise typer.Exit(ExitCode.USAGE)
        if not typer.confirm(f"Set every result of {job.job_name} in {job.output} aside "
                             "(moved to a .previous-<time> file) and start over?"):
            raise typer.Exit(ExitCode.ERROR)
    from batchgpt.runner import RunOptions, run_job  # not at import: status, --version

    options = RunOptions(sandbox=sandbox, retry_failed=retry_failed, fresh=fresh, limit=limit,
                         dry_run=dry_run, handle_signals=True, wait=wait, shard=part)
    if sandbox_faults or sandbox_denied_terms or sandbox_fail_models:
        if not sandbox:
            raise typer.BadParameter("needs --sandbox", param_hint="--sandbox-faults, "
                                     "--sandbox-denied-term, --sandbox-fail-model")
        options.sandbox_config = _sandbox_config(sandbox_faults, sandbox_denied_terms,
                                                 sandbox_fail_models)
    live = None
    if sys.stderr.isatty() and not dry_run and log_format == "text":
        from batchgpt.progress import LiveProgress

        live = LiveProgress()
        options.progress = live.update
    with _signals_end_the_command("before anything was sent; results written so far are "
                                  "kept"):
        if live is not None:
            with live:
                result = asyncio.run(run_job(job, options))
        else:
            result = asyncio.run(run_job(job, options))
    if dry_run or result.report is None:
        from batchgpt.estimate import render_estimate

        if as_json:
            typer.echo(json.dumps(result.estimate, indent=2, ensure_ascii=False))
        elif log_format == "json":  # stderr carries JSON lines only
            event(log, logging.INFO, "estimate", "dry run of %s (nothing sent)", job.job_name,
                  estimate=result.estimate)
        else:
            typer.echo(render_estimate(result.estimate), err=True)
        raise typer.Exit(ExitCode.OK)
    if metrics_file is not None:
        from batchgpt.metrics import write_metrics

        try:
            write_metrics(metrics_file, result.report)
        except OSError as exc:
            log.error("cannot write the metrics file %s: %s", metrics_file, exc.strerror)
    if as_json:
        typer.echo(result.report.to_json().rstrip("\n"))
    if log_format == "json":  # the end-of-run table, as data
        event(log, logging.INFO, "summary", "summary of %s", job.job_name,
              summary=result.report.model_dump(mode="json"))
    elif result.plan.to_send:
        sys.stderr.write(result.table + "\n")
        sys.stderr.flush()
    event(log, logging.INFO if result.exit_code == 0 else logging.WARNING, "outcome", "%s",
          result.message, outcome=result.outcome.value, exit_code=int(result.exit_code),
          stopped=None if result.report.stopped is None else result.report.stopped.value,
          output=str(result.output or job.output))
    raise typer.Exit(result.exit_code)


def _shard(text: str | None) -> Shard | None:
    """``--shard K/N``, checked (0 ≤ K < N): a usage error (exit 2) otherwise."""
    if text is None:
        return None
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--shard "),
                                 param_hint="--shard") from None


@app.command()
@_guarded
def merge(job_path: JobArg) -> None:
    """Join the parts of a sharded job (`run --shard K/N`) into its output, failures and
    summary, each id once; refuses while parts are missing or incomplete."""
    setup_logging("text", None, False)
    from batchgpt.merge import merge as merge_parts

    job = _load(job_path)
    log.info("%s", merge_parts(job).describe())


@app.command()
@_guarded
def status(
    job_path: JobArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
) -> None:
    """What a job has done so far, read from its state only (no network)."""
    setup_logging("text", None, False)
    from batchgpt.status import job_status, render_status

    job = _load(job_path)
    info = job_status(job)
    if as_json:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        typer.echo(render_status(info))


@app.command()
@_guarded
def cancel(
    job_path: JobArg,
    log_format: Annotated[str, typer.Option("--log-format", help="text or json.")] = "text",
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="K/N", help="The batches of part K of N of a sharded job.")
                     ] = None,
) -> None:
    """mode: batch: cancel the job's running batches and collect what they finished."""
    if log_format not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--log-format")
    part = _shard(shard)
    setup_logging(log_format, None, False)
    from batchgpt.modes.batch import cancel_job
    from batchgpt.runner import RunOptions

    job = _load(job_path)
    bind_job(job.job_name)
    result = asyncio.run(cancel_job(job, RunOptions(handle_signals=True, shard=part)))
    event(log, logging.INFO if result.exit_code == 0 else logging.WARNING, "outcome", "%s",
          result.message, outcome=result.outcome.value, exit_code=int(result.exit_code),
          output=str(job.output))
    raise typer.Exit(result.exit_code)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe does
    not print an error on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


@app.command()
@_guarded
def export(
    job_path: JobArg,
    fmt: Annotated[str, typer.Option(
        "--format", help="jsonl, csv or parquet (parquet needs pyarrow).")] = "jsonl",
    fields: Annotated[str | None, typer.Option(
        "--fields", help="Columns to write, in this order, comma-separated.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", help="Write to this file (atomically) instead of stdout.")] = None,
) -> None:
    """One row per input record, in input order: its fields, reply, status, usage, cost."""
    setup_logging("text", None, False)
    from batchgpt.export import export as export_table

    job = _load(job_path)
    try:
        with _signals_end_the_command(
                "during the export; nothing half-written is left behind (with -o the file "
                "is the previous one, or the whole new one)" if output is not None else
                "during the export; what was written to stdout is incomplete"):
            stats = export_table(job, fmt=fmt, fields=fields, dest=output,
                                 job_file=job_path)
    except InputError as exc:
        log.error("the input has problems (a run would refuse it too); export stopped, "
                  "and with -o nothing was written:\n%s", exc)
        raise typer.Exit(ExitCode.ERROR) from None
    except BrokenPipeError:  # `batchgpt export JOB | head`: the reader has what it wanted
        _quiet_stdout()
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    log.info("%s", stats.describe())


@app.command()
@_guarded
def show(
    job_path: JobArg,
    row_id: Annotated[str, typer.Argument(metavar="ID", help="The row's id (custom_id).",
                                          show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
) -> None:
    """One row: the request sent (or to be sent), the reply or the error, usage, cost."""
    setup_logging("text", None, False)
    from batchgpt.show import render_row, show_row

    job = _load(job_path)
    try:
        info = show_row(job, row_id, str(job_path))
    except InputError as exc:
        log.error("the input has problems (a run would refuse it too):\n%s", exc)
        raise typer.Exit(ExitCode.ERROR) from None
    text = json.dumps(info, indent=2, ensure_ascii=False) if as_json else render_row(info)
    # a lone surrogate a server sent is shown escaped, not a crash at print time
    typer.echo(text.encode("utf-8", "backslashreplace").decode("utf-8"))


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")
                    ] = "127.0.0.1",
    rpm: Annotated[int | None, typer.Option(help="Enforce this requests-per-minute limit.")
                   ] = None,
    tpm: Annotated[int | None, typer.Option(help="Enforce this tokens-per-minute limit.")
                   ] = None,
    latency: Annotated[float, typer.Option(help="Seconds before each answer.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for fault injection.")] = 0,
    error_rate: Annotated[float, typer.Option(help="Fraction of requests answered 500.")
                          ] = 0.0,
    reply_faults: Annotated[str | None, typer.Option(
        "--reply-faults", help="Spoil a seeded share of first answers, e.g. "
        "invalid_json=0.2,truncated=0.1,content_filter=0.05,refusal=0.05,denied=0.1.")
    ] = None,
    denied_terms: Annotated[list[str] | None, typer.Option(
        "--denied-term", help="A term spoiled answers carry (repeatable).")] = None,
    fail_models: Annotated[list[str] | None, typer.Option(
        "--fail-model", help="MODEL=503 or MODEL=404: that model always fails "
        "(repeatable).")] = None,
) -> None:
    """Serve the built-in simulator as a standalone OpenAI-compatible server."""
    from batchgpt.simulator import serve

    config = _sandbox_config(reply_faults, denied_terms, fail_models)
    config.rpm, config.tpm, config.latency_s, config.seed = rpm, tpm, latency, seed
    config.record = False
    config.faults.server_error_rate = error_rate
    serve(config, host=host, port=port)


def _sandbox_config(reply_faults: str | None, denied_terms: list[str] | None,
                    fail_models: list[str] | None) -> SimulatorConfig:
    """The simulator's settings from the command line's fault options (a usage error
    naming the option when one is malformed)."""
    from pydantic import ValidationError

    from batchgpt.simulator import FaultConfig, SimulatorConfig
    from batchgpt.simulator.replies import parse_failing_model, parse_reply_faults

    try:
        replies = parse_reply_faults(reply_faults or "", denied_terms)
    except (ValueError, ValidationError) as exc:
        raise typer.BadParameter(_first_line(exc), param_hint="the reply faults") from None
    failing = {}
    for spec in fail_models or []:
        try:
            model, status = parse_failing_model(spec)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="the failing model") from None
        failing[model] = status
    return SimulatorConfig(faults=FaultConfig(replies=replies, failing_models=failing))


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


@app.command()
def schema() -> None:
    """Print the job file's JSON Schema (for editor completion)."""
    typer.echo(JobConfig.json_schema())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
