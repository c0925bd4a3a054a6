"""The registry of command types: built-ins plus handlers from the `tessera.commands`
entry-point group, each with a compiled validator for its input schema."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import jsonschema

from tessera.commands._handler import CommandHandler
from tessera.core.errors import ConfigError, FieldViolation, InvalidArgument

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tessera.commands"
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$")
_RESERVED = "resource."
_MAX_VIOLATIONS = 10

_KEY = {"type": "object", "required": ["workspace", "kind", "id"],
        "properties": {"workspace": {"type": "string"}, "kind": {"type": "string"},
                       "id": {"type": "string"}}}
_PUT = {
    "type": "object", "required": ["resource"],
    "properties": {
        "resource": {"type": "object", "required": ["workspace", "kind", "id"],
                     "properties": {"workspace": {"type": "string"},
                                    "kind": {"type": "string"}, "id": {"type": "string"},
                                    "title": {"type": "string"}, "body": {"type": "string"},
                                    "attributes": {"type": "object"},
                                    "embedding": {"type": "array",
                                                  "items": {"type": "number"}},
                                    "owner": {"type": "string"}, "team": {"type": "string"}}},
        "expectedEtag": {"type": "string"}, "createOnly": {"type": "boolean"},
    },
}

#: The commands every node executes inside Execute's own transaction (typed in the API).
BUILTINS = (
    CommandHandler(type="resource.put", run=None, input_schema=_PUT,
                   description="Create or replace a resource (ExecuteRequest.put_resource)."),
    CommandHandler(type="resource.delete", run=None,
                   input_schema={"type": "object", "required": ["key"],
                                 "properties": {"key": _KEY,
                                                "expectedEtag": {"type": "string"},
                                                "allowMissing": {"type": "boolean"}}},
                   description="Delete a resource (ExecuteRequest.delete_resource)."),
    CommandHandler(type="resource.batch_put", run=None,
                   input_schema={"type": "object", "required": ["puts"],
                                 "properties": {"puts": {"type": "array", "minItems": 1,
                                                         "maxItems": 100, "items": _PUT}}},
                   description="Put up to 100 resources in one transaction, all or none "
                               "(ExecuteRequest.batch_put_resources)."),
)


@dataclass(frozen=True)
class Registered:
    """A handler with where it came from and its compiled input validator."""

    handler: CommandHandler
    #: "builtin", or "<distribution> <version>" of the plugin that provides it.
    source: str
    validator: Any


class Registry:
    """Command types by name."""

    def __init__(self) -> None:
        self._by_type: dict[str, Registered] = {}
        #: One line per entry point that could not be loaded (shown by `commands list`).
        self.load_errors: list[str] = []

    @classmethod
    def default(cls, *, plugins: bool = True) -> Registry:
        """The built-ins, plus every installed `tessera.commands` entry point."""
        reg = cls()
        for h in BUILTINS:
            reg.register(h, source="builtin")
        if plugins:
            reg.load_entry_points()
        return reg

    def register(self, handler: CommandHandler, *, source: str) -> None:
        """Add a handler; ConfigError when its type or schema is not acceptable."""
        if not isinstance(handler, CommandHandler):
            raise ConfigError(f"{source}: expected a CommandHandler, got "
                              f"{type(handler).__name__}")
        if not _TYPE_RE.match(handler.type) or len(handler.type) > 64:
            raise ConfigError(f"{source}: command type {handler.type!r} must be dotted "
                              "lower-case words, e.g. 'task.assign', at most 64 characters")
        if source != "builtin" and (handler.type.startswith(_RESERVED) or handler.run is None):
            raise ConfigError(f"{source}: command type {handler.type!r} needs a run function "
                              f"and may not use the reserved prefix {_RESERVED!r}")
        if source != "builtin" and handler.granted_with:
            # A plugin must not ride on grants written for another command type.
            raise ConfigError(f"{source}: {handler.type}: granted_with is for built-in "
                              "handlers only; a grant names plugin types itself")
        if handler.type in self._by_type:
            raise ConfigError(f"{source}: command type {handler.type!r} is already "
                              f"registered by {self._by_type[handler.type].source}")
        if handler.timeout_s <= 0:
            raise ConfigError(f"{source}: {handler.type}: timeout_s must be positive")
        schema = dict(handler.input_schema)
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"{source}: {handler.type}: input_schema is not a valid JSON "
                              f"Schema: {exc.message}") from None
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        self._by_type[handler.type] = Registered(handler, source, validator)

    def load_entry_points(self) -> None:
        """Register each `tessera.commands` entry point; a broken one is logged and skipped.

        An entry point names a CommandHandler, a list of them, or a function returning
        either; its name should be the command type it provides.
        """
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist
            source = f"{dist.name} {dist.version}" if dist is not None else ep.value
            try:
                obj: Any = ep.load()
                if callable(obj) and not isinstance(obj, CommandHandler):
                    obj = obj()
                handlers = [obj] if isinstance(obj, CommandHandler) else list(obj)
                for h in handlers:
                    self.register(h, source=source)
            except Exception as exc:
                msg = f"entry point {ep.name} = {ep.value} ({source}): {exc}"
                self.load_errors.append(msg)
                log.error("command handler not loaded: %s", msg)

    def get(self, command_type: str) -> Registered | None:
        """The registration of a type, or None."""
        return self._by_type.get(command_type)

    def all(self) -> list[Registered]:
        """Every registration, sorted by type."""
        return [self._by_type[t] for t in sorted(self._by_type)]

    def background_types(self) -> list[str]:
        """Types whose handlers run in the background (what a runner may claim)."""
        return [t for t, r in sorted(self._by_type.items()) if r.handler.long_running]

    def validate(self, command_type: str, args: Mapping[str, Any], *,
                 field: str = "plugin.args") -> None:
        """Check `args` against the type's schema; InvalidArgument naming each bad field."""
        reg = self._by_type[command_type]
        errors = sorted(reg.validator.iter_errors(dict(args)),
                        key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            # jsonschema reports a "required" error per missing property, each naming all.
            found = list(dict.fromkeys(v for e in errors for v in _violations(field, e)))
            raise InvalidArgument(found[:_MAX_VIOLATIONS])


def _dotted(prefix: str, path: Iterable[Any]) -> str:
    return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _violations(prefix: str, err: jsonschema.ValidationError) -> list[FieldViolation]:
    path = list(err.absolute_path)
    if err.validator == "required" and isinstance(err.instance, Mapping):
        # Name each missing property itself, not the object that lacks it.
        missing = [p for p in _strings(err.validator_value) if p not in err.instance]
        if missing:
            return [FieldViolation(_dotted(prefix, [*path, m]), "is required") for m in missing]
    return [FieldViolation(_dotted(prefix, path), err.message[:300])]


def _strings(value: Any) -> Iterable[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
