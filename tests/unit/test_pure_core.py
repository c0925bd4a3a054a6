"""Pure functions of the core: tokens, configuration, identities, validation, redaction."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from hypothesis import given
from hypothesis import strategies as st

from tessera import config
from tessera.api._validate import Checker
from tessera.calls import Access, authorize, required_access
from tessera.core import errors
from tessera.core.pagination import TOKEN_TTL_S, PageTokenError, PageTokens, query_hash
from tessera.core.status import status_code_of, to_status
from tessera.pki import IdentityKind, SpiffeId
from tessera.store import redact_dsn

TOKENS = PageTokens(b"k" * 32)


@given(st.lists(st.one_of(st.text(max_size=20), st.integers()), max_size=4))
def test_page_token_round_trips_its_position(position: list[object]) -> None:
    token = TOKENS.encode(query="q" * 64, caller="spiffe://d/client/a", position=position)
    assert TOKENS.decode(token, query="q" * 64, caller="spiffe://d/client/a") == position


def test_page_token_is_bound_to_query_caller_key_and_time() -> None:
    token = TOKENS.encode(query="a" * 64, caller="c1", position=["x"], now=1000)
    with pytest.raises(PageTokenError, match="different query"):
        TOKENS.decode(token, query="b" * 64, caller="c1", now=1000)
    with pytest.raises(PageTokenError, match="another caller"):
        TOKENS.decode(token, query="a" * 64, caller="c2", now=1000)
    with pytest.raises(PageTokenError, match="not one this node issued"):
        PageTokens(b"z" * 32).decode(token, query="a" * 64, caller="c1", now=1000)
    with pytest.raises(PageTokenError, match="expired"):
        TOKENS.decode(token, query="a" * 64, caller="c1", now=1000 + TOKEN_TTL_S + 1)
    body, mac = token.split(".")
    with pytest.raises(PageTokenError):
        TOKENS.decode(body[:-2] + "AA." + mac, query="a" * 64, caller="c1", now=1000)


def test_query_hash_ignores_key_order() -> None:
    assert query_hash({"a": 1, "b": [1, 2]}) == query_hash({"b": [1, 2], "a": 1})
    assert query_hash({"a": 1}) != query_hash({"a": 2})


def test_config_layers_toml_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[node]\nname = "acme"\n[store]\nembedding_dimension = 8\n')
    cfg = config.load(f, environ={"TESSERA_STORE_EMBEDDING_DIMENSION": "16"})
    assert cfg.node.name == "acme" and cfg.store.embedding_dimension == 16


@pytest.mark.parametrize(("env", "setting"), [
    ({"TESSERA_STORE_EMBEDDING_DIMENSION": "many"}, "store.embedding_dimension"),
    ({"TESSERA_STORE_METRIC": "hamming"}, "store.metric"),
    ({"TESSERA_NODE_LISTEN_ADDRESS": "nowhere"}, "node.listen_address"),
    ({"TESSERA_NODE_NAME": "Bad_Name"}, "node.name"),
    ({"TESSERA_TLS_CERT_FILE": "/x.crt"}, "tls"),
    ({"TESSERA_VALKEY_URL": "http://x"}, "valkey.url"),
    ({"TESSERA_STORE_NOPE": "1"}, "store.nope"),
])
def test_bad_setting_names_itself(env: dict[str, str], setting: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        config.load(environ=env)
    assert exc.value.message.startswith(setting)
    assert "\n" not in exc.value.message


def test_unknown_toml_section_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text("[nodes]\nname = 'x'\n")
    with pytest.raises(errors.ConfigError, match=r"unknown section \[nodes\]"):
        config.load(f, environ={})


@pytest.mark.parametrize("uri", [
    "spiffe://d.example/node/a", "spiffe://d/client/tool-1", "spiffe://d/admin/root.x"])
def test_spiffe_ids_parse_and_print_back(uri: str) -> None:
    assert SpiffeId.parse(uri).uri == uri


@pytest.mark.parametrize("uri", [
    "spiffe://d/robot/a", "https://d/node/a", "spiffe://d/node/", "spiffe://d/node/a/b",
    "spiffe://D/node/a", "spiffe://d/node/a?x=1"])
def test_invalid_spiffe_ids_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(uri)


def test_access_policy_by_identity_kind() -> None:
    admin = SpiffeId("d", IdentityKind.ADMIN, "a")
    client = SpiffeId("d", IdentityKind.CLIENT, "c")
    peer = SpiffeId("d", IdentityKind.NODE, "p")
    assert required_access("tessera.v1.AdminService", "GetNodeInfo") is Access.ADMIN
    assert required_access("grpc.health.v1.Health", "Check") is Access.ANY_AUTHENTICATED
    authorize(Access.ADMIN, admin)
    authorize(Access.LOCAL, client)
    for access, who in ((Access.ADMIN, client), (Access.ADMIN, peer), (Access.LOCAL, peer)):
        with pytest.raises(errors.PermissionDenied):
            authorize(access, who)


def test_checker_collects_every_violation() -> None:
    c = Checker()
    c.embedding("e", [1.0, math.inf], 2)
    c.embedding("f", [1.0], 2)
    c.kind("k", "ghost", {"task"})
    assert c.page_size("p", 0) == 100
    with pytest.raises(errors.InvalidArgument) as exc:
        c.done()
    assert [v.field for v in exc.value.violations] == ["e", "f", "k"]


def test_status_mapping_carries_the_details_that_help() -> None:
    st_ = to_status(errors.InvalidArgument([errors.FieldViolation("key.id", "is required")]))
    assert st_.code == code_pb2.INVALID_ARGUMENT
    br = error_details_pb2.BadRequest()
    assert st_.details[0].Unpack(br) and br.field_violations[0].field == "key.id"
    rl = to_status(errors.ResourceExhausted("slow down", retry_after_s=1.5, subject="g"))
    retry = error_details_pb2.RetryInfo()
    assert rl.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 1_500_000_000
    denied = errors.PermissionDenied("no", reason="NO_GRANT")
    assert status_code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
    info = error_details_pb2.ErrorInfo()
    assert to_status(denied).details[0].Unpack(info) and info.reason == "NO_GRANT"


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db?password=secret&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),
    ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
    ("postgresql://postgres:@/postgres?host=/tmp/x", "postgresql://postgres@/postgres?host=/tmp/x"),
])
def test_dsn_passwords_are_redacted(dsn: str, shown: str) -> None:
    if "://" in dsn:
        assert redact_dsn(dsn) == shown
    else:  # key=value DSNs are re-rendered from libpq's parse, in its order
        assert sorted(redact_dsn(dsn).split()) == sorted(shown.split())


def test_quoted_key_value_passwords_and_client_keys_are_never_shown() -> None:
    from tessera.core.redact import redact_url
    from tessera_client import Credentials

    shown = redact_dsn("host=h password='my secret' dbname=d")
    assert "secret" not in shown and "password=***" in shown
    assert "sig" not in redact_url("https://u:pw@crl.example/ca.crl?sig=abc123&x=1").replace(
        "sig=***", "") and "abc123" not in redact_url("https://crl.example/c?sig=abc123")
    assert "PRIVATE" not in repr(Credentials(b"ca", b"cert", b"-----BEGIN PRIVATE KEY-----"))
