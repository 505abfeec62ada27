"""The application over real HTTP: health, readiness, errors, request ids and shutdown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.support import GatewayProcess, PrivateRedis, free_port


class _VersionOnly(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"version":"0.33.0"}'
        self.send_response(200 if self.path == "/api/version" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VersionOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gateway(database_url: str, redis_url: str, backend: str) -> Iterator[GatewayProcess]:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OLLAMA_BACKENDS": backend}
    with GatewayProcess(env) as process:
        yield process


def test_healthz_is_ok_with_a_request_id(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert len(response.headers["x-request-id"]) == 24


def test_a_sane_request_id_is_echoed(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.url + "/healthz", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


def test_readyz_is_ready_when_every_dependency_answers(gateway: GatewayProcess, backend: str) -> None:
    response = httpx.get(gateway.url + "/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["postgres"] == {"ok": True}
    assert body["redis"] == {"ok": True}
    assert body["backends"] == {"ok": True, "each": {backend: {"ok": True}}}


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


def test_readyz_names_redis_when_it_is_down(database_url: str, backend: str) -> None:
    with PrivateRedis() as private:
        env = {"DATABASE_URL": database_url, "REDIS_URL": private.url, "OLLAMA_BACKENDS": backend}
        with GatewayProcess(env) as process:
            assert httpx.get(process.url + "/readyz").status_code == 200
            private.stop()
            response = httpx.get(process.url + "/readyz")
            assert response.status_code == 503
            body = response.json()
            assert body["redis"]["ok"] is False
            assert body["postgres"] == {"ok": True}
            assert private.url not in response.text


def test_readyz_names_postgres_and_backends_when_they_are_down(database_url: str, redis_url: str) -> None:
    closed = free_port()
    env = {
        "DATABASE_URL": f"postgresql://nobody:secret-pw@127.0.0.1:{closed}/x",
        "REDIS_URL": redis_url,
        "OLLAMA_BACKENDS": f"http://127.0.0.1:{closed}",
        "GATEWAY_MIGRATE_ON_START": "false",
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


def test_readyz_is_503_without_backends(database_url: str, redis_url: str) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OLLAMA_BACKENDS": ""}
    with GatewayProcess(env) as process:
        response = httpx.get(process.url + "/readyz")
        assert response.status_code == 503
        assert response.json()["backends"] == {
            "ok": False,
            "error": "no backend is configured (OLLAMA_BACKENDS is empty)",
        }


def test_sigterm_stops_the_server_with_exit_status_zero(database_url: str, redis_url: str, backend: str) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OLLAMA_BACKENDS": backend}
    process = GatewayProcess(env).start()
    assert process.stop() == 0
    assert "Granian shutdown completed" in process.log()
