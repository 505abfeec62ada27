"""Native inference: ``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/embeddings`` (§2).

The generate and chat cores are shared with /v1, which in Ollama is middleware
in front of the same handlers (§3): the checks, their order and their wording
live here once, and only the framing differs (a ``Sink``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .decoding import (
    CHAT,
    EMBED,
    EMBEDDINGS,
    GENERATE,
    MESSAGE,
    ApiError,
    check,
    decode,
    option_int,
    parse_keep_alive,
    parse_think,
)
from .engine import Ask, Plan, Sink, Step, make_plan, metrics, run, single
from .faults import BUFFERED_KINDS, STREAM_KINDS, Fault
from .prompt import (
    chat_prompt_tokens,
    embed_inputs,
    embedding_vector,
    generate_prompt_tokens,
    text_of,
    token_id,
    token_ids,
    truncated,
    words,
)
from .registry import ModelName, ModelSpec
from .wire import rfc3339

if TYPE_CHECKING:
    from .connection import Exchange

NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"  # gin's c.JSON
SinkFactory = Callable[[bool], Sink]  # argument: is this a single load/unload answer


def now() -> str:
    return rfc3339(time.time_ns())


@dataclass(slots=True)
class Call:
    """A generate or chat request after decoding (native or translated from /v1)."""

    model: str
    stream: bool
    options: dict[str, Any]
    keep_alive: float | None = None  # seconds; None: the server's default
    think: bool | str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    system: str = ""
    suffix: str = ""
    template: str = ""
    context: list[int] = field(default_factory=list)
    raw: bool = False


def _thinks(spec: ModelSpec, call: Call) -> bool:
    """Thinking models think unless told not to; others refuse a truthy ``think`` (§2.1)."""
    if "thinking" in spec.capabilities:
        return call.think is None or bool(call.think)
    if call.think is True or isinstance(call.think, str):
        raise ApiError(400, f"{json.dumps(call.model)} does not support thinking")
    return False


async def generate_core(exchange: Exchange, call: Call, make_sink: SinkFactory) -> None:
    state = exchange.state
    exchange.model = call.model
    spec = state.registry.get(call.model) if call.model else None
    if spec is None:  # a missing model is 404 here, not 400 (§4)
        raise ApiError(404, f"model '{call.model}' not found")
    if not call.prompt and call.keep_alive == 0:
        state.registry.unload(spec)
        make_sink(True).finish(single("unload"))
        return
    if call.raw and (call.template or call.system or call.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    think = _thinks(spec, call)
    if "completion" not in spec.capabilities:
        raise ApiError(400, f"{json.dumps(call.model)} does not support generate")
    if call.suffix and "insert" not in spec.capabilities:
        raise ApiError(400, f"{ModelName.parse(spec.name).full} does not support insert")
    ask = Ask(
        spec,
        generate_prompt_tokens(
            {"system": call.system, "prompt": call.prompt, "suffix": call.suffix, "context": call.context}
        ),
        think,
        call.prompt,
    )
    await _generate(exchange, call, spec, ask, make_sink, bool(call.prompt))


async def chat_core(exchange: Exchange, call: Call, make_sink: SinkFactory) -> None:
    state = exchange.state
    exchange.model = call.model
    if not call.model:
        raise ApiError(400, "model is required")
    spec = state.registry.get(call.model)
    if spec is None:
        raise ApiError(404, f"model '{call.model}' not found")
    if not call.messages and call.keep_alive == 0:
        state.registry.unload(spec)
        make_sink(True).finish(single("unload"))
        return
    think = _thinks(spec, call)
    if call.tools and "tools" not in spec.capabilities:  # CheckCapabilities names the full model (§4)
        raise ApiError(400, f"{ModelName.parse(spec.name).full} does not support tools")
    if "completion" not in spec.capabilities:
        raise ApiError(400, f"{json.dumps(call.model)} does not support chat")
    last = call.messages[-1] if call.messages else {}
    # After a tool result the model answers in words, so SDK agent loops terminate.
    tools = call.tools if str(last.get("role", "")).lower() != "tool" else []
    ask = Ask(spec, chat_prompt_tokens(call.messages), think, text_of(last.get("content")), tools)
    await _generate(exchange, call, spec, ask, make_sink, bool(call.messages))


async def _generate(
    exchange: Exchange, call: Call, spec: ModelSpec, ask: Ask, make_sink: SinkFactory, has_input: bool
) -> None:
    """Schedule, load, then either answer a load call or run the plan (common tail of both cores)."""
    state = exchange.state
    config = state.config
    num_predict = None if config.ignore_output_cap else option_int(call.options, "num_predict")
    num_ctx = option_int(call.options, "num_ctx") or spec.context_length
    async with state.slots.hold(config):
        keep_alive = config.keep_alive_s if call.keep_alive is None else call.keep_alive
        cold = state.registry.load(spec, keep_alive, num_ctx)
        if not has_input:
            if cold and config.sleep_on_load:
                await asyncio.sleep(config.load_delay_ms / 1000)
            make_sink(True).finish(single("load"))
            return
        plan = make_plan(config, dataclasses.replace(ask, num_predict=num_predict, cold=cold))
        fault = state.faults.take(exchange.request.path, call.model, STREAM_KINDS if call.stream else BUFFERED_KINDS)
        await run(exchange, plan, make_sink(False), fault)
    if call.keep_alive == 0:  # a generation with keep_alive 0 unloads once it is done
        state.registry.unload(spec)


class _NativeSink(Sink):
    """NDJSON lines when streaming, else one ``c.JSON`` object; errors as ``streamResponse`` sends them (§4)."""

    content_type = NDJSON

    def _line(self, record: dict[str, Any]) -> None:
        self.write(orjson.dumps(record) + b"\n")

    def _done(self, record: dict[str, Any]) -> None:
        if self.stream:
            self._line(record)
            self.exchange.end()
        else:
            self.exchange.respond(200, orjson.dumps(record), JSON_UTF8)

    def fail(self, fault: Fault) -> None:
        body = orjson.dumps({"error": fault.message})
        if not self.stream:
            self.exchange.respond(fault.status, body, JSON_UTF8)
        elif not self.exchange.started:  # nothing written yet: a real status, Content-Type set by hand
            self.exchange.respond(fault.status, body, "application/json")
        else:
            self.exchange.send(body + b"\n")
            self.exchange.end()

    def cut_record(self) -> bytes:
        return b'{"model":%b,"created_at":"%b","respon\n' % (orjson.dumps(self.model), now().encode())


class GenerateSink(_NativeSink):
    def __init__(self, exchange: Exchange, call: Call, stream: bool) -> None:
        super().__init__(exchange, call.model, stream)
        prompt_text = " ".join((call.system, call.prompt, call.suffix))
        self.context = None if call.raw else call.context + token_ids(prompt_text)

    def step(self, step: Step) -> None:
        if self.stream:
            record: dict[str, Any] = {"model": self.model, "created_at": now(), "response": step.content}
            if step.thinking:
                record["thinking"] = step.thinking
            record["done"] = False
            self._line(record)

    def finish(self, plan: Plan) -> None:
        record: dict[str, Any] = {
            "model": self.model,
            "created_at": now(),
            "response": "" if self.stream else plan.content,
        }
        if not self.stream and plan.thinking:
            record["thinking"] = plan.thinking
        record["done"] = True
        record["done_reason"] = plan.done_reason
        if self.context is not None and plan.done_reason in ("stop", "length"):
            record["context"] = self.context + [token_id(s.thinking or s.content) for s in plan.steps]
        record.update(plan.metrics)
        self._done(record)


class ChatSink(_NativeSink):
    def step(self, step: Step) -> None:
        if self.stream:
            message: dict[str, Any] = {"role": "assistant", "content": step.content}
            if step.thinking:
                message["thinking"] = step.thinking
            if step.tool_calls:
                message["tool_calls"] = list(step.tool_calls)
            self._line({"model": self.model, "created_at": now(), "message": message, "done": False})

    def finish(self, plan: Plan) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": "" if self.stream else plan.content}
        calls = list(plan.final_tool_calls)
        if not self.stream:  # stream:false folds every chunk's thinking and tool calls together
            if plan.thinking:
                message["thinking"] = plan.thinking
            calls = [call for s in plan.steps for call in s.tool_calls] + calls
        if calls:
            message["tool_calls"] = calls
        record = {
            "model": self.model,
            "created_at": now(),
            "message": message,
            "done": True,
            "done_reason": plan.done_reason,
            **plan.metrics,
        }
        self._done(record)


def _call(body: dict[str, Any], **fields: Any) -> Call:
    """A native generate or chat request: the fields both have, and ``fields``."""
    return Call(
        model=body.get("model") or "",
        stream=body.get("stream") is not False,
        options=body.get("options") or {},
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        think=parse_think(body.get("think")),
        **fields,
    )


async def generate(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "api.GenerateRequest", GENERATE)
    call = _call(
        body,
        prompt=body.get("prompt") or "",
        system=body.get("system") or "",
        suffix=body.get("suffix") or "",
        template=body.get("template") or "",
        context=list(body.get("context") or []),
        raw=bool(body.get("raw")),
    )
    await generate_core(exchange, call, lambda single: GenerateSink(exchange, call, call.stream and not single))


async def chat(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "api.ChatRequest", CHAT)
    messages = body.get("messages") or []
    for message in messages:
        if not isinstance(message, dict):
            kind = "string" if isinstance(message, str) else "number"
            field = "Go struct field ChatRequest.messages of type api.Message"
            raise ApiError(400, f"json: cannot unmarshal {kind} into {field}")
        check(message, "ChatRequest.messages", MESSAGE)
    call = _call(body, messages=messages, tools=body.get("tools") or [])
    await chat_core(exchange, call, lambda single: ChatSink(exchange, call.model, call.stream and not single))


async def embed_core(
    exchange: Exchange,
    model: str,
    texts: list[str],
    dimensions: int | None,
    keep_alive: float | None,
    options: dict[str, Any],
) -> dict[str, Any] | None:
    """Embed ``texts``: the EmbedResponse fields, or None when there was nothing to embed (a load call)."""
    state = exchange.state
    config = state.config
    exchange.model = model
    spec = state.registry.get(model)
    if spec is None:
        raise ApiError(404, f"model {json.dumps(model)} not found, try pulling it first")
    num_ctx = option_int(options, "num_ctx") or spec.context_length
    async with state.slots.hold(config):
        cold = state.registry.load(spec, config.keep_alive_s if keep_alive is None else keep_alive, num_ctx)
        if texts and config.first_token_delay_ms > 0:  # the embedding's compute time
            await asyncio.sleep(config.first_token_delay_ms / 1000)
        vectors = [truncated(embedding_vector(text, spec.embedding_length), dimensions) for text in texts]
    if keep_alive == 0:
        state.registry.unload(spec)
    if not texts:
        return None
    timing = metrics(config, sum(words(text) for text in texts), 0, cold)
    result: dict[str, Any] = {"model": model, "embeddings": vectors}
    kept = ("total_duration", "load_duration", "prompt_eval_count")  # EmbedResponse has no eval fields
    result.update((key, timing[key]) for key in kept if key in timing)
    return result


async def embed(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "api.EmbedRequest", EMBED)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    model = body.get("model") or ""
    if not model:
        raise ApiError(404, "model '' not found")
    raw = body.get("input")
    if not (raw is None or isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(i, str) for i in raw))):
        raise ApiError(400, "invalid input type")
    dimensions = body.get("dimensions")
    result = await embed_core(exchange, model, embed_inputs(raw), dimensions, keep_alive, body.get("options") or {})
    answer = result if result is not None else {"model": model, "embeddings": []}
    exchange.respond(200, orjson.dumps(answer), JSON_UTF8)


async def embeddings(exchange: Exchange) -> None:
    body = decode(exchange.request.body, "api.EmbeddingRequest", EMBEDDINGS)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    model = body.get("model") or ""
    if not model:
        raise ApiError(400, "model is required")
    prompt = body.get("prompt") or ""
    result = await embed_core(exchange, model, [prompt] if prompt else [], None, keep_alive, body.get("options") or {})
    vector = result["embeddings"][0] if result is not None else []
    exchange.respond(200, orjson.dumps({"embedding": vector}), JSON_UTF8)
