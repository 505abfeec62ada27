"""One Redis connection a worker writes its limiter's pipelines to: in order, and at once.

In order: Redis runs the commands of one connection in the order they were written, so a
request's settlement written before the next admission is counted before it, whichever
pipeline each went in (pipelines on pooled connections can be taken by Redis in any order).

At once: a pipeline is written in the turn of the event loop that made it. redis-py's own
write is a coroutine (on Python 3.11 run through `asyncio.wait_for`, a task of its own), so a
pipeline would leave a turn or two later, after the rest of the turn's work; written at once,
Redis works on it while the worker goes on with that work, instead of the worker waiting for
Redis afterwards (README → Benchmarks: the limits figure and what it is made of).

The connection is redis-py's: made by the client's pool (address or Sentinel lookup, TLS,
credentials, the gateway's C packing), connected, read (`read_response`, parsed by hiredis)
and closed through its API. The one part of it used that redis-py keeps private is its stream
writer, for the write that must not wait.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any, NamedTuple

import redis.exceptions

from neuronetz.db import REDIS_ERRORS


class Batch(NamedTuple):
    payload: bytes  # encoded commands
    replies: int  # how many to read
    future: asyncio.Future[list[Any]]
    resent: bool  # sent again already after its connection broke


class Wire:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.timeout: float = pool.connection_kwargs.get("socket_timeout") or 5.0
        self.connection: Any = None
        self.waiting: list[Batch] = []  # until a connection is up
        self.pending: deque[Batch] = deque()  # written, replies not read yet
        self._connecting: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None

    def send(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Write the commands now if connected (else as soon as connected); the future has
        their replies in order, an error reply in its place, or the error that broke the
        connection (after one more try on a new connection if it was closed on us)."""
        batch = Batch(payload, replies, asyncio.get_running_loop().create_future(), False)
        self._send(batch)
        return batch.future

    def _send(self, batch: Batch) -> None:
        connection = self.connection
        if (
            connection is not None
            and not self.waiting
            and connection.is_connected
            and not connection._writer.transport.is_closing()
        ):
            try:
                connection._writer.write(batch.payload)
            except (RuntimeError, OSError):  # closed under us (uvloop raises here): a new connection
                pass
            else:
                self.pending.append(batch)
                if self._reading is None:
                    self._reading = asyncio.create_task(self._read(connection))
                return
        self.waiting.append(batch)
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            if self._reading is not None:  # the last connection's reader is failing its batches
                await asyncio.wait([self._reading])
            broken, self.connection = self.connection, None  # closed while idle, if still here
            if broken is not None:
                await broken.disconnect(nowait=True)
                await self.pool.release(broken)
            # Taken from the pool for good (closing the client closes it too), given back broken;
            # connected anew, as an idle pooled connection may be one Redis has closed.
            connection = self.pool.get_available_connection()
            try:
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.pool.release(connection)
                raise
        except REDIS_ERRORS as exc:
            self._connecting = None
            waiting, self.waiting = self.waiting, []
            _fail(waiting, exc)
            return
        self._connecting = None
        self.connection = connection
        waiting, self.waiting = self.waiting, []
        for batch in waiting:
            self._send(batch)

    async def _read(self, connection: Any) -> None:
        """Read the replies of what was written, oldest first, each batch within the socket
        timeout. A connection that fails is dropped with everything written to it: a batch
        it failed is sent once more on a new connection when the connection was closed
        (Redis restarted: it never ran them), otherwise fails with the error."""
        try:
            while self.pending:
                batch = self.pending[0]
                replies: list[Any] = []
                async with asyncio.timeout(self.timeout):
                    for _ in range(batch.replies):
                        try:
                            replies.append(await connection.read_response(timeout=math.inf))
                        except redis.exceptions.ResponseError as exc:
                            replies.append(exc)
                self.pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(replies)
        except asyncio.CancelledError:  # closing
            _fail([*self.pending, *self.waiting], redis.exceptions.ConnectionError("Redis connection closed"))
            raise
        except REDIS_ERRORS as exc:
            if self.connection is connection:
                self.connection = None
            await connection.disconnect(nowait=True)  # replies may still come: never reuse it
            await self.pool.release(connection)
            failed, self.pending = list(self.pending), deque()
            closed = isinstance(exc, redis.exceptions.ConnectionError)
            _fail([b for b in failed if b.resent or not closed], _reading_error(exc))
            # Ahead of anything written since: the order holds on the next connection too.
            self.waiting[:0] = [b._replace(resent=True) for b in failed if closed and not b.resent]
            self._reading = None
            if self.waiting and self._connecting is None:
                self._connecting = asyncio.create_task(self._connect())
            return
        self._reading = None

    async def close(self) -> None:
        for task in (self._connecting, self._reading):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._connecting, self._reading) if t is not None), return_exceptions=True)
        _fail([*self.pending, *self.waiting], redis.exceptions.ConnectionError("Redis connection closed"))
        if self.connection is not None:
            await self.connection.disconnect()
            await self.pool.release(self.connection)
            self.connection = None


def _fail(batches: list[Batch], exc: BaseException) -> None:
    for batch in batches:
        if not batch.future.done():
            batch.future.set_exception(exc)


def _reading_error(exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError) and not isinstance(exc, redis.exceptions.RedisError):
        return redis.exceptions.TimeoutError("Timeout reading from Redis")
    return exc
