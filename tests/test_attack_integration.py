"""Adversarial review of issues 11-14 together: the lean transport against the SDK's,
the verified prefix, and the features' combinations. Real loopback servers, no mocks."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchgpt.simulator import Simulator
from batchgpt.transport import make_client
from tests.conftest import JobFiles, articles, write_jsonl

KEY = "sk-attackall-0123456789abcdef"
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "hi"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class Proxy:
    """A forward proxy on loopback that answers every request itself with a completion
    (what reaches it is what the client sent through the proxy)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(str(request.url))
        return web.json_response(COMPLETION)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    p = Proxy()
    await p.start()
    yield p
    assert p._runner is not None
    await p._runner.cleanup()


@pytest.mark.parametrize("transport", ["sdk", "aiohttp"])
async def test_either_transport_sends_through_the_proxy_the_environment_names(
    proxy: Proxy, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY is honoured by the SDK (httpx trusts the environment); the lean
    transport, the default, must not go around a corporate proxy (or fail to reach the
    API at all where only the proxy can)."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    client = make_client(transport, base_url="http://api.batchgpt-test.invalid/v1",
                         api_key=KEY, timeout_s=5)
    try:
        attempt = await client.complete(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    finally:
        await client.aclose()
    assert attempt.failure is None, attempt.failure
    assert proxy.seen == ["http://api.batchgpt-test.invalid/v1/chat/completions"]


class Recorder:
    """A loopback server: ``/go`` redirects (status and target set by the test), every
    other path answers a completion and records the headers it received."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.redirect: tuple[int, str] | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers), body))
        if self.redirect is not None and request.path.startswith("/go/"):
            status, target = self.redirect
            return web.Response(status=status, headers={"Location": target})
        return web.json_response(COMPLETION)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_elsewhere_never_carries_the_key_and_both_transports_agree(
    status: int,
) -> None:
    """A base URL that redirects to another origin: neither transport may send the
    ``Authorization`` header there, and both must end the same way."""
    here, there = Recorder(), Recorder()
    await here.start()
    await there.start()
    here.redirect = (status, f"http://localhost:{there.port}/v1/chat/completions")
    outcomes = []
    try:
        for transport in ("sdk", "aiohttp"):
            client = make_client(transport, base_url=f"http://127.0.0.1:{here.port}/go/",
                                 api_key=KEY, timeout_s=5)
            try:
                attempt = await client.complete(
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
            finally:
                await client.aclose()
            outcomes.append(attempt.failure is None)
    finally:
        await here.stop()
        await there.stop()
    for _method, _path, headers, _body in there.seen:
        assert KEY not in json.dumps(headers)
    assert outcomes[0] == outcomes[1]
    assert [(m, p, b) for m, p, _, b in there.seen[:1]] == [
        (m, p, b) for m, p, _, b in there.seen[1:]]


async def test_the_lean_transport_stays_lean_where_no_proxy_applies(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_PROXY (or no proxy at all) keeps the lean path: the proxy check costs the
    default nothing."""
    server = Recorder()
    await server.start()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    client = make_client("aiohttp", base_url=f"http://127.0.0.1:{server.port}/v1",
                         api_key=KEY, timeout_s=5)
    try:
        attempt = await client.complete(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert attempt.failure is None
        assert client._lean is True  # type: ignore[attr-defined]
    finally:
        await client.aclose()
        await server.stop()
    assert proxy.seen == [] and len(server.seen) == 1


class ModelServer:
    """An OpenAI-compatible server in a background thread whose models differ: the
    primary answers at once (``BAD`` for a row that says ``reject``), the fallback
    answers its first request with a 429 and ``retry-after`` (its own rate limit), then
    normally. Records (time, model, text) of every request."""

    def __init__(self, fallback_wait_s: float) -> None:
        import threading
        import time

        self.time = time.monotonic
        self.wait = fallback_wait_s
        self.seen: list[tuple[float, str, str]] = []
        self.fallback_calls = 0
        self.url = ""
        self._ready = threading.Event()
        self._stop: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def handler(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body["model"]
        text = body["messages"][-1]["content"]
        self.seen.append((self.time(), model, text))
        if model == "gpt-4o":
            self.fallback_calls += 1
            if self.fallback_calls == 1:
                return web.json_response(
                    {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests",
                               "code": "rate_limit_exceeded", "param": None}},
                    status=429, headers={"retry-after": str(self.wait),
                                         "x-ratelimit-remaining-requests": "0"})
        content = "BAD" if model == "gpt-4o-mini" and "reject" in text else "fine"
        reply = json.loads(json.dumps(COMPLETION))
        reply["model"] = model
        reply["choices"][0]["message"]["content"] = content
        return web.json_response(reply)

    def _serve(self) -> None:
        import asyncio

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.handler)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> ModelServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_a_fallback_models_rate_limit_does_not_pause_the_rows_on_the_jobs_model(
    tmp_path: Path, cli: Any
) -> None:
    """The limiter paces the job's model (and, with limits.redis_url, every run sharing
    it). A 429 of a fallback model, with its retry-after and remaining-requests, is about
    that model's own limit: the rows on the job's model must not wait for it."""
    wait = 3
    with ModelServer(wait) as server:
        job = JobFiles(tmp_path, server.url)
        records = [{"id": "r00", "text": "reject"}, *articles(30)]
        path = job.write(records, validate={"deny_words": ["BAD"], "max_reasks": 0},
                         fallback_models=["gpt-4o"], limits={"concurrency": 2})
        result = cli("run", path)
        assert result.exit_code == 0, result.output
    limited = next(t for t, model, _ in server.seen if model == "gpt-4o")
    primary_after = [t for t, model, _ in server.seen if model == "gpt-4o-mini" and t > limited]
    assert primary_after, "every row on the job's model was sent before the 429"
    assert max(primary_after) - limited < wait / 2, (
        "rows on the job's model waited for the fallback model's retry-after")
    assert len(job.results()) == 31


# -- the verified prefix against edits behind its back (each found sound: regression) --

def _state_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith("rows.sqlite")]


def _edit_output_line(output: Path, edit: str) -> None:
    lines = output.read_bytes().splitlines(keepends=True)
    st = os.stat(output)
    if edit == "torn_tail":
        output.write_bytes(b"".join(lines)[:-10])
    elif edit == "middle_line_deleted":
        del lines[5]
        output.write_bytes(b"".join(lines))
    else:  # another id in a line, same size, the mtime set back
        lines[5] = lines[5].replace(b"a0006", b"a0099")
        output.write_bytes(b"".join(lines))
        os.utime(output, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(("edit", "resent"), [
    ("older_index", 0), ("wal_deleted", 0), ("torn_tail", 1), ("middle_line_deleted", 1),
    ("middle_line_same_size", 1), ("input_same_size_and_mtime", 1)])
def test_a_resume_after_an_edit_behind_the_prefixs_back_sends_exactly_the_rows_not_done(
    job: JobFiles, sim: Simulator, cli: Any, tmp_path: Path, edit: str, resent: int
) -> None:
    """A state folder restored from an older copy (or its WAL lost), the output cut, a
    line deleted or changed in place with its mtime restored, the input rewritten to the
    same size and mtime: the plan is the full scan's, and the resume sends only the rows
    whose answer is gone or whose request changed."""
    from tests.test_prefix import _done_job, _index_path, assert_same_plan_as_the_full_scan

    path = _done_job(job, cli, 20)
    state = _index_path(path).parent
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in _state_files(state):
        shutil.copy2(p, backup / p.name)
    write_jsonl(job.input, articles(25))
    assert cli("run", path).exit_code == 0
    assert cli("run", path).exit_code == 0  # records the prefix over all 25
    sent = sim.stats.requests
    if edit == "older_index":
        for p in _state_files(state):
            p.unlink()
        for p in backup.iterdir():
            shutil.copy2(p, state / p.name)
    elif edit == "wal_deleted":
        for p in _state_files(state):
            if p.name != "rows.sqlite":
                p.unlink()
    elif edit == "input_same_size_and_mtime":
        st = os.stat(job.input)
        records = articles(25)
        records[3]["text"] = records[3]["text"].replace("local", "LOCAL")
        write_jsonl(job.input, records)
        os.utime(job.input, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(job.input).st_size == st.st_size
    else:
        _edit_output_line(job.output, edit)
    assert_same_plan_as_the_full_scan(path)
    assert cli("run", path).exit_code == 0
    assert sim.stats.requests - sent == resent
    assert {f"a{i:04d}" for i in range(1, 26)} <= {line["custom_id"] for line in job.results()}


# -- shards + merge + the output checks -----------------------------------------------------

def test_a_merged_summary_keeps_each_models_share_the_reasks_and_the_fallbacks_of_its_parts(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    """by_model (rows, usage, cost per served model), re-asks by reason, fallbacks by
    model and rows by mode are totals like the others: the merge's are the parts' sums,
    not left empty (a sharded job's fallback spend was invisible in its summary)."""
    from batchgpt.simulator.replies import ReplyFaults
    from tests.test_shards import part

    sim.config.faults.failing_models = {"gpt-4o-mini": 503}
    sim.config.faults.replies = ReplyFaults(invalid_json_rate=1.0)
    job.write(articles(10), fallback_models=["gpt-4o"],
              params={"max_tokens": 80, "response_format": {"type": "json_object"}},
              validate={"json": True, "max_reasks": 1},
              retry={"max_attempts": 1, "initial_delay_s": 0.01, "max_delay_s": 0.05})
    for k in range(2):
        assert cli("run", job.job_path, "--shard", f"{k}/2").exit_code == 0
    parts = [json.loads(part(job, k, 2, "summary.json").read_text()) for k in range(2)]
    assert cli("merge", job.job_path).exit_code == 0
    merged = job.summary()

    def added(key: str, *, run: bool = False) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in parts:
            for name, n in (p["this_run"] if run else p)[key].items():
                out[name] = out.get(name, 0) + n
        return out

    assert merged["by_model"]["gpt-4o"]["rows"] == 10
    assert merged["by_model"]["gpt-4o"]["usage"]["total_tokens"] == sum(
        p["by_model"]["gpt-4o"]["usage"]["total_tokens"] for p in parts)
    assert merged["by_model"]["gpt-4o"]["cost_usd"] == pytest.approx(sum(
        p["by_model"]["gpt-4o"]["cost_usd"] for p in parts))
    assert merged["this_run"]["fallbacks_by_model"] == added("fallbacks_by_model", run=True)
    assert merged["this_run"]["fallbacks_by_model"] == {"gpt-4o": 10}
    assert merged["this_run"]["reasks_by_reason"] == added("reasks_by_reason", run=True)
    assert merged["this_run"]["reasks_by_reason"] == {"invalid_json": 10}
    assert merged["rows_by_mode"] == added("rows_by_mode")
    assert merged["rows_by_mode"]["online"] == 10
