"""The official `ollama` and `openai` Python clients, pointed at the gateway (Granian, loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import ollama
import openai
import pytest

from tests.emulator import Emulator
from tests.support import Admin, GatewayProcess

Native = Callable[[str], ollama.Client]
Compatible = Callable[[str], openai.OpenAI]


@pytest.fixture
async def key(admin: Admin) -> str:
    return await admin.key(models=("tiny", "nomic-embed-text", "qwen3"))


@pytest.fixture
def clients() -> Iterator[list[ollama.Client | openai.OpenAI]]:
    """Every client a test makes, closed at its end (their connection pools hold sockets)."""
    made: list[ollama.Client | openai.OpenAI] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def native(gateway: GatewayProcess, clients: list[ollama.Client | openai.OpenAI]) -> Callable[[str], ollama.Client]:
    def make(key: str) -> ollama.Client:
        client = ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {key}"})
        clients.append(client)
        return client

    return make


@pytest.fixture
def compatible(gateway: GatewayProcess, clients: list[ollama.Client | openai.OpenAI]) -> Callable[[str], openai.OpenAI]:
    def make(key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        clients.append(client)
        return client

    return make


async def test_ollama_client_chat_generate_embed(native: Native, compatible: Compatible, key: str) -> None:
    client = native(key)

    def calls() -> None:
        answer = client.chat(model="tiny", messages=[{"role": "user", "content": "hello there"}])
        assert (answer.message.content or "").startswith("Lorem ipsum")
        assert answer.done_reason == "stop"
        assert answer.eval_count == 10
        parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(p.message.content or "" for p in parts).startswith("Lorem ipsum")
        assert parts[-1].done is True
        assert parts[-1].prompt_eval_count == 2
        generated = client.generate(model="tiny", prompt="hi", options={"num_predict": 3})
        assert generated.response == "Lorem ipsum dolor"
        assert generated.done_reason == "length"
        streamed = list(client.generate(model="tiny", prompt="hi", stream=True))
        assert len(streamed) == 11
        embedded = client.embed(model="nomic-embed-text", input=["a", "b"])
        assert len(embedded.embeddings) == 2
        assert client.embeddings(model="nomic-embed-text", prompt="a").embedding

    await asyncio.to_thread(calls)


async def test_ollama_client_list_show_ps(native: Native, compatible: Compatible, key: str) -> None:
    client = native(key)

    def calls() -> None:
        client.generate(model="tiny", prompt="load it")
        listed = sorted(m.model or "" for m in client.list().models)
        assert listed == ["nomic-embed-text:latest", "qwen3:latest", "tiny:latest"]  # the key's allow-list
        shown = client.show("tiny")
        assert shown.details is not None
        assert shown.details.family == "llama"
        assert "tiny:latest" in [m.model for m in client.ps().models]

    await asyncio.to_thread(calls)


async def test_ollama_client_sees_the_right_status_codes(native: Native, emulator: Emulator, key: str) -> None:
    client = native(key)
    stranger = native("nz_00000000" + "A" * 43)

    def calls() -> None:
        with pytest.raises(ollama.ResponseError) as not_found:
            client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
        assert not_found.value.status_code == 403  # not on this key's allow-list
        with pytest.raises(ollama.ResponseError) as unauthorized:
            stranger.list()
        assert unauthorized.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as blocked:
            client.pull("tiny")
        assert blocked.value.status_code == 403
        with pytest.raises(ollama.ResponseError) as blocked_delete:
            client.delete("tiny")
        assert blocked_delete.value.status_code == 403
        emulator.inject("error", after_tokens=2, message="the runner crashed")
        with pytest.raises(ollama.ResponseError) as mid_stream:
            list(client.chat(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True))
        assert mid_stream.value.status_code == -1  # an error record inside the stream
        assert mid_stream.value.error == "the runner crashed"

    await asyncio.to_thread(calls)
    assert [r.path for r in emulator.requests() if r.path in ("/api/pull", "/api/delete")] == []


async def test_openai_client_chat_completions_embeddings_models(
    native: Native, compatible: Compatible, key: str
) -> None:
    client = compatible(key)

    def calls() -> None:
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}])
        assert chat.choices[0].message.content is not None
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 10
        completion = client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 4
        embedding = client.embeddings.create(model="nomic-embed-text", input="hi")
        assert len(embedding.data[0].embedding) > 0
        assert sorted(m.id for m in client.models.list()) == ["nomic-embed-text:latest", "qwen3:latest", "tiny:latest"]
        assert client.models.retrieve("tiny").id == "tiny"

    await asyncio.to_thread(calls)


async def test_openai_client_streams_with_and_without_usage(native: Native, compatible: Compatible, key: str) -> None:
    client = compatible(key)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

    def calls() -> None:
        plain = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
        assert all(chunk.usage is None for chunk in plain)
        assert plain[-1].choices[0].finish_reason == "stop"
        with_usage = list(
            client.chat.completions.create(
                model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        assert with_usage[-1].choices == []
        assert with_usage[-1].usage is not None
        assert with_usage[-1].usage.completion_tokens == 10
        text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
        assert text.startswith("Lorem ipsum")

    await asyncio.to_thread(calls)


async def test_openai_client_raises_the_right_errors(
    compatible: Compatible, emulator: Emulator, admin: Admin, key: str
) -> None:
    restricted, unrestricted = compatible(key), compatible(await admin.key())
    stranger = compatible("nz_00000000" + "A" * 43)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

    def calls() -> None:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.PermissionDeniedError):
            restricted.chat.completions.create(model="llava", messages=messages)
        with pytest.raises(openai.NotFoundError):
            unrestricted.chat.completions.create(model="no-such-model", messages=messages)
        emulator.inject("drop", after_tokens=2)
        with pytest.raises(openai.APIError):  # the gateway's error event, where Ollama would just stop
            list(unrestricted.chat.completions.create(model="tiny", messages=messages, stream=True))

    await asyncio.to_thread(calls)
