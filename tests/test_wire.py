"""The limiter's Redis wire on the event loop the gateway serves with (uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from neuronetz.wire import Wire
from tests.support import PrivateRedis

PING = b"*1\r\n$4\r\nPING\r\n"


def on_uvloop(scenario: Callable[[PrivateRedis, Wire], Awaitable[Any]]) -> Any:
    """Run `scenario` on uvloop with a wire to a Redis of its own that has answered once."""
    with PrivateRedis() as server:

        async def run() -> Any:
            async with opened(server.url) as wire:
                assert await wire.send(PING, 1) == [b"PONG"]
                return await scenario(server, wire)

        return uvloop.run(run())


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Wire]:
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    wire = Wire(client.connection_pool)
    try:
        yield wire
    finally:
        await wire.close()
        await client.aclose()


def test_batches_written_after_redis_restarted_are_answered_on_a_new_connection() -> None:
    """Redis restarts while the wire's connection sits idle. The batches that follow are
    written to the connection Redis closed: each is answered all the same, in order, on a new
    connection."""

    async def restart_between(server: PrivateRedis, wire: Wire) -> list[Any]:
        server.stop()
        server.start()
        batches = [wire.send(PING * n, n) for n in (1, 2, 3)]  # one turn, on the old connection
        return await asyncio.wait_for(asyncio.gather(*batches), 10)

    assert on_uvloop(restart_between) == [[b"PONG"] * n for n in (1, 2, 3)]


def test_a_batch_meeting_a_connection_closed_under_it_goes_on_a_new_one() -> None:
    """The connection is closed under the idle wire (the event loop saw a reset; uvloop then
    refuses a write on it outright): the next batch is not written to it but to a new
    connection."""

    async def closed_under(_: PrivateRedis, wire: Wire) -> list[Any]:
        wire.connection._writer.transport.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not wire.connection._reader.at_eof():  # the loop has taken the close in
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        return await asyncio.wait_for(wire.send(PING, 1), 10)

    assert on_uvloop(closed_under) == [b"PONG"]


def test_replies_larger_than_one_read_and_error_replies_come_in_their_place() -> None:
    """A batch's replies are handed out whole however the socket splits them (a 300 KB value
    takes several reads), nil stays None, and an error reply is redis-py's exception for it,
    in its place."""
    value = b"v" * 300_000
    commands: list[Any] = [("SET", "big", value), ("GET", "big"), ("GET", "missing"), ("EVALSHA", "0" * 40, 0),
                           ("INCR", "big"), ("PING",)]  # fmt: skip

    async def batch(_: PrivateRedis, wire: Wire) -> list[Any]:
        payload = b"".join(hiredis.pack_command(parts) for parts in commands)
        return await asyncio.wait_for(wire.send(payload, len(commands)), 10)

    replies = on_uvloop(batch)
    assert replies[:3] == [b"OK", value, None]
    assert isinstance(replies[3], redis.exceptions.NoScriptError)
    assert type(replies[4]) is redis.exceptions.ResponseError
    assert "not an integer" in str(replies[4])
    assert replies[5] == b"PONG"
