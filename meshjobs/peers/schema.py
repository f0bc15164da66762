"""A small, strict JSON-schema validator for the subset AI personas use.

The ``jsonschema`` package is not a dependency of meshjobs, and persona
schemas need only a small, well-defined subset, so this module implements it
and refuses everything else when a persona is loaded (a keyword that would be
silently ignored is worse than an error):

- ``type``: ``object``, ``array``, ``string``, ``number``, ``integer``,
  ``boolean``, ``null``, or a list of them;
- objects: ``properties``, ``required``, ``additionalProperties`` (``false``,
  ``true`` or a schema);
- arrays: ``items``, ``minItems``, ``maxItems``;
- strings: ``minLength``, ``maxLength`` (in code points);
- numbers: ``minimum``, ``maximum``;
- any: ``enum``, ``const``; annotations ``title``, ``description``,
  ``default``, ``examples``, ``$comment`` are accepted and ignored.

JSON semantics, not Python's: ``true`` is not ``1``, ``1.0`` is an integer.
Problems are reported with a path: ``$.risks[0].severity: expected one of
"low", "medium", "high", got "urgent"``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from meshjobs.errors import UsageError

TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "enum",
        "const",
    }
)
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment"})
MAX_SCHEMA_DEPTH = 16
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SchemaError(UsageError):
    """A schema uses something outside the supported subset, or is malformed."""


def json_type(value: Any) -> str:
    """The JSON type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is(value: Any, kind: str) -> bool:
    actual = json_type(value)
    if kind == "number":
        return actual in ("integer", "number") and (actual == "integer" or math.isfinite(value))
    if kind == "integer":
        return actual == "integer" or (actual == "number" and math.isfinite(value) and float(value).is_integer())
    return actual == kind


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` differs from ``1``; ``1`` equals ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if _IDENT.fullmatch(key) else f"{path}[{json.dumps(key)}]"


# -- checking a schema ------------------------------------------------------


def check_schema(schema: Any, where: str = "schema", depth: int = 0) -> None:
    """Raise :class:`SchemaError` naming the place if *schema* leaves the supported subset.

    *where* names the schema in messages; ``""`` reports paths relative to it.
    """
    if not isinstance(schema, dict):
        raise SchemaError(_at(where, f"a schema must be a table (object), not {json_type(schema)}"))
    if depth == 0:
        try:
            json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError):
            raise SchemaError(_at(where, "holds a value JSON cannot represent (a TOML date or time?)")) from None
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(_at(where, f"nested deeper than {MAX_SCHEMA_DEPTH} levels"))
    for key in schema:
        if key not in KEYWORDS and key not in ANNOTATIONS:
            supported = ", ".join(sorted(KEYWORDS))
            raise SchemaError(_at(where, f"unsupported keyword {key!r} (supported: {supported})"))
    _check_type(schema.get("type", "object" if "properties" in schema else None), _join(where, "type"))
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SchemaError(_at(_join(where, "properties"), "must be a table of schemas"))
    for name, sub in properties.items():
        check_schema(sub, child_path(_join(where, "properties"), name).lstrip("."), depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(_at(_join(where, "required"), "must be a list of property names"))
    missing = [r for r in required if r not in properties]
    if missing:
        raise SchemaError(_at(_join(where, "required"), f"{missing[0]!r} is not one of the properties"))
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        check_schema(extra, _join(where, "additionalProperties"), depth + 1)
    if "items" in schema:
        check_schema(schema["items"], _join(where, "items"), depth + 1)
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in schema and not (json_type(schema[key]) == "integer" and schema[key] >= 0):
            raise SchemaError(_at(_join(where, key), "must be a non-negative integer"))
    for key in ("minimum", "maximum"):
        if key in schema and not _is(schema[key], "number"):
            raise SchemaError(_at(_join(where, key), "must be a number"))
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise SchemaError(_at(_join(where, "enum"), "must be a non-empty list"))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _at(where: str, problem: str) -> str:
    return f"{where}: {problem}" if where else problem


def _check_type(kind: Any, where: str) -> None:
    if isinstance(kind, list) and not kind:
        raise SchemaError(_at(where, "must not be an empty list"))
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k is not None and (not isinstance(k, str) or k not in TYPES):
            raise SchemaError(_at(where, f"{k!r} is not one of {', '.join(sorted(TYPES))}"))


def strict_problem(schema: dict[str, Any], where: str = "result") -> str | None:
    """Why *schema* cannot be used with OpenAI's strict structured output, or None.

    Strict mode needs every object to be closed (``additionalProperties =
    false``) with every property required; optional fields are spelled with a
    ``null`` type instead (``type = ["string", "null"]``).
    """
    for path, sub in _subschemas(schema, where):
        is_object = sub.get("type") == "object" or "properties" in sub
        if not is_object:
            continue
        if sub.get("additionalProperties", True) is not False:
            return f"{path}: objects must set additionalProperties = false for strict structured output"
        missing = sorted(set(sub.get("properties", {})) - set(sub.get("required", [])))
        if missing:
            return (
                f"{path}: property {missing[0]!r} must be required for strict structured output "
                '(make it nullable with type = ["...", "null"] instead)'
            )
    return None


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _subschemas(sub, child_path(f"{path}.properties", name))
    if isinstance(schema.get("items"), dict):
        yield from _subschemas(schema["items"], f"{path}.items")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _subschemas(schema["additionalProperties"], f"{path}.additionalProperties")


# -- validating an instance -------------------------------------------------


def first_problem(instance: Any, schema: dict[str, Any], path: str = "$") -> tuple[str, str] | None:
    """The first ``(path, problem)`` where *instance* breaks *schema* (checked with :func:`check_schema`)."""
    return next(_problems(instance, schema, path), None)


def _problems(value: Any, schema: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is(value, k) for k in kinds):
            yield path, f"expected {' or '.join(kinds)}, got {json_type(value)}"
            return
    if "const" in schema and not _same(value, schema["const"]):
        yield path, f"expected {_show(schema['const'])}, got {_show(value)}"
        return
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        options = ", ".join(_show(option) for option in schema["enum"][:8])
        yield path, f"expected one of {options}, got {_show(value)}"
        return
    if isinstance(value, dict):
        yield from _object_problems(value, schema, path)
    elif isinstance(value, list):
        yield from _array_problems(value, schema, path)
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            yield path, f"length {len(value)} is less than minLength {schema['minLength']}"
        elif "maxLength" in schema and len(value) > schema["maxLength"]:
            yield path, f"length {len(value)} is more than maxLength {schema['maxLength']}"
    elif _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            yield path, f"{_show(value)} is less than the minimum {_show(schema['minimum'])}"
        elif "maximum" in schema and value > schema["maximum"]:
            yield path, f"{_show(value)} is greater than the maximum {_show(schema['maximum'])}"


def _object_problems(value: dict[str, Any], schema: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            yield path, f"missing required property {name!r}"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            yield from _problems(item, properties[name], child_path(path, name))
        elif extra is False:
            yield path, f"unexpected property {name!r}"
        elif isinstance(extra, dict):
            yield from _problems(item, extra, child_path(path, name))


def _array_problems(value: list[Any], schema: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    if len(value) < schema.get("minItems", 0):
        yield path, f"{len(value)} item(s), fewer than minItems {schema['minItems']}"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        yield path, f"{len(value)} item(s), more than maxItems {schema['maxItems']}"
    items = schema.get("items")
    if isinstance(items, dict):
        for index, item in enumerate(value):
            yield from _problems(item, items, child_path(path, index))
