"""The command registry's pure logic: type names, schemas, argument checks naming fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tessera.commands import BUILTINS, CommandContext, CommandHandler, Registry
from tessera.core.errors import ConfigError, InvalidArgument


async def _noop(ctx: CommandContext) -> Mapping[str, Any] | None:
    return None


def handler(type_: str = "task.assign", **kw: Any) -> CommandHandler:
    return CommandHandler(type=type_, run=_noop, **kw)


SCHEMA = {
    "type": "object", "required": ["task", "people"], "additionalProperties": False,
    "properties": {
        "task": {"type": "string", "minLength": 1},
        "people": {"type": "array", "items": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"}}}},
        "due": {"type": "string", "format": "date"},
    },
}


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


def test_builtins_are_registered_inline_and_plugins_in_the_background() -> None:
    reg = Registry.default(plugins=False)
    reg.register(handler(), source="acme-tasks 1.0")
    assert [r.handler.type for r in reg.all()] == sorted(
        [*(h.type for h in BUILTINS), "task.assign"])
    assert reg.background_types() == ["task.assign"]


@pytest.mark.parametrize(("args", "expected"), [
    ({"people": []}, ["plugin.args.task"]),
    ({"task": "", "people": []}, ["plugin.args.task"]),
    ({"task": "t", "people": [{"name": "a"}, {}]}, ["plugin.args.people[1].name"]),
    ({"task": "t", "people": [], "due": "tomorrow"}, ["plugin.args.due"]),
    ({"task": "t", "people": [], "extra": 1}, ["plugin.args"]),
    ({}, ["plugin.args.people", "plugin.args.task"]),
])
def test_arguments_failing_the_schema_name_each_field(args: dict[str, Any],
                                                      expected: list[str]) -> None:
    reg = Registry()
    reg.register(handler(input_schema=SCHEMA), source="t")
    with pytest.raises(InvalidArgument) as exc:
        reg.validate("task.assign", args)
    assert sorted(fields(exc)) == expected


def test_valid_arguments_pass() -> None:
    reg = Registry()
    reg.register(handler(input_schema=SCHEMA), source="t")
    reg.validate("task.assign", {"task": "t", "people": [{"name": "a"}], "due": "2026-11-28"})


@pytest.mark.parametrize(("h", "source", "message"), [
    (handler("Task"), "p", "dotted lower-case"),
    (handler("task"), "p", "dotted lower-case"),
    (handler("resource.purge"), "p", "reserved prefix"),
    (CommandHandler(type="task.none", run=None), "p", "needs a run function"),
    (handler(input_schema={"type": "nonsense"}), "p", "not a valid JSON Schema"),
    (handler(timeout_s=0), "p", "timeout_s"),
])
def test_unacceptable_handlers_are_refused_naming_the_plugin(
    h: CommandHandler, source: str, message: str,
) -> None:
    with pytest.raises(ConfigError) as exc:
        Registry().register(h, source=source)
    assert message in str(exc.value) and str(exc.value).startswith(source)


def test_a_type_registered_twice_is_refused_naming_the_first() -> None:
    reg = Registry()
    reg.register(handler(), source="first 1.0")
    with pytest.raises(ConfigError, match=r"first 1\.0"):
        reg.register(handler(), source="second 2.0")
