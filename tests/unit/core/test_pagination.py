"""Page tokens and query hashes: the documented format and every refusal, by its message.

A page token is handed to clients and comes back across restarts and rolling upgrades,
and `query_hash` is stored with idempotency keys, so both are pinned here from their
description. Each refusal is checked by its exact text, which is what the client sees."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.pagination import TOKEN_TTL_S, PageTokenError, PageTokens, query_hash

SECRET = b"s" * 32


TOKENS = PageTokens(SECRET)


QUERY = "ab" * 32  # a query hash


CALLER = "spiffe://d/node/p#grants/g"


ISSUED = 1_800_000_000


MALFORMED = "page token is malformed"


FORGED = "page token is not one this node issued"


OTHER_QUERY = "page token belongs to a different query; resend the same filters"


OTHER_CALLER = "page token belongs to another caller"


EXPIRED = "page token has expired; start from the first page"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def caller_tag(caller: str) -> str:
    return hashlib.sha256(caller.encode()).hexdigest()[:16]


def signed(body: bytes, secret: bytes = SECRET) -> str:
    """A token around `body` as documented: unpadded base64url body and 128-bit HMAC."""
    return f"{b64(body)}.{b64(hmac.new(secret, body, hashlib.sha256).digest()[:16])}"


def body_of(**changes: object) -> bytes:
    fields: dict[str, object] = {"v": 1, "q": QUERY[:32], "c": caller_tag(CALLER),
                                 "p": ["w1", "task", "x"], "t": ISSUED}
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None},
                      separators=(",", ":")).encode()


def refusal(token: str, *, query: str = QUERY, caller: str = CALLER,
            now: float = ISSUED + 60) -> str:
    with pytest.raises(PageTokenError) as err:
        TOKENS.decode(token, query=query, caller=caller, now=now)
    return str(err.value)


def test_a_token_is_the_documented_text() -> None:
    token = TOKENS.encode(query=QUERY, caller=CALLER, position=["w1", "task", "x"], now=ISSUED)
    assert token == signed(body_of())
    assert "=" not in token
    assert TOKENS.decode(token, query=QUERY, caller=CALLER, now=ISSUED) == ["w1", "task", "x"]


def test_a_token_is_good_for_exactly_its_lifetime() -> None:
    token = signed(body_of())
    assert TOKENS.decode(token, query=QUERY, caller=CALLER, now=ISSUED + TOKEN_TTL_S) == [
        "w1", "task", "x"]
    assert refusal(token, now=ISSUED + TOKEN_TTL_S + 1) == EXPIRED
    assert TOKEN_TTL_S == 24 * 3600


def test_a_token_without_an_explicit_clock_is_checked_against_now() -> None:
    fresh = TOKENS.encode(query=QUERY, caller=CALLER, position=[1])
    assert TOKENS.decode(fresh, query=QUERY, caller=CALLER) == [1]
    stale = signed(body_of(t=1_000_000_000))  # 2001, long before the real clock
    with pytest.raises(PageTokenError, match=r"^page token has expired"):
        TOKENS.decode(stale, query=QUERY, caller=CALLER)


def test_text_that_is_not_a_token_is_malformed() -> None:
    good = signed(body_of())
    body, mac = good.split(".")
    for text in ("", "nodot", f"{good}.{mac}", f"A.{mac}", f"{body}.A"):
        assert refusal(text) == MALFORMED, text


def test_a_body_spliced_onto_another_tokens_mac_is_forged() -> None:
    _, mac = signed(body_of()).split(".")
    other_position = b64(body_of(p=["w9", "task", "zzz"]))
    assert refusal(f"{other_position}.{mac}") == FORGED
    assert refusal(signed(body_of(), secret=b"z" * 32)) == FORGED
    assert refusal(signed(body_of())[:-2]) == FORGED  # a MAC one byte short


@pytest.mark.parametrize("body", [
    b"not json", b"[1]", b'"text"', body_of(v=None), body_of(q=None), body_of(c=None),
    body_of(p=None), body_of(t=None),
], ids=["not-json", "array", "string", "no-version", "no-query", "no-caller", "no-position",
        "no-time"])
def test_a_signed_body_without_the_fields_is_malformed(body: bytes) -> None:
    assert refusal(signed(body)) == MALFORMED


def test_an_unknown_version_or_a_position_that_is_no_list_is_malformed() -> None:
    assert refusal(signed(body_of(v=2))) == MALFORMED
    assert refusal(signed(body_of(p={"after": "x"}))) == MALFORMED
    assert refusal(signed(body_of(p="x"))) == MALFORMED


def test_a_token_for_another_query_or_caller_says_so() -> None:
    token = signed(body_of())
    assert refusal(token, query="cd" * 32) == OTHER_QUERY
    assert refusal(token, caller="spiffe://d/node/p#grants/other") == OTHER_CALLER


def test_an_issue_time_that_is_not_an_integer_counts_as_expired() -> None:
    assert refusal(signed(body_of(t=float(ISSUED)))) == EXPIRED
    assert refusal(signed(body_of(t=str(ISSUED)))) == EXPIRED


def test_the_query_hash_is_sha256_of_sorted_compact_json() -> None:
    query = {"b": [1, 2], "a": "x", "c": None}
    assert query_hash(query) == hashlib.sha256(b'{"a":"x","b":[1,2],"c":null}').hexdigest()


def test_values_json_cannot_hold_are_hashed_by_their_text() -> None:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    u = uuid.UUID(int=1)
    assert query_hash({"since": t, "id": u}) == hashlib.sha256(
        b'{"id":"00000000-0000-0000-0000-000000000001","since":"2026-01-01 00:00:00+00:00"}'
    ).hexdigest()
    assert query_hash({"since": t}) != query_hash({"since": t + dt.timedelta(seconds=1)})


K_TOKENS = PageTokens(b"k" * 32)


@given(st.lists(st.one_of(st.text(max_size=20), st.integers()), max_size=4))
def test_page_token_round_trips_its_position(position: list[object]) -> None:
    token = K_TOKENS.encode(query="q" * 64, caller="spiffe://d/client/a", position=position)
    assert K_TOKENS.decode(token, query="q" * 64, caller="spiffe://d/client/a") == position


def test_page_token_is_bound_to_query_caller_key_and_time() -> None:
    token = K_TOKENS.encode(query="a" * 64, caller="c1", position=["x"], now=1000)
    with pytest.raises(PageTokenError, match="different query"):
        K_TOKENS.decode(token, query="b" * 64, caller="c1", now=1000)
    with pytest.raises(PageTokenError, match="another caller"):
        K_TOKENS.decode(token, query="a" * 64, caller="c2", now=1000)
    with pytest.raises(PageTokenError, match="not one this node issued"):
        PageTokens(b"z" * 32).decode(token, query="a" * 64, caller="c1", now=1000)
    with pytest.raises(PageTokenError, match="expired"):
        K_TOKENS.decode(token, query="a" * 64, caller="c1", now=1000 + TOKEN_TTL_S + 1)
    body, mac = token.split(".")
    with pytest.raises(PageTokenError):
        K_TOKENS.decode(body[:-2] + "AA." + mac, query="a" * 64, caller="c1", now=1000)


def test_query_hash_ignores_key_order() -> None:
    assert query_hash({"a": 1, "b": [1, 2]}) == query_hash({"b": [1, 2], "a": 1})
    assert query_hash({"a": 1}) != query_hash({"a": 2})
