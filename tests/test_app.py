"""The application: health, readiness, errors, request ids, unexpected failures and shutdown
(in process through its ASGI callable where no server is needed, else over real HTTP)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from neuronetz import llm_tokens, relay
from tests.asgi import ASGITransport, in_process, lifespan, open_worker
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, PrivateRedis, audit_row, auth, free_port

DETAIL = auth(METRICS_TOKEN)  # /readyz shows its detail only to the holder of the metrics token


async def test_healthz_is_ok_with_a_request_id(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert len(response.headers["x-request-id"]) == 24


async def test_a_sane_request_id_is_echoed(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/healthz", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


async def test_readyz_is_ready_when_every_dependency_answers(asgi: httpx.AsyncClient, emulator: Emulator) -> None:
    response = await asgi.get("/readyz", headers=DETAIL)
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


async def test_readyz_tells_strangers_only_ready_or_not(asgi: httpx.AsyncClient, emulator: Emulator) -> None:
    for headers in ({}, auth("not-the-token"), auth("nz_abcdefgh" + "A" * 43)):
        response = await asgi.get("/readyz", headers=headers)
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "failing": []}
        assert emulator.url not in response.text


async def test_errors_speak_each_callers_dialect(asgi: httpx.AsyncClient) -> None:
    native = await asgi.get("/api/nothing-here")
    assert native.status_code == 404
    assert native.json() == {"error": "There is no route /api/nothing-here on this gateway."}
    assert "x-request-id" in native.headers
    openai = await asgi.get("/v1/nothing-here")
    assert openai.status_code == 404
    assert openai.json() == {
        "error": {
            "message": "There is no route /v1/nothing-here on this gateway.",
            "type": "not_found_error",
            "code": "not_found",
            "param": None,
        }
    }


async def test_wrong_method_is_405_with_allow(asgi: httpx.AsyncClient) -> None:
    response = await asgi.post("/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_blocked_endpoint_is_403_without_a_key(asgi: httpx.AsyncClient) -> None:
    response = await asgi.post("/api/pull", json={"model": "x"})
    assert response.status_code == 403
    assert "blocked" in response.json()["error"]


async def test_readyz_names_redis_when_it_is_down(gateway_env: dict[str, str]) -> None:
    with PrivateRedis() as private:
        async with in_process({**gateway_env, "REDIS_URL": private.url}) as client:
            assert (await client.get("/readyz")).status_code == 200
            private.stop()
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {"status": "not ready", "failing": ["redis"]}
            response = await client.get("/readyz", headers=DETAIL)
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


async def test_readyz_is_503_without_backends(gateway_env: dict[str, str]) -> None:
    async with in_process({**gateway_env, "OLLAMA_BACKENDS": ""}) as client:
        response = await client.get("/readyz", headers=DETAIL)
        assert response.status_code == 503
        assert response.json()["backends"] == {
            "ok": False,
            "error": "no backend is configured (OLLAMA_BACKENDS is empty)",
        }


def test_sigterm_stops_the_server_with_exit_status_zero(gateway_env: dict[str, str]) -> None:
    process = GatewayProcess(gateway_env).start()
    assert process.stop() == 0
    assert "Granian shutdown completed" in process.log()


async def test_closing_the_gateway_closes_its_redis_connections(gateway_env: dict[str, str]) -> None:
    async with open_worker(gateway_env) as worker:
        assert isinstance(worker.redis, Redis)  # standalone, as in gateway_env
        await worker.redis.ping()
        pool = worker.redis.connection_pool
        connections = [*pool._available_connections, *pool._in_use_connections]
        assert connections
    assert not any(connection.is_connected for connection in connections)


async def test_a_part_that_does_not_stop_is_named_and_the_rest_still_closes(
    gateway_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    async with open_worker(gateway_env) as worker:
        await worker.redis.ping()
        journal_stop = worker.journal.stop

        async def never() -> None:
            await asyncio.Event().wait()

        worker.journal.stop = never  # type: ignore[method-assign]
        started = time.monotonic()
        await worker.close(patience=2)
        assert time.monotonic() - started < 2 * 10  # ten parts, none waited for longer
        worker.journal.stop = journal_stop  # type: ignore[method-assign]
        stuck = [r.__dict__["fields"]["part"] for r in caplog.records if "did not stop in time" in r.getMessage()]
        assert "journal" in stuck  # (on a busy machine another part may be slow too)
        assert worker.db.is_closing()  # the parts after it were stopped all the same
        assert not any(c.is_connected for c in worker.redis.connection_pool._available_connections)  # type: ignore[union-attr]


async def test_a_bug_before_the_answer_is_a_500_in_the_callers_dialect_logged_and_audited(
    asgi: httpx.AsyncClient, admin: Admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = await admin.key()

    def broken(body: object) -> int:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(llm_tokens, "estimate_prompt", broken)
    openai = await asgi.post("/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth(key))
    native = await asgi.post("/api/chat", json={"model": "tiny", "messages": []}, headers=auth(key))
    assert openai.status_code == native.status_code == 500
    assert openai.json()["error"]["code"] == "internal_error"
    assert native.json() == {"error": "The gateway failed unexpectedly; the error is logged under this request id."}
    request_id = native.headers["x-request-id"]
    tracebacks = [r for r in caplog.records if r.exc_info and "planted" in str(r.exc_info[1])]
    assert len(tracebacks) == 2  # once per request
    row = await audit_row(admin, request_id)
    assert (row["status"], row["error_code"]) == (500, "internal_error")


async def test_a_bug_after_the_answer_started_ends_it_with_an_error_record(
    asgi: httpx.AsyncClient, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await admin.key()

    def broken(self: object, chunk: bytes) -> bytes:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(relay.NdjsonRelay, "feed", broken)
    response = await asgi.post("/api/generate", json={"model": "tiny", "prompt": "hi"}, headers=auth(key))
    assert response.status_code == 200  # the head went out before the fault
    records = [orjson.loads(line) for line in response.content.splitlines() if line]
    assert records[-1] == {"error": "The gateway failed unexpectedly; the error is logged under this request id."}
    row = await audit_row(admin, response.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == (500, "internal_error")


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_a_started_worker_keeps_its_startup_objects_out_of_the_collector_and_still_collects_new_garbage(
    gateway_env: dict[str, str], admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan freezes what start-up made (no full collection walks it again); requests
    are served, and cycles made afterwards are still collected."""
    key = await admin.key()
    try:
        async with lifespan(gateway_env, monkeypatch) as span:
            assert span.sent == [{"type": "lifespan.startup.complete"}]
            assert gc.get_freeze_count() > 10_000  # modules, classes, the worker's pools
            async with httpx.AsyncClient(transport=ASGITransport(span.app), base_url="http://gateway") as client:
                body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}
                assert (await client.post("/api/chat", json=body, headers=auth(key))).status_code == 200
            garbage = weakref.ref(_Cycle())
            gc.collect()
            assert garbage() is None
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert span.sent[-1] == {"type": "lifespan.shutdown.complete"}
