"""The output and failures files' lines, built one way for every mode: a result is a
Batch API output line whose ``id`` is the answer tag of its row's request
(:func:`~batchgpt.store.output_log.line_id`), a failure the same with the error batchgpt
recorded, for batch and online rows alike. And the other
way: a line of the provider's Batch API output or error file, read back."""

from __future__ import annotations

import json
from typing import Any

from batchgpt.retry import Failure, Kind
from batchgpt.store.output_log import encode_line, line_id


def result_line(custom_id: str, request_hash: str, request_id: str | None,
                body: dict[str, Any]) -> bytes:
    """A succeeded row's output line: the chat.completion as the provider sent it."""
    return encode_line({
        "id": line_id(custom_id, request_hash),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    })


def failure_line(custom_id: str, request_hash: str, failure: Failure, attempts: int,
                 transient: bool, extra: dict[str, Any] | None = None) -> bytes:
    """A failed row's line in the failures file: the provider's answer (when there was
    one) and batchgpt's verdict on it; ``extra``: more of the verdict (an output check's
    reason, detail, model and re-asks)."""
    response = None
    if failure.status is not None:
        response = {"status_code": failure.status, "request_id": failure.request_id,
                    "body": failure.body}
    return encode_line({
        "id": line_id(custom_id, request_hash),
        "custom_id": custom_id,
        "response": response,
        "error": {
            "code": failure.error_code,
            "message": failure.message,
            "status": failure.status,
            "type": failure.type,
            **(extra or {}),
            "attempts": attempts,
            "retryable": transient,
        },
    })


def failure_of(response: object, error: object) -> Failure:
    """An error line of the provider's error file as the Failure an online attempt with
    the same answer would be."""
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        request_id = response.get("request_id")
        return Failure(Kind.HTTP, str(err.get("message") or f"HTTP {response['status_code']}"),
                       response["status_code"], _text(err.get("code")), _text(err.get("type")),
                       body=body, request_id=request_id if isinstance(request_id, str)
                       else None, param=_text(err.get("param")))
    err = error if isinstance(error, dict) else {}
    return Failure(Kind.DECODE, str(err.get("message") or "the provider gave no answer for "
                                    "this row"), None, _text(err.get("code")) or
                   "invalid_response")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """A provider file's line as an object, or None (not JSON, not an object): a line
    batchgpt cannot read is no row's answer."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
