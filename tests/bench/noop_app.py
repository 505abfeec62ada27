"""The gateway's ASGI app plus what only the benchmarks need; served by Granian, e.g.

    python -m granian --interface asgi --loop uvloop --http 1 --workers 1 tests.bench.noop_app:app

with the gateway's environment (DATABASE_URL, REDIS_URL, OLLAMA_BACKENDS, ...), which the
app reads in its lifespan as `neuronetz serve` does.

* `GET /bench/noop`: an authenticated route (not public) whose handler answers 200 `{}` —
  the whole pipeline of an authenticated request (path normalisation, routing, the key
  check, recording: metrics, log line, audit row) without the proxying. `/healthz` on the
  same server is the unauthenticated comparison.
* `NZBENCH_PROXY`: comma-separated what-if variants, for measuring a change end to end
  without editing neuronetz/ (nothing here is ever used by the gateway itself). The text
  variants load patched copies of neuronetz/proxy.py or neuronetz/app.py (see PATCHES):
    `transport`     `_exchange` calls `UpstreamTransport.handle_async_request` directly
                    instead of `httpx.AsyncClient.send`;
    `request`       `forward` builds `httpx.Request(...)` instead of `client.build_request(...)`;
    `lazywatch`     `_forward` starts its disconnect watcher only after 50 ms;
    `directsettle`  `inference` awaits a settlement without admission directly (no shield task);
    `onebody`       an ASGI wrapper that hands Granian a response with a Content-Length as one
                    `http.response.body` message instead of a chunk plus an empty last message.
* `NZBENCH_PROFILE=/path/file.prof`: cProfile the worker from lifespan startup to shutdown.
* `NZBENCH_TRACE=/path/file.json`: time the phases of every request (ASGI receive/send and
  the upstream transport call) and write their medians there at shutdown.
"""

from __future__ import annotations

import asyncio
import contextvars
import cProfile
import itertools
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from neuronetz.types import Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = frozenset(v.strip() for v in os.environ.get("NZBENCH_PROXY", "").split(",") if v.strip())
# Each text variant: (file, the exact text it replaces, the replacement). If the text moved,
# the harness refuses to start rather than silently measure the unpatched code.
PATCHES: dict[str, tuple[str, str, str]] = {
    "transport": (
        "neuronetz/proxy.py",
        "await client.send(outgoing, stream=True)",
        "await client._transport.handle_async_request(outgoing)",
    ),
    # httpx.Request takes build_request's arguments; it skips merging the client's defaults
    # (here: only the gateway's User-Agent, sent when the client sent none).
    "request": ("neuronetz/proxy.py", "outgoing = client.build_request(", "outgoing = httpx.Request("),
    # The disconnect watcher starts only if the exchange is still running after 50 ms.
    "lazywatch": ("neuronetz/app.py", "watcher = asyncio.create_task(watch())", "watcher = _bench_lazy_task(watch)"),
    # No task per request for a settlement without an admission (nothing to shield: it never suspends).
    "directsettle": (
        "neuronetz/app.py",
        "await asyncio.shield(gateway.limiter.settle(admission, key.subject, prompt, completion))",
        "await (gateway.limiter.settle(admission, key.subject, prompt, completion) if admission is None "
        "else asyncio.shield(gateway.limiter.settle(admission, key.subject, prompt, completion)))",
    ),
}
KNOWN_VARIANTS = frozenset({*PATCHES, "onebody"})
LAZY_WATCH_DELAY = 0.05


class _LazyTask:
    """Creates the task only after LAZY_WATCH_DELAY; cancel() before that costs one timer."""

    def __init__(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.task: asyncio.Task[None] | None = None
        self.factory = factory
        self.handle = asyncio.get_running_loop().call_later(LAZY_WATCH_DELAY, self._start)

    def _start(self) -> None:
        self.task = asyncio.create_task(self.factory())

    def cancel(self) -> None:
        self.handle.cancel()
        if self.task is not None:
            self.task.cancel()


def _load_patched(module_name: str, relative: str, changes: list[tuple[str, str]]) -> None:
    """Load a copy of `relative` with `changes` applied as `module_name`, before anything
    imports the real one."""
    if module_name in sys.modules:
        raise RuntimeError(f"{module_name} was imported before the patch could be applied")
    path = ROOT / relative
    source = path.read_text()
    for old, new in changes:
        if source.count(old) != 1:
            raise RuntimeError(f"{path} no longer contains {old!r} exactly once; update tests/bench/noop_app.py")
        source = source.replace(old, new)
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    module.__dict__["_bench_lazy_task"] = _LazyTask
    sys.modules[module_name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)


if VARIANTS - KNOWN_VARIANTS:
    raise RuntimeError(f"unknown NZBENCH_PROXY variants {sorted(VARIANTS - KNOWN_VARIANTS)}; known: {KNOWN_VARIANTS}")
for _relative in ("neuronetz/proxy.py", "neuronetz/app.py"):  # proxy first: app imports it
    _changes = [(old, new) for name, (where, old, new) in PATCHES.items() if name in VARIANTS and where == _relative]
    if _changes:
        _load_patched(_relative[:-3].replace("/", "."), _relative, _changes)

from neuronetz.app import GET, App  # noqa: E402  (after the optional patch, on purpose)
from neuronetz.http import Request, send_json  # noqa: E402
from neuronetz.router import Route, Router  # noqa: E402
from neuronetz.upstream import UpstreamTransport  # noqa: E402

TRACE_PATH = os.environ.get("NZBENCH_TRACE")
_trace: contextvars.ContextVar[list[tuple[str, float]] | None] = contextvars.ContextVar("nzbench_trace", default=None)
_traces: list[list[tuple[str, float]]] = []


def _mark(event: str) -> None:
    marks = _trace.get()
    if marks is not None:
        marks.append((event, time.perf_counter()))


def _traced_transport() -> None:
    original = UpstreamTransport.handle_async_request

    async def handle_async_request(self: UpstreamTransport, request: Any) -> Any:
        _mark("transport.enter")
        try:
            return await original(self, request)
        finally:
            _mark("transport.return")

    UpstreamTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]


def _traced_io(receive: Receive, send: Send) -> tuple[Receive, Send]:
    async def traced_receive() -> Message:
        _mark("receive.call")
        message = await receive()
        _mark(f"receive.{message['type']}")
        return message

    async def traced_send(message: Message) -> None:
        kind = message["type"].rsplit(".", 1)[1]
        if kind == "body":
            kind = "body.more" if message.get("more_body", False) else "body.last"
        _mark(f"send.{kind}.call")
        await send(message)
        _mark(f"send.{kind}.return")

    return traced_receive, traced_send


def _write_traces(path: str) -> None:
    """Per phase (from one mark to the next, first occurrences), the median in microseconds."""
    phases: dict[str, list[float]] = {}
    for marks in _traces:
        seen: dict[str, float] = {}
        for event, at in marks:
            seen.setdefault(event, at)
        ordered = sorted(seen.items(), key=lambda item: item[1])
        for (first, start), (second, end) in itertools.pairwise(ordered):
            phases.setdefault(f"{first} -> {second}", []).append((end - start) * 1e6)
        if ordered:
            phases.setdefault("total", []).append((ordered[-1][1] - ordered[0][1]) * 1e6)
    summary = {name: {"n": len(v), "median_us": statistics.median(v)} for name, v in phases.items()}
    Path(f"{path}.{os.getpid()}").write_text(json.dumps(summary, indent=1))


if TRACE_PATH:
    _traced_transport()


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
        if scope["type"] == "http" and TRACE_PATH:
            marks: list[tuple[str, float]] = [("app.call", time.perf_counter())]
            _trace.set(marks)
            receive, send = _traced_io(receive, send)
            try:
                await super().__call__(scope, receive, send)
            finally:
                _mark("app.return")
                _traces.append(marks)
            return
        if scope["type"] == "lifespan" and TRACE_PATH:
            await super().__call__(scope, receive, send)
            _write_traces(TRACE_PATH)
            return
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
