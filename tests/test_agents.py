"""Coding agents through the gateway: `/v1/responses` (the openai SDK) and `/v1/messages` (the
official anthropic SDK), governed like every other generating route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.emulator import Emulator
from tests.emulator.faults import Fault
from tests.support import Admin, GatewayProcess, audit_row, auth, forwarded, free_port, ready_budget

MESSAGE: dict[str, Any] = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}
RESPONSE = {"model": "tiny", "input": "hello there", "max_output_tokens": 5}
Clients = list[anthropic.Anthropic | openai.OpenAI]


@pytest.fixture
def clients() -> Iterator[Clients]:
    made: Clients = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def claude(gateway: GatewayProcess, clients: Clients) -> Callable[..., Any]:
    """An anthropic client with the key as `x-api-key` (api_key=) or as a Bearer token (auth_token=)."""

    def make(**credentials: str) -> Any:  # the SDK's overloads want literal arguments; tests pass dicts
        client = anthropic.Anthropic(base_url=gateway.url, max_retries=0, **credentials)  # type: ignore[arg-type]
        clients.append(client)
        return client

    return make


@pytest.fixture
def compatible(gateway: GatewayProcess, clients: Clients) -> Callable[[str], openai.OpenAI]:
    def make(key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        clients.append(client)
        return client

    return make


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(name, data) of each SSE event in a whole stream body."""
    parsed = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            parsed.append((lines["event"], orjson.loads(lines["data"])))
    return parsed


# --- /v1/responses ------------------------------------------------------------------------------------


async def test_openai_sdk_responses_create_and_stream_settle_the_real_usage(
    compatible: Callable[[str], openai.OpenAI], admin: Admin
) -> None:
    key = await admin.key(models=("tiny",), prompt_ttl_days=1)
    client = compatible(key)

    def calls() -> tuple[Any, list[Any]]:
        whole = client.responses.create(model="tiny", input="hello there", max_output_tokens=4)
        streamed = list(client.responses.create(model="tiny", input="hello there", stream=True))
        return whole, streamed

    whole, streamed = await asyncio.to_thread(calls)
    assert whole.output_text == "Lorem ipsum dolor sit"
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (3, 4)
    assert [e.type for e in streamed][-1] == "response.completed"
    assert streamed[-1].response.usage.output_tokens == 10
    rows = await admin.pool.fetch("SELECT * FROM request_log WHERE key_prefix = $1", key[:11])
    deadline = time.monotonic() + 10
    while len(rows) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        rows = await admin.pool.fetch("SELECT * FROM request_log WHERE key_prefix = $1 ORDER BY created_at", key[:11])
    assert sorted((r["route"], r["status"], r["stream"], r["prompt_tokens"], r["completion_tokens"]) for r in rows) == [
        ("/v1/responses", 200, False, 3, 4),
        ("/v1/responses", 200, True, 3, 10),
    ]
    prompts = await admin.pool.fetch("SELECT response FROM prompt_log WHERE key_prefix = $1", key[:11])
    assert sorted(p["response"] for p in prompts)[0] == "Lorem ipsum dolor sit"


@pytest.mark.parametrize("given", [None, 0, -1, 1000])
async def test_responses_output_cap_is_written_where_the_budget_needs_one(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, given: int | None
) -> None:
    emulator.configure(tokens=50)
    key = await admin.key(total_tokens=40)
    body: dict[str, Any] = {"model": "tiny", "input": "hi"}
    if given is not None:
        body["max_output_tokens"] = given
    async with httpx.AsyncClient() as client:
        await ready_budget(client, gateway.url, key)  # 2 tokens
        emulator.clear_requests()
        response = await client.post(gateway.url + "/v1/responses", json=body, headers=auth(key))
    assert response.status_code == 200
    sent = forwarded(emulator, "/v1/responses")[0].json()
    # 38 left, the prompt ("hi" as one message) estimated at 5: 0 and below mean "no cap" and are replaced too.
    assert sent["max_output_tokens"] == 33
    assert response.json()["usage"]["output_tokens"] == 33


async def test_a_responses_stream_past_the_cap_ends_with_an_error_event_the_sdk_raises(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, compatible: Callable[[str], openai.OpenAI]
) -> None:
    first, second = await admin.key(total_tokens=40), await admin.key(total_tokens=40)
    async with httpx.AsyncClient() as client:
        await ready_budget(client, gateway.url, first)
        await ready_budget(client, gateway.url, second)
        emulator.configure(tokens=60, ignore_output_cap=True)  # a backend that does not stop at the cap
        response = await client.post(gateway.url + "/v1/responses", json={**RESPONSE, "stream": True},
                                     headers=auth(first))  # fmt: skip
    received = events(response.content)
    assert received[-1][0] == "error"
    assert received[-1][1]["code"] == "max_tokens_reached"
    assert "response.completed" not in [name for name, _ in received]

    def stream() -> None:
        for _ in compatible(second).responses.create(model="tiny", input="hi", stream=True):
            pass

    with pytest.raises(openai.APIError, match="output token limit"):
        await asyncio.to_thread(stream)


async def test_stateful_responses_fields_reach_ollama_unchanged_and_its_answer_is_relayed(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    key = await admin.key()
    raw = orjson.dumps({**RESPONSE, "previous_response_id": "resp_abc123", "store": True,
                        "metadata": {"ticket": "NZ-14"}})  # fmt: skip
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/v1/responses", content=raw,
                                     headers={**auth(key), "content-type": "application/json"})  # fmt: skip
    (sent,) = forwarded(emulator, "/v1/responses")
    assert sent.body == raw  # the gateway keeps no conversation state and strips none of it
    assert response.status_code == 200, response.text
    # Ollama stores nothing: it ignores the fields and says so in its answer, which comes back as is.
    answer = response.json()
    assert (answer["previous_response_id"], answer["store"], answer["metadata"]) == (None, False, {})
    assert answer["output"][0]["content"][0]["text"] == "Lorem ipsum dolor sit amet"


async def test_responses_refusals_are_in_the_openai_dialect(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(models=("llama3.2",))
    async with httpx.AsyncClient() as client:
        unknown = await client.post(gateway.url + "/v1/responses", json=RESPONSE, headers=auth("nz_nope"))
        refused = await client.post(gateway.url + "/v1/responses", json=RESPONSE, headers=auth(key))
    assert unknown.status_code == 401
    assert unknown.json()["error"]["type"] == "authentication_error"
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"


# --- /v1/messages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["api_key", "auth_token"])
async def test_anthropic_sdk_create_and_stream_with_either_header(
    claude: Callable[..., Any], emulator: Emulator, admin: Admin, how: str
) -> None:
    key = await admin.key(models=("tiny",))
    client = claude(**{how: key})

    def calls() -> tuple[Any, Any, list[str]]:
        whole = client.messages.create(**MESSAGE)
        with client.messages.stream(**MESSAGE) as stream:
            texts = list(stream.text_stream)
            final = stream.get_final_message()
        return whole, final, texts

    whole, final, texts = await asyncio.to_thread(calls)
    assert whole.content[0].text == "Lorem ipsum dolor sit amet"
    assert whole.stop_reason == "max_tokens"
    assert "".join(texts) == "Lorem ipsum dolor sit amet"
    # The real prompt count from message_delta, not message_start's estimate.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)
    sent = forwarded(emulator, "/v1/messages")
    assert sent
    assert all(r.header("x-api-key") is None and r.header("authorization") is None for r in sent)


async def test_messages_settle_on_message_delta_not_the_message_start_estimate(
    gateway: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    body = {**MESSAGE, "stream": True, "messages": [{"role": "user", "content": "one two three four five six"}]}
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/v1/messages", json=body,
                                     headers={"x-api-key": key, "x-request-id": "agents-settle-1"})  # fmt: skip
    received = dict(events(response.content))
    assert received["message_start"]["message"]["usage"]["input_tokens"] == 6  # the backend's guess
    real = received["message_delta"]["usage"]["input_tokens"]
    assert real != 6
    row = await audit_row(admin, "agents-settle-1")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (real, 5)


async def test_messages_prompts_and_answers_are_logged_only_for_keys_that_opted_in(
    gateway: GatewayProcess, admin: Admin
) -> None:
    silent, logged = await admin.key(), await admin.key(prompt_ttl_days=1)
    body = {**MESSAGE, "system": "be brief", "messages": [{"role": "user", "content": "a secret recipe"}]}
    async with httpx.AsyncClient() as client:
        for key in (silent, logged):
            for stream in (False, True):
                headers = {"x-api-key": key, "x-request-id": f"agents-prompt-{key[3:11]}-{stream}"}
                response = await client.post(gateway.url + "/v1/messages", json={**body, "stream": stream},
                                              headers=headers)  # fmt: skip
                assert response.status_code == 200, response.text
    deadline = time.monotonic() + 10
    while True:
        rows = await admin.pool.fetch("SELECT * FROM prompt_log WHERE key_prefix = $1 ORDER BY request_id", logged[:11])
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert [r["request_id"] for r in rows] == [f"agents-prompt-{logged[3:11]}-{s}" for s in (False, True)]
    for row in rows:
        assert orjson.loads(row["request"]) == {"system": "be brief", "messages": body["messages"]}
        assert row["response"] == "Lorem ipsum dolor sit amet"  # assembled from the deltas for the stream
    # The silent key's requests were queued for the audit before these rows: theirs would be written by now.
    assert await admin.pool.fetchval("SELECT count(*) FROM prompt_log WHERE key_prefix = $1", silent[:11]) == 0


async def test_claude_code_request_shape_passes_with_its_headers(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    key = await admin.key()
    tools = [{"name": f"tool{i}", "description": "d", "input_schema": {"type": "object"}} for i in range(30)]
    body = {"model": "llama3.2", "max_tokens": 32000, "stream": True, "tools": tools,
            "system": [{"type": "text", "text": "You are Claude Code."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "list the files"}]}]}  # fmt: skip
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"}
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/v1/messages?beta=true", json=body, headers=headers)
    assert response.status_code == 200
    assert events(response.content)[-1][0] == "message_stop"
    sent = forwarded(emulator, "/v1/messages")[0]
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.header("anthropic-beta") == "claude-code-20250219"
    assert sent.header("x-api-key") is None
    assert sent.json()["max_tokens"] == 32000  # no limit applies to this key: left alone


async def test_anthropic_sdk_errors_map_to_its_exception_classes(claude: Callable[..., Any], admin: Admin) -> None:
    key = await admin.key(models=("tiny", "missing"), rpm=2)
    client = claude(api_key=key)

    def calls() -> list[anthropic.APIStatusError]:
        caught: list[anthropic.APIStatusError] = []
        makers: list[Callable[[], Any]] = [
            lambda: claude(api_key="nz_aaaaaaaa" + "b" * 40).messages.create(**MESSAGE),
            lambda: client.messages.create(**{**MESSAGE, "model": "llama3.2"}),
            lambda: client.messages.create(**{**MESSAGE, "model": "missing"}),
            lambda: client.messages.create(**MESSAGE),
            lambda: client.messages.create(**MESSAGE),
        ]
        for make in makers:
            try:
                make()
            except anthropic.APIStatusError as exc:
                caught.append(exc)
        return caught

    caught = await asyncio.to_thread(calls)
    assert [type(e) for e in caught] == [
        anthropic.AuthenticationError,
        anthropic.PermissionDeniedError,
        anthropic.NotFoundError,
        anthropic.RateLimitError,
    ]
    for error in caught:
        assert isinstance(error, anthropic.APIStatusError)
        assert error.body["type"] == "error"  # type: ignore[index]
    assert caught[-1].response.headers["retry-after"]
    assert caught[-1].body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_anthropic_sdk_server_errors_map_to_its_exception_classes(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin, claude: Callable[..., Any], clients: Clients
) -> None:
    key = await admin.key()
    client = claude(api_key=key)
    # The gateway's own 500 would be a bug in it (test_properties): a 500 is Ollama's, relayed.
    emulator.inject(Fault(kind="status", status=500, path="/v1/messages"))
    with GatewayProcess({**gateway_env, "OLLAMA_BACKENDS": f"http://127.0.0.1:{free_port()}"}) as process:
        # A backend that was never there is benched: no healthy backend, the gateway is overloaded.
        unreachable = anthropic.Anthropic(base_url=process.url, api_key=key, max_retries=0)
        clients.append(unreachable)

        def calls() -> list[anthropic.APIStatusError]:
            caught: list[anthropic.APIStatusError] = []
            makers: list[Callable[[], Any]] = [
                lambda: client.messages.create(**{**MESSAGE, "model": "tiny\x01"}),
                lambda: client.messages.create(**MESSAGE),
                lambda: unreachable.messages.create(**MESSAGE),
            ]
            for make in makers:
                try:
                    make()
                except anthropic.APIStatusError as exc:
                    caught.append(exc)
            deadline = time.monotonic() + 10
            while caught[-1].status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)  # the first call may be the one that found the backend gone (502)
                try:
                    unreachable.messages.create(**MESSAGE)
                except anthropic.APIStatusError as exc:
                    caught[-1] = exc
            return caught

        caught = await asyncio.to_thread(calls)
    bad, failed, overloaded = caught
    assert type(bad) is anthropic.BadRequestError
    assert (bad.body["error"]["type"], bad.body["error"]["message"]) == (  # type: ignore[index]
        "invalid_request_error", "The field 'model' contains control characters.",
    )  # fmt: skip
    assert type(failed) is anthropic.InternalServerError
    assert failed.body["error"] == {  # type: ignore[index]
        "type": "api_error", "message": "an error was encountered while running the model",
    }  # fmt: skip
    assert type(overloaded) is anthropic.ServiceUnavailableError  # an InternalServerError, which the SDK retries
    assert overloaded.body["error"] == {  # type: ignore[index]
        "type": "overloaded_error", "message": "No healthy Ollama backend can serve this request right now.",
    }  # fmt: skip
    assert overloaded.response.headers["retry-after"]


async def test_two_different_keys_are_refused_and_the_same_key_twice_is_not(
    gateway: GatewayProcess, admin: Admin
) -> None:
    key, other = await admin.key(), await admin.key()
    async with httpx.AsyncClient() as client:
        mixed = await client.post(gateway.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": key, **auth(other)})
        same = await client.post(gateway.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": key, **auth(key)})
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        elsewhere = await client.post(gateway.url + "/v1/chat/completions", headers={"x-api-key": key}, json=chat)
        unknown = await client.post(gateway.url + "/v1/messages/batches", json=MESSAGE, headers={"x-api-key": key})
    assert mixed.status_code == 400
    assert mixed.json()["error"]["type"] == "invalid_request_error"
    assert same.status_code == 200
    assert elsewhere.status_code == 401  # x-api-key is Anthropic's header, only for its route
    assert unknown.status_code == 404
    assert unknown.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": unknown.json()["error"]["message"]},
    }


async def test_messages_cap_is_shortened_and_a_stream_past_it_ends_with_an_error_event(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, claude: Callable[..., Any]
) -> None:
    emulator.configure(tokens=50)
    key = await admin.key(total_tokens=40)
    async with httpx.AsyncClient() as client:
        await ready_budget(client, gateway.url, key)
        emulator.clear_requests()
        whole = await client.post(gateway.url + "/v1/messages", json={**MESSAGE, "max_tokens": 1000},
                                  headers={"x-api-key": key})  # fmt: skip
    assert forwarded(emulator, "/v1/messages")[0].json()["max_tokens"] == 31  # 38 left, prompt estimated at 7
    assert whole.json()["usage"]["output_tokens"] == 31
    key = await admin.key(total_tokens=40)
    async with httpx.AsyncClient() as client:
        await ready_budget(client, gateway.url, key)
    emulator.configure(tokens=60, ignore_output_cap=True)  # a backend that does not stop at the cap
    sdk = claude(api_key=key)

    def stream() -> None:
        with sdk.messages.stream(**MESSAGE) as events_:
            for _ in events_:
                pass

    with pytest.raises(anthropic.APIStatusError, match="output token limit"):
        await asyncio.to_thread(stream)


async def test_count_tokens_answers_the_estimate_and_counts_only_as_a_request(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, claude: Callable[..., Any]
) -> None:
    key = await admin.key(rpm=2)
    client = claude(api_key=key)

    def calls() -> list[Any]:
        results: list[Any] = []
        for _ in range(3):
            try:
                results.append(client.messages.count_tokens(model="tiny", messages=MESSAGE["messages"]))
            except anthropic.RateLimitError as exc:
                results.append(exc)
        return results

    first, second, third = await asyncio.to_thread(calls)
    assert first.input_tokens == second.input_tokens == 7  # "hello there": 3 tokens + 4 for the message
    assert isinstance(third, anthropic.RateLimitError)
    assert forwarded(emulator) == []


# --- the rest of Ollama's surface ----------------------------------------------------------------------

ACCOUNT = ["/api/me", "/api/signout", "/api/user/keys/c3NoLWVk", "/api/experimental/web_search",
           "/api/experimental/web_fetch", "/API/Me/", "//api/experimental/%77eb_fetch"]  # fmt: skip


@pytest.mark.parametrize("path", ACCOUNT)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "HEAD"])
async def test_account_endpoints_are_403_for_every_method_before_authentication(
    gateway: GatewayProcess, emulator: Emulator, path: str, method: str
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.request(method, gateway.url + path, content=b'{"query":"x"}')
    assert response.status_code == 403
    if method != "HEAD":
        assert "ollama.com account" in response.json()["error"]
    assert forwarded(emulator) == []


async def test_root_heads_and_status_are_answered_like_ollama(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    key, cloudy = await admin.key(), await admin.key(allow_cloud=True)
    async with httpx.AsyncClient() as client:
        root = await client.get(gateway.url + "/")
        head = await client.head(gateway.url + "/")
        version = await client.head(gateway.url + "/api/version", headers=auth(key))
        tags = await client.head(gateway.url + "/api/tags", headers=auth(key))
        status = await client.get(gateway.url + "/api/status", headers=auth(key))
        allowed = await client.get(gateway.url + "/api/status", headers=auth(cloudy))
        anonymous = await client.get(gateway.url + "/api/status")
    # The upload in one write: the gateway answers an unknown route without reading the body.
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b--\r\n'
    async with httpx.AsyncClient() as client:
        audio = await client.post(gateway.url + "/v1/audio/transcriptions", content=form,
                                  headers={**auth(key), "content-type": "multipart/form-data; boundary=b"})  # fmt: skip
    assert (root.status_code, root.text, root.headers["content-type"]) == (
        200, "Ollama is running", "text/plain; charset=utf-8",
    )  # fmt: skip
    assert (head.status_code, head.content) == (200, b"")
    assert (version.status_code, tags.status_code, tags.content) == (200, 200, b"")
    assert status.json() == {"cloud": {"disabled": True, "source": "gateway"}}
    assert allowed.json() == {"cloud": {"disabled": False, "source": "gateway"}}
    assert anonymous.status_code == 401
    assert audio.status_code == 404
    assert audio.json()["error"]["type"] == "not_found_error"
    assert {r.path for r in forwarded(emulator)} == {"/api/version", "/api/tags"}  # neither / nor /api/status


async def test_cloud_models_are_refused_in_each_dialect_and_hidden_unless_allowed(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.add_model("gpt-oss:20b-cloud")
    emulator.add_model("kimi-k2:cloud")
    plain = await admin.key()
    open_tenant = await admin.tenant(allow_cloud=True)
    inherits, denied = await admin.key(open_tenant), await admin.key(open_tenant, allow_cloud=False)
    chat = {"model": "gpt-oss:20b-cloud", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with httpx.AsyncClient() as client:
        native = await client.post(gateway.url + "/api/chat", json=chat, headers=auth(plain))
        compatible = await client.post(gateway.url + "/v1/chat/completions", json=chat, headers=auth(plain))
        messages = await client.post(gateway.url + "/v1/messages", json={**MESSAGE, "model": "kimi-k2:cloud"},
                                     headers={"x-api-key": plain})  # fmt: skip
        hidden = await client.get(gateway.url + "/api/tags", headers=auth(plain))
        listed = await client.get(gateway.url + "/v1/models", headers=auth(inherits))
        served = await client.post(gateway.url + "/api/chat", json=chat, headers=auth(inherits))
        overridden = await client.post(gateway.url + "/api/chat", json=chat, headers=auth(denied))
    assert (native.status_code, compatible.status_code, messages.status_code) == (403, 403, 403)
    assert "cloud model" in native.json()["error"]
    assert compatible.json()["error"]["code"] == "cloud_not_allowed"
    assert messages.json()["error"]["type"] == "permission_error"
    assert not [m for m in hidden.json()["models"] if "cloud" in m["name"]]
    assert {"gpt-oss:20b-cloud", "kimi-k2:cloud"} <= {m["id"] for m in listed.json()["data"]}
    assert served.status_code == 200
    assert overridden.status_code == 403
    assert [r.json()["model"] for r in forwarded(emulator, "/api/chat")] == ["gpt-oss:20b-cloud"]


async def test_server_side_tools_are_removed_said_so_and_audited_unless_allowed(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    plain, cloudy = await admin.key(), await admin.key(allow_cloud=True)
    function = {"type": "function", "name": "ls", "description": "list files", "parameters": {"type": "object"}}
    body = {"model": "llama3.2", "input": "hi", "tools": [{"type": "web_search"}, function]}
    async with httpx.AsyncClient() as client:
        stripped = await client.post(gateway.url + "/v1/responses", json=body,
                                     headers={**auth(plain), "x-request-id": "agents-tools-1"})  # fmt: skip
        kept = await client.post(gateway.url + "/v1/responses", json=body, headers=auth(cloudy))
        anthropic_tool = {**MESSAGE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
        claude = await client.post(gateway.url + "/v1/messages", json=anthropic_tool, headers={"x-api-key": plain})
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_fetch"}]}
        native = await client.post(gateway.url + "/api/chat", json=chat, headers=auth(plain))
    assert stripped.status_code == 200, stripped.text
    assert stripped.headers["x-neuronetz-removed-tools"] == "web_search"
    assert "x-neuronetz-removed-tools" not in kept.headers
    assert claude.headers["x-neuronetz-removed-tools"] == "web_search_20250305"
    sent = [r.json()["tools"] for r in forwarded(emulator, "/v1/responses")]
    assert sent == [[function], [{"type": "web_search"}, function]]
    assert forwarded(emulator, "/v1/messages")[0].json()["tools"] == []
    assert native.headers["x-neuronetz-removed-tools"] == "web_fetch"
    assert forwarded(emulator, "/api/chat")[0].json()["tools"] == []
    row = await audit_row(admin, "agents-tools-1")
    assert row["removed_tools"] == "web_search"


def _served(path: str, response: httpx.Response) -> int:
    """Tokens an answer of either dialect reports, streamed or whole."""
    if response.headers["content-type"].startswith("text/event-stream"):
        received = dict(events(response.content))
        usage = received["response.completed"]["response"]["usage"] if path == "/v1/responses" else (
            received["message_delta"]["usage"]
        )  # fmt: skip
    else:
        usage = response.json()["usage"]
    return int(usage["input_tokens"]) + int(usage["output_tokens"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 8}),
        ("/v1/messages", {**MESSAGE, "max_tokens": 8}),
    ],
)
async def test_a_burst_on_an_agent_route_never_overspends_a_budget(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, path: str, body: dict[str, Any]
) -> None:
    emulator.configure(token_delay_ms=20, tokens=8)
    key = await admin.key(daily_tokens=200)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        await ready_budget(client, gateway.url, key)  # spends 1 + 1 tokens
        answers = await asyncio.gather(
            *(client.post(gateway.url + path, json={**body, "stream": i % 2 == 0}, headers={"x-api-key": key,
              **auth(key)}) for i in range(40))
        )  # fmt: skip
    statuses = [a.status_code for a in answers]
    served = sum(_served(path, a) for a in answers if a.status_code == 200)
    assert set(statuses) == {200, 429}
    assert 100 <= served <= 198, (served, statuses)
    deadline = time.monotonic() + 10
    while True:  # the ledger is written every second
        usage = await admin.pool.fetchval(
            "SELECT sum(prompt_tokens + completion_tokens) FROM usage_daily u JOIN api_keys k ON k.id = u.key_id "
            "WHERE k.prefix = $1", key[:11],
        )  # fmt: skip
        if usage == served + 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert usage == served + 2
