"""The audit encoding is a published format: logs written by earlier releases must verify.

The canonical bytes of a record and the request hash are what an external verifier (or
the next release) recomputes from the rows or an export, so they are pinned to the bytes
the module documents rather than to whatever the encoder produces today.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

from tessera.audit import GENESIS, AuditEntry, canonical, chain_hash, prune_entry, query_hash
from tessera_client.pb import command_pb2, query_pb2

ENTRY = AuditEntry(
    time=dt.datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=dt.UTC), identity="spiffe://d/node/b",
    peer="b", grant="grants/g", service="tessera.v1.QueryService", method="ListResources",
    kind="task", query_hash="ab" * 4, outcome="ALLOWED", status_code="OK", bytes_out=120,
    latency_us=800, trace_id="t1", reason="",
)
DOCUMENTED = (b'7\n[1795262400123456,"spiffe://d/node/b","b","grants/g",'
              b'"tessera.v1.QueryService","ListResources","task","abababab","ALLOWED","OK",'
              b'120,800,"t1",""]')


def test_a_record_is_encoded_as_its_sequence_and_a_compact_json_array() -> None:
    assert canonical(7, ENTRY) == DOCUMENTED


def test_a_detail_is_a_fifteenth_element_with_sorted_keys() -> None:
    e = dataclasses.replace(ENTRY, detail={"zz": 1, "aaa": {"b": 2, "a": [1, "x"]}})
    assert canonical(7, e) == DOCUMENTED[:-1] + b',{"aaa":{"a":[1,"x"],"b":2},"zz":1}]'


def test_a_prune_record_is_encoded_as_documented() -> None:
    record = prune_entry(dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC), 4, b"\1" * 32)
    assert canonical(9, record) == (
        b'9\n[1000000,"","","","tessera.audit","Prune","","","ALLOWED","OK",0,0,"",'
        b'"AUDIT_PRUNED",{"anchor_hash":"' + b"01" * 32 + b'","anchor_sequence":4}]')


def test_the_hash_of_a_record_written_by_an_earlier_release_still_matches() -> None:
    # sha256(GENESIS || DOCUMENTED), as the database function computes it.
    assert chain_hash(GENESIS, 7, ENTRY).hex() == hashlib.sha256(GENESIS + DOCUMENTED).hexdigest()
    assert chain_hash(GENESIS, 7, ENTRY).hex() == (
        "7300ffa5f6f9dfb80a3db6c379554b2f623bbb35373a71e649ecffd059daf53b")


def test_the_request_hash_is_sha256_of_type_name_nul_and_deterministic_body() -> None:
    req = query_pb2.ListResourcesRequest(workspace="w", kind="task", page_size=10)
    body = req.SerializeToString(deterministic=True)
    assert query_hash(req) == hashlib.sha256(
        b"tessera.v1.ListResourcesRequest\0" + body).hexdigest()


def test_the_same_command_hashes_the_same_whatever_order_its_arguments_came_in() -> None:
    # Struct arguments are a map: two clients may send its entries in any order, and the
    # server parses them in wire order. The audit hash must not depend on it.
    keys = [f"key-{i}" for i in range(40)]
    wires = []
    for order in (keys, keys[::-1], keys[::2] + keys[1::2]):
        req = command_pb2.ExecuteRequest(idempotency_key="k")
        req.plugin.type = "task.assign"
        for k in order:
            req.plugin.args[k] = k
        wires.append(req.SerializeToString())
    assert len(set(wires)) > 1, "the wire orders differ, or this test proves nothing"
    received = [command_pb2.ExecuteRequest.FromString(w) for w in wires]
    assert len({query_hash(r) for r in received}) == 1
