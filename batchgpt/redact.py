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
* a long part of a secret: any run of at least ``max(16, 60 % of its length)``
  consecutive characters of it (:func:`partial_min`), however it was cut (a proxy that
  echoes the key truncated to its first 32 characters, an error quoting ``key=sk-…``
  with its end cut off, or its start). A shorter part is left alone: it leaves at least
  40 % of the key unknown, too much to guess, and a lower bar would start to mangle
  ordinary text (16 characters: no word or number in a reply matches a key's 16 by
  chance). A secret of 16 characters or fewer is only redacted whole;
* any ``Bearer <token>`` of 8 characters or more, whether or not it is one of the
  secrets: a proxy may echo the key it uses upstream, which batchgpt never knew. Only
  text the redactor is asked to clean is touched, and the client asks for a reply's body
  only when a secret occurs in it, so a model's answer that talks about Bearer tokens is
  left alone.

Finding long parts costs the hot path nothing extra: every run of ``m`` (the minimum) or
more characters of a secret of ``n`` contains its middle ``secret[n-m:m]`` (its *core*,
``2m - n`` characters, 7 for a 35-character key, 34 for a 164-character one), so
:meth:`Redactor.found_in` looks for the core instead of the whole secret, one
``bytes.find`` each as before; a hit is extended both ways, character by character,
only when text is cleaned.

The redactor is immutable and never shows its secrets (``repr`` gives only a count).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import AnyStr, Generic
from urllib.parse import quote

__all__ = ["MIN_SECRET_CHARS", "PARTIAL_MIN_CHARS", "PARTIAL_PERCENT", "REDACTED", "Redactor",
           "partial_min"]

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 8
# A run of a secret's characters this long, and at least this share of the secret, is
# redacted wherever it is found (see the module's docstring).
PARTIAL_MIN_CHARS = 16
PARTIAL_PERCENT = 60

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


def partial_min(length: int) -> int:
    """The fewest consecutive characters of a secret of ``length`` characters that are
    redacted on their own: 16, or 60 % of the secret rounded up, whichever is more (the
    whole secret, when that is as long as the secret)."""
    share = -(-length * PARTIAL_PERCENT // 100)  # rounded up, in integers: no 21.000…04
    return min(length, max(PARTIAL_MIN_CHARS, share))


class _Pattern(Generic[AnyStr]):
    """One spelling of a secret (text or bytes), and how to find its long parts."""

    __slots__ = ("core", "least", "offsets", "whole")

    def __init__(self, whole: AnyStr) -> None:
        n = len(whole)
        least = partial_min(n)
        self.whole: AnyStr = whole
        self.least = least
        # Every run of `least` or more characters of `whole` contains this middle part.
        self.core: AnyStr = whole[n - least:least] if least < n else whole
        size = len(self.core)
        self.offsets = tuple(i for i in range(n - size + 1) if whole.startswith(self.core, i))

    def spans(self, text: AnyStr) -> list[tuple[int, int]]:
        """Where ``text`` holds runs of at least ``least`` characters of the secret: each
        occurrence of the core, extended both ways while the characters agree."""
        core, whole, size = self.core, self.whole, len(self.core)
        out: list[tuple[int, int]] = []
        i = text.find(core)
        while i >= 0:
            best = (i, i)
            for at in self.offsets:  # where the core sits in the secret (nearly always once)
                left = 0
                while left < min(at, i) and text[i - 1 - left] == whole[at - 1 - left]:
                    left += 1
                right, room = 0, min(len(whole) - at - size, len(text) - i - size)
                while right < room and text[i + size + right] == whole[at + size + right]:
                    right += 1
                if left + size + right > best[1] - best[0]:
                    best = (i - left, i + size + right)
            if best[1] - best[0] >= self.least:
                out.append(best)
                i = text.find(core, best[1])
            else:
                i = text.find(core, i + 1)
        return out


def _cut(text: AnyStr, spans: list[tuple[int, int]], mark: AnyStr) -> AnyStr:
    """``text`` with every span (merged where they overlap) replaced by ``mark``."""
    spans.sort()
    pieces: list[AnyStr] = []
    done = 0
    for start, end in spans:
        if end <= done:
            continue
        pieces.append(text[done:max(done, start)])
        pieces.append(mark)
        done = end
    pieces.append(text[done:])
    return mark[:0].join(pieces)


def _clean(text: AnyStr, forms: tuple[AnyStr, ...], parts: tuple[_Pattern[AnyStr], ...],
           mark: AnyStr, bearer: re.Pattern[AnyStr]) -> AnyStr:
    """:meth:`Redactor.text` and :meth:`Redactor.data`: every spelling of a secret in
    ``forms`` replaced by ``mark``, then every long part of one (``parts``), then every
    ``Bearer <token>``."""
    for form in forms:
        if form in text:
            text = text.replace(form, mark)
    spans = [span for part in parts if part.core in text for span in part.spans(text)]
    if spans:
        text = _cut(text, spans, mark)
    return bearer.sub(lambda m: m.group(1) + mark, text)


class Redactor:
    """Replaces a run's secrets with ``[REDACTED]`` in text, bytes and parsed JSON."""

    __slots__ = ("_byte_parts", "_needles", "_secrets", "_text_parts", "_texts")

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
        self._text_parts = tuple(_Pattern(t) for t in texts)
        self._byte_parts = tuple(_Pattern(b) for b in self._needles)

    @classmethod
    def for_key(cls, api_key_env: str) -> Redactor:
        """A redactor of the run's API key: the value of the environment variable
        ``api_key_env`` (a job's ``api.api_key_env``), if it is set."""
        return cls([os.environ.get(api_key_env)])

    def with_secrets(self, *secrets: str | None) -> Redactor:
        """A redactor for these secrets as well as this one's."""
        return Redactor((*self._secrets, *secrets))

    @property
    def has_secrets(self) -> bool:
        return bool(self._secrets)

    def found_in(self, data: bytes) -> bool:
        """Whether a secret, or a long part of one, may occur in ``data``: one
        ``bytes.find`` of each spelling's core, for the hot path, where a reply is scanned
        before it is parsed (true now and then for a short core that is not part of a
        long run: cleaning then changes nothing). Bearer tokens that are not one of the
        secrets are not looked for here."""
        return any(data.find(part.core) >= 0 for part in self._byte_parts)

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
        """``text`` with every secret, every long part of one and every
        ``Bearer <token>`` replaced."""
        return _clean(text, self._texts, self._text_parts, REDACTED, _BEARER)

    def data(self, data: bytes) -> bytes:
        """The same for bytes (a raw body that is not text, or not yet decoded)."""
        return _clean(data, self._needles, self._byte_parts, _REDACTED_BYTES, _BEARER_BYTES)

    def value(self, value: object) -> object:
        """A copy of parsed JSON (or any nest of dicts, lists and tuples) with every
        string, key or value, cleaned by :meth:`text` and bytes by :meth:`data`; other
        values unchanged. A structure too deep to walk is replaced whole: what cannot be
        checked is not kept."""
        try:
            return self._walk(value)
        except RecursionError:
            return REDACTED

    def clean(self, value: object) -> object:
        """What a command prints of the user's own data (``show``'s request, the dry run's
        sample request): ``value`` itself, untouched, unless a secret or a long part of
        one occurs in one of its strings (a key pasted into ``params``); then
        :meth:`value` of it. So a prompt that merely mentions ``Bearer`` tokens is shown
        as it is sent."""
        try:
            found = self._found_in_strings(value)
        except RecursionError:
            found = True
        return self.value(value) if found else value

    def _found_in_strings(self, value: object) -> bool:
        if isinstance(value, str):
            return any(part.core in value for part in self._text_parts)
        if isinstance(value, Mapping):
            return any(self._found_in_strings(k) or self._found_in_strings(v)
                       for k, v in value.items())
        if isinstance(value, list | tuple):
            return any(self._found_in_strings(v) for v in value)
        if isinstance(value, bytes):
            return self.found_in(value)
        return False

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
