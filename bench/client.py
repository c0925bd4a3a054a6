"""The client process: `python -m bench.client ...` measures one target, prints JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc

from bench.driver import Measurement, measure
from bench.memory import CpuGroup
from bench.targets import TARGETS


def secure_channel(address: str, ca: Path, cert: Path, key: Path,
                   server_name: str) -> grpc.aio.Channel:
    """An mTLS channel like a local tool would open."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.aio.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", server_name)]
    )


async def run(args: argparse.Namespace) -> Measurement:
    """Prepare the target on one channel, then drive it."""
    spec = TARGETS[args.target]
    async with secure_channel(args.address, args.ca, args.cert, args.key,
                              args.server_name) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        call = await spec.prepare(channel)
        return await measure(spec.name, call, concurrency=args.concurrency,
                             duration_s=args.duration, warmup_s=args.warmup,
                             cpu_groups=[CpuGroup.parse(c) for c in args.cpu])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the client process."""
    p = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    p.add_argument("--target", required=True, choices=sorted(TARGETS))
    p.add_argument("--address", required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--cpu", action="append", default=[], metavar="NAME=PID[+]",
                   help="report this process's CPU per call (+: with its descendants)")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    json.dump(result.to_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
