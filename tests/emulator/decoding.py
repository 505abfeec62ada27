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


# Python's complaint -> Go's wording for the same place (encoding/json's scanner).
_GO_WORDING = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",  # in an array Go says "after array element"
}
_WS = " \t\r\n"


def _decode_like_go(text: str, v1: bool) -> Any:
    """The first JSON value, as Go's decoder reads it (what follows is ignored); a body that
    ends inside that value is ``unexpected EOF``, any other syntax error Go's ``invalid
    character`` message (worded as Go words it where Python's decoder names the same place;
    a broken literal or escape more loosely, which no test relies on)."""
    text = text.lstrip(_WS)
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError as error:
        if error.pos >= len(text.rstrip(_WS)) or error.msg.startswith("Unterminated string"):
            message = "unexpected EOF"
        else:
            place = _GO_WORDING.get(error.msg, "looking for beginning of value")
            message = f"invalid character {_quote(text[error.pos])} {place}"
        raise ApiError(400, message, middleware=v1) from None


def _quote(char: str) -> str:
    return "'\"'" if char == '"' else "'" + json.dumps(char, ensure_ascii=False)[1:-1] + "'"


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
