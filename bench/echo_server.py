"""The baseline server: `python -m bench.echo_server ...`, a bare grpc.aio unary echo over mTLS.

No proto, no interceptor, no servicer: one generic handler that returns the request bytes,
served with the node's own certificate and CA and requiring client certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from bench.targets import ECHO_METHOD


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT; write the bound address to --ready-file once up."""
    await serve_method(args, _echo)


async def serve_method(
    args: argparse.Namespace,
    behaviour: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]],
) -> None:
    """Serve `behaviour` (raw bytes in and out) at ECHO_METHOD over mTLS (--cert, --key,
    --ca) on --listen until SIGTERM or SIGINT; write the bound address to --ready-file once
    up. Shared by the baselines, so they differ only in what the method does."""
    service, method = ECHO_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(behaviour)}
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(args.key.read_bytes(), args.cert.read_bytes())],
        root_certificates=args.ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(args.listen, creds)
    await server.start()
    host = args.listen.rpartition(":")[0]
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": f"{host}:{port}", "pid": os.getpid()}))
    tmp.replace(args.ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the echo server process."""
    p = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
