"""One client connection: parsing, keep-alive, pipelining, writing, and noticing the client leave.

Ollama cancels generation the moment the request context ends: gin's ``Stream``
watches ``CloseNotify`` and net/http's background read turns EOF into that
signal (§9.11). Here ``eof_received``/``connection_lost`` play that part: they
record the cancellation and cancel the handler task at once, without waiting
for the next token write to fail, so tests can time the gateway's propagation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from .wire import LAST_CHUNK, ParseError, Request, RequestParser, chunk, reason_phrase, response_head

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("tests.emulator")

Dispatch = Callable[["Exchange"], Awaitable[None]]


class Exchange:
    """One request and the means to answer it: whole, as a chunked stream, or by dropping the socket."""

    __slots__ = (
        "_conn",
        "chunked",
        "finished",
        "model",
        "request",
        "started",
        "state",
        "tokens_sent",
        "v1",
    )

    def __init__(self, conn: Connection, request: Request) -> None:
        self._conn = conn
        self.request = request
        self.state: State = conn.state
        self.model = ""  # set once known, for cancellation records
        self.tokens_sent = 0
        self.v1 = request.path.startswith("/v1/")
        self.started = False  # status line written
        self.finished = False  # response complete (or deliberately dropped)
        self.chunked = request.version != "HTTP/1.0"

    def respond(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        """A complete response with Content-Length; HEAD gets the headers only."""
        fields = []
        if content_type is not None:
            fields.append(("Content-Type", content_type))
        fields.append(("Content-Length", str(len(body))))
        if not self.request.keep_alive:
            fields.append(("Connection", "close"))
        payload = b"" if self.request.method == "HEAD" else body
        self.started = self.finished = True
        self._conn.write(response_head(status, fields) + payload)

    def start(self, status: int, content_type: str) -> None:
        """Status line and headers of a streamed body; chunked, or close-delimited for HTTP/1.0."""
        fields = [("Content-Type", content_type)]
        if self.chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        if not self.request.keep_alive or not self.chunked:
            fields.append(("Connection", "close"))
            self.request.keep_alive = False
        self.started = True
        self._conn.write(response_head(status, fields))

    def send(self, data: bytes) -> None:
        """One piece of a started stream, written to the socket immediately (Ollama flushes per line)."""
        self._conn.write(chunk(data) if self.chunked else data)

    def end(self) -> None:
        self.finished = True
        if self.chunked:
            self._conn.write(LAST_CHUNK)

    def drop(self) -> None:
        """Abort the TCP connection: no terminating chunk, no close handshake (an RST)."""
        self.finished = True
        self._conn.abort()

    async def drain(self) -> None:
        """Wait while the socket's buffer is over its high-water mark (slow readers)."""
        waiter = self._conn.writable
        if waiter is not None:
            await waiter

    async def hold(self) -> None:
        """Never return: the handler task is cancelled when the client goes away."""
        await asyncio.get_running_loop().create_future()


class Connection(asyncio.Protocol):
    def __init__(self, state: State, dispatch: Dispatch, connections: set[Connection]) -> None:
        self.state = state
        self._dispatch = dispatch
        self._connections = connections
        self._parser = RequestParser()
        self._queue: deque[Request] = deque()
        self._transport: asyncio.Transport | None = None
        self._current: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            requests = self._parser.feed(data)
        except ParseError as exc:
            # net/http answers unparseable requests itself, byte for byte like this, and hangs up.
            text = f"{exc.status} {reason_phrase(exc.status)}" + ("" if exc.status == 431 else f": {exc}")
            self.write(
                f"HTTP/1.0 {text.partition(':')[0]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Connection: close\r\n\r\n{text}".encode()
            )
            self.close()
            return
        self._queue.extend(requests)
        if self._current is None:
            self._next()

    def eof_received(self) -> bool:
        self._client_left()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_left()
        self._connections.discard(self)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self.lost and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.lost = True  # our own doing: not a cancellation
        if self._transport is not None:
            self._transport.abort()

    def _client_left(self) -> None:
        if self.lost:
            return
        self.lost = True
        current = self._current
        if current is not None and not current.finished:
            self.state.note_cancellation(current.request.path, current.model, current.tokens_sent)
            if self._task is not None:
                self._task.cancel()

    def _next(self) -> None:
        if self.lost or not self._queue:
            self._current = None
            return
        exchange = Exchange(self, self._queue.popleft())
        self._current = exchange
        self._task = asyncio.get_running_loop().create_task(self._serve(exchange))

    async def _serve(self, exchange: Exchange) -> None:
        try:
            await self._dispatch(exchange)
        except asyncio.CancelledError:
            return  # the client left; _client_left has recorded it
        except Exception:
            log.exception("emulator handler failed on %s %s", exchange.request.method, exchange.request.path)
            if exchange.started:
                exchange.drop()
            else:
                exchange.respond(500, b'{"error":"emulator bug, see log"}', "application/json; charset=utf-8")
        self._task = None
        if not exchange.request.keep_alive:
            self.close()
            self._current = None
        else:
            self._next()
