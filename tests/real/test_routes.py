"""Every governed route through the gateway to a real Ollama, with the official clients and raw
HTTP; and the differential statement: the same request straight to Ollama and through the
gateway gets the same answer and the same usage (fixed seed, temperature 0; clocks and ids aside).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.real.conftest import KeyMaker
from tests.real.exchange import SAMPLING, comparable, native_usage, openai_usage
from tests.support import Admin, GatewayProcess, auth

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
NATIVE_OPTIONS = {**SAMPLING, "num_predict": 8}
V1_SAMPLING = {**SAMPLING, "max_tokens": 8}

# (method, path, body): every route the gateway forwards, streaming and not.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/chat", {"model": "tiny", "messages": CHAT, "stream": False, "options": NATIVE_OPTIONS}),
    ("POST", "/api/chat", {"model": "tiny", "messages": CHAT, "options": NATIVE_OPTIONS}),
    ("POST", "/api/chat", {"model": "tiny-eos", "messages": CHAT, "stream": False, "options": SAMPLING}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "Hello", "stream": False, "options": NATIVE_OPTIONS}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "Hello", "options": NATIVE_OPTIONS}),
    ("POST", "/api/generate", {"model": "tiny-eos", "prompt": "Hello", "options": SAMPLING}),
    ("POST", "/api/embed", {"model": "tiny-embed", "input": ["first text", "second"]}),
    ("POST", "/api/embeddings", {"model": "tiny-embed", "prompt": "first text"}),
    ("POST", "/api/show", {"model": "tiny"}),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, **V1_SAMPLING}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stream": True, **V1_SAMPLING}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}, **V1_SAMPLING},
    ),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hello", **V1_SAMPLING}),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hello", "stream": True, **V1_SAMPLING}),
    (
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": "Hello", "stream": True, "stream_options": {"include_usage": True}, **V1_SAMPLING},
    ),
    ("POST", "/v1/embeddings", {"model": "tiny-embed", "input": ["first text", "second"]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
]


def route_id(route: tuple[str, str, dict[str, Any] | None]) -> str:
    _, path, body = route
    body = body or {}
    stream = body.get("stream", path.startswith("/api/") and path in ("/api/chat", "/api/generate"))
    usage = "+usage" if body.get("stream_options") else ""
    return f"{path}:{body.get('model', '')}:{'stream' if stream else 'whole'}{usage}"


@pytest.fixture
async def key(admin: Admin) -> str:
    return await admin.key()


@pytest.fixture
async def limited_key(budgeted_key: KeyMaker) -> str:
    """Limits that make the gateway reserve and settle, but never bind on these small answers."""
    return await budgeted_key(tpm=1_000_000, daily_tokens=1_000_000)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def media_type(response: httpx.Response) -> str:
    kind: str = response.headers.get("content-type", "")
    return kind.split(";")[0]


def warm(http: httpx.Client, url: str) -> None:
    """Load every model once, so /api/ps lists the same models on both sides."""
    for model in ("tiny", "tiny-eos"):
        http.post(url + "/api/generate", json={"model": model, "prompt": "x", "options": {"num_predict": 1}})
    http.post(url + "/api/embed", json={"model": "tiny-embed", "input": "x"})


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize("kind", ["plain", "budgeted"])
async def test_gateway_answers_exactly_like_ollama(
    route: tuple[str, str, dict[str, Any] | None],
    kind: str,
    ollama_url: str,
    real_gateway: GatewayProcess,
    http: httpx.Client,
    key: str,
    limited_key: str,
) -> None:
    method, path, body = route
    headers = auth(limited_key if kind == "budgeted" else key)

    def both() -> tuple[httpx.Response, httpx.Response]:
        if path == "/api/ps":
            warm(http, ollama_url)
        direct = http.request(method, ollama_url + path, json=body)
        through = http.request(method, real_gateway.url + path, json=body, headers=headers)
        return direct, through

    direct, through = await asyncio.to_thread(both)
    assert direct.status_code == 200, direct.text
    assert comparable(path, through) == comparable(path, direct)
    # Merged listings are the gateway's own JSON (without Ollama's "; charset=utf-8", the same media type).
    assert media_type(through) == media_type(direct)
    _, found = comparable(path, direct)
    if path in ("/api/chat", "/api/generate"):
        assert native_usage(found) is not None
    # Usage is part of what was compared: make sure there was some.
    options = body or {}
    if path in ("/v1/chat/completions", "/v1/completions") and (
        not options.get("stream") or options.get("stream_options")
    ):
        assert openai_usage(found) is not None


async def test_ollama_client_on_every_native_route(real_gateway: GatewayProcess, ollama_url: str, key: str) -> None:
    through = ollama.Client(host=real_gateway.url, headers=auth(key))
    direct = ollama.Client(host=ollama_url)

    def calls() -> None:
        for client in (through, direct):
            chat = client.chat(model="tiny", messages=CHAT, options=NATIVE_OPTIONS)
            assert chat.done_reason == "length"
            assert chat.eval_count == 8
            parts = list(client.chat(model="tiny", messages=CHAT, options=NATIVE_OPTIONS, stream=True))
            assert "".join(p.message.content or "" for p in parts) == chat.message.content
            assert parts[-1].eval_count == 8
            generated = client.generate(model="tiny-eos", prompt="Hello", options=SAMPLING)
            assert generated.done_reason == "stop"
            streamed = list(client.generate(model="tiny-eos", prompt="Hello", options=SAMPLING, stream=True))
            assert "".join(p.response or "" for p in streamed) == generated.response
            embedded = client.embed(model="tiny-embed", input=["a", "b"])
            assert [len(e) for e in embedded.embeddings] == [64, 64]
            assert len(client.embeddings(model="tiny-embed", prompt="a").embedding) == 64
            names = {m.model or "" for m in client.list().models}
            assert names >= {"tiny:latest", "tiny-eos:latest", "tiny-embed:latest"}
            assert "tiny:latest" in {m.model or "" for m in client.ps().models}
            shown = client.show("tiny")
            assert shown.details is not None
            assert shown.details.family == "llama"
        answers = [c.chat(model="tiny", messages=CHAT, options=NATIVE_OPTIONS) for c in (through, direct)]
        assert answers[0].message == answers[1].message
        assert (answers[0].prompt_eval_count, answers[0].eval_count) == (answers[1].prompt_eval_count, 8)

    clients: list[ollama.Client | openai.OpenAI] = [through, direct]  # close() is typed on the union
    try:
        await asyncio.to_thread(calls)
    finally:
        for made in clients:
            made.close()


async def test_openai_client_on_every_v1_route(real_gateway: GatewayProcess, key: str) -> None:
    client = openai.OpenAI(base_url=real_gateway.url + "/v1", api_key=key, max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Why?"}]

    def calls() -> None:
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=42, temperature=0)
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 6
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, seed=42, temperature=0, stream=True
            )
        )
        assert all(c.usage is None for c in chunks)  # the client did not ask for usage
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        with_usage = list(
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, seed=42, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert with_usage[-1].choices == []
        assert with_usage[-1].usage is not None
        assert with_usage[-1].usage.completion_tokens == 6
        completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, seed=42, temperature=0)
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 5
        streamed = list(
            client.completions.create(model="tiny", prompt="Hello", max_tokens=5, seed=42, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
        embedding = client.embeddings.create(model="tiny-embed", input=["a", "b"])
        assert [len(d.embedding) for d in embedding.data] == [64, 64]
        assert {m.id for m in client.models.list()} >= {"tiny:latest", "tiny-eos:latest", "tiny-embed:latest"}
        assert client.models.retrieve("tiny").id == "tiny"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=messages)

    try:
        await asyncio.to_thread(calls)
    finally:
        client.close()
