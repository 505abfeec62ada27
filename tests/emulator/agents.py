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
  ``max_output_tokens`` cut the answer. Errors use the OpenAI shape.
* Messages, streaming: ``message_start`` (usage ``input_tokens`` is only an *estimate*),
  ``content_block_start``, one ``content_block_delta`` per token, ``content_block_stop``,
  ``message_delta`` (``stop_reason`` and the real usage), ``message_stop``. Errors are
  ``{"type":"error","error":{"type":…,"message":…},"request_id":"req_…"}``; a missing or
  non-positive ``max_tokens`` is 400.

A failure after the stream started ends it with an ``error`` event in the route's shape
(inferred from the middleware writers, which write an error object for a non-200 record).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from .decoding import ApiError
from .engine import Plan, Step
from .faults import Fault
from .native import Call, chat_core
from .v1 import SSE, V1_JSON

if TYPE_CHECKING:
    from .connection import Exchange

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}  # fmt: skip


def anthropic_error(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_TYPES.get(status, "api_error")
    error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_" + os.urandom(12).hex()}
    return orjson.dumps(error)


def _body(exchange: Exchange) -> dict[str, Any]:
    try:
        body = orjson.loads(exchange.request.body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid character in JSON at {exc.pos}", middleware=True) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", middleware=True)
    return body


def _text(content: Any) -> str:
    """Text of either dialect's content: a string or a list of text-bearing blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


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


class _EventSink:
    """Typed SSE framing shared by both dialects."""

    def __init__(self, exchange: Exchange, model: str, stream: bool) -> None:
        self.exchange = exchange
        self.model = model
        self.stream = stream
        self.opened = False

    def _event(self, name: str, data: dict[str, Any]) -> None:
        if not self.exchange.started:
            self.exchange.start(200, SSE)
        self.exchange.send(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    def garble(self, kind: str) -> None:
        if not self.stream:
            return
        if not self.exchange.started:
            self.exchange.start(200, SSE)
        self.exchange.send(b"\n" if kind == "blank" else b'event: x\ndata: {"type"\n\n')

    def fail(self, fault: Fault) -> None:
        if not self.stream or not self.exchange.started:
            self._whole_error(fault.status, fault.message)
            return
        self._stream_error(fault.message)
        self.exchange.end()

    def _whole_error(self, status: int, message: str) -> None:
        raise NotImplementedError

    def _stream_error(self, message: str) -> None:
        raise NotImplementedError


class ResponsesSink(_EventSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, max_output_tokens: int | None) -> None:
        super().__init__(exchange, model, stream)
        self.id = f"resp_{int.from_bytes(os.urandom(3), 'big') % 1_000_000}"
        self.item = f"msg_{int.from_bytes(os.urandom(3), 'big') % 1_000_000}"
        self.created = int(time.time())
        self.max_output_tokens = max_output_tokens
        self.sequence = 0
        self.text: list[str] = []

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        self._event(kind, {**data, "sequence_number": self.sequence, "type": kind})
        self.sequence += 1

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None, "status": status,
            "incomplete_details": None, "model": self.model, "previous_response_id": None, "instructions": None,
            "output": output, "error": None, "tools": [], "tool_choice": "auto", "truncation": "disabled",
            "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "top_p": 1, "temperature": 1,
            "reasoning": None, "usage": usage, "max_output_tokens": self.max_output_tokens, "store": False,
            "background": False, "service_tier": "default", "metadata": {},
        }  # fmt: skip

    def _message(self, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}]
        return {"id": self.item, "type": "message", "status": status, "role": "assistant",
                "content": content if status == "completed" else []}  # fmt: skip

    def _open(self) -> None:
        if self.opened:
            return
        self.opened = True
        for kind in ("response.created", "response.in_progress"):
            self._send(kind, {"response": self._response("in_progress", [], None)})
        self._send("response.output_item.added", {"item": self._message("in_progress"), "output_index": 0})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._send("response.content_part.added", {"item_id": self.item, "output_index": 0, "content_index": 0,
                                                    "part": part})  # fmt: skip

    def step(self, step: Step) -> None:
        if not step.content:
            return
        self.text.append(step.content)
        if self.stream:
            self._open()
            self._send("response.output_text.delta", {"item_id": self.item, "output_index": 0, "content_index": 0,
                                                      "delta": step.content, "logprobs": []})  # fmt: skip

    def finish(self, plan: Plan) -> None:
        prompt, completion = plan.metrics.get("prompt_eval_count", 0), plan.metrics.get("eval_count", 0)
        usage = {
            "input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0},
        }  # fmt: skip
        message = self._message("completed")
        if not self.stream:
            body = self._response("completed", [message], usage)
            self.exchange.respond(200, orjson.dumps(body), V1_JSON)
            return
        self._open()
        text = "".join(self.text)
        where = {"item_id": self.item, "output_index": 0, "content_index": 0}
        self._send("response.output_text.done", {**where, "text": text, "logprobs": []})
        self._send("response.content_part.done", {**where, "part": message["content"][0]})
        self._send("response.output_item.done", {"item": message, "output_index": 0})
        self._send("response.completed", {"response": self._response("completed", [message], usage)})
        self.exchange.end()

    def _whole_error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        error = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        self.exchange.respond(status, orjson.dumps(error), V1_JSON)

    def _stream_error(self, message: str) -> None:
        self._send("error", {"code": "server_error", "message": message, "param": None})


class MessagesSink(_EventSink):
    def __init__(self, exchange: Exchange, model: str, stream: bool, estimate: int) -> None:
        super().__init__(exchange, model, stream)
        self.id = "msg_" + os.urandom(12).hex()
        self.estimate = estimate
        self.text: list[str] = []

    def _open(self) -> None:
        if self.opened:
            return
        self.opened = True
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "usage": {"input_tokens": self.estimate, "output_tokens": 0}}  # fmt: skip
        self._event("message_start", {"type": "message_start", "message": message})
        block = {"type": "text", "text": ""}
        self._event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})

    def step(self, step: Step) -> None:
        if not step.content:
            return
        self.text.append(step.content)
        if self.stream:
            self._open()
            delta = {"type": "text_delta", "text": step.content}
            self._event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def finish(self, plan: Plan) -> None:
        usage = {"input_tokens": plan.metrics.get("prompt_eval_count", 0),
                 "output_tokens": plan.metrics.get("eval_count", 0)}  # fmt: skip
        reason = "max_tokens" if plan.done_reason == "length" else "end_turn"
        if not self.stream:
            body = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [{"type": "text", "text": "".join(self.text)}], "stop_reason": reason,
                    "usage": usage}  # fmt: skip
            self.exchange.respond(200, orjson.dumps(body), V1_JSON)
            return
        self._open()
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
                messages.append({"role": str(item.get("role") or "user"), "content": _text(item["content"])})
    return messages


async def responses(exchange: Exchange) -> None:
    body = _body(exchange)
    stream = body.get("stream") is True
    cap = body.get("max_output_tokens")
    call = Call(
        model=str(body.get("model") or ""),
        stream=stream,
        options={"num_predict": _num_predict(cap)},
        keep_alive=None,
        messages=_responses_messages(body),
        tools=_function_tools(body.get("tools")),
    )
    await chat_core(exchange, call, lambda _single: ResponsesSink(exchange, call.model, stream, cap))


async def messages(exchange: Exchange) -> None:
    body = _body(exchange)
    max_tokens = _num_predict(body.get("max_tokens"))
    if max_tokens is None:
        raise ApiError(400, "max_tokens is required and must be positive", middleware=True)
    chat: list[dict[str, Any]] = []
    system = _text(body.get("system"))
    if system:
        chat.append({"role": "system", "content": system})
    raw = body.get("messages")
    for message in raw if isinstance(raw, list) else []:
        if isinstance(message, dict):
            chat.append({"role": str(message.get("role") or "user"), "content": _text(message.get("content"))})
    stream = body.get("stream") is True
    call = Call(
        model=str(body.get("model") or ""),
        stream=stream,
        options={"num_predict": max_tokens},
        keep_alive=None,
        messages=chat,
        tools=_function_tools(body.get("tools")),
    )
    # message_start's input count is a rough guess made before the prompt is rendered (Ollama
    # estimates from the request); the real count arrives in message_delta.
    estimate = max(1, len(_text(chat[-1]["content"]).split()) if chat else 1)
    await chat_core(exchange, call, lambda _single: MessagesSink(exchange, call.model, stream, estimate))
