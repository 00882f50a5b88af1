"""Request hashes tie a stored result to the request that produced it: they must not
change for any input that is valid today, or every resume sends its rows again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchgpt.config import JobConfig
from batchgpt.source import InputFile, RowBuilder, request_hash

# -- request hashes: unchanged for every input valid before input_format ------------------------
# Digests computed with the code before input_format, hostile-input checks and the template
# splitter (commit 5da9213). A changed digest makes every resume send its rows again.
PINNED = [
    ("template", {"prompt": "Summarize: {text}", "params": {"max_tokens": 50}},
     {"id": "a0001", "text": "Article number 1 reports on local news. More text here."},
     "a0001", "cc846f0e2b15cc33e224f0db501dbdd0"),
    ("template-fields", {"prompt": "{title} ({year}) {{literal}}\n\n{text} {tags} {meta}",
                         "system": "You summarize.", "params": {"temperature": 0.2}},
     {"id": 7, "title": "Ünïcødé ✓ 日本", "year": 2024, "text": "a \"quoted\"\n\ttext \u2028",
      "tags": ["x", 1.5, None, True], "meta": {"b": 1, "a": [{}]}},
     "7", "883e448470edc96d99d787cb089b7bbb"),
    ("template-no-prompt",
     {"params": {"max_tokens": 5, "response_format": {"type": "json_object"}}},
     {"id": "n1", "text": "plain \U0001f600"}, "n1", "c00b8d646c9d84694389df3cb6beddd3"),
    ("template-spec", {"prompt": "{text!r} / {text:.5} / {text:>8}|"},
     {"id": "s1", "text": "abcdefghij"}, "s1", "ae02def5d30bd12841d65e0ea91439bd"),
    ("chat", {"system": "Be brief.", "params": {"max_tokens": 9}},
     {"id": "c1", "messages": [{"role": "user", "content": "hi ✓"}], "temperature": 0.3,
      "metadata": {"x": 1}}, "c1", "166834c83fc89988368b2dfde3abb10b"),
    ("chat-own-system", {"system": "Be brief."},
     {"id": "c2", "messages": [{"role": "developer", "content": "dev"},
                               {"role": "user", "content": [{"type": "text", "text": "t"}]}]},
     "c2", "b408d3c69a227999ac5c76c58486afc7"),
    ("batch", {"params": {"max_tokens": 9}},
     {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "seed": 1}},
     "r1", "31b98f6be7c449f2ded67ca785c3fbca"),
]


@pytest.mark.parametrize(("config", "record", "custom_id", "digest"),
                         [case[1:] for case in PINNED], ids=[case[0] for case in PINNED])
def test_request_hashes_of_valid_inputs_are_unchanged(
    tmp_path: Path, config: dict[str, Any], record: dict[str, Any], custom_id: str,
    digest: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    job = JobConfig.model_validate({"input": path, "output": tmp_path / "out.jsonl",
                                    "model": "gpt-4o-mini", **config})
    (scanned,) = InputFile(job).scan()  # the template splice, for template records
    row = RowBuilder(job).build(record, 1)  # the full request
    assert (scanned.custom_id, scanned.request_hash) == (custom_id, digest)
    assert (row.custom_id, row.request_hash, request_hash(row.body)) == (custom_id, digest,
                                                                         digest)
    assert scanned.row == row
