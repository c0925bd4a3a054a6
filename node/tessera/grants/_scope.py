"""Scope evaluation: what a grant lets a peer see. Pure functions over plain values.

One `Scope` is derived from a grant and the node's never-shareable kinds. It answers the
same question two ways that must always agree (the property tests check it):
`decide()` for one resource, and `predicate()` as SQL the store ANDs into its queries.

Request checks (`check_read`, `check_command`) only look at what the caller sent, never
at stored data, so a denial reveals nothing the caller did not already say.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

from psycopg import sql

from tessera.core.errors import PermissionDenied
from tessera.grants._model import ALL_WORKSPACES, Grant
from tessera.store import NOTHING, Predicate

#: Command types of the built-in resource commands.
PUT = "resource.put"
DELETE = "resource.delete"


@dataclass(frozen=True)
class Decision:
    """Whether one resource is inside a scope, and if not, the stable reason why."""

    allowed: bool
    reason: str = ""


ALLOW = Decision(True)


@dataclass(frozen=True)
class Scope:
    """A grant as the read and write paths apply it."""

    grant: str
    #: Kinds readable: granted, minus excluded, minus never-shareable.
    kinds: frozenset[str]
    #: None means every workspace.
    workspaces: frozenset[str] | None
    #: Empty means every team.
    teams: frozenset[str]
    subject_user: str
    include_personal: bool
    row_cap: int
    command_types: frozenset[str]
    #: Event type patterns the peer may follow ("task.*"); empty means none.
    event_types: frozenset[str] = frozenset()

    @classmethod
    def of(cls, grant: Grant, never_shared: Collection[str]) -> Scope:
        """The scope of a grant; never-shareable kinds are removed even if granted."""
        kinds = grant.kinds - grant.excluded_kinds - frozenset(never_shared)
        if ALL_WORKSPACES in grant.workspaces or (not grant.workspaces and grant.teams):
            workspaces: frozenset[str] | None = None
        else:
            workspaces = grant.workspaces
        if not grant.workspaces and not grant.teams:
            kinds = frozenset()  # default deny: a grant naming no place grants nothing
        return cls(grant.name, kinds, workspaces, grant.teams, grant.subject_user,
                   grant.include_personal, grant.row_cap, grant.command_types,
                   grant.event_types)

    @property
    def withholds_personal(self) -> bool:
        """True when the subject user's own resources are withheld."""
        return bool(self.subject_user) and not self.include_personal

    def decide(self, *, workspace: str, kind: str, team: str, owner: str) -> Decision:
        """Whether one resource (its key, team and owner) is inside the scope."""
        if kind not in self.kinds:
            return Decision(False, "KIND_NOT_GRANTED")
        if self.workspaces is not None and workspace not in self.workspaces:
            return Decision(False, "WORKSPACE_NOT_GRANTED")
        if self.teams and team not in self.teams:
            return Decision(False, "TEAM_NOT_GRANTED")
        if self.withholds_personal and owner == self.subject_user:
            return Decision(False, "PERSONAL_DATA")
        return ALLOW

    def predicate(self) -> Predicate:
        """The same decision as SQL over `resources` columns.

        Built once per scope (scopes are immutable and shared by a grant's calls), not on
        every read: composing the SQL and sorting the lists is per-call work otherwise.
        """
        return _predicate(self)

    def _build_predicate(self) -> Predicate:
        if not self.kinds:
            return NOTHING
        parts: list[sql.Composable] = [sql.SQL("kind = ANY(%s::text[])")]
        params: list[object] = [sorted(self.kinds)]
        if self.workspaces is not None:
            if not self.workspaces:
                return NOTHING
            parts.append(sql.SQL("workspace = ANY(%s::text[])"))
            params.append(sorted(self.workspaces))
        if self.teams:
            parts.append(sql.SQL("team = ANY(%s::text[])"))
            params.append(sorted(self.teams))
        if self.withholds_personal:
            parts.append(sql.SQL("owner <> %s"))
            params.append(self.subject_user)
        return Predicate(sql.SQL("(") + sql.SQL(" AND ").join(parts) + sql.SQL(")"),
                         tuple(params))

    def check_read(self, *, workspace: str, kind: str) -> None:
        """Refuse a request that names a kind or workspace outside the scope.

        Empty values mean "any" and are narrowed by `predicate()` instead.
        """
        if kind and kind not in self.kinds:
            raise PermissionDenied(f"the grant does not include kind {kind!r}",
                                   reason="KIND_NOT_GRANTED")
        if workspace and self.workspaces is not None and workspace not in self.workspaces:
            raise PermissionDenied(f"the grant does not include workspace {workspace!r}",
                                   reason="WORKSPACE_NOT_GRANTED")

    def check_sources(self, *, local: bool) -> None:
        """A peer's call is answered from this node's data only: it may not fan out."""
        if not local:
            raise PermissionDenied("a peer's call cannot fan out to other sources",
                                   reason="FANOUT_NOT_ALLOWED")

    def page_token_subject(self, caller_uri: str) -> str:
        """Who page tokens are bound to: the caller under this grant.

        A token minted under one grant is refused under any other (a new grant after a
        revocation), even though every page is filtered by the current scope anyway.
        """
        return f"{caller_uri}#{self.grant}"

    def check_command(self, command_type: str) -> None:
        """Refuse a command type the grant does not name."""
        if command_type not in self.command_types:
            raise PermissionDenied(f"the grant does not allow command {command_type!r}",
                                   reason="COMMAND_NOT_GRANTED")

    def check_write(self, *, workspace: str, kind: str, team: str, owner: str) -> None:
        """Refuse writing a resource whose new values would fall outside the scope."""
        self.check_read(workspace=workspace, kind=kind)
        decision = self.decide(workspace=workspace, kind=kind, team=team, owner=owner)
        if not decision.allowed:
            raise PermissionDenied("the resource would be outside the grant's scope",
                                   reason=decision.reason)

    def page_size(self, requested: int) -> int:
        """The page size actually served: the row cap bounds every page."""
        return min(requested, self.row_cap) if self.row_cap > 0 else requested


@functools.lru_cache(maxsize=1024)
def _predicate(scope: Scope) -> Predicate:
    return scope._build_predicate()
