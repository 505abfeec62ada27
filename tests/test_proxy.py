"""The proxy: routes, forwarding, streaming, usage, failures and disconnects (in process through
the ASGI callable where no server is needed, else over real HTTP)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import socket
import statistics
import time
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronetz import dialects, tenants
from neuronetz.errors import dialect_of
from neuronetz.limits import Limits
from neuronetz.llm_tokens import estimate_prompt
from tests.emulator import Emulator, count_prompt_tokens
from tests.support import Admin, GatewayProcess, audit_row, auth, forwarded, free_port, ledger_settles

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "why is the sky blue"}]}


def traced(key: str) -> tuple[str, dict[str, str]]:
    request_id = "t-" + secrets.token_hex(8)
    return request_id, {**auth(key), "X-Request-ID": request_id}


# --- routes --------------------------------------------------------------------------------


FORWARDED = [
    ("GET", "/api/version", None),
    ("HEAD", "/api/version", None),
    ("GET", "/api/tags", None),
    ("HEAD", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": "tiny"}),
    ("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False}),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "hi"}),
    ("POST", "/api/embeddings", {"model": "nomic-embed-text", "prompt": "hi"}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("POST", "/v1/responses", {"model": "tiny", "input": "hi"}),
    ("POST", "/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.mark.parametrize(("method", "path", "body"), FORWARDED)
async def test_every_forwarded_route_reaches_the_backend_at_its_canonical_path(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, method: str, path: str, body: dict[str, Any] | None
) -> None:
    key = await admin.key()
    response = await asgi.request(method, path, json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    if path in ("/api/tags", "/api/ps", "/v1/models"):
        return  # aggregated by the gateway: their own test below
    seen = forwarded(emulator, path)
    assert [r.method for r in seen] == [method]


@pytest.mark.parametrize("path", ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
                                  "/api/blobs/sha256:abc", "/API/Pull", "/api//delete/", "/api/blobs"])  # fmt: skip
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"])
async def test_model_mutating_endpoints_are_403_for_every_method(
    asgi: httpx.AsyncClient, emulator: Emulator, path: str, method: str
) -> None:
    response = await asgi.request(method, path, content=b'{"model":"tiny"}')
    assert response.status_code == 403
    if method != "HEAD":
        assert response.json() == {
            "error": "This endpoint changes the models on the server and is blocked by the gateway."
        }
    assert forwarded(emulator) == []


@pytest.mark.parametrize(
    "path", ["/api/experimental/model-recommendations", "/v1/audio/transcriptions", "/api/signin", "/metricz"]
)
async def test_routes_outside_the_allow_list_are_404_and_never_forwarded(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, path: str
) -> None:
    key = await admin.key()
    response = await asgi.post(path, json={"model": "tiny"}, headers=auth(key))
    assert response.status_code == 404
    assert forwarded(emulator) == []


def raw_request(port: int, target: bytes, key: str) -> int:
    """Send a request with exactly this request-target; return the status (0: connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = b"POST " + target + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + key.encode()
        sock.sendall(head + b"\r\nContent-Length: 16\r\nConnection: close\r\n\r\n" + b'{"model":"tiny"}')
        head = sock.recv(64)
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0


def _disguise(draw: st.DrawFn, path: str) -> bytes:
    out = b""
    for char in path:
        form = draw(st.sampled_from(["plain", "case", "pct", "pct2", "pct3"]))
        raw = char.encode()
        if form == "case":
            raw = char.swapcase().encode()
        elif form == "pct":
            raw = f"%{ord(char):02X}".encode()
        elif form == "pct2":
            raw = f"%25{ord(char):02x}".encode()
        elif form == "pct3":
            raw = f"%2525{ord(char):02X}".encode()
        if char == "/":
            raw = draw(st.sampled_from([b"/", b"//", b"/./", b"/x/../", b"\\", b"%2F", b"%252f", b"/;p=1/"]))
        out += raw
    return out + draw(st.sampled_from([b"", b"/", b";x", b"?a=1", b"/.", b"//"]))


@st.composite
def disguised_blocked_paths(draw: st.DrawFn) -> bytes:
    blocked = draw(st.sampled_from(["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
                                    "/api/blobs/sha256:00ff", "/api/me", "/api/signout", "/api/user/keys/abc",
                                    "/api/experimental/web_search", "/api/experimental/web_fetch"]))  # fmt: skip
    return _disguise(draw, blocked)


@pytest.fixture(scope="module")
def shared_key(gateway: GatewayProcess, database_url: str) -> str:
    async def make() -> str:
        pool = await asyncpg.create_pool(database_url)
        try:
            await tenants.create_tenant(pool, "hypothesis", Limits())
            return (await tenants.create_key(pool, "hypothesis", "k"))[1]
        finally:
            await pool.close()

    return asyncio.run(make())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=disguised_blocked_paths())
def test_no_encoding_of_a_blocked_path_reaches_the_backend(
    gateway: GatewayProcess, emulator: Emulator, shared_key: str, target: bytes
) -> None:
    status = raw_request(gateway.port, target, shared_key)
    assert status in (400, 403), (target, status)
    assert forwarded(emulator) == []


# --- what goes upstream ------------------------------------------------------------------------


async def test_headers_are_rebuilt_for_the_backend(gateway: GatewayProcess, emulator: Emulator, admin: Admin) -> None:
    key = await admin.key()
    headers = {
        **auth(key),
        "Host": "api.example.com",
        "Cookie": "session=secret",
        "Origin": "https://evil.example",
        "User-Agent": "ollama-python/0.6.3",
        "X-Forwarded-For": "198.51.100.9",
        "Connection": "keep-alive, x-custom",
        "X-Custom": "drop me",
        "X-Api-Key": "nz_notforwarded",
    }
    raw = orjson.dumps({**CHAT, "stream": False, "options": {"seed": 7}})
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/api/chat", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    (seen,) = forwarded(emulator, "/api/chat")
    # Ollama on loopback refuses a foreign Host (docs/ollama.md §6): the backend sees its own.
    assert seen.header("host") == emulator.url.removeprefix("http://")
    assert seen.header("user-agent") == "ollama-python/0.6.3"
    for dropped in ("authorization", "cookie", "origin", "x-forwarded-for", "x-custom", "connection", "x-api-key"):
        assert seen.header(dropped) is None, dropped
    assert seen.body == raw  # forwarded unchanged: nothing needed rewriting


async def test_model_lists_are_filtered_by_the_allow_list(asgi: httpx.AsyncClient, admin: Admin) -> None:
    key = await admin.key(models=("tiny", "qwen3"))
    tags = await asgi.get("/api/tags", headers=auth(key))
    models = await asgi.get("/v1/models", headers=auth(key))
    hidden = await asgi.get("/v1/models/llava", headers=auth(key))
    shown = await asgi.post("/api/show", json={"model": "llava"}, headers=auth(key))
    assert sorted(m["name"] for m in tags.json()["models"]) == ["qwen3:latest", "tiny:latest"]
    assert sorted(m["id"] for m in models.json()["data"]) == ["qwen3:latest", "tiny:latest"]
    assert hidden.status_code == shown.status_code == 403


async def test_a_key_allowed_no_listed_model_sees_the_empty_shapes(asgi: httpx.AsyncClient, admin: Admin) -> None:
    key = await admin.key(models=("not-installed",))
    tags = await asgi.get("/api/tags", headers=auth(key))
    models = await asgi.get("/v1/models", headers=auth(key))
    assert tags.json() == {"models": []}
    assert models.json() == {"object": "list", "data": None}  # Ollama's own empty answer


# --- streaming -------------------------------------------------------------------------------------


async def test_tokens_stream_through_at_the_backends_pace(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=50, tokens=10)
    key = await admin.key()
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient() as client,
        client.stream(
            "POST", gateway.url + "/api/generate", json={"model": "tiny", "prompt": "x"}, headers=auth(key)
        ) as response,
    ):
        assert response.headers["content-type"] == "application/x-ndjson"
        async for line in response.aiter_lines():
            if line:
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 11
    content = arrivals[:-1]  # the last line is the final record, sent right after the last token
    gaps = [b - a for a, b in itertools.pairwise(content)]
    # Buffering would bunch tokens up (gaps near zero); passing them on as they come keeps the
    # emulator's 50 ms beat. (Single gaps may stretch or shrink when this busy machine
    # schedules late; the median is the beat.)
    assert abs(statistics.median(gaps) - 0.05) < 0.01, gaps
    assert sum(gap > 0.03 for gap in gaps) >= 0.8 * len(gaps), gaps


async def test_a_non_streaming_answer_passes_through_whole(asgi: httpx.AsyncClient, admin: Admin) -> None:
    key = await admin.key()
    response = await asgi.post("/api/chat", json={**CHAT, "stream": False}, headers=auth(key))
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["content-length"]) == len(response.content)
    assert body["done"] is True
    assert body["message"]["content"].startswith("Lorem ipsum")


# --- usage -------------------------------------------------------------------------------------------------


async def test_native_usage_is_taken_from_the_final_chunk(asgi: httpx.AsyncClient, admin: Admin) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    body = {"model": "tiny", "prompt": "one two three four", "options": {"num_predict": 4}}
    lines = (await asgi.post("/api/generate", json=body, headers=headers)).text.splitlines()
    final = orjson.loads(lines[-1])
    row = await audit_row(admin, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (final["prompt_eval_count"], final["eval_count"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (count_prompt_tokens("/api/generate", body), 4)
    assert row["stream"] is True


# Where an Ollama release puts the finish and usage events of a /v1 stream (docs/ollama.md §3):
# the relay must account for each. Before v0.5.2 there is no usage event at all, so the gateway
# charges its prompt estimate and the content events it saw.
def charged(frame_style: str, path: str, body: dict[str, Any], tokens: int) -> tuple[int, int]:
    """The (prompt, completion) tokens a /v1 stream of `tokens` tokens is charged in `frame_style`."""
    if frame_style == "pre-0.5.2":
        return estimate_prompt(body), tokens
    return count_prompt_tokens(path, body), tokens


@pytest.mark.parametrize("frame_style", ["modern", "legacy", "pre-0.5.2"])
async def test_openai_streams_are_accounted_without_showing_unasked_usage(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, frame_style: str
) -> None:
    emulator.configure(frame_style=frame_style)
    key = await admin.key()
    request_id, headers = traced(key)
    body = {**CHAT, "stream": True}
    text = (await asgi.post("/v1/chat/completions", json=body, headers=headers)).text
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert all('"usage"' not in e for e in events)  # the client did not ask for usage
    assert forwarded(emulator, "/v1/chat/completions")[0].json()["stream_options"] == {"include_usage": True}
    row = await audit_row(admin, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == charged(frame_style, "/v1/chat/completions", body, 10)


@pytest.mark.parametrize("frame_style", ["modern", "legacy"])  # before v0.5.2 Ollama sends no usage to keep
async def test_openai_streams_keep_usage_the_client_asked_for(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, frame_style: str
) -> None:
    emulator.configure(frame_style=frame_style)
    key = await admin.key()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    text = (await asgi.post("/v1/chat/completions", json=body, headers=auth(key))).text
    events = [orjson.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e and "[DONE]" not in e]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("frame_style", ["modern", "legacy", "pre-0.5.2"])
async def test_completions_streams_lose_the_zero_usage_of_each_event(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, frame_style: str
) -> None:
    emulator.configure(frame_style=frame_style)
    key = await admin.key()
    request_id, headers = traced(key)
    body = {"model": "tiny", "prompt": "a b c", "stream": True, "max_tokens": 3}
    text = (await asgi.post("/v1/completions", json=body, headers=headers)).text
    assert '"usage"' not in text
    row = await audit_row(admin, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == charged(frame_style, "/v1/completions", body, 3)


@pytest.mark.parametrize("in_done", [False, True], ids=["own-line", "final-line"])
async def test_tool_calls_are_relayed_and_charged_wherever_they_ride(
    asgi: httpx.AsyncClient, emulator: Emulator, admin: Admin, in_done: bool
) -> None:
    """A tool call comes in its own line or inside the final `done` record (docs/ollama.md §9)."""
    emulator.configure(tool_calls_in_done=in_done)
    key = await admin.key()
    request_id, headers = traced(key)
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "weather", "parameters": city}}
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "weather?"}], "tools": [tool]}
    lines = [
        orjson.loads(line) for line in (await asgi.post("/api/chat", json=body, headers=headers)).text.splitlines()
    ]
    calls = [call["function"]["arguments"] for line in lines for call in line["message"].get("tool_calls", [])]
    assert calls == [{"city": "test"}]
    assert ("tool_calls" in lines[-1]["message"]) is in_done
    row = await audit_row(admin, request_id)
    assert (row["completion_tokens"], row["error_code"]) == (1, None)


# --- failures ---------------------------------------------------------------------------------------------


async def test_backend_errors_before_the_answer_pass_through(asgi: httpx.AsyncClient, admin: Admin) -> None:
    key = await admin.key()
    native = await asgi.post("/api/chat", json={**CHAT, "model": "nope"}, headers=auth(key))
    openai = await asgi.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth(key))
    assert native.status_code == openai.status_code == 404
    assert native.json() == {"error": "model 'nope' not found"}
    assert openai.json()["error"]["type"] == "not_found_error"


async def test_a_native_error_line_mid_stream_is_passed_on(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.inject("error", after_tokens=3, message="the runner crashed")
    key = await admin.key()
    request_id, headers = traced(key)
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/api/chat", json=CHAT, headers=headers)
    lines = [orjson.loads(line) for line in response.text.splitlines()]
    assert response.status_code == 200
    assert len(lines) == 4
    assert lines[-1] == {"error": "the runner crashed"}
    row = await audit_row(admin, request_id)
    assert (row["status"], row["error_code"], row["completion_tokens"]) == (200, "backend_error", 3)


# "error" on /v1 is Ollama's silent truncation (docs/ollama.md §4); an OpenAI-style backend
# sends an error event of its own instead.
@pytest.mark.parametrize(("kind", "style"), [("drop", None), ("error", "ollama"), ("error", "openai")])
async def test_openai_streams_that_break_end_with_an_error_event(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, kind: str, style: str | None
) -> None:
    emulator.inject(kind, after_tokens=2, v1_style=style)
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        text = (await client.post(gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers=auth(key))).text  # fmt: skip
    last = orjson.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["type"] == "api_error"
    assert "[DONE]" not in text


async def test_a_dropped_native_stream_ends_with_an_error_line(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.inject("drop", after_tokens=2)
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        lines = (await client.post(gateway.url + "/api/chat", json=CHAT, headers=auth(key))).text.splitlines()
    assert len(lines) == 3
    assert "error" in orjson.loads(lines[-1])


async def test_timeouts_end_the_answer_and_never_hang(gateway_env: dict[str, str], emulator: Emulator,
                                                      admin: Admin) -> None:  # fmt: skip
    env = {**gateway_env, "GATEWAY_BACKEND_IDLE_TIMEOUT": "1", "GATEWAY_BACKEND_FIRST_BYTE_TIMEOUT": "1"}
    key = await admin.key()
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient(timeout=10) as client:
            emulator.inject("stall", after_tokens=2)
            started = time.monotonic()
            lines = (await client.post(process.url + "/api/chat", json=CHAT, headers=auth(key))).text.splitlines()
            assert time.monotonic() - started < 3
            assert orjson.loads(lines[-1]) == {"error": "The backend did not answer in time."}
            emulator.configure(first_token_delay_ms=3000)
            before_first_byte = await client.post(process.url + "/api/chat", json={**CHAT, "stream": False},
                                                  headers=auth(key))  # fmt: skip
            assert before_first_byte.status_code == 504


async def test_an_unreachable_backend_is_502(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    env = {**gateway_env, "OLLAMA_BACKENDS": f"http://127.0.0.1:{free_port()}"}
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient() as client:
            native = await client.post(process.url + "/api/chat", json=CHAT, headers=auth(key))
            await asyncio.sleep(0.1)
            again = await client.post(process.url + "/v1/chat/completions", json=CHAT, headers=auth(key))
    assert native.status_code in (502, 503)
    assert again.status_code == 503  # the backend is benched now: no healthy backend
    assert again.json()["error"]["message"] == "No healthy Ollama backend can serve this request right now."


async def test_bodies_over_the_limit_are_413(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    with GatewayProcess({**gateway_env, "GATEWAY_MAX_BODY_BYTES": "2048"}) as process:
        async with httpx.AsyncClient() as client:
            big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
            native = await client.post(process.url + "/api/chat", json=big, headers=auth(key))
            openai = await client.post(process.url + "/v1/chat/completions", json=big, headers=auth(key))

            async def chunks() -> Any:
                for _ in range(8):
                    yield b" " * 512

            chunked = await client.post(process.url + "/api/chat", content=chunks(), headers=auth(key))
    assert native.status_code == openai.status_code == chunked.status_code == 413
    assert openai.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "The request body is not valid JSON"),
        (b"[]", "The request body must be a JSON object."),
        (b'{"model": 7}', "The field 'model' must be a string."),
        (b"", "The request body is empty"),
    ],
)
async def test_malformed_bodies_are_400(asgi: httpx.AsyncClient, admin: Admin, body: bytes, message: str) -> None:
    key = await admin.key()
    response = await asgi.post("/api/chat", content=body, headers=auth(key))
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


# --- disconnects ----------------------------------------------------------------------------------------


# Each route's stream and the line that opens each token's record in it.
LEFT_STREAMS = [
    ("/api/chat", CHAT, "{"),
    ("/v1/responses", {"model": "tiny", "input": "why is the sky blue", "stream": True},
     "event: response.output_text.delta"),
    ("/v1/messages", {**CHAT, "max_tokens": 100, "stream": True}, "event: content_block_delta"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "token_line"), LEFT_STREAMS)
async def test_a_client_leaving_mid_stream_cancels_the_backend_at_once(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, path: str, body: dict[str, Any], token_line: str
) -> None:
    emulator.configure(token_delay_ms=50, tokens=40)
    key = await admin.key(max_concurrent=1)
    request_id, headers = traced(key)
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", gateway.url + path, json=body, headers=headers) as response,
    ):
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith(token_line)
            if seen == 5:
                break
        left = time.monotonic()
    (cancelled,) = await asyncio.to_thread(emulator.wait_for_cancellations, 1, 2.0)
    assert cancelled.monotonic - left < 0.1
    assert 5 <= cancelled.tokens_sent <= 7
    row = await audit_row(admin, request_id)
    assert row["disconnected"] is True
    assert 5 <= row["completion_tokens"] <= cancelled.tokens_sent  # the tokens produced so far are accounted
    # No usage arrived: the prompt is charged at the gateway's estimate, in the route's dialect.
    dialect = dialect_of(path)
    estimate = dialects.estimate_prompt(body, dialect) if dialect else estimate_prompt(body)
    assert row["prompt_tokens"] == estimate
    await ledger_settles(admin, key, estimate + row["completion_tokens"])
    async with httpx.AsyncClient() as client:  # the key's one concurrency slot is free again
        again = await client.post(gateway.url + path, json={**body, "stream": False}, headers=auth(key))
    assert again.status_code == 200, again.text


async def test_a_client_leaving_before_the_first_byte_cancels_the_backend(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(first_token_delay_ms=3000)
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(client.post(gateway.url + "/api/chat", json=CHAT, headers=auth(key)))
        await asyncio.sleep(0.5)
        task.cancel()
        left = time.monotonic()
    (cancelled,) = await asyncio.to_thread(emulator.wait_for_cancellations, 1, 2.0)
    assert cancelled.monotonic - left < 0.1
    assert cancelled.tokens_sent == 0


async def test_a_client_leaving_a_non_streaming_request_cancels_the_backend(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=100, tokens=30)
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        task = asyncio.create_task(
            client.post(gateway.url + "/v1/chat/completions", json={**CHAT, "stream": False}, headers=auth(key))
        )
        await asyncio.sleep(0.6)
        task.cancel()
        left = time.monotonic()
    (cancelled,) = await asyncio.to_thread(emulator.wait_for_cancellations, 1, 2.0)
    assert cancelled.monotonic - left < 0.1
    assert 3 <= cancelled.tokens_sent <= 8
