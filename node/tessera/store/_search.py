"""k-NN search over pgvector embeddings, optionally fused with full-text ranks (RRF)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from opentelemetry.trace import SpanKind
from psycopg import sql

from tessera.observability import traced
from tessera.store._predicate import Predicate
from tessera.store._resources import (
    _COLUMNS,
    _COLUMNS_NO_EMBEDDING,
    Pool,
    Resource,
    _row_to_resource,
    resource_filters,
    to_vector,
)

Metric = Literal["cosine", "l2", "inner_product"]
#: pgvector distance operator per metric; the HNSW index is built for exactly one of them.
_OPERATOR = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
#: Reciprocal rank fusion constant (Cormack et al.); 60 is the customary value.
RRF_K = 60
#: Each ranked list feeds this many times k candidates into the fusion.
CANDIDATES_PER_K = 4


@dataclass(frozen=True)
class SearchQuery:
    """A validated search."""

    k: int
    embedding: Sequence[float] | None = None
    text: str = ""
    workspace: str = ""
    kind: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    updated_since: datetime | None = None
    min_score: float | None = None
    include_embeddings: bool = False


def score_expression(metric: Metric) -> str:
    """SQL turning the metric's distance into a score where higher is better."""
    if metric == "cosine":
        return "1 - (embedding <=> %b::vector)"
    if metric == "l2":
        return "-(embedding <-> %b::vector)"
    return "-(embedding <#> %b::vector)"  # <#> is the negative inner product


#: ef_search every pooled connection starts with (see store.open_pool): searches with
#: k <= 37 need no per-query setting, so they run as one statement, not four.
DEFAULT_EF_SEARCH = 150


def ef_search_for(k: int) -> int:
    """HNSW candidate list size for k. On the 100k x 384 benchmark, recall@10 was 0.94 at
    pgvector's default of 40, 0.963-0.985 at 100 (it moves with each index build), 0.993
    at 150 and 0.996 at 200; larger k scale it, up to pgvector's maximum."""
    return min(1000, max(DEFAULT_EF_SEARCH, 4 * k))


def _filters(q: SearchQuery, scope: Predicate | None) -> tuple[sql.Composable, list[Any]]:
    # The order of the conditions (scope last) is the order _statement_params follows.
    parts, params = resource_filters(scope, workspace=q.workspace, kind=q.kind,
                                     attributes=q.attributes, updated_since=q.updated_since)
    if not parts:
        return sql.SQL("TRUE"), params
    return sql.SQL(" AND ").join(parts), params


def _vector_hits(q: SearchQuery, metric: Metric, where: sql.Composable, wparams: list[Any],
                 limit: int, cols: sql.Composable) -> tuple[sql.Composable, list[Any]]:
    """Nearest rows by the index's own operator, so the HNSW index serves the ORDER BY."""
    assert q.embedding is not None
    vec = to_vector(q.embedding)  # binary, as pgvector's own wire form
    score = sql.SQL(score_expression(metric))
    query = sql.SQL(
        "SELECT {cols}, {score} AS score FROM resources WHERE embedding IS NOT NULL AND {where}"
        " ORDER BY embedding {op} %b::vector LIMIT %s"
    ).format(cols=cols, score=score, where=where, op=sql.SQL(_OPERATOR[metric]))
    return query, [vec, *wparams, vec, limit]


def _text_hits(q: SearchQuery, where: sql.Composable, wparams: list[Any], limit: int,
               cols: sql.Composable) -> tuple[sql.Composable, list[Any]]:
    """Rows matching the text, best full-text rank first."""
    query = sql.SQL(
        "SELECT {cols}, ts_rank_cd(fts, tq)::float8 AS score"
        " FROM resources, websearch_to_tsquery('simple', %s) AS tq"
        " WHERE fts @@ tq AND {where} ORDER BY score DESC, workspace, kind, id LIMIT %s"
    ).format(cols=cols, where=where)
    return query, [q.text, *wparams, limit]


def search_statement(
    q: SearchQuery, *, metric: Metric, scope: Predicate | None = None
) -> tuple[sql.Composable, list[Any]]:
    """The one statement `search` runs for `q`, with its parameters.

    The SQL depends only on the query's shape (which filters are set, the scope's
    condition), so it is composed once per shape and kept as text; the parameters are
    built per call, in the order `composed_statement` puts them.
    """
    condition = None if scope is None else scope.condition.as_string()
    text = _statement_text(metric, q.include_embeddings, q.embedding is not None, bool(q.text),
                           bool(q.workspace), bool(q.kind), bool(q.attributes),
                           q.updated_since is not None, condition)
    return sql.SQL(text), _statement_params(q, scope)


def _statement_params(q: SearchQuery, scope: Predicate | None) -> list[Any]:
    """The parameters of `composed_statement(q, ...)`, without composing its SQL."""
    wparams: list[Any] = [v for v in (q.workspace, q.kind) if v]
    if q.attributes:
        wparams.append(json.dumps(q.attributes))
    if q.updated_since is not None:
        wparams.append(q.updated_since)
    if scope is not None:
        wparams.extend(scope.params)
    if q.embedding is not None:
        vec = to_vector(q.embedding)
        if not q.text:
            return [vec, *wparams, vec, q.k]
        cand = q.k * CANDIDATES_PER_K
        return [vec, *wparams, vec, cand, q.text, *wparams, cand, q.k]
    return [q.text, *wparams, q.k]


@functools.lru_cache(maxsize=512)
def _statement_text(metric: Metric, include_embeddings: bool, vector: bool, text: bool,
                    workspace: bool, kind: bool, attributes: bool, updated_since: bool,
                    condition: str | None) -> str:
    """The SQL of one query shape (placeholder values stand in for the real ones)."""
    shape = SearchQuery(
        k=1, embedding=[0.0] if vector else None, text="x" if text else "",
        workspace="w" if workspace else "", kind="k" if kind else "",
        attributes={"a": 1} if attributes else {},
        updated_since=datetime.min if updated_since else None,
        include_embeddings=include_embeddings)
    scope = None if condition is None else Predicate(sql.SQL(condition))
    return composed_statement(shape, metric=metric, scope=scope)[0].as_string()


def composed_statement(
    q: SearchQuery, *, metric: Metric, scope: Predicate | None = None
) -> tuple[sql.Composable, list[Any]]:
    """`search_statement`'s statement, composed from its parts (once per shape)."""
    where, wparams = _filters(q, scope)
    keys = sql.SQL("workspace, kind, id")
    cols = _COLUMNS if q.include_embeddings else _COLUMNS_NO_EMBEDDING
    query: sql.Composable
    if q.embedding is not None and not q.text:
        inner, params = _vector_hits(q, metric, where, wparams, q.k, cols)
        # Iterative scans (relaxed order) keep filtered searches returning k rows; the
        # outer ORDER BY restores exact order among the rows found.
        query = sql.SQL("SELECT * FROM ({}) AS hits ORDER BY score DESC, workspace, kind, id"
                        ).format(inner)
    elif q.text and q.embedding is None:
        query, params = _text_hits(q, where, wparams, q.k, cols)
    else:
        cand = q.k * CANDIDATES_PER_K
        vq, vparams = _vector_hits(q, metric, where, wparams, cand, keys)
        tq, tparams = _text_hits(q, where, wparams, cand, keys)
        # Reciprocal rank fusion: 1/(RRF_K + rank) summed over both lists. Ties (first in
        # one list only) go to the better text rank, so an exact text match leads.
        query = sql.SQL(
            "WITH v AS (SELECT workspace, kind, id,"
            "   row_number() OVER (ORDER BY score DESC, workspace, kind, id) AS rank"
            "   FROM ({vq}) x),"
            " t AS (SELECT workspace, kind, id,"
            "   row_number() OVER (ORDER BY score DESC, workspace, kind, id) AS rank"
            "   FROM ({tq}) y),"
            " fused AS (SELECT workspace, kind, id,"
            "   (coalesce(1.0 / ({rrf} + v.rank), 0) + coalesce(1.0 / ({rrf} + t.rank), 0))::float8"
            "   AS fscore, t.rank AS trank FROM v FULL OUTER JOIN t USING (workspace, kind, id))"
            " SELECT {cols}, fused.fscore AS score"
            " FROM fused JOIN resources USING (workspace, kind, id)"
            " ORDER BY fused.fscore DESC, fused.trank NULLS LAST, workspace, kind, id LIMIT %s"
        ).format(vq=vq, tq=tq, rrf=sql.Literal(RRF_K), cols=cols)
        params = [*vparams, *tparams, q.k]
    return query, params


@traced("store search", SpanKind.CLIENT, **{"db.system": "postgresql"})
async def search(
    pool: Pool, q: SearchQuery, *, metric: Metric, scope: Predicate | None = None
) -> list[tuple[Resource, float]]:
    """Best-first hits; filters and scope are applied inside the index scan."""
    query, params = search_statement(q, metric=metric, scope=scope)
    async with pool.connection() as conn:
        ef = ef_search_for(q.k)
        if q.embedding is None or ef == DEFAULT_EF_SEARCH:
            cur = await conn.execute(cast(sql.Composed, query), params, binary=True)
            rows = await cur.fetchall()
        else:
            async with conn.transaction():
                await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
                cur = await conn.execute(cast(sql.Composed, query), params, binary=True)
                rows = await cur.fetchall()
    hits = [(_row_to_resource(r), float(r["score"])) for r in rows]
    if q.min_score is not None:
        hits = [h for h in hits if h[1] >= q.min_score]
    return hits
