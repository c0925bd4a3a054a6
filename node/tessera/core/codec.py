"""Small codecs every layer shares: unpadded base64url, and durations such as 1h30m."""

from __future__ import annotations

import base64
import datetime as dt
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2, page tokens, cursors)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of b64url_encode; padding is optional. binascii.Error (a ValueError) if bad."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_duration(text: str) -> dt.timedelta:
    """'24h', '5m', '90s', '1h30m', '30d', '2w' -> timedelta; ValueError otherwise."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration like 30d, 24h, 5m, 90s or 1h30m")
    return dt.timedelta(seconds=total)
