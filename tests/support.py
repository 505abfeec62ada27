"""Helpers the tests share: free ports, waiting for a URL, and running the real gateway.

The gateway always runs as its own process (`python -m neuronetz serve`, Granian and all)
and tests talk to it over loopback HTTP, exactly as clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from neuronetz import tenants
from neuronetz.limits import Limits

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status `url` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m neuronetz ARGS` from the checkout, with `env` over this process's environment
    less the variables in `unset`; NO_COLOR so that tables compare as plain text."""
    environ = {name: value for name, value in os.environ.items() if name not in unset}
    return subprocess.run(
        [sys.executable, "-m", "neuronetz", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**environ, "NO_COLOR": "1", **(env or {})},
    )  # fmt: skip


async def wait_until(condition: Callable[[], bool], within: float, what: str = "the condition") -> None:
    """Poll `condition` until it holds; fail after `within` seconds (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_for(
    url: str, status: int = 200, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        if http_status(url, timeout=1.0) == status:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s")


class GatewayProcess:
    """One `neuronetz serve` process with its own port and environment."""

    def __init__(self, env: Mapping[str, str], command: list[str] | None = None, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="neuronetz-gateway-", suffix=".log")[1])
        base = command or [sys.executable, "-m", "neuronetz"]
        self.args = [*base, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        self.env = {**os.environ, "GATEWAY_LOG_LEVEL": "info", **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        with self.log_path.open("wb") as log:
            # A session of its own, so kill() can take Granian's workers down with the main process.
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(self.url + "/healthz", timeout=timeout, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"the gateway did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and return the exit status (SIGKILL after `timeout`)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole process group: a crashed replica, with no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


class PrivateRedis:
    """A redis-server of the test's own on a free port, for tests that stop Redis. The
    shared Redis (other test runs use it at the same time) is never stopped."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="neuronetz-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        raise TimeoutError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def env_file(text: str) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="neuronetz-env-"))
    path = directory / ".env"
    path.write_text(text)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


METRICS_TOKEN = "test-metrics-token"


class Admin:
    """Tenants and keys for tests, made through the same functions the CLI uses."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def tenant(self, *, allow_cloud: bool = False, **limits: int | None) -> str:
        name = f"t-{secrets.token_hex(4)}"
        await tenants.create_tenant(self.pool, name, Limits(**limits), allow_cloud=allow_cloud)
        return name

    async def key(
        self,
        tenant: str | None = None,
        *,
        models: tuple[str, ...] | None = None,
        expires_at: dt.datetime | None = None,
        prompt_ttl_days: int | None = None,
        allow_cloud: bool | None = None,
        **limits: int | None,
    ) -> str:
        """A new key (of a new tenant unless one is named); returns the full key."""
        tenant = tenant or await self.tenant()
        _, key = await tenants.create_key(
            self.pool, tenant, f"k-{secrets.token_hex(4)}", expires_at=expires_at, models=models,
            prompt_ttl_days=prompt_ttl_days, limits=Limits(**limits), allow_cloud=allow_cloud,
        )  # fmt: skip
        return key

    async def tenant_of(self, key: str) -> str:
        return (await tenants.get_key(self.pool, key[:11])).tenant


async def audit_row(admin: Admin, request_id: str, within: float = 10.0) -> dict[str, Any]:
    """The request's audit row, once the writer (every second) has flushed it."""
    deadline = time.monotonic() + within
    while (row := await admin.pool.fetchrow("SELECT * FROM request_log WHERE request_id = $1", request_id)) is None:
        assert time.monotonic() < deadline, f"no audit row for {request_id}"
        await asyncio.sleep(0.05)
    return dict(row)


async def ledger(admin: Admin, key: str) -> int:
    usage = await admin.pool.fetchval(
        "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily u "
        "JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = $1",
        key[:11],
    )
    return int(usage)


async def ledger_settles(admin: Admin, key: str, expected: int) -> None:
    """Waits for the ledger (written every second) to reach `expected` tokens for `key`."""
    deadline = time.monotonic() + 5
    while (usage := await ledger(admin, key)) != expected:
        assert time.monotonic() < deadline, f"ledger has {usage} tokens, expected {expected}"
        await asyncio.sleep(0.1)


async def ready_budget(client: httpx.AsyncClient, url: str, key: str) -> None:
    """The first budgeted request of a tenant may meet a counter rebuild (503 for a moment)."""
    deadline = time.monotonic() + 10
    while True:
        body = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        response = await client.post(url + "/api/generate", headers=auth(key), json=body)
        if response.status_code != 503 or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    target = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(target + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def forwarded(emulator: Any, path: str | None = None) -> list[Any]:
    """What clients' requests the emulator received: without the gateway's own health checks."""
    return [r for r in emulator.requests(path) if "(health check)" not in (r.header("user-agent") or "")]


class TcpProxy:
    """A TCP forwarder the test controls, between the gateway and Postgres: `cut()` drops every
    connection and refuses new ones (Postgres "down" for the gateway only), `restore()` ends
    that. Runs its own event loop on a thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        self.writers -= {writer, upstream_writer}

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def _call(self, coroutine: Any) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def start(self) -> TcpProxy:
        self.thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
