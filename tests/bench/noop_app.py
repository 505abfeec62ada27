"""The gateway's ASGI app plus what only the benchmarks need; served by Granian, e.g.

    python -m granian --interface asgi --loop uvloop --http 1 --workers 1 tests.bench.noop_app:app

with the gateway's environment (DATABASE_URL, REDIS_URL, OLLAMA_BACKENDS, ...), which the
app reads in its lifespan as `neuronetz serve` does.

* `GET /bench/noop`: an authenticated route (not public) whose handler answers 200 `{}` —
  the whole pipeline of an authenticated request (path normalisation, routing, the key
  check, recording: metrics, log line, audit row) without the proxying. `/healthz` on the
  same server is the unauthenticated comparison.
* `NZBENCH_PROXY`: comma-separated what-if variants, for measuring a change end to end
  without editing neuronetz/ (nothing here is ever used by the gateway itself):
    `transport`  a patched copy of neuronetz/proxy.py whose `_exchange` calls
                 `UpstreamTransport.handle_async_request` directly instead of
                 `httpx.AsyncClient.send` (the request is still built by `build_request`);
    `onebody`    an ASGI wrapper that hands Granian a response with a Content-Length as one
                 `http.response.body` message instead of a chunk plus an empty last message.
* `NZBENCH_PROFILE=/path/file.prof`: cProfile the worker from lifespan startup to shutdown.
"""

from __future__ import annotations

import cProfile
import os
import sys
import types
from pathlib import Path
from typing import Any

from neuronetz.types import Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = frozenset(v.strip() for v in os.environ.get("NZBENCH_PROXY", "").split(",") if v.strip())
KNOWN_VARIANTS = frozenset({"transport", "onebody"})
# The one line the `transport` variant changes in neuronetz/proxy.py; if it moved, say so.
CLIENT_SEND = "await client.send(outgoing, stream=True)"
TRANSPORT_SEND = "await client._transport.handle_async_request(outgoing)"


def _patched_proxy() -> None:
    """Load a copy of neuronetz/proxy.py with CLIENT_SEND replaced, as `neuronetz.proxy`,
    before anything imports the real one."""
    if "neuronetz.proxy" in sys.modules:
        raise RuntimeError("neuronetz.proxy was imported before the patch could be applied")
    path = ROOT / "neuronetz" / "proxy.py"
    source = path.read_text()
    if source.count(CLIENT_SEND) != 1:
        raise RuntimeError(f"{path} no longer contains {CLIENT_SEND!r} exactly once; update the harness")
    module = types.ModuleType("neuronetz.proxy")
    module.__file__ = str(path)
    sys.modules["neuronetz.proxy"] = module
    exec(compile(source.replace(CLIENT_SEND, TRANSPORT_SEND), str(path), "exec"), module.__dict__)


if VARIANTS - KNOWN_VARIANTS:
    raise RuntimeError(f"unknown NZBENCH_PROXY variants {sorted(VARIANTS - KNOWN_VARIANTS)}; known: {KNOWN_VARIANTS}")
if "transport" in VARIANTS:
    _patched_proxy()

from neuronetz.app import GET, App  # noqa: E402  (after the optional patch, on purpose)
from neuronetz.http import Request, send_json  # noqa: E402
from neuronetz.router import Route, Router  # noqa: E402


async def noop(request: Request, send: Send, exchange: Any) -> None:
    exchange.status = 200
    await send_json(send, request, 200, {})


def _one_body(send: Send) -> Send:
    """Collect the body of a response that declared its Content-Length and send it as one
    message (what the `onebody` variant would make proxy.py do for whole answers)."""
    parts: list[bytes] = []
    collecting = False

    async def wrapped(message: Message) -> None:
        nonlocal collecting
        kind = message["type"]
        if kind == "http.response.start":
            collecting = any(name == b"content-length" for name, _ in message.get("headers", ()))
        elif kind == "http.response.body" and collecting:
            body = message.get("body", b"")
            if message.get("more_body", False):
                if body:
                    parts.append(body)
                return
            if parts:
                parts.append(body)
                message = {"type": "http.response.body", "body": b"".join(parts), "more_body": False}
                parts.clear()
        await send(message)

    return wrapped


class BenchApp(App):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router([*self.router.routes, Route("/bench/noop", GET, noop, public=False)])
        self.profile_path = os.environ.get("NZBENCH_PROFILE")
        self.profiler: cProfile.Profile | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "onebody" in VARIANTS:
            send = _one_body(send)
        await super().__call__(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        if not self.profile_path:
            await super().lifespan(receive, send)
            return

        async def send_and_profile(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.profiler = cProfile.Profile()
                self.profiler.enable()
            elif message["type"] == "lifespan.shutdown.complete" and self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(f"{self.profile_path}.{os.getpid()}")
            await send(message)

        async def receive_and_stop(  # stop profiling before the shutdown work
        ) -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(f"{self.profile_path}.{os.getpid()}")
                self.profiler = None
            return message

        await super().lifespan(receive_and_stop, send_and_profile)


app = BenchApp()
