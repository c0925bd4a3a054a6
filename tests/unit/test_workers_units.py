"""Pure pieces of `--workers`: the setting, the split of local limits, merged metrics."""

from __future__ import annotations

import os
import socket

import pytest

from tessera import config
from tessera.app._metrics import merge
from tessera.app._supervisor import reserve_port
from tessera.core.errors import AddressInUse, ConfigError
from tessera.ratelimit import Limit, LocalGcra, share_of


def test_workers_accepts_a_number_or_auto_and_names_itself_when_wrong() -> None:
    assert config.load(None, environ={}, overrides={"node.workers": "3"}).node.worker_count == 3
    auto = config.load(None, environ={}, overrides={"node.workers": "auto"})
    assert auto.node.worker_count == len(os.sched_getaffinity(0))
    assert config.load(None, environ={}, overrides={"node.workers": 2}).node.worker_count == 2
    for bad in ("0", "many", "-1", "257"):
        with pytest.raises(ConfigError, match=r"node\.workers"):
            config.load(None, environ={}, overrides={"node.workers": bad})


def test_each_process_gets_its_share_of_a_limit() -> None:
    assert share_of(Limit(100, 40), 1) == Limit(100, 40)
    assert share_of(Limit(100, 40), 4) == Limit(25, 10)
    assert share_of(Limit(10, 1), 2) == Limit(5, 1)  # a burst of at least one
    assert share_of(Limit(0, 0), 4) == Limit(0, 0)  # unlimited stays unlimited


def test_two_local_limiters_together_admit_the_burst_once() -> None:
    limit = Limit(0.001, 10)
    workers = [LocalGcra(processes=2), LocalGcra(processes=2)]
    admitted = sum(w.decide("k", limit, now_us=1_000_000).allowed
                   for w in workers for _ in range(20))
    assert admitted == 10


_A = """# HELP grpc_server_handled_total RPCs
# TYPE grpc_server_handled_total counter
grpc_server_handled_total{grpc_method="Get",grpc_code="OK"} 3.0
# HELP tessera_event_streams Open streams
# TYPE tessera_event_streams gauge
tessera_event_streams{caller="local"} 2.0
# HELP tessera_event_log_head Head
# TYPE tessera_event_log_head gauge
tessera_event_log_head 7.0
# HELP tessera_certificate_expiry_timestamp_seconds Expiry
# TYPE tessera_certificate_expiry_timestamp_seconds gauge
tessera_certificate_expiry_timestamp_seconds 200.0
"""
_B = _A.replace("} 3.0", "} 4.0").replace("} 2.0", "} 5.0").replace(
    "head 7.0", "head 9.0").replace("seconds 200.0", "seconds 100.0")


def test_merged_metrics_sum_counters_and_amounts_and_keep_the_worst_timestamp() -> None:
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in merge([_A, _B]) for s in fam.samples}
    assert got[("grpc_server_handled_total",
                (("grpc_code", "OK"), ("grpc_method", "Get")))] == 7.0
    assert got[("tessera_event_streams", (("caller", "local"),))] == 7.0
    assert got[("tessera_event_log_head", ())] == 9.0
    assert got[("tessera_certificate_expiry_timestamp_seconds", ())] == 100.0


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
