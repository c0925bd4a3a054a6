"""Cursors: opaque positions in one node's log. Pure functions.

A cursor names "after sequence s of log L": the version, the log's id (one per database,
shared by every replica of the node) and the sequence, in URL-safe base64. A cursor of
another node's log is refused rather than silently read against the wrong sequence.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from tessera.core.codec import b64url_decode, b64url_encode

_PREFIX = "c1_"
_LAYOUT = ">16sQ"


class CursorError(ValueError):
    """The text is not a cursor of this node's log."""


@dataclass(frozen=True)
class Cursor:
    """After sequence `sequence` of the log `log_id`."""

    log_id: uuid.UUID
    sequence: int

    def encode(self) -> str:
        """The opaque text form."""
        raw = struct.pack(_LAYOUT, self.log_id.bytes, self.sequence)
        return _PREFIX + b64url_encode(raw)


def encode(log_id: uuid.UUID, sequence: int) -> str:
    """The cursor after `sequence` of `log_id`."""
    return Cursor(log_id, sequence).encode()


def decode(text: str, log_id: uuid.UUID) -> int:
    """The sequence a cursor of `log_id` names; CursorError otherwise."""
    if not text.startswith(_PREFIX) or len(text) > 64:
        raise CursorError("is not a cursor (use the cursor field of a delivered event)")
    body = text[len(_PREFIX):]
    try:
        raw = b64url_decode(body)
        log, sequence = struct.unpack(_LAYOUT, raw)
    except (ValueError, struct.error):
        raise CursorError("is not a cursor (use the cursor field of a delivered event)") \
            from None
    if uuid.UUID(bytes=log) != log_id:
        raise CursorError("is a cursor of another node's log; cursors are bound to the node "
                          "that issued them")
    return int(sequence)
