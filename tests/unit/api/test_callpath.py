"""Unit tests of tessera.api: the call path's handler wrapping."""

from __future__ import annotations

from typing import Any

import grpc

from tessera.api import CallPath


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


async def test_a_served_method_is_wrapped_once_and_unknown_paths_are_not_kept() -> None:
    path = CallPath("tessera.local")
    served = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    resolved: list[str] = []

    async def continuation(details: Any) -> grpc.RpcMethodHandler | None:
        resolved.append(details.method)
        return served if details.method == "/tessera.v1.QueryService/GetResource" else None

    first = await path.intercept_service(continuation,
                                         _Details("/tessera.v1.QueryService/GetResource"))
    again = await path.intercept_service(continuation,
                                         _Details("/tessera.v1.QueryService/GetResource"))
    assert first is again and first is not served and first.unary_unary is not None
    assert resolved == ["/tessera.v1.QueryService/GetResource"]  # looked up once
    for n in range(50):  # a caller inventing paths: each still answered, none remembered
        unknown = await path.intercept_service(continuation, _Details(f"/x.Y/M{n}"))
        assert unknown is not None and unknown.stream_stream is not None
    assert len(resolved) == 51
    again = await path.intercept_service(continuation, _Details("/x.Y/M0"))
    assert len(resolved) == 52  # not kept: resolved again
