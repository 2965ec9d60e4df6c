"""JSON as PostgreSQL holds it: payload text passed through untouched, and parsed only on request.

Payloads are the system of record, so no path parses and re-serialises them: sinks splice the
text PostgreSQL produced (`jsonb::text`, numbers exact at any size) into their output. Where a
user's code does want Python objects (`Event.data`), `loads` parses with a documented number
policy and no depth limit short of PostgreSQL's own:

- integers exact at any size (`int`);
- other numbers `float` by default, or `decimal.Decimal` with ``decimal=True``; a number a float
  cannot hold (beyond ±1.8e308, where float() would say infinity) is a Decimal in either mode.

The fast path is msgspec (exact big integers, C speed); what it refuses (a number out of float
range, an integer of more than 4,300 digits, nesting deeper than the recursion limit) goes to a
small iterative parser here, which has none of those limits.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import msgspec
import orjson

__all__ = ["loads", "is_json", "from_bytes", "from_text", "one_line", "dumps"]

_fast_float = msgspec.json.Decoder().decode
_fast_decimal = msgspec.json.Decoder(float_hook=Decimal).decode
_REFUSED = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)

_SPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}


def loads(text: str | bytes, *, decimal: bool = False) -> Any:
    """Parse JSON text with the number policy above. Raises ValueError on text that is not JSON."""
    try:
        return (_fast_decimal if decimal else _fast_float)(text)
    except _REFUSED:
        pass
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8: {err}") from None
    return _parse(text, decimal)


def is_json(text: str | bytes) -> bool:
    """Whether `text` is one JSON value (RFC 8259: no NaN, no Infinity, no trailing data)."""
    try:
        loads(text)
    except ValueError:
        return False
    return True


def one_line(text: str) -> str:
    """JSON text with its line breaks (insignificant whitespace: inside a string they are always
    escaped) turned into spaces, so it can be spliced into a JSON line. `jsonb::text` has none;
    `json` and `text` columns keep what the writer sent."""
    if "\n" in text or "\r" in text:
        return text.replace("\r", " ").replace("\n", " ")
    return text


def from_bytes(raw: bytes) -> str:
    """A bytea payload as JSON text: its bytes if they are UTF-8 JSON, else a JSON string of
    their lowercase hex (e.g. a pickle, or Python's json with NaN, which is not JSON)."""
    if is_json(raw):
        return one_line(raw.decode("utf-8"))
    return '"' + raw.hex() + '"'


def from_text(value: str) -> str:
    """A text payload as JSON text: itself if it is JSON, else a JSON string holding it."""
    if is_json(value):
        return one_line(value)
    return orjson.dumps(value).decode()


def dumps(obj: Any) -> str:
    """Python objects → JSON text for an append, exact where orjson is not: integers past 64
    bits, Decimal, nesting past 254. NaN and infinities are refused (they are not JSON)."""
    try:
        text = orjson.dumps(obj, default=_fragment).decode()
    except orjson.JSONEncodeError as err:
        if "Integer exceeds" not in str(err) and "Recursion limit" not in str(err):
            raise TypeError(str(err)) from None
        return "".join(_encode(obj))
    if "null" in text and _non_finite(obj):  # orjson writes NaN and infinities as null
        raise TypeError("NaN and infinities have no JSON form: store them as strings or null")
    return text


def _non_finite(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _fragment(value: Any) -> orjson.Fragment:
    return orjson.Fragment(_decimal_text(value))


def _decimal_text(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"{value} is not JSON (NaN and infinities have no JSON form)")
        return str(value)  # '1E+400', '-0', '0.000001': all JSON numbers
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


class _Raw(str):
    """Text the encoder emits as it is (punctuation), told apart from str values to encode."""

    __slots__ = ()


_OPEN_OBJ, _CLOSE_OBJ, _OPEN_ARR, _CLOSE_ARR, _COMMA = (_Raw(c) for c in "{}[],")


def _encode(obj: Any) -> list[str]:
    """An iterative encoder for what orjson refuses; strings still go through orjson."""
    out: list[str] = []
    stack: list[Any] = [obj]
    dumps_ = orjson.dumps
    while stack:
        item = stack.pop()
        cls = item.__class__
        if cls is _Raw:
            out.append(item)
        elif isinstance(item, dict):
            todo: list[Any] = [_CLOSE_OBJ]
            members = list(item.items())
            for n, (key, value) in enumerate(reversed(members)):
                if not isinstance(key, str):
                    raise TypeError(f"a JSON object key must be a str, not {type(key).__name__}")
                if n:
                    todo.append(_COMMA)
                todo.append(value)
                todo.append(_Raw(dumps_(key).decode() + ":"))
            todo.append(_OPEN_OBJ)
            stack.extend(todo)
        elif isinstance(item, (list, tuple)):
            todo = [_CLOSE_ARR]
            for n, value in enumerate(reversed(item)):
                if n:
                    todo.append(_COMMA)
                todo.append(value)
            todo.append(_OPEN_ARR)
            stack.extend(todo)
        elif item is True or item is False or item is None or isinstance(item, str):
            out.append(dumps_(item).decode())
        elif isinstance(item, int):
            out.append(str(item) if -(10**4000) < item < 10**4000 else str(Decimal(item)))
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise TypeError(f"{item} is not JSON (NaN and infinities have no JSON form)")
            out.append(repr(item))
        else:
            out.append(dumps_(item, default=_fragment).decode())
    return out


# -- the fallback parser ---------------------------------------------------------------------------


class _Object:
    """An object being read: its dict and the key whose value comes next."""

    __slots__ = ("members", "key")

    def __init__(self, key: str):
        self.members: dict[str, Any] = {}
        self.key = key


def _key(text: str, i: int) -> tuple[str, int]:
    """The key starting at i and the position after its ':' and the space behind it."""
    if not text.startswith('"', i):
        raise ValueError(f"expected an object key at {i}")
    key, i = scanstring(text, i + 1, True)
    i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
    if not text.startswith(":", i):
        raise ValueError(f"expected ':' at {i}")
    return key, _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]


def _parse(text: str, decimal: bool) -> Any:
    """RFC 8259 JSON, iteratively (an explicit stack: depth costs memory, not recursion)."""
    space, number = _SPACE.match, _NUMBER.match
    end = len(text)
    i = space(text, 0).end()  # type: ignore[union-attr]
    stack: list[Any] = []  # _Object or list frames, innermost last
    while True:
        if i >= end:
            raise ValueError("unexpected end of JSON text")
        ch = text[i]
        if ch == "{":
            i = space(text, i + 1).end()  # type: ignore[union-attr]
            if text.startswith("}", i):
                value: Any = {}
                i += 1
            else:
                key, i = _key(text, i)
                stack.append(_Object(key))
                continue
        elif ch == "[":
            i = space(text, i + 1).end()  # type: ignore[union-attr]
            if text.startswith("]", i):
                value = []
                i += 1
            else:
                stack.append([])
                continue
        elif ch == '"':
            value, i = scanstring(text, i + 1, True)
        elif ch in _CONSTANTS:
            word, value = _CONSTANTS[ch]
            if not text.startswith(word, i):
                raise ValueError(f"unexpected {text[i:i + 8]!r} at {i}")
            i += len(word)
        else:
            m = number(text, i)
            if m is None:
                raise ValueError(f"unexpected {text[i:i + 8]!r} at {i}")
            value = _number(m.group(), m.group(2) is None and m.group(3) is None, decimal)
            i = m.end()
        # A value is complete: store it in its container, and close what that completes.
        while True:
            i = space(text, i).end()  # type: ignore[union-attr]
            if not stack:
                if i != end:
                    raise ValueError(f"extra data at {i}")
                return value
            top = stack[-1]
            if top.__class__ is list:
                top.append(value)
                closer = "]"
            else:
                top.members[top.key] = value
                closer = "}"
            if text.startswith(",", i):
                i = space(text, i + 1).end()  # type: ignore[union-attr]
                if closer == "}":
                    top.key, i = _key(text, i)
                break
            if not text.startswith(closer, i):
                raise ValueError(f"expected ',' or {closer!r} at {i}")
            i += 1
            stack.pop()
            value = top if closer == "]" else top.members


def _number(text: str, integer: bool, decimal: bool) -> Any:
    if integer:
        # int() of a str stops at 4,300 digits (CVE-2020-10735); Decimal has no such limit.
        return int(text) if len(text) < 4000 else int(Decimal(text))
    if decimal:
        return Decimal(text)
    value = float(text)
    return Decimal(text) if math.isinf(value) else value
