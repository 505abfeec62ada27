"""The audit log: request metadata always, prompts and answers only for keys that opted in.

Records leave the request path through bounded in-memory queues and are written in batches
(COPY into a staging table, then INSERT … ON CONFLICT DO NOTHING, so a retried batch never
duplicates a row) at least every second, and in short batches as soon as enough are queued. If
Postgres is unavailable, the batch waits and is retried with backoff while new records keep
queueing. When a queue is full the newest record is dropped and counted — prompt bodies first:
a full metadata queue sheds prompts before it sheds metadata. A batch Postgres refuses for its
content (a NUL in a string, a number out of a column's range) is split until the offending rows
are found: each is written repaired (NULs removed, numbers clamped) or, failing that, dropped
and counted, with one error line naming its request id; the rest of the batch is written as
usual. Budgets never depend on this path: their ledger is budgets.py's. On shutdown everything
queued is written before the worker exits.

Growth: `request_log` is partitioned by month; the gateway keeps the next months'
partitions created and drops those older than GATEWAY_AUDIT_RETENTION_DAYS. Expired prompt
rows are deleted every few minutes. Both run on one replica at a time (advisory locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg
import orjson

from neuronetz import db
from neuronetz.journal import Journal
from neuronetz.logs import Throttled
from neuronetz.tasks import Supervisor

log = logging.getLogger("neuronetz.audit")


class Record(NamedTuple):
    """One row of `request_log`, fields in column order: COPY writes rows by position, so the
    pipeline builds them by name here and nowhere else lists the columns."""

    created_at: dt.datetime
    request_id: str
    tenant_id: int | None
    key_prefix: str | None
    client_addr: IPv4Address | IPv6Address | None
    method: str
    route: str
    model: str | None
    backend: str | None
    status: int
    error_code: str | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    bytes_in: int
    bytes_out: int
    ttfb_ms: float | None
    duration_ms: float
    disconnected: bool
    removed_tools: str | None  # server-side tools taken out of the request, comma-separated
    # Time spent waiting for a backend slot (slots.py); None if the request did not wait. Its
    # default fills it in for a record an older worker left in its journal (journal.py).
    queue_wait_ms: float | None = None


class Prompt(NamedTuple):
    """One row of `prompt_log`, fields in the order of INSERT_PROMPTS's columns: it is built by
    name in one place, as Record is."""

    created_at: dt.datetime
    request_id: str
    tenant_id: int
    key_prefix: str
    model: str | None
    expires_at: dt.datetime
    request: str  # JSON
    response: str


COLUMNS = Record._fields
INSERT_PROMPTS = (  # Prompt's fields, in order
    "INSERT INTO prompt_log (created_at, request_id, tenant_id, key_prefix, model, expires_at, request, response) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING"
)
FLUSH_INTERVAL = 1.0
# Records per COPY, and how many queued records start one without waiting for the timer.
# asyncpg encodes a whole batch in one go on the event loop, which stalls every request of
# the worker meanwhile, for a time that grows with the batch: small batches sent as soon as
# they fill keep each stall short (measured: README, Benchmarks, what was tried for issue 16).
BATCH = 256
MAINTENANCE_INTERVAL = 600.0
PARTITIONS_AHEAD = 2
MAINTENANCE_LOCK = 0x6E7A2D6175646974  # "nz-audit"
INT4 = 2**31 - 1
INT8 = 2**63 - 1
# What a column accepts, for repairing a refused row: request_log's integer columns by position.
BOUNDS = {COLUMNS.index(name): bound for name, bound in (
    ("status", 32767), ("prompt_tokens", INT4), ("completion_tokens", INT4), ("bytes_in", INT8), ("bytes_out", INT8),
)}  # fmt: skip
REAL_MAX = 1e38  # ttfb_ms, duration_ms and queue_wait_ms are `real`


class AuditWriter:
    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        capacity: int,
        prompt_capacity: int,
        retention_days: int,
        journal: Journal | None = None,
    ) -> None:
        self.pool = pool
        self.journal = journal
        self.capacity = capacity
        self.prompt_capacity = prompt_capacity
        self.retention_days = retention_days
        self.records: deque[tuple[Any, ...]] = deque()
        self.prompts: deque[tuple[Any, ...]] = deque()
        self.written = 0
        self.dropped = {"metadata": 0, "prompt": 0}  # queue full
        self.invalid = {"metadata": 0, "prompt": 0}  # refused by Postgres even when repaired
        self.repaired = 0
        self.full = asyncio.Event()
        self.lock = asyncio.Lock()
        self.tasks = Supervisor()
        self.failed = Throttled(log, "audit write failed; will retry")

    # --- the request path: O(1), never waits ---------------------------------------------------

    def submit(self, record: tuple[Any, ...], prompt: tuple[Any, ...] | None = None) -> None:
        if len(self.records) >= self.capacity:
            self.dropped["metadata"] += 1
            if prompt is not None:
                self.dropped["prompt"] += 1
            return
        self.records.append(record)
        if self.journal is not None:
            self.journal.audit(tuple(record))  # a plain tuple: the journal stores JSON
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
            upto = self.journal.seq if self.journal is not None else 0  # every record up to here is queued
            while self.records or self.prompts:
                records = [self.records.popleft() for _ in range(min(BATCH, len(self.records)))]
                prompts = [self.prompts.popleft() for _ in range(min(BATCH, len(self.prompts)))]
                try:
                    try:
                        await self._write(records, prompts)
                        written = len(records)
                    except db.DATA_ERRORS:
                        # Some row is poisoned; both writes are idempotent, so a retry after a
                        # connection error halfway through this never duplicates a row either.
                        written = await self._isolate("metadata", records, self._write_records)
                        await self._isolate("prompt", prompts, self._write_prompts)
                except db.ERRORS as exc:
                    self.records.extendleft(reversed(records))
                    self.prompts.extendleft(reversed(prompts))
                    self.failed(error=type(exc).__name__, queued=len(self.records))
                    return False
                self.written += written
            if self.journal is not None:
                self.journal.audit_done = upto
            return True

    async def _isolate(self, kind: str, rows: list[tuple[Any, ...]], write: Writer) -> int:
        """Write `rows`, halving around the rows Postgres refuses; returns how many were written.
        A row refused on its own gets one more try repaired, then it is dropped and counted."""
        if not rows:
            return 0
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                await write(connection, rows)
            return len(rows)
        except db.DATA_ERRORS as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                return await self._isolate(kind, rows[:half], write) + await self._isolate(kind, rows[half:], write)
            error = exc
        fixed = repair(rows[0])
        if fixed != rows[0]:
            try:
                async with self.pool.acquire() as connection, connection.transaction():
                    await write(connection, [fixed])
                self.repaired += 1
                log.warning("audit record repaired before writing", extra={"fields": {
                            "kind": kind, "request_id": fixed[1], "error": type(error).__name__}})  # fmt: skip
                return 1
            except db.DATA_ERRORS as exc:
                error = exc
        self.invalid[kind] += 1
        reason = f"{type(error).__name__}: {error}"
        log.error("audit record dropped: Postgres refused it",
                  extra={"fields": {"kind": kind, "request_id": repair(rows[0])[1], "error": reason}})  # fmt: skip
        return 0

    async def _write(self, records: Sequence[tuple[Any, ...]], prompts: Sequence[tuple[Any, ...]]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            if records:
                await self._write_records(connection, records)
            if prompts:
                await self._write_prompts(connection, prompts)

    @staticmethod
    async def _write_records(connection: Connection, records: Sequence[tuple[Any, ...]]) -> None:
        await connection.execute(
            "CREATE TEMP TABLE IF NOT EXISTS request_log_stage "
            "(LIKE request_log INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await connection.copy_records_to_table("request_log_stage", records=records, columns=COLUMNS)
        await connection.execute("INSERT INTO request_log SELECT * FROM request_log_stage ON CONFLICT DO NOTHING")

    @staticmethod
    async def _write_prompts(connection: Connection, prompts: Sequence[tuple[Any, ...]]) -> None:
        await connection.executemany(INSERT_PROMPTS, prompts)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self.full.wait()
            except TimeoutError:
                pass
            self.full.clear()
            if await self.tasks.finish(self.flush()):
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(min(10.0, 0.25 * 2**failures))

    async def maintain(self) -> None:
        while True:
            try:
                await maintenance(self.pool, self.retention_days)
            except db.ERRORS as exc:
                log.warning("audit maintenance failed", extra={"fields": {"error": type(exc).__name__}})
            await asyncio.sleep(MAINTENANCE_INTERVAL)

    def start(self) -> None:
        self.tasks.start("audit.writer", self.run)
        self.tasks.start("audit.maintenance", self.maintain)

    async def stop(self, patience: float = 10.0) -> None:
        """Stop the timers and write what is queued, retrying for up to `patience` seconds."""
        await self.tasks.stop()
        deadline = asyncio.get_running_loop().time() + patience
        while not await self.flush():
            if asyncio.get_running_loop().time() > deadline:
                log.error("audit records lost at shutdown", extra={"fields": {"records": len(self.records)}})
                return
            await asyncio.sleep(0.5)


if TYPE_CHECKING:  # asyncpg's classes are generic for the type checker only
    Connection = asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]
    Writer = Callable[[Connection, Sequence[tuple[Any, ...]]], Awaitable[None]]


def repair(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A refused row made storable: NULs removed from strings (text and jsonb refuse U+0000,
    raw or as the JSON escape), integers clamped to their column's range, reals to `real`'s."""
    fixed: list[Any] = []
    for index, value in enumerate(row):
        if isinstance(value, str):
            if "\\u0000" in value:
                with contextlib.suppress(orjson.JSONDecodeError):  # if not JSON, a plain text column
                    value = orjson.dumps(_strip(orjson.loads(value))).decode()
            value = value.replace("\x00", "")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            value = max(0, min(value, BOUNDS.get(index, INT8)))
        elif isinstance(value, float):
            value = max(0.0, min(value, REAL_MAX)) if value == value else 0.0  # NaN -> 0
        fixed.append(value)
    return tuple(fixed)


def _strip(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_strip(item) for item in value]
    if isinstance(value, dict):
        return {_strip(key): _strip(item) for key, item in value.items()}
    return value


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
                    await _create_partition(connection, name, start, end)
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
            # Progress rows of workers that died with Redis's data (no journal left to replay
            # them): a live worker's row is rewritten whenever it writes usage, and one idle
            # for a week has an empty journal, so nothing depends on the row any more.
            await connection.execute("DELETE FROM journal_progress WHERE updated_at < now() - interval '7 days'")
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)
    return done


async def _create_partition(connection: Connection, name: str, start: dt.date, end: dt.date) -> None:
    """The month's partition. Rows of that month already in the default partition (written
    while maintenance could not run) make a plain CREATE ... PARTITION OF fail, every time:
    then, in one transaction (writers wait for it), the default partition is detached, the
    month's created, its rows moved through the parent into it, and the default put back.
    Identifiers and bounds come from dates formatted here, never from input."""
    create = f"CREATE TABLE {name} PARTITION OF request_log FOR VALUES FROM ('{start}') TO ('{end}')"
    try:
        await connection.execute(create)
    except asyncpg.CheckViolationError:
        async with connection.transaction():
            await connection.execute("ALTER TABLE request_log DETACH PARTITION request_log_default")
            await connection.execute(create)
            moved = await connection.execute(
                "WITH moved AS (DELETE FROM request_log_default WHERE created_at >= $1 AND created_at < $2 "
                "RETURNING *) INSERT INTO request_log SELECT * FROM moved",
                start, end,
            )  # fmt: skip
            await connection.execute("ALTER TABLE request_log ATTACH PARTITION request_log_default DEFAULT")
        log.warning("audit rows moved out of the default partition", extra={"fields": {"partition": name,
                    "rows": int(moved.split()[-1])}})  # fmt: skip


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
