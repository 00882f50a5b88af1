"""A server batchgpt does not control, lying or leaking: what must hold whatever it says.

batchgpt runs unattended against proxies and OpenAI-compatible servers. These tests point
it at the simulator's hostile knobs (``faults.headers`` on every answer, ``reply_patch``
merged into every reply, ``echo_auth_status``: a proxy that echoes the Authorization
header in its error) and check the promises that must survive them:

* a lying ``x-ratelimit-*``, ``retry-after`` or ``x-should-retry`` header can neither
  stall a run nor fail rows that would succeed; an ignored lie is logged once;
* the API key appears in no stream and no file, even when the server echoes it;
* absurd ``usage`` never reaches the checkpoint's counts, and odd text (a lone surrogate)
  crashes nothing in the client or the pricing code.

Unit tests of :class:`~batchgpt.redact.Redactor` and ``Usage.parse_response`` come first,
then the client against the simulator, then whole runs through the CLI, asserting on the
files written and on what the simulator saw.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchgpt.client import ChatClient
from batchgpt.config import RetryPolicy
from batchgpt.pricing import MAX_TOKEN_COUNT, PRICES, Usage, cost_usd, resolve_price
from batchgpt.redact import REDACTED, Redactor, partial_min
from batchgpt.retry import Action, Kind, decide
from batchgpt.simulator import FaultConfig, Simulator, SimulatorConfig, SimulatorThread
from batchgpt.transport import make_client as client_for
from tests.conftest import JobFiles, articles

# Both ways of sending a request (``api.transport``) must hold every promise below.
TRANSPORTS = ["aiohttp", "sdk"]

SECRET = "sk-live-SECRET-0123456789abcdef"
FAST_RETRY = {"max_attempts": 3, "initial_delay_s": 0.01, "max_delay_s": 0.02}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there."}]}


# -- the redactor ---------------------------------------------------------------------------


def test_redactor_replaces_a_secret_in_text_bytes_and_nested_json() -> None:
    redact = Redactor([SECRET])
    assert redact.text(f"key={SECRET}; again {SECRET}") == f"key={REDACTED}; again {REDACTED}"
    assert redact.data(f"<p>{SECRET}</p>".encode()) == f"<p>{REDACTED}</p>".encode()
    nested = {"error": {"message": f"bad key {SECRET}", "code": None, "n": 3,
                        SECRET: [SECRET, ("x", SECRET), True, 1.5, SECRET.encode()]}}
    assert redact.value(nested) == {"error": {
        "message": f"bad key {REDACTED}", "code": None, "n": 3,
        REDACTED: [REDACTED, ["x", REDACTED], True, 1.5, REDACTED.encode()]}}
    assert nested["error"]["message"] == f"bad key {SECRET}"  # a copy: the input is untouched


def test_redactor_catches_any_bearer_token_even_one_it_was_not_given() -> None:
    """A proxy may echo a truncated key, or the key it uses upstream."""
    redact = Redactor([SECRET])
    assert (redact.text("Authorization: Bearer sk-upstream-9f8e7d6c and bearer\tsk-live-SEC")
            == f"Authorization: Bearer {REDACTED} and bearer\t{REDACTED}")
    assert redact.data(b"authorization: BEARER abcdefgh==") == b"authorization: BEARER " + \
        REDACTED.encode()
    # Prose is not a token: fewer than 8 characters after "Bearer" is left alone.
    assert redact.text("Bearer auth (Authorization: Bearer KEY)") == \
        "Bearer auth (Authorization: Bearer KEY)"
    assert Redactor().text("Bearer sk-proj-abcdefgh") == f"Bearer {REDACTED}"


@pytest.mark.parametrize(("secret", "echoed"), [
    ("sk-with/slash-0123456789", 'Bearer sk-with\\/slash-0123456789'),  # JSON "\/"
    ("sk-with/slash-0123456789", "key=sk-with%2Fslash-0123456789"),  # percent-encoded
    ('sk-"quoted"-0123456789', 'msg: "sk-\\"quoted\\"-0123456789"'),  # JSON-escaped
    ("sk-clé-0123456789", "sk-cl\\u00e9-0123456789"),  # JSON ASCII escape
], ids=["json slash", "percent", "json quote", "json unicode"])
def test_redactor_catches_the_forms_a_server_echoes_a_key_in(secret: str, echoed: str) -> None:
    redact = Redactor([secret])
    cleaned = redact.text(echoed)
    assert REDACTED in cleaned
    assert "0123456789" not in cleaned
    assert redact.found_in(echoed.encode())


@pytest.mark.parametrize(("length", "least"), [
    (8, 8), (16, 16), (17, 16), (26, 16), (27, 17), (35, 21), (36, 22), (51, 31), (164, 99)])
def test_a_part_of_a_key_is_redacted_from_16_characters_or_60_percent_whichever_is_more(
    length: int, least: int
) -> None:
    assert partial_min(length) == least


PART_KEY = "sk-proj-SECRETSECRET1234567890abcdef"  # 36 characters: parts of 22 or more


@pytest.mark.parametrize(("echoed", "redacted"), [
    (f"req_{PART_KEY[:-3]}", f"req_{REDACTED}"),  # a proxy's request id, cut short
    (f"key={PART_KEY[:22]}...", f"key={REDACTED}..."),  # the shortest prefix redacted
    (f"key={PART_KEY[:21]}...", f"key={PART_KEY[:21]}..."),  # one character less: kept
    (f"...{PART_KEY[-22:]}.", f"...{REDACTED}."),  # a suffix
    (f"...{PART_KEY[-21:]}.", f"...{PART_KEY[-21:]}."),
    (f"({PART_KEY[5:27]})", f"({REDACTED})"),  # the middle, both ends cut
    (f"{PART_KEY[:30]}{PART_KEY[6:]}", f"{REDACTED}{REDACTED}"),  # back to back
    (f"{PART_KEY[:22]} and {PART_KEY} again", f"{REDACTED} and {REDACTED} again"),
    ("a reply that mentions SECRET12 in passing", "a reply that mentions SECRET12 in passing"),
], ids=["all but 3", "prefix 22", "prefix 21", "suffix 22", "suffix 21", "middle", "twice",
        "part and whole", "core only"])
def test_redactor_replaces_a_long_part_of_a_key_as_the_key_itself(echoed: str,
                                                                   redacted: str) -> None:
    """A proxy may echo the key truncated (design.md): a long enough part of it, however
    cut, is redacted in text and bytes alike, and the hot path's byte search sees it."""
    redact = Redactor([PART_KEY])
    assert redact.text(echoed) == redacted
    assert redact.data(echoed.encode()) == redacted.encode()
    if redacted != echoed:
        assert redact.found_in(echoed.encode())
        assert redact.value({"x": [echoed]}) == {"x": [redacted]}


def test_long_parts_of_a_key_that_repeats_itself_are_found_wherever_the_core_sits() -> None:
    key = "abcabcabcabcabcabcabcabc-0123456789"  # the core occurs several times in the key
    redact = Redactor([key])
    assert redact.text(f"<{key[:25]}>") == f"<{REDACTED}>"
    assert redact.text(f"<{key[-22:]}>") == f"<{REDACTED}>"
    assert redact.text("abcabcabcabcabcabcabcabcabcabc") == f"{REDACTED}abcabc"  # 24 of 35
    assert redact.text("abcabcabcabcabcabcab-") == "abcabcabcabcabcabcab-"  # 20: fewer than 21
    short = Redactor(["0123456789abcdef"])  # 16 characters: only whole
    assert short.text("0123456789abcde") == "0123456789abcde"
    assert short.text("0123456789abcdef") == REDACTED


def test_redactor_ignores_secrets_shorter_than_8_characters_and_missing_ones() -> None:
    redact = Redactor(["", "none", "1234567", None])
    assert not redact.has_secrets
    assert redact.text("none of 1234567 is touched") == "none of 1234567 is touched"
    assert not redact.found_in(b"none 1234567")
    assert Redactor(["12345678"]).text("x12345678x") == f"x{REDACTED}x"


def test_redactor_replaces_a_longer_secret_whole_when_it_contains_a_shorter_one() -> None:
    redact = Redactor(["abcdefgh", "abcdefgh-and-more"])
    assert redact.text("abcdefgh-and-more!") == f"{REDACTED}!"


def test_redactor_never_shows_its_secrets_and_adds_secrets_to_a_copy() -> None:
    base = Redactor([SECRET])
    assert SECRET not in repr(base) and SECRET not in str(base)
    more = base.with_secrets("another-secret-42", None)
    assert more.text("another-secret-42") == REDACTED
    assert base.text("another-secret-42") == "another-secret-42"
    assert more.text(SECRET) == REDACTED


def test_redactor_finds_a_key_hidden_from_a_byte_search_by_json_escapes() -> None:
    """No JSON encoder escapes a printable ASCII character; a server that does is hiding
    something, and the reply is cleaned after parsing. (The escape is in the key's middle:
    a long run of it left in plain sight is found by the byte search itself.)"""
    redact = Redactor([SECRET])
    hidden = json.dumps({"c": SECRET}).replace("SECRET-0", "SECRET\\u002d0").encode()
    assert not redact.found_in(hidden)
    assert redact.found_in_json(hidden)
    assert redact.value(json.loads(hidden)) == {"c": REDACTED}
    # Ordinary replies, ASCII or not, do not trigger it.
    assert not redact.found_in_json(json.dumps({"c": "plain text"}).encode())
    assert not redact.found_in_json(json.dumps({"c": "café 東京"}).encode())
    assert not Redactor().found_in_json(hidden)  # nothing to protect, nothing to scan


def test_redactor_tolerates_lone_surrogates_and_keys_from_undecodable_environments() -> None:
    odd_key = "sk-\udcff\udcfe-0123456789"  # os.environ's spelling of bytes ff fe
    redact = Redactor([odd_key])
    assert redact.text(f"\ud800 {odd_key}") == f"\ud800 {REDACTED}"
    assert redact.found_in(b"sk-\xff\xfe-0123456789")
    assert redact.data(b"sk-\xff\xfe-0123456789") == REDACTED.encode()


def test_redactor_headers_are_returned_as_they_were_when_clean() -> None:
    redact = Redactor([SECRET])
    clean = {"retry-after": "1", "x-request-id": "req_1"}
    assert redact.headers(clean) is clean
    assert redact.headers({"x-echo": f"Bearer {SECRET}", "retry-after": "1"}) == {
        "x-echo": f"Bearer {REDACTED}", "retry-after": "1"}


def test_a_structure_too_deep_to_walk_is_replaced_whole() -> None:
    deep: Any = SECRET
    for _ in range(100_000):
        deep = [deep]
    assert Redactor([SECRET]).value(deep) == REDACTED


# -- usage a server may report ---------------------------------------------------------------

ABSURD_COUNTS: dict[str, Any] = {
    "10**30": 10**30,
    "just over the cap": MAX_TOKEN_COUNT + 1,
    "negative": -1,
    "fraction": 1.5,
    "huge float": 1e30,
    "nan": float("nan"),
    "inf": float("inf"),
    "string": "12",
    "true": True,
    "false": False,
    "list": [1, 2],
    "object": {"value": 12},
    "lone surrogate": "\ud800",
}


@pytest.mark.parametrize("value", ABSURD_COUNTS.values(), ids=ABSURD_COUNTS.keys())
@pytest.mark.parametrize("path", ["prompt_tokens", "completion_tokens", "total_tokens",
                                  "prompt_tokens_details.cached_tokens",
                                  "completion_tokens_details.reasoning_tokens"])
def test_a_count_that_is_not_a_believable_integer_is_0_and_reported(path: str,
                                                                     value: Any) -> None:
    good = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 8}}
    raw: dict[str, Any] = json.loads(json.dumps(good))
    head, _, leaf = path.rpartition(".")
    (raw[head] if head else raw)[leaf] = value
    usage, dropped = Usage.parse_response(raw)
    assert dropped == (path,)
    expected = Usage(prompt_tokens=100, completion_tokens=20, total_tokens=120,
                     cached_tokens=64, reasoning_tokens=8)
    field = leaf
    if field == "total_tokens":  # recomputed, as when it is missing
        assert usage == expected
    else:
        assert getattr(usage, field) == 0
        assert usage == expected.model_copy(update={field: 0})
    assert Usage.from_response(raw) == usage


def test_counts_up_to_the_cap_and_integral_floats_are_kept() -> None:
    usage, dropped = Usage.parse_response(
        {"prompt_tokens": MAX_TOKEN_COUNT, "completion_tokens": 5.0, "total_tokens": None})
    assert dropped == ()
    assert usage == Usage(prompt_tokens=MAX_TOKEN_COUNT, completion_tokens=5,
                          total_tokens=MAX_TOKEN_COUNT + 5)


@pytest.mark.parametrize(("raw", "dropped"), [
    (None, ()),
    ({}, ()),
    ("lots", ("usage",)),
    ([1, 2, 3], ("usage",)),
    ({"prompt_tokens_details": "cached", "completion_tokens_details": [1]},
     ("prompt_tokens_details", "completion_tokens_details")),
    ({"prompt_tokens": 10**30, "completion_tokens": -5, "total_tokens": "x"},
     ("prompt_tokens", "completion_tokens", "total_tokens")),
], ids=["null", "empty", "string", "list", "details not objects", "three at once"])
def test_what_was_dropped_names_every_field_in_order(raw: Any, dropped: tuple[str, ...]) -> None:
    assert Usage.parse_response(raw).dropped == dropped


def test_the_worst_a_reply_can_claim_still_sums_and_prices_over_a_million_rows() -> None:
    """The cap keeps a checkpoint's SUM() below SQLite's 2**63 - 1 even if every row of a
    million claims the most it may."""
    worst = Usage.from_response({"prompt_tokens": MAX_TOKEN_COUNT,
                                 "completion_tokens": MAX_TOKEN_COUNT})
    assert worst.total_tokens * 1_000_000 < 2**63 - 1
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (n INTEGER)")
    db.executemany("INSERT INTO t VALUES (?)", [(worst.total_tokens,)] * 1000)
    assert db.execute("SELECT SUM(n) FROM t").fetchone() == (worst.total_tokens * 1000,)
    assert cost_usd(worst, PRICES["gpt-4o-mini"]) == 750_000.0


def test_pricing_tolerates_a_model_name_with_a_lone_surrogate() -> None:
    assert resolve_price("gpt-4o-mini-\ud800") is None
    assert resolve_price("\ud800/gpt-4o-mini") == PRICES["gpt-4o-mini"]


# -- the client against a hostile server ------------------------------------------------------

MakeClient = Callable[..., Awaitable[tuple[Simulator, ChatClient]]]


@pytest.fixture(params=TRANSPORTS)
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    """``await make_client(faults=FaultConfig(...))``: a simulator on this loop and a
    ChatClient holding SECRET as its key, built as the runner builds it (no redactor),
    for each transport."""
    opened: list[tuple[Simulator, ChatClient]] = []

    async def make(**config: Any) -> tuple[Simulator, ChatClient]:
        sim = Simulator(SimulatorConfig(**config))
        url = await sim.start()
        chat = client_for(request.param, base_url=url, api_key=SECRET, timeout_s=5)
        opened.append((sim, chat))
        return sim, chat

    yield make
    for sim, chat in opened:
        await chat.aclose()
        await sim.stop()


def leaks(value: object) -> bool:
    """Whether SECRET is anywhere in a value's repr (which shows nested strings, the
    dataclass fields and headers alike)."""
    return SECRET in repr(value)


@pytest.mark.parametrize("status", [401, 502, 400])
async def test_an_error_that_echoes_the_key_is_redacted_everywhere_in_the_failure(
    make_client: MakeClient, status: int
) -> None:
    sim, chat = await make_client(faults=FaultConfig(echo_auth_status=status))
    attempt = await chat.complete(BODY)
    failure = attempt.failure
    assert failure is not None and failure.status == status
    assert failure.message == ("proxy: upstream refused the request (Authorization: Bearer "
                               f"{REDACTED})")
    assert isinstance(failure.body, dict)
    assert failure.body["error"]["message"] == failure.message
    assert (failure.code, failure.type) == ("proxy_error", "proxy_error")
    assert not leaks(failure) and not leaks(attempt)
    assert sim.stats.by_status == {status: 1}  # the server did get the key, and echoed it


async def test_a_reply_that_echoes_the_key_is_redacted_and_otherwise_intact(
    make_client: MakeClient,
) -> None:
    sim, chat = await make_client(faults=FaultConfig(
        reply_patch={"system_fingerprint": f"Bearer {SECRET}",
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": f"your key is {SECRET}."}}]},
        headers={"x-request-id": f"Bearer {SECRET}"}))
    attempt = await chat.complete(BODY)
    success = attempt.success
    assert success is not None
    assert success.body["choices"][0]["message"]["content"] == f"your key is {REDACTED}."
    assert success.body["system_fingerprint"] == f"Bearer {REDACTED}"
    assert success.request_id == f"Bearer {REDACTED}"
    assert success.body["usage"]["prompt_tokens"] > 0  # the rest as the server sent it
    assert not leaks(success.body) and not leaks(success.request_id)
    assert sim.stats.by_status == {200: 1}


async def test_a_plain_reply_is_passed_through_untouched(make_client: MakeClient) -> None:
    """The redactor is only asked about replies the key occurs in: a model's answer that
    mentions Bearer tokens is the user's data."""
    text = "Send it as Authorization: Bearer YOUR_API_KEY_HERE."
    _, chat = await make_client(faults=FaultConfig(reply_patch={"choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": text}}]}))
    success = (await chat.complete(BODY)).success
    assert success is not None
    assert success.body["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize(("choices", "why"), [
    ([], "no choice in it"),
    ([{"index": 0, "finish_reason": "stop"}], "its first choice has no message"),
    ([{"index": 0, "message": None}], "its first choice has no message"),
    (["text"], "its first choice has no message"),
    (None, "no choices list"),
], ids=["empty", "no message", "null message", "a string", "null"])
async def test_a_2xx_without_an_answer_is_a_retryable_decode_failure(
    make_client: MakeClient, choices: Any, why: str
) -> None:
    """A chat.completion with no choice, or whose first choice has no message, holds no
    answer: stored as a success, its row would never be sent again."""
    _, chat = await make_client(faults=FaultConfig(reply_patch={"choices": choices}))
    attempt = await chat.complete(BODY)
    assert attempt.success is None and attempt.failure is not None
    assert attempt.failure.kind is Kind.DECODE and attempt.failure.status == 200
    assert f"not a chat.completion ({why})" in attempt.failure.message
    assert decide(attempt.failure, 1, RetryPolicy()).action is Action.RETRY


async def test_a_lone_surrogate_in_a_reply_crashes_nothing_in_the_client_or_pricing(
    make_client: MakeClient,
) -> None:
    """Legal JSON ("\\ud800"), not encodable as UTF-8. Writing it out is the runner's
    business; the client must hand it over, and usage and price must still be read."""
    _, chat = await make_client(faults=FaultConfig(reply_patch={
        "model": "gpt-4o-mini\ud800",
        "usage": {"completion_tokens": "\ud800"},
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "odd \ud800 text"}}]}))
    success = (await chat.complete(BODY)).success
    assert success is not None
    assert success.body["choices"][0]["message"]["content"] == "odd \ud800 text"
    usage, dropped = Usage.parse_response(success.body["usage"])
    assert dropped == ("completion_tokens",) and usage.completion_tokens == 0
    assert resolve_price(success.body["model"]) is None
    assert cost_usd(usage, resolve_price(success.body["model"])) is None


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status", [200, 500])
async def test_a_body_nested_past_what_json_can_parse_is_a_failure_not_a_crash(
    status: int, transport: str,
) -> None:
    """The simulator's own encoder cannot nest this deep, so a bare aiohttp server on
    loopback sends it: real HTTP through the real SDK, like every other test here."""
    deep = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(status=status, body=deep, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    chat = client_for(transport, base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET,
                      timeout_s=5)
    try:
        attempt = await chat.complete(BODY)
    finally:
        await chat.aclose()
        await runner.cleanup()
    failure = attempt.failure
    assert failure is not None and failure.status == status
    assert failure.kind is (Kind.DECODE if status == 200 else Kind.HTTP)
    assert decide(failure, 1, RetryPolicy(), 0.0).action is Action.RETRY
    assert len(failure.message) <= 500
    assert seen == [f"Bearer {SECRET}"]


# -- whole runs through the CLI ------------------------------------------------------------------

MakeSim = Callable[..., tuple[Simulator, JobFiles]]


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[MakeSim]:
    """``make_sim(faults=FaultConfig(...), rpm=...)`` → a simulator of one's own and job
    files in tmp_path pointing at it. Stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def make(**config: Any) -> tuple[Simulator, JobFiles]:
            s = stack.enter_context(SimulatorThread(SimulatorConfig(**config)))
            return s, JobFiles(tmp_path, s.base_url)

        yield make


def run_cli(cli: Any, *args: Any, deadline_s: float = 60.0) -> Any:
    """``cli(*args)`` with a deadline: these servers used to stall runs forever, and a
    regression must fail the test rather than hang the suite. The deadline is far above
    what a run takes (well under a second), so it never decides a passing test."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(cli(*args))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        pytest.fail(f"batchgpt {' '.join(map(str, args))} still running after {deadline_s}s")
    if errors:
        raise errors[0]
    return result[0]


def succeeded_ids(job: JobFiles) -> list[str]:
    return sorted(line["custom_id"] for line in job.results())


def warnings_about(text: str, header: str) -> list[str]:
    return [line for line in text.splitlines() if f"ignoring the server's {header}" in line]


LYING_HEADERS = {
    "requests 0.001/min": ("x-ratelimit-limit-requests", "0.001"),
    "requests 1e-300/min": ("x-ratelimit-limit-requests", "1e-300"),
    "tokens 1/min": ("x-ratelimit-limit-tokens", "1"),
}


@pytest.mark.parametrize(("header", "value"), LYING_HEADERS.values(), ids=LYING_HEADERS.keys())
def test_a_run_against_a_server_lying_about_its_limits_completes_with_one_warning(
    make_sim: MakeSim, cli: Any, tmp_path: Path, header: str, value: str
) -> None:
    """Believed, 0.001 requests/min stalls the run after its first rows, and 1 token/min
    fails every row as request_too_large. The job states no limits, so the limiter would
    learn them from exactly these headers."""
    n = 12
    sim, job = make_sim(faults=FaultConfig(headers={header: value}))
    path = job.write(articles(n))
    log_file = tmp_path / "run.log"
    result = run_cli(cli, "run", path, "--log-file", log_file)
    assert result.exit_code == 0, result.output

    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    assert not job.failures.exists()
    assert sim.stats.requests == n and sim.stats.by_status == {200: n}
    (warning,) = warnings_about(result.output, header)
    assert value in warning and "keeping no limit" in warning
    assert len(warnings_about(log_file.read_text(), header)) == 1


def test_a_header_far_below_the_configured_limit_is_ignored_and_the_run_paced_as_configured(
    make_sim: MakeSim, cli: Any
) -> None:
    n = 20
    sim, job = make_sim(faults=FaultConfig(headers={"x-ratelimit-limit-requests": "5"}))
    path = job.write(articles(n), limits={"rpm": 60_000, "concurrency": 8})
    result = run_cli(cli, "run", path, "--json")
    assert result.exit_code == 0, result.output
    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    (warning,) = warnings_about(result.output, "x-ratelimit-limit-requests")
    assert "keeping the limit of 60,000 requests/min" in warning
    assert sim.stats.requests == n


def test_remaining_zero_on_every_answer_with_an_absurd_reset_does_not_stall_a_run(
    make_sim: MakeSim, cli: Any
) -> None:
    """The server enforces and states 6,000 RPM, and then says on every answer that
    nothing is left until a reset eleven years away."""
    n = 30
    sim, job = make_sim(rpm=6_000, faults=FaultConfig(headers={
        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999h",
        "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "soon"}))
    path = job.write(articles(n), retry={"max_attempts": 10, "initial_delay_s": 0.01,
                                         "max_delay_s": 0.05})
    result = run_cli(cli, "run", path)
    assert result.exit_code == 0, result.output
    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    assert sim.stats.by_status.get(200) == n
    assert "ignoring the server's" not in result.output  # remaining is not a limit


@pytest.mark.parametrize("hint", [{"retry-after": "1e308"}, {"retry-after-ms": "nan"},
                                  {"retry-after": "-5"},
                                  {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}],
                         ids=["1e308", "nan ms", "negative", "year 9999"])
def test_5xx_with_an_absurd_retry_after_are_retried_and_every_row_succeeds(
    make_sim: MakeSim, cli: Any, hint: dict[str, str]
) -> None:
    """Taken at face value, "retry-after: 1e308" left each 500'd row for a later run."""
    n = 20
    sim, job = make_sim(seed=3, faults=FaultConfig(server_error_rate=0.3, headers=hint))
    path = job.write(articles(n), retry={"max_attempts": 10, "initial_delay_s": 0.01,
                                         "max_delay_s": 0.02})
    result = run_cli(cli, "run", path)
    assert result.exit_code == 0, result.output
    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    assert sim.stats.by_status.get(500, 0) > 0  # the seed does fail some attempts
    assert sim.stats.requests == n + sim.stats.by_status[500]


def test_should_retry_false_fails_5xx_rows_after_one_attempt_for_good(
    make_sim: MakeSim, cli: Any
) -> None:
    n = 5
    sim, job = make_sim(faults=FaultConfig(server_error_rate=1.0,
                                           headers={"x-should-retry": "false"}))
    path = job.write(articles(n), retry=FAST_RETRY)
    result = run_cli(cli, "run", path)
    assert result.exit_code == 3, result.output
    assert sim.stats.requests == n  # no row was sent twice
    failed = job.failed()
    assert len(failed) == n
    assert all(f["error"]["attempts"] == 1 and f["error"]["retryable"] is False
               for f in failed)


def test_should_retry_true_retries_a_400_and_leaves_it_for_the_next_run(
    make_sim: MakeSim, cli: Any
) -> None:
    sim, job = make_sim(faults=FaultConfig(headers={"x-should-retry": "true"}))
    records = articles(4)
    records[1]["text"] = "This row is __POISON__ for the model."  # answered 400
    path = job.write(records, retry=FAST_RETRY)
    result = run_cli(cli, "run", path)
    assert result.exit_code == 6, result.output
    assert sim.stats.by_status == {200: 3, 400: FAST_RETRY["max_attempts"]}
    (failed,) = job.failed()
    assert failed["custom_id"] == "a0002"
    assert failed["error"]["attempts"] == FAST_RETRY["max_attempts"]
    assert failed["error"]["retryable"] is True


# -- secrets a server echoes ---------------------------------------------------------------------


def assert_secret_nowhere(result: Any, root: Path) -> None:
    """Not in stdout, not in stderr, not in any file under ``root`` (job, input, output,
    failures, summary, log, and the checkpoint's SQLite files, read as bytes)."""
    for stream in (result.stdout, result.stderr, result.output):
        assert SECRET not in stream
    files = [f for f in root.rglob("*") if f.is_file()]
    assert any(f.suffix == ".sqlite" for f in files)  # the checkpoint was looked at too
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MY_KEY", SECRET)
    return "MY_KEY"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_proxy_echoing_the_key_in_a_401_stops_the_run_and_the_key_is_written_nowhere(
    make_sim: MakeSim, cli: Any, tmp_path: Path, secret_key: str, log_format: str
) -> None:
    sim, job = make_sim(faults=FaultConfig(echo_auth_status=401))
    path = job.write(articles(6), api={"base_url": sim.base_url, "api_key_env": secret_key})
    result = run_cli(cli, "run", path, "--log-file", tmp_path / "run.log",
                     "--log-format", log_format, "--json", "-v")
    assert result.exit_code == 1, result.output

    assert "the API key was refused" in result.output
    assert f"Authorization: Bearer {REDACTED}" in result.output  # what the proxy said, clean
    summary = job.summary()
    assert summary["stopped"] == "authentication"
    assert f"Bearer {REDACTED}" in summary["message"]
    assert set(sim.stats.by_status) == {401}
    assert_secret_nowhere(result, tmp_path)


def test_a_proxy_echoing_the_key_in_502s_trips_the_breaker_and_the_key_is_written_nowhere(
    make_sim: MakeSim, cli: Any, tmp_path: Path, secret_key: str
) -> None:
    """Every first attempt gets the same 502: the circuit breaker stops the run after its
    threshold of them (tests/test_breaker.py), and its message, which quotes what the
    proxy said, quotes it redacted."""
    n = 4
    sim, job = make_sim(faults=FaultConfig(echo_auth_status=502))
    path = job.write(articles(n), retry=FAST_RETRY,
                     api={"base_url": sim.base_url, "api_key_env": secret_key})
    result = run_cli(cli, "run", path, "--log-file", tmp_path / "run.log", "-v")
    assert result.exit_code == 1, result.output

    assert sim.stats.by_status == {502: 5}
    summary = job.summary()
    assert summary["stopped"] == "circuit breaker"
    assert ("proxy: upstream refused the request (Authorization: "
            f"Bearer {REDACTED})") in summary["message"]
    assert summary["requests"]["pending"] == n
    assert_secret_nowhere(result, tmp_path)


def test_a_reply_and_request_id_echoing_the_key_are_written_redacted(
    make_sim: MakeSim, cli: Any, tmp_path: Path, secret_key: str
) -> None:
    n = 3
    sim, job = make_sim(faults=FaultConfig(
        reply_patch={"system_fingerprint": SECRET},
        headers={"x-request-id": f"Bearer {SECRET}"}))
    path = job.write(articles(n), api={"base_url": sim.base_url, "api_key_env": secret_key})
    result = run_cli(cli, "run", path, "--log-file", tmp_path / "run.log")
    assert result.exit_code == 0, result.output

    lines = job.results()
    assert len(lines) == n
    for line in lines:
        assert line["response"]["request_id"] == f"Bearer {REDACTED}"
        assert line["response"]["body"]["system_fingerprint"] == REDACTED
        assert line["response"]["body"]["choices"][0]["message"]["content"].startswith(
            "[sandbox] Summarize: Article number")
    assert_secret_nowhere(result, tmp_path)


# -- replies that would break storage -------------------------------------------------------------


def test_absurd_usage_in_every_reply_is_counted_as_0_and_the_run_completes(
    make_sim: MakeSim, cli: Any
) -> None:
    """10**30 prompt tokens used to overflow the checkpoint's INTEGER column and stop the
    run as a storage error."""
    n = 5
    sim, job = make_sim(faults=FaultConfig(reply_patch={"usage": {
        "prompt_tokens": 10**30, "completion_tokens": -7, "total_tokens": "many",
        "prompt_tokens_details": {"cached_tokens": 2.5},
        "completion_tokens_details": [{"reasoning_tokens": 3}]}}))
    path = job.write(articles(n))
    result = run_cli(cli, "run", path)
    assert result.exit_code == 0, result.output

    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    usage = job.summary()["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                  "cached_tokens", "reasoning_tokens")} == dict.fromkeys(
        ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
         "reasoning_tokens"), 0)
    # The reply itself is kept as the server sent it; only the counts were not believed.
    assert all(line["response"]["body"]["usage"]["prompt_tokens"] == 10**30
               for line in job.results())
    status = run_cli(cli, "status", path, "--json")
    assert json.loads(status.stdout)["usage"]["prompt_tokens"] == 0
    assert sim.stats.requests == n


def test_a_lone_surrogate_in_every_reply_is_written_and_the_run_completes(
    make_sim: MakeSim, cli: Any
) -> None:
    n = 3
    sim, job = make_sim(faults=FaultConfig(reply_patch={"choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": "odd \ud800 text"}}]}))
    path = job.write(articles(n))
    result = run_cli(cli, "run", path)
    assert result.exit_code == 0, result.output
    assert succeeded_ids(job) == [a["id"] for a in articles(n)]
    assert sim.stats.requests == n
