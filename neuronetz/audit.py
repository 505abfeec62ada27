"""The audit log: request metadata always, prompts and answers only for keys that opted in.

Records leave the request path through bounded in-memory queues and are written in batches
(COPY into a staging table, then INSERT … ON CONFLICT DO NOTHING, so a retried batch never
duplicates a row) at least every second. If Postgres is unavailable, the batch waits and is
retried with backoff while new records keep queueing. When a queue is full the newest
record is dropped and counted — prompt bodies first: a full metadata queue sheds prompts
before it sheds metadata. Budgets never depend on this path: their ledger is budgets.py's.
On shutdown everything queued is written before the worker exits.

Growth: `request_log` is partitioned by month; the gateway keeps the next months'
partitions created and drops those older than GATEWAY_AUDIT_RETENTION_DAYS. Expired prompt
rows are deleted every few minutes. Both run on one replica at a time (advisory locks).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import asyncpg

log = logging.getLogger("neuronetz.audit")

COLUMNS = (
    "created_at", "request_id", "tenant_id", "key_prefix", "client_addr", "method", "route", "model", "backend",
    "status", "error_code", "stream", "prompt_tokens", "completion_tokens", "bytes_in", "bytes_out", "ttfb_ms",
    "duration_ms", "disconnected", "removed_tools",
)  # fmt: skip
PROMPT_COLUMNS = ("created_at", "request_id", "tenant_id", "key_prefix", "model", "expires_at", "request", "response")
FLUSH_INTERVAL = 1.0
BATCH = 2000
MAINTENANCE_INTERVAL = 600.0
PARTITIONS_AHEAD = 2
MAINTENANCE_LOCK = 0x6E7A2D6175646974  # "nz-audit"
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class AuditWriter:
    def __init__(self, pool: asyncpg.Pool[Any], *, capacity: int, prompt_capacity: int, retention_days: int) -> None:
        self.pool = pool
        self.capacity = capacity
        self.prompt_capacity = prompt_capacity
        self.retention_days = retention_days
        self.records: deque[tuple[Any, ...]] = deque()
        self.prompts: deque[tuple[Any, ...]] = deque()
        self.written = 0
        self.dropped = {"metadata": 0, "prompt": 0}
        self.full = asyncio.Event()
        self.lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[None]] = []

    # --- the request path: O(1), never waits ---------------------------------------------------

    def submit(self, record: tuple[Any, ...], prompt: tuple[Any, ...] | None = None) -> None:
        if len(self.records) >= self.capacity:
            self.dropped["metadata"] += 1
            if prompt is not None:
                self.dropped["prompt"] += 1
            return
        self.records.append(record)
        if prompt is not None:
            # Prompt bodies are big; under pressure (the metadata queue half full) they go first.
            if len(self.prompts) >= self.prompt_capacity or len(self.records) > self.capacity // 2:
                self.dropped["prompt"] += 1
            else:
                self.prompts.append(prompt)
        if len(self.records) >= BATCH:
            self.full.set()

    # --- writing --------------------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write everything queued; False (records kept, in order) if Postgres refused."""
        async with self.lock:
            while self.records or self.prompts:
                records = [self.records.popleft() for _ in range(min(BATCH, len(self.records)))]
                prompts = [self.prompts.popleft() for _ in range(min(BATCH, len(self.prompts)))]
                try:
                    await self._write(records, prompts)
                except _DB_ERRORS as exc:
                    self.records.extendleft(reversed(records))
                    self.prompts.extendleft(reversed(prompts))
                    log.warning("audit write failed; will retry", extra={"fields": {"error": type(exc).__name__,
                                "queued": len(self.records)}})  # fmt: skip
                    return False
                self.written += len(records)
            return True

    async def _write(self, records: Sequence[tuple[Any, ...]], prompts: Sequence[tuple[Any, ...]]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            if records:
                await connection.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS request_log_stage "
                    "(LIKE request_log INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await connection.copy_records_to_table("request_log_stage", records=records, columns=COLUMNS)
                await connection.execute(
                    "INSERT INTO request_log SELECT * FROM request_log_stage ON CONFLICT DO NOTHING"
                )
            if prompts:
                await connection.executemany(
                    "INSERT INTO prompt_log (created_at, request_id, tenant_id, key_prefix, model, expires_at, "
                    "request, response) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                    prompts,
                )

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self.full.wait()
            except TimeoutError:
                pass
            self.full.clear()
            if await self.flush():
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(min(10.0, 0.25 * 2**failures))

    async def maintain(self) -> None:
        while True:
            try:
                await maintenance(self.pool, self.retention_days)
            except _DB_ERRORS as exc:
                log.warning("audit maintenance failed", extra={"fields": {"error": type(exc).__name__}})
            await asyncio.sleep(MAINTENANCE_INTERVAL)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.run()), asyncio.create_task(self.maintain())]

    async def stop(self, patience: float = 10.0) -> None:
        """Stop the timers and write what is queued, retrying for up to `patience` seconds."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + patience
        while not await self.flush():
            if asyncio.get_running_loop().time() > deadline:
                log.error("audit records lost at shutdown", extra={"fields": {"records": len(self.records)}})
                return
            await asyncio.sleep(0.5)


# --- maintenance: partitions and expired prompts ------------------------------------------------------


def _month(day: dt.date, offset: int) -> dt.date:
    index = day.year * 12 + day.month - 1 + offset
    return dt.date(index // 12, index % 12 + 1, 1)


async def maintenance(pool: asyncpg.Pool[Any], retention_days: int, today: dt.date | None = None) -> dict[str, int]:
    """Create the coming months' partitions, drop those past retention, delete expired
    prompts; on one replica at a time. Returns what it did (for logs and tests)."""
    today = today or dt.datetime.now(dt.UTC).date()
    done = {"created": 0, "dropped": 0, "prompts_deleted": 0}
    async with pool.acquire() as connection:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
            return done
        try:
            for offset in range(PARTITIONS_AHEAD + 1):
                start, end = _month(today, offset), _month(today, offset + 1)
                name = f"request_log_{start:%Y_%m}"
                if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                    # Identifiers and bounds come from dates formatted here, never from input.
                    await connection.execute(
                        f"CREATE TABLE {name} PARTITION OF request_log "
                        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
                    )
                    done["created"] += 1
            cutoff = today - dt.timedelta(days=retention_days)
            rows = await connection.fetch(
                "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'request_log'::regclass AND c.relname ~ '^request_log_[0-9]{4}_[0-9]{2}$'"
            )
            for row in rows:
                year, month = int(row["name"][12:16]), int(row["name"][17:19])
                if _month(dt.date(year, month, 1), 1) <= cutoff:  # the whole month is past retention
                    await connection.execute(f'DROP TABLE "{row["name"]}"')
                    done["dropped"] += 1
            done["prompts_deleted"] = await purge_prompts(connection)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
    return done


async def purge_prompts(connection: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]) -> int:
    """Delete expired prompt rows in small batches (short locks); returns how many."""
    total = 0
    while True:
        status = await connection.execute(
            "DELETE FROM prompt_log WHERE ctid = ANY (ARRAY(SELECT ctid FROM prompt_log WHERE expires_at < now() "
            "LIMIT 5000))"
        )
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < 5000:
            return total


# --- reading, for the `audit` command -------------------------------------------------------------------


async def recent(
    connection: asyncpg.Connection[Any],
    *,
    tenant_id: int | None,
    prefix: str | None,
    since: dt.datetime | None,
    limit: int,
) -> list[dict[str, Any]]:
    rows = await connection.fetch(
        "SELECT r.*, t.name AS tenant FROM request_log r LEFT JOIN tenants t ON t.id = r.tenant_id "
        "WHERE ($1::bigint IS NULL OR r.tenant_id = $1) AND ($2::text IS NULL OR r.key_prefix = $2) "
        "AND ($3::timestamptz IS NULL OR r.created_at >= $3) ORDER BY r.created_at DESC LIMIT $4",
        tenant_id,
        prefix,
        since,
        limit,
    )
    return [dict(row) for row in rows]
