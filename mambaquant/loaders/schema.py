"""Declarative checks of JSON configs: one schema per model kind, one line naming the field for every error.

A schema is a dict {field name: Field}. `validate(values, schema, where)` returns the values with defaults filled
in, or raises `InputError` with a line such as
    DIR/config.json: hidden_size must be an integer from 1 to 65536, got '768' (a string)
JSON types are taken literally: an integer is not a float or a boolean, a boolean is `true` or `false` (not 1 or
"true"), a number is finite. Keys a schema does not name are ignored.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

REQUIRED = object()  # a Field default: the field must be given
MAX_JSON_BYTES = 16 * 1024**2  # config.json and index files are small; a larger one is not what it says it is


@dataclass(frozen=True)
class Field:
    kind: str  # "integer", "number", "boolean", "string", "object" or "list"
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    above: bool = False  # the lower bound itself is excluded (a number greater than `low`)
    choices: tuple = ()  # allowed strings
    special: tuple = ()  # literal values allowed besides the kind (e.g. "auto" for an integer)
    nullable: bool = False  # JSON null allowed
    fields: dict | None = None  # for an object: its schema (None: any object)
    items: "Field | None" = None  # for a list: the field every item must satisfy
    max_items: int = 4096

    def expected(self) -> str:
        """What a valid value looks like, in words."""
        if self.kind == "integer":
            text = f"an integer from {self.low} to {self.high}"
        elif self.kind == "number":
            text = (f"a number greater than {self.low:g} and at most {self.high:g}" if self.above
                    else f"a number from {self.low:g} to {self.high:g}")
        elif self.kind == "boolean":
            text = "true or false"
        elif self.kind == "string":
            text = "one of " + ", ".join(repr(c) for c in self.choices) if len(self.choices) > 1 else (
                repr(self.choices[0]) if self.choices else "a string")
        elif self.kind == "object":
            text = "an object"
        else:
            text = f"a list of {plural(self.items)}" if self.items else "a list"
        special = " or ".join(repr(s) for s in self.special)
        text = f"{special} or {text}" if special else text
        return f"{text} or null" if self.nullable else text


def plural(field: Field) -> str:
    return {"integer": "integers", "number": "numbers", "boolean": "booleans", "string": "strings",
            "object": "objects", "list": "lists"}[field.kind]


def integer(low: int, high: int, default=REQUIRED, special: tuple = (), nullable: bool = False) -> Field:
    return Field("integer", default, low, high, special=special, nullable=nullable)


def number(low: float, high: float, default=REQUIRED, above: bool = False) -> Field:
    return Field("number", default, low, high, above=above)


def boolean(default=REQUIRED) -> Field:
    return Field("boolean", default)


def string(*choices: str, default=REQUIRED) -> Field:
    return Field("string", default, choices=choices)


def obj(fields: dict | None = None, default=REQUIRED) -> Field:
    return Field("object", default, fields=fields)


def list_of(items: Field, default=REQUIRED, nullable: bool = False, max_items: int = 4096) -> Field:
    return Field("list", default, items=items, nullable=nullable, max_items=max_items)


def describe(value) -> str:
    """A JSON value, shortly, with its JSON type: '768' (a string), 1.5 (a number), true (a boolean)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, int):
        digits = len(str(abs(value))) if value.bit_length() < 14000 else int(value.bit_length() * 0.30103) + 1
        return f"an integer of {digits} digits" if digits > 24 else f"{value} (an integer)"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN (a number)"
        if math.isinf(value):
            return f"{'-' if value < 0 else ''}Infinity (a number)"
        return f"{value!r} (a number)"
    if isinstance(value, str):
        if len(value) > 40:
            return f"{value[:30]!r}... (a string of {len(value)} characters)"
        return f"{value!r} (a string)"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def check(value, field: Field, where: str, key: str):
    """One value against its field -> the value (numbers as float), or InputError naming `key`."""
    if value is None and field.nullable:
        return None
    if any(type(value) is type(s) and value == s for s in field.special):
        return value
    kind = field.kind
    ok = False
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool) and field.low <= value <= field.high
    elif kind == "number":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > field.low if field.above else value >= field.low) and value <= field.high)
        if ok:
            value = float(value)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "string":
        ok = isinstance(value, str) and (not field.choices or value in field.choices)
    elif kind == "object":
        if isinstance(value, dict):
            return validate(value, field.fields, where, key + ".") if field.fields is not None else value
    elif kind == "list":
        if isinstance(value, list) and len(value) <= field.max_items:
            return [check(item, field.items, where, f"{key}[{i}]") if field.items else item
                    for i, item in enumerate(value)]
    if not ok:
        raise InputError(f"{where}: {key} must be {field.expected()}, got {describe(value)}")
    return value


def validate(values, schema: dict[str, Field], where: str, prefix: str = "") -> dict:
    """`values` (a parsed JSON object) against `schema` -> {field: value} for every field of the schema, defaults
    filled in. `where` starts every error line (the file); `prefix` names the enclosing object."""
    if not isinstance(values, dict):
        name = prefix.rstrip(".") or "the configuration"
        raise InputError(f"{where}: {name} must be a JSON object, got {describe(values)}")
    out = {}
    for name, field in schema.items():
        if name not in values:
            if field.default is REQUIRED:
                raise InputError(f"{where}: missing required field {prefix}{name} ({field.expected()})")
            if field.kind == "object" and field.fields is not None and isinstance(field.default, dict):
                out[name] = validate(field.default, field.fields, where, f"{prefix}{name}.")  # its own defaults
            else:
                out[name] = field.default.copy() if isinstance(field.default, (list, dict)) else field.default
        else:
            out[name] = check(values[name], field, where, prefix + name)
    return out


def display(source) -> str:
    """A user-given name or path as it may appear in a one-line message: control characters escaped, shortened."""
    text = str(source)
    if len(text) > 300:
        text = text[:200] + "..." + text[-60:]
    return text if text.isprintable() else repr(text)


def read_json(path: Path, what: str = "a JSON object"):
    """Parse a small JSON file, with one line for everything that can be wrong with it."""
    where = display(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{where}: {size / 1024**2:.0f} MiB is too large for a JSON config "
                             f"(at most {MAX_JSON_BYTES // 1024**2} MiB); expected {what}")
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e.strerror or type(e).__name__})") from None
    if not data.strip():
        raise InputError(f"{where}: empty file; expected {what}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start}); expected {what}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply; expected {what}") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise InputError(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]}); expected {what}") from None
