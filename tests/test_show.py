"""``batchgpt show JOB ID`` through the CLI, against the simulator: the exact request the
simulator received, the reply or the error, attempts, usage and cost, and the status of a
succeeded, failed, pending, changed and unknown row."""

from __future__ import annotations

import json
from typing import Any

from batchgpt.simulator import Simulator
from tests.conftest import JobFiles, articles, write_jsonl
from tests.test_export import POISON, digest, expected_cost, records


def shown(cli: Any, *args: Any) -> dict[str, Any]:
    result = cli("show", *args, "--json")
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def test_show_a_succeeded_row_gives_the_exact_request_sent_and_the_reply(
    job: JobFiles, sim: Simulator, cli: Any
) -> None:
    path = job.write(articles(5))
    assert cli("run", path).exit_code == 0
    sent = next(b for b in sim.stats.bodies
                if b["messages"][-1]["content"].startswith("Summarize: Article number 4 "))
    line = next(r for r in job.results() if r["custom_id"] == "a0004")
    info = shown(cli, path, "a0004")
    assert info["status"] == "succeeded"
    assert info["line"] == 4
    assert info["request"] == sent
    assert info["reply"]["body"] == line["response"]["body"]
    assert info["reply"]["content"] == line["response"]["body"]["choices"][0]["message"][
        "content"]
    assert info["reply"]["request_id"] == line["response"]["request_id"]
    assert info["attempts"] == 1 and info["error"] is None
    assert info["usage"]["total_tokens"] == line["response"]["body"]["usage"]["total_tokens"]
    assert info["cost_usd"] == expected_cost(line["response"]["body"]["usage"])

    text = cli("show", path, "a0004")
    assert text.exit_code == 0
    out = text.stdout
    assert out.startswith("a0004  (line 4 of ")
    assert "status     succeeded" in out
    assert "request (the exact JSON body sent):" in out
    assert '"content": "Summarize: Article number 4 reports on local news.' in out
    assert "reply:\n  [sandbox] Summarize: Article number 4 reports on local news." in out
    assert "attempts   1" in out and "cost       $0.0000" in out


def test_show_a_failed_row_gives_the_error_its_status_and_attempts(job: JobFiles,
                                                                  cli: Any) -> None:
    path = job.write(records(4, poison=(2,)))
    assert cli("run", path).exit_code == 3
    info = shown(cli, path, "a0002")
    assert info["status"] == "failed"
    assert info["reply"] is None and info["usage"] is None
    error = info["error"]
    assert (error["code"], error["status"], error["attempts"], error["retryable"]) == (
        "context_length_exceeded", 400, 1, False)
    assert info["attempts"] == 1
    assert info["error_response"]["status_code"] == 400
    assert POISON in info["request"]["messages"][-1]["content"]
    out = cli("show", path, "a0002").stdout
    assert "status     failed (permanent: a run sends it again only with --retry-failed)" in out
    assert "error      context_length_exceeded: This model's maximum context length" in out
    assert "HTTP       400" in out
    assert "server response:" in out


def test_show_a_pending_row_gives_the_request_a_run_will_send(job: JobFiles, sim: Simulator,
                                                              cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    write_jsonl(job.input, articles(3))
    info = shown(cli, path, "a0003")
    assert info["status"] == "pending"
    assert info["reply"] is None and info["error"] is None and info["attempts"] is None
    out = cli("show", path, "a0003").stdout
    assert "status     pending: not sent yet" in out
    assert "request (the exact JSON body that the next run sends):" in out
    sim.reset_stats()
    assert cli("run", path).exit_code == 0
    assert sim.stats.bodies == [info["request"]]  # what show said is what was sent


def test_show_a_row_changed_since_its_result(job: JobFiles, sim: Simulator, cli: Any) -> None:
    path = job.write(articles(2))
    assert cli("run", path).exit_code == 0
    old = shown(cli, path, "a0001")
    job.write(prompt="In one line: {text}")
    info = shown(cli, path, "a0001")
    assert info["status"] == "changed"
    assert info["request"]["messages"][-1]["content"].startswith("In one line: Article")
    assert info["request_hash"] != old["request_hash"]
    assert info["reply"] == old["reply"]
    out = cli("show", path, "a0001").stdout
    assert "changed since its result" in out and "(on_change: rerun)" in out


def test_show_an_unknown_id_suggests_close_ones(job: JobFiles, cli: Any) -> None:
    path = job.write(articles(12))
    assert cli("run", path).exit_code == 0
    result = cli("show", path, "a012")
    assert result.exit_code == 1
    assert "no row 'a012' in" in result.stderr
    assert "did you mean 'a0012'" in result.stderr
    assert result.stdout == ""
    far = cli("show", path, "zzzzzz")
    assert far.exit_code == 1
    assert "no row 'zzzzzz'" in far.stderr and "did you mean" not in far.stderr


def test_show_a_row_removed_from_the_input_still_shows_its_result(job: JobFiles,
                                                                 cli: Any) -> None:
    path = job.write(articles(3))
    assert cli("run", path).exit_code == 0
    write_jsonl(job.input, articles(2))
    info = shown(cli, path, "a0003")
    assert info["status"] == "not_in_input"
    assert info["request"] is None
    assert info["reply"]["content"].startswith("[sandbox] Summarize: Article number 3")


def test_show_writes_nothing_in_the_jobs_folders(job: JobFiles, cli: Any) -> None:
    path = job.write(records(3, poison=(2,)))
    assert cli("run", path).exit_code == 3
    folders = (job.dir / "jobs", job.dir / "data", job.dir / "out")
    before = digest(*folders)
    for row_id in ("a0001", "a0002", "nope"):
        cli("show", path, row_id)
        cli("show", path, row_id, "--json")
    assert digest(*folders) == before


KEY = "sk-proj-SECRETSECRET1234567890abcdef"


def test_the_key_pasted_into_a_request_is_never_printed_by_show_or_the_dry_run(
    job: JobFiles, sim: Simulator, cli: Any, monkeypatch: Any
) -> None:
    """A key pasted by mistake into ``params`` (sent as written: an unknown parameter)
    and, cut short, into a chat line: ``show`` (text and --json) and the dry run (text
    and --json) print them ``[REDACTED]``, as the run's logs do; a request without the
    key is printed exactly as sent, a prompt mentioning Bearer tokens included."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lines = [{"id": "c1", "messages": [{"role": "user", "content": f"my key {KEY[:-4]}"}]},
             {"id": "c2", "messages": [{"role": "user",
                                        "content": "Send Authorization: Bearer abcdefgh123"}]}]
    write_jsonl(job.input, lines)
    path = job.write(params={"max_tokens": 20, "api_key": KEY})
    outputs = [cli("run", path, "--dry-run").output,
               cli("run", path, "--dry-run", "--json").stdout,
               cli("show", path, "c1").output,
               cli("show", path, "c1", "--json").stdout]
    assert cli("run", path).exit_code == 0
    assert sim.stats.bodies[0]["api_key"] == KEY  # sent as written: the user's choice
    outputs += [cli("show", path, "c1").output, cli("show", path, "c1", "--json").stdout]
    for text in outputs:
        assert KEY[:22] not in text and KEY[-22:] not in text, text
        assert "[REDACTED]" in text
    info = shown(cli, path, "c1")
    assert info["request"]["api_key"] == "[REDACTED]"
    assert info["request"]["messages"][0]["content"] == "my key [REDACTED]"

    path = job.write(params={"max_tokens": 20})
    info = shown(cli, path, "c2")
    assert info["request"]["messages"][0]["content"] == "Send Authorization: Bearer abcdefgh123"
