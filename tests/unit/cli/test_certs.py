"""Unit tests of tessera.cli: certs."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("text", "hex_flag", "want"), [
    ("1f", False, 0x1F),
    ("0x1F", False, 0x1F),
    ("01:ab:CD", False, 0x01ABCD),
    ("1234", False, 1234),
    ("1234", True, 0x1234),
])
def test_revoke_serials_parse_as_status_prints_them(text: str, hex_flag: bool,
                                                    want: int) -> None:
    from tessera.cli.certs import parse_serial

    assert parse_serial(text, hex_digits=hex_flag) == want


@pytest.mark.parametrize("text", ["", "0x", "12g4", "-5", "0"])
def test_bad_revoke_serials_are_refused(text: str) -> None:
    from tessera.cli.certs import parse_serial

    with pytest.raises(ValueError, match="not a serial"):
        parse_serial(text)
