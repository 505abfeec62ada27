"""The agent dialects (`/v1/responses`, `/v1/messages`) through the gateway to a real Ollama: the
same request straight to Ollama and through the gateway gets the same events and the same usage
(fixed seed, temperature 0; clocks and ids aside), the gateway settles on the real counts, and
the official `anthropic` and `openai` clients work against it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.real.conftest import KeyMaker
from tests.real.exchange import SAMPLING, agent_usage, events, without
from tests.support import Admin, GatewayProcess, auth

QUESTION = "Why is the sky blue?"
RESPONSES = {"model": "tiny", "input": QUESTION, "max_output_tokens": 6, **SAMPLING}
MESSAGES = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, **SAMPLING}
AGENT_ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/responses", RESPONSES),
    ("/v1/responses", {**RESPONSES, "stream": True}),
    ("/v1/messages", MESSAGES),
    ("/v1/messages", {**MESSAGES, "stream": True}),
]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


async def audit_counts(admin: Admin, request_id: str) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) the gateway settled the request on (the audit row is
    written after the answer ends, so it is waited for)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        row = await admin.pool.fetchrow(
            "SELECT prompt_tokens, completion_tokens FROM request_log WHERE request_id = $1", request_id
        )
        if row is not None:
            return int(row["prompt_tokens"]), int(row["completion_tokens"])
        assert asyncio.get_running_loop().time() < deadline, f"no audit row for {request_id}"
        await asyncio.sleep(0.1)


def answer(response: httpx.Response) -> list[Any]:
    """An answer without its volatile fields: the whole body, or the stream's (event, data) pairs."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [(name, without(data)) for name, data in events(response)]
    return [without(response.json())]


@pytest.mark.parametrize(
    ("path", "body"), AGENT_ROUTES, ids=[f"{p}:{'stream' if b.get('stream') else 'whole'}" for p, b in AGENT_ROUTES]
)
@pytest.mark.parametrize("kind", ["plain", "budgeted"])
async def test_agent_dialects_answer_exactly_like_ollama(
    path: str,
    body: dict[str, Any],
    kind: str,
    ollama_url: str,
    real_gateway: GatewayProcess,
    http: httpx.Client,
    admin: Admin,
    budgeted_key: KeyMaker,
) -> None:
    key = await budgeted_key(tpm=1_000_000, daily_tokens=1_000_000) if kind == "budgeted" else await admin.key()
    request_id = f"real-agents-{uuid.uuid4().hex}"
    headers = {**auth(key), "x-request-id": request_id}

    def both() -> tuple[httpx.Response, httpx.Response]:
        return http.post(ollama_url + path, json=body), http.post(real_gateway.url + path, json=body, headers=headers)

    direct, through = await asyncio.to_thread(both)
    assert direct.status_code == 200, direct.text
    assert (through.status_code, through.headers["content-type"].split(";")[0]) == (
        200,
        direct.headers["content-type"].split(";")[0],
    )
    assert answer(through) == answer(direct)
    found = [data for _, data in events(direct)] if body.get("stream") else [direct.json()]
    usage = agent_usage(found)
    assert usage is not None
    assert usage[1] == 6  # tiny never stops by itself: the cap binds
    if path == "/v1/messages" and body.get("stream"):
        # message_start carries Ollama's estimate of the input, not the real count.
        assert found[0]["message"]["usage"]["input_tokens"] != usage[0]
    assert await audit_counts(admin, request_id) == usage


async def test_anthropic_client_with_either_credential(
    real_gateway: GatewayProcess, ollama_url: str, admin: Admin
) -> None:
    """`api_key=` travels as x-api-key, `auth_token=` as a Bearer token; whole and streamed, the
    answer and its usage equal the real server's (the stream's final usage included: the SDK
    folds the final message_delta's counts into it)."""
    key = await admin.key()
    clients = [
        anthropic.Anthropic(base_url=real_gateway.url, api_key=key, max_retries=0),
        anthropic.Anthropic(base_url=real_gateway.url, auth_token=key, max_retries=0),
    ]
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": QUESTION}]
    # This SDK release has no `temperature` parameter: the sampling travels in the body (extra_body).

    def calls() -> None:
        direct = httpx.post(ollama_url + "/v1/messages", json=MESSAGES, timeout=60).json()
        real = (direct["usage"]["input_tokens"], direct["usage"]["output_tokens"])
        for client in clients:
            whole = client.messages.create(model="tiny", messages=messages, max_tokens=6, extra_body=SAMPLING)
            assert whole.stop_reason == "max_tokens"
            assert "".join(b.text for b in whole.content if b.type == "text") == direct["content"][0]["text"]
            assert (whole.usage.input_tokens, whole.usage.output_tokens) == real
            with client.messages.stream(
                model="tiny",
                messages=messages,
                max_tokens=6,
                extra_body=SAMPLING,
            ) as stream:
                final = stream.get_final_message()
            assert [b.text for b in final.content if b.type == "text"] == [
                b.text for b in whole.content if b.type == "text"
            ]
            assert (final.usage.input_tokens, final.usage.output_tokens) == real

    try:
        await asyncio.to_thread(calls)
    finally:
        for client in clients:
            client.close()


async def test_openai_client_on_the_responses_api(real_gateway: GatewayProcess, ollama_url: str, admin: Admin) -> None:
    key = await admin.key()
    client = openai.OpenAI(base_url=real_gateway.url + "/v1", api_key=key, max_retries=0)

    def calls() -> None:
        direct = httpx.post(ollama_url + "/v1/responses", json=RESPONSES, timeout=60).json()
        whole = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=6, temperature=0)
        assert whole.status == "completed"
        assert whole.output_text == direct["output"][0]["content"][0]["text"]
        assert whole.usage is not None
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
            direct["usage"]["input_tokens"],
            direct["usage"]["output_tokens"],
        )
        streamed = list(
            client.responses.create(model="tiny", input=QUESTION, max_output_tokens=6, temperature=0, stream=True)
        )
        text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
        assert text == whole.output_text
        last = streamed[-1]
        assert last.type == "response.completed"
        assert last.response.usage == whole.usage

    try:
        await asyncio.to_thread(calls)
    finally:
        client.close()
