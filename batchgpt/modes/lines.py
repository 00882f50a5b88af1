"""The output and failures files' lines, built one way for every mode: a result is a
Batch API output line whose ``id`` is the answer tag of its row's request
(:func:`~batchgpt.store.output_log.line_id`), a failure the same with the error batchgpt
recorded. :mod:`batchgpt.runner` builds the same shapes for online rows."""

from __future__ import annotations

from typing import Any

from batchgpt.retry import Failure
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
                 transient: bool) -> bytes:
    """A failed row's line in the failures file: the provider's answer (when there was
    one) and batchgpt's verdict on it."""
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
            "attempts": attempts,
            "retryable": transient,
        },
    })
