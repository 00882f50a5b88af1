"""The key and the base URL a run sends with, checked before the first request.

Settings arrive from places the user did not write: an ``EnvironmentFile`` saved with
Windows line endings leaves a ``\\r`` at the end of the key, a key pasted from a document
brings a smart quote, a URL copied from a browser carries ``user:password@``. Each of them
used to surface as "internal error" and a traceback at the first request; here each is a
:class:`~batchgpt.errors.ConfigError` that says what is wrong and where (the variable's
name, a character's position) and never repeats the key, the URL or any part of them.

Light on purpose: no ``openai`` import, so the job file's validation (``config.py``) can
use the URL check without loading the SDK.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from batchgpt.errors import ConfigError

if TYPE_CHECKING:
    from batchgpt.config import ApiSettings

SANDBOX_KEY = "sk-sandbox-not-a-real-key"
# What a keyless local server (vLLM, llama.cpp) gets: the SDK insists on some key.
NO_KEY_REQUIRED = "sk-no-key-required"
OPENAI_BASE_URL = "https://api.openai.com/v1"

# Environment variables the SDK reads on its own when the job file leaves them out, and
# sends as request headers.
_HEADER_ENV = {"organization": "OPENAI_ORG_ID", "project": "OPENAI_PROJECT_ID"}


def resolve_credentials(api: ApiSettings, sandbox_url: str | None) -> tuple[str | None, str]:
    """(base_url, api_key) for a run; None as the base URL means OpenAI's.

    Raises ConfigError, naming the environment variable and never its value, when the key
    or ``OPENAI_BASE_URL`` cannot be sent as they are."""
    if sandbox_url is not None:
        return sandbox_url, SANDBOX_KEY
    base_url = api.base_url  # checked when the job file was validated
    if base_url is None and "OPENAI_BASE_URL" in os.environ:
        env_url = os.environ["OPENAI_BASE_URL"]
        if env_url:
            problem = base_url_problem(env_url)
            if problem is not None:
                raise ConfigError(
                    f"the environment variable OPENAI_BASE_URL (used because the job file "
                    f"sets no api.base_url) {problem}"
                )
            base_url = env_url
        else:  # set but empty: the SDK would take "" as the URL, not fall back to OpenAI
            base_url = OPENAI_BASE_URL
    for setting, name in _HEADER_ENV.items():
        value = os.environ.get(name)
        if getattr(api, setting) is None and value:
            problem = header_value_problem(value)
            if problem is not None:
                raise ConfigError(
                    f"the environment variable {name} (sent as the {setting} header because "
                    f"the job file sets no api.{setting}) {problem}"
                )
    key = os.environ.get(api.api_key_env, "")
    if not key:
        if base_url is not None and api.api_key_env == "OPENAI_API_KEY":
            # Local servers (vLLM, llama.cpp) usually take any key; the SDK insists on one.
            return base_url, NO_KEY_REQUIRED
        raise ConfigError(
            f"no API key: set the environment variable {api.api_key_env} (named by "
            "api.api_key_env in the job file), or run with --sandbox to try the built-in "
            "simulator"
        )
    problem = key_problem(key)
    if problem is not None:
        raise ConfigError(
            f"the API key in the environment variable {api.api_key_env} (named by "
            f"api.api_key_env) {problem}"
        )
    return base_url, key


def sent_no_key(key: str) -> bool:
    """The run sends the placeholder, not a key: a base URL is set and the key variable
    is empty (see :func:`resolve_credentials`)."""
    return key == NO_KEY_REQUIRED


def no_key_message(api_key_env: str, url: str) -> str:
    """What a 401 means when no key was sent. The server's own words ("Incorrect API key
    provided: sk-***ired") would blame a key the user never set."""
    return (
        f"no API key was set: the environment variable {api_key_env} (named by "
        f"api.api_key_env) is empty or unset, and the server at {url} requires a key "
        f"(it answered 401). Set {api_key_env} and rerun; nothing more is sent, and "
        "finished rows are kept."
    )


def key_problem(key: str) -> str | None:
    """What makes ``key`` unsendable as a bearer token, or None. Names a position and a
    kind of character, never a character of the key."""
    bad = bad_character(key, allow_space=False, allow_non_ascii=False)
    if bad is None:
        return None
    return (
        f"contains {bad}; an API key is printable ASCII with no spaces: check how the "
        "variable is set (a file saved with Windows line endings leaves a carriage return "
        "at the end, a key pasted from a document may bring a smart quote or a space)"
    )


def header_value_problem(value: str) -> str | None:
    """What makes ``value`` unsendable as an HTTP header value (an organization or
    project id), or None; never quotes the value."""
    bad = bad_character(value, allow_space=False, allow_non_ascii=False)
    if bad is None:
        return None
    return f"contains {bad}; it is sent as an HTTP header, which takes printable ASCII only"


def base_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as the base URL of an OpenAI-compatible server, or None.

    The message never quotes the URL: a URL may carry a password or a token."""
    bad = bad_character(url, allow_space=False, allow_non_ascii=True)
    if bad is not None:
        return f"contains {bad}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return ("is not a valid URL (a malformed host or port); write it like "
                "https://host:port/v1")
    if parts.scheme not in ("http", "https") or not url.lower().startswith(
        ("http://", "https://")
    ):
        return "must start with http:// or https:// (e.g. http://localhost:8000/v1)"
    if "@" in parts.netloc:
        return (
            "has a user name or password in it (scheme://user:password@host); put the key "
            "in the environment variable named by api.api_key_env instead, never in the URL"
        )
    if not parts.hostname:
        return "has no host; write it like https://host:port/v1"
    if "?" in url or "#" in url:
        return "has a query (?...) or a fragment (#...); a base URL is scheme://host[:port]/path"
    return None


def bad_character(value: str, *, allow_space: bool, allow_non_ascii: bool) -> str | None:
    """The first character that has no place in a key, header or URL, described by its
    kind and 1-based position ("a line break at position 52"), or None."""
    for position, char in enumerate(value, 1):
        code = ord(char)
        if char in "\r\n":
            kind = "a line break"
        elif char == "\t":
            kind = "a tab"
        elif code < 32 or code == 127 or 0x80 <= code <= 0x9F:
            kind = "a control character"
        elif char == " " and not allow_space:
            kind = "a space"
        elif code > 127 and not allow_non_ascii:
            kind = "a non-ASCII character"
        elif code > 127 and char.isspace():
            kind = "a non-ASCII space"
        else:
            continue
        where = " (the last character)" if position == len(value) and position > 1 else ""
        if position == 1 and len(value) > 1:
            where = " (the first character)"
        return f"{kind} at position {position}{where}"
    return None
