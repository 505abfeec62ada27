"""The Ollama emulator checked against the official clients and the wire format of the spec.

Exact values are asserted on purpose: the gateway's tests trust this emulator,
so its counters, framing and error wording must be right, not roughly right.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

from tests.emulator import Config, Emulator, Fault, ModelSpec, count_prompt_tokens, embedding_vector

HI = [{"role": "user", "content": "Why is the sky blue?"}]
V1_HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Why is the sky blue?"}]
LOREM5 = "Lorem ipsum dolor sit amet"


@pytest.fixture(scope="module")
def server() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.fixture
def emu(server: Emulator) -> Emulator:
    server.reset()
    server.configure(tokens=5)
    return server


@pytest.fixture
def client(emu: Emulator) -> Iterator[ollama.Client]:
    with ollama.Client(host=emu.url) as c:
        yield c


@pytest.fixture
def oai(emu: Emulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{emu.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


class Raw:
    """A bare socket speaking HTTP/1.1, to see the bytes and the timing the clients hide."""

    def __init__(self, emu: Emulator) -> None:
        self.sock = socket.create_connection((emu.host, emu.port), timeout=3)
        self.buf = b""
        self.heads: list[bool] = []  # per request sent: was it HEAD (no body to read back)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Raw:
        data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        fields = {"Host": "localhost:11434", "Content-Length": str(len(data)), **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        self.sock.sendall(head.encode() + data)
        self.heads.append(method == "HEAD")
        return self

    def _fill(self) -> bool:
        more = self.sock.recv(65536)
        self.buf += more
        return bool(more)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(self.buf)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(self.buf)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        status = int(self.line().split()[1])
        headers = {}
        while line := self.line():
            key, _, value = line.decode().partition(":")
            headers[key.lower()] = value.strip()
        return status, headers

    def chunk(self) -> bytes:
        """The next chunk's payload; b"" is the terminating chunk."""
        size = int(self.line(), 16)
        data = self.exactly(size)
        assert self.exactly(2) == b"\r\n"
        if size == 0:
            return b""
        return data

    def chunks(self) -> list[bytes]:
        out = []
        while piece := self.chunk():
            out.append(piece)
        return out

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        if self.heads and self.heads.pop(0):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, b"".join(self.chunks())
        return status, headers, self.exactly(int(headers.get("content-length", "0")))

    def closed(self) -> bool:
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


def lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines()]


def sse(body: bytes) -> list[Any]:
    assert body.endswith(b"\n\n")
    frames = body.decode().split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in frames]


# The official ollama client


def test_chat_without_streaming_reports_exact_counters_and_durations(client: ollama.Client) -> None:
    reply = client.chat(model="tiny", messages=HI)
    prompt = count_prompt_tokens("/api/chat", {"messages": HI})
    assert prompt == 6
    assert reply.message.content == LOREM5
    assert (reply.done, reply.done_reason, reply.prompt_eval_count, reply.eval_count) == (True, "stop", 6, 5)
    # load 0.1 ms (cold); prompt 10 µs per token; eval 10 µs per token at zero delays
    assert (reply.load_duration, reply.prompt_eval_duration, reply.eval_duration) == (100_000, 60_000, 50_000)
    assert reply.total_duration == 210_000


def test_chat_streams_each_token_then_an_empty_done_chunk(client: ollama.Client) -> None:
    parts = list(client.chat(model="tiny", messages=HI, stream=True))
    assert [p.message.content for p in parts] == ["Lorem", " ipsum", " dolor", " sit", " amet", ""]
    assert [p.done for p in parts] == [False] * 5 + [True]
    assert parts[0].eval_count is None  # non-final chunks carry no metrics (omitempty)
    assert (parts[-1].done_reason, parts[-1].eval_count, parts[-1].prompt_eval_count) == ("stop", 5, 6)


def test_generate_final_chunk_carries_context_of_prompt_plus_output(client: ollama.Client) -> None:
    parts = list(client.generate(model="tiny", prompt="Why is the sky blue?", stream=True))
    assert "".join(p.response or "" for p in parts) == LOREM5
    final = parts[-1]
    assert final.response == ""
    assert final.prompt_eval_count == count_prompt_tokens("/api/generate", {"prompt": "Why is the sky blue?"}) == 5
    assert final.context is not None
    assert len(final.context) == 5 + 5
    again = client.generate(model="tiny", prompt="More", context=final.context)
    assert again.prompt_eval_count == 10 + 1


async def test_async_client_streams_thinking_before_content() -> None:
    with Emulator(Config(tokens=2, thinking_tokens=3)) as emu:
        async with ollama.AsyncClient(host=emu.url) as client:
            parts = [p async for p in await client.chat(model="qwen3", messages=HI, stream=True)]
    assert [(p.message.thinking, p.message.content) for p in parts[:5]] == [
        ("Let", ""),
        (" me", ""),
        (" think", ""),
        (None, "Lorem"),
        (None, " ipsum"),
    ]
    assert parts[-1].eval_count == 5


def test_embed_and_legacy_embeddings_are_deterministic_unit_vectors(client: ollama.Client) -> None:
    result = client.embed(model="nomic-embed-text", input=["a cat", "a dog"])
    assert result.embeddings == [embedding_vector("a cat", 768), embedding_vector("a dog", 768)]
    assert all(abs(math.fsum(v * v for v in vec) - 1) < 1e-5 for vec in result.embeddings)
    assert result.prompt_eval_count == 4
    assert client.embeddings(model="nomic-embed-text", prompt="a cat").embedding == embedding_vector("a cat", 768)
    assert len(client.embed(model="nomic-embed-text", input="x", dimensions=64).embeddings[0]) == 64


def test_list_is_newest_first_and_show_always_has_model_info(client: ollama.Client, emu: Emulator) -> None:
    names = [m.model for m in client.list().models]
    assert names == ["tiny:latest", "llama3.2:latest", "qwen3:latest", "llava:latest", "nomic-embed-text:latest"]
    shown = client.show("qwen3")
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["qwen3.context_length"] == 40_960
    assert shown.details is not None
    assert shown.details.family == "qwen3"
    emu.set_models([])
    assert client.list().models == []
    assert httpx.get(f"{emu.url}/api/tags").content == b'{"models":[]}'


def test_ps_follows_loads_and_keep_alive_zero_unloads(client: ollama.Client, emu: Emulator) -> None:
    assert client.ps().models == []
    client.chat(model="tiny", messages=HI)
    client.embed(model="nomic-embed-text", input="x", keep_alive="1h")
    assert [m.model for m in client.ps().models] == ["nomic-embed-text:latest", "tiny:latest"]
    expires = client.ps().models[0].expires_at
    assert expires is not None
    assert 3590 < expires.timestamp() - time.time() <= 3600
    unloaded = client.chat(model="tiny", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert [m.model for m in client.ps().models] == ["nomic-embed-text:latest"]


def test_errors_carry_ollama_status_and_wording(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=HI)
    assert (missing.value.status_code, missing.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as embed_missing:
        client.embed(model="nope", input="x")
    assert embed_missing.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as thinking:
        client.chat(model="tiny", messages=HI, think=True)
    assert (thinking.value.status_code, thinking.value.error) == (400, '"tiny" does not support thinking')


def test_mid_stream_error_line_raises_with_status_minus_one(client: ollama.Client, emu: Emulator) -> None:
    emu.inject("error", after_tokens=2, message="boom")
    stream = client.chat(model="tiny", messages=HI, stream=True)
    assert [next(stream).message.content for _ in range(2)] == ["Lorem", " ipsum"]
    with pytest.raises(ollama.ResponseError) as failure:
        next(stream)
    assert (failure.value.status_code, failure.value.error) == (-1, "boom")


# The openai SDK


def test_openai_chat_without_streaming_has_usage(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model="tiny", messages=V1_HI, max_tokens=3)
    assert done.id.startswith("chatcmpl-")
    assert done.system_fingerprint == "fp_ollama"
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == ("Lorem ipsum dolor", "length")
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 3, 9)


def test_openai_stream_with_include_usage_ends_with_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(model="tiny", messages=V1_HI, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == LOREM5
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", None]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-2].usage is None
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 11
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1


def test_openai_stream_without_include_usage_has_no_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="tiny", messages=V1_HI, stream=True))
    assert len(chunks) == 6
    assert all(c.usage is None and c.choices for c in chunks)


def test_openai_completions_and_embeddings(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="tiny", prompt="Why is the sky blue?")
    assert (done.choices[0].text, done.object, done.id[:5]) == (LOREM5, "text_completion", "cmpl-")
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 5)
    streamed = list(oai.completions.create(model="tiny", prompt="Hi", stream=True))
    assert [c.choices[0].text for c in streamed] == ["Lorem", " ipsum", " dolor", " sit", " amet", ""]
    vectors = oai.embeddings.create(model="nomic-embed-text", input=["a cat", "b"], encoding_format="float")
    assert vectors.data[0].embedding == embedding_vector("a cat", 768)
    assert vectors.usage.prompt_tokens == 3
    packed = oai.embeddings.create(model="nomic-embed-text", input="a cat")  # the SDK asks for base64
    assert packed.data[0].embedding == pytest.approx(embedding_vector("a cat", 768), abs=1e-6)


def test_openai_models_and_not_found(oai: openai.OpenAI, emu: Emulator) -> None:
    assert [m.id for m in oai.models.list()][:2] == ["tiny:latest", "llama3.2:latest"]
    assert oai.models.retrieve("tiny").owned_by == "library"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="nope", messages=V1_HI)
    assert missing.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")
    emu.set_models([])
    assert httpx.get(f"{emu.url}/v1/models").json() == {"object": "list", "data": None}


def test_openai_error_frame_raises_api_error(oai: openai.OpenAI, emu: Emulator) -> None:
    emu.inject("error", after_tokens=2, message="boom", v1_style="openai")
    with oai.chat.completions.create(model="tiny", messages=V1_HI, stream=True) as stream:
        assert [next(stream).choices[0].delta.content for _ in range(2)] == ["Lorem", " ipsum"]
        with pytest.raises(openai.APIError, match="boom"):
            next(stream)


def test_openai_faithful_mid_stream_error_is_a_silent_truncation(oai: openai.OpenAI, emu: Emulator) -> None:
    emu.inject("error", after_tokens=2)
    chunks = list(oai.chat.completions.create(model="tiny", messages=V1_HI, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["Lorem", " ipsum", ""]
    assert chunks[-1].model == ""
    assert chunks[-1].choices[0].finish_reason is None


def test_openai_tools_and_reasoning(oai: openai.OpenAI) -> None:
    properties = {"city": {"type": "string"}, "days": {"type": "integer"}}
    schema: dict[str, object] = {"type": "object", "properties": properties}
    tools: list[ChatCompletionFunctionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    ]
    done = oai.chat.completions.create(model="qwen3", messages=V1_HI, tools=tools)
    calls = done.choices[0].message.tool_calls or []
    call = calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (done.choices[0].finish_reason, call.type, call.function.name) == ("tool_calls", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "test", "days": 1}
    assert call.id.startswith("call_")
    assert len(call.id) == 13
    assert (done.choices[0].message.model_extra or {})["reasoning"] == "Let me think"  # not reasoning_content
    quiet = oai.chat.completions.create(model="qwen3", messages=V1_HI, reasoning_effort="none")
    assert getattr(quiet.choices[0].message, "reasoning", None) is None


# The wire, byte by byte


def test_ndjson_stream_is_chunked_one_line_per_chunk(emu: Emulator) -> None:
    with Raw(emu) as raw:
        status, headers = raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).head()
        pieces = raw.chunks()
    assert (status, headers["content-type"], headers["transfer-encoding"]) == (200, "application/x-ndjson", "chunked")
    assert all(p.endswith(b"\n") and p.count(b"\n") == 1 for p in pieces)
    final = json.loads(pieces[-1])
    assert list(final) == [
        "model",
        "created_at",
        "message",
        "done",
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == 5


def test_stream_false_and_load_calls_are_one_json_object(emu: Emulator) -> None:
    with Raw(emu) as raw:
        status, headers, body = raw.send(
            "POST", "/api/generate", {"model": "tiny", "prompt": "x", "stream": False}
        ).response()
        assert (status, headers["content-type"]) == (200, "application/json; charset=utf-8")
        assert json.loads(body)["response"] == LOREM5
        _, headers, body = raw.send("POST", "/api/generate", {"model": "tiny"}).response()
    loaded = json.loads(body)
    assert (headers["content-type"], loaded["done_reason"], loaded["response"]) == (
        "application/json; charset=utf-8",
        "load",
        "",
    )
    assert "total_duration" not in loaded
    assert "context" not in loaded


def test_num_predict_cuts_the_answer(client: ollama.Client) -> None:
    cut = client.generate(model="tiny", prompt="x", options={"num_predict": 2})
    assert (cut.response, cut.done_reason, cut.eval_count) == ("Lorem ipsum", "length", 2)


def test_sse_modern_frames(emu: Emulator) -> None:
    emu.configure(tokens=1)
    body = {"model": "tiny", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    with Raw(emu) as raw:
        _, headers, data = raw.send("POST", "/v1/chat/completions", body).response()
    assert headers["content-type"] == "text/event-stream"
    first, finish, usage, done = sse(data)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "Lorem"}, "finish_reason": None}]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert (usage["choices"], usage["usage"], done) == (
        [],
        {"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7},
        "[DONE]",
    )
    assert first["id"] == finish["id"] == usage["id"]
    assert first["system_fingerprint"] == "fp_ollama"


@pytest.mark.parametrize(("style", "with_usage"), [("legacy", True), ("pre-0.5.2", False)])
def test_sse_older_frame_styles(emu: Emulator, style: str, with_usage: bool) -> None:
    emu.configure(tokens=2, frame_style=style)
    body = {"model": "tiny", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    with Raw(emu) as raw:
        frames = sse(raw.send("POST", "/v1/chat/completions", body).response()[2])
    deltas = [f["choices"][0]["delta"] for f in frames[:3]]
    assert deltas == [{"role": "assistant", "content": c} for c in ("Lorem", " ipsum", "")]
    assert [f["choices"][0]["finish_reason"] for f in frames[:3]] == [None, None, "stop"]
    assert len(frames) == (5 if with_usage else 4)
    assert frames[-1] == "[DONE]"


def test_completions_include_usage_quirk(emu: Emulator) -> None:
    emu.configure(tokens=1)
    body = {"model": "tiny", "prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}}
    with Raw(emu) as raw:
        frames = sse(raw.send("POST", "/v1/completions", body).response()[2])
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert [f["usage"] for f in frames[:2]] == [zero, zero]
    assert [f["choices"][0]["finish_reason"] for f in frames[:2]] == [None, "stop"]
    assert frames[2]["choices"] == []
    assert frames[2]["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert frames[3] == "[DONE]"
    assert list(frames[0]) == ["id", "object", "created", "choices", "model", "system_fingerprint", "usage"]


def test_tokens_arrive_on_the_configured_schedule(emu: Emulator) -> None:
    emu.configure(tokens=4, first_token_delay_ms=60, token_delay_ms=30)
    with Raw(emu) as raw:
        start = time.monotonic()
        raw.send("POST", "/api/generate", {"model": "tiny", "prompt": "x"}).head()
        arrivals = []
        while raw.chunk():
            arrivals.append((time.monotonic() - start) * 1000)
    assert len(arrivals) == 5
    assert 55 <= arrivals[0] <= 80
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:4])]
    assert all(22 <= gap <= 40 for gap in gaps), gaps
    assert arrivals[4] - arrivals[3] < 10  # the done chunk follows the last token at once


def test_tool_calls_in_their_own_chunk_or_in_the_done_chunk(client: ollama.Client, emu: Emulator) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    parts = list(client.chat(model="llama3.2", messages=HI, tools=tools, stream=True))
    assert [bool(p.message.tool_calls) for p in parts] == [True, False]
    emu.configure(tool_calls_in_done=True)
    parts = list(client.chat(model="llama3.2", messages=HI, tools=tools, stream=True))
    assert len(parts) == 1
    assert parts[0].done
    assert [call.function.name for call in parts[0].message.tool_calls or []] == ["f"]
    assert parts[0].eval_count == 1  # the call is still one generated step
    answered = client.chat(model="llama3.2", tools=tools, messages=[*HI, {"role": "tool", "content": "sunny"}])
    assert answered.message.content == LOREM5
    assert not answered.message.tool_calls
    with pytest.raises(ollama.ResponseError, match=r"registry\.ollama\.ai/library/tiny:latest does not support tools"):
        client.chat(model="tiny", messages=HI, tools=tools)


# Faults


def test_status_fault_answers_before_the_first_byte(emu: Emulator) -> None:
    emu.inject(Fault("status", status=502, body="upstream gone", content_type="text/plain", path="/api/tags"))
    assert httpx.get(f"{emu.url}/api/version").status_code == 200  # a fault for another path is not used up
    gone = httpx.get(f"{emu.url}/api/tags")
    assert (gone.status_code, gone.text, gone.headers["content-type"]) == (502, "upstream gone", "text/plain")
    assert httpx.get(f"{emu.url}/api/tags").status_code == 200
    emu.inject("status", status=503, message="busy")
    busy = httpx.post(f"{emu.url}/v1/chat/completions", json={"model": "tiny", "messages": HI})
    assert busy.json() == {"error": {"message": "busy", "type": "api_error", "param": None, "code": None}}


def test_a_fault_without_path_waits_for_an_inference_request(emu: Emulator, client: ollama.Client) -> None:
    emu.inject("stall")
    emu.inject("drop", after_tokens=2)
    assert httpx.get(f"{emu.url}/api/tags").status_code == 200  # a health probe eats neither
    assert httpx.get(f"{emu.url}/api/version").status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{emu.url}/api/embed", json={"model": "nomic-embed-text", "input": "x"}, timeout=0.2)
    assert client.embed(model="nomic-embed-text", input="x").embeddings  # "drop after 2 tokens" needs tokens
    with pytest.raises(httpx.TransportError):  # still armed for the first request with tokens
        httpx.post(f"{emu.url}/api/chat", json={"model": "tiny", "messages": HI})


def test_error_fault_after_zero_tokens_is_a_real_http_error(emu: Emulator) -> None:
    emu.inject("error", message="no runner")
    with Raw(emu) as raw:
        status, headers, body = raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).response()
    assert (status, headers["content-type"], body) == (500, "application/json", b'{"error":"no runner"}')


def test_error_fault_mid_stream_keeps_status_200(emu: Emulator) -> None:
    emu.inject("error", after_tokens=3, message="boom")
    with Raw(emu) as raw:
        status, _, body = raw.send("POST", "/api/generate", {"model": "tiny", "prompt": "x"}).response()
    assert status == 200
    assert [p.get("response") for p in lines(body)] == ["Lorem", " ipsum", " dolor", None]
    assert body.endswith(b'\n{"error":"boom"}\n')


def test_drop_fault_aborts_without_the_terminating_chunk(emu: Emulator) -> None:
    emu.inject("drop", after_tokens=2)
    with Raw(emu) as raw:
        raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).head()
        assert len(raw.chunk()) > 0
        assert len(raw.chunk()) > 0
        with pytest.raises((EOFError, ConnectionResetError)):
            raw.chunk()
    assert emu.stats().cancellations == 0  # the emulator hung up, the client did not leave


def test_stall_fault_holds_until_the_client_leaves(emu: Emulator) -> None:
    emu.inject("stall", after_tokens=1, model="tiny")
    with Raw(emu) as raw:
        raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).head()
        raw.chunk()
        raw.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            raw.chunk()
    (left,) = emu.wait_for_cancellations(1)
    assert (left.path, left.model, left.tokens_sent) == ("/api/chat", "tiny", 1)


@pytest.mark.parametrize(("kind", "extra"), [("malformed", 1), ("blank", 1)])
def test_garbled_lines_are_inserted_and_the_stream_goes_on(emu: Emulator, kind: str, extra: int) -> None:
    emu.inject(kind, after_tokens=1)
    with Raw(emu) as raw:
        _, _, body = raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).response()
    rows = body.decode().split("\n")[:-1]
    assert len(rows) == 6 + extra
    if kind == "blank":
        assert rows[1] == ""
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(rows[1])
    assert json.loads(rows[-1])["done"] is True


def test_faults_match_model_and_count(emu: Emulator, client: ollama.Client) -> None:
    emu.inject("status", status=500, message="down", model="llama3.2", times=2)
    assert client.chat(model="tiny", messages=HI).done
    for _ in range(2):
        with pytest.raises(ollama.ResponseError, match="down"):
            client.chat(model="llama3.2:latest", messages=HI)
    assert client.chat(model="llama3.2", messages=HI).done


# Client disconnects


def test_cancellation_is_recorded_within_100ms_of_the_client_leaving(emu: Emulator) -> None:
    emu.configure(tokens=50, token_delay_ms=20)
    with Raw(emu) as raw:
        raw.send("POST", "/api/chat", {"model": "tiny", "messages": HI}).head()
        raw.chunk()
        raw.chunk()
        left_at = time.monotonic()
    (left,) = emu.wait_for_cancellations(1)
    assert left.monotonic - left_at < 0.1
    assert (left.model, left.tokens_sent) == ("tiny", 2)
    assert emu.stats().cancellations == 1


def test_cancellation_is_noticed_between_tokens_even_without_delays(emu: Emulator) -> None:
    emu.configure(tokens=200_000)  # ~20 MB of NDJSON, more than the socket buffers hold
    with Raw(emu) as raw:
        raw.send("POST", "/api/generate", {"model": "tiny", "prompt": "x"}).head()
        raw.exactly(100_000)
        left_at = time.monotonic()
    (left,) = emu.wait_for_cancellations(1)
    assert left.monotonic - left_at < 0.1
    assert 0 < left.tokens_sent < 200_000


def test_cancellation_while_a_buffered_answer_is_generated(emu: Emulator) -> None:
    emu.configure(first_token_delay_ms=2000)
    with Raw(emu) as raw:
        raw.send("POST", "/v1/chat/completions", {"model": "qwen3", "messages": HI})
        time.sleep(0.05)
        left_at = time.monotonic()
    (left,) = emu.wait_for_cancellations(1)
    assert left.monotonic - left_at < 0.1
    assert (left.path, left.tokens_sent) == ("/v1/chat/completions", 0)


def test_queue_limit_answers_503(emu: Emulator) -> None:
    # Long enough that the first is still running when the third arrives, even on a busy machine.
    emu.configure(num_parallel=1, max_queue=1, first_token_delay_ms=1500)
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(f"{emu.url}/api/chat", json={"model": "tiny", "messages": HI, "stream": False}))

    workers = [threading.Thread(target=call) for _ in range(3)]
    for arrived, worker in enumerate(workers, start=1):
        worker.start()
        deadline = time.monotonic() + 1
        while emu.stats().requests < arrived and time.monotonic() < deadline:  # keep the arrival order
            time.sleep(0.005)
    for worker in workers:
        worker.join()
    assert sorted(r.status_code for r in results) == [200, 200, 503]
    busy = next(r for r in results if r.status_code == 503)
    assert busy.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}


def test_a_client_leaving_the_queue_frees_its_place(emu: Emulator) -> None:
    emu.configure(num_parallel=1, max_queue=1, first_token_delay_ms=200)
    chat = {"model": "tiny", "messages": HI, "stream": False}
    with Raw(emu) as running:
        running.send("POST", "/api/chat", chat)
        with Raw(emu) as queued:
            queued.send("POST", "/api/chat", chat)
            time.sleep(0.05)
        (left,) = emu.wait_for_cancellations(1)
        assert (left.path, left.tokens_sent) == ("/api/chat", 0)
        with Raw(emu) as next_in_line:
            assert next_in_line.send("POST", "/api/chat", chat).response()[0] == 200
        assert running.response()[0] == 200


# HTTP/1.1 details and gin's routing


def test_head_and_version(emu: Emulator) -> None:
    with Raw(emu) as raw:
        emu.configure(version="0.5.1")
        status, headers, body = raw.send("HEAD", "/api/version").response()
        assert (status, headers["content-length"], body) == (200, "19", b"")
        assert raw.send("GET", "/api/version").response()[2] == b'{"version":"0.5.1"}'


def test_unknown_routes_are_404_in_gin_text_and_still_recorded(emu: Emulator) -> None:
    with Raw(emu) as raw:
        for method, path in [("GET", "/api/nope"), ("GET", "/api/generate"), ("POST", "/api/pull")]:
            status, headers, body = raw.send(method, path).response()
            assert (status, headers["content-type"], body) == (404, "text/plain", b"404 page not found")
    assert [r.path for r in emu.requests()] == ["/api/nope", "/api/generate", "/api/pull"]


def test_keep_alive_pipelining_and_connection_close(emu: Emulator) -> None:
    with Raw(emu) as raw:
        request = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
        raw.sock.sendall(request * 3 + b"GET /api/ps HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        bodies = [raw.response()[2] for _ in range(4)]
        assert bodies == [b'{"version":"0.33.0"}'] * 3 + [b'{"models":[]}']
        assert raw.closed()
    assert [r.path for r in emu.requests()] == ["/api/version"] * 3 + ["/api/ps"]


def test_large_bodies_are_read_and_chunked_ones_refused(emu: Emulator) -> None:
    image = base64.b64encode(os.urandom(15 * 1024 * 1024)).decode()  # 20 MB of base64
    payload = json.dumps({"model": "llava", "prompt": "what is this?", "images": [image], "stream": False}).encode()
    with Raw(emu) as raw:
        raw.sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 1_000_000):
            raw.sock.sendall(payload[i : i + 1_000_000])
        assert raw.response()[0] == 200
    assert emu.requests("/api/generate")[0].body == payload
    with Raw(emu) as raw:
        raw.sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert raw.head()[0] == 501


def test_v1_errors_differ_on_the_wire_between_middleware_and_handler(emu: Emulator) -> None:
    with Raw(emu) as raw:
        _, headers, body = raw.send("POST", "/v1/chat/completions", b"{").response()
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert body == b'{"error":{"message":"unexpected EOF","type":"invalid_request_error","param":null,"code":null}}'
        _, headers, body = raw.send("POST", "/v1/completions", {"model": "nope", "prompt": "x"}).response()
        assert headers["content-type"] == "application/json"
        assert body.endswith(b'"type":"not_found_error","param":null,"code":null}}\n')


def test_cold_loads_report_load_delay(client: ollama.Client, emu: Emulator) -> None:
    emu.configure(load_delay_ms=250, first_token_delay_ms=5, token_delay_ms=1)
    cold = client.generate(model="tiny", prompt="x")
    warm = client.generate(model="tiny", prompt="x")
    assert (cold.load_duration, warm.load_duration) == (250_100_000, 100_000)
    assert (warm.prompt_eval_duration, warm.eval_duration) == (5_010_000, 5 * 1_010_000)


def test_request_errors_use_ollama_wording(emu: Emulator) -> None:
    def post(path: str, body: bytes) -> tuple[int, Any]:
        answer = httpx.post(f"{emu.url}{path}", content=body)
        return answer.status_code, answer.json()

    assert post("/api/chat", b"") == (400, {"error": "missing request body"})
    assert post("/api/chat", b"{bad json}") == (
        400,
        {"error": "invalid character 'b' looking for beginning of object key string"},
    )
    assert post("/api/generate", b'{"model":') == (400, {"error": "unexpected EOF"})
    assert post("/api/chat", b'{"model":"tiny","stream":"yes"}') == (
        400,
        {"error": "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"},
    )
    assert post("/api/generate", b"{}") == (404, {"error": "model '' not found"})
    assert post("/api/embed", b"{}") == (404, {"error": "model '' not found"})
    for path in ("/api/chat", "/api/embeddings", "/api/show"):
        assert post(path, b"{}") == (400, {"error": "model is required"})
    assert post("/api/chat", b'{"model":"tiny","think":"deep"}') == (
        400,
        {"error": 'invalid think value: "deep" (must be "high", "medium", "low", "max", true, or false)'},
    )
    assert post("/v1/chat/completions", b"")[1]["error"]["message"] == "EOF"
    assert post("/v1/chat/completions", b'{"model":"tiny","messages":[]}')[1]["error"] == {
        "message": "[] is too short - 'messages'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert post("/api/show", b'{"model":"nope"}') == (404, {"error": "model 'nope:latest' not found"})


# Recording, the control surfaces and the CLI


def test_requests_are_recorded_verbatim(emu: Emulator) -> None:
    body = b'{"model":"tiny","messages":[],"keep_alive":"5m"}'
    with Raw(emu) as raw:
        raw.send("POST", "/api/chat?trace=1&x=%20y", body, {"X-Custom-Header": "Value", "Authorization": "Bearer k"})
        raw.response()
    (seen,) = emu.requests("/api/chat")
    assert (seen.method, seen.target, seen.query, seen.body) == (
        "POST",
        "/api/chat?trace=1&x=%20y",
        "trace=1&x=%20y",
        body,
    )
    assert ("X-Custom-Header", "Value") in seen.headers
    assert seen.header("authorization") == "Bearer k"
    assert seen.json()["keep_alive"] == "5m"
    emu.configure(record=False)
    httpx.get(f"{emu.url}/api/version")
    assert len(emu.requests()) == 1
    assert emu.stats().requests == 2


def test_http_control_api_drives_an_out_of_process_emulator(emu: Emulator) -> None:
    with httpx.Client(base_url=emu.url) as http:
        assert http.post("/_emulator/config", json={"tokens": 2, "token_delay_ms": 1}).json()["tokens"] == 2
        assert http.post("/_emulator/config", json={"tokens": "two"}).status_code == 400
        assert http.post("/_emulator/config", json={"colour": "red"}).status_code == 400
        answer = http.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False})
        assert answer.json()["response"] == "Lorem ipsum"
        assert http.get("/_emulator/stats").json()["requests"] == 1  # control requests are not counted
        assert http.get("/_emulator/config").status_code == 405
        assert http.get("/_emulator/nope").status_code == 404
    assert [r.path for r in emu.requests()] == ["/api/generate"]


def test_in_process_api_reset_restores_everything(emu: Emulator) -> None:
    emu.set_models([ModelSpec("extra", capabilities=("embedding",))])
    emu.inject("drop", path="/api/chat")
    emu.configure(frame_style="legacy")
    httpx.get(f"{emu.url}/api/version")
    emu.reset()
    assert (emu.requests(), emu.state.config, len(emu.state.registry.models())) == ([], Config(), 5)
    assert httpx.post(f"{emu.url}/api/chat", json={"model": "tiny", "messages": HI, "stream": False}).status_code == 200
    with pytest.raises(ValueError, match="frame_style"):
        emu.configure(frame_style="ancient")
    with pytest.raises(ValueError, match="fault kind"):
        Fault("explode")


def test_count_prompt_tokens_rule() -> None:
    assert count_prompt_tokens("/api/generate", {"system": "be brief", "prompt": "hi there", "context": [1, 2]}) == 6
    v1_messages = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "image_url"}]}]
    assert count_prompt_tokens("/v1/chat/completions", {"messages": v1_messages}) == 4
    assert count_prompt_tokens("/api/embed", {"input": ["one two", "three"]}) == 3
    assert count_prompt_tokens("/api/embeddings", {"prompt": "one two"}) == 2
    with pytest.raises(ValueError, match="/api/tags"):
        count_prompt_tokens("/api/tags", {})


def test_cli_serves_until_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "tests.emulator",
        "--port",
        "0",
        "--tokens",
        "3",
        "--no-record",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__))
    ) as process:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        answer = httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "x", "stream": False}).json()
        assert answer["response"] == "Lorem ipsum dolor"
        changed = httpx.post(f"{url}/_emulator/config", json={"frame_style": "legacy"}).json()
        assert (changed["tokens"], changed["frame_style"], changed["record"]) == (3, "legacy", False)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0


# --- the agent dialects (/v1/responses, /v1/messages) ----------------------------------------------------


def _events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    parsed = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def test_responses_stream_and_whole_answer_are_framed_as_ollama_frames_them(emu: Emulator) -> None:
    body = {"model": "tiny", "input": "hello there", "max_output_tokens": 3}
    whole = httpx.post(f"{emu.url}/v1/responses", json=body).json()
    streamed = httpx.post(f"{emu.url}/v1/responses", json={**body, "stream": True})
    missing = httpx.post(f"{emu.url}/v1/responses", json={**body, "model": "nope"})
    assert whole["status"] == "completed"  # even when the cap cut it, as Ollama says
    assert whole["output"][0]["content"][0]["text"] == "Lorem ipsum dolor"
    assert (whole["usage"]["input_tokens"], whole["usage"]["output_tokens"]) == (3, 3)
    assert streamed.headers["content-type"] == "text/event-stream"
    events = _events(streamed.content)
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 3
    assert b"[DONE]" not in streamed.content
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "model 'nope' not found", "type": "not_found_error",
                                       "param": None, "code": None}  # fmt: skip


def test_messages_stream_carries_an_estimate_first_and_the_real_usage_last(emu: Emulator) -> None:
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "one two three four five"}]}
    whole = httpx.post(f"{emu.url}/v1/messages", json=body).json()
    events = _events(httpx.post(f"{emu.url}/v1/messages", json={**body, "stream": True}).content)
    zero = httpx.post(f"{emu.url}/v1/messages", json={**body, "max_tokens": 0})
    missing = httpx.post(f"{emu.url}/v1/messages", json={**body, "model": "nope"})
    assert whole["stop_reason"] == "max_tokens"
    assert whole["content"] == [{"type": "text", "text": "Lorem ipsum dolor sit"}]
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", *["content_block_delta"] * 4, "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    estimate = events[0][1]["message"]["usage"]["input_tokens"]
    real = events[-2][1]["usage"]
    assert real == whole["usage"]
    assert estimate != real["input_tokens"]
    assert zero.status_code == 400
    assert zero.json()["error"] == {"type": "invalid_request_error",
                                    "message": "max_tokens is required and must be positive"}  # fmt: skip
    assert missing.status_code == 404
    assert missing.json()["type"] == "error"
    assert missing.json()["error"]["type"] == "not_found_error"


AGENT_STREAMS = [
    ("/v1/responses", {"model": "tiny", "input": "hi", "stream": True}),
    (
        "/v1/messages",
        {"model": "tiny", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ),
]


@pytest.mark.parametrize(("path", "body"), AGENT_STREAMS)
def test_agent_streams_take_faults_and_can_ignore_the_cap(emu: Emulator, path: str, body: dict[str, Any]) -> None:
    emu.inject("error", after_tokens=2, message="boom")
    failed = _events(httpx.post(emu.url + path, json=body).content)
    emu.configure(tokens=12, ignore_output_cap=True)
    capped = _events(httpx.post(emu.url + path, json={**body, "max_tokens": 2, "max_output_tokens": 2}).content)
    deltas = [n for n, _ in failed if n in ("response.output_text.delta", "content_block_delta")]
    assert len(deltas) == 2
    assert failed[-1][0] == "error"
    assert "boom" in json.dumps(failed[-1][1])
    assert len([n for n, _ in capped if n in ("response.output_text.delta", "content_block_delta")]) == 12
