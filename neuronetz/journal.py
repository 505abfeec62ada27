"""The crash journal: settled usage and finished requests' audit records, kept in Redis until
Postgres has them, so that a worker killed without warning (SIGKILL, OOM) loses none of them.

Each worker numbers what it hands to its ledger and audit writer (1, 2, 3, ...) and appends it
to a Redis stream of its own, `<prefix>journal:<worker>`: what comes up in one turn of the
event loop is one entry (one XADD, off the request path), whose id is its last number. The writers report
how far they got (`ledger_done`, `audit_done`; the ledger also records its number in
`journal_progress`, in the same transaction as the usage); everything below both marks is
trimmed from the stream every second.

Every worker keeps a heartbeat key alive while it runs. A worker whose heartbeat has expired is
dead: another worker takes its journal, hands the audit records (written idempotently) and the
usage past the dead worker's `journal_progress` (so none is counted twice) to its own writers,
and deletes the journal. What a crash still loses: requests in flight, and what was handed to
the writers within the last turn of the event loop before the kill, or while Redis was down.

On one Redis server (directly or through Sentinel) each turn's entry is written at the end of
the turn on the worker's wire (wire.py), whose one connection keeps the entries in order; on a
Redis Cluster it goes through the client's pool, one append at a time (the next waits for the
answer to the last, so the entries arrive in order: Redis refuses an id below the stream's last).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import asyncpg
import hiredis
import orjson

from neuronetz import db
from neuronetz.logs import Throttled
from neuronetz.tasks import Supervisor
from neuronetz.wire import Wire

log = logging.getLogger("neuronetz.journal")

HEARTBEAT_TTL_MS = 10_000  # a worker silent this long is taken for dead (its event loop stalled or gone)
HEARTBEAT_INTERVAL = 2.0
REPLAY_INTERVAL = 2.0
REPLAY_BATCH = 2000
# Entries (loop turns' worth of records) one worker's journal keeps at most: during a long
# Postgres outage the oldest go first, so Redis cannot fill up; the writers still hold them.
MAX_ENTRIES = 20_000

USAGE = "u"
AUDIT = "a"
# Takes a replayed usage entry: key id, tenant id, UTC day, prompt and completion tokens, model.
UsageSink = Callable[[int, int, dt.date, int, int, str], None]
AuditSink = Callable[[tuple[Any, ...]], None]


class Journal:
    def __init__(self, client: db.RedisClient, pool: asyncpg.Pool[Any], prefix: str, wire: Wire | None = None) -> None:
        self.redis = client
        self.wire = wire
        self.pool = pool
        self.prefix = prefix
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.seq = 0
        self.ledger_done = 0
        self.audit_done = 0
        # Where a dead worker's entries go (this worker's ledger and audit writer), from `start`.
        self.replay_usage: UsageSink | None = None
        self.replay_audit: AuditSink | None = None
        self._buffer: list[tuple[int, str, Any]] = []
        self._sender: asyncio.Task[None] | None = None  # without a wire
        self._scheduled = False  # with a wire: this turn's entry is to be written
        self._written: asyncio.Future[list[Any]] | None = None  # with a wire: the last entry written
        self.connected_since: float | None = None  # loop time of the first heartbeat of an unbroken run
        self.tasks = Supervisor()
        self.failed = Throttled(log, "journal append failed: a crash now would lose these records")

    def stream(self, worker: str) -> str:
        return f"{self.prefix}journal:{worker}"

    # --- appending (the request path: O(1), never waits) -----------------------------------------

    def usage(self, key_id: int, tenant_id: int, day: dt.date, prompt: int, completion: int, model: str) -> int:
        # The model comes last: an entry of a worker from before the ledger knew models is the
        # same list without it, and replays as model '' (see `_replay`).
        return self._append(USAGE, (key_id, tenant_id, day, prompt, completion, model))

    def audit(self, record: tuple[Any, ...]) -> int:
        return self._append(AUDIT, record)

    def _append(self, kind: str, value: tuple[Any, ...]) -> int:
        self.seq += 1
        self._buffer.append((self.seq, kind, value))
        if self.wire is not None:
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._write)  # after the rest of this turn's entries
        elif self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return self.seq

    def _write(self) -> None:
        """This turn's entries as one XADD, written on the wire now (no task, no pooled
        connection: a task and a redis-py command per turn cost more than the rest of the
        journal's work); a failure is counted when its answer comes."""
        self._scheduled = False
        batch, self._buffer = self._buffer, []
        if not batch or self.wire is None:
            return
        try:
            parts: Any = self._xadd(batch)  # (hiredis's stub types the tuple as a single value)
            command = hiredis.pack_command(parts)
        except (orjson.JSONEncodeError, TypeError) as exc:
            self.failed(error=type(exc).__name__, records=len(batch))
            return
        written = self._written = self.wire.send(command, 1)
        written.add_done_callback(lambda done: self._answered(done, len(batch)))

    def _answered(self, written: asyncio.Future[list[Any]], records: int) -> None:
        error = written.exception() or next((r for r in written.result() if isinstance(r, Exception)), None)
        if error is not None:
            self.failed(error=type(error).__name__, records=records)

    def _xadd(self, batch: list[tuple[int, str, Any]]) -> tuple[str | bytes | int, ...]:
        # datetimes as RFC 3339 (orjson's own), addresses as text
        payload = orjson.dumps(batch, default=str)
        return ("XADD", self.stream(self.worker), "MAXLEN", "~", MAX_ENTRIES, f"{batch[-1][0]}-1", "v", payload)

    async def _send(self) -> None:
        """One pipeline at a time, so entries reach the stream in the order of their ids
        (Redis refuses an id below the stream's last); what comes up meanwhile goes next."""
        await asyncio.sleep(0)  # let the rest of this loop turn's entries join the batch
        while self._buffer:
            batch, self._buffer = self._buffer, []
            try:
                await self.redis.execute_command(*self._xadd(batch))
            except (*db.REDIS_ERRORS, orjson.JSONEncodeError, TypeError) as exc:
                self.failed(error=type(exc).__name__, records=len(batch))

    # --- background: heartbeat, trimming, replaying dead workers' journals ------------------------

    async def _heartbeat(self) -> None:
        alive = f"{self.prefix}journal-alive:{self.worker}"
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(alive, "1", px=HEARTBEAT_TTL_MS)
                    pipe.sadd(self.prefix + "journals", self.worker)
                    done = min(self.ledger_done, self.audit_done)
                    if done:
                        pipe.xtrim(self.stream(self.worker), minid=f"{done + 1}-0")
                    await pipe.execute()
                if self.connected_since is None:
                    self.connected_since = asyncio.get_running_loop().time()
            except db.REDIS_ERRORS:
                self.connected_since = None  # the limiter and writers already say that Redis is down
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _replay_dead(self) -> None:
        while True:
            await asyncio.sleep(REPLAY_INTERVAL)
            try:
                await self.replay_dead()
            except (*db.REDIS_ERRORS, *db.ERRORS) as exc:
                log.warning("journal replay failed; will retry", extra={"fields": {"error": type(exc).__name__}})

    async def replay_dead(self) -> int:
        """Take over the journals of dead workers; returns how many entries were handed on.

        Only after this worker's own heartbeats have succeeded for longer than a heartbeat
        lives: after Redis was away (restarted with its data), every worker's heartbeat has
        expired, and the live ones must get the time to renew theirs before anyone is taken
        for dead."""
        if self.connected_since is None:
            return 0
        if asyncio.get_running_loop().time() - self.connected_since < HEARTBEAT_TTL_MS / 1000 + HEARTBEAT_INTERVAL:
            return 0
        handed = 0
        for raw in await self.redis.smembers(self.prefix + "journals"):
            worker = raw.decode() if isinstance(raw, bytes) else raw
            if worker == self.worker or await self.redis.exists(f"{self.prefix}journal-alive:{worker}"):
                continue
            lock = f"{self.prefix}journal-replay:{worker}"
            if not await self.redis.set(lock, self.worker, nx=True, px=60_000):
                continue
            try:
                handed += await self._replay(worker)
            finally:
                await self.redis.delete(lock)
        return handed

    async def _replay(self, worker: str) -> int:
        usage, audit = self.replay_usage, self.replay_audit
        if usage is None or audit is None:
            return 0  # not started: nowhere to hand the entries to
        written = await self.pool.fetchval("SELECT seq FROM journal_progress WHERE worker = $1", worker) or 0
        stream = self.stream(worker)
        handed, start = 0, "-"
        while True:
            entries: list[Any] = await self.redis.xrange(stream, min=start, max="+", count=REPLAY_BATCH) or []
            for _, fields in entries:
                try:
                    turn = orjson.loads(fields[b"v"])
                except (KeyError, orjson.JSONDecodeError):
                    turn = None
                if not isinstance(turn, list):
                    turn = [None]  # unreadable as a whole: skipped by _hand_on, with one line
                handed += sum(_hand_on(worker, entry, written, usage, audit) for entry in turn)
            if len(entries) < REPLAY_BATCH:
                break
            start = "(" + entries[-1][0].decode()
        # What was handed on is in this worker's own journal now (appended in this loop turn).
        await self.redis.delete(stream)
        await self.redis.srem(self.prefix + "journals", worker)
        await self.pool.execute("DELETE FROM journal_progress WHERE worker = $1", worker)
        log.warning("took over a dead worker's journal", extra={"fields": {"worker": worker, "entries": handed}})
        return handed

    def start(self, usage: UsageSink, audit: AuditSink) -> None:
        self.replay_usage, self.replay_audit = usage, audit
        self.tasks.start("journal.heartbeat", self._heartbeat)
        self.tasks.start("journal.replay", self._replay_dead)

    async def stop(self) -> None:
        """After the writers' last flush (graceful stop): if they wrote everything, nothing is
        left to keep; otherwise the journal stays for another worker to replay."""
        await self.tasks.stop()
        if self._scheduled:
            self._write()
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._written is not None:  # the wire answers in order: the last answer is the last to come
            await asyncio.gather(self._written, return_exceptions=True)
        if min(self.ledger_done, self.audit_done) < self.seq:
            return
        try:
            await self.redis.delete(self.stream(self.worker), f"{self.prefix}journal-alive:{self.worker}")
            await self.redis.srem(self.prefix + "journals", self.worker)
            await self.pool.execute("DELETE FROM journal_progress WHERE worker = $1", self.worker)
        except (*db.REDIS_ERRORS, *db.ERRORS):
            pass  # left for another worker to replay (deduplicated)


def _hand_on(worker: str, entry: Any, written: int, usage: UsageSink, audit: AuditSink) -> bool:
    """Hand one journal entry of a dead worker to this worker's writers (usage only past what
    it had written). An unreadable entry (another version's shape, a damaged stream) is
    skipped with one line rather than retried: a retry would hand on again the entries before
    it."""
    try:
        seq, kind, value = entry
        if kind == USAGE and seq > written:
            key_id, tenant_id, day, prompt, completion, *model = value  # no model: an older worker's
            usage(key_id, tenant_id, dt.date.fromisoformat(day), prompt, completion, model[0] if model else "")
            return True
        if kind == AUDIT:
            audit((dt.datetime.fromisoformat(value[0]), *value[1:]))
            return True
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
        log.error("unreadable journal entry skipped", extra={"fields": {"worker": worker, "error": error}})
    return False
