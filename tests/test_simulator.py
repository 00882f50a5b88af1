"""The sandbox over real HTTP, driven by the official openai SDK (never mocked): if these
pass, batchgpt's client sees the same shapes, headers and failures it will see from OpenAI."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from batchgpt import tokens
from batchgpt.simulator.app import (
    LABELS,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    SimulatorThread,
    format_go_duration,
)

MakeSim = Callable[..., Awaitable[Simulator]]
MODEL = "gpt-4o-mini"
SAFETY_S = 30.0  # real seconds: a safety net against a hang, never a measurement


def msgs(text: str) -> Any:
    return [{"role": "system", "content": "You label reviews."}, {"role": "user", "content": text}]


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    started: list[Simulator] = []

    async def make(**config: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**config))
        await sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


def client(sim: Simulator, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("api_key", "sk-test")
    return openai.AsyncOpenAI(base_url=sim.base_url, max_retries=0, **kw)


async def test_reply_shape_and_usage(make_sim: MakeSim) -> None:
    sim = await make_sim()
    messages = msgs("Great blender. Broke after a week though!")
    async with client(sim) as c:
        r = await c.chat.completions.create(model=MODEL, messages=messages)
    assert r.id.startswith("chatcmpl-sbx-")
    assert (r.object, r.model, r.system_fingerprint, r.service_tier) == (
        "chat.completion", MODEL, "fp_sandbox", "default")
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.message.content == "[sandbox] Great blender."
    assert (choice.message.role, choice.finish_reason, choice.message.refusal) == (
        "assistant", "stop", None)
    assert r.usage is not None
    assert r.usage.prompt_tokens == tokens.prompt_tokens(messages)
    assert r.usage.completion_tokens == tokens.text_tokens("[sandbox] Great blender.")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 0
    assert sim.stats.requests == 1 and sim.stats.by_status == {200: 1}
    assert sim.stats.bodies == [{"model": MODEL, "messages": messages}]
    assert sim.stats.tokens_charged == tokens.request_cost({"messages": messages})


async def test_deterministic_parts_and_n(make_sim: MakeSim) -> None:
    sim = await make_sim(model_alias="gpt-4o-mini-2024-07-18")
    parts: Any = [{"role": "user", "content": [{"type": "text", "text": "First part? Second."}]}]
    async with client(sim) as c:
        a = await c.chat.completions.create(model=MODEL, messages=parts, n=3)
        b = await c.chat.completions.create(model=MODEL, messages=parts, n=3)
    assert a.id != b.id
    assert a.model == "gpt-4o-mini-2024-07-18"
    assert [ch.message.content for ch in a.choices] == ["[sandbox] First part?"] * 3
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert a.usage == b.usage and a.choices == b.choices
    assert a.usage is not None and a.usage.completion_tokens == 3 * tokens.text_tokens(
        "[sandbox] First part?")


async def test_max_tokens_truncates_with_length(make_sim: MakeSim) -> None:
    sim = await make_sim()
    async with client(sim) as c:
        r = await c.chat.completions.create(
            model=MODEL, messages=msgs("A very long first sentence about nothing much at all."),
            max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "[sandbox] A "
    assert r.usage is not None and r.usage.completion_tokens == 3


async def test_json_response_format(make_sim: MakeSim) -> None:
    sim = await make_sim()
    async with client(sim) as c:
        r = await c.chat.completions.create(model=MODEL, messages=msgs("Loved it. Five stars."),
                                            response_format={"type": "json_object"})
    content = r.choices[0].message.content
    assert content is not None
    data = json.loads(content)
    assert data["sandbox"] is True and data["label"] in LABELS
    assert data["summary"] == "Loved it."


async def test_headers_on_success_and_error(make_sim: MakeSim) -> None:
    sim = await make_sim(rpm=600, tpm=60_000)
    async with client(sim) as c:
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs("Hi."))
        h = raw.headers
        assert h["x-request-id"].startswith("req_") and int(h["openai-processing-ms"]) >= 0
        assert h["x-ratelimit-limit-requests"] == "600"
        assert h["x-ratelimit-limit-tokens"] == "60000"
        # one request out of a 1-s bucket of 10 leaves 9/10 of the per-minute figure
        # (plus whatever refilled in the few microseconds before the headers were written)
        assert 540 <= int(h["x-ratelimit-remaining-requests"]) < 600
        assert int(h["x-ratelimit-remaining-tokens"]) < 60_000
        assert h["x-ratelimit-reset-requests"].endswith("ms")
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model=MODEL, messages=[])
        assert err.value.response.headers["x-ratelimit-limit-requests"] == "600"
        assert err.value.request_id and err.value.request_id.startswith("req_")
    unlimited = await make_sim()
    async with client(unlimited) as c:
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs("Hi."))
    assert "x-request-id" in raw.headers
    assert not [k for k in raw.headers if k.startswith("x-ratelimit")]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.12, "120ms"), (0.0004, "1ms"), (1, "1s"), (9.816, "9.816s"), (1.5, "1.5s"),
    (360, "6m0s"), (61.25, "1m1.25s"), (3723.5, "1h2m3.5s"),
])
def test_format_go_duration(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


async def test_rpm_enforced(make_sim: MakeSim) -> None:
    sim = await make_sim(rpm=60, window_s=1.0)  # bucket of one request, refilled in 1 s
    async with client(sim) as c:
        await c.chat.completions.create(model=MODEL, messages=msgs("One."))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model=MODEL, messages=msgs("Two."))
    e = err.value
    assert (e.code, e.type) == ("rate_limit_exceeded", "requests")
    assert "on requests per min (RPM): Limit 60" in e.message and "try again in" in e.message
    assert 0 < int(e.response.headers["retry-after-ms"]) <= 1000
    assert e.response.headers["retry-after"] == "1"
    assert int(e.response.headers["x-ratelimit-remaining-requests"]) < 60
    sim.config.rpm = 6000  # a new limit starts a new, full bucket
    async with client(sim) as c:
        await c.chat.completions.create(model=MODEL, messages=msgs("Three."))
    assert sim.stats.by_status == {200: 2, 429: 1}


async def test_tpm_enforced_and_too_large(make_sim: MakeSim) -> None:
    # 10 tokens a second: a 65-token request passes on a full bucket and leaves a debt
    sim = await make_sim(tpm=600)
    async with client(sim) as c:
        await c.chat.completions.create(model=MODEL, messages=msgs("x"), max_tokens=50)
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model=MODEL, messages=msgs("y"), max_tokens=50)
        assert err.value.type == "tokens" and "(TPM): Limit 600," in err.value.message
        assert "retry-after-ms" in err.value.response.headers
        with pytest.raises(openai.RateLimitError) as big:
            await c.chat.completions.create(model=MODEL, messages=msgs("z"), max_tokens=7000)
    assert f"429 - Request too large for {MODEL} in organization" in big.value.message
    assert "Limit 600, Requested" in big.value.message
    assert (big.value.code, big.value.type) == ("rate_limit_exceeded", "tokens")
    assert "retry-after" not in big.value.response.headers
    assert sim.stats.tokens_charged == tokens.request_cost(
        {"messages": msgs("x"), "max_tokens": 50})


async def test_poison_quota_and_quota_returns(make_sim: MakeSim) -> None:
    sim = await make_sim(faults=FaultConfig(quota_after=2))
    async with client(sim) as c:
        with pytest.raises(openai.BadRequestError) as bad:
            await c.chat.completions.create(model=MODEL, messages=msgs("a __POISON__ row"))
        assert bad.value.code == "context_length_exceeded"
        assert bad.value.type == "invalid_request_error"
        for i in range(2):
            await c.chat.completions.create(model=MODEL, messages=msgs(f"ok {i}"))
        with pytest.raises(openai.RateLimitError) as quota:
            await c.chat.completions.create(model=MODEL, messages=msgs("third"))
        assert quota.value.code == quota.value.type == "insufficient_quota"
        sim.config.faults.quota_after = None  # the user paid
        await c.chat.completions.create(model=MODEL, messages=msgs("back"))
    assert sim.stats.by_status == {400: 1, 200: 3, 429: 1}


async def test_api_key_enforced(make_sim: MakeSim) -> None:
    secret = "sk-sandbox-very-secret-1234"
    sim = await make_sim(faults=FaultConfig(api_key=secret))
    wrong = "sk-wrong-but-long-enough-9876"
    async with client(sim, api_key=wrong) as c:
        with pytest.raises(openai.AuthenticationError) as err:
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"))
    assert err.value.code == "invalid_api_key" and wrong not in err.value.message
    assert "sk-***9876" in err.value.message
    async with client(sim, api_key=secret) as c:
        await c.chat.completions.create(model=MODEL, messages=msgs("hi"))


async def _statuses(sim: Simulator, rounds: int, rows: int) -> list[list[int]]:
    """Send every row once per round, all rows of a round concurrently; status per attempt
    (0 = no response)."""
    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        try:
            await c.chat.completions.create(model=MODEL, messages=msgs(f"row {i}"))
        except openai.APIStatusError as e:
            return e.status_code
        except openai.APIConnectionError:
            return 0
        return 200

    out = []
    async with client(sim, timeout=5) as c:
        for _ in range(rounds):
            out.append(list(await asyncio.gather(*(one(c, i) for i in range(rows)))))
    return out


async def test_seeded_faults_are_reproducible(make_sim: MakeSim) -> None:
    faults = FaultConfig(server_error_rate=0.2, overload_rate=0.2, drop_rate=0.1)
    a = await make_sim(seed=7, faults=faults, latency_jitter_s=0.01)
    b = await make_sim(seed=7, faults=faults, latency_jitter_s=0.01)
    first, second = await _statuses(a, 3, 12), await _statuses(b, 3, 12)
    assert first == second
    flat = [s for r in first for s in r]
    assert {200, 500, 503, 0} <= set(flat)
    assert first[0] != first[1]  # the same body's later attempt may fare differently
    assert a.stats.by_status == b.stats.by_status
    other = await make_sim(seed=8, faults=faults)
    assert await _statuses(other, 3, 12) != first


async def test_drop_is_a_connection_error(make_sim: MakeSim) -> None:
    sim = await make_sim(faults=FaultConfig(drop_rate=1.0))
    async with client(sim) as c:
        with pytest.raises(openai.APIConnectionError) as err:
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"))
    assert type(err.value) is openai.APIConnectionError  # httpx: "Server disconnected"
    # The aiohttp backend maps every aiohttp ClientConnectionError to httpx.ConnectTimeout,
    # so there a drop surfaces as APITimeoutError (a subclass of APIConnectionError).
    async with client(sim, http_client=openai.DefaultAioHttpClient()) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"))
    assert sim.stats.by_status == {0: 2}


async def test_hang_times_out_and_stop_ends_hung_requests() -> None:
    sim = Simulator(SimulatorConfig(faults=FaultConfig(hang_rate=1.0)))  # hangs for an hour
    await sim.start()
    async with client(sim, timeout=0.2) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"))
    patient = client(sim, timeout=SAFETY_S)
    pending = asyncio.create_task(
        patient.chat.completions.create(model=MODEL, messages=msgs("still waiting")))
    while sim.stats.requests < 2:  # wait for arrival, not for time
        await asyncio.sleep(0.005)
    # stop() returns while the request hangs, and the request has ended by then: the
    # server did not wait it out, nor leave it running.
    await asyncio.wait_for(sim.stop(), SAFETY_S)  # a safety net, not a measurement
    assert sim.stats.in_flight == 0 and sim.stats.by_status == {0: 2}
    # The client got a dropped connection: not an answer, and not its own timeout.
    with pytest.raises(openai.APIConnectionError) as err:
        await pending
    assert type(err.value) is openai.APIConnectionError
    await patient.close()


async def test_garbage_body_comes_back_as_text(make_sim: MakeSim) -> None:
    """A 200 with an HTML body: the SDK (non-strict, its default) does not raise, it returns
    the raw text instead of a ChatCompletion; callers must check the type."""
    sim = await make_sim(faults=FaultConfig(garbage_rate=1.0))
    async with client(sim) as c:
        r: Any = await c.chat.completions.create(model=MODEL, messages=msgs("hi"))
    assert isinstance(r, str) and "502 Bad Gateway" in r
    async with client(sim, _strict_response_validation=True) as c:
        with pytest.raises(openai.APIResponseValidationError):
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"))


async def test_validation_and_other_endpoints(make_sim: MakeSim) -> None:
    sim = await make_sim()
    no_role: Any = [{"content": "no role"}]
    async with client(sim) as c:
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="", messages=msgs("hi"))
        assert err.value.param == "model"
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model=MODEL, messages=no_role)
        assert err.value.param == "messages.[0].role"
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model=MODEL, messages=msgs("hi"), stream=True)
        assert "streaming" in err.value.message
        models = await c.models.list()
        assert MODEL in [m.id for m in models.data]
    root = sim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{root}/chat/completions",
                          json={"model": MODEL, "messages": msgs("No v1.")}) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "[sandbox] No v1."
        async with s.post(f"{root}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
        async with s.get(f"{root}/v1/nothing") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"


async def test_concurrency_stats(make_sim: MakeSim) -> None:
    sim = await make_sim(latency_s=0.5, record=False)
    async with client(sim) as c:
        await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=msgs(f"{i}"))
                               for i in range(10)))
    assert sim.stats.max_in_flight == 10 and sim.stats.in_flight == 0
    assert sim.stats.bodies == []
    sim.reset_stats()
    assert sim.stats.requests == 0 and sim.stats.by_status == {}


async def test_sandbox_endpoints_over_http(make_sim: MakeSim) -> None:
    sim = await make_sim()
    root = sim.base_url.removesuffix("/v1")
    body = {"model": MODEL, "messages": msgs("hi")}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{root}/_sandbox/config", json={"faults": {"quota_after": 0}}) as r:
            assert r.status == 200 and (await r.json())["faults"]["quota_after"] == 0
        async with s.post(f"{root}/v1/chat/completions", json=body) as r:
            assert r.status == 429
        async with s.post(f"{root}/_sandbox/config", json={"faults": {"quota_after": None}}) as r:
            assert r.status == 200
        async with s.post(f"{root}/v1/chat/completions", json=body) as r:
            assert r.status == 200
        async with s.post(f"{root}/_sandbox/config", json={"rpm": 0}) as r:
            assert r.status == 400
        async with s.post(f"{root}/_sandbox/config", json={"no_such": 1}) as r:
            assert r.status == 400
        async with s.get(f"{root}/_sandbox/stats") as r:
            stats = await r.json()
        assert stats["requests"] == 2 and stats["by_status"] == {"200": 1, "429": 1}
        assert "bodies" not in stats
        async with s.get(f"{root}/_sandbox/stats?bodies=1") as r:
            assert (await r.json())["bodies"] == [body, body]
        async with s.post(f"{root}/_sandbox/reset") as r:
            assert r.status == 200
        async with s.get(f"{root}/_sandbox/stats") as r:
            assert (await r.json())["requests"] == 0
    assert sim.config.faults.quota_after is None


def test_simulator_thread_from_sync_code() -> None:
    with SimulatorThread(SimulatorConfig(rpm=6000)) as sim:
        with openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
            r = c.chat.completions.create(model=MODEL, messages=msgs("Sync works."))
        assert r.choices[0].message.content == "[sandbox] Sync works."
        assert sim.stats.requests == 1
        url = sim.base_url
    with openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=2) as c, \
            pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model=MODEL, messages=msgs("gone"))


def test_module_entry_point_serves_until_sigterm() -> None:
    repo = Path(__file__).resolve().parents[1]
    with subprocess.Popen([sys.executable, "-m", "batchgpt.simulator", "--port", "0",
                           "--rpm", "600", "--no-record"],
                          cwd=repo, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("batchgpt sandbox listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            with openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0) as c:
                raw = c.chat.completions.with_raw_response.create(model=MODEL,
                                                                  messages=msgs("Hi."))
            assert raw.headers["x-ratelimit-limit-requests"] == "600"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
