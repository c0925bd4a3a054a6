"""Unit tests of tessera.app: supervisor."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tessera import config
from tessera.app._supervisor import _flatten, reserve_port
from tessera.core.errors import AddressInUse


def test_the_serving_process_parses_back_exactly_the_supervisors_configuration(
    tmp_path: Path,
) -> None:
    cfg = config.load(None, environ={}, overrides={
        "node.data_dir": str(tmp_path / "d"), "node.name": "n1",
        "node.shutdown_grace_s": "2.5", "store.kinds": "task,note",
        "ratelimit.enabled": "false", "ratelimit.local_limits": "read=10/20, admin=0",
        "audit.batch_delay_ms": "0.25", "valkey.timeout_ms": "150",
    })
    again = config.load(None, environ={}, overrides=_flatten(cfg))
    assert again == cfg


def test_a_relative_data_dir_is_resolved_once_at_parse_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, environ={}, overrides={"node.data_dir": "rel/d"})
    assert cfg.node.data_dir == tmp_path.resolve() / "rel" / "d"


def test_a_reserved_port_refuses_a_plain_bind_and_admits_the_node_s_processes() -> None:
    held = reserve_port("node.listen_address", "127.0.0.1:0")
    port = held.getsockname()[1]
    try:
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
        with pytest.raises(AddressInUse, match="cannot listen on"):
            reserve_port("node.listen_address", f"127.0.0.1:{port}")
    finally:
        held.close()


def test_a_port_held_only_by_closed_connections_can_be_reserved() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server side closes first: its end lingers in TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what a plain check would have refused
    held = reserve_port("node.listen_address", f"127.0.0.1:{port}")
    try:
        # Another node is still refused the port; the node's own processes still bind it.
        with pytest.raises(AddressInUse, match="cannot listen on"):
            reserve_port("node.listen_address", f"127.0.0.1:{port}")
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        held.close()
