"""`tessera ca init`: write a step-ca configuration for Tessera nodes."""

from __future__ import annotations

import argparse
from pathlib import Path

from tessera.cli._command import Command, Env
from tessera.core.codec import parse_duration
from tessera.core.errors import ConfigError


def _init_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, required=True, help="directory to write into")
    p.add_argument("--address", default="127.0.0.1:9000", help="host:port step-ca listens on")
    p.add_argument("--provisioner", default="tessera", help="JWK provisioner name")
    p.add_argument("--default-ttl", default="24h", help="default certificate lifetime")
    p.add_argument("--min-ttl", default="5m", help="shortest lifetime a node may request")
    p.add_argument("--max-ttl", default="24h", help="longest lifetime a node may request")
    p.add_argument("--dns", action="append", help="a name clients use for the CA (repeat)")
    p.add_argument("--force", action="store_true", help="replace an existing configuration")


def _init(env: Env) -> int:
    """Write a step-ca configuration and say how to start it."""
    from tessera.pki import init_stepca

    args, say = env.args, env.out.line
    try:
        ttls = [parse_duration(v) for v in (args.min_ttl, args.default_ttl, args.max_ttl)]
    except ValueError as exc:
        raise ConfigError(f"--min-ttl/--default-ttl/--max-ttl: {exc}") from None
    try:
        files = init_stepca(
            args.dir, address=args.address, provisioner_name=args.provisioner,
            min_cert_ttl=ttls[0], default_cert_ttl=ttls[1], max_cert_ttl=ttls[2],
            dns_names=args.dns or None, overwrite=args.force,
        )
    except FileExistsError:
        raise ConfigError(f"--dir: {args.dir} already holds a step-ca configuration; "
                          "pass --force to replace it") from None
    except ValueError as exc:
        raise ConfigError(f"ca init: {exc}") from None
    say(f"wrote a step-ca configuration in {files.directory}:")
    for label, path in (("config", files.ca_json), ("root", files.root_cert),
                        ("intermediate", files.intermediate_cert),
                        ("intermediate key", files.intermediate_key),
                        ("root key", files.root_key), ("key password", files.password_file),
                        ("provisioner key", files.provisioner_key)):
        if path is not None:
            say(f"  {label:17} {path}")
    say(f"root fingerprint (SHA-256): {files.root_fingerprint}")
    say("start it with:")
    say(f"  step-ca --password-file {files.password_file} {files.ca_json}")
    say("then configure the node (TOML):")
    say("  [ca]")
    say(f'  url = "{files.ca_url}"')
    say(f'  root_fingerprint = "{files.root_fingerprint}"')
    say(f'  provisioner_name = "{files.provisioner_name}"')
    say(f'  provisioner_key_file = "{files.provisioner_key}"')
    say("move the root key offline; the provisioner key lets its holder enrol any identity")
    return 0


INIT = Command("write a step-ca configuration (root, provisioner)", _init, flags=_init_flags,
               data_dir=False)
