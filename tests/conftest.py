"""Fixtures: a real simulator over HTTP on loopback, and job files in a temp folder.

Tests drive the CLI (typer's CliRunner, in process) or the library against the simulator
and assert on the files written and on what the simulator received. Nothing mocks the
openai SDK or its HTTP layer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from batchgpt.cli import app
from batchgpt.simulator import Simulator, SimulatorConfig, SimulatorThread


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A fresh simulator (no limits, no faults) in a background thread."""
    with SimulatorThread(SimulatorConfig()) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach OpenAI, whatever the developer's shell exports."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")


def write_jsonl(path: Path, records: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def articles(n: int, start: int = 1) -> list[dict[str, Any]]:
    return [
        {"id": f"a{i:04d}", "text": f"Article number {i} reports on local news. More text here."}
        for i in range(start, start + n)
    ]


class JobFiles:
    """A job file and its input in tmp_path, pointing at a simulator."""

    def __init__(self, tmp_path: Path, base_url: str | None) -> None:
        self.dir = tmp_path
        self.job_path = tmp_path / "jobs" / "job.yaml"
        self.job_path.parent.mkdir(parents=True, exist_ok=True)
        self.input = tmp_path / "data" / "input.jsonl"
        self.input.parent.mkdir(parents=True, exist_ok=True)
        self.output = tmp_path / "out" / "job.jsonl"
        self.config: dict[str, Any] = {
            "name": "job",
            "input": "../data/input.jsonl",
            "output": "../out/job.jsonl",
            "model": "gpt-4o-mini",
            "prompt": "Summarize: {text}",
            "params": {"max_tokens": 50},
            "limits": {"concurrency": 8},
            "retry": {"max_attempts": 3, "initial_delay_s": 0.01, "max_delay_s": 0.05},
            "timeout_s": 5,
            "api": {"base_url": base_url},
        }

    def write(self, records: list[Any] | None = None, **overrides: Any) -> Path:
        if records is not None:
            write_jsonl(self.input, records)
        self.config.update(overrides)
        self.job_path.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        return self.job_path

    @property
    def failures(self) -> Path:
        return self.output.with_name("job.failures.jsonl")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name("job.summary.json")

    def results(self) -> list[dict[str, Any]]:
        return read_jsonl(self.output)

    def failed(self) -> list[dict[str, Any]]:
        return read_jsonl(self.failures)

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.summary_path.read_text())
        return data


@pytest.fixture
def job(tmp_path: Path, sim: Simulator) -> JobFiles:
    return JobFiles(tmp_path, sim.base_url)


TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture
def cli() -> Any:
    """Invoke the CLI in-process. Every invocation in every test also checks the promise
    made to cron users: no Python traceback on the terminal, and no internal error
    (exit 70) unless the test is about one."""
    runner = CliRunner()

    def invoke(*args: str, internal_error: bool = False) -> Any:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        logging.getLogger("batchgpt").handlers.clear()
        assert TRACEBACK not in result.output, result.output
        if not internal_error:
            assert result.exit_code != 70, result.output
        return result

    return invoke


def user_texts(sim: Simulator) -> list[str]:
    """The last user message of every request the simulator received, in arrival order."""
    out = []
    for body in sim.stats.bodies:
        out.append(body["messages"][-1]["content"])
    return out
