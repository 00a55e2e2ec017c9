"""Strict proto3 JSON for the REST mapping and the CLI: refuses what json_format would coerce.

A float where an integer belongs (1.5, 1e3, even 1.0), an unknown field, a wrong type or an int
beyond its range is an InvalidArgument naming the field; money fields are capped at MAX_AMOUNT.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from creditservice.errors import InvalidArgument

M = TypeVar("M", bound=Message)
# The stubs type descriptors as a union of the pure-Python and upb classes; both behave the same.
_Field = Any

MAX_AMOUNT = 10**15
# Single amounts of money; balances and sums are derived by the authority and not capped here.
MONEY_FIELDS = frozenset(
    {
        "amount",
        "cost",
        "held_amount",
        "committed_amount",
        "low_balance_threshold",
        "overdraft_limit",
    }
)

_INT_TEXT = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def encode(message: Message) -> dict[str, Any]:
    """proto3 JSON with snake_case names, defaults included, int64 as strings."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def dumps(message: Message) -> str:
    """One compact line (NDJSON)."""
    return json.dumps(encode(message), separators=(",", ":"), ensure_ascii=False)


class JsonFloat(float):
    """A JSON number with a fraction or exponent, remembering its text for error messages."""

    text: str

    def __new__(cls, text: str) -> JsonFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def loads_json(text: str | bytes, where: str = "body") -> object:
    """Parse JSON text; NaN/Infinity and malformed input are InvalidArgument."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=JsonFloat)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where}: malformed JSON ({exc})") from exc


def decode(cls: type[M], obj: object, where: str = "") -> M:
    """Build `cls` from a parsed JSON value, strictly."""
    message = cls()
    merge(message, obj, where)
    return message


def decode_line(cls: type[M], line: str | bytes, lineno: int) -> M:
    """One NDJSON line; errors say `line N: field: problem`."""
    try:
        return decode(cls, loads_json(line, "JSON"))
    except InvalidArgument as exc:
        raise InvalidArgument(f"line {lineno}: {exc.message}") from exc


def merge(message: Message, obj: object, where: str = "") -> None:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where or 'body'}: must be a JSON object (got {_show(obj)})")
    desc = message.DESCRIPTOR
    oneofs_set: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{where}.{key}" if where else str(key)
        field = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
        if field is None:
            raise InvalidArgument(f"{name}: unknown field of {desc.name}")
        if value is None:  # proto3 JSON: null means the default value
            continue
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs_set:
                raise InvalidArgument(
                    f"{name}: only one of {oneof.name} may be set "
                    f"({oneofs_set[oneof.name]} is set too)"
                )
            oneofs_set[oneof.name] = field.name
        if field.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgument(f"{name}: must be a JSON array (got {_show(value)})")
            target = getattr(message, field.name)
            for i, item in enumerate(value):
                item_name = f"{name}[{i}]"
                if item is None:
                    raise InvalidArgument(f"{item_name}: must not be null")
                if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    merge(target.add(), item, item_name)
                else:
                    target.append(_scalar(field, item, item_name))
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            sub = getattr(message, field.name)
            sub.SetInParent()
            merge(sub, value, name)
        else:
            setattr(message, field.name, _scalar(field, value, name))


def decode_params(cls: type[M], params: Mapping[str, list[str]], where: str = "query") -> M:
    """Build `cls` from text parameters (query string): scalars once, repeated fields many times."""
    message = cls()
    desc = message.DESCRIPTOR
    for key, values in params.items():
        name = f"{where} parameter {key}"
        field = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
        if field is None or field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            raise InvalidArgument(f"{name}: unknown parameter")
        if field.is_repeated:
            getattr(message, field.name).extend(_text_scalar(field, v, name) for v in values)
        else:
            if len(values) != 1:
                raise InvalidArgument(f"{name}: given more than once")
            setattr(message, field.name, _text_scalar(field, values[0], name))
    return message


def set_path_field(message: Message, dotted: str, text: str) -> None:
    """Fill a (nested) scalar field from a URL path segment; a conflicting body is refused."""
    *parents, last = dotted.split(".")
    target = message
    for part in parents:
        target = getattr(target, part)
    field: Any = target.DESCRIPTOR.fields_by_name[last]
    value = _text_scalar(field, text, f"path parameter {last}")
    current = getattr(target, last)
    if current not in ("", 0) and current != value:
        raise InvalidArgument(f"{dotted}: body says {current!r} but the path says {value!r}")
    if parents:
        target.SetInParent()
    setattr(target, last, value)


def _text_scalar(field: _Field, text: str, name: str) -> Any:
    """Query and path values are text; numbers, bools and enums are parsed from it."""
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        if text not in ("true", "false"):
            raise InvalidArgument(f"{name}: must be true or false (got {text!r})")
        return text == "true"
    return _scalar(field, text, name)


def _scalar(field: _Field, value: object, name: str) -> Any:
    cpp = field.cpp_type
    if cpp in _RANGES:
        lo, hi = _RANGES[cpp]
        number = _integer(value, name)
        if not lo <= number <= hi:
            raise InvalidArgument(f"{name}: {number} is out of range [{lo}, {hi}]")
        if field.name in MONEY_FIELDS and abs(number) > MAX_AMOUNT:
            raise InvalidArgument(f"{name}: {number} exceeds the maximum amount {MAX_AMOUNT}")
        return number
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name}: must be true or false (got {_show(value)})")
        return value
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(field, value, name)
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"{name}: must be a number (got {_show(value)})")
        return float(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{name}: must be a string (got {_show(value)})")
    if field.type == FieldDescriptor.TYPE_BYTES:
        try:
            return base64.b64decode(
                value + "=" * (-len(value) % 4), altchars=_altchars(value), validate=True
            )
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(f"{name}: must be base64") from exc
    return value


def _altchars(value: str) -> bytes | None:
    return b"-_" if ("-" in value or "_" in value) else None


def _integer(value: object, name: str) -> int:
    # SECURITY: money is never a float; "1.0", 1.5, 1e3 and true are refused, not coerced.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    raise InvalidArgument(f"{name}: must be an integer (got {_show(value)})")


def _enum(field: _Field, value: object, name: str) -> int:
    enum_type = field.enum_type
    assert enum_type is not None
    if isinstance(value, str):
        named = enum_type.values_by_name.get(value)
        if named is not None:
            return int(named.number)
    elif (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value in enum_type.values_by_number
    ):
        return value
    allowed = ", ".join(v.name for v in enum_type.values)
    raise InvalidArgument(f"{name}: must be one of {allowed} (got {_show(value)})")


def _show(value: object) -> str:
    if isinstance(value, JsonFloat):
        return value.text
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_constant(token: str) -> object:
    raise ValueError(f"{token} is not allowed")
