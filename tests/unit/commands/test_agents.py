"""The agent allow-list: every wrong entry stops the start with one line naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from google.rpc import code_pb2

from tessera.commands import (
    CommandError,
    CommandHandler,
    Registry,
    UidClaims,
    UidRange,
    parse_agents,
    parse_uid_range,
)
from tessera.config import AgentsConfig
from tessera.core.errors import ConfigError

PROBE = Path(__file__).resolve().parents[3] / "examples" / "agents" / "probe.sh"


def entry(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "executable": str(PROBE), "args": ["--try-read", "/etc/hostname"],
        "params": ["name"], "cwd": "/tmp",
        "schema": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_a_good_entry_places_values_only_after_the_separator(tmp_path: Path) -> None:
    specs = parse_agents(AgentsConfig(allow={"probe": entry(params=["name", "n"], schema={
        "type": "object", "properties": {"name": {"type": "string"},
                                         "n": {"type": "integer"}}})}), tmp_path)
    spec = specs["probe"]
    assert spec.argv({"n": 3.0, "name": "--try-read=/x"}) == [
        str(PROBE), "--try-read", "/etc/hostname", "--", "--try-read=/x", "3"]
    # An absent value keeps its position, so a later one never moves into it.
    assert spec.argv({"n": 1}) == [str(PROBE), "--try-read", "/etc/hostname", "--", "", "1"]
    assert spec.schema["additionalProperties"] is False


@pytest.mark.parametrize(("changes", "says"), [
    ({"executable": "probe.sh"}, "executable must be an absolute path"),
    ({"executable": "/nonexistent/agent"}, "is not an executable file"),
    ({"args": "--all"}, "args must be a list of strings"),
    ({"params": ["name", "name"]}, "distinct argument names"),
    ({"schema": {"type": "object", "properties": {}}}, "exactly the params"),
    ({"schema": {"type": "object", "properties": {"name": {"type": "array"}}}},
     "scalar type"),
    ({"schema": {"type": "object", "properties": {"name": {"type": 3}}}},
     "not a valid JSON Schema"),
    ({"env": ["TESSERA_STORE_DSN"]}, "may not pass"),
    ({"env": ["AWS_SECRET_ACCESS_KEY"]}, "may not pass"),
    ({"cwd": "relative"}, "cwd must be an existing absolute directory"),
    ({"time_limit_s": 0}, "time_limit_s must be a number"),
    ({"max_per_grant": True}, "max_per_grant must be a number"),
    ({"shell": True}, "unknown keys ['shell']"),
])
def test_a_wrong_entry_is_named_in_one_line(tmp_path: Path, changes: dict[str, Any],
                                            says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_agents(AgentsConfig(allow={"good": entry(), "bad": entry(**changes)}), tmp_path)
    message = err.value.message
    assert "\n" not in message
    assert message.startswith("agents.bad: ") and says in message, message


def test_nothing_inside_the_data_directory_runs_or_is_a_working_directory(
        tmp_path: Path) -> None:
    inside = tmp_path / "data" / "bin"
    inside.mkdir(parents=True)
    exe = inside / "agent"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with pytest.raises(ConfigError, match="executable must be outside the data directory"):
        parse_agents(AgentsConfig(allow={"a": entry(executable=str(exe))}), tmp_path / "data")
    with pytest.raises(ConfigError, match="cwd must be outside the data directory"):
        parse_agents(AgentsConfig(allow={"a": entry(cwd=str(inside))}), tmp_path / "data")


def test_a_uid_range_is_parsed_and_never_holds_root_nobody_or_the_node() -> None:
    rng = parse_uid_range("1900000000-1900065535")
    assert rng == UidRange(1_900_000_000, 1_900_065_535) and rng.size == 65536
    assert 1_900_000_000 in rng and 1_899_999_999 not in rng
    for text, says in (("100", "is not LOW-HIGH"), ("a-b", "is not LOW-HIGH"),
                       ("20-10", "LOW <= HIGH"), ("1-4294967294", "LOW <= HIGH"),
                       ("0-10", "holds 0"), ("65000-66000", "holds 65534"),
                       (f"{os.geteuid()}-{os.geteuid()}", f"holds {os.geteuid()}")):
        with pytest.raises(ConfigError) as err:
            parse_uid_range(text)
        assert str(err.value).startswith("agents.uid_range: ") and says in str(err.value), text


def test_a_claimed_uid_is_not_handed_out_twice_and_its_claim_file_goes_with_it(
        tmp_path: Path) -> None:
    claims = UidClaims(UidRange(1_900_000_007, 1_900_000_007), tmp_path / "uids")
    user, fd = claims.claim()
    assert (user.uid, user.gid) == (1_900_000_007, 1_900_000_007)
    # Another claimant (its own open file, as a sibling process has) finds none free.
    with pytest.raises(CommandError) as err:
        UidClaims(claims.range, tmp_path / "uids").claim()
    assert err.value.code == code_pb2.RESOURCE_EXHAUSTED and err.value.reason == "AGENT_NO_UID"
    claims.release(user.uid, fd)
    assert list((tmp_path / "uids").iterdir()) == []
    again, fd = claims.claim()
    assert again.uid == user.uid
    # A claim file nobody holds (its node was killed) is swept; a held one is not.
    (tmp_path / "uids" / "1900000100").touch()
    assert claims.sweep() == 1
    assert [p.name for p in (tmp_path / "uids").iterdir()] == ["1900000007"]
    claims.release(again.uid, fd)


def test_only_built_in_handlers_may_ride_on_another_types_grant() -> None:
    async def run(ctx: Any) -> None:
        return None

    sneaky = CommandHandler(type="x.steal", run=run, granted_with="resource.put")
    with pytest.raises(ConfigError) as err:
        Registry().register(sneaky, source="evil 1.0")
    assert "granted_with is for built-in handlers only" in str(err.value)
