"""Token estimates without a tokenizer.

OpenAI counts a request toward its tokens-per-minute limit *before* it runs, from the
request's character count (about four characters a token) plus the output it may produce
(``max_tokens`` or ``max_completion_tokens``, times ``n``). Pacing by the same estimate
paces the way the server counts; a tokenizer would be more exact about the prompt but
not about what the server charges against the limit, and tiktoken needs a download.

The simulator uses these same functions to enforce its limits and to report ``usage``,
so a test's hand arithmetic and the server agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
# When a request sets no output cap, the limiter still has to reserve something for the
# reply; OpenAI's own accounting then uses the prompt estimate alone, but a reply is
# rarely free, so we reserve a modest default.
DEFAULT_OUTPUT_RESERVE = 256


def text_tokens(text: str) -> int:
    """Tokens for a piece of text: about four characters a token for ASCII. CJK text is
    denser (about one token a character): each UTF-8 continuation byte adds half a
    character's weight, which gives a CJK character (3 bytes) a whole token. Computed from
    lengths only, so it stays cheap on a million-row resume."""
    if not text:
        return 0
    n = len(text)
    if text.isascii():
        return -(-n // CHARS_PER_TOKEN)
    extra = len(text.encode("utf-8")) - n
    return -(-(n + (3 * extra) // 2) // CHARS_PER_TOKEN)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return str(content)


def prompt_tokens(messages: Any) -> int:
    """Estimated prompt tokens for a ``messages`` list (what ``usage.prompt_tokens`` reports
    in the simulator)."""
    total = TOKENS_PER_REPLY
    if not isinstance(messages, list):
        return total
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if isinstance(message, Mapping):
            total += text_tokens(_content_text(message.get("content")))
            name = message.get("name")
            if isinstance(name, str):
                total += text_tokens(name)
    return total


def output_cap(body: Mapping[str, Any]) -> int | None:
    """The most output tokens a request asks for, over all ``n`` choices, or None."""
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    if cap is None:
        return None
    n = body.get("n") or 1
    try:
        return int(cap) * max(1, int(n))
    except (TypeError, ValueError):
        return None


def request_cost(body: Mapping[str, Any], default_output: int = DEFAULT_OUTPUT_RESERVE) -> int:
    """Tokens a request counts against TPM: the prompt estimate plus its output cap (or a
    default reserve when it sets none)."""
    cap = output_cap(body)
    if cap is None:
        cap = default_output * max(1, int(body.get("n") or 1))
    return prompt_tokens(body.get("messages")) + cap
