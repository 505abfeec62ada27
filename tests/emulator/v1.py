"""The OpenAI-compatible surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, models (§3).

Requests are translated as Ollama's middleware does and run through the native
cores; only the framing differs. The SSE layout follows ``Config.frame_style``:

* ``modern`` (>= v0.32.6): role on the first chunk only, one ``created`` for the
  stream, a separate finish chunk with ``delta: {}``, a usage chunk with
  ``choices: []`` when ``stream_options.include_usage``, then ``data: [DONE]``;
* ``legacy`` (v0.5.2 to v0.32.5): role on every chunk, ``created`` per chunk,
  ``finish_reason`` on the chunk made from the done record, then the usage chunk;
* ``pre-0.5.2``: as legacy, but ``include_usage`` is ignored.
"""

from __future__ import annotations

import abc
import base64
import itertools
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson

from .decoding import V1_CHAT, V1_COMPLETION, V1_EMBED, ApiError, decode
from .engine import Plan, Sink, Step
from .faults import Fault
from .native import Call, chat_core, embed_core, generate_core
from .prompt import embed_inputs, native_messages
from .registry import ModelName

if TYPE_CHECKING:
    from .connection import Exchange

SSE = "text/event-stream"
V1_JSON = "application/json"  # what the middleware writers set; their json.Encoder adds "\n"
_ids = itertools.count(1)
# thinkFromReasoningEffort: OpenAI's wider scale clamped onto Ollama's levels
_EFFORT: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def error_body(status: int, message: str) -> bytes:
    """``openai.NewError``: the type follows the status (§3 "/v1 errors")."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


def _usage(plan: Plan) -> dict[str, int]:
    prompt, completion = plan.usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Native tool calls in OpenAI's shape: arguments become a JSON string."""
    return [
        {
            "id": c.get("id", ""),
            "index": c["function"]["index"],
            "type": "function",
            "function": {"name": c["function"]["name"], "arguments": orjson.dumps(c["function"]["arguments"]).decode()},
        }
        for c in calls
    ]


class _SseSink(Sink):
    content_type = SSE

    def __init__(self, exchange: Exchange, model: str, stream: bool, include_usage: bool, prefix: str) -> None:
        super().__init__(exchange, model, stream)
        self.style = exchange.state.config.frame_style
        self.include_usage = include_usage and self.style != "pre-0.5.2"  # ignored before v0.5.2 (§3)
        self.id = f"{prefix}-{next(_ids) % 999}"  # Ollama: rand.Intn(999)

    def _frame(self, payload: bytes) -> None:
        self.write(b"data: " + payload + b"\n\n")

    def _close(self) -> None:
        self._frame(b"[DONE]")
        self.exchange.end()

    def fail(self, fault: Fault) -> None:
        if not self.stream or not self.exchange.started:  # a handler error before any write
            self.exchange.respond(fault.status, error_body(fault.status, fault.message) + b"\n", V1_JSON)
            return
        if (fault.v1_style or self.exchange.state.config.v1_error_style) == "openai":
            self._frame(
                orjson.dumps({"error": {"message": fault.message, "type": "api_error", "param": None, "code": None}})
            )
        else:
            # Ollama's writer decodes {"error":…} as an empty, unfinished record: one empty
            # chunk with model "", then the stream just ends, no [DONE] (§4, inferred).
            self._frame(orjson.dumps(self._error_chunk()))
        self.exchange.end()

    @abc.abstractmethod
    def _error_chunk(self) -> dict[str, Any]:
        """The chunk Ollama's writer makes from an ``{"error":…}`` line."""

    def cut_record(self) -> bytes:
        return b'data: {"id":"%b","object"\n\n' % self.id.encode()


class ChatSink(_SseSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, include_usage: bool) -> None:
        super().__init__(exchange, model, stream, include_usage, "chatcmpl")
        self.first_sent = False
        self.tool_sent = False
        self.pinned: int | None = None

    def _created(self) -> int:
        if self.style != "modern":
            return int(time.time())
        if self.pinned is None:
            self.pinned = int(time.time())
        return self.pinned

    def _chunk(self, delta: dict[str, Any], finish: str | None, model: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self._created(),
            "model": self.model if model is None else model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _delta(self, content: str, thinking: str = "", calls: Any = ()) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if self.style != "modern" or not self.first_sent:
            delta["role"] = "assistant"
        delta["content"] = content
        if thinking:
            delta["reasoning"] = thinking
        if calls:
            delta["tool_calls"] = _tool_calls(calls)
            self.tool_sent = True
        self.first_sent = True
        return delta

    def step(self, step: Step) -> None:
        if self.stream:
            self._frame(orjson.dumps(self._chunk(self._delta(step.content, step.thinking, step.tool_calls), None)))

    def finish(self, plan: Plan) -> None:
        if not self.stream:
            self._whole(plan)
            return
        reason = plan.done_reason or "stop"
        if self.style == "modern":
            # The empty metrics trailer makes no chunk, unless it carries tool calls or nothing came before.
            if plan.final_tool_calls or not self.first_sent:
                self._frame(orjson.dumps(self._chunk(self._delta("", calls=plan.final_tool_calls), None)))
            last = self._chunk({}, "tool_calls" if reason == "stop" and self.tool_sent else reason)
        else:
            delta = self._delta("", calls=plan.final_tool_calls)
            last = self._chunk(delta, "tool_calls" if self.tool_sent else reason)
        self._frame(orjson.dumps(last))
        if self.include_usage:
            self._frame(orjson.dumps({**last, "choices": [], "usage": _usage(plan)}))
        self._close()

    def _whole(self, plan: Plan) -> None:
        calls = [call for s in plan.steps for call in s.tool_calls] + list(plan.final_tool_calls)
        message: dict[str, Any] = {"role": "assistant", "content": plan.content}
        if plan.thinking:
            message["reasoning"] = plan.thinking  # `reasoning`, not `reasoning_content` (§3)
        if calls:
            message["tool_calls"] = _tool_calls(calls)
        reason = "tool_calls" if plan.done_reason == "stop" and calls else plan.done_reason
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": reason or None}],
            "usage": _usage(plan),
        }
        self.exchange.respond(200, orjson.dumps(body) + b"\n", V1_JSON)

    def _error_chunk(self) -> dict[str, Any]:
        return self._chunk(self._delta(""), None, model="")


class CompletionSink(_SseSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, include_usage: bool) -> None:
        super().__init__(exchange, model, stream, include_usage, "cmpl")

    def _chunk(self, text: str, finish: str | None, model: str | None = None) -> dict[str, Any]:
        # CompletionChunk puts choices before model; ToCompleteChunk stamps time.Now() each time.
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            "model": self.model if model is None else model,
            "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:  # the quirk: every chunk carries zero usage (§3)
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk

    def step(self, step: Step) -> None:
        if self.stream:  # a thinking record still makes a chunk, with empty text
            self._frame(orjson.dumps(self._chunk(step.content, None)))

    def finish(self, plan: Plan) -> None:
        if not self.stream:
            body = {
                "id": self.id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": plan.content, "index": 0, "finish_reason": plan.done_reason or None}],
                "usage": _usage(plan),
            }
            self.exchange.respond(200, orjson.dumps(body) + b"\n", V1_JSON)
            return
        last = self._chunk("", plan.done_reason or None)
        self._frame(orjson.dumps(last))
        if self.include_usage:
            self._frame(orjson.dumps({**last, "choices": [], "usage": _usage(plan)}))
        self._close()

    def _error_chunk(self) -> dict[str, Any]:
        return self._chunk("", None, model="")


def _call(body: dict[str, Any], **fields: Any) -> tuple[Call, bool]:
    """What a /v1 chat or completion request asks for (``max_tokens`` is ``num_predict``), and
    whether its stream is to carry usage."""
    call = Call(
        model=body.get("model") or "",
        stream=body.get("stream") is True,
        options={"num_predict": body.get("max_tokens")},
        **fields,
    )
    return call, bool((body.get("stream_options") or {}).get("include_usage"))


def _check_messages(messages: list[Any]) -> None:
    """The ``FromChatRequest`` refusals, all 400 from the middleware."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image_url", "input_audio"):
                    raise ApiError(400, "invalid message format", middleware=True)
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    raise ApiError(
                        400,
                        "image URLs are not currently supported, please use base64 encoded data instead",
                        middleware=True,
                    )
        elif not isinstance(content, str) and not (isinstance(message, dict) and message.get("tool_calls")):
            kind = {type(None): "<nil>", bool: "bool", dict: "map[string]interface {}"}.get(type(content), "float64")
            raise ApiError(400, f"invalid message content type: {kind}", middleware=True)


async def chat_completions(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "openai.ChatCompletionRequest", V1_CHAT, v1=True)
    messages = body.get("messages") or []
    if not messages:
        raise ApiError(400, "[] is too short - 'messages'", middleware=True)
    _check_messages(messages)
    reasoning = body.get("reasoning")
    effort = (reasoning.get("effort") or "") if reasoning is not None else (body.get("reasoning_effort") or "")
    if effort and effort not in _EFFORT:
        raise ApiError(
            400,
            f'invalid reasoning value: "{effort}" (must be "minimal", "low", "medium", "high", '
            '"xhigh", "ultra", "max", or "none")',
            middleware=True,
        )
    call, include_usage = _call(
        body, think=_EFFORT.get(effort), messages=native_messages(messages), tools=body.get("tools") or []
    )
    await chat_core(exchange, call, lambda _single: ChatSink(exchange, call.model, call.stream, include_usage))


async def completions(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "openai.CompletionRequest", V1_COMPLETION, v1=True)
    call, include_usage = _call(body, prompt=body.get("prompt") or "", suffix=body.get("suffix") or "")
    await generate_core(
        exchange, call, lambda _single: CompletionSink(exchange, call.model, call.stream, include_usage)
    )


async def embeddings(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "openai.EmbedRequest", V1_EMBED, v1=True)
    encoding = body.get("encoding_format") or ""
    if encoding and encoding.lower() not in ("float", "base64"):
        raise ApiError(
            400,
            f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].",
            middleware=True,
        )
    raw = body.get("input")
    raw = [""] if raw == "" else raw  # the middleware embeds an empty string rather than loading
    if raw is None or raw == []:
        raise ApiError(400, "invalid input", middleware=True)
    model = body.get("model") or ""
    if not model:
        raise ApiError(404, "model '' not found")
    if not isinstance(raw, str) and not (isinstance(raw, list) and all(isinstance(item, str) for item in raw)):
        raise ApiError(400, "invalid input type")
    result = await embed_core(exchange, model, embed_inputs(raw) or [""], body.get("dimensions"), None, {})
    assert result is not None  # there is always at least one input here
    data = []
    for index, vector in enumerate(result["embeddings"]):
        encoded: Any = vector
        if encoding.lower() == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": encoded, "index": index})
    tokens = result.get("prompt_eval_count", 0)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    answer = {"object": "list", "data": data, "model": model, "usage": usage}
    exchange.respond(200, orjson.dumps(answer) + b"\n", V1_JSON)


async def models(exchange: Exchange) -> None:
    listed = [
        {
            "id": spec.name,
            "object": "model",
            "created": int(spec.modified_at),
            "owned_by": ModelName.parse(spec.name).namespace,
        }
        for spec in exchange.state.registry.models()
    ]
    # ToListCompletion appends to a nil slice, so an empty registry gives "data": null (§3).
    exchange.respond(200, orjson.dumps({"object": "list", "data": listed or None}) + b"\n", V1_JSON)


async def model(exchange: Exchange) -> None:
    name = exchange.request.path.removeprefix("/v1/models/")
    spec = exchange.state.registry.get(name)
    if spec is None:  # ShowHandler reports the normalised name
        raise ApiError(404, f"model '{ModelName.parse(name).short}' not found")
    answer = {
        "id": name,
        "object": "model",
        "created": int(spec.modified_at),
        "owned_by": ModelName.parse(name).namespace,
    }
    exchange.respond(200, orjson.dumps(answer) + b"\n", V1_JSON)
