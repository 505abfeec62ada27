"""The backend transport: a keep-alive pool of HTTP/1.1 connections to the Ollama backends.

`Transport` plugs into `httpx.AsyncClient(transport=...)`. It exists because httpx's
default transport (httpcore over anyio) costs more CPU per request than the gateway's latency
budget allows (the README's architecture section has the figures; `python3 build.py bench
transport` measures them). The bytes on each socket are `h1.py`'s business; this module
decides which socket a request uses, when a request is retried and when a socket is closed.

* A pool per origin (scheme, host, port). `max_connections` and `max_keepalive` count per origin,
  because each backend has its own capacity and one slow backend must not starve the others.
  Waiting for a connection is first-come first-served and bounded by the pool timeout.
* A connection goes back to the pool only after its body was read to the end and neither side
  said `Connection: close`. `aclose()` on an unfinished body aborts the socket at once: that is
  how the gateway stops generation on the backend when its own client disconnects.
* Timeouts come from httpx's `request.extensions["timeout"]`; the wait for the final response
  head may be longer (`request.extensions["first_byte_timeout"]`), as a model loads before it
  answers. That wait bounds the whole head, interim 1xx responses included.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from functools import partial
from typing import NamedTuple

import httpx

from neuronetz import h1

# Below this size head and body go out in one write (one segment); above it, joining would copy the body.
_COALESCE_LIMIT = 64 * 1024
_NO_TIMEOUTS: dict[str, float | None] = {}
_EMPTY = httpx.ByteStream(b"")


class _StaleConnection(Exception):
    """A reused connection ended before a single response byte: the request may go out again."""


class _Origin:
    """The connections to one (scheme, host, port): idle ones oldest first, plus counters."""

    __slots__ = ("active", "host", "idle", "name", "port", "ssl", "waiters")

    def __init__(self, scheme: str, host: str, port: int, context: ssl.SSLContext | None) -> None:
        self.name = f"{scheme}://{host}:{port}"
        self.host = host
        self.port = port
        self.ssl = context
        self.idle: deque[h1.Connection] = deque()
        self.active = 0
        self.waiters: deque[asyncio.Future[h1.Connection | None]] = deque()


class _ResponseBody(httpx.AsyncByteStream):
    """The body as it arrives: each chunk is yielded as soon as the socket delivers it."""

    def __init__(
        self,
        pool: Transport,
        origin: _Origin,
        conn: h1.Connection,
        head: h1.ResponseHead,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._head = head
        self._timeout = timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._conn.read_body(self._head, self._timeout, self._pool.max_head_size):
                yield data
        except BaseException:
            self._abandon()
            raise
        self._finish(self._head.keep_alive)

    async def aclose(self) -> None:
        # An unfinished body is not drained: an LLM stream may run for minutes, and the server
        # must see the EOF now to stop generating.
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._conn.abort()
            self._finish(False)

    def _finish(self, reuse: bool) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._origin, self._conn, reuse)


class Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to the backends, with a keep-alive pool per origin.

    max_connections: open connections per origin, idle ones included; more requests wait.
    max_keepalive: idle connections kept per origin; a finished one beyond this is closed.
    keepalive_expiry: seconds an idle connection is trusted; keep it below the backend's own idle timeout.
    max_head_size: bytes allowed in a response head, and separately in a chunked body's trailers.
    ssl_context: for https origins; the system default context if None.

    The defaults keep as many idle connections as may be open: a pool that closes what it just
    used churns connections under bursts.
    """

    def __init__(
        self,
        *,
        max_connections: int = 256,
        max_keepalive: int = 256,
        keepalive_expiry: float = 5.0,
        max_head_size: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1 or max_keepalive < 0 or keepalive_expiry < 0 or max_head_size < 64:
            raise ValueError(
                "max_connections must be at least 1, max_keepalive and keepalive_expiry at least 0, "
                "and max_head_size at least 64 bytes."
            )
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.max_head_size = max_head_size
        self._ssl_context = ssl_context
        self._origins: dict[tuple[bytes, bytes, int | None], _Origin] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("The backend transport is closed.")
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        origin = self._origins.get(key) or self._add_origin(key)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", _NO_TIMEOUTS)
        out = await _encode_request(request, timeouts.get("read"))
        conn = await self._acquire(origin, timeouts.get("pool"))
        try:
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            try:
                head = await self._exchange(conn, out, timeouts, retry=conn.reused)
            except _StaleConnection:
                # Retried once, on a fresh connection: a reused connection that ended (FIN or reset,
                # found before, during or after writing the request) before a single response byte,
                # when the body is bytes we still hold. That is a server closing an idle keep-alive
                # connection while our request crossed its FIN: it read nothing. A server that reads
                # a request and then dies without a byte of answer looks the same on the wire, so such
                # a request may run twice; that is the remaining ambiguity. Never retried: anything on
                # a fresh connection, anything after the first response byte, and the retry itself.
                conn.abort()
                conn = await self._connect(origin, timeouts.get("connect"))
                head = await self._exchange(conn, out, timeouts, retry=False)
        except BaseException:
            if conn is not None:
                conn.abort()
            self._release(origin, None, reuse=False)
            raise
        if head.framing is h1.Framing.NONE:
            self._release(origin, conn, head.keep_alive)
            stream: httpx.AsyncByteStream = _EMPTY
        else:
            stream = _ResponseBody(self, origin, conn, head, timeouts.get("read"))
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=stream,
            extensions={"http_version": head.version, "reason_phrase": head.reason},
            request=request,
        )

    async def aclose(self) -> None:
        """Close the idle connections; exchanges in flight close theirs when they finish."""
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
            while origin.waiters:
                waiter = origin.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(RuntimeError("The backend transport was closed."))

    def _add_origin(self, key: tuple[bytes, bytes, int | None]) -> _Origin:
        scheme, host, port = key
        if scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            origin = _Origin("https", host.decode("ascii"), port or 443, self._ssl_context)
        elif scheme == b"http":
            origin = _Origin("http", host.decode("ascii"), port or 80, None)
        else:
            raise httpx.UnsupportedProtocol(f"The backend transport speaks http and https, not {scheme!r}.")
        self._origins[key] = origin
        return origin

    async def _acquire(self, origin: _Origin, seconds: float | None) -> h1.Connection | None:
        """An idle connection, or None when the caller may open one; either way a slot is taken."""
        idle = origin.idle
        while idle:
            conn = idle.pop()
            if conn.eof or conn.loop.time() - conn.idle_since > self.keepalive_expiry:
                conn.close()
                continue
            conn.idle = False
            origin.active += 1
            return conn
        if origin.active < self.max_connections:
            origin.active += 1
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[h1.Connection | None] = loop.create_future()
        origin.waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                handed = await waiter
        except BaseException as exc:
            if waiter in origin.waiters:
                origin.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Cancelled after _release handed us its slot: give the slot back.
                self._release(origin, waiter.result(), reuse=True)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(
                    f"No free connection to {origin.name} within {seconds} s ({self.max_connections} in use)."
                ) from None
            raise
        if handed is not None:
            handed.idle = False
        return handed

    def _release(self, origin: _Origin, conn: h1.Connection | None, reuse: bool) -> None:
        """Give back a slot taken by _acquire: to the next waiter, to the idle pool, or free it."""
        if conn is not None:
            # Bytes beyond the response mean we lost track of the framing; never reuse then.
            if reuse and not conn.eof and not conn.buffer and not self._closed:
                conn.reused = conn.idle = True
                while origin.waiters:
                    waiter = origin.waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(conn)
                        return
                if len(origin.idle) < self.max_keepalive:
                    conn.idle_since = now = conn.loop.time()
                    origin.idle.append(conn)
                    origin.active -= 1
                    # The oldest connections sit at the front; drop the expired ones while we are here.
                    while now - origin.idle[0].idle_since > self.keepalive_expiry:
                        origin.idle.popleft().close()
                    return
            conn.close()
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        origin.active -= 1

    async def _connect(self, origin: _Origin, seconds: float | None) -> h1.Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    partial(h1.Connection, loop), origin.host, origin.port, ssl=origin.ssl
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"Connecting to {origin.name} took longer than {seconds} s.") from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror) and TLS handshake (SSLError) alike
            raise httpx.ConnectError(f"Cannot connect to {origin.name}: {exc}") from exc
        return conn

    async def _exchange(
        self, conn: h1.Connection, out: _Outgoing, timeouts: dict[str, float | None], retry: bool
    ) -> h1.ResponseHead:
        """Send the request and read up to the final response head; the body stays in the buffer."""
        if conn.eof:
            # A pooled connection can die between _acquire and here; a fresh one was accepted and
            # closed at once (as a TCP balancer without a healthy backend does). Nothing was sent.
            if retry:
                raise _StaleConnection()
            raise httpx.ConnectError(f"The backend closed the connection before the request was sent: {conn.error!r}")
        for data in out.writes:
            conn.transport.write(data)
        write_failed: httpx.WriteError | None = None
        try:
            await conn.drain(timeouts.get("write"))
        except httpx.WriteError as exc:
            if not conn.buffer:
                if retry:
                    raise _StaleConnection() from None
                raise
            # The server answered before reading the whole request (a 413 or 401 for a large
            # body) and closed: its answer says more than our broken pipe, so read it, as httpcore
            # does. The connection cannot carry another exchange.
            write_failed = exc
        read_timeout = timeouts.get("read")
        try:
            head = await conn.read_response_head(
                out.head_request, out.first_byte_timeout, read_timeout, self.max_head_size
            )
        except httpx.TransportError:
            if write_failed is not None:
                raise write_failed from None
            raise
        if head is None:
            if retry:
                raise _StaleConnection()
            raise conn.ended("without sending a response")
        return head._replace(keep_alive=False) if out.framing.close or write_failed else head


class _Outgoing(NamedTuple):
    writes: tuple[bytes, ...]  # head and body: one segment, or two when joining would copy a large body
    framing: h1.RequestFraming
    head_request: bool
    first_byte_timeout: float | None


async def _encode_request(request: httpx.Request, read_timeout: float | None) -> _Outgoing:
    headers = request.headers.raw
    framing = h1.scan_request_headers(headers)
    # A streamed body is read whole first: then its size is checked against Content-Length before
    # a byte is sent, and it can be sent again on a retry. The gateway sends bodies it holds anyway.
    body = await request.aread()
    if framing.chunked:
        payload = (h1.encode_chunk(body) if body else b"") + h1.LAST_CHUNK
    else:
        payload = body
        if framing.length is None and body:  # httpx sets it for `content=`, but not for a bare Request
            headers = [*headers, (b"Content-Length", b"%d" % len(body))]
        elif framing.length not in (None, len(body)):
            raise httpx.LocalProtocolError(f"The body is {len(body)} bytes, its Content-Length {framing.length}.")
    head = h1.encode_request_head(request.method.encode("ascii"), request.url.raw_path, headers)
    # A small body rides in the head's segment; joining a large one would only copy it.
    writes = (head + payload,) if len(payload) <= _COALESCE_LIMIT else (head, payload)
    first_byte_timeout = request.extensions.get("first_byte_timeout", read_timeout)
    return _Outgoing(writes, framing, request.method == "HEAD", first_byte_timeout)
