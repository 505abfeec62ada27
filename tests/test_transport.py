"""Transport against small raw asyncio servers, driven through httpx.AsyncClient as the gateway does.

Each test starts an `Upstream` whose handler writes exact bytes, so framing, reuse, retries,
timeouts and errors are checked on the wire: the server counts the connections it accepted and
records every request it read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronetz.transport import Transport
from tests.support import Admin, GatewayProcess, auth, wait_for

pytestmark = pytest.mark.timeout(60)


class PoolStats(NamedTuple):
    idle: int  # open connections waiting in the pool
    active: int  # connections carrying an exchange, or being opened for one
    waiting: int  # requests queued for a free connection


def stats(transport: Transport) -> PoolStats:
    """The pool's bookkeeping, read from its private state: every slot taken must be given back."""
    origins = transport._origins.values()
    return PoolStats(
        idle=sum(len(origin.idle) for origin in origins),
        active=sum(origin.active for origin in origins),
        waiting=sum(len(origin.waiters) for origin in origins),
    )


IDLE = PoolStats(idle=1, active=0, waiting=0)
EMPTY = PoolStats(idle=0, active=0, waiting=0)


@dataclass
class Received:
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


Handler = Callable[["Upstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A TCP (or TLS) server on 127.0.0.1 that runs `handler` once for each connection it accepts."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.received: list[Received] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left, or __aexit__ ended the test; asyncio would log a cancelled handler
        finally:
            writer.close()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> Received | None:
        """Read one request (Content-Length or chunked body); None when the client closed first."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *fields = head[:-4].split(b"\r\n")
        headers = [(name, value) for name, _, value in (field.partition(b": ") for field in fields)]
        lowered = {name.lower(): value for name, value in headers}
        if b"content-length" in lowered:
            body = await reader.readexactly(int(lowered[b"content-length"]))
        elif lowered.get(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            assert await reader.readuntil(b"\r\n") == b"\r\n"
            body = b"".join(parts)
        else:
            body = b""
        self.received.append(Received(line, headers, body))
        self._arrived.set()
        return self.received[-1]

    async def until_received(self, count: int) -> None:
        while len(self.received) < count:
            self._arrived.clear()
            await self._arrived.wait()


def reply(body: bytes = b"", status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %b\r\nContent-Length: %d\r\n%b\r\n%b" % (status, len(body), headers, body)


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n" + trailer + b"\r\n"


def die(writer: asyncio.StreamWriter, reset: bool) -> None:
    """Close the server's side: a FIN, or with SO_LINGER 0 a reset."""
    if reset:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


async def echo(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer each request with its own body and the number of the connection."""
    number = server.connections
    while (request := await server.read_request(reader)) is not None:
        writer.write(reply(request.body, headers=b"X-Connection: %d\r\n" % number))
        await writer.drain()


def scripted(*answers: bytes, then_close: bool = False) -> Handler:
    """Read a request, write the next raw answer, repeat; afterwards close or wait for the client to."""

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            if await server.read_request(reader) is None:
                return
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()

    return handler


def client_for(server: Upstream, transport: Transport, **options: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(options.pop("timeout", 5.0), **options)
    return httpx.AsyncClient(transport=transport, base_url=server.url, timeout=timeout)


async def test_request_goes_out_with_exactly_the_headers_httpx_built() -> None:
    transport = Transport()
    async with Upstream(echo) as server, client_for(server, transport) as client:
        response = await client.post("/api/chat?stream=false", content=b'{"model":"m"}', headers={"X-Key": "v"})
    received = server.received[0]
    assert received.line == b"POST /api/chat?stream=false HTTP/1.1"
    assert received.headers == response.request.headers.raw
    assert received.body == b'{"model":"m"}'
    assert response.content == b'{"model":"m"}'
    assert response.http_version == "HTTP/1.1"
    assert response.reason_phrase == "OK"


async def test_a_header_value_with_crlf_is_refused_before_anything_is_sent() -> None:
    async with Upstream(echo) as server, client_for(server, Transport()) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get("/", headers={"X-Evil": "a\r\nContent-Length: 0"})
    assert server.connections == 0


async def test_sequential_requests_share_one_connection() -> None:
    transport = Transport()
    async with Upstream(echo) as server, client_for(server, transport) as client:
        for i in range(25):
            response = await client.post("/", content=b"body %d" % i)
            assert response.content == b"body %d" % i
            assert response.headers["x-connection"] == "1"
        assert stats(transport) == IDLE
    assert server.connections == 1


async def test_chunked_body_with_extensions_and_trailers_is_decoded_exactly() -> None:
    body = b'5;name=value\r\nhello\r\n6 ; quoted="a;b"\r\n world\r\n0;last\r\nX-Trailer: yes\r\nX-More: 1\r\n\r\n'
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    transport = Transport()
    async with Upstream(scripted(head + body, reply(b"next"))) as server, client_for(server, transport) as client:
        response = await client.get("/")
        assert response.content == b"hello world"
        assert "x-trailer" not in response.headers
        assert (await client.get("/")).content == b"next"
    assert server.connections == 1


async def test_body_until_close_is_read_to_the_end_and_the_connection_is_not_reused() -> None:
    transport = Transport()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of this, until EOF"
    async with Upstream(scripted(answer, then_close=True)) as server, client_for(server, transport) as client:
        assert (await client.get("/")).content == b"all of this, until EOF"
        assert stats(transport) == EMPTY
        assert (await client.get("/")).content == b"all of this, until EOF"
    assert server.connections == 2


async def test_a_reset_before_the_close_is_not_the_end_of_a_body_read_until_close() -> None:
    client_has_first = asyncio.Event()

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nfirst")
        await writer.drain()
        await client_has_first.wait()
        die(writer, reset=True)

    async with (
        Upstream(handler) as server,
        client_for(server, Transport()) as client,
        client.stream("GET", "/") as response,
    ):
        pieces = response.aiter_raw()
        assert await anext(pieces) == b"first"
        client_has_first.set()
        with pytest.raises(httpx.ReadError):
            await anext(pieces)


async def test_head_204_and_304_end_with_their_head_and_keep_the_connection() -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        reply(b"after"),
    )
    transport = Transport()
    async with Upstream(scripted(*answers)) as server, client_for(server, transport) as client:
        head = await client.head("/")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "1000")
        assert (await client.get("/")).status_code == 204
        assert (await client.get("/")).status_code == 304
        assert (await client.get("/")).content == b"after"
    assert server.connections == 1


async def test_informational_responses_before_the_final_one_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + reply(b"ok")
    async with Upstream(scripted(answer)) as server, client_for(server, Transport()) as client:
        response = await client.post("/", content=b"x")
    assert (response.status_code, response.content, "link" in response.headers) == (200, b"ok", False)


def processing_every(interval: float) -> Handler:
    """Answer each request with `102 Processing` every `interval` seconds, and never finally."""

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        while True:
            writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(interval)

    return handler


async def test_interim_responses_do_not_extend_the_first_byte_timeout() -> None:
    async with Upstream(processing_every(0.05)) as server, client_for(server, Transport(), read=5) as client:
        started = time.monotonic()
        async with asyncio.timeout(10):  # the old transport restarted the timeout on each 102: forever
            with pytest.raises(httpx.ReadTimeout, match="final response head within the first-byte timeout"):
                await client.get("/", extensions={"first_byte_timeout": 0.5})
        assert 0.5 <= time.monotonic() - started < 5


@pytest.mark.parametrize(("interim", "accepted"), [(32, True), (33, False)])
async def test_the_number_of_interim_responses_is_bounded(interim: int, accepted: bool) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" * interim + reply(b"final")
    async with Upstream(scripted(answer)) as server, client_for(server, Transport()) as client:
        if accepted:
            assert (await client.get("/")).content == b"final"
        else:
            with pytest.raises(httpx.RemoteProtocolError, match="interim responses"):
                await client.get("/")


async def test_interim_responses_count_against_the_head_size_limit() -> None:
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: " + b"a" * 400 + b"\r\n\r\n"
    transport = Transport(max_head_size=1024)
    async with Upstream(scripted(answer * 3 + reply(b"final"))) as server, client_for(server, transport) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="longer than"):
            await client.get("/")


async def test_an_answer_sent_before_the_request_was_read_survives_the_broken_write() -> None:
    """A server that refuses a large body early (413) and closes without reading the rest."""

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply(b"too large", b"413 Content Too Large", b"Connection: close\r\n"))
        writer.write_eof()
        await asyncio.Event().wait()  # never reads the body; __aexit__ ends this

    async with Upstream(handler) as server, client_for(server, Transport()) as client:
        response = await client.post("/", content=bytes(32 * 1024 * 1024))
    assert (response.status_code, response.content) == (413, b"too large")


async def test_a_body_that_disagrees_with_its_content_length_is_refused_before_anything_is_sent() -> None:
    async def content() -> AsyncIterator[bytes]:
        yield b"0123456789"

    async with Upstream(echo) as server, client_for(server, Transport()) as client:
        with pytest.raises(httpx.LocalProtocolError, match="Content-Length"):
            await client.post("/", content=content(), headers={"Content-Length": "3"})
    assert server.connections == 0


@pytest.mark.parametrize(
    "headers",
    [{"Content-Length": "9" * 5000}, {"X(A)": "1"}, {"X-A": "a\x01b"}, {"X-A": "a\x7f"}],
    ids=["5000-digit length", "name not a token", "control byte", "DEL"],
)
async def test_invalid_request_headers_are_refused_before_anything_is_sent(headers: dict[str, str]) -> None:
    async with Upstream(echo) as server:
        request = httpx.Request("POST", server.url, headers=headers, content=b"x")
        with pytest.raises(httpx.LocalProtocolError):
            await Transport().handle_async_request(request)
    assert server.connections == 0


async def test_twenty_megabyte_bodies_round_trip_both_ways() -> None:
    body = os.urandom(20 * 1024 * 1024)
    pieces = [body[i : i + 1024 * 1024] for i in range(0, len(body), 1024 * 1024)]

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await server.read_request(reader)
        assert request is not None
        writer.write(reply(request.body))
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(*pieces))
        await writer.drain()
        await reader.read()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        echoed = await client.post("/", content=body)
        assert hashlib.sha256(echoed.content).digest() == hashlib.sha256(body).digest()
        streamed = await client.get("/")
        assert hashlib.sha256(streamed.content).digest() == hashlib.sha256(body).digest()
        assert stats(transport) == IDLE
    assert server.connections == 1


async def test_a_slow_reader_pushes_back_on_the_server_and_still_gets_every_byte() -> None:
    body = os.urandom(32 * 1024 * 1024)
    server_transports: list[asyncio.WriteTransport] = []

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        server_transports.append(writer.transport)
        writer.write(reply(body))
        await reader.read()

    async with (
        Upstream(handler) as server,
        client_for(server, Transport(), read=2) as client,
        client.stream("GET", "/") as response,
    ):
        pieces = response.aiter_raw()
        received = [await anext(pieces)]
        await asyncio.sleep(0.2)
        # The kernel buffers hold a few MB; the rest must still wait on the server's side,
        # instead of piling up in the client's memory while nobody reads it.
        assert server_transports[0].get_write_buffer_size() > 16 * 1024 * 1024
        received += [piece async for piece in pieces]
    assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(body).digest()


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_each_piece_reaches_the_client_before_the_server_sends_the_next(framing: str) -> None:
    client_has_first = asyncio.Event()
    heads = {
        "length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        "close": b"HTTP/1.1 200 OK\r\n\r\n",
    }

    def encode(piece: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(piece), piece) if framing == "chunked" else piece

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(heads[framing] + encode(b"first"))
        await writer.drain()
        # The second piece does not exist until the client holds the first: a transport that
        # waited for more bytes (or for a delimiter) would time out here.
        await asyncio.wait_for(client_has_first.wait(), 5)
        writer.write(encode(b"later") + (b"0\r\n\r\n" if framing == "chunked" else b""))
        await writer.drain()

    async with (
        Upstream(handler) as server,
        client_for(server, Transport()) as client,
        client.stream("GET", "/") as response,
    ):
        pieces = response.aiter_raw()
        assert await asyncio.wait_for(anext(pieces), 2) == b"first"
        client_has_first.set()
        assert b"".join([piece async for piece in pieces]) == b"later"


async def test_closing_a_partly_read_body_sends_eof_at_once_and_drops_the_connection() -> None:
    eof_seen = asyncio.get_running_loop().create_future()

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections > 1:
            return await echo(server, reader, writer)
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\ntoken\r\n")
        await writer.drain()
        try:
            assert await reader.read() == b""
        finally:  # a reset is as good as an EOF: either way the server stops generating
            eof_seen.set_result(time.monotonic())

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        async with client.stream("POST", "/api/chat", content=b"{}") as response:
            assert await anext(response.aiter_raw()) == b"token"
            closed_at = time.monotonic()
        assert await asyncio.wait_for(eof_seen, 1) - closed_at < 0.05
        assert stats(transport) == EMPTY
        assert (await client.post("/", content=b"again")).content == b"again"
    assert server.connections == 2


def generating(eof_seen: asyncio.Event) -> Handler:
    """An endless token stream, as a model generates; sets `eof_seen` when the client hangs up."""

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ntoken\r\n")
        await writer.drain()
        await reader.read()
        eof_seen.set()

    return handler


@pytest.mark.parametrize("how", ["aclose from another task", "cancel the reading task"])
async def test_a_body_being_read_stops_at_once_when_the_gateway_gives_up(how: str) -> None:
    eof_seen = asyncio.Event()
    transport = Transport()
    async with (
        Upstream(generating(eof_seen)) as server,
        client_for(server, transport) as client,
        client.stream("POST", "/api/chat", content=b"{}") as response,
    ):
        pieces = response.aiter_raw()
        assert await anext(pieces) == b"token"

        async def next_piece() -> bytes:
            return await anext(pieces)

        reading = asyncio.create_task(next_piece())  # waits for a token that never comes
        await asyncio.sleep(0.01)
        if how == "cancel the reading task":
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        else:
            await response.aclose()
            with pytest.raises(httpx.ReadError):
                await asyncio.wait_for(reading, 0.05)
        await asyncio.wait_for(eof_seen.wait(), 0.05)
        assert stats(transport) == EMPTY


async def test_cancelling_a_request_that_waits_for_its_head_closes_the_connection() -> None:
    eof_seen = asyncio.Event()

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()
        eof_seen.set()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        task = asyncio.create_task(client.post("/", content=b"x"))
        await server.until_received(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(eof_seen.wait(), 1)
        assert stats(transport) == EMPTY


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_resend() -> None:
    transport = Transport()
    async with Upstream(scripted(reply(b"one"), then_close=True)) as server, client_for(server, transport) as client:
        assert (await client.get("/")).content == b"one"
        await asyncio.sleep(0.05)  # the server's FIN arrives while the connection sits in the pool
        assert (await client.get("/")).content == b"one"
    assert (server.connections, len(server.received)) == (2, 2)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_reused_connection_that_dies_before_any_response_byte_is_retried_once(reset: bool) -> None:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = server.connections
        if number == 1:
            await server.read_request(reader)
            writer.write(reply(b"first"))
        # The request arrives and the connection dies unanswered: exactly what the client sees when
        # an idle close races its request. The server did read it here, which is the documented
        # ambiguity: such a request runs twice.
        await server.read_request(reader)
        if number == 1 or reset:
            die(writer, reset)
            return
        writer.write(reply(b"second"))
        await writer.drain()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        assert (await client.post("/", content=b"1")).content == b"first"
        if reset:  # the retry meets the same fate, and there is no second retry
            with pytest.raises(httpx.ReadError):
                await client.post("/", content=b"2")
        else:
            assert (await client.post("/", content=b"2")).content == b"second"
        assert [request.body for request in server.received] == [b"1", b"2", b"2"]
        assert stats(transport) == (EMPTY if reset else IDLE)
    assert server.connections == 2


async def test_a_reused_connection_that_breaks_while_a_large_body_is_written_is_retried() -> None:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await server.read_request(reader)
            writer.write(reply(b"first"))
            await reader.readuntil(b"\r\n\r\n")  # the next head only: the body is still being written
            die(writer, reset=True)
            return
        request = await server.read_request(reader)
        assert request is not None
        writer.write(reply(b"%d bytes" % len(request.body)))
        await writer.drain()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        assert (await client.post("/", content=b"1")).content == b"first"
        assert (await client.post("/", content=bytes(32 * 1024 * 1024))).content == b"33554432 bytes"
    assert server.connections == 2


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_request_on_a_fresh_connection_is_never_retried(reset: bool) -> None:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        die(writer, reset)

    async with Upstream(handler) as server, client_for(server, Transport()) as client:
        with pytest.raises(httpx.ReadError if reset else httpx.RemoteProtocolError):
            await client.post("/", content=b"x")
    assert (server.connections, len(server.received)) == (1, 1)


async def test_a_started_response_is_never_retried() -> None:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await server.read_request(reader)
        assert request is not None
        writer.write(reply(b"answer to " + request.body))
        await server.read_request(reader)  # then the connection dies after the first bytes of a response
        writer.write(b"HTTP/1.1 200")
        await writer.drain()

    async with Upstream(handler) as server, client_for(server, Transport()) as client:
        assert (await client.post("/", content=b"1")).content == b"answer to 1"
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/", content=b"2")
    assert [request.body for request in server.received] == [b"1", b"2"]
    assert server.connections == 1


@pytest.mark.parametrize("later", [False, True], ids=["with the response", "while idle"])
async def test_bytes_beyond_the_response_make_the_pool_drop_the_connection(later: bool) -> None:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(reply(b"answer %d" % server.connections))
        if later:
            await writer.drain()
            await asyncio.sleep(0.02)  # by now the connection waits in the pool
        writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await reader.read()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        assert (await client.get("/")).content == b"answer 1"
        await asyncio.sleep(0.05)
        assert (await client.get("/")).content == b"answer 2"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("status_line", "connection", "reused"),
    [
        (b"HTTP/1.1 200 OK", b"Connection: close\r\n", False),
        (b"HTTP/1.0 200 OK", b"", False),
        (b"HTTP/1.0 200 OK", b"Connection: Keep-Alive\r\n", True),
        (b"HTTP/1.1 200 OK", b"Connection: keep-alive, Upgrade\r\n", True),
    ],
)
async def test_the_server_decides_whether_its_connection_is_reused(
    status_line: bytes, connection: bytes, reused: bool
) -> None:
    answer = status_line + b"\r\nContent-Length: 2\r\n" + connection + b"\r\nok"
    async with Upstream(scripted(answer, answer)) as server, client_for(server, Transport()) as client:
        assert (await client.get("/")).content == b"ok"
        assert (await client.get("/")).content == b"ok"
    assert server.connections == (1 if reused else 2)


async def test_a_request_saying_connection_close_is_not_reused() -> None:
    async with Upstream(echo) as server, client_for(server, Transport()) as client:
        await client.get("/", headers={"Connection": "close"})
        await client.get("/")
    assert server.connections == 2


async def test_idle_connections_expire_after_keepalive_expiry() -> None:
    transport = Transport(keepalive_expiry=0.05)
    async with Upstream(echo) as server, client_for(server, transport) as client:
        await client.get("/")
        await client.get("/")
        await asyncio.sleep(0.1)
        await client.get("/")
    assert server.connections == 2


async def test_closing_the_transport_closes_its_idle_connections() -> None:
    closed = asyncio.Event()

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await echo(server, reader, writer)
        closed.set()

    transport = Transport()
    async with Upstream(handler) as server, client_for(server, transport) as client:
        await client.get("/")
        await transport.aclose()
        await asyncio.wait_for(closed.wait(), 1)
        assert stats(transport) == EMPTY
        with pytest.raises(RuntimeError):
            await client.get("/")


async def test_refused_and_unresolvable_connections_raise_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.ConnectError):
            await client.get("http://upstream.invalid/")
        assert stats(transport) == EMPTY


async def test_a_tls_handshake_that_never_finishes_is_a_connect_timeout() -> None:
    async def silent(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with Upstream(silent) as server, httpx.AsyncClient(transport=Transport()) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            await client.get(f"https://127.0.0.1:{server.port}/", timeout=httpx.Timeout(5, connect=0.1))
        assert time.monotonic() - started < 1
    assert server.received == []


async def test_a_server_that_stops_reading_causes_a_write_timeout() -> None:
    accepted: list[asyncio.Transport] = []

    class Stalled(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()
            accepted.append(transport)

    stalled = await asyncio.get_running_loop().create_server(Stalled, "127.0.0.1", 0)
    port = stalled.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=Transport()) as client:
            with pytest.raises(httpx.WriteTimeout):
                await client.post(f"http://127.0.0.1:{port}/", content=bytes(32 * 1024 * 1024), timeout=0.2)
    finally:
        for transport in accepted:
            transport.abort()
        stalled.close()
        await stalled.wait_closed()


def slow(delay_head: float, delay_body: float) -> Handler:
    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(delay_head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(delay_body)
        writer.write(b"cd")
        await reader.read()

    return handler


async def test_the_head_wait_uses_first_byte_timeout_and_body_reads_use_read_timeout() -> None:
    async with Upstream(slow(0.3, 0)) as server, client_for(server, Transport(), read=0.1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")
        response = await client.get("/", extensions={"first_byte_timeout": 2})
        assert response.content == b"abcd"
    async with Upstream(slow(0.3, 0)) as server, client_for(server, Transport(), read=5) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/", extensions={"first_byte_timeout": 0.1})
        assert time.monotonic() - started < 0.25
    async with Upstream(slow(0, 0.3)) as server, client_for(server, Transport(), read=0.1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/", extensions={"first_byte_timeout": 2})


async def test_waiting_for_a_connection_is_bounded_by_max_connections_and_the_pool_timeout() -> None:
    release = asyncio.Event()

    async def held(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            await release.wait()
            writer.write(reply(b"done"))

    transport = Transport(max_connections=2)
    async with Upstream(held) as server, client_for(server, transport) as client:
        tasks = [asyncio.create_task(client.get("/")) for _ in range(6)]
        await server.until_received(2)
        assert stats(transport) == PoolStats(idle=0, active=2, waiting=4)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/", timeout=httpx.Timeout(5, pool=0.05))
        assert stats(transport) == PoolStats(idle=0, active=2, waiting=4)
        release.set()
        assert [response.content for response in await asyncio.gather(*tasks)] == [b"done"] * 6
        assert stats(transport) == PoolStats(idle=2, active=0, waiting=0)
    assert server.connections == 2


async def test_a_waiter_cancelled_just_as_it_is_handed_a_connection_gives_it_back() -> None:
    transport = Transport(max_connections=1)
    async with Upstream(echo) as server, client_for(server, transport) as client:
        async with client.stream("POST", "/", content=b"held") as held:
            waiting = asyncio.create_task(client.get("/"))
            await asyncio.sleep(0.01)
            assert stats(transport) == PoolStats(idle=0, active=1, waiting=1)
            assert await held.aread() == b"held"  # hands the connection to the waiter...
            waiting.cancel()  # ...which is cancelled before it could run
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert stats(transport) == IDLE
        assert (await client.post("/", content=b"x", timeout=httpx.Timeout(5, pool=0.1))).content == b"x"
    assert server.connections == 1


async def test_concurrent_requests_each_get_their_own_answer() -> None:
    async def jittery(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            await asyncio.sleep(int(request.body[:3]) % 7 / 1000)
            writer.write(reply(request.body))

    transport = Transport(max_connections=16)
    async with Upstream(jittery) as server, client_for(server, transport) as client:
        bodies = [b"%03d" % i + os.urandom(i * 50) for i in range(200)]
        responses = await asyncio.gather(*(client.post("/", content=body) for body in bodies))
        assert [response.content for response in responses] == bodies
        assert stats(transport) == PoolStats(idle=16, active=0, waiting=0)
    assert server.connections == 16


MALFORMED = {
    "status code not digits": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    "status code below 100": b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    "status without space": b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n",
    "unknown version": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not http": b"ICY 200 OK\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n",
    "length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "lengths differ": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "length list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nab",
    "same length twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "length of 5000 digits": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    "length of 19 digits": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000000\r\n\r\n",
    "control byte in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n",
    "DEL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 0\r\n\r\n",
    "bare CR in a value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "name not a token": b"HTTP/1.1 200 OK\r\nX(A): 1\r\nContent-Length: 0\r\n\r\n",
    "empty name": b"HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 0\r\n\r\n",
    "non-ASCII name": b"HTTP/1.1 200 OK\r\nX-\xc3\xa9: 1\r\nContent-Length: 0\r\n\r\n",
    "control byte in the reason": b"HTTP/1.1 200 O\x1bK\r\nContent-Length: 0\r\n\r\n",
    "control byte in a trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: \x00\r\n\r\n",
    "chunked and length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "gzip coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "gzip coding on a 204": b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n",
    "chunked in HTTP/1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk size 0x": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size signed": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "chunk size spaced": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    "chunk size huge": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
    "chunk longer than size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
    "chunk without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc0\r\n\r\n",
    "trailer not a field": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a field\r\n\r\n",
    "upgrade nobody asked for": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
}
TRUNCATED = {
    "head cut short": b"HTTP/1.1 200 OK\r\nContent-Le",
    "body shorter than length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    "chunk cut short": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "no last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


@pytest.mark.parametrize(
    ("answer", "then_close"),
    [pytest.param(raw, False, id=name) for name, raw in MALFORMED.items()]
    + [pytest.param(raw, True, id=name) for name, raw in TRUNCATED.items()],
)
async def test_a_malformed_or_truncated_response_is_a_remote_protocol_error(answer: bytes, then_close: bool) -> None:
    transport = Transport()
    async with Upstream(scripted(answer, then_close=then_close)) as server, client_for(server, transport) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get("/")
        assert caught.value.request.url.path == "/"
        assert stats(transport) == EMPTY


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * 5000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-Trailer: 0123456789\r\n" * 50 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000,
    ],
    ids=["head", "head without end", "trailers", "chunk extension"],
)
async def test_oversized_heads_trailers_and_chunk_lines_are_refused(answer: bytes) -> None:
    transport = Transport(max_head_size=1024)
    async with Upstream(scripted(answer)) as server, client_for(server, transport) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="longer than"):
            await client.get("/")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"), "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return directory


async def test_https_reuses_connections_and_aborts_partly_read_bodies(certificate: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    client_context = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    streamed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\ntoken\r\n"
    transport = Transport(ssl_context=client_context)
    handler = scripted(reply(b"one"), reply(b"two"), streamed)
    async with Upstream(handler, server_context) as server, client_for(server, transport) as client:
        assert (await client.get("/")).content == b"one"
        assert (await client.get("/")).content == b"two"
        async with client.stream("GET", "/") as response:
            assert await anext(response.aiter_raw()) == b"token"
        assert stats(transport) == EMPTY
        async with httpx.AsyncClient(transport=Transport()) as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(server.url)
    assert server.connections == 1  # the failed handshake never reached the handler
    assert len(server.received) == 3


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=3000), framing=st.sampled_from(["length", "chunked", "close"]), data=st.data())
async def test_any_chunking_of_any_body_round_trips_exactly(body: bytes, framing: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    pieces = [piece for piece in (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)) if piece]
    if framing == "chunked":
        extension = data.draw(st.sampled_from([b"", b";a=1", b' ; q="x;y"']))
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x%b\r\n%b\r\n" % (len(piece), extension, piece) for piece in pieces
        )
        wire += b"0" + extension + b"\r\n" + data.draw(st.sampled_from([b"", b"T: 1\r\n"])) + b"\r\n"
    elif framing == "length":
        wire = reply(body)
    else:
        wire = b"HTTP/1.1 200 OK\r\n\r\n" + body
    splits = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))

    async def handler(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        for a, b in zip([0, *splits], [*splits, len(wire)], strict=True):
            writer.write(wire[a:b])  # each fragment its own segment: the parser meets every split point
            await writer.drain()
            await asyncio.sleep(0)
        if framing != "close":
            await reader.read()

    async with (
        Upstream(handler) as server,
        client_for(server, Transport()) as client,
        client.stream("GET", "/") as response,
    ):
        received = [piece async for piece in response.aiter_raw()]
    assert b"".join(received) == body
    assert all(received)


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.binary(max_size=2000), max_size=8))
async def test_a_streamed_request_body_arrives_exactly(pieces: list[bytes]) -> None:
    async def content() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with Upstream(echo) as server, client_for(server, Transport()) as client:
        response = await client.post("/", content=content())
    assert server.received[0].body == response.content == b"".join(pieces)


def test_the_transport_runs_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        await test_sequential_requests_share_one_connection()
        await test_closing_a_partly_read_body_sends_eof_at_once_and_drops_the_connection()
        await test_a_reused_connection_that_dies_before_any_response_byte_is_retried_once(reset=False)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_https_runs_on_uvloop(certificate: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_https_reuses_connections_and_aborts_partly_read_bodies(certificate))


# --- through the gateway --------------------------------------------------------------------

HOSTILE = {
    "length-of-5000-digits": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    "length-twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "control-byte": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\x01\r\nContent-Length: 2\r\n\r\n{}",
    "processing": b"HTTP/1.1 102 Processing\r\n\r\n",  # repeated every 0.1 s, never a final answer
}


async def hostile(server: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend whose health checks pass and whose chat answers are HOSTILE[model]."""
    while (request := await server.read_request(reader)) is not None:
        path = request.line.split(b" ")[1]
        if path == b"/api/version":
            writer.write(reply(b'{"version":"0.5.0"}'))
        elif path == b"/api/tags":
            writer.write(reply(orjson.dumps({"models": [{"name": f"{model}:latest"} for model in HOSTILE]})))
        elif path == b"/api/ps":
            writer.write(reply(b'{"models":[]}'))
        else:
            model = orjson.loads(request.body)["model"]
            writer.write(HOSTILE[model])
            while model == "processing":
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(HOSTILE[model])
        await writer.drain()


@pytest.fixture(scope="module")
def hostile_gateway(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A gateway in front of `hostile`, which runs on a loop of its own: starting the gateway blocks."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    backend = Upstream(hostile)
    try:
        asyncio.run_coroutine_threadsafe(backend.__aenter__(), loop).result(10)
        env = {
            **gateway_env,
            "OLLAMA_BACKENDS": backend.url,
            "GATEWAY_BACKEND_FIRST_BYTE_TIMEOUT": "1",
            "GATEWAY_BACKEND_COOLDOWN": "0.1",  # three 502s in a row bench the backend
        }
        with GatewayProcess(env) as process:
            yield process
    finally:
        asyncio.run_coroutine_threadsafe(backend.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize(
    ("model", "status"),
    [("length-of-5000-digits", 502), ("length-twice", 502), ("control-byte", 502), ("processing", 504)],
)
async def test_a_hostile_backend_head_is_an_error_in_the_callers_dialect(
    hostile_gateway: GatewayProcess, admin: Admin, model: str, status: int
) -> None:
    key = await admin.key()
    await asyncio.to_thread(wait_for, hostile_gateway.url + "/readyz")
    headers = {**auth(key), "X-Request-ID": f"hostile-{model}"}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        response = await client.post(hostile_gateway.url + "/api/chat", json=body, headers=headers)
    assert response.status_code == status
    assert response.headers["x-request-id"] == f"hostile-{model}"
    assert set(response.json()) == {"error"}
    assert time.monotonic() - started < 10  # the first-byte timeout (1 s), not the total (1,800 s)
