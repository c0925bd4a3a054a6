"""SearchResources: validation and conversion around the store's k-NN search."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

from tessera.api._convert import fill_resource, value_to_python
from tessera.api._runtime import Runtime
from tessera.api._validate import WORKSPACE_RE, Checker, float32s
from tessera.store import Metric, Predicate, SearchQuery, search
from tessera_client.pb import query_pb2

MAX_K = 200
MAX_TEXT = 1000


def validate_search(rt: Runtime, request: query_pb2.SearchResourcesRequest) -> SearchQuery:
    """The request as a SearchQuery, or InvalidArgument naming every bad field."""
    c = Checker()
    if not 1 <= request.k <= MAX_K:
        c.fail("k", f"must be between 1 and {MAX_K}, got {request.k}")
    embedding = float32s(request, "embedding")  # no Python float per value
    c.embedding("embedding", embedding, rt.cfg.store.embedding_dimension)
    c.max_len("text", request.text, MAX_TEXT)
    if not request.embedding and not request.text.strip():
        c.fail("embedding", "an embedding or a text query is required")
    c.pattern("workspace", request.workspace, WORKSPACE_RE,
              "1-128 characters of [A-Za-z0-9._-]", required=False)
    c.kind("kind", request.kind, rt.kinds, required=False)
    attributes: dict[str, Any] = {}
    for i, f in enumerate(request.attribute_filters):
        if not f.key or len(f.key) > 128:
            c.fail(f"attribute_filters[{i}].key", "must be 1-128 characters")
        elif not f.HasField("value"):
            c.fail(f"attribute_filters[{i}].value", "is required")
        else:
            attributes[f.key] = value_to_python(f.value)
    if request.HasField("min_score") and not math.isfinite(request.min_score):
        c.fail("min_score", "must be a finite number")
    updated_since = c.timestamp("updated_since", request.updated_since,
                                request.HasField("updated_since"))
    c.done()
    return SearchQuery(
        k=request.k,
        embedding=embedding or None,
        text=request.text.strip(),
        workspace=request.workspace,
        kind=request.kind,
        attributes=attributes,
        updated_since=updated_since,
        min_score=request.min_score if request.HasField("min_score") else None,
        include_embeddings=request.include_embeddings,
    )


async def search_resources(
    rt: Runtime, request: query_pb2.SearchResourcesRequest, scope: Predicate | None = None,
    *, max_k: int = MAX_K,
) -> query_pb2.SearchResourcesResponse:
    """Run a validated search inside `scope` (None: all local data), at most `max_k` hits."""
    q = validate_search(rt, request)
    if q.k > max_k:
        q = dataclasses.replace(q, k=max_k)
    hits = await search(rt.pool, q, metric=cast(Metric, rt.cfg.store.metric), scope=scope)
    response = query_pb2.SearchResourcesResponse()
    add = response.hits.add
    for r, score in hits:
        hit = add(score=score)  # filled in place: no per-hit message copies
        fill_resource(hit.resource, r)
    return response
