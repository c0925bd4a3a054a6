"""Masking secrets in text, URLs and DSNs shown in logs, errors and `doctor`."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

#: scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?=@)", re.I)
#: password=secret, token=secret, sslpassword=... (libpq key=value DSNs, query strings).
_KEY_VALUE = re.compile(
    r"(?P<head>\b(?:[a-z_]*password|passwd|secret|token|api[_-]?key)\s*[=:]\s*)"
    r"(?P<quote>['\"]?)[^\s&'\",;]+(?P=quote)", re.I)


def redact_secrets(text: str) -> str:
    """`text` with URL passwords and key=value secrets masked (free text, log lines)."""
    if "=" not in text and ":" not in text:  # neither a URL nor key=value: nothing to mask
        return text
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _KEY_VALUE.sub(r"\g<head>\g<quote>***\g<quote>", text)


def _every_value(name: str) -> bool:
    return True


def redact_url(url: str, *, secret_query: Callable[[str], bool] = _every_value) -> str:
    """The URL without the password of its userinfo and without the values of the query
    parameters `secret_query` names (by default all: a signed URL carries its credential
    in the query). The fragment is dropped."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if password else f"{user}@{host}"
    query = "&".join(
        f"{k}=***" if secret_query(k) else f"{k}{sep}{v}"
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
