"""The pure core of the trust boundary: scopes, enrolment tokens and CSR checks.

Scope decisions are compared with a plain reference evaluator over generated grants and
resources; the SQL form of the same scope is compared through a real node in
tests/e2e/test_peering.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.errors import InvalidArgument, PermissionDenied
from tessera.grants import Grant, Scope
from tessera.peering import TokenError, TokenForged, _token, check_csr
from tessera.pki import IdentityKind, SpiffeId, new_key_and_csr
from tessera.store import NOTHING

WORKSPACES = ("w1", "w2", "w3")
KINDS = ("task", "note", "memory", "credential")
TEAMS = ("", "t1", "t2")
USERS = ("", "ann", "bob")
NEVER = frozenset({"credential"})

grants = st.builds(
    Grant,
    name=st.just("grants/00000000-0000-0000-0000-000000000001"),
    peer=st.just("p"),
    kinds=st.frozensets(st.sampled_from(KINDS)),
    excluded_kinds=st.frozensets(st.sampled_from(KINDS)),
    workspaces=st.frozensets(st.sampled_from((*WORKSPACES, "*"))),
    teams=st.frozensets(st.sampled_from(TEAMS[1:])),
    subject_user=st.sampled_from(USERS),
    include_personal=st.booleans(),
    row_cap=st.integers(0, 50),
    command_types=st.frozensets(st.sampled_from(("resource.put", "resource.delete"))),
)
resources = st.tuples(st.sampled_from(WORKSPACES), st.sampled_from(KINDS),
                      st.sampled_from(TEAMS), st.sampled_from(USERS))


def reference(g: Grant, workspace: str, kind: str, team: str, owner: str) -> bool:
    """Default deny, written out plainly: every condition must hold."""
    names_a_place = bool(g.workspaces) or bool(g.teams)
    kind_ok = kind in g.kinds and kind not in g.excluded_kinds and kind not in NEVER
    workspace_ok = "*" in g.workspaces or workspace in g.workspaces or not g.workspaces
    team_ok = not g.teams or team in g.teams
    personal_ok = g.include_personal or not g.subject_user or owner != g.subject_user
    return names_a_place and kind_ok and workspace_ok and team_ok and personal_ok


@given(grants, st.lists(resources, max_size=30))
def test_scope_decisions_equal_the_reference_evaluator(
    g: Grant, rows: list[tuple[str, str, str, str]]
) -> None:
    scope = Scope.of(g, NEVER)
    for ws, kind, team, owner in rows:
        decision = scope.decide(workspace=ws, kind=kind, team=team, owner=owner)
        assert decision.allowed == reference(g, ws, kind, team, owner)
        assert decision.allowed == (decision.reason == "")


@given(grants, st.sampled_from(("", *WORKSPACES)), st.sampled_from(("", *KINDS)))
def test_read_requests_are_refused_exactly_when_they_name_something_outside(
    g: Grant, ws: str, kind: str
) -> None:
    scope = Scope.of(g, NEVER)
    kinds = g.kinds - g.excluded_kinds - NEVER if (g.workspaces or g.teams) else set()
    all_ws = "*" in g.workspaces or (not g.workspaces and bool(g.teams))
    outside = (kind and kind not in kinds) or (ws and not all_ws and ws not in g.workspaces)
    if outside:
        with pytest.raises(PermissionDenied) as err:
            scope.check_read(workspace=ws, kind=kind)
        assert err.value.reason in ("KIND_NOT_GRANTED", "WORKSPACE_NOT_GRANTED")
    else:
        scope.check_read(workspace=ws, kind=kind)


@given(grants, st.integers(1, 1000))
def test_every_page_is_bounded_by_the_row_cap(g: Grant, requested: int) -> None:
    size = Scope.of(g, NEVER).page_size(requested)
    assert 1 <= size <= requested
    assert size == (min(requested, g.row_cap) if g.row_cap else requested)


@given(grants)
def test_predicate_keeps_nothing_when_no_kind_is_readable(g: Grant) -> None:
    scope = Scope.of(g, NEVER)
    assert (scope.predicate() is NOTHING) == (not scope.kinds or scope.workspaces == frozenset())
    if scope.predicate() is not NOTHING:
        # Every set the scope limits by is passed as a parameter, never spliced into SQL.
        params = scope.predicate().params
        assert sorted(scope.kinds) in params


def grant(**fields: object) -> Grant:
    base = Grant(name="grants/x", peer="p", kinds=frozenset({"task"}),
                 workspaces=frozenset({"w1"}))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_never_shared_and_excluded_kinds_win_over_granted_kinds() -> None:
    scope = Scope.of(grant(kinds=frozenset({"task", "credential", "note"}),
                           excluded_kinds=frozenset({"note"})), NEVER)
    assert scope.kinds == {"task"}
    for kind in ("credential", "note"):
        assert scope.decide(workspace="w1", kind=kind, team="", owner="").reason == \
            "KIND_NOT_GRANTED"


def test_a_grant_naming_no_workspace_or_team_grants_nothing() -> None:
    scope = Scope.of(grant(workspaces=frozenset()), NEVER)
    assert not scope.decide(workspace="w1", kind="task", team="", owner="").allowed
    assert scope.predicate() is NOTHING


def test_a_team_only_grant_reads_those_teams_in_every_workspace() -> None:
    scope = Scope.of(grant(workspaces=frozenset(), teams=frozenset({"t1"})), NEVER)
    assert scope.decide(workspace="w3", kind="task", team="t1", owner="").allowed
    assert scope.decide(workspace="w3", kind="task", team="t2", owner="").reason == \
        "TEAM_NOT_GRANTED"


def test_personal_rows_are_withheld_only_for_a_named_subject() -> None:
    withheld = Scope.of(grant(subject_user="ann"), NEVER)
    assert withheld.decide(workspace="w1", kind="task", team="", owner="ann").reason == \
        "PERSONAL_DATA"
    assert withheld.decide(workspace="w1", kind="task", team="", owner="").allowed
    nobody = Scope.of(grant(), NEVER)
    assert nobody.decide(workspace="w1", kind="task", team="", owner="").allowed
    included = Scope.of(grant(subject_user="ann", include_personal=True), NEVER)
    assert included.decide(workspace="w1", kind="task", team="", owner="ann").allowed


def test_commands_and_fan_out_are_denied_unless_granted() -> None:
    scope = Scope.of(grant(command_types=frozenset({"resource.put"})), NEVER)
    scope.check_command("resource.put")
    with pytest.raises(PermissionDenied) as err:
        scope.check_command("resource.delete")
    assert err.value.reason == "COMMAND_NOT_GRANTED"
    with pytest.raises(PermissionDenied) as err:
        scope.check_sources(local=False)
    assert err.value.reason == "FANOUT_NOT_ALLOWED"


def test_page_tokens_are_bound_to_the_grant() -> None:
    a = Scope.of(grant(name="grants/a"), NEVER)
    b = Scope.of(grant(name="grants/b"), NEVER)
    assert a.page_token_subject("spiffe://d/node/p") != b.page_token_subject("spiffe://d/node/p")


# -- enrolment tokens ---------------------------------------------------------------------


def _root_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


ROOT = _root_pem()
KEY = b"k" * 32


def _invitation() -> _token.Invitation:
    return _token.new_invitation(peer="a", trust_domain="b.example", address="127.0.0.1:1",
                                 enroll_address="127.0.0.1:2", root_pem=ROOT,
                                 expire_unix=2_000_000_000)


def test_tokens_round_trip_and_carry_the_pinned_root() -> None:
    inv = _invitation()
    text = _token.encode(inv, KEY)
    assert _token.verify(text, KEY) == inv
    assert _token.parse(text).root_pem() == ROOT
    assert inv.identity == "spiffe://b.example/node/a"
    assert _token.secret_hash(inv.secret) != inv.secret


@given(st.integers(0, 200), st.integers(0, 255))
def test_any_edit_to_a_token_is_refused(position: int, value: int) -> None:
    text = _token.encode(_invitation(), KEY)
    body_start = len(_token.PREFIX) + 1
    i = body_start + position % (len(text) - body_start)
    replacement = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[value % 64]
    edited = text[:i] + replacement + text[i + 1:]
    if edited == text:
        return
    try:
        _token.verify(edited, KEY)
    except TokenError:
        return
    # base64url can map an edited last character to the same bytes; then nothing changed.
    assert _token.verify(edited, KEY) == _token.verify(text, KEY)


def test_a_token_from_another_node_or_malformed_is_refused() -> None:
    text = _token.encode(_invitation(), KEY)
    with pytest.raises(TokenForged):
        _token.verify(text, b"x" * 32)
    for bad in ("", "nonsense", f"{_token.PREFIX}.@@@.@@@", "other.a.b"):
        with pytest.raises(TokenError):
            _token.verify(bad, KEY)


# -- CSRs at enrolment --------------------------------------------------------------------

INVITED = SpiffeId("b.example", IdentityKind.NODE, "a")


def test_only_a_csr_naming_exactly_the_invited_identity_is_accepted() -> None:
    check_csr(new_key_and_csr(INVITED, common_name=False).csr_pem, INVITED)
    for csr in (
        new_key_and_csr(SpiffeId("b.example", IdentityKind.NODE, "other"),
                        common_name=False).csr_pem,
        new_key_and_csr(SpiffeId("b.example", IdentityKind.ADMIN, "a"),
                        common_name=False).csr_pem,
        new_key_and_csr(INVITED, dns_names=("localhost",), common_name=False).csr_pem,
        new_key_and_csr(INVITED, ip_addresses=("127.0.0.1",), common_name=False).csr_pem,
        # A CN is refused: clients fall back to it when matching host names.
        new_key_and_csr(INVITED).csr_pem,
        b"not a csr",
    ):
        with pytest.raises(InvalidArgument) as err:
            check_csr(csr, INVITED)
        assert [v.field for v in err.value.violations] == ["csr_pem"]
