"""The limits properties against Ollama's real semantics: budgets whatever the output cap field
says (Ollama reads `num_predict` <= 0 and `max_tokens: 0` as "no limit": `runner/ollamarunner/
runner.go` applies the limit only when `numPredict > 0`), the runner stopping when a client
leaves, failover between two real servers, and the listings through the gateway.

`tiny` never ends a reply by itself, so an uncapped request really is endless here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from neuronetz import dialects, llm_tokens
from neuronetz.errors import ANTHROPIC, RESPONSES
from tests.real.conftest import KeyMaker, gateway_settings
from tests.real.exchange import SAMPLING, comparable
from tests.real.ollama import OllamaServer, register_models
from tests.support import Admin, GatewayProcess, auth, wait_until

BUDGET = 40
# A streamed answer the gateway cuts may run this many tokens past its cap (proxy.CAP_SLACK).
CAP_SLACK = 3
# Long enough for a capped answer on a busy machine, short enough that an endless one fails fast.
ANSWER_DEADLINE = 30.0
CAPS: list[tuple[str, int | None]] = [("0", 0), ("-1", -1), ("-2", -2), ("absent", None), ("huge", 10**6)]
SURFACES = ["/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions"]
# The agent dialects' cap fields: `max_output_tokens` (0 or less: no limit, as in Ollama's
# `openai/responses.go`) and the required, positive `max_tokens` of /v1/messages (0 is Ollama's
# 400, tested apart below).
AGENT_CAPS: dict[str, list[tuple[str, int | None]]] = {
    "/v1/responses": [("absent", None), ("0", 0), ("-1", -1), ("huge", 10**6)],
    "/v1/messages": [("20", 20), ("huge", 10**6)],
}
DIALECTS = {"/v1/responses": RESPONSES, "/v1/messages": ANTHROPIC}
# Default sampling: with seed and temperature 0 the tiny model falls into repeating one token,
# and a one-token request is then answered beside that stream within 0.1 s (observed on
# v0.24.0), so a runner that went on generating would go unnoticed.
ENDLESS = {"model": "tiny", "prompt": "Go on forever.", "options": {"num_predict": -1}}
# A one-token request takes 7-45 ms on a busy machine once the model is loaded; an abandoned
# endless generation would hold the model until the client's timeout.
RUNNER_STOPPED = 2.0


def request_body(surface: str, cap: int | None, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "stream": stream}
    if surface in DIALECTS:
        body.update(SAMPLING)
        if surface == "/v1/responses":
            body["input"] = "Tell me a long story."
        else:
            body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
        if cap is not None:
            body["max_output_tokens" if surface == "/v1/responses" else "max_tokens"] = cap
        return body
    if surface.endswith(("chat", "chat/completions")):
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    else:
        body["prompt"] = "Tell me a long story."
    if surface.startswith("/v1/"):
        body.update(SAMPLING)
        if cap is not None:
            body["max_tokens"] = cap
        if stream:
            body["stream_options"] = {"include_usage": True}
    else:
        body["options"] = {**SAMPLING, **({"num_predict": cap} if cap is not None else {})}
    return body


def served(surface: str, lines: list[Any]) -> tuple[int | None, int]:
    """(prompt tokens as Ollama counted them, if reported; output tokens the client received):
    the reported count, or the content pieces when the answer was cut before its counts."""
    pieces = reported = 0
    prompt = None
    for record in lines:
        if not isinstance(record, dict):
            continue
        if surface in DIALECTS:
            kind = record.get("type")
            if kind in ("response.output_text.delta", "content_block_delta"):
                pieces += 1
            usage = (record.get("response") or {}).get("usage") if "response" in record else record.get("usage")
            whole = record.get("object") == "response" or kind == "message"
            if (whole or kind in ("response.completed", "message_delta")) and usage:
                prompt, reported = int(usage["input_tokens"]), int(usage["output_tokens"])
        elif surface.startswith("/api/"):
            if (record.get("message") or {}).get("content") or record.get("response"):
                pieces += 1
            if record.get("done"):
                prompt, reported = int(record.get("prompt_eval_count", 0)), int(record.get("eval_count", 0))
        else:
            for choice in record.get("choices") or []:
                if choice.get("text") or (choice.get("delta") or {}).get("content") or choice.get("message"):
                    pieces += 1
            usage = record.get("usage")
            if usage and usage.get("total_tokens"):
                prompt, reported = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return prompt, reported if prompt is not None else pieces


async def answer(client: httpx.AsyncClient, url: str, surface: str, body: dict[str, Any], key: str) -> list[Any]:
    """The records of one answer, read as they come; stops reading (and fails) once the
    answer is longer than any answer within the budget could be. A 503 is asked again for a
    while: a new tenant's budget counters may be being built (fail closed, nothing admitted)."""
    found: list[Any] = []
    deadline = time.monotonic() + 10
    while True:
        async with client.stream("POST", url + surface, json=body, headers=auth(key)) as response:
            if response.status_code == 503 and time.monotonic() < deadline:
                await response.aread()
                await asyncio.sleep(0.2)
                continue
            if response.status_code != 200:
                await response.aread()
                return [response.status_code, orjson.loads(response.content)]
            if not body["stream"]:
                return [orjson.loads(await response.aread())]
            async for line in response.aiter_lines():
                if line.startswith("event:"):  # the agent dialects name each event; the data says it too
                    continue
                payload = line.removeprefix("data:").strip()
                if payload and payload != "[DONE]":
                    found.append(orjson.loads(payload))
                assert len(found) <= 4 * BUDGET, "an answer far longer than the budget"
            return found


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(ANSWER_DEADLINE, connect=5)) as made:
        yield made


def cases() -> Iterator[Any]:
    for surface in SURFACES:
        for label, cap in CAPS:
            for stream in (False, True):
                name = f"{surface}-cap:{label}-{'stream' if stream else 'whole'}"
                yield pytest.param(surface, cap, stream, id=name)


def agent_cases() -> Iterator[Any]:
    for surface, caps in AGENT_CAPS.items():
        for label, cap in caps:
            for stream in (False, True):
                yield pytest.param(surface, cap, stream, id=f"{surface}-cap:{label}-{'stream' if stream else 'whole'}")


@pytest.mark.parametrize(("surface", "cap", "stream"), [*cases(), *agent_cases()])
async def test_a_small_budget_holds_whatever_the_cap_field_says(
    surface: str,
    cap: int | None,
    stream: bool,
    real_gateway: GatewayProcess,
    budgeted_key: KeyMaker,
    client: httpx.AsyncClient,
) -> None:
    """Requests until the budget refuses: everything served stays within the budget plus the
    documented slack (each request's prompt-estimate error, and the few tokens a stream may run
    past its cap before the gateway cuts it)."""
    key = await budgeted_key(daily_tokens=BUDGET)
    body = request_body(surface, cap, stream)
    dialect = DIALECTS.get(surface)
    estimate = dialects.estimate_prompt(body, dialect) if dialect else llm_tokens.estimate_prompt(body)
    total = slack = answered = 0
    for _ in range(4):
        try:
            found = await answer(client, real_gateway.url, surface, body, key)
        except httpx.TimeoutException:
            pytest.fail(f"no end within {ANSWER_DEADLINE} s: the answer was not capped")
        if found and found[0] == 429:
            break
        assert found, "an empty answer"
        assert isinstance(found[0], dict), found
        answered += 1
        prompt, output = served(surface, found)
        # A whole answer is complete, with its counts (a cut one would hide how much was served).
        assert stream or prompt is not None, f"a whole answer without its counts: {found}"
        real_prompt = prompt if prompt is not None else estimate
        total += real_prompt + output
        slack += max(0, real_prompt - estimate) + CAP_SLACK
    assert answered >= 1  # the first request fits the budget
    assert total <= BUDGET + slack, f"served {total} tokens of a {BUDGET}-token budget (slack {slack})"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_zero_max_tokens_on_messages_is_ollamas_400_in_anthropics_dialect(
    stream: bool, real_gateway: GatewayProcess, ollama_url: str, budgeted_key: KeyMaker, client: httpx.AsyncClient
) -> None:
    """Ollama refuses `max_tokens: 0` on /v1/messages (`anthropic/anthropic.go`: "max_tokens is
    required and must be positive"); with a budget in force the gateway must not replace it
    with its own cap, and passes the refusal on as Anthropic's error object."""
    key = await budgeted_key(daily_tokens=BUDGET)
    body = {**request_body("/v1/messages", 0, stream)}
    direct = await client.post(ollama_url + "/v1/messages", json=body)
    through = await client.post(real_gateway.url + "/v1/messages", json=body, headers={"x-api-key": key})
    assert direct.status_code == 400, direct.text
    assert through.status_code == 400, through.text
    error = through.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"] == direct.json()["error"]["message"]


# Each output cap field the gateway shortens to what a key's limit allows, and the route it rides:
# `max_completion_tokens` is OpenAI's newer name, which Ollama ignores, so there the `max_tokens`
# the gateway writes in is all that holds the output.
CAP_FIELDS = [
    ("/api/chat", "options.num_predict"),
    ("/api/generate", "options.num_predict"),
    ("/v1/chat/completions", "max_tokens"),
    ("/v1/chat/completions", "max_completion_tokens"),
    ("/v1/completions", "max_tokens"),
    ("/v1/responses", "max_output_tokens"),
    ("/v1/messages", "max_tokens"),
]
TPM = 60
# Far more than a 60-token TPM leaves; `tiny` would fill it.
CLIENT_CAP = 500


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("surface", "field"), CAP_FIELDS, ids=[f"{s}-{f}" for s, f in CAP_FIELDS])
async def test_a_cap_above_what_the_tpm_allows_is_shortened_and_the_real_ollama_keeps_to_it(
    surface: str, field: str, stream: bool, real_gateway: GatewayProcess, admin: Admin, client: httpx.AsyncClient
) -> None:
    """One request whose cap the key's TPM cannot cover: the gateway sends Ollama the cap that
    fits (at most the TPM less the prompt estimate), and Ollama generates no more than that —
    no slack, as Ollama honours the cap it is sent exactly."""
    key = await admin.key(tpm=TPM)
    body = request_body(surface, None, stream)
    if field == "options.num_predict":
        body["options"]["num_predict"] = CLIENT_CAP
    else:
        body[field] = CLIENT_CAP
    dialect = DIALECTS.get(surface)
    estimate = dialects.estimate_prompt(body, dialect) if dialect else llm_tokens.estimate_prompt(body)
    try:
        found = await answer(client, real_gateway.url, surface, body, key)
    except httpx.TimeoutException:
        pytest.fail(f"no end within {ANSWER_DEADLINE} s: the answer was not capped")
    assert found, "an empty answer"
    assert isinstance(found[0], dict), found
    prompt, output = served(surface, found)
    assert prompt is not None, f"an answer without its counts: {found[-1]}"
    assert 0 < output <= TPM - estimate, f"{output} tokens served under a {TPM}-token TPM (prompt estimate {estimate})"


RATE_LIMITED: dict[str, Callable[[Any], bool]] = {
    "/api/generate": lambda error: isinstance(error["error"], str),
    "/v1/chat/completions": lambda error: error["error"]["code"] == "rate_limit_exceeded",
    "/v1/responses": lambda error: error["error"]["code"] == "rate_limit_exceeded",
    "/v1/messages": lambda error: error["type"] == "error" and error["error"]["type"] == "rate_limit_error",
}


async def test_the_rpm_refuses_the_next_request_in_the_callers_dialect(
    real_gateway: GatewayProcess, admin: Admin, client: httpx.AsyncClient
) -> None:
    for surface, refused_in_dialect in RATE_LIMITED.items():
        key = await admin.key(rpm=1)
        body = request_body(surface, 5, False)
        first = await answer(client, real_gateway.url, surface, body, key)
        assert isinstance(first[0], dict), (surface, first)
        second = await client.post(real_gateway.url + surface, json=body, headers=auth(key))
        assert second.status_code == 429, (surface, second.text)
        assert int(second.headers["retry-after"]) > 0, surface
        assert refused_in_dialect(second.json()), (surface, second.text)


async def test_max_concurrent_holds_while_a_real_stream_is_open_and_frees_when_it_ends(
    real_gateway: GatewayProcess, admin: Admin, client: httpx.AsyncClient
) -> None:
    key = await admin.key(max_concurrent=1)
    short = request_body("/api/generate", 5, True)

    def one_more() -> int:
        return httpx.post(real_gateway.url + "/api/generate", json=short, headers=auth(key), timeout=30).status_code

    async with client.stream("POST", real_gateway.url + "/api/generate", json=ENDLESS, headers=auth(key)) as held:
        assert held.status_code == 200
        async for _ in held.aiter_lines():
            break
        assert one_more() == 429
    await wait_until(lambda: one_more() == 200, within=5, what="the slot of the stream its client left")
    # A stream read to its end frees its slot by the time the client has its last line.
    async with client.stream("POST", real_gateway.url + "/api/generate", json=short, headers=auth(key)) as ending:
        async for _ in ending.aiter_lines():
            pass
    assert one_more() == 200


async def one_token_wait(client: httpx.AsyncClient, ollama_url: str) -> float:
    """Seconds a one-token request straight to Ollama takes, sent the moment this is called."""
    one = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
    sent = time.monotonic()
    answered = await client.post(ollama_url + "/api/generate", json=one)
    assert answered.status_code == 200, answered.text
    return time.monotonic() - sent


async def test_a_streaming_client_that_leaves_stops_the_runner(
    real_gateway: GatewayProcess, ollama_url: str, admin: Admin
) -> None:
    """The client reads a few chunks of an endless answer and leaves; a one-token request
    straight to Ollama right after must not wait behind the abandoned generation (requests to
    one model run one at a time), so its wait bounds how long the runner went on."""
    key = await admin.key()
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", real_gateway.url + "/api/generate", json=ENDLESS, headers=auth(key)) as r:
            chunks = 0
            async for _ in r.aiter_lines():
                chunks += 1
                if chunks == 20:
                    break
        waited = await one_token_wait(client, ollama_url)
    print(f"one-token request right after a streaming client left: {waited * 1000:.0f} ms")
    assert waited < RUNNER_STOPPED


async def test_a_waiting_client_that_leaves_stops_the_runner(
    real_gateway: GatewayProcess, ollama_url: str, admin: Admin
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient(timeout=30) as client:
        body = {**ENDLESS, "stream": False}
        with pytest.raises(httpx.ReadTimeout):
            await client.post(real_gateway.url + "/api/generate", json=body, headers=auth(key), timeout=1.0)
        waited = await one_token_wait(client, ollama_url)
    print(f"one-token request right after a non-streaming client left: {waited * 1000:.0f} ms")
    assert waited < RUNNER_STOPPED


@pytest.fixture
def two_servers(ollama_binary: Path, models_dir: Path) -> Iterator[tuple[OllamaServer, OllamaServer]]:
    with OllamaServer(ollama_binary) as first, OllamaServer(ollama_binary) as second:
        for server in (first, second):
            register_models(server.url, models_dir)
        yield first, second


async def test_requests_fail_over_when_a_real_backend_dies(
    two_servers: tuple[OllamaServer, OllamaServer],
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    admin: Admin,
) -> None:
    first, second = two_servers
    key = await admin.key()
    body = {"model": "tiny", "prompt": "Hello", "stream": False, "options": {**SAMPLING, "num_predict": 5}}
    settings = gateway_settings(database_url, redis_url, redis_prefix, f"{first.url},{second.url}")
    with GatewayProcess(settings) as gateway:
        async with httpx.AsyncClient(timeout=30) as client:
            before = [await client.post(gateway.url + "/api/generate", json=body, headers=auth(key)) for _ in range(4)]
            assert [r.status_code for r in before] == [200] * 4
            first.kill()
            after = [await client.post(gateway.url + "/api/generate", json=body, headers=auth(key)) for _ in range(6)]
            assert [r.status_code for r in after] == [200] * 6, [r.text for r in after]
            assert {r.json()["response"] for r in before + after} == {before[0].json()["response"]}
            tags = await client.get(gateway.url + "/api/tags", headers=auth(key))
            assert {m["name"] for m in tags.json()["models"]} == {"tiny:latest", "tiny-eos:latest", "tiny-embed:latest"}
            ps = await client.get(gateway.url + "/api/ps", headers=auth(key))
            assert [m["name"] for m in ps.json()["models"]] == ["tiny:latest"]


async def test_listings_through_the_gateway_follow_the_key_and_the_server(
    real_gateway: GatewayProcess, ollama_url: str, admin: Admin
) -> None:
    only_tiny = await admin.key(models=("tiny",))
    everything = await admin.key()
    async with httpx.AsyncClient(timeout=30) as client:
        generated = await client.post(
            real_gateway.url + "/api/generate",
            json={"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}},
            headers=auth(only_tiny),
        )
        assert generated.status_code == 200
        direct_ps = await client.get(ollama_url + "/api/ps")
        through_ps = await client.get(real_gateway.url + "/api/ps", headers=auth(everything))
        assert comparable("/api/ps", through_ps) == comparable("/api/ps", direct_ps)
        for path, names in (("/api/tags", "models"), ("/api/ps", "models"), ("/v1/models", "data")):
            listed = (await client.get(real_gateway.url + path, headers=auth(only_tiny))).json()[names]
            assert [m.get("name", m.get("id")) for m in listed] == ["tiny:latest"], path
        shown = await client.post(real_gateway.url + "/api/show", json={"model": "tiny-eos"}, headers=auth(only_tiny))
        assert shown.status_code == 403
