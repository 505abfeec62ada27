"""The fast tier: the gateway in the test process, driven through its ASGI callable.

No Granian and no sockets between the test and the application, but everything behind it is
real: `open_worker` builds the same `Worker` a worker builds (Postgres, Redis, the backends,
the background tasks). `ASGITransport` plugs the application into an `httpx.AsyncClient`, so a
test reads the same as one against a `GatewayProcess`. Like Starlette's TestClient it builds
the scope, feeds the request body through `receive` and collects what the application sends;
after the answer, `receive` reports the client gone, as a server does.

Use it for what does not depend on the server in front of the application: routing, errors
and their dialects, authentication, limits, model checks. Framing, timeouts, disconnects and
signals need a real server (tests/support.py's GatewayProcess).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from neuronetz import config
from neuronetz.app import App
from neuronetz.worker import Worker
from tests.support import wait_until


@asynccontextmanager
async def open_worker(environ: Mapping[str, str]) -> AsyncIterator[Worker]:
    """A started Worker for `environ`, closed at the end; the signal handlers it installs
    (to drain on SIGTERM) are put back, so they never outlive the test."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = await Worker.open(config.load(None, environ=dict(environ)))
        try:
            yield worker
        finally:
            await worker.close()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@asynccontextmanager
async def in_process(environ: Mapping[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose requests go straight into an App serving a Worker for `environ`."""
    async with open_worker(environ) as worker:
        application = App()
        application.attach(worker)
        transport = ASGITransport(application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


class Lifespan:
    """An App driven through its lifespan as Granian drives it: the startup, requests, and
    the shutdown when the test says so (`stop`, which may come while requests still run)."""

    def __init__(self) -> None:
        self.app = App()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[MutableMapping[str, Any]] = []  # what the lifespan answered
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    async def start(self, within: float = 30.0) -> None:
        await self.events.put({"type": "lifespan.startup"})
        task = self.task = asyncio.create_task(self.app({"type": "lifespan"}, self.events.get, self._send))
        await wait_until(lambda: bool(self.sent) or task.done(), within, "the lifespan's startup")

    async def stop(self, within: float = 30.0) -> None:
        if not self.stopping:
            self.stopping = True
            await self.events.put({"type": "lifespan.shutdown"})
        if self.task is not None:
            await asyncio.wait_for(self.task, within)


@asynccontextmanager
async def lifespan(environ: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lifespan]:
    """An App started through its lifespan with `environ` as its environment (a worker reads
    its settings from there), stopped at the end if the test did not stop it."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    span = Lifespan()
    try:
        await span.start()
        yield span
    finally:
        await span.stop()


class ASGITransport(httpx.AsyncBaseTransport):
    """Send each request to `app` as one ASGI `http` call; the answer is collected whole."""

    def __init__(self, app: Any, client: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.app = app
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        raw_path = request.url.raw_path.split(b"?", 1)[0]
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": request.url.query,
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "client": self.client,
            "server": ("gateway", 80),
        }
        answered = asyncio.Event()
        body_sent = False
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert not start, "the response started twice"
                start.update(message)
            elif message["type"] == "http.response.body":
                assert start, "a body before the response started"
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            await self.app(scope, receive, send)
        finally:
            answered.set()
        assert start, "the application answered nothing"
        return httpx.Response(start["status"], headers=start.get("headers", []), content=b"".join(chunks))
