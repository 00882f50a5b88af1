"""Issue 12 review: attacks on mode: batch through the real CLI and the sandbox's Batch
API over HTTP with the real SDK."""

from __future__ import annotations

from typing import Any

from batchgpt.errors import ExitCode
from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles
from tests.test_batch_mode import BATCH, assert_no_row_submitted_twice, batch_job, endpoints


def test_an_online_run_while_batches_run_sends_none_of_their_rows_online(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    endpoints(sim).config.delay_s = 3600
    path = batch_job(job, 4)
    assert cli("run", path).exit_code == 5
    job.config["mode"] = "online"  # the job file switched back while its batches run
    path = job.write()
    online = cli("run", path)
    assert sim.stats.bodies == [], "rows at the provider in a batch were paid for again"
    assert online.exit_code == ExitCode.ERROR, online.output
    assert "batchgpt cancel" in online.output


def test_a_shards_first_batch_run_does_not_adopt_the_batches_of_another_shard(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 3600
    path = batch_job(job, 12)
    assert cli("run", path, "--shard", "0/2").exit_code == 5
    part0 = sum(bx.carried.values())
    assert 0 < part0 < 12
    second = cli("run", path, "--shard", "1/2")
    assert second.exit_code == 5, second.output
    assert "adopted" not in second.output, second.output
    bx.advance(3600)
    assert cli("run", path, "--shard", "1/2").exit_code == 0
    first = cli("run", path, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert_no_row_submitted_twice(sim)
    assert sum(bx.carried.values()) == 12
    merged = cli("merge", path)
    assert merged.exit_code == 0, merged.output
    assert sorted(r["custom_id"] for r in job.results()) == [
        f"a{i:04d}" for i in range(1, 13)]


def test_a_row_too_big_for_the_enqueued_token_limit_alone_fails_instead_of_looping(
        job: JobFiles, sim: Simulator) -> None:
    import asyncio
    import signal

    from batchgpt.config import JobConfig
    from batchgpt.runner import RunOptions, run_job

    rows = articles(3)
    rows[1]["text"] = "long " * 400  # its prompt alone is past the provider's limit
    path = job.write(rows, **BATCH)
    endpoints(sim).config.enqueued_token_limit = 200
    handlers: list[Any] = []
    polls: list[int] = []

    def progress(figures: dict[str, Any]) -> None:
        polls.append(1)
        if len(polls) > 50:  # a --wait that never ends: stop it as a SIGTERM would
            handlers[0](signal.SIGTERM)

    options = RunOptions(wait=True, progress=progress, expose_signal_handler=handlers.append)
    result = asyncio.run(run_job(JobConfig.load(path), options))
    assert result.exit_code == ExitCode.ROWS_RETRYABLE, (result.exit_code, len(polls))
    (failed,) = job.failed()
    assert failed["custom_id"] == "a0002"
    assert failed["error"]["code"] == "token_limit_exceeded"
    assert failed["error"]["retryable"] is True
    assert sorted(r["custom_id"] for r in job.results()) == ["a0001", "a0003"]


def test_a_finished_batch_whose_output_file_is_gone_does_not_block_the_job_for_ever(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    path = batch_job(job, 3)
    assert cli("run", path).exit_code == 5
    (batch,) = bx.batches.values()
    bx._step(batch)  # it completed; then its output file was deleted (or expired)
    del bx.files[batch.output_file_id]
    again = cli("run", path, "--wait")
    assert "output file" in again.output and "lost" in again.output, again.output
    assert again.exit_code == 0, again.output
    assert sorted(r["custom_id"] for r in job.results()) == ["a0001", "a0002", "a0003"]


def test_a_download_cut_short_stops_the_run_cleanly_and_the_next_run_collects_once(
        job: JobFiles, monkeypatch: Any, cli: Any) -> None:
    from aiohttp import web

    from batchgpt.simulator import SimulatorConfig, SimulatorThread
    from batchgpt.simulator.batches import BatchEndpoints

    whole = BatchEndpoints._content
    cut = {"on": False}

    async def content(self: BatchEndpoints, request: web.Request) -> web.StreamResponse:
        if not cut["on"]:
            return await whole(self, request)
        data = self.files[request.match_info["id"]].data
        response = web.StreamResponse(headers={"Content-Length": str(len(data) + 1000)})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()  # the connection drops half-way through the file
        return response

    monkeypatch.setattr(BatchEndpoints, "_content", content)
    with SimulatorThread(SimulatorConfig()) as sim:
        job.config["api"] = {"base_url": sim.base_url}
        path = batch_job(job, 6)
        assert cli("run", path).exit_code == 5
        cut["on"] = True
        dropped = cli("run", path)
        assert dropped.exit_code == ExitCode.ERROR, dropped.output
        assert "could not send file" in dropped.output
        cut["on"] = False
        assert cli("run", path).exit_code == 0
        assert sorted(r["custom_id"] for r in job.results()) == [
            f"a{i:04d}" for i in range(1, 7)]
        assert_no_row_submitted_twice(sim)


def test_an_error_line_that_would_stop_an_online_run_leaves_its_row_for_the_next_run(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    import json

    bx = endpoints(sim)
    path = batch_job(job, 2)
    assert cli("run", path).exit_code == 5
    (batch,) = bx.batches.values()
    bx._step(batch)
    lines = bx.files[batch.output_file_id].data.splitlines()
    quota = {"id": "batch_req_x", "custom_id": "a0002", "error": None, "response": {
        "status_code": 429, "request_id": "req_x", "body": {"error": {
            "message": "You exceeded your current quota", "type": "insufficient_quota",
            "code": "insufficient_quota"}}}}
    bx.files[batch.output_file_id].data = lines[0] + b"\n" + json.dumps(quota).encode()
    collected = cli("run", path)
    assert collected.exit_code == ExitCode.ROWS_RETRYABLE, collected.output
    (failed,) = job.failed()
    assert failed["error"]["code"] == "insufficient_quota"
    assert failed["error"]["retryable"] is True  # as online: not failed for good
    assert cli("run", path, "--wait").exit_code == 0
    assert sorted(r["custom_id"] for r in job.results()) == ["a0001", "a0002"]


def test_a_row_edited_while_its_batch_runs_is_not_reported_done_by_its_stale_answer(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 100
    path = batch_job(job, 3)
    assert cli("run", path).exit_code == 5
    rows = articles(3)
    rows[1]["text"] = "EDITED while its batch runs"
    job.write(rows)
    bx.advance(100)
    collected = cli("run", path)  # takes the old request's answer; the new one is unsent
    assert collected.exit_code == ExitCode.BATCH_PENDING, collected.output
    assert job.summary()["requests"]["succeeded"] == 2
    bx.advance(100)
    assert cli("run", path).exit_code == 0
    by_id = {r["custom_id"]: r for r in job.results()}
    content = by_id["a0002"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "EDITED" in content
    assert job.summary()["requests"]["succeeded"] == 3


def test_a_row_removed_while_its_batch_runs_leaves_no_negative_pending(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 100
    path = batch_job(job, 3)
    assert cli("run", path).exit_code == 5
    job.write(articles(2))
    bx.advance(100)
    collected = cli("run", path)
    assert collected.exit_code == 0, collected.output
    requests = job.summary()["requests"]
    assert requests["succeeded"] == 2 and requests["pending"] == 0, requests


def test_a_row_edited_and_edited_back_while_its_batch_runs_keeps_its_result(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    path = batch_job(job, 2)
    assert cli("run", path, "--wait").exit_code == 0
    rows = articles(2)
    rows[1]["text"] = "a second thought"
    bx.config.delay_s = 100
    job.write(rows)
    assert cli("run", path).exit_code == 5  # the edited request goes in a batch
    job.write(articles(2))  # and the edit is undone: the first result is current again
    bx.advance(100)
    assert cli("run", path).exit_code == 0
    assert cli("run", path).exit_code == 0
    assert bx.carried["a0002"] == 2, "the request that had its result was paid for again"
    (line,) = [r for r in job.results() if r["custom_id"] == "a0002"]
    assert "second thought" not in line["response"]["body"]["choices"][0]["message"]["content"]


def test_the_providers_validation_errors_reach_no_file_with_the_api_key(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    path = batch_job(job, 2)
    assert cli("run", path).exit_code == 5
    (batch,) = bx.batches.values()
    batch.invalid = [{"code": "invalid_request", "line": None, "param": None,
                      "message": "Bearer sk-test-key is not allowed here"}]
    refused = cli("run", path)
    assert "sk-test-key" not in refused.output
    assert job.failed() and "sk-test-key" not in job.failures.read_text()
    ledger = job.output.with_name("job.state") / "batches.sqlite"
    assert b"sk-test-key" not in ledger.read_bytes()


def test_cancel_reaches_the_batches_of_a_part_of_a_sharded_job(
        job: JobFiles, sim: Simulator, cli: Any) -> None:
    bx = endpoints(sim)
    bx.config.delay_s = 1000
    path = batch_job(job, 8)
    assert cli("run", path, "--shard", "1/2").exit_code == 5
    cancelled = cli("cancel", path, "--shard", "1/2")
    assert cancelled.exit_code == 0, cancelled.output
    assert {b.status for b in bx.batches.values()} == {"cancelled"}


def test_a_shared_budget_is_refused_in_batch_mode_not_silently_ignored(tmp_path: Any) -> None:
    import pytest

    from batchgpt.config import JobConfig
    from batchgpt.errors import ConfigError

    path = tmp_path / "j.yaml"
    path.write_text("input: in.jsonl\noutput: out.jsonl\nmode: batch\nlimits:\n"
                    "  max_cost_usd: 5\n  shared_budget: true\n"
                    "  redis_url: redis://127.0.0.1:6379/0\n")
    # Each part of a sharded batch job would count only its own spend against the cap.
    with pytest.raises(ConfigError, match="shared_budget"):
        JobConfig.load(path)


def test_a_create_whose_answer_is_lost_is_not_retried_into_a_second_batch(
        job: JobFiles, monkeypatch: Any, cli: Any) -> None:
    from aiohttp import web

    from batchgpt.simulator import SimulatorConfig, SimulatorThread
    from batchgpt.simulator.batches import BatchEndpoints

    create = BatchEndpoints._create
    lost = {"n": 1}

    async def created_then_500(self: BatchEndpoints, request: web.Request) -> web.Response:
        response = await create(self, request)  # the batch exists at the provider...
        if lost["n"]:
            lost["n"] -= 1  # ...but its answer is lost (a 500 from a proxy, a timeout)
            return web.json_response({"error": {"message": "upstream failed", "type":
                                                "server_error", "code": None}}, status=500)
        return response

    monkeypatch.setattr(BatchEndpoints, "_create", created_then_500)
    with SimulatorThread(SimulatorConfig()) as sim:
        job.config["api"] = {"base_url": sim.base_url}
        path = batch_job(job, 3)
        cli("run", path, "--wait")
        assert_no_row_submitted_twice(sim)
        assert cli("run", path, "--wait").exit_code == 0
        assert_no_row_submitted_twice(sim)
        assert len(job.results()) == 3
