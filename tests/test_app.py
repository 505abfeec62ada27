"""The application over real HTTP: health, readiness, errors, request ids and shutdown."""

from __future__ import annotations

import httpx

from tests.emulator import Emulator
from tests.support import GatewayProcess, PrivateRedis, free_port


def test_healthz_is_ok_with_a_request_id(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert len(response.headers["x-request-id"]) == 24


def test_a_sane_request_id_is_echoed(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


def test_readyz_is_ready_when_every_dependency_answers(gateway: GatewayProcess, emulator: Emulator) -> None:
    response = httpx.get(gateway.url + "/readyz")
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
        response = httpx.get(process.url + "/readyz", timeout=5)
        assert response.status_code == 503
        body = response.json()
        assert body["postgres"]["ok"] is False
        assert body["backends"]["ok"] is False
        assert body["redis"] == {"ok": True}
        assert "secret-pw" not in response.text


def test_readyz_is_503_without_backends(gateway_env: dict[str, str]) -> None:
    env = {**gateway_env, "OLLAMA_BACKENDS": ""}
    with GatewayProcess(env) as process:
        response = httpx.get(process.url + "/readyz")
        assert response.status_code == 503
        assert response.json()["backends"] == {
            "ok": False,
            "error": "no backend is configured (OLLAMA_BACKENDS is empty)",
        }


def test_sigterm_stops_the_server_with_exit_status_zero(gateway_env: dict[str, str]) -> None:
    process = GatewayProcess(gateway_env).start()
    assert process.stop() == 0
    assert "Granian shutdown completed" in process.log()
