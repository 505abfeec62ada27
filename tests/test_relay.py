"""Hostile and broken backend answers through the real gateway: long and unterminated records,
nonsensical counters, ignored caps, refusals, bad Content-Types and oversized bodies. Whatever
the backend sends, the client gets an answer in its dialect, the request is audited with what
happened, and the ledger is charged a bounded, honest amount."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuronetz.llm_tokens import MAX_TOKENS
from neuronetz.relay import BodyRelay, NdjsonRelay, Outcome, RecordTooLong, SseRelay
from tests.broken_backend import Answer, BrokenBackend, default_tags, native_chunk, native_done
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, audit_row, auth, ledger, ledger_settles
from tests.test_proxy import traced

NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
MAX_RECORD = 1024 * 1024
GENERATE = {"model": "tiny", "prompt": "why is the sky blue", "stream": False}
CHAT_V1 = {"model": "tiny", "messages": [{"role": "user", "content": "why is the sky blue"}]}


@pytest.fixture(scope="module")
def backend() -> Iterator[BrokenBackend]:
    with BrokenBackend() as broken:
        yield broken


@pytest.fixture(autouse=True)
def _healthy_backend(backend: BrokenBackend) -> None:
    backend.answer = lambda path, body: Answer(chunks=[native_done()])
    backend.tags = default_tags
    backend.bodies.clear()


@pytest.fixture(scope="module")
def relay_gateway(gateway_env: dict[str, str], backend: BrokenBackend) -> Iterator[GatewayProcess]:
    env = {**gateway_env, "OLLAMA_BACKENDS": backend.url, "GATEWAY_MAX_RECORD_BYTES": str(MAX_RECORD)}
    with GatewayProcess(env) as process:
        yield process


def script(backend: BrokenBackend, *answers: Answer) -> None:
    """The next model requests get these answers, in order; later ones a plain final record."""
    queue = list(answers)
    backend.answer = lambda path, body: queue.pop(0) if queue else Answer(chunks=[native_done()])


async def budgeted_key(admin: Admin, client: httpx.AsyncClient, url: str, backend: BrokenBackend, daily: int) -> str:
    """A key with a budget whose counters are ready: the first budgeted request of a new tenant
    may meet a counter rebuild (503 for a moment). The warm-up request costs 5 + 3 tokens."""
    key = await admin.key(daily_tokens=daily)
    deadline = time.monotonic() + 10
    while True:
        backend.answer = lambda path, body: Answer(chunks=[native_done()])
        response = await client.post(url + "/api/generate", json=GENERATE, headers=auth(key))
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            break
        assert time.monotonic() < deadline, "budget counters never became ready"
        await asyncio.sleep(0.2)
    await ledger_settles(admin, key, 8)
    return key


# --- records: long, unterminated -----------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["native", "openai"])
async def test_a_record_past_the_bound_ends_the_stream_with_an_error_record(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, dialect: str
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    piece = b"x" * 65536
    if dialect == "native":
        answer = Answer(content_type=NDJSON, chunks=[native_chunk() + b"\n", b'{"response":"', *[piece] * 48])
        path, body = "/api/generate", {**GENERATE, "stream": True}
    else:
        first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        answer = Answer(content_type=SSE, chunks=[first, b'data: {"choices":[{"delta":{"content":"', *[piece] * 48])
        path, body = "/v1/chat/completions", {**CHAT_V1, "stream": True}
    script(backend, answer)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(relay_gateway.url + path, json=body, headers=headers)
    assert response.status_code == 200
    assert len(response.content) < 4096  # the long record never reached the client
    if dialect == "native":
        lines = response.content.splitlines()
        assert [orjson.loads(line) for line in lines[:1]] == [orjson.loads(native_chunk())]
        assert "longer than 1048576 bytes" in orjson.loads(lines[-1])["error"]
    else:
        events = response.content.split(b"\n\n")
        assert events[0].startswith(b'data: {"choices"')
        error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
        assert "longer than 1048576 bytes" in error["message"]
    row = await audit_row(admin, request_id)
    assert (row["status"], row["error_code"], row["completion_tokens"]) == (200, "backend_error", 1)


async def test_an_unterminated_last_native_line_is_read_and_forwarded(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    final = native_done(eval_count=2, prompt_eval_count=7)
    script(backend, Answer(content_type=NDJSON, chunks=[native_chunk() + b"\n", native_chunk() + b"\n", final]))
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + "/api/generate", json={**GENERATE, "stream": True},
                                     headers=headers)  # fmt: skip
    lines = [orjson.loads(line) for line in response.content.splitlines()]
    assert lines[-1] == orjson.loads(final)  # forwarded, and no error line after it
    row = await audit_row(admin, request_id)
    assert (row["error_code"], row["prompt_tokens"], row["completion_tokens"]) == (None, 7, 2)


async def test_an_unterminated_last_sse_event_is_read_and_forwarded(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":6,"completion_tokens":1,"total_tokens":7}}\r\n\r\n',
        b"data: [DONE]",
    ]
    script(backend, Answer(content_type=SSE, chunks=events))
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + "/v1/chat/completions", json={**CHAT_V1, "stream": True},
                                     headers=headers)  # fmt: skip
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert b"error" not in response.content
    assert b"usage" not in response.content  # the client did not ask for it
    row = await audit_row(admin, request_id)
    assert (row["error_code"], row["prompt_tokens"], row["completion_tokens"]) == (None, 6, 1)


# --- counters ----------------------------------------------------------------------------------


BAD_COUNTS = [-1, 2**31, 2**64, MAX_TOKENS + 1, "abc", 1.5, True, None, [3]]


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
async def test_nonsensical_native_counters_are_a_backend_error_charged_what_was_seen(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, value: Any
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    chunks = [native_chunk() + b"\n", native_chunk() + b"\n", native_done(eval_count=value) + b"\n"]
    script(backend, Answer(content_type=NDJSON, chunks=chunks))
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + "/api/generate", json={**GENERATE, "stream": True},
                                     headers=headers)  # fmt: skip
    assert response.status_code == 200
    row = await audit_row(admin, request_id)
    assert row["error_code"] == "backend_error"
    assert row["completion_tokens"] == 2  # the chunks seen
    assert 0 < row["prompt_tokens"] < 100  # the estimate, not the backend's number
    await ledger_settles(admin, key, row["prompt_tokens"] + 2)


@pytest.mark.parametrize("value", [-5, 2**70, "12", False])
async def test_nonsensical_openai_usage_is_a_backend_error(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, value: Any
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
    usage = {"prompt_tokens": 4, "completion_tokens": value}
    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}).encode()
    script(backend, Answer(chunks=[body]))
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + "/v1/chat/completions", json=CHAT_V1, headers=headers)
    assert response.status_code == 200
    assert response.content == body
    row = await audit_row(admin, request_id)
    assert row["error_code"] == "backend_error"
    assert row["completion_tokens"] == -(-len(body) // 4)  # a whole answer is charged by its size
    assert any(request_id in line and "not trusted" in line for line in relay_gateway.log().splitlines())
    # The worker's audit and ledger writers go on: the next request is recorded too.
    request_id, headers = traced(key)
    async with httpx.AsyncClient() as client:
        await client.post(relay_gateway.url + "/api/generate", json=GENERATE, headers=headers)
    assert (await audit_row(admin, request_id))["completion_tokens"] == 3


async def test_a_whole_answer_past_the_bound_passes_through_and_is_charged_by_its_size(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    body = native_done(response="y" * (2 * MAX_RECORD))
    script(backend, Answer(chunks=[body[i : i + 65536] for i in range(0, len(body), 65536)]))
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(relay_gateway.url + "/api/generate", json=GENERATE, headers=headers)
    assert response.status_code == 200
    assert response.content == body
    row = await audit_row(admin, request_id)
    assert (row["error_code"], row["completion_tokens"]) == ("backend_error", -(-len(body) // 4))


# --- caps and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [("/api/generate", {"options": {"num_predict": 0}}), ("/api/generate", {"options": {"num_predict": -1}}),
     ("/api/chat", {"options": {"num_predict": -2}}), ("/v1/chat/completions", {"max_tokens": 0}),
     ("/v1/completions", {"max_tokens": 0})],
)  # fmt: skip
async def test_a_cap_of_zero_or_less_means_no_cap_and_the_gateway_writes_its_own(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, path: str, field: dict[str, Any]
) -> None:
    async with httpx.AsyncClient() as client:
        key = await budgeted_key(admin, client, relay_gateway.url, backend, daily=200)
        backend.bodies.clear()
        body = {**(CHAT_V1 if path.endswith("chat/completions") else GENERATE), **field}
        if path == "/api/chat":
            body = {**CHAT_V1, "stream": False, **field}
        response = await client.post(relay_gateway.url + path, json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    sent = backend.bodies[0]
    cap = sent["max_tokens"] if path.startswith("/v1") else sent["options"]["num_predict"]
    assert 0 < cap <= 200 - 8  # what the budget has left, never "unlimited"


@pytest.mark.parametrize(
    ("path", "field"),
    [("/api/generate", {"options": {"num_predict": "100"}}), ("/api/generate", {"options": {"num_predict": True}}),
     ("/api/generate", {"options": {"num_predict": 1.5}}), ("/v1/chat/completions", {"max_tokens": 10**9}),
     ("/v1/chat/completions", {"max_tokens": "5"}), ("/v1/completions", {"max_tokens": 2.0})],
)  # fmt: skip
async def test_a_cap_that_is_not_an_integer_in_range_is_400(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, path: str, field: dict[str, Any]
) -> None:
    key = await admin.key()
    body = {**(CHAT_V1 if path.endswith("chat/completions") else GENERATE), **field}
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + path, json=body, headers=auth(key))
    assert response.status_code == 400
    error = response.json()["error"]
    message = error["message"] if path.startswith("/v1") else error
    assert "must be an integer" in message
    assert backend.bodies == []


async def test_a_whole_answer_past_its_cap_is_a_backend_error_charged_in_full(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin
) -> None:
    async with httpx.AsyncClient() as client:
        key = await budgeted_key(admin, client, relay_gateway.url, backend, daily=10_000)
        request_id, headers = traced(key)
        script(backend, Answer(chunks=[native_done(eval_count=500, prompt_eval_count=5)]))
        body = {**GENERATE, "options": {"num_predict": 10}}
        response = await client.post(relay_gateway.url + "/api/generate", json=body, headers=headers)
    assert response.status_code == 200
    assert backend.bodies[-1]["options"]["num_predict"] == 10  # the cap went upstream
    row = await audit_row(admin, request_id)
    assert (row["error_code"], row["prompt_tokens"], row["completion_tokens"]) == ("backend_error", 5, 500)
    await ledger_settles(admin, key, 8 + 505)


@pytest.mark.parametrize("status", [400, 500, 200])
async def test_a_refused_request_is_charged_what_the_backend_reported_not_the_estimate(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, status: int
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        key = await budgeted_key(admin, client, relay_gateway.url, backend, daily=MAX_TOKENS * 2)
        request_id, headers = traced(key)
        script(backend, Answer(status=status, chunks=[b'{"error":"invalid image input"}']))
        # 20,000 images would be an estimate of 15 M tokens; it is bounded by MAX_TOKENS.
        body = {**GENERATE, "images": ["AA=="] * 20_000}
        response = await client.post(relay_gateway.url + "/api/generate", json=body, headers=headers)
    assert response.status_code == status
    assert response.json() == {"error": "invalid image input"}
    row = await audit_row(admin, request_id)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (status, 0, 0)
    await asyncio.sleep(1.2)  # one more ledger interval: nothing more may arrive
    assert await ledger(admin, key) == 8


# --- heads and listings ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [b"application/json\x01", "text/☃".encode(), b"text/\x7fplain"])
@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
async def test_a_malformed_content_type_is_502_in_the_callers_dialect(
    relay_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, content_type: bytes, path: str
) -> None:
    key = await admin.key()
    request_id, headers = traced(key)
    script(backend, Answer(content_type=content_type, chunks=[native_done()]))
    async with httpx.AsyncClient() as client:
        response = await client.post(relay_gateway.url + path, json=GENERATE, headers=headers)
    assert response.status_code == 502
    assert response.headers["x-request-id"] == request_id
    error = response.json()["error"]
    if content_type.isascii():  # control characters: the transport already refuses the field (RFC 9110 §5.5)
        assert "failed while answering" in (error["message"] if path.startswith("/v1") else error)
    else:  # obs-text passes the transport; the relay refuses what it could not send on unchanged
        assert "Content-Type" in (error["message"] if path.startswith("/v1") else error)
    row = await audit_row(admin, request_id)
    assert row["status"] == 502


async def test_an_oversized_model_list_fails_the_listing_and_the_health_check(
    gateway_env: dict[str, str], admin: Admin
) -> None:
    key = await admin.key()
    with BrokenBackend() as backend:
        # About 10 MB of model list, in writes of 64 KiB.
        listing = b'{"models":[' + b"".join(b'{"name":"m%d"},' % i for i in range(700_000)) + b'{"name":"x"}]}'
        backend.tags = lambda: [listing[i : i + 65536] for i in range(0, len(listing), 65536)]
        with GatewayProcess({**gateway_env, "OLLAMA_BACKENDS": backend.url}) as process:
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.get(process.url + "/api/tags", headers=auth(key))
                assert response.status_code == 502
                assert response.json() == {"error": "No backend answered the model list."}
                deadline = time.monotonic() + 10
                readiness = process.url + "/readyz"  # the detail needs the metrics token
                while "more than 8388608 bytes" not in (await client.get(readiness, headers=auth(METRICS_TOKEN))).text:
                    assert time.monotonic() < deadline, "the health check never failed"
                    await asyncio.sleep(0.2)


# --- the relays on their own --------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12), terminated=st.booleans())  # fmt: skip
def test_ndjson_lines_come_out_whole_however_the_stream_is_cut(lines: list[bytes], cuts: list[int],
                                                               terminated: bool) -> None:  # fmt: skip
    data = b"\n".join(lines) + (b"\n" if terminated and lines else b"")
    relay = NdjsonRelay(Outcome(), max_record=1024)
    out = b"".join(relay.feed(chunk) for chunk in chunked(data, cuts)) + relay.close()
    expected = [line for line in data.split(b"\n")]
    assert [line for line in out.split(b"\n") if line.strip()] == [line for line in expected if line.strip()]
    assert out == b"" or out.endswith(b"\n")


@given(events=st.lists(st.sampled_from([b'data: {"choices":[{"delta":{"content":"a"}}]}', b": keep-alive",
                                        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}']),
                       max_size=6),
       crlf=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12))  # fmt: skip
def test_sse_events_come_out_whole_however_the_stream_is_cut(events: list[bytes], crlf: bool, cuts: list[int]) -> None:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    data = b"".join(event + end for event in events)
    relay = SseRelay(Outcome(), strip_usage=False, max_record=1024)
    out = b"".join(relay.feed(chunk) for chunk in chunked(data, cuts)) + relay.close()
    assert out == b"".join(event + b"\n\n" for event in events)
    contents = sum(event.startswith(b'data: {"choices":[{') for event in events)
    if any(b"usage" in event for event in events):
        assert relay.outcome.usage.exact
    else:
        assert relay.outcome.usage.completion_tokens == contents


def test_a_long_record_costs_linear_time() -> None:
    """30 MB in 64 KiB chunks: a rebuild of the buffer per chunk would copy 7 GB."""
    relay = NdjsonRelay(Outcome(), max_record=64 * 1024 * 1024)
    piece = b"y" * 65536
    started = time.process_time()
    for _ in range(480):
        assert relay.feed(piece) == b""
    assert len(relay.feed(b"\n")) == 480 * 65536 + 1
    assert time.process_time() - started < 1.0


def test_a_long_record_past_the_bound_raises() -> None:
    relay = SseRelay(Outcome(), strip_usage=False, max_record=100)
    relay.feed(b"data: " + b"x" * 90)
    with pytest.raises(RecordTooLong):
        relay.feed(b"x" * 20)


async def test_concurrent_uncapped_requests_stay_within_the_budget(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    """`num_predict: 0` is "no limit" to Ollama: with a budget, the gateway's own cap holds."""
    emulator.configure(tokens=100)
    key = await admin.key(daily_tokens=200)
    body = {"model": "tiny", "prompt": "why is the sky blue", "stream": False}
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + 10
        while (await client.post(gateway.url + "/api/generate", json={**body, "options": {"num_predict": 1}},
                                 headers=auth(key))).status_code == 503:  # fmt: skip
            assert time.monotonic() < deadline, "budget counters never became ready"
            await asyncio.sleep(0.2)
        answers = await asyncio.gather(*(
            client.post(gateway.url + "/api/generate", json={**body, "options": {"num_predict": 0}}, headers=auth(key))
            for _ in range(20)
        ))  # fmt: skip
    served = [a.json()["eval_count"] + a.json()["prompt_eval_count"] for a in answers if a.status_code == 200]
    assert served, [a.text for a in answers]
    assert {a.status_code for a in answers} <= {200, 429}
    assert 5 + 1 + sum(served) <= 200  # the estimate is exact here (a word is a token, 4 bytes each)
    await ledger_settles(admin, key, 5 + 1 + sum(served))


def test_a_whole_answer_cut_short_without_counts_is_charged_by_its_size() -> None:
    """Ollama ends a runner that keeps repeating itself early and sends a whole answer with
    `done: false` and no counters (seen on v0.24 with the tiny test model at temperature 0)."""
    outcome = Outcome()
    relay = BodyRelay(outcome, False, max_record=1 << 20)
    body = b'{"model":"tiny","response":"' + b"q" * 400 + b'","done":false}'
    assert relay.feed(body) == body
    relay.close()
    assert outcome.invalid is not None
    assert (outcome.usage.exact, outcome.usage.completion_tokens) == (False, math.ceil(len(body) / 4))
