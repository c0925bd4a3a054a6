"""Fanned-out queries: this node plus its peers, merged, each row tagged with its source.

Only local identities fan out (peers are refused earlier, by their scope). Each source's
state is reported, so a partial answer says so: ok, cached (peer offline, rows from the
offline cache), offline, or denied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from tessera.core.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from tessera.core.pagination import PageTokenError, PageTokens, query_hash
from tessera.federation import Federation, SourceAnswer, merge_sorted
from tessera_client.pb import query_pb2, resources_pb2

log = logging.getLogger(__name__)
State = resources_pb2.SourceStatus
LOCAL = "local"
M = TypeVar("M", bound=Message)
T = TypeVar("T")


def targets(fed: Federation, sources: resources_pb2.Sources) -> tuple[bool, list[str]]:
    """(include local data, peer names) for a non-local `sources`."""
    known = sorted(fed.peers())
    if sources.scope == resources_pb2.Sources.SCOPE_ALL:
        if sources.peers:
            raise InvalidArgument([FieldViolation(
                "sources.peers", "peers may only be named with scope SCOPE_PEERS")])
        return True, known
    names = list(dict.fromkeys(sources.peers))
    if not names:
        raise InvalidArgument([FieldViolation("sources.peers",
                                              "name at least one peer with SCOPE_PEERS")])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgument([FieldViolation(
            "sources.peers", f"not joined: {', '.join(unknown)}; joined peers: "
            f"{', '.join(known) or 'none'}")])
    return sources.include_local, names


def _local_request(request: M) -> M:
    out = type(request)()
    out.CopyFrom(request)
    out.ClearField("sources")
    return out


def _status(
    answers: list[SourceAnswer], counts: dict[str, int]
) -> list[resources_pb2.SourceStatus]:
    return [resources_pb2.SourceStatus(source=a.source, state=a.state,  # type: ignore[arg-type]
                                       message=a.message, row_count=counts.get(a.source, 0))
            for a in answers]


async def _local(call: Callable[[], Awaitable[M]]) -> SourceAnswer:
    """Answer the local part; a local NotFound is an empty answer, not an error."""
    try:
        return SourceAnswer(LOCAL, State.STATE_OK, "", await call())
    except NotFound:
        return SourceAnswer(LOCAL, State.STATE_OK, "not found", None)


async def _ask_all(fed: Federation, include_local: bool, local: Callable[[], Awaitable[M]],
                   peers: list[str], method: str, request: Message,
                   response_type: type[Message], *, verb: str, kind: str,
                   cacheable: bool) -> list[SourceAnswer]:
    """This node and the peers at once: the answer takes as long as the slowest source."""
    remote = fed.call(peers, method, request, response_type, verb=verb, kind=kind,
                      cacheable=cacheable)
    if not include_local:
        return await remote
    mine, theirs = await asyncio.gather(_local(local), remote)
    return [mine, *theirs]


def _tagged(merged: list[tuple[str, T]], answers: list[SourceAnswer],
            resource_of: Callable[[T], resources_pb2.Resource]) -> tuple[list[T], dict[str, int]]:
    """Rows tagged with their source (and cached flag), and the row count per source."""
    by_source = {a.source: a for a in answers}
    counts: dict[str, int] = {}
    rows = []
    for source, row in merged:
        counts[source] = counts.get(source, 0) + 1
        _tag(resource_of(row), by_source[source])
        rows.append(row)
    return rows, counts


def _tag(resource: resources_pb2.Resource, answer: SourceAnswer) -> resources_pb2.Resource:
    resource.source = answer.source
    resource.cached = answer.cached
    return resource


async def fan_get(fed: Federation, request: query_pb2.GetResourceRequest,
                  local: Callable[[query_pb2.GetResourceRequest],
                                  Awaitable[query_pb2.GetResourceResponse]],
                  ) -> query_pb2.GetResourceResponse:
    """The first source (local first, then peers by name) that has the resource."""
    include_local, peers = targets(fed, request.sources)
    remote_req = _local_request(request)
    answers = await _ask_all(fed, include_local, lambda: local(remote_req), peers,
                             "GetResource", remote_req, query_pb2.GetResourceResponse,
                             verb="get", kind=request.key.kind, cacheable=True)
    found = next((a for a in answers if a.response is not None
                  and a.response.HasField("resource")), None)
    counts = {found.source: 1} if found else {}
    if found is None:
        offline = [a.source for a in answers if a.state == State.STATE_OFFLINE]
        if offline and len(offline) == len(answers):
            raise Unavailable(f"every source is offline: {', '.join(offline)}")
        raise NotFound(f"resource {request.key.workspace}/{request.key.kind}/{request.key.id} "
                       f"was not found in any source"
                       + (f" (offline: {', '.join(offline)})" if offline else ""))
    return query_pb2.GetResourceResponse(resource=_tag(found.response.resource, found),
                                         source_status=_status(answers, counts))


def _key(r: resources_pb2.Resource) -> tuple[str, str, str]:
    return (r.workspace, r.kind, r.id)


async def fan_list(fed: Federation, tokens: PageTokens, caller: str,
                   request: query_pb2.ListResourcesRequest, page_size: int,
                   local: Callable[[query_pb2.ListResourcesRequest],
                                   Awaitable[query_pb2.ListResourcesResponse]],
                   ) -> query_pb2.ListResourcesResponse:
    """One page of the union of every source, in key order.

    A node cannot mint its peers' page tokens, so every source is asked for the rows
    after the last key this node returned (`start_after`). A group of rows sharing one key
    on several sources is never split across pages, so strict "after" loses nothing.
    """
    if request.order not in (query_pb2.LIST_ORDER_UNSPECIFIED, query_pb2.LIST_ORDER_KEY_ASC):
        raise InvalidArgument([FieldViolation(
            "order", "a fanned-out list supports LIST_ORDER_KEY_ASC only")])
    if request.HasField("start_after"):
        raise InvalidArgument([FieldViolation(
            "start_after", "is set by nodes themselves when they fan out; use page_token")])
    include_local, peers = targets(fed, request.sources)
    query = _local_request(request)
    query.page_token = ""
    query.page_size = page_size
    qhash = query_hash({"fanout_list": query.SerializeToString(deterministic=True).hex(),
                        "sources": request.sources.SerializeToString(deterministic=True).hex()})
    if request.page_token:
        try:
            after = tokens.decode(request.page_token, query=qhash, caller=caller)
        except PageTokenError as exc:
            raise InvalidArgument([FieldViolation("page_token", str(exc))]) from None
        query.start_after.CopyFrom(resources_pb2.ResourceKey(
            workspace=after[0], kind=after[1], id=after[2]))
    answers = await _ask_all(fed, include_local, lambda: local(query), peers, "ListResources",
                             query, query_pb2.ListResourcesResponse, verb="list",
                             kind=request.kind, cacheable=True)
    pages = [(a.source, list(a.response.resources) if a.response is not None else [])
             for a in answers]
    more = any(a.response is not None and a.response.next_page_token for a in answers)
    merged = merge_sorted(pages, lambda _s, r: _key(r), limit=page_size + len(pages))
    page = merged[:page_size]
    if len(merged) > page_size:
        more = True
        boundary = _key(merged[page_size][1])
        trimmed = [sr for sr in page if _key(sr[1]) != boundary]
        # Keep the tie group whole: cut before it, unless that would leave nothing.
        page = trimmed if trimmed else [sr for sr in merged if _key(sr[1]) == boundary]
    rows, counts = _tagged(page, answers, lambda r: r)
    token = ""
    if more and rows:
        token = tokens.encode(query=qhash, caller=caller, position=list(_key(rows[-1])))
    return query_pb2.ListResourcesResponse(resources=rows, next_page_token=token,
                                           source_status=_status(answers, counts))


async def fan_search(fed: Federation, request: query_pb2.SearchResourcesRequest,
                     local: Callable[[query_pb2.SearchResourcesRequest],
                                     Awaitable[query_pb2.SearchResourcesResponse]],
                     ) -> query_pb2.SearchResourcesResponse:
    """The best k hits over every source by score. Never cached: search is not."""
    include_local, peers = targets(fed, request.sources)
    query = _local_request(request)
    answers = await _ask_all(fed, include_local, lambda: local(query), peers,
                             "SearchResources", query, query_pb2.SearchResourcesResponse,
                             verb="search", kind=request.kind, cacheable=False)
    pages = [(a.source, list(a.response.hits) if a.response is not None else [])
             for a in answers]
    merged = merge_sorted(pages, lambda _s, h: h.score, limit=request.k, reverse=True)
    hits, counts = _tagged(merged, answers, lambda h: h.resource)
    return query_pb2.SearchResourcesResponse(hits=hits, source_status=_status(answers, counts))

