"""Unit tests of tessera.app: metrics."""

from __future__ import annotations

from tessera.app._metrics import merge

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
