"""The agent dialects: ``/v1/responses`` (OpenAI Responses API) and ``/v1/messages`` (Anthropic).

In Ollama both are middleware in front of ``ChatHandler`` (``middleware/openai.go``
``ResponsesMiddleware``, ``middleware/anthropic.go``), so they run through the same chat
core here; only the framing differs. The frames below were recorded from Ollama 0.24:

* Responses, streaming: typed SSE events ``event: NAME`` + ``data: JSON`` —
  ``response.created``, ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, one ``response.output_text.delta`` per token,
  ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, ``response.completed`` (usage inside ``response``), each
  with a running ``sequence_number``; no ``[DONE]``. ``status`` is ``completed`` even when
  ``max_output_tokens`` cut the answer. Errors use the OpenAI shape. Ollama keeps no state:
  its ``ResponsesRequest`` has no ``previous_response_id``, ``store`` or ``metadata`` (Go's
  decoder drops them) and every answer says ``null``, ``false``, ``{}`` (openai/responses.go).
* Messages, streaming: ``message_start`` (usage ``input_tokens`` is only an *estimate*),
  ``content_block_start``, one ``content_block_delta`` per token, ``content_block_stop``,
  ``message_delta`` (``stop_reason`` and the real usage), ``message_stop``. Errors are
  ``{"type":"error","error":{"type":…,"message":…},"request_id":"req_…"}``; a missing or
  non-positive ``max_tokens`` is 400.

A failure after the stream started ends it with an ``error`` event in the route's shape
(inferred from the middleware writers, which write an error object for a non-200 record).
"""

from __future__ import annotations

import abc
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from .decoding import ApiError, decode
from .engine import Plan, Sink, Step
from .faults import Fault
from .native import Call, chat_core
from .prompt import text_of
from .v1 import SSE, V1_JSON, error_body

if TYPE_CHECKING:
    from .connection import Exchange

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}  # fmt: skip


def anthropic_error(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_TYPES.get(status, "api_error")
    error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_" + os.urandom(12).hex()}
    return orjson.dumps(error)


def _body(exchange: Exchange, struct: str) -> dict[str, Any]:
    """The request as Ollama 0.24 decodes it, with Go's error texts (observed: `EOF` for an empty
    body, `unexpected EOF` for a truncated one, `json: cannot unmarshal array into Go value of
    type openai.ResponsesRequest` / `anthropic.MessagesRequest`)."""
    return decode(exchange.request.body, struct, {}, v1=True)


def _num_predict(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _function_tools(tools: Any) -> list[dict[str, Any]]:
    """Only function tools become native tools; built-in ones (``web_search``) do not."""
    if not isinstance(tools, list):
        return []
    native = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            function = {k: tool.get(k) for k in ("name", "description", "parameters")}
            native.append({"type": "function", "function": function})
        elif isinstance(tool, dict) and "input_schema" in tool:  # an Anthropic client tool
            function = {"name": tool.get("name"), "description": tool.get("description"),
                        "parameters": tool.get("input_schema")}  # fmt: skip
            native.append({"type": "function", "function": function})
    return native


class _EventSink(Sink):
    """Typed SSE framing shared by both dialects: the opening events go out with the first
    token, one delta event per token follows."""

    content_type = SSE

    def __init__(self, exchange: Exchange, model: str, stream: bool) -> None:
        super().__init__(exchange, model, stream)
        self.opened = False
        self.text: list[str] = []

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    def cut_record(self) -> bytes:
        return b'event: x\ndata: {"type"\n\n'

    def step(self, step: Step) -> None:
        if not step.content:
            return
        self.text.append(step.content)
        if self.stream:
            self._ensure_open()
            self._delta(step.content)

    def _ensure_open(self) -> None:
        if not self.opened:
            self.opened = True
            self._open()

    def fail(self, fault: Fault) -> None:
        if not self.stream or not self.exchange.started:
            self._whole_error(fault.status, fault.message)
            return
        self._stream_error(fault.message)
        self.exchange.end()

    @abc.abstractmethod
    def _open(self) -> None:
        """The events before the first delta."""

    @abc.abstractmethod
    def _delta(self, content: str) -> None: ...

    @abc.abstractmethod
    def _whole_error(self, status: int, message: str) -> None: ...

    @abc.abstractmethod
    def _stream_error(self, message: str) -> None: ...


class ResponsesSink(_EventSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, max_output_tokens: int | None) -> None:
        super().__init__(exchange, model, stream)
        self.id = f"resp_{int.from_bytes(os.urandom(3), 'big') % 1_000_000}"
        self.item = f"msg_{int.from_bytes(os.urandom(3), 'big') % 1_000_000}"
        self.created = int(time.time())
        self.max_output_tokens = max_output_tokens
        self.sequence = 0

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        self._event(kind, {**data, "sequence_number": self.sequence, "type": kind})
        self.sequence += 1

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None, "status": status,
            "incomplete_details": None, "model": self.model, "previous_response_id": None, "instructions": None,
            "output": output, "error": None, "tools": [], "tool_choice": "auto", "truncation": "disabled",
            "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "top_p": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "top_logprobs": 0, "temperature": 1, "reasoning": None, "usage": usage,
            "max_output_tokens": self.max_output_tokens, "max_tool_calls": None, "store": False,
            "background": False, "service_tier": "default", "metadata": {}, "safety_identifier": None,
            "prompt_cache_key": None,
        }  # fmt: skip

    def _message(self, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}]
        return {"id": self.item, "type": "message", "status": status, "role": "assistant",
                "content": content if status == "completed" else []}  # fmt: skip

    def _open(self) -> None:
        for kind in ("response.created", "response.in_progress"):
            self._send(kind, {"response": self._response("in_progress", [], None)})
        self._send("response.output_item.added", {"item": self._message("in_progress"), "output_index": 0})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._send("response.content_part.added", {"item_id": self.item, "output_index": 0, "content_index": 0,
                                                    "part": part})  # fmt: skip

    def _delta(self, content: str) -> None:
        self._send("response.output_text.delta", {"item_id": self.item, "output_index": 0, "content_index": 0,
                                                  "delta": content, "logprobs": []})  # fmt: skip

    def finish(self, plan: Plan) -> None:
        prompt, completion = plan.usage
        usage = {
            "input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0},
        }  # fmt: skip
        message = self._message("completed")
        if not self.stream:
            body = self._response("completed", [message], usage)
            self.exchange.respond(200, orjson.dumps(body), V1_JSON)
            return
        self._ensure_open()
        text = "".join(self.text)
        where = {"item_id": self.item, "output_index": 0, "content_index": 0}
        self._send("response.output_text.done", {**where, "text": text, "logprobs": []})
        self._send("response.content_part.done", {**where, "part": message["content"][0]})
        self._send("response.output_item.done", {"item": message, "output_index": 0})
        self._send("response.completed", {"response": self._response("completed", [message], usage)})
        self.exchange.end()

    def _whole_error(self, status: int, message: str) -> None:
        self.exchange.respond(status, error_body(status, message), V1_JSON)

    def _stream_error(self, message: str) -> None:
        self._send("error", {"code": "server_error", "message": message, "param": None})


class MessagesSink(_EventSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, estimate: int) -> None:
        super().__init__(exchange, model, stream)
        self.id = "msg_" + os.urandom(12).hex()
        self.estimate = estimate

    def _open(self) -> None:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "usage": {"input_tokens": self.estimate, "output_tokens": 0}}  # fmt: skip
        self._event("message_start", {"type": "message_start", "message": message})
        block = {"type": "text", "text": ""}
        self._event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})

    def _delta(self, content: str) -> None:
        delta = {"type": "text_delta", "text": content}
        self._event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def finish(self, plan: Plan) -> None:
        prompt, completion = plan.usage
        usage = {"input_tokens": prompt, "output_tokens": completion}
        reason = "max_tokens" if plan.done_reason == "length" else "end_turn"
        if not self.stream:
            body = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [{"type": "text", "text": "".join(self.text)}], "stop_reason": reason,
                    "usage": usage}  # fmt: skip
            self.exchange.respond(200, orjson.dumps(body), V1_JSON)
            return
        self._ensure_open()
        self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self._event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason}, "usage": usage})
        self._event("message_stop", {"type": "message_stop"})
        self.exchange.end()

    def _whole_error(self, status: int, message: str) -> None:
        self.exchange.respond(status, anthropic_error(status, message), V1_JSON)

    def _stream_error(self, message: str) -> None:
        self._event("error", {"type": "error", "error": {"type": "api_error", "message": message}})


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``FromResponsesRequest``: instructions become a system message, input items chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise ApiError(400, "invalid input item", middleware=True)
            if item.get("type") == "function_call_output":
                messages.append({"role": "tool", "content": str(item.get("output", ""))})
            elif "content" in item:
                messages.append({"role": str(item.get("role") or "user"), "content": text_of(item["content"])})
    return messages


async def responses(exchange: Exchange) -> None:
    body = _body(exchange, "openai.ResponsesRequest")
    stream = body.get("stream") is True
    cap = body.get("max_output_tokens")
    call = Call(
        model=str(body.get("model") or ""),
        stream=stream,
        options={"num_predict": _num_predict(cap)},
        messages=_responses_messages(body),
        tools=_function_tools(body.get("tools")),
    )
    await chat_core(exchange, call, lambda _single: ResponsesSink(exchange, call.model, stream, cap))


async def messages(exchange: Exchange) -> None:
    body = _body(exchange, "anthropic.MessagesRequest")
    max_tokens = _num_predict(body.get("max_tokens"))
    if max_tokens is None:
        raise ApiError(400, "max_tokens is required and must be positive", middleware=True)
    chat: list[dict[str, Any]] = []
    system = text_of(body.get("system"))
    if system:
        chat.append({"role": "system", "content": system})
    raw = body.get("messages")
    for message in raw if isinstance(raw, list) else []:
        if isinstance(message, dict):
            chat.append({"role": str(message.get("role") or "user"), "content": text_of(message.get("content"))})
    stream = body.get("stream") is True
    call = Call(
        model=str(body.get("model") or ""),
        stream=stream,
        options={"num_predict": max_tokens},
        messages=chat,
        tools=_function_tools(body.get("tools")),
    )
    # message_start's input count is a rough guess made before the prompt is rendered (Ollama
    # estimates from the request); the real count arrives in message_delta.
    estimate = max(1, len(text_of(chat[-1]["content"]).split()) if chat else 1)
    await chat_core(exchange, call, lambda _single: MessagesSink(exchange, call.model, stream, estimate))
