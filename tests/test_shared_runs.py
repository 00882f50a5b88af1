"""Runs sharing one account's limits through a real Redis, as real processes.

Each test starts its own redis-server (``tests/redis_server.py``) and the simulator in a
process of its own enforcing the account's limit, then runs ``batchgpt run`` in separate
processes, as cron or a Kubernetes Job would. What is asserted is what must hold however
loaded the machine is: every row is in its output exactly once, the server's 429s stay
within 1 % (three runs each told the whole limit would otherwise offer three times it),
and the runs drew from one set of buckets. How much of the limit they used is a
wall-clock figure: ``benchmarks/shared_utilisation.py`` measures it (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from tests.conftest import articles, read_jsonl, write_jsonl
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401 - a fixture

KEY = "sk-proj-SharedLimitsTestKey-0123456789abcdefghijklmnop"
LIMIT_RPM = 1200  # the account's limit, which the simulator enforces (per 1 s window)
WAIT_S = 120  # a bound on a run's time, so a hang fails instead of blocking CI


class SimProcess:
    """``python -m batchgpt.simulator`` in its own process, enforcing ``rpm``."""

    def __init__(self, rpm: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchgpt.simulator", "--port", "0", "--no-record",
             "--rpm", str(rpm), "--latency", "0.02"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        self.base_url = line.rsplit(" ", 1)[1].strip()

    def stats(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/_sandbox/stats"
        with urllib.request.urlopen(url, timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
            return data

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sim_process() -> Iterator[SimProcess]:
    sim = SimProcess(LIMIT_RPM)
    try:
        yield sim
    finally:
        sim.stop()


def job_file(folder: Path, name: str, rows: int, base_url: str, redis_url: str,
             **limits: Any) -> Path:
    """A job of its own (input, output) on the shared account."""
    (folder / name).mkdir(parents=True)
    write_jsonl(folder / name / "input.jsonl", articles(rows))
    path = folder / name / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "input": "input.jsonl", "output": "out/results.jsonl",
        "model": "gpt-4o-mini", "prompt": "Summarize: {text}", "params": {"max_tokens": 20},
        "limits": {"rpm": LIMIT_RPM, "redis_url": redis_url, **limits},
        "retry": {"max_attempts": 6, "initial_delay_s": 0.05, "max_delay_s": 0.5},
        "timeout_s": 10, "api": {"base_url": base_url, "api_key_env": "SHARED_TEST_KEY"},
    }), encoding="utf-8")
    return path


def start(path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SHARED_TEST_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "batchgpt.cli", "run", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=WAIT_S)
    assert "Traceback" not in err, err
    return proc.returncode, err


def ids(path: Path) -> list[str]:
    return [line["custom_id"] for line in read_jsonl(path.parent / "out" / "results.jsonl")]


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str]) -> None:
    """Until the run's output holds ``n`` results, or the run ended: a condition in another
    process, checked each time ``proc.wait`` gives up for a moment (bounded by WAIT_S so a
    hang fails; no timing is asserted)."""
    out = path.parent / "out" / "results.jsonl"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        try:
            proc.wait(timeout=0.02)
            return  # it ended
        except subprocess.TimeoutExpired:
            continue
    raise AssertionError(f"{out} never reached {n} lines")


def rejected_share(stats: dict[str, Any]) -> float:
    return stats["by_status"].get("429", 0) / max(1, stats["requests"])


def test_three_runs_on_one_account_share_its_limit_through_redis(
        tmp_path: Path, redis_server: RedisServer, sim_process: SimProcess) -> None:  # noqa: F811
    # Each run is told the account's whole limit, as users do; 3 × 40 rows = 6 s at it.
    jobs = [job_file(tmp_path, f"job{i}", 40, sim_process.base_url, redis_server.url)
            for i in range(3)]
    procs = [start(path) for path in jobs]
    for path, proc in zip(jobs, procs, strict=True):
        code, err = finish(proc)
        assert code == 0, err
        assert sorted(ids(path)) == [f"a{i:04d}" for i in range(1, 41)]
    stats = sim_process.stats()
    assert stats["by_status"].get("200", 0) == 120
    assert rejected_share(stats) <= 0.01, stats
    client = Redis.from_url(redis_server.url)
    limiter_keys = [k for k in client.scan_iter("batchgpt:limit:*") if not k.endswith(b":runs")]
    assert len(limiter_keys) == 1  # one account and model: one set of buckets
    client.close()


def test_a_run_killed_mid_run_loses_nothing_and_the_others_finish(
        tmp_path: Path, redis_server: RedisServer, sim_process: SimProcess) -> None:  # noqa: F811
    jobs = [job_file(tmp_path, f"job{i}", 40, sim_process.base_url, redis_server.url)
            for i in range(3)]
    procs = [start(path) for path in jobs]
    wait_for_lines(jobs[2], 5, procs[2])
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait(WAIT_S)
    for path, proc in zip(jobs[:2], procs[:2], strict=True):
        code, err = finish(proc)
        assert code == 0, err
        assert sorted(ids(path)) == [f"a{i:04d}" for i in range(1, 41)]
    # It held nothing in Redis: its rerun (now alone on the account) takes the whole limit.
    code, err = finish(start(jobs[2]))
    assert code == 0, err
    assert sorted(ids(jobs[2])) == [f"a{i:04d}" for i in range(1, 41)]
    assert rejected_share(sim_process.stats()) <= 0.01


def test_redis_stopped_mid_run_the_run_completes_on_its_local_limiter(
        tmp_path: Path, redis_server: RedisServer, sim_process: SimProcess) -> None:  # noqa: F811
    path = job_file(tmp_path, "job", 60, sim_process.base_url, redis_server.url)
    proc = start(path)
    wait_for_lines(path, 10, proc)
    redis_server.stop()
    code, err = finish(proc)
    assert code == 0, err
    assert sorted(ids(path)) == [f"a{i:04d}" for i in range(1, 61)]
    assert err.count("lost Redis") == 1, err  # said once
    assert rejected_share(sim_process.stats()) <= 0.01


def test_the_api_key_is_nowhere_in_redis(
        tmp_path: Path, redis_server: RedisServer, sim_process: SimProcess) -> None:  # noqa: F811
    path = job_file(tmp_path, "job", 10, sim_process.base_url, redis_server.url,
                    max_cost_usd=1.0, shared_budget=True)
    code, err = finish(start(path))
    assert code == 0, err
    client = Redis.from_url(redis_server.url)
    seen = b""
    for key in client.scan_iter("*"):
        kind = client.type(key)
        value: Any
        if kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            value = client.smembers(key)
        else:
            value = client.get(key)
        seen += key + repr(value).encode()
    client.close()
    assert b"batchgpt:limit:" in seen and b"batchgpt:budget:" in seen
    assert KEY.encode() not in seen
    assert KEY[8:32].encode() not in seen  # nor a long piece of it


def test_an_unreachable_redis_stops_the_run_before_anything_is_sent(
        tmp_path: Path, sim_process: SimProcess) -> None:
    url = f"redis://:hunter2-redis-password@127.0.0.1:{free_port()}/0"
    path = job_file(tmp_path, "job", 5, sim_process.base_url, url)
    code, err = finish(start(path))
    assert code == 1
    assert f"redis://:[REDACTED]@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/0" in err
    assert "hunter2" not in err
    assert sim_process.stats()["requests"] == 0
    assert not (path.parent / "out" / "results.jsonl").exists()
