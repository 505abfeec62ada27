"""The edges of a request, attacked from outside over real sockets: bodies that amplify or
trickle, duplicate credentials, malformed framing, bad request ids and control characters."""

from __future__ import annotations

import asyncio
import select
import socket
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import orjson
import pytest

from neuronetz.http import parse_json
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, auth, forwarded, metric

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(scope="module")
def impatient(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A gateway that gives a body one second to arrive."""
    with GatewayProcess({**gateway_env, "GATEWAY_BODY_TIMEOUT": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def narrow(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A gateway that receives two bodies at once."""
    with GatewayProcess({**gateway_env, "GATEWAY_MAX_BODY_READERS": "2"}) as process:
        yield process


def raw_exchange(url: str, request: bytes, *, timeout: float = 10.0, then: bytes | None = None) -> bytes:
    """Send `request` on a fresh connection and read the answer until the server closes or a
    complete response (by Content-Length) has arrived."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        if then is not None:
            sock.sendall(then)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
                if lengths and len(body) >= int(lengths[0].split(b":")[1]):
                    break
        return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def body_of(response: bytes) -> dict[str, object]:
    value: dict[str, object] = orjson.loads(response.partition(b"\r\n\r\n")[2])
    return value


# --- 12.3: bodies that amplify when parsed ------------------------------------------------------


async def test_a_body_of_many_tiny_json_values_is_refused_before_parsing(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(rpm=1)
    elements = b",".join([b"{}"] * 10_000_000)  # 30 MB: parsed, about 1 GB of Python objects
    body = b'{"model":"tiny","prompt":"x","stream":false,"context":[' + elements + b"]}"
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        response = await client.post(gateway.url + "/api/generate", content=body, headers=auth(key))
        elapsed = time.perf_counter() - started
        health = await client.get(gateway.url + "/healthz")
    assert response.status_code == 413, response.text
    assert "too many JSON elements" in response.json()["error"]
    assert health.status_code == 200
    print(f"\n30 MB of '{{}}' refused in {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0  # reading 30 MB and counting; parsing it took 4-6 s


async def test_routes_without_images_take_small_bodies_only(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    text = "word " * 900_000  # 4.5 MB of text: over the 4 MiB for embeddings, under the 32 MiB for chat
    async with httpx.AsyncClient(timeout=30) as client:
        embed = await client.post(gateway.url + "/v1/embeddings", json={"model": "tiny", "input": text},
                                  headers=auth(key))  # fmt: skip
        chat = await client.post(gateway.url + "/api/chat", headers=auth(key), json={
            "model": "tiny", "messages": [{"role": "user", "content": text}], "stream": False})  # fmt: skip
    assert embed.status_code == 413
    assert embed.json()["error"]["code"] == "request_too_large"
    assert chat.status_code == 200, chat.text


def test_peak_parse_memory_of_the_largest_accepted_bodies_is_bounded() -> None:
    """Prints what parsing the largest bodies the defaults accept costs: a 32 MiB image (the
    body of an image route) and the worst-shaped body at the element bound."""
    image = b'{"model":"tiny","prompt":"x","images":["' + b"A" * (32 * 1024 * 1024 - 64) + b'"]}'
    dense = b",".join([b'{"a":1}'] * ((1 << 18) // 2 - 2))  # the costliest value per counted byte
    worst = b'{"model":"tiny","context":[' + dense + b"]}"
    both = b'{"model":"tiny","context":[' + dense + b'],"images":["' + b"A" * (31 * 1024 * 1024) + b'"]}'
    for name, raw in (("32 MiB image", image), ("262144 elements", worst), ("both", both)):
        tracemalloc.start()
        started = time.perf_counter()
        parse_json(raw, 1 << 18)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"\n{name}: body {len(raw) / 2**20:.1f} MiB, parse peak {peak / 2**20:.1f} MiB, {elapsed * 1000:.0f} ms")
        assert peak < 160 * 2**20  # a few times the body at worst, never tens of times


# --- 12.5: bodies that trickle --------------------------------------------------------------------


async def test_a_body_that_does_not_arrive_in_time_gets_408_in_the_callers_dialect(
    impatient: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    started = time.monotonic()
    response = await asyncio.to_thread(raw_exchange, impatient.url, head + b'{"model":', timeout=10)
    assert status_of(response) == 408, response
    assert body_of(response)["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert b"x-request-id" in response.lower()
    assert time.monotonic() - started < 6


async def test_past_the_body_reader_bound_trickling_bodies_get_503_and_whole_ones_are_served(
    narrow: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:  # the key is verified and cached first
        assert (await client.post(narrow.url + "/api/chat", json=CHAT, headers=auth(key))).status_code == 200
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n{{"
    ).encode()
    host, port = narrow.url.removeprefix("http://").split(":")

    def trickle() -> socket.socket:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(head)  # one byte of a hundred: read in pieces, for 60 s
        return sock

    slow = [trickle(), trickle()]
    try:
        deadline = time.monotonic() + 30
        while True:
            # A probe that reached the gateway before a slow body took its place was counted
            # itself and that body refused; such a body is replaced, and the probe, given up
            # after a short wait, leaves its place to it.
            for index, sock in enumerate(slow):
                if select.select([sock], [], [], 0)[0]:  # answered (503) or closed: no longer counted
                    sock.close()
                    slow[index] = trickle()
            refused = await asyncio.to_thread(raw_exchange, narrow.url, head, timeout=2)
            if status_of(refused) == 503:
                break
            assert time.monotonic() < deadline, f"a third trickling body was not refused: {refused!r}"
        assert b"too many request bodies" in refused
        assert b"retry-after: 1" in refused.lower()
        async with httpx.AsyncClient() as client:  # a body that arrives whole holds nothing: served
            assert (await client.post(narrow.url + "/api/chat", json=CHAT, headers=auth(key))).status_code == 200
    finally:
        for sock in slow:
            sock.close()


async def test_a_burst_of_whole_bodies_beyond_the_reader_bound_is_served(narrow: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        answers = await asyncio.gather(
            *(client.post(narrow.url + "/api/chat", json=CHAT, headers=auth(key)) for _ in range(64))
        )
    assert [a.status_code for a in answers] == [200] * 64


# --- 12.9 and 12.11: credentials, framing and request ids ------------------------------------


async def test_two_authorization_headers_are_refused(gateway: GatewayProcess, admin: Admin) -> None:
    key, other = await admin.key(), await admin.key()
    headers = [("Authorization", f"Bearer {other}"), ("Authorization", f"Bearer {key}")]
    async with httpx.AsyncClient() as client:
        native = await client.post(gateway.url + "/api/chat", json=CHAT, headers=headers)
        openai = await client.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers)
        single = await client.post(gateway.url + "/api/chat", json=CHAT, headers=auth(key))
    assert native.status_code == openai.status_code == 400
    assert native.json() == {"error": "The request has more than one Authorization header; send exactly one."}
    assert openai.json()["error"]["code"] == "invalid_request"
    assert single.status_code == 200


async def test_a_malformed_chunked_body_is_a_400_with_a_request_id(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    request = (
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Transfer-Encoding: chunked\r\nX-Request-ID: chunky-1\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    ).encode()
    response = await asyncio.to_thread(raw_exchange, gateway.url, request)
    assert status_of(response) == 400, response
    assert "ended before it was complete" in str(body_of(response)["error"])
    assert b"x-request-id: chunky-1" in response.lower()


async def test_the_backend_sees_the_request_id_the_client_and_the_audit_see(
    gateway: GatewayProcess, admin: Admin, emulator: Emulator
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        bad = await client.post(
            gateway.url + "/api/chat", json=CHAT, headers={**auth(key), "X-Request-ID": "no spaces!"}
        )
        good = await client.post(gateway.url + "/api/chat", json=CHAT, headers={**auth(key), "X-Request-ID": "trace-7"})
    assert bad.status_code == good.status_code == 200
    assert bad.headers["x-request-id"] != "no spaces!"
    seen = [r.header("x-request-id") for r in forwarded(emulator, "/api/chat")]
    assert seen[-2:] == [bad.headers["x-request-id"], "trace-7"]


# --- 11.1: control characters in the model ---------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny\u0000", "ti\nny", "tiny\x1b[31m"])
async def test_a_model_with_control_characters_is_a_400_before_the_model_check(
    gateway: GatewayProcess, admin: Admin, model: str
) -> None:
    key = await admin.key(models=("qwen3:latest",))  # any other model would be a 403
    async with httpx.AsyncClient() as client:
        native = await client.post(gateway.url + "/api/chat", json={**CHAT, "model": model}, headers=auth(key))
        openai = await client.post(gateway.url + "/v1/chat/completions", json={**CHAT, "model": model},
                                   headers=auth(key))  # fmt: skip
    assert native.status_code == openai.status_code == 400
    assert native.json() == {"error": "The field 'model' contains control characters."}
    assert openai.json()["error"]["type"] == "invalid_request_error"


async def test_a_model_name_longer_than_256_characters_is_a_400(gateway: GatewayProcess, admin: Admin) -> None:
    """A client's model name becomes part of a usage ledger row's key (and an audit row): made-up
    names of any length would let a client grow those at will. 256 characters pass (to the
    backend, which knows no such model), 257 do not."""
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        longest = await client.post(gateway.url + "/api/chat", json={**CHAT, "model": "m" * 256}, headers=auth(key))
        longer = await client.post(gateway.url + "/api/chat", json={**CHAT, "model": "m" * 257}, headers=auth(key))
    assert longest.status_code == 404, longest.text  # the backend's answer
    assert longer.status_code == 400
    assert longer.json() == {"error": "The field 'model' is longer than 256 characters; no model name is."}


# --- 11.6: refusals an SDK should not wait for ---------------------------------------------------


async def test_a_budget_refusal_raises_at_once_in_the_official_openai_client(
    gateway: GatewayProcess, admin: Admin
) -> None:
    import openai

    tenant = await admin.tenant(daily_tokens=1)
    key = await admin.key(tenant)
    body = {**CHAT, "max_tokens": 50}
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 20  # wait out a first-use counter rebuild, if any
        while True:
            response = await client.post(gateway.url + "/v1/chat/completions", json=body, headers=auth(key))
            if response.status_code == 429 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "budget_exceeded"
        assert response.headers["x-should-retry"] == "false"
        assert "resets at" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) > 0
        before = metric((await client.get(gateway.url + "/metrics", headers=auth(METRICS_TOKEN))).text,
                        "neuronetz_refusals_total", reason="budget_exceeded")  # fmt: skip
        sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key)  # max_retries: the default
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
        elapsed = time.perf_counter() - started
        await sdk.close()
        deadline = time.monotonic() + 5  # metrics are published about once a second
        while True:
            text = (await client.get(gateway.url + "/metrics", headers=auth(METRICS_TOKEN))).text
            after = metric(text, "neuronetz_refusals_total", reason="budget_exceeded")
            if after > before or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.2)  # one more publication: a retry would show up by now
        text = (await client.get(gateway.url + "/metrics", headers=auth(METRICS_TOKEN))).text
        after = metric(text, "neuronetz_refusals_total", reason="budget_exceeded")
    assert after - before == 1  # the SDK sent the request once and did not retry
    assert elapsed < 1.0
