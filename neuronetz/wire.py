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
credentials, the gateway's C packing), connected and closed through its API. Its streams are
the parts redis-py keeps private that the wire uses: the writer, for the write that must not
wait, and the reader, whose bytes go to a hiredis reader of the wire's own (with redis-py's
mapping of error replies to its exceptions), so that one read of the socket hands out every
reply it holds; redis-py's `read_response`, two coroutines and a timeout check per reply,
cost more than the rest of a reply's handling. Replies are bytes, as the gateway's clients
do not decode.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, NamedTuple

import hiredis
import redis.exceptions

from neuronetz.db import REDIS_ERRORS


class Batch(NamedTuple):
    payload: bytes  # encoded commands
    replies: int  # how many to read
    future: asyncio.Future[list[Any]]
    resent: bool  # sent again already after its connection broke


class Written(NamedTuple):
    batch: Batch
    deadline: float  # loop time by which its replies must have come


class Wire:
    """Each connection has one reader task for its life: it reads the replies of what was
    written, oldest first, and waits on a future while nothing is unanswered. The socket
    timeout is kept by one timer (`_watch`) that looks at the oldest unanswered batch, not by
    a timer per batch: arming and cancelling one for every batch cost the worker more than
    reading its replies."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.timeout: float = pool.connection_kwargs.get("socket_timeout") or 5.0
        self.connection: Any = None
        self.waiting: list[Batch] = []  # until a connection is up
        self.pending: deque[Written] = deque()  # written on `connection`, replies not read yet
        self._connecting: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None  # the reader of `connection`
        self._work: asyncio.Future[None] | None = None  # what the idle reader waits on
        self._timeout: asyncio.Timeout | None = None  # the reader's, expired by `_watch`
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

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
                loop = asyncio.get_running_loop()
                self.pending.append(Written(batch, loop.time() + self.timeout))
                self._wake()
                if self._watchdog is None:
                    self._watchdog = loop.call_at(self.pending[0].deadline, self._watch)
                return
        self.waiting.append(batch)
        if self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(self._connect())

    def _wake(self) -> None:
        """Wake the reader if it is idle: there is something to read, or its connection is gone."""
        if self._work is not None:
            self._work.set_result(None)
            self._work = None

    def _watch(self) -> None:
        """Expire the reader's timeout if the oldest unanswered batch is past its deadline;
        otherwise look again at the deadline of whichever batch is oldest by then."""
        self._watchdog = None
        if not self.pending:
            return
        loop = asyncio.get_running_loop()
        deadline = self.pending[0].deadline
        if deadline > loop.time():
            self._watchdog = loop.call_at(deadline, self._watch)
        elif self._timeout is not None:
            self._timeout.reschedule(loop.time())

    async def _connect(self) -> None:
        try:
            # The last connection's reader gives it up: at once if idle (it was closed while
            # idle), else once it has failed or re-queued what was written to it.
            self.connection = None
            if self._reading is not None:
                self._wake()
                await asyncio.wait([self._reading])
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
        self._reading = asyncio.create_task(self._read(connection))
        waiting, self.waiting = self.waiting, []
        for batch in waiting:
            self._send(batch)

    async def _read(self, connection: Any) -> None:
        """Read the replies of what was written, oldest first, until the connection is
        replaced or fails; then close it. A failed connection is dropped with everything
        written to it: a batch it failed is sent once more on a new connection when the
        connection was closed (Redis restarted: it never ran them), otherwise fails with the
        error (a timeout: Redis may have run them)."""
        loop = asyncio.get_running_loop()
        stream: asyncio.StreamReader = connection._reader
        # Error replies come as redis-py's exceptions (NoScriptError, ...), in their place.
        parser = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse,
                                replyError=connection._parser.parse_error)  # fmt: skip
        replies: list[Any] = []  # of the oldest unanswered batch, so far
        try:
            async with asyncio.timeout(None) as self._timeout:
                while self.pending or self.connection is connection:
                    if not self.pending:
                        self._work = loop.create_future()
                        await self._work
                        continue
                    reply = parser.gets()
                    if reply is False:  # nothing whole in what was read: read on
                        parser.feed(await _received(stream))
                        continue
                    replies.append(reply)
                    batch = self.pending[0].batch
                    if len(replies) == batch.replies:
                        self.pending.popleft()
                        if not batch.future.done():
                            batch.future.set_result(replies)
                        replies = []
        except asyncio.CancelledError:  # closing
            await self._drop(connection)
            raise
        except REDIS_ERRORS as exc:
            failed, self.pending = [written.batch for written in self.pending], deque()
            closed = isinstance(exc, redis.exceptions.ConnectionError)
            _fail([b for b in failed if b.resent or not closed], _reading_error(exc))
            # Ahead of anything written since: the order holds on the next connection too.
            self.waiting[:0] = [b._replace(resent=True) for b in failed if closed and not b.resent]
        await self._drop(connection)
        if self.waiting and self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(self._connect())

    async def _drop(self, connection: Any) -> None:
        """The reader's last step (not in a `finally`: a coroutine closed with its event loop
        must not await)."""
        self._timeout = None
        if self.connection is connection:
            self.connection = None
        self._reading = None
        await connection.disconnect(nowait=True)  # replies may still come: never reuse it
        await self.pool.release(connection)

    async def close(self) -> None:
        self._closed = True
        tasks = [task for task in (self._connecting, self._reading) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
        _fail([*(written.batch for written in self.pending), *self.waiting],
              redis.exceptions.ConnectionError("Redis connection closed"))  # fmt: skip
        self.pending.clear()
        self.waiting.clear()


async def _received(stream: asyncio.StreamReader) -> bytes:
    """The next bytes from Redis; a connection closed or reset is redis-py's ConnectionError,
    the one the wire sends the unanswered batches again for."""
    try:
        data = await stream.read(65536)
    except OSError as exc:
        raise redis.exceptions.ConnectionError(f"Error while reading from Redis: {exc}") from exc
    if not data:
        raise redis.exceptions.ConnectionError("Connection closed by server.")
    return data


def _fail(batches: list[Batch], exc: BaseException) -> None:
    for batch in batches:
        if not batch.future.done():
            batch.future.set_exception(exc)


def _reading_error(exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError) and not isinstance(exc, redis.exceptions.RedisError):
        return redis.exceptions.TimeoutError("Timeout reading from Redis")
    return exc
