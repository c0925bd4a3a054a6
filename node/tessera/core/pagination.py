"""Opaque page tokens bound to one query and one caller.

A token carries the position after the last row returned, the hash of the normalised
query it belongs to and a hash of the caller, all under an HMAC with the node's secret.
A token replayed with other filters, by another caller, edited or forged is refused.
Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tessera.core.codec import b64url_decode, b64url_encode

_VERSION = 1
#: How long a page token stays valid.
TOKEN_TTL_S = 24 * 3600


class PageTokenError(ValueError):
    """The token is malformed, forged, expired or belongs to another query or caller."""


def query_hash(query: Mapping[str, Any]) -> str:
    """SHA-256 hex of a canonical JSON rendering of the query (sorted keys, no spaces)."""
    canon = json.dumps(query, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


@dataclass(frozen=True)
class PageTokens:
    """Signs and checks page tokens with one secret key."""

    secret: bytes

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, body, hashlib.sha256).digest()[:16]

    def encode(
        self, *, query: str, caller: str, position: list[Any], now: float | None = None
    ) -> str:
        """A token resuming after `position` for this query and caller."""
        issued = int(time.time() if now is None else now)
        body = json.dumps(
            {"v": _VERSION, "q": query[:32], "c": _caller_tag(caller), "p": position, "t": issued},
            separators=(",", ":"),
        ).encode()
        return f"{b64url_encode(body)}.{b64url_encode(self._mac(body))}"

    def decode(self, token: str, *, query: str, caller: str, now: float | None = None) -> list[Any]:
        """The position a token resumes after; raises PageTokenError if it does not fit."""
        try:
            body_b64, mac_b64 = token.split(".")
            body, mac = b64url_decode(body_b64), b64url_decode(mac_b64)
        except ValueError:
            raise PageTokenError("page token is malformed") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise PageTokenError("page token is not one this node issued")
        try:
            data = json.loads(body)
            version, q, c, position, issued = data["v"], data["q"], data["c"], data["p"], data["t"]
        except (ValueError, KeyError, TypeError):
            raise PageTokenError("page token is malformed") from None
        if version != _VERSION or not isinstance(position, list):
            raise PageTokenError("page token is malformed")
        if q != query[:32]:
            raise PageTokenError("page token belongs to a different query; resend the same filters")
        if c != _caller_tag(caller):
            raise PageTokenError("page token belongs to another caller")
        current = time.time() if now is None else now
        if not isinstance(issued, int) or current - issued > TOKEN_TTL_S:
            raise PageTokenError("page token has expired; start from the first page")
        return position


def _caller_tag(caller: str) -> str:
    return hashlib.sha256(caller.encode()).hexdigest()[:16]
