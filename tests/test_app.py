"""The application over real HTTP: health, readiness, errors, request ids and shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import pytest_asyncio

from neuronetz import config, relay, tokens
from neuronetz.app import App
from neuronetz.gateway import Gateway
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, PrivateRedis, auth, free_port

DETAIL = auth(METRICS_TOKEN)  # /readyz shows its detail only to the holder of the metrics token


def test_healthz_is_ok_with_a_request_id(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert len(response.headers["x-request-id"]) == 24


def test_a_sane_request_id_is_echoed(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


def test_readyz_is_ready_when_every_dependency_answers(gateway: GatewayProcess, emulator: Emulator) -> None:
    response = httpx.get(gateway.url + "/readyz", headers=DETAIL)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["postgres"] == {"ok": True}
    assert body["redis"] == {"ok": True}
    backend = body["backends"]["each"][emulator.url]
    assert body["backends"]["ok"] is True
    assert backend["ok"] is True
    assert backend["version"] == "0.33.0"
    assert "tiny:latest" in backend["models"]


def test_readyz_tells_strangers_only_ready_or_not(gateway: GatewayProcess, emulator: Emulator) -> None:
    for headers in ({}, auth("not-the-token"), auth("nz_abcdefgh" + "A" * 43)):
        response = httpx.get(gateway.url + "/readyz", headers=headers)
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "failing": []}
        assert emulator.url not in response.text


def test_errors_speak_each_callers_dialect(gateway: GatewayProcess) -> None:
    native = httpx.get(gateway.url + "/api/nothing-here")
    assert native.status_code == 404
    assert native.json() == {"error": "There is no route /api/nothing-here on this gateway."}
    assert "x-request-id" in native.headers
    openai = httpx.get(gateway.url + "/v1/nothing-here")
    assert openai.status_code == 404
    assert openai.json() == {
        "error": {
            "message": "There is no route /v1/nothing-here on this gateway.",
            "type": "not_found_error",
            "code": "not_found",
            "param": None,
        }
    }


def test_wrong_method_is_405_with_allow(gateway: GatewayProcess) -> None:
    response = httpx.post(gateway.url + "/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


def test_blocked_endpoint_is_403_without_a_key(gateway: GatewayProcess) -> None:
    response = httpx.post(gateway.url + "/api/pull", json={"model": "x"})
    assert response.status_code == 403
    assert "blocked" in response.json()["error"]


def test_readyz_names_redis_when_it_is_down(gateway_env: dict[str, str]) -> None:
    with PrivateRedis() as private:
        env = {**gateway_env, "REDIS_URL": private.url}
        with GatewayProcess(env) as process:
            assert httpx.get(process.url + "/readyz").status_code == 200
            private.stop()
            response = httpx.get(process.url + "/readyz")
            assert response.status_code == 503
            assert response.json() == {"status": "not ready", "failing": ["redis"]}
            response = httpx.get(process.url + "/readyz", headers=DETAIL)
            assert response.status_code == 503
            body = response.json()
            assert body["redis"]["ok"] is False
            assert body["postgres"] == {"ok": True}
            assert private.url not in response.text


def test_readyz_names_postgres_and_backends_when_they_are_down(gateway_env: dict[str, str]) -> None:
    closed = free_port()
    env = {
        **gateway_env,
        "DATABASE_URL": f"postgresql://nobody:secret-pw@127.0.0.1:{closed}/x",
        "OLLAMA_BACKENDS": f"http://127.0.0.1:{closed}",
        "GATEWAY_READY_TIMEOUT": "0.5",
    }
    with GatewayProcess(env) as process:
        response = httpx.get(process.url + "/readyz", timeout=5, headers=DETAIL)
        assert response.status_code == 503
        body = response.json()
        assert body["postgres"]["ok"] is False
        assert body["backends"]["ok"] is False
        assert body["redis"] == {"ok": True}
        assert "secret-pw" not in response.text


def test_readyz_is_503_without_backends(gateway_env: dict[str, str]) -> None:
    env = {**gateway_env, "OLLAMA_BACKENDS": ""}
    with GatewayProcess(env) as process:
        response = httpx.get(process.url + "/readyz", headers=DETAIL)
        assert response.status_code == 503
        assert response.json()["backends"] == {
            "ok": False,
            "error": "no backend is configured (OLLAMA_BACKENDS is empty)",
        }


def test_sigterm_stops_the_server_with_exit_status_zero(gateway_env: dict[str, str]) -> None:
    process = GatewayProcess(gateway_env).start()
    assert process.stop() == 0
    assert "Granian shutdown completed" in process.log()


@pytest_asyncio.fixture
async def in_process(gateway_env: dict[str, str]) -> AsyncIterator[App]:
    """The application driven through its ASGI callable, with a real Gateway (Postgres,
    Redis, the emulator) and no Granian: faults can be planted with monkeypatch."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    application = App()
    application.attach(await Gateway.open(config.load(None, environ=gateway_env)))
    try:
        yield application
    finally:
        assert application.gateway is not None
        await application.gateway.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


async def test_closing_the_gateway_closes_its_redis_connections(gateway_env: dict[str, str]) -> None:
    gateway = await Gateway.open(config.load(None, environ=gateway_env))
    await gateway.redis.ping()
    pool = gateway.redis.connection_pool
    connections = [*pool._available_connections, *pool._in_use_connections]
    assert connections
    await gateway.close()
    assert not any(connection.is_connected for connection in connections)


async def _audited(admin: Admin, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while (row := await admin.pool.fetchrow("SELECT * FROM request_log WHERE request_id = $1", request_id)) is None:
        assert time.monotonic() < deadline, "no audit row"
        await asyncio.sleep(0.1)
    return dict(row)


async def test_a_bug_before_the_answer_is_a_500_in_the_callers_dialect_logged_and_audited(
    in_process: App, admin: Admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = await admin.key()

    def broken(body: object) -> int:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(tokens, "estimate_prompt", broken)
    transport = httpx.ASGITransport(app=in_process)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        openai = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth(key))
        native = await client.post("/api/chat", json={"model": "tiny", "messages": []}, headers=auth(key))
    assert openai.status_code == native.status_code == 500
    assert openai.json()["error"]["code"] == "internal_error"
    assert native.json() == {"error": "The gateway failed unexpectedly; the error is logged under this request id."}
    request_id = native.headers["x-request-id"]
    tracebacks = [r for r in caplog.records if r.exc_info and "planted" in str(r.exc_info[1])]
    assert len(tracebacks) == 2  # once per request
    row = await _audited(admin, request_id)
    assert (row["status"], row["error_code"]) == (500, "internal_error")


async def test_a_bug_after_the_answer_started_ends_it_with_an_error_record(
    in_process: App, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await admin.key()

    def broken(self: object, chunk: bytes) -> bytes:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(relay.NdjsonRelay, "feed", broken)
    transport = httpx.ASGITransport(app=in_process)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/api/generate", json={"model": "tiny", "prompt": "hi"}, headers=auth(key))
    assert response.status_code == 200  # the head went out before the fault
    records = [orjson.loads(line) for line in response.content.splitlines() if line]
    assert records[-1] == {"error": "The gateway failed unexpectedly; the error is logged under this request id."}
    row = await _audited(admin, response.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == (500, "internal_error")
