"""The limiter's Redis wire on the event loop the gateway serves with (uvloop)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import uvloop

from neuronetz.wire import Wire
from tests.support import PrivateRedis

PING = b"*1\r\n$4\r\nPING\r\n"


def test_batches_written_after_redis_restarted_are_answered_on_a_new_connection() -> None:
    """Redis restarts while the wire's connection sits idle. The writes that follow meet a
    connection closed under them (uvloop refuses a write on it outright once it knows): each
    batch is answered all the same, in order, on a new connection."""
    with PrivateRedis() as server:

        async def restart_between() -> list[Any]:
            client = aioredis.Redis.from_url(server.url, socket_timeout=5)
            wire = Wire(client.connection_pool)
            try:
                assert await wire.send(PING, 1) == [b"PONG"]
                server.stop()
                server.start()
                batches = [wire.send(PING * n, n) for n in (1, 2, 3)]  # one turn, on the old connection
                return await asyncio.wait_for(asyncio.gather(*batches), 10)
            finally:
                await wire.close()
                await client.aclose()

        replies = uvloop.run(restart_between())
    assert replies == [[b"PONG"] * n for n in (1, 2, 3)]


def test_a_batch_meeting_a_connection_closed_under_it_goes_on_a_new_one() -> None:
    """The connection is closed under the idle wire (the event loop saw a reset; uvloop then
    refuses a write on it outright): the next batch is not written to it but to a new
    connection."""
    with PrivateRedis() as server:

        async def closed_under() -> list[Any]:
            client = aioredis.Redis.from_url(server.url, socket_timeout=5)
            wire = Wire(client.connection_pool)
            try:
                assert await wire.send(PING, 1) == [b"PONG"]
                wire.connection._writer.transport.close()
                deadline = asyncio.get_running_loop().time() + 10
                while not wire.connection._reader.at_eof():  # the loop has taken the close in
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0)
                return await asyncio.wait_for(wire.send(PING, 1), 10)
            finally:
                await wire.close()
                await client.aclose()

        assert uvloop.run(closed_under()) == [b"PONG"]
