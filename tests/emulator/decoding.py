"""Request bodies decoded the way gin's ``ShouldBindJSON`` (Go encoding/json) would.

Errors carry Go's wording because clients and gateways match on it (§4):
``missing request body``, ``invalid character 'x' looking for beginning of
value``, ``unexpected EOF``, ``json: cannot unmarshal string into Go struct
field ChatRequest.stream of type bool``. Like ``json.Decoder``, only the first
JSON value is read; trailing bytes are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

from .registry import FOREVER_S

# field -> (JSON kind Go accepts, Go type named in the error)
Schema = Mapping[str, tuple[str, str]]

_OPTIONS = ("object", "map[string]interface {}")
GENERATE: Schema = {
    "model": ("string", "string"),
    "prompt": ("string", "string"),
    "suffix": ("string", "string"),
    "system": ("string", "string"),
    "template": ("string", "string"),
    "context": ("array", "[]int"),
    "stream": ("bool", "bool"),
    "raw": ("bool", "bool"),
    "images": ("array", "[]api.ImageData"),
    "options": _OPTIONS,
}
CHAT: Schema = {
    "model": ("string", "string"),
    "messages": ("array", "[]api.Message"),
    "stream": ("bool", "bool"),
    "tools": ("array", "api.Tools"),
    "options": _OPTIONS,
}
MESSAGE: Schema = {
    "role": ("string", "string"),
    "content": ("string", "string"),
    "images": ("array", "[]api.ImageData"),
    "tool_calls": ("array", "[]api.ToolCall"),
}
EMBED: Schema = {"model": ("string", "string"), "dimensions": ("number", "int"), "options": _OPTIONS}
EMBEDDINGS: Schema = {"model": ("string", "string"), "prompt": ("string", "string"), "options": _OPTIONS}
NAMED: Schema = {"model": ("string", "string"), "name": ("string", "string"), "stream": ("bool", "bool")}
COPY: Schema = {"source": ("string", "string"), "destination": ("string", "string")}
V1_CHAT: Schema = {
    "model": ("string", "string"),
    "messages": ("array", "[]openai.Message"),
    "stream": ("bool", "bool"),
    "stream_options": ("object", "openai.StreamOptions"),
    "max_tokens": ("number", "int"),
    "tools": ("array", "[]api.Tool"),
    "reasoning_effort": ("string", "string"),
    "reasoning": ("object", "openai.Reasoning"),
}
V1_COMPLETION: Schema = {
    "model": ("string", "string"),
    "prompt": ("string", "string"),
    "suffix": ("string", "string"),
    "stream": ("bool", "bool"),
    "stream_options": ("object", "openai.StreamOptions"),
    "max_tokens": ("number", "int"),
}
V1_EMBED: Schema = {
    "model": ("string", "string"),
    "dimensions": ("number", "int"),
    "encoding_format": ("string", "string"),
}


class ApiError(Exception):
    """An Ollama error answer. ``middleware`` marks /v1 errors raised before the handler.

    Ollama's /v1 middleware aborts with gin's ``c.JSON`` (``application/json;
    charset=utf-8``, no newline) while handler errors pass through the writer's
    ``json.Encoder`` (``application/json`` plus ``\\n``), so the two differ on the wire.
    """

    def __init__(self, status: int, message: str, *, middleware: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.middleware = middleware


def decode(body: bytes, struct: str, schema: Schema, *, v1: bool = False) -> dict[str, Any]:
    """The JSON object in ``body``, type-checked against ``schema`` as ``struct`` (e.g. ``api.ChatRequest``)."""
    if not body.strip():
        # gin turns an empty body into io.EOF; native handlers reword it, /v1 middleware does not.
        raise ApiError(400, "EOF" if v1 else "missing request body", middleware=v1)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _decode_like_go(body.decode("utf-8", "replace"), v1)
    if not isinstance(value, dict):
        raise ApiError(400, f"json: cannot unmarshal {_kind(value)} into Go value of type {struct}", middleware=v1)
    check(value, struct.rpartition(".")[2], schema, v1=v1)
    return value


def check(value: Mapping[str, Any], path: str, schema: Schema, *, v1: bool = False) -> None:
    for key, (kind, go_type) in schema.items():
        field = value.get(key)
        if field is not None and _kind(field) != kind:
            message = f"json: cannot unmarshal {_kind(field)} into Go struct field {path}.{key} of type {go_type}"
            raise ApiError(400, message, middleware=v1)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _decode_like_go(text: str, v1: bool) -> Any:
    """Find the first value's end as Go's scanner does; report its error or parse just that value."""
    error, end = _scan(text)
    if error is not None:
        raise ApiError(400, error, middleware=v1)
    return json.loads(text[:end])


_WS = " \t\r\n"
_AFTER = {"{": "after object key:value pair", "[": "after array element"}


def _quote(char: str) -> str:
    return "'\"'" if char == '"' else "'" + json.dumps(char, ensure_ascii=False)[1:-1] + "'"


def _scan(text: str) -> tuple[str | None, int]:
    """Walk ``text`` like Go's ``encoding/json`` scanner; (error message, end of first value).

    ``expect`` is what may come next: a value, a key, ``:``, or ``,``/closer;
    ``opened`` is true right after ``{`` or ``[``, where the closer is also allowed.
    """
    stack: list[str] = []
    i, n = 0, len(text)
    expect, opened = "value", False
    while True:
        while i < n and text[i] in _WS:
            i += 1
        if i >= n:
            return "unexpected EOF", i
        c = text[i]
        if opened and c == ("}" if stack[-1] == "{" else "]"):
            stack.pop()
            i += 1
        elif expect == "colon":
            if c != ":":
                return f"invalid character {_quote(c)} after object key", i
            i, expect, opened = i + 1, "value", False
            continue
        elif expect == "comma":
            if c == ",":
                i, expect = i + 1, "key" if stack[-1] == "{" else "value"
                continue
            if c != ("}" if stack[-1] == "{" else "]"):
                return f"invalid character {_quote(c)} {_AFTER[stack[-1]]}", i
            stack.pop()
            i += 1
        elif expect == "key":
            if c != '"':
                return f"invalid character {_quote(c)} looking for beginning of object key string", i
            error, i = _scan_string(text, i + 1)
            if error is not None:
                return error, i
            expect, opened = "colon", False
            continue
        elif c in "{[":
            stack.append(c)
            i, expect, opened = i + 1, "key" if c == "{" else "value", True
            continue
        else:
            error, i = _scan_scalar(text, i)
            if error is not None:
                return error, i
        if not stack:
            return None, i
        expect, opened = "comma", False


def _scan_scalar(text: str, i: int) -> tuple[str | None, int]:
    n, c = len(text), text[i]
    if c == '"':
        return _scan_string(text, i + 1)
    if c == "-" or c.isdigit():
        return _scan_number(text, i)
    literal = {"t": "true", "f": "false", "n": "null"}.get(c)
    if literal is None:
        return f"invalid character {_quote(c)} looking for beginning of value", i
    for offset, want in enumerate(literal[1:], start=1):
        if i + offset >= n:
            return "unexpected EOF", n
        if text[i + offset] != want:
            got = _quote(text[i + offset])
            return f"invalid character {got} in literal {literal} (expecting {_quote(want)})", i + offset
    return None, i + len(literal)


def _scan_number(text: str, i: int) -> tuple[str | None, int]:
    n = len(text)

    def digits(j: int, context: str) -> tuple[str | None, int]:
        if j >= n:
            return "unexpected EOF", j
        if not text[j].isdigit():
            return f"invalid character {_quote(text[j])} {context}", j
        while j < n and text[j].isdigit():
            j += 1
        return None, j

    j = i + 1 if text[i] == "-" else i
    if j < n and text[j] == "0":
        error, j = None, j + 1
    else:
        error, j = digits(j, "in numeric literal")
    if error is None and j < n and text[j] == ".":
        error, j = digits(j + 1, "after decimal point in numeric literal")
    if error is None and j < n and text[j] in "eE":
        j += 2 if j + 1 < n and text[j + 1] in "+-" else 1
        error, j = digits(j, "in exponent of numeric literal")
    return error, j


def _scan_string(text: str, i: int) -> tuple[str | None, int]:
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return None, i + 1
        if c < " ":
            return f"invalid character {_quote(c)} in string literal", i
        if c == "\\":
            if i + 1 >= n:
                break
            escape = text[i + 1]
            if escape == "u":
                digits = text[i + 2 : i + 6]
                bad = next((d for d in digits if d not in "0123456789abcdefABCDEF"), None)
                if bad is not None:
                    return f"invalid character {_quote(bad)} in \\u hexadecimal character escape", i
                if len(digits) < 4:
                    break
                i += 6
                continue
            if escape not in '"\\/bfnrt':
                return f"invalid character {_quote(escape)} in string escape code", i
            i += 2
            continue
        i += 1
    return "unexpected EOF", n


def parse_think(value: Any, *, v1: bool = False) -> bool | str | None:
    """``think``: a bool or a level (``ThinkValue.UnmarshalJSON``)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("high", "medium", "low", "max"):
            return value
        message = f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)'
        raise ApiError(400, message, middleware=v1)
    raise ApiError(400, 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)')


_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded (``Duration.UnmarshalJSON``): a number of seconds or a Go duration; negative = forever.

    None when absent, so callers can tell "not given" from an explicit 0 (unload).
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return FOREVER_S if value < 0 else float(value)
    if isinstance(value, str):
        sign, body = (-1.0, value[1:]) if value.startswith("-") else (1.0, value.removeprefix("+"))
        if body == "0":
            return 0.0
        parts = list(_DURATION.finditer(body))
        if not parts or "".join(p.group(0) for p in parts) != body:
            unit_missing = body and _DURATION.sub("", body).replace(".", "").isdigit()
            reason = "missing unit in duration" if unit_missing else "invalid duration"
            raise ApiError(400, f'time: {reason} "{value}"')
        seconds = sum(float(p.group(1)) * _UNIT_S[p.group(2)] for p in parts)
        return FOREVER_S if sign < 0 and seconds else seconds
    raise ApiError(400, f"Unsupported type: '{_go_type_name(value)}'")


def _go_type_name(value: Any) -> str:
    return {"bool": "bool", "array": "[]interface {}", "object": "map[string]interface {}"}[_kind(value)]


def option_int(options: Mapping[str, Any], key: str) -> int | None:
    """An integer option; Go's ``FromMap`` accepts JSON numbers and truncates them."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        # scheduleRunner fails on option types, and handleScheduleError maps that to 500 (§4)
        raise ApiError(500, f'option "{key}" must be of type integer')
    return int(value)


def option_stop(options: Mapping[str, Any]) -> tuple[str, ...]:
    value = options.get("stop")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ApiError(500, 'option "stop" must be of type array')
    if not all(isinstance(item, str) for item in value):
        raise ApiError(500, 'option "stop" must be of an array of strings')
    return tuple(value)
