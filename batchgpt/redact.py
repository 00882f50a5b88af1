"""Keeping a run's secrets out of everything batchgpt writes, including what a server echoes.

batchgpt never writes the API key itself, but it stores what servers say: an error's
message and body go to the failures file and the checkpoint, a stop's message to the log,
stderr and the summary, a reply to the output. A proxy that answers
``401 upstream refused (Authorization: Bearer sk-…)`` would put the key into all of them.
So every failure the client builds, and every reply in which the key occurs, goes through a
:class:`Redactor` built from the run's secrets before anyone else sees it::

    redact = Redactor([api_key])
    redact.text("refused: Bearer sk-live-0123456789")   # 'refused: Bearer [REDACTED]'
    redact.value({"error": {"message": "... sk-live-0123456789 ..."}})  # nested JSON
    redact.found_in(raw_response_bytes)                   # cheap check for the hot path

What it replaces, and why:

* each secret of at least ``MIN_SECRET_CHARS`` characters, in the forms a server may echo
  it: as is, JSON-escaped (``\\u00e9``, ``\\/``), and percent-encoded. Shorter "secrets"
  (``""``, ``"none"``, a placeholder) are ignored: replacing them would mangle ordinary
  text, and they protect nothing;
* any ``Bearer <token>`` of 8 characters or more, whether or not it is one of the
  secrets: a proxy may echo a truncated key, or the key it uses upstream, which
  batchgpt never knew. Only text the redactor is asked to clean is touched, and the
  client asks for a reply's body only when a secret occurs in it, so a model's answer
  that talks about Bearer tokens is left alone.

The redactor is immutable and never shows its secrets (``repr`` gives only a count).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote

__all__ = ["MIN_SECRET_CHARS", "REDACTED", "Redactor"]

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 8

# RFC 6750's b64token; "Bearer" in any case, then blanks. Group 1 keeps the original
# spelling and spacing so the message still reads as the server wrote it.
# At least MIN_SECRET_CHARS long, like a secret, so prose ("Bearer auth") is left alone.
_BEARER = re.compile(r"(\bbearer[ \t]+)[A-Za-z0-9\-._~+/]{8,}=*", re.IGNORECASE)
_BEARER_BYTES = re.compile(rb"(\bbearer[ \t]+)[A-Za-z0-9\-._~+/]{8,}=*", re.IGNORECASE)
_REDACTED_BYTES = REDACTED.encode()
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")


def _forms(secret: str) -> set[str]:
    """The spellings of ``secret`` a server may send back: as is, JSON-escaped (ASCII
    and not, with and without ``\\/``) and percent-encoded."""
    escaped = json.dumps(secret)[1:-1]
    unicode = json.dumps(secret, ensure_ascii=False)[1:-1]
    forms = {secret, escaped, escaped.replace("/", "\\/"), unicode,
             unicode.replace("/", "\\/")}
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate has no URL spelling
        forms.add(quote(secret, safe="", errors="surrogateescape"))
    return forms


def _encode(text: str) -> bytes | None:
    # os.environ decodes undecodable bytes as lone surrogates (surrogateescape): encode
    # them back to the bytes that go over the wire.
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


class Redactor:
    """Replaces a run's secrets with ``[REDACTED]`` in text, bytes and parsed JSON."""

    __slots__ = ("_needles", "_secrets", "_texts")

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        kept = tuple(dict.fromkeys(
            s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS))
        forms: set[str] = set()
        for secret in kept:
            forms |= _forms(secret)
        # Longest first: a secret that contains another is replaced whole.
        texts = sorted(forms, key=lambda f: (-len(f), f))
        self._secrets = kept
        self._texts = tuple(texts)
        self._needles = tuple(dict.fromkeys(
            b for b in (_encode(t) for t in texts) if b is not None))

    def with_secrets(self, *secrets: str | None) -> Redactor:
        """A redactor for these secrets as well as this one's."""
        return Redactor((*self._secrets, *secrets))

    @property
    def has_secrets(self) -> bool:
        return bool(self._secrets)

    def found_in(self, data: bytes) -> bool:
        """Whether a secret occurs in ``data``: a few ``bytes.find`` calls, for the hot
        path, where a reply is scanned before it is parsed. Bearer tokens that are not
        one of the secrets are not looked for here."""
        return any(data.find(needle) >= 0 for needle in self._needles)

    def found_in_json(self, data: bytes) -> bool:
        r"""Whether parsing the JSON ``data`` could yield a secret: :meth:`found_in`, or a
        printable ASCII character written as a ``\u00XX`` escape, which no ordinary JSON
        encoder produces (they escape only control and non-ASCII characters) and which is
        how a server would hide a key from a byte search. Plain ASCII replies cost one
        more ``bytes.find``; non-ASCII ones a short regex scan."""
        if not self._needles:
            return False
        if self.found_in(data):
            return True
        return data.find(b"\\u00") >= 0 and _ASCII_ESCAPE.search(data) is not None

    def text(self, text: str) -> str:
        """``text`` with every secret and every ``Bearer <token>`` replaced."""
        for form in self._texts:
            if form in text:
                text = text.replace(form, REDACTED)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)

    def data(self, data: bytes) -> bytes:
        """The same for bytes (a raw body that is not text, or not yet decoded)."""
        for needle in self._needles:
            if needle in data:
                data = data.replace(needle, _REDACTED_BYTES)
        return _BEARER_BYTES.sub(lambda m: m.group(1) + _REDACTED_BYTES, data)

    def value(self, value: object) -> object:
        """A copy of parsed JSON (or any nest of dicts, lists and tuples) with every
        string, key or value, cleaned by :meth:`text` and bytes by :meth:`data`; other
        values unchanged. A structure too deep to walk is replaced whole: what cannot be
        checked is not kept."""
        try:
            return self._walk(value)
        except RecursionError:
            return REDACTED

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``headers`` itself when no value holds a secret or a Bearer token (the usual
        case, and it keeps the case-insensitive mapping), else a cleaned plain dict."""
        cleaned = {k: self.text(v) for k, v in headers.items()}
        if all(cleaned[k] == v for k, v in headers.items()):
            return headers
        return cleaned

    def _walk(self, value: object) -> object:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self._walk(k): self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        if isinstance(value, bytes):
            return self.data(value)
        return value

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._secrets)} secret(s)>"
