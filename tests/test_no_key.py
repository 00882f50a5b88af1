"""No key set, a base URL that needs one: the message says so, naming the variable.

With ``api.base_url`` set and ``OPENAI_API_KEY`` empty, batchgpt sends a placeholder key
(local servers such as vLLM take any key, and the SDK insists on one). When the server
does want a key, its 401 said "Incorrect API key provided: sk-***ired", about a key the
user never set.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchgpt.simulator import FaultConfig, SimulatorConfig, SimulatorThread
from tests.conftest import JobFiles, articles


def test_no_key_with_a_base_url_that_needs_one_says_no_key_was_set(
    tmp_path: Any, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with SimulatorThread(SimulatorConfig(faults=FaultConfig(api_key="sk-right"))) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        path = job.write(articles(20), limits={"concurrency": 4})
        result = cli("run", path)
        assert result.exit_code == 1, result.output
        assert set(sim.stats.by_status) == {401}
        assert sim.stats.requests <= 4  # stopped at once

    summary = job.summary()
    assert summary["stopped"] == "authentication"
    assert summary["message"].startswith(
        "no API key was set: the environment variable OPENAI_API_KEY (named by "
        f"api.api_key_env) is empty or unset, and the server at {sim.base_url} requires a key")
    # What the run says about why it stopped, not what the server said (the table of
    # errors still quotes the server, as it does for every error).
    said = [line for line in result.output.splitlines() if " stopp" in line]
    assert len(said) == 2 and all("no API key was set" in line for line in said)
    assert not any("Incorrect API key" in line for line in said)
    assert summary["requests"]["pending"] == 20


def test_a_wrong_key_is_still_called_a_refused_key(
    tmp_path: Any, cli: Any
) -> None:
    """The environment holds a key (conftest sets one): the server's own words stand."""
    with SimulatorThread(SimulatorConfig(faults=FaultConfig(api_key="sk-right"))) as sim:
        job = JobFiles(tmp_path, sim.base_url)
        result = cli("run", job.write(articles(3)))
    assert result.exit_code == 1
    assert "the API key was refused" in result.output
    assert "Incorrect API key provided" in job.summary()["message"]
    assert "no API key was set" not in result.output
