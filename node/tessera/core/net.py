"""host:port addresses: splitting them, and wildcard (any-address) hosts."""

from __future__ import annotations

#: Hosts that mean "every address" when bound: nobody can dial them.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - matching, not binding


def host_of(address: str) -> str:
    """The host of host:port as written (an IPv6 host keeps its brackets)."""
    return address.rpartition(":")[0]


def port_of(address: str) -> str:
    """The port of host:port as written."""
    return address.rpartition(":")[2]


def split_host_port(address: str, *, min_port: int = 0) -> tuple[str, int]:
    """host:port -> (host without IPv6 brackets, port); ValueError unless the port is a
    number in min_port..65535 and the host is not empty."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not min_port <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port with a port in {min_port}..65535")
    return host.strip("[]"), int(port)


def is_wildcard_host(host: str) -> bool:
    """True for a host that binds every address (0.0.0.0, ::, empty)."""
    return host in WILDCARD_HOSTS


def dialable(address: str) -> str:
    """host:port others can dial for a bound address (wildcard hosts become loopback)."""
    host = host_of(address)
    return f"{'127.0.0.1' if is_wildcard_host(host) else host}:{port_of(address)}"
