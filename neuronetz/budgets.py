"""Token budgets: periods, the Postgres usage ledger, and rebuilding Redis from it.

Budgets are enforced in Redis (limits.lua, in the admission round trip) against counters of
tokens used per scope and period: the UTC day, the UTC calendar month, and all time. Every
settled request is also added to the ledger (`usage_daily`, one row per key, UTC day and model)
by a per-worker accumulator that writes one batch at least every second and retries until
Postgres is back: the Redis counters are a cache of the ledger, summed over its models. A row
Postgres refuses for its content (a key deleted meanwhile, a sum out of range) is split from
the batch, dropped and counted, so it cannot hold back everyone else's usage.

When Redis loses its data (restart, flush, failover) the per-tenant epoch marker is gone;
the first budgeted request of that tenant starts a rebuild and every budgeted request of the
tenant is refused with 503 (fail closed) until it is done. The rebuild waits two ledger
intervals, so what replicas settled just before the loss reaches Postgres, then adds the
ledger's sums to the counters and sets a new epoch, atomically. Usage settled between the
loss and the rebuild may be counted twice; never zero times.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from neuronetz import db
from neuronetz.journal import Journal
from neuronetz.logs import Throttled
from neuronetz.tasks import Supervisor

log = logging.getLogger("neuronetz.budgets")

LEDGER_INTERVAL = 1.0
REBUILD_WAIT = 2 * LEDGER_INTERVAL + 0.5
PERIOD_MARGIN = 2 * 86400  # counters outlive their period by two days (clock skew, late settles)
PERIODS = {"daily_tokens": "daily", "monthly_tokens": "monthly", "total_tokens": "total"}
# One request's tokens as the ledger takes them: a backend's counter beyond this is nonsense,
# and the bound keeps a day's sum far inside `bigint`.
MAX_TOKENS = 2**40
Slot = tuple[int, dt.date, str]  # (key id, UTC day, model): one ledger row
Row = tuple[Slot, list[int]]  # -> [tenant, requests, prompt, completion]


@dataclass(frozen=True)
class Period:
    """One budget period at a given moment: its id (part of the Redis key), the TTL its
    counter needs, and when it resets (None: never)."""

    id: str
    ttl: int
    resets_at: dt.datetime | None


def period(budget: str, now: float) -> Period:
    """The period `budget` (daily_tokens, monthly_tokens or total_tokens) is in at `now`.

    >>> period("daily_tokens", 1796083200.0).id   # 2026-12-01T00:00:00Z
    'd20261201'
    """
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    if budget == "daily_tokens":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
        return Period(start.strftime("d%Y%m%d"), int(end.timestamp() - now) + PERIOD_MARGIN, end)
    if budget == "monthly_tokens":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=calendar.monthrange(start.year, start.month)[1])
        return Period(start.strftime("m%Y%m"), int(end.timestamp() - now) + PERIOD_MARGIN, end)
    return Period("all", 0, None)


class Ledger:
    """Accumulates settled usage per (key, UTC day, model) and writes it to `usage_daily` in
    batches."""

    def __init__(
        self, pool: asyncpg.Pool[Any], clock: Callable[[], float] = time.time, journal: Journal | None = None
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.journal = journal
        self.pending: dict[Slot, list[int]] = {}  # -> [tenant, requests, prompt, completion]
        self.lock = asyncio.Lock()
        self.tasks = Supervisor()
        self.dropped = 0  # rows Postgres refused for their content
        self.failed = Throttled(log, "ledger write failed; will retry")
        self._today: tuple[int, dt.date] = (0, dt.date(1970, 1, 1))  # (days since the epoch, that UTC date)

    def record(
        self,
        key_id: int,
        tenant_id: int,
        prompt_tokens: int,
        completion_tokens: int,
        day: dt.date | None = None,
        *,
        model: str,
    ) -> None:
        """Add one settled request. `model` is its name as `models.normalize` writes it, already
        checked by the request path (printable, bounded: app.py `_model_of`), or '' when the
        request named none."""
        day = day or self._day()
        prompt_tokens = max(0, min(prompt_tokens, MAX_TOKENS))
        completion_tokens = max(0, min(completion_tokens, MAX_TOKENS))
        row = self.pending.setdefault((key_id, day, model), [tenant_id, 0, 0, 0])
        row[1] += 1
        row[2] += prompt_tokens
        row[3] += completion_tokens
        if self.journal is not None:
            self.journal.usage(key_id, tenant_id, day, prompt_tokens, completion_tokens, model)

    def _day(self) -> dt.date:
        """Today's UTC date, worked out once a day rather than on every request."""
        number = int(self.clock() // 86400)
        if number != self._today[0]:
            self._today = (number, dt.date(1970, 1, 1) + dt.timedelta(days=number))
        return self._today[1]

    async def flush(self) -> None:
        """Write what is pending; on failure keep it (merged with newer usage) for the next try."""
        async with self.lock:
            upto = self.journal.seq if self.journal is not None else 0  # every usage entry up to here is pending
            if not self.pending:
                if self.journal is not None:
                    self.journal.ledger_done = upto
                return
            batch, self.pending = self.pending, {}
            unwritten, error = await self._write(list(batch.items()), upto)
            if error is not None:
                self.failed(error=type(error).__name__, rows=len(unwritten))
            elif self.journal is not None:
                self.journal.ledger_done = upto
            for slot, row in unwritten:
                merged = self.pending.setdefault(slot, [row[0], 0, 0, 0])
                for i in range(1, 4):
                    merged[i] += row[i]

    async def _write(self, rows: list[Row], upto: int) -> tuple[list[Row], BaseException | None]:
        """Add `rows` to the ledger, halving around rows Postgres refuses (each is dropped,
        counted and logged), and record `upto` as this worker's journal progress. Returns the
        rows left unwritten by a connection failure, which the caller keeps; rows written
        before it are not among them (the ledger adds, so a row must never be written twice)."""
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                await self._insert(connection, rows)
                await self._progress(connection, upto)
        except db.DATA_ERRORS:
            unwritten, error = await self._isolate(rows)
            if error is None:
                try:
                    async with self.pool.acquire() as connection:
                        await self._progress(connection, upto)
                except db.ERRORS as exc:
                    return [], exc
            return unwritten, error
        except db.ERRORS as exc:
            return rows, exc
        return [], None

    async def _progress(self, connection: Any, upto: int) -> None:
        if self.journal is not None:
            await connection.execute(
                "INSERT INTO journal_progress (worker, seq) VALUES ($1, $2) "
                "ON CONFLICT (worker) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()",
                self.journal.worker,
                upto,
            )

    async def _insert(self, connection: Any, rows: list[Row]) -> None:
        await connection.execute(
            "INSERT INTO usage_daily (key_id, day, model, tenant_id, requests, prompt_tokens, completion_tokens) "
            "SELECT * FROM unnest($1::bigint[], $2::date[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], "
            "$7::bigint[]) ON CONFLICT (key_id, day, model) DO UPDATE SET "
            "requests = usage_daily.requests + EXCLUDED.requests, "
            "prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens, "
            "completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens",
            *([slot[i] for slot, _ in rows] for i in range(3)),
            *([row[i] for _, row in rows] for i in range(4)),
        )

    async def _isolate(self, rows: list[Row]) -> tuple[list[Row], BaseException | None]:
        """`rows` without the ones Postgres refuses, written in halves; see `_write`."""
        try:
            async with self.pool.acquire() as connection:
                await self._insert(connection, rows)
        except db.DATA_ERRORS as exc:
            if len(rows) == 1:
                (key_id, day, model), row = rows[0]
                self.dropped += 1
                log.error("ledger row dropped: Postgres refused it", extra={"fields": {
                          "key_id": key_id, "day": day.isoformat(), "model": model, "tenant_id": row[0],
                          "requests": row[1], "tokens": row[2] + row[3],
                          "error": f"{type(exc).__name__}: {exc}"}})  # fmt: skip
                return [], None
            half = len(rows) // 2
            unwritten, error = await self._isolate(rows[:half])
            if error is not None:
                return unwritten + rows[half:], error
            return await self._isolate(rows[half:])
        except db.ERRORS as exc:
            return rows, exc
        return [], None

    def start(self) -> None:
        self.tasks.every("ledger.writer", LEDGER_INTERVAL, self.flush)

    async def stop(self, attempts: int = 5) -> None:
        """Stop the timer and write what is left, retrying briefly: spend is never dropped
        while there is any chance to record it."""
        await self.tasks.stop()
        for attempt in range(attempts):
            await self.flush()
            if not self.pending:
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        log.error("ledger not written at shutdown", extra={"fields": {"rows": len(self.pending)}})

    async def sums(self, tenant_id: int, now: float) -> dict[int, tuple[int, int, int]]:
        """Tokens per key of a tenant, over all models: (today, this month, all time), from the
        ledger."""
        moment = dt.datetime.fromtimestamp(now, dt.UTC).date()
        rows = await self.pool.fetch(
            "SELECT key_id, "
            "coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE day = $2), 0)::bigint AS today, "
            "coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE day >= $3), 0)::bigint AS month, "
            "sum(prompt_tokens + completion_tokens)::bigint AS total "
            "FROM usage_daily WHERE tenant_id = $1 GROUP BY key_id",
            tenant_id,
            moment,
            moment.replace(day=1),
        )
        return {row["key_id"]: (row["today"], row["month"], row["total"]) for row in rows}


async def usage_report(connection: Any, *, tenant: str | None, prefix: str | None, now: float) -> list[dict[str, Any]]:
    """Requests and tokens today, this month and in total, per key (with its tenant), from
    the ledger; keys without usage are listed with zeros."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    rows = await connection.fetch(
        """
        SELECT t.id AS tenant_id, t.name AS tenant, k.id AS key_id, k.prefix, k.name,
               coalesce(sum(u.requests) FILTER (WHERE u.day = $3), 0)::bigint AS requests_today,
               coalesce(sum(u.prompt_tokens + u.completion_tokens) FILTER (WHERE u.day = $3), 0)::bigint
                   AS tokens_today,
               coalesce(sum(u.requests) FILTER (WHERE u.day >= $4), 0)::bigint AS requests_month,
               coalesce(sum(u.prompt_tokens + u.completion_tokens) FILTER (WHERE u.day >= $4), 0)::bigint
                   AS tokens_month,
               coalesce(sum(u.requests), 0)::bigint AS requests_total,
               coalesce(sum(u.prompt_tokens + u.completion_tokens), 0)::bigint AS tokens_total
        FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
        LEFT JOIN usage_daily u ON u.key_id = k.id
        WHERE ($1::text IS NULL OR t.name = $1) AND ($2::text IS NULL OR k.prefix = $2)
        GROUP BY t.id, t.name, k.id, k.prefix, k.name
        ORDER BY t.name, k.created_at
        """,
        tenant,
        prefix,
        today,
        today.replace(day=1),
    )
    return [dict(row) for row in rows]


def new_epoch() -> str:
    return secrets.token_hex(8)
