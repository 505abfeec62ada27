"""Everything a test can observe or change, shared between the event loop and test threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from .config import Config
from .decoding import ApiError
from .faults import FaultBook
from .registry import DEFAULT_MODELS, ModelSpec, Registry
from .wire import Request


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as received. Header names keep their original case and order."""

    seq: int
    method: str
    path: str  # percent-decoded
    target: str  # raw request-target, query included
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    at: float  # time.time() on arrival
    monotonic: float  # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A client left before its response was complete; ``at`` is when the emulator noticed."""

    path: str
    model: str
    tokens_sent: int
    at: float  # time.time()
    monotonic: float  # time.monotonic(), comparable across processes on one host


@dataclass(frozen=True, slots=True)
class Stats:
    requests: int  # counted even when recording is off
    cancellations: int
    in_flight: int
    peak_in_flight: int
    generations: int = 0  # inference requests in the server, running or queued by num_parallel
    peak_generations: int = 0  # the most at once since the last reset: what a gateway sent it


class Slots:
    """``num_parallel`` generations at once, ``max_queue`` waiting, 503 beyond (``ErrMaxQueue``, §4).

    Lives on the event loop only, so it needs no lock.
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.active = 0  # every inference request inside, running or queued
        self.peak = 0

    @asynccontextmanager
    async def hold(self, config: Config) -> AsyncIterator[None]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            async with self._hold(config):
                yield
        finally:
            self.active -= 1

    @asynccontextmanager
    async def _hold(self, config: Config) -> AsyncIterator[None]:
        if config.num_parallel <= 0:
            yield
            return
        if self.running >= config.num_parallel or self.waiting:
            if len(self.waiting) >= config.max_queue:
                raise ApiError(503, "server busy, please try again.  maximum pending requests exceeded")
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.append(turn)
            try:
                await turn  # the releasing request hands its slot over directly
            except asyncio.CancelledError:  # the client left while queued (Ollama's 499)
                if turn.done() and not turn.cancelled():  # the slot was granted as we left: pass it on
                    self._release()
                elif turn in self.waiting:  # a release may already have skipped and dropped it
                    self.waiting.remove(turn)
                raise
        else:
            self.running += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1


class State:
    """Config, models, faults and records; every method is safe to call from any thread."""

    def __init__(self, config: Config | None = None, models: Iterable[ModelSpec] | None = None) -> None:
        self._initial = (config or Config(), tuple(DEFAULT_MODELS if models is None else models))
        self.config = self._initial[0]
        self.registry = Registry(self._initial[1])
        self.faults = FaultBook()
        self.slots = Slots()
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._cancellations: list[Cancellation] = []
        self._counts = {"requests": 0, "cancellations": 0, "in_flight": 0, "peak": 0}

    def configure(self, changes: Mapping[str, Any]) -> Config:
        with self._cond:
            self.config = self.config.replace(changes)
            return self.config

    def reset(self) -> None:
        """Back to the state at construction: config, models, no faults, no records, nothing loaded."""
        with self._cond:
            self.config = self._initial[0]
            self.registry.replace(self._initial[1])
            self.faults.clear()
            self._requests.clear()
            self._cancellations.clear()
            self._counts.update(requests=0, cancellations=0, peak=self._counts["in_flight"])
            self.slots.peak = self.slots.active

    def note_request(self, request: Request) -> None:
        with self._cond:
            self._counts["requests"] += 1
            if self.config.record:
                self._requests.append(
                    RecordedRequest(
                        self._counts["requests"],
                        request.method,
                        request.path,
                        request.target,
                        request.query,
                        tuple(request.headers),
                        request.body,
                        time.time(),
                        time.monotonic(),
                    )
                )

    def enter(self) -> None:
        with self._cond:
            self._counts["in_flight"] += 1
            self._counts["peak"] = max(self._counts["peak"], self._counts["in_flight"])

    def leave(self) -> None:
        with self._cond:
            self._counts["in_flight"] -= 1

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self._cond:
            return [r for r in self._requests if path is None or r.path == path]

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def note_cancellation(self, path: str, model: str, tokens_sent: int) -> None:
        with self._cond:
            self._cancellations.append(Cancellation(path, model, tokens_sent, time.time(), time.monotonic()))
            self._counts["cancellations"] += 1
            self._cond.notify_all()

    def wait_for_cancellations(self, count: int = 1, timeout: float = 1.0) -> list[Cancellation]:
        """Block until ``count`` cancellations are recorded or ``timeout`` passes; returns what there is."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._cancellations) >= count, timeout)
            return list(self._cancellations)

    def stats(self) -> Stats:
        with self._cond:
            c = self._counts
            return Stats(
                c["requests"], c["cancellations"], c["in_flight"], c["peak"], self.slots.active, self.slots.peak
            )
