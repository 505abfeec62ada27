"""The gateway's ASGI app plus what only the benchmarks need; served by Granian, e.g.

    python -m granian --interface asgi --loop uvloop --http 1 --workers 1 tests.bench.noop_app:app

with the gateway's environment (DATABASE_URL, REDIS_URL, OLLAMA_BACKENDS, ...), which the
app reads in its lifespan as `neuronetz serve` does.

* `GET /bench/noop`: an authenticated route (not public) whose handler answers 200 `{}` —
  the whole pipeline of an authenticated request (path normalisation, routing, the key
  check, recording: metrics, log line, audit row) without the proxying. `/healthz` on the
  same server is the unauthenticated comparison.
* `NZBENCH_PROXY`: comma-separated diagnostics, for pricing a part of the pipeline end to
  end without editing neuronetz/ (nothing here is ever used by the gateway itself): they
  load a patched copy of neuronetz/app.py (see PATCHES):
    `norecord`  skip `App._record` (metrics, log line, audit row);
    `noaudit`   skip only its audit row.
* `NZBENCH_PROFILE=/path/file.prof`: cProfile the worker from lifespan startup to shutdown.
* `NZBENCH_TRACE=/path/file.json`: time the phases of every request (ASGI receive/send and
  the backend transport call; wall time and the event-loop thread's CPU time) and write
  their medians to `<path>.<pid>` at shutdown. It keeps every request's marks in memory:
  for probes of a few seconds, not for long runs.
"""

from __future__ import annotations

import contextvars
import cProfile
import itertools
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

from neuronetz.types import Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = frozenset(v.strip() for v in os.environ.get("NZBENCH_PROXY", "").split(",") if v.strip())
# Each text variant: (file, the exact text it replaces, the replacement). If the text moved,
# the harness refuses to start rather than silently measure the unpatched code.
PATCHES: dict[str, tuple[str, str, str]] = {
    # Diagnostics only (they drop required behaviour): price the recording of a request.
    "norecord": ("neuronetz/app.py", "self._record(request, route, exchange)", "pass"),
    "noaudit": ("neuronetz/app.py", "worker.audit.submit(record, prompt)", "pass"),
}


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
    sys.modules[module_name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)


if VARIANTS - set(PATCHES):
    raise RuntimeError(f"unknown NZBENCH_PROXY variants {sorted(VARIANTS - set(PATCHES))}; known: {sorted(PATCHES)}")
for _relative in ("neuronetz/app.py",):
    _changes = [(old, new) for name, (where, old, new) in PATCHES.items() if name in VARIANTS and where == _relative]
    if _changes:
        _load_patched(_relative[:-3].replace("/", "."), _relative, _changes)

from neuronetz.app import GET, App  # noqa: E402  (after the optional patch, on purpose)
from neuronetz.http import Request, send_json  # noqa: E402
from neuronetz.router import Route, Router  # noqa: E402
from neuronetz.transport import Transport  # noqa: E402

TRACE_PATH = os.environ.get("NZBENCH_TRACE")
Marks = list[tuple[str, float, float]]  # event, wall (perf_counter), this thread's CPU (thread_time)
_trace: contextvars.ContextVar[Marks | None] = contextvars.ContextVar("nzbench_trace", default=None)
_traces: list[Marks] = []


def _mark(event: str) -> None:
    marks = _trace.get()
    if marks is not None:
        marks.append((event, time.perf_counter(), time.thread_time()))


def _traced_transport() -> None:
    original = Transport.handle_async_request

    async def handle_async_request(self: Transport, request: Any) -> Any:
        _mark("transport.enter")
        try:
            return await original(self, request)
        finally:
            _mark("transport.return")

    Transport.handle_async_request = handle_async_request  # type: ignore[method-assign]


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
    """Per phase (from one mark to the next, first occurrences), the median wall time and the
    median CPU time of the event-loop thread, in microseconds."""
    phases: dict[str, list[tuple[float, float]]] = {}
    for marks in _traces:
        seen: dict[str, tuple[float, float]] = {}
        for event, wall, cpu in marks:
            seen.setdefault(event, (wall, cpu))
        ordered = sorted(seen.items(), key=lambda item: item[1][0])
        for (first, start), (second, end) in itertools.pairwise(ordered):
            phases.setdefault(f"{first} -> {second}", []).append((end[0] - start[0], end[1] - start[1]))
        if ordered:
            first_mark, last_mark = ordered[0][1], ordered[-1][1]
            phases.setdefault("total", []).append((last_mark[0] - first_mark[0], last_mark[1] - first_mark[1]))
    summary = {
        name: {
            "n": len(values),
            "median_wall_us": statistics.median(v[0] for v in values) * 1e6,
            "median_cpu_us": statistics.median(v[1] for v in values) * 1e6,
        }
        for name, values in phases.items()
    }
    Path(f"{path}.{os.getpid()}").write_text(json.dumps(summary, indent=1))


if TRACE_PATH:
    _traced_transport()


async def noop(request: Request, send: Send, exchange: Any) -> None:
    exchange.status = 200
    await send_json(send, request, 200, {})


class BenchApp(App):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router([*self.router.routes, Route("/bench/noop", GET, noop, public=False)])
        self.profile_path = os.environ.get("NZBENCH_PROFILE")
        self.profiler: cProfile.Profile | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and TRACE_PATH:
            marks: Marks = [("app.call", time.perf_counter(), time.thread_time())]
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
