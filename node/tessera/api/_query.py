"""QueryService: thin servicer over the resource store."""

from __future__ import annotations

from typing import Any, Literal

import grpc

from tessera import __version__
from tessera.api._convert import (
    command_type_to_pb,
    dict_to_struct,
    fill_resource,
    identity_to_pb,
    value_to_python,
)
from tessera.api._fanout import fan_get, fan_list, fan_search
from tessera.api._runtime import Runtime
from tessera.api._search import search_resources
from tessera.api._validate import ID_RE, WORKSPACE_RE, Checker
from tessera.calls import current_caller, peer_scope
from tessera.core.errors import FieldViolation, InvalidArgument, Unavailable
from tessera.core.pagination import PageTokenError, query_hash
from tessera.federation import Federation
from tessera.grants import Scope
from tessera.ratelimit import Reservation
from tessera.store import ListQuery, ResourceKey
from tessera_client.pb import query_pb2, query_pb2_grpc, resources_pb2

_METRICS = {"cosine": query_pb2.METRIC_COSINE, "l2": query_pb2.METRIC_L2,
            "inner_product": query_pb2.METRIC_INNER_PRODUCT}


def check_local_sources(c: Checker, field: str, sources: resources_pb2.Sources) -> None:
    """A local-only `sources` must not name peers (fan-out validates its own)."""
    if is_local(sources) and sources.peers:
        c.fail(f"{field}.peers", "peers may only be named with scope SCOPE_PEERS")


def is_local(sources: resources_pb2.Sources) -> bool:
    """True when a request reads this node's own data only."""
    return sources.scope in (resources_pb2.Sources.SCOPE_UNSPECIFIED,
                             resources_pb2.Sources.SCOPE_LOCAL)


def check_peer_read(scope: Scope | None, sources: resources_pb2.Sources, *, workspace: str,
                    kind: str) -> None:
    """Grant checks on what a peer's read request names, before any other validation.

    They run first so a peer learns nothing about kinds outside its grant (the validator
    lists the node's kinds), and they depend only on the request, never on stored rows.
    """
    if scope is not None:
        scope.check_sources(local=is_local(sources))
        scope.check_read(workspace=workspace, kind=kind)


def check_key(c: Checker, field: str, workspace: str, kind: str, id_: str,
              kinds: frozenset[str]) -> None:
    """Validate the three parts of a resource key."""
    c.pattern(f"{field}.workspace", workspace, WORKSPACE_RE, "1-128 characters of [A-Za-z0-9._-]")
    c.kind(f"{field}.kind", kind, kinds)
    c.pattern(f"{field}.id", id_, ID_RE, "1-200 characters of [A-Za-z0-9._:-]")


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    """Reads resources."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _federation(self) -> Federation:
        if self.rt.federation is None:  # pragma: no cover - start_node always sets it
            raise Unavailable("federation is not configured on this node")
        return self.rt.federation

    async def _reserve(self, want: int) -> Reservation | None:
        """Reserve up to `want` rows against the caller's grant's row budget, if it has
        one (RESOURCE_EXHAUSTED with RetryInfo once it is spent)."""
        grant = current_caller().grant
        if grant is None or not grant.row_budget or self.rt.budgets is None:
            return None
        return await self.rt.budgets.reserve(grant.name, grant.row_budget,
                                             grant.row_budget_window_s, want)

    async def _settle(self, reservation: Reservation | None, served: int) -> None:
        if reservation is not None and self.rt.budgets is not None:
            await self.rt.budgets.settle(reservation, served)

    def _scope(self) -> Scope | None:
        """The caller's grant scope; None for local identities."""
        return peer_scope(current_caller())

    async def GetResource(
        self, request: query_pb2.GetResourceRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.GetResourceResponse:
        scope = self._scope()
        check_peer_read(scope, request.sources, workspace=request.key.workspace,
                        kind=request.key.kind)
        c = Checker()
        if not request.HasField("key"):
            c.fail("key", "is required")
        else:
            k = request.key
            check_key(c, "key", k.workspace, k.kind, k.id, self.rt.kinds)
        check_local_sources(c, "sources", request.sources)
        c.done()
        if not is_local(request.sources):
            return await fan_get(self._federation(), request,
                                 lambda r: self.GetResource(r, context))
        k = request.key
        reservation = await self._reserve(1)
        served = 0
        try:
            # Rows outside the scope are not fetched: they answer NOT_FOUND like absent ones.
            resource = await self.rt.store.get(ResourceKey(k.workspace, k.kind, k.id),
                                               scope.predicate() if scope else None)
            served = 1
        finally:
            await self._settle(reservation, served)
        response = query_pb2.GetResourceResponse()
        fill_resource(response.resource, resource)
        return response

    async def ListResources(
        self, request: query_pb2.ListResourcesRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListResourcesResponse:
        scope = self._scope()
        check_peer_read(scope, request.sources, workspace=request.workspace, kind=request.kind)
        c = Checker()
        c.pattern("workspace", request.workspace, WORKSPACE_RE,
                  "1-128 characters of [A-Za-z0-9._-]", required=False)
        c.kind("kind", request.kind, self.rt.kinds, required=False)
        c.max_len("team", request.team, 200)
        c.max_len("owner", request.owner, 200)
        page_size = c.page_size("page_size", request.page_size)
        attributes: dict[str, Any] = {}
        for i, f in enumerate(request.attribute_filters):
            if not f.key or len(f.key) > 128:
                c.fail(f"attribute_filters[{i}].key", "must be 1-128 characters")
            elif f.key in attributes:
                c.fail(f"attribute_filters[{i}].key", f"{f.key!r} is filtered twice")
            elif not f.HasField("value"):
                c.fail(f"attribute_filters[{i}].value", "is required")
            else:
                attributes[f.key] = value_to_python(f.value)
        check_local_sources(c, "sources", request.sources)
        if request.HasField("start_after"):
            sa = request.start_after
            check_key(c, "start_after", sa.workspace, sa.kind, sa.id, self.rt.kinds)
            if request.page_token:
                c.fail("start_after", "cannot be combined with page_token")
            if request.order == query_pb2.LIST_ORDER_UPDATE_TIME_DESC:
                c.fail("start_after", "needs order LIST_ORDER_KEY_ASC")
        updated_since = c.timestamp("updated_since", request.updated_since,
                                    request.HasField("updated_since"))
        c.done()
        if not is_local(request.sources):
            return await fan_list(self._federation(), self.rt.tokens, current_caller().uri,
                                  request, page_size, lambda r: self.ListResources(r, context))
        order: Literal["key", "updated_desc"] = (
            "updated_desc" if request.order == query_pb2.LIST_ORDER_UPDATE_TIME_DESC else "key"
        )
        normalised = {
            "workspace": request.workspace, "kind": request.kind, "team": request.team,
            "owner": request.owner, "attributes": attributes, "order": order,
            "updated_since": updated_since.isoformat() if updated_since else None,
        }
        qhash = query_hash(normalised)
        caller = current_caller().uri
        if scope is not None:
            page_size = scope.page_size(page_size)
            caller = scope.page_token_subject(caller)
        after: list[Any] | None = None
        if request.HasField("start_after"):
            sa = request.start_after
            after = [sa.workspace, sa.kind, sa.id]
        if request.page_token:
            try:
                after = self.rt.tokens.decode(request.page_token, query=qhash, caller=caller)
            except PageTokenError as exc:
                raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None
        # The row cap bounds a page, the budget every page in its window together; reserved
        # only once the request is known good, so a refused one spends nothing.
        reservation = await self._reserve(page_size) if scope is not None else None
        if reservation is not None:
            page_size = reservation.granted
        rows: list[Any] = []
        try:
            rows = await self.rt.store.list(ListQuery(
                workspace=request.workspace, kind=request.kind, team=request.team,
                owner=request.owner, attributes=attributes, updated_since=updated_since,
                order=order, limit=page_size + 1, after=after,
            ), scope.predicate() if scope else None)
        finally:
            await self._settle(reservation, min(len(rows), page_size))
        next_token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            last = rows[-1]
            position: list[Any] = [last.workspace, last.kind, last.id]
            if order == "updated_desc":
                assert last.updated_at is not None
                position.insert(0, last.updated_at.isoformat())
            next_token = self.rt.tokens.encode(query=qhash, caller=caller, position=position)
        response = query_pb2.ListResourcesResponse(next_page_token=next_token)
        add = response.resources.add
        for r in rows:
            fill_resource(add(), r)
        return response

    async def SearchResources(
        self, request: query_pb2.SearchResourcesRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.SearchResourcesResponse:
        scope = self._scope()
        check_peer_read(scope, request.sources, workspace=request.workspace, kind=request.kind)
        c = Checker()
        check_local_sources(c, "sources", request.sources)
        c.done()
        if not is_local(request.sources):
            return await fan_search(self._federation(), request,
                                    lambda r: self.SearchResources(r, context))
        if scope is None:
            return await search_resources(self.rt, request)
        # A peer's search runs inside its grant, in the same SQL, and within its row cap
        # and row budget.
        max_k = scope.page_size(request.k or 1)
        reservation = await self._reserve(max_k)
        if reservation is not None:
            max_k = reservation.granted
        served = 0
        try:
            response = await search_resources(self.rt, request, scope.predicate(), max_k=max_k)
            served = len(response.hits)
        finally:
            await self._settle(reservation, served)
        return response

    async def Describe(
        self, request: query_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.DescribeResponse:
        caller = current_caller()
        scope = self._scope()
        if scope is not None:
            # Exactly what the grant lets this peer read, nothing about the rest.
            return query_pb2.DescribeResponse(
                node=identity_to_pb(self.rt.identity), caller=identity_to_pb(caller.identity),
                version=__version__,
                embedding_dimension=self.rt.cfg.store.embedding_dimension,
                metric=_METRICS[self.rt.cfg.store.metric],
                embedding_model=self.rt.cfg.store.embedding_model,
                kinds=sorted(scope.kinds & self.rt.kinds),
                workspaces=sorted(scope.workspaces or ()), all_kinds=False,
                all_workspaces=scope.workspaces is None,
                info=dict_to_struct({
                    "grant": scope.grant, "teams": sorted(scope.teams),
                    "row_cap": scope.row_cap, "command_types": sorted(scope.command_types),
                    "personal_data_withheld": scope.withholds_personal,
                }),
                command_types=[command_type_to_pb(r) for r in self.rt.commands.all()
                               if r.handler.type in scope.command_types],
            )
        return query_pb2.DescribeResponse(
            node=identity_to_pb(self.rt.identity),
            caller=identity_to_pb(caller.identity),
            version=__version__,
            embedding_dimension=self.rt.cfg.store.embedding_dimension,
            metric=_METRICS[self.rt.cfg.store.metric],
            embedding_model=self.rt.cfg.store.embedding_model,
            kinds=sorted(self.rt.kinds),
            all_kinds=True,
            all_workspaces=True,
            command_types=[command_type_to_pb(r) for r in self.rt.commands.all()],
        )

