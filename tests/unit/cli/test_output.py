"""The CLI's one output style and its one command table."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest

from tessera import cli
from tessera.cli import Column, Printer, dumps, enum_name, rfc3339, to_json
from tessera_client.pb import admin_pb2, command_pb2


def test_json_uses_proto_names_enum_names_without_prefix_and_rfc3339_times() -> None:
    peer = admin_pb2.Peer(name="a", state=admin_pb2.PEER_STATE_ACTIVE)
    peer.create_time.FromDatetime(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    out = to_json(admin_pb2.ListPeersResponse(peers=[peer]))
    assert out["peers"][0]["state"] == "ACTIVE"
    assert out["peers"][0]["create_time"] == "2026-01-02T03:04:05Z"
    assert "next_page_token" in out  # defaults are printed, so scripts see every field
    status = admin_pb2.CertificateStatus(state=admin_pb2.CertificateStatus.STATE_HEALTHY)
    assert to_json(status)["state"] == "HEALTHY"
    record = admin_pb2.AuditRecord(outcome=admin_pb2.AUDIT_OUTCOME_DENIED_BY_POLICY)
    assert json.loads(dumps(record, compact=True))["outcome"] == "DENIED_BY_POLICY"


def test_enum_name_and_rfc3339() -> None:
    assert enum_name(command_pb2.OperationState,
                     command_pb2.OPERATION_STATE_SUCCEEDED) == "SUCCEEDED"
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    plus_one = dt.timezone(dt.timedelta(hours=1))
    assert rfc3339(dt.datetime(2026, 1, 2, 4, 4, 5, tzinfo=plus_one)) == "2026-01-02T03:04:05Z"


def test_printer_prints_json_or_the_human_form() -> None:
    buf = io.StringIO()
    Printer(json_output=True, out=buf).result({"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)},
                                               lambda: pytest.fail("human form with --json"))
    assert json.loads(buf.getvalue()) == {"when": "2026-01-01T00:00:00Z"}
    buf = io.StringIO()
    Printer(out=buf).result({"a": 1}, lambda: None)
    assert buf.getvalue() == ""


def test_table_aligns_columns_to_the_widest_cell() -> None:
    buf = io.StringIO()
    Printer(out=buf).table(
        [{"name": "a", "n": 1}, {"name": "longer", "n": 22}],
        [Column("NAME", "name"), Column("N", "n", align=">"),
         Column("OK", "n", show=lambda v: "yes" if v > 5 else "no")])
    assert buf.getvalue().splitlines() == ["NAME    N OK", "a       1 no", "longer 22 yes"]


def test_every_command_of_the_table_parses_and_every_noun_has_help() -> None:
    parser = cli.build_parser()
    nouns = {path.partition(" ")[0] for path in cli.COMMANDS if " " in path}
    assert nouns == set(cli.NOUNS)
    for path, command in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*path.split(), "--help"])
        assert done.value.code == 0, path
        assert command.help


def test_printable_escapes_what_could_redraw_a_terminal_and_keeps_lines() -> None:
    from tessera.cli import printable

    assert printable("plain text, é ✓") == "plain text, é ✓"
    assert printable("a\nb\tc") == "a\nb\tc"
    assert printable("\x1b[2K\rok\x07\u202e\x9b") == "\\x1b[2K\\rok\\x07\\u202e\\x9b"
