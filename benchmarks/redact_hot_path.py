"""The redactor's cost on the hot path: the check every reply goes through.

Run: ``python benchmarks/redact_hot_path.py [--repeat 7]`` (a few seconds, no server).

``ChatClient.complete`` calls ``Redactor.found_in_json(content)`` on every 2xx body before
keeping it: a ``bytes.find`` per spelling of the key, plus one for ``\\u00``. Since long
*parts* of the key are redacted too (a proxy echoing it truncated), the search is for each
spelling's core (the middle every long part contains; 8 bytes for a 36-character key)
instead of the whole key. This measures, per reply, for a simulator reply (~0.5 kB) and a
long one (~16 kB of text):

* ``found_in_json`` as it is;
* the same check with the whole key as the needle (what it was before parts were looked
  for), to show what the change costs;
* ``json.loads`` of the same reply: the client parses every reply once anyway, so it is
  the floor the check is compared to.

Each figure is the best of ``--repeat`` rounds of ``timeit`` (ns per reply), in the same
process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import re
import timeit

from batchgpt.redact import Redactor
from batchgpt.simulator import completion_for

KEY = "sk-proj-" + "Q7vX2mK9pL4nR8sT1wY6zA3bC5dE0fGh" * 5  # a 168-character project key
SHORT_KEY = "sk-proj-SECRETSECRET1234567890abcdef"
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")


def replies() -> dict[str, bytes]:
    body = {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Summarize: Article 1 reports. More."}]}
    small = completion_for(body)
    large = json.loads(json.dumps(small))
    large["choices"][0]["message"]["content"] = "Lorem ipsum dolor sit amet. " * 580
    return {"reply 0.5 kB": json.dumps(small).encode(), "reply 16 kB": json.dumps(large).encode()}


def whole_key_check(needles: tuple[bytes, ...]) -> object:
    """found_in_json as it was: the whole key's spellings, then the escape check."""

    def check(data: bytes) -> bool:
        if any(data.find(n) >= 0 for n in needles):
            return True
        return data.find(b"\\u00") >= 0 and _ASCII_ESCAPE.search(data) is not None

    return check


def best_ns(stmt: object, data: bytes, number: int, repeat: int) -> float:
    timer = timeit.Timer(lambda: stmt(data))  # type: ignore[operator]
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    print(f"{'key':>8} {'reply':>13} {'found_in_json':>14} {'whole key':>10} "
          f"{'json.loads':>11} {'check/loads':>12}")
    for key in (SHORT_KEY, KEY):
        redact = Redactor([key])
        old = whole_key_check((key.encode(),))
        for name, data in replies().items():
            assert not redact.found_in_json(data)
            number = args.number if len(data) < 4096 else args.number // 10
            now = best_ns(redact.found_in_json, data, number, args.repeat)
            before = best_ns(old, data, number, args.repeat)
            floor = best_ns(json.loads, data, number // 4, args.repeat)
            print(f"{len(key):>8} {name:>13} {now:>11.0f} ns {before:>7.0f} ns "
                  f"{floor:>8.0f} ns {now / floor:>11.1%}")


if __name__ == "__main__":
    main()
