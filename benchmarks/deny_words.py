"""The output checks' cost: a 10,000-term deny list over 1 MB of replies, and a whole
``Checks.judge`` per reply (JSON parse, JSON Schema, regex, deny list).

Run: ``python benchmarks/deny_words.py [--terms 10000] [--mb 1] [--repeat 3]`` (about 30 s
with the regex peer; ``--no-regex`` skips it). No server: the checks are pure functions.

Printed, best of ``--repeat`` rounds, in the same process:

* building the matcher (pyahocorasick automaton) and scanning every reply with it
  (``DenyList.find``, what the runner calls: casefold + Aho–Corasick);
* the stdlib peer: one compiled regex alternation of the same casefolded terms,
  ``search`` over the same casefolded replies;
* ``json.loads`` of the same replies: the floor, since every reply is parsed once anyway;
* ``Checks.judge`` on chat.completion bodies holding the replies as JSON answers, with a
  JSON Schema, a regex and the deny list: the cost a reply pays on the event loop.

The issue's target: the deny list over 1 MB of replies in under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import time

from batchgpt.checks import Checks, DenyList
from batchgpt.config import JobConfig


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--terms", type=int, default=10_000)
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-regex", action="store_true", help="skip the (slow) regex peer")
    a = p.parse_args()
    rng = random.Random(1)
    terms = [_word(rng, rng.randint(5, 12)) for _ in range(a.terms - 2)] + ["机密", "内部资料"]
    replies: list[str] = []
    size = 0
    while size < a.mb * 1_000_000:
        text = " ".join(_word(rng, rng.randint(2, 9)) for _ in range(80)) + " 你好世界"
        replies.append(text)
        size += len(text.encode())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min); {len(terms):,} terms, {len(replies):,} "
          f"replies, {size / 1e6:.2f} MB")

    built = _best(lambda: DenyList(terms), a.repeat)
    deny = DenyList(terms)
    hits = sum(deny.find(r) is not None for r in replies)
    scan = _best(lambda: [deny.find(r) for r in replies], a.repeat)
    print(f"pyahocorasick: build {built:.3f} s, scan {scan:.3f} s ({hits} replies hit)")

    floor = _best(lambda: [json.loads(json.dumps(r)) for r in replies], a.repeat)
    print(f"json round trip of the same replies (floor): {floor:.3f} s")

    if not a.no_regex:
        t = time.perf_counter()
        pattern = re.compile("|".join(re.escape(w.casefold())
                                      for w in sorted(terms, key=len, reverse=True)))
        rx_build = time.perf_counter() - t
        t = time.perf_counter()
        rx_hits = sum(pattern.search(r.casefold()) is not None for r in replies)
        rx_scan = time.perf_counter() - t
        print(f"regex alternation: build {rx_build:.3f} s, scan {rx_scan:.3f} s "
              f"({rx_hits} hit) = {rx_scan / scan:.0f}x pyahocorasick")

    schema = {"type": "object", "properties": {"summary": {"type": "string"},
                                               "label": {"enum": ["a", "b"]}},
              "required": ["summary", "label"]}
    job = JobConfig.model_validate({"input": "i.jsonl", "output": "o.jsonl", "validate": {
        "json_schema": schema, "regex": "summary", "deny_words": terms}})
    checks = Checks.for_job(job)
    assert checks is not None
    request = {"model": "m", "messages": []}
    bodies = [{"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": json.dumps({"summary": r, "label": "a"})}}]}
        for r in replies]
    judged = _best(lambda: [checks.judge(b, request) for b in bodies], a.repeat)
    print(f"Checks.judge (JSON + schema + regex + {len(terms):,}-term deny list): "
          f"{judged:.3f} s for {len(bodies):,} replies = {judged / len(bodies) * 1e6:.0f} µs "
          "a reply")
    print(f"target: deny list over {a.mb:g} MB < 1 s: {'met' if scan < 1 else 'MISSED'} "
          f"({scan:.3f} s)")


if __name__ == "__main__":
    main()
