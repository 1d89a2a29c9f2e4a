"""Declarative checks of JSON configs: one schema per config kind, one line naming the field for every error.

A schema is a dict {field name: Field}. `validate(values, schema, where)` returns the values with defaults filled
in, or raises `InputError` with a line such as
    DIR/config.json: hidden_size must be an integer from 1 to 65536, got '768' (a string)
JSON types are taken literally: an integer is not a float or a boolean (8.0 and true are not 8), a boolean is
`true` or `false` (not 1 or "true"), a number is finite. Keys a schema does not name are ignored, and a missing
field takes its default; with `wording=EXACT` (quantized checkpoints) every field must be given and nothing else,
and the errors read `config.json KEY: expected WHAT, got VALUE`.
"""

import difflib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

REQUIRED = object()  # a Field default: the field must be given
MAX_JSON_BYTES = 16 * 1024**2  # config.json and index files are small; a larger one is not what it says it is
KINDS = {bool: "boolean", int: "integer", float: "number", str: "string"}
PLURALS = {"integer": "integers", "number": "numbers", "boolean": "booleans", "string": "strings",
           "object": "objects", "list": "lists"}


@dataclass(frozen=True)
class Field:
    kind: str  # "integer", "number", "boolean", "string", "object" or "list"
    default: Any = REQUIRED
    low: float | None = None  # an integer's or number's bounds (None: unbounded)
    high: float | None = None
    above: bool = False  # the lower bound itself is excluded (a number greater than `low`)
    choices: tuple = ()  # the values allowed (none: any of the kind)
    special: tuple = ()  # literal values allowed besides the kind (e.g. "auto" for an integer)
    nullable: bool = False  # JSON null allowed
    fields: "dict | Callable[[dict], dict] | None" = None  # an object's schema, or a function of it giving it
    values: "Field | None" = None  # for an object of any keys: the field every value must satisfy
    items: "Field | None" = None  # for a list: the field every item must satisfy
    min_items: int = 0
    max_items: int = 4096
    pattern: str | None = None  # a regular expression a string must match in full
    text: str = ""  # what a valid value is, in words, where the kind does not say it

    def expected(self) -> str:
        """What a valid value looks like, in words."""
        text = self.text or self.kind_text()
        text += "".join(f" or {literal(s)}" for s in self.special)
        return f"null or {text}" if self.nullable else text

    def kind_text(self) -> str:
        if self.choices:
            return ("one of " if len(self.choices) > 1 else "") + ", ".join(map(literal, self.choices))
        if self.kind in ("integer", "number"):
            return ("an integer" if self.kind == "integer" else "a finite number") + self.bounds()
        if self.kind == "list":
            return f"a list of {PLURALS[self.items.kind]}" if self.items else "a list"
        return {"boolean": "true or false", "string": "a string", "object": "an object"}[self.kind]

    def bounds(self) -> str:
        low, high = (f"{b:g}" if isinstance(b, float) else b for b in (self.low, self.high))
        if low is not None and high is not None and not self.above:
            return f" from {low} to {high}"
        parts = [f"{'>' if self.above else '>='} {low}"] if low is not None else []
        parts += [f"<= {high}"] if high is not None else []
        return " " + " and ".join(parts) if parts else ""

    def in_range(self, value) -> bool:
        if self.low is not None and not (value > self.low if self.above else value >= self.low):
            return False
        return self.high is None or value <= self.high


def literal(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else repr(value)


def is_one_of(value, options: tuple) -> bool:
    """`value` is one of `options`, of the same JSON type (true is not 1, 8.0 is not 8)."""
    return any(type(value) is type(option) and value == option for option in options)


def integer(low: int | None = None, high: int | None = None, default=REQUIRED, special: tuple = (),
            nullable: bool = False) -> Field:
    return Field("integer", default, low, high, special=special, nullable=nullable)


def number(low: float | None = None, high: float | None = None, default=REQUIRED, above: bool = False) -> Field:
    return Field("number", default, low, high, above=above)


def boolean(default=REQUIRED) -> Field:
    return Field("boolean", default)


def string(*choices: str, default=REQUIRED, nullable: bool = False) -> Field:
    return Field("string", default, choices=choices, nullable=nullable)


def constant(value) -> Field:
    """Exactly `value` (a JSON scalar)."""
    return Field(KINDS[type(value)], choices=(value,))


def obj(fields: "dict | Callable[[dict], dict] | None" = None, default=REQUIRED, nullable: bool = False) -> Field:
    return Field("object", default, fields=fields, nullable=nullable)


def map_of(values: Field, text: str = "") -> Field:
    """An object of any keys, each value a `values`."""
    return Field("object", values=values, text=text)


def list_of(items: Field, default=REQUIRED, nullable: bool = False, min_items: int = 0, max_items: int = 4096,
            text: str = "") -> Field:
    return Field("list", default, items=items, nullable=nullable, min_items=min_items, max_items=max_items,
                 text=text)


def item(key: str, index) -> str:
    """The name of an object's entry or a list's item: KEY["name"], KEY[3]."""
    return f"{key}[{json.dumps(index)}]"


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


def json_text(value, limit: int = 60) -> str:
    """A JSON value as one short line, in JSON spelling: true, null, "8"."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


class Wording:
    """How `validate` words a problem: `WHERE: KEY must be WHAT, got VALUE (its type)`; and `exact`: whether every
    field of a schema must be given, defaults or not, and a key it does not name is an error (`unknown`)."""

    exact = False

    def wrong(self, where: str, key: str, field: Field, value) -> str:
        return f"{where}: {key} must be {field.expected()}, got {describe(value)}"

    def not_object(self, where: str, key: str, value) -> str:
        return f"{where}: {key or 'the configuration'} must be a JSON object, got {describe(value)}"

    def missing(self, where: str, prefix: str, name: str, schema: dict) -> str:
        return f"{where}: missing required field {prefix}{name} ({schema[name].expected()})"


class ExactWording(Wording):
    """Objects hold exactly their schema's fields; a problem is `WHERE KEY: expected WHAT, got VALUE`, VALUE in
    JSON spelling, a container with its kind (`9`, `"8"`, `true`, `a list [64, 16]`), an object that its field does
    not describe in words `a JSON object`."""

    exact = True

    def wrong(self, where, key, field, value):
        if field.kind == "object" and not field.text:
            return self.not_object(where, key, value)
        got = f"{json_kind(value)} {json_text(value)}" if type(value) in (dict, list) else json_text(value)
        return f"{where} {key}: expected {field.expected()}, got {got}"

    def not_object(self, where, key, value):
        return f"{where} {key or '(top level)'}: expected a JSON object, got {json_kind(value)} {json_text(value)}"

    def missing(self, where, prefix, name, schema):
        return self.fields(where, prefix, f"missing field {name!r}", schema)

    def unknown(self, where, prefix, name, schema):
        return self.fields(where, prefix, f"unknown field {display(name)!r}", schema)

    def fields(self, where, prefix, problem, schema):
        return f"{where} {prefix.rstrip('.') or '(top level)'}: {problem} (expected fields: {', '.join(schema)})"


PLAIN, EXACT = Wording(), ExactWording()


def check(value, field: Field, where: str, key: str, wording: Wording = PLAIN):
    """One value against its field -> the value (numbers as float), or InputError naming `key`."""
    if value is None and field.nullable or is_one_of(value, field.special):
        return value
    kind = field.kind
    if kind == "object" and isinstance(value, dict):
        if field.values is not None:
            return {name: check(v, field.values, where, item(key, name), wording) for name, v in value.items()}
        fields = field.fields(value) if callable(field.fields) else field.fields
        return value if fields is None else validate(value, fields, where, key + ".", wording)
    if kind == "list" and isinstance(value, list) and field.min_items <= len(value) <= field.max_items:
        return [check(v, field.items, where, item(key, i), wording) if field.items else v
                for i, v in enumerate(value)]
    if kind == "integer":
        ok = type(value) is int and field.in_range(value)
    elif kind == "number":  # finite: a float, or an integer within a float's range
        ok = type(value) in (int, float) and abs(value) <= sys.float_info.max and field.in_range(value)
    elif kind == "string":
        ok = type(value) is str and (field.pattern is None or re.fullmatch(field.pattern, value) is not None)
    else:
        ok = kind == "boolean" and type(value) is bool
    if ok and (not field.choices or is_one_of(value, field.choices)):
        return float(value) if kind == "number" else value
    raise InputError(wording.wrong(where, key, field, value))


def validate(values, schema: dict[str, Field], where: str, prefix: str = "", wording: Wording = PLAIN) -> dict:
    """`values` (a parsed JSON object) against `schema` -> {field: value} for every field of the schema, defaults
    filled in. `where` starts every error line (the file); `prefix` names the enclosing object; `wording` words the
    errors (and says whether the fields must be exactly the schema's)."""
    if not isinstance(values, dict):
        raise InputError(wording.not_object(where, prefix.rstrip("."), values))
    out = {}
    for name, field in schema.items():
        if name in values:
            out[name] = check(values[name], field, where, prefix + name, wording)
        elif field.default is REQUIRED or wording.exact:
            raise InputError(wording.missing(where, prefix, name, schema))
        elif field.kind == "object" and isinstance(field.fields, dict) and isinstance(field.default, dict):
            out[name] = validate(field.default, field.fields, where, f"{prefix}{name}.", wording)  # its own defaults
        else:
            out[name] = field.default.copy() if isinstance(field.default, (list, dict)) else field.default
    unknown = [name for name in values if name not in schema] if wording.exact else []
    if unknown:
        raise InputError(wording.unknown(where, prefix, unknown[0], schema))
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


def check_seed(seed) -> int:
    """A random seed as torch takes it: an integer from 0 to 2**63 - 1 (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"the seed must be an integer from 0 to {2**63 - 1}, got {display(repr(seed))}")
    return seed


def check_options(cls, options: dict, what: str) -> dict:
    """`options` as keyword arguments of the dataclass `cls`: a name it has no field for is refused in one line."""
    import dataclasses

    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in options if name not in known]
    if unknown:
        close = ", ".join(difflib.get_close_matches(unknown[0], known, n=3))
        raise InputError(f"unknown {what} option {', '.join(map(display, unknown))}; expected "
                         f"{'one of ' + close + ' or other ' if close else ''}{cls.__name__} fields")
    return options
