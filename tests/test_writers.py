"""The batch writers and their background tasks: one bad record never blocks the others, no
task dies silently, an outage is one log line with a count rather than one per request."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from neuronetz import audit, tasks
from neuronetz.budgets import Ledger
from neuronetz.logs import Throttled
from tests.support import Admin, GatewayProcess, auth, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": False}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def record(request_id: str, *, model: str = "tiny", prompt_tokens: int = 3) -> audit.Record:
    return audit.Record(
        dt.datetime.now(dt.UTC), request_id, None, None, None, "POST", "/api/chat", model, None, 200, None, False,
        prompt_tokens, 5, 10, 20, 1.0, 2.0, False, None,
    )  # fmt: skip


def prompt(request_id: str, created: dt.datetime, text: str) -> tuple[Any, ...]:
    return (created, request_id, 1, "nz_test0000", "tiny", created + dt.timedelta(days=1), text, "answer")


async def test_poisoned_audit_rows_are_repaired_or_dropped_and_the_rest_written(
    pool: asyncpg.Pool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    run = secrets.token_hex(4)
    writer = audit.AuditWriter(pool, capacity=1000, prompt_capacity=100, retention_days=30)
    good = [record(f"{run}-good-{i}") for i in range(50)]
    nul = record(f"{run}-nul", model="llama3.2\x00")  # text refuses U+0000
    overflow = record(f"{run}-overflow", prompt_tokens=2_300_000_000)  # beyond int4
    unstorable = (None, *record(f"{run}-bad-date")[1:])  # created_at is NOT NULL
    for row in [*good[:20], nul, *good[20:40], overflow, unstorable, *good[40:]]:
        writer.submit(row)
    created = dt.datetime.now(dt.UTC)
    writer.prompts.extend([
        prompt(f"{run}-p-ok", created, '{"prompt": "fine"}'),
        prompt(f"{run}-p-nul", created, '{"prompt": "a\\u0000b"}'),  # jsonb refuses the \\u0000 escape
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="neuronetz.audit"):
        assert await asyncio.wait_for(writer.flush(), 30)
    rows = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM request_log WHERE request_id LIKE $1",
                                                         f"{run}-%")}  # fmt: skip
    assert {f"{run}-good-{i}" for i in range(50)} <= rows.keys()
    assert rows[f"{run}-nul"]["model"] == "llama3.2"
    assert rows[f"{run}-overflow"]["prompt_tokens"] == 2**31 - 1
    assert f"{run}-bad-date" not in rows
    prompts = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM prompt_log WHERE request_id LIKE $1",
                                                            f"{run}-%")}  # fmt: skip
    assert prompts.keys() == {f"{run}-p-ok", f"{run}-p-nul"}
    assert prompts[f"{run}-p-nul"]["request"] == '{"prompt": "ab"}'
    assert (writer.written, writer.repaired, writer.invalid) == (52, 3, {"metadata": 1, "prompt": 0})
    assert not writer.records
    assert not writer.prompts
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dropped) == 1
    assert dropped[0].__dict__["fields"]["request_id"] == f"{run}-bad-date"


async def test_a_burst_of_audit_records_is_written_at_once_in_short_batches(
    pool: asyncpg.Pool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding a batch for COPY holds the event loop: a burst goes out in batches of at most
    BATCH records, each as soon as it is queued, not in one big batch when the timer fires."""
    monkeypatch.setattr(audit, "FLUSH_INTERVAL", 60.0)  # only the queue's length can start a write
    sizes: list[int] = []
    copy = audit.AuditWriter._write_records

    async def counted(connection: Any, records: Any) -> None:
        sizes.append(len(records))
        await copy(connection, records)

    monkeypatch.setattr(audit.AuditWriter, "_write_records", staticmethod(counted))
    run = secrets.token_hex(4)
    burst = 600  # a bit over half a second of requests at c=1
    writer = audit.AuditWriter(pool, capacity=10_000, prompt_capacity=100, retention_days=30)
    writer.start()
    try:
        for i in range(burst):
            writer.submit(record(f"{run}-{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0)  # requests come one loop turn after another
        deadline = time.monotonic() + 20
        while writer.written < burst - burst % audit.BATCH:  # the rest waits for the timer
            assert time.monotonic() < deadline, f"written {writer.written} of {burst}: {sizes}"
            await asyncio.sleep(0.02)
    finally:
        await writer.stop()
    assert writer.written == burst
    assert max(sizes) <= audit.BATCH <= 300, sizes
    count = await pool.fetchval("SELECT count(*) FROM request_log WHERE request_id LIKE $1", f"{run}-%")
    assert count == burst


async def test_a_poisoned_ledger_row_is_dropped_and_everyone_elses_usage_written(
    pool: asyncpg.Pool[Any], admin: Admin
) -> None:
    keys = [await admin.key() for _ in range(3)]
    ids = await pool.fetch("SELECT id, tenant_id FROM api_keys WHERE prefix = ANY($1::text[]) ORDER BY id",
                           [k[:11] for k in keys])  # fmt: skip
    ledger = Ledger(pool)
    for row in ids:
        ledger.record(row["id"], row["tenant_id"], 10, 20, model="tiny:latest")
    ledger.record(-1, ids[0]["tenant_id"], 1, 1, model="tiny")  # no such key: a foreign-key violation, every time
    ledger.record(ids[1]["id"], ids[1]["tenant_id"], -(10**30), 10**30, model="tiny:latest")  # clamped on the way in
    await asyncio.wait_for(ledger.flush(), 30)
    assert ledger.pending == {}
    assert ledger.dropped == 1
    rows = await pool.fetch("SELECT key_id, requests, prompt_tokens, completion_tokens FROM usage_daily "
                            "WHERE key_id = ANY($1::bigint[]) ORDER BY key_id", [r["id"] for r in ids])  # fmt: skip
    assert [tuple(r) for r in rows] == [
        (ids[0]["id"], 1, 10, 20), (ids[1]["id"], 2, 10, 20 + 2**40), (ids[2]["id"], 1, 10, 20),
    ]  # fmt: skip


async def _count(admin: Admin, sql: str, expected: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        count = int(await admin.pool.fetchval(sql))
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


async def test_nul_characters_do_not_stop_the_audit_of_later_requests(gateway: GatewayProcess, admin: Admin) -> None:
    """A NUL in `model` (from a key not even allowed that model) and a NUL in the prompt of a
    prompt-logging key: Postgres refuses both as sent; every later request is still audited."""
    restricted = await admin.key(models=("qwen3",))
    logged = await admin.key(prompt_ttl_days=1)
    key = await admin.key()
    nul_prompt = {**CHAT, "messages": [{"role": "user", "content": "a\x00b"}]}
    async with httpx.AsyncClient() as client:
        poisoned = await client.post(gateway.url + "/api/chat", json={**CHAT, "model": "llama3.2\x00"},
                                     headers={**auth(restricted), "X-Request-ID": "nul-model-1"})  # fmt: skip
        assert poisoned.status_code in (400, 403)
        await client.post(gateway.url + "/api/chat", json=nul_prompt,
                          headers={**auth(logged), "X-Request-ID": "nul-prompt-1"})  # fmt: skip
        await asyncio.sleep(1.5)  # the poisoned records get a batch of their own
        for i in range(5):
            answer = await client.post(gateway.url + "/api/chat", json=CHAT,
                                       headers={**auth(key), "X-Request-ID": f"after-nul-{i}"})  # fmt: skip
            assert answer.status_code == 200
    assert await _count(admin, "SELECT count(*) FROM request_log WHERE request_id LIKE 'after-nul-%'", 5) == 5
    assert await _count(admin, "SELECT count(*) FROM prompt_log WHERE request_id = 'nul-prompt-1'", 1) == 1


async def test_a_failing_background_task_is_logged_restarted_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    third = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise OverflowError("int too big to convert")
        third.set()
        await asyncio.Event().wait()

    supervisor = tasks.Supervisor()
    before = tasks.RESTARTS["test.flaky"]
    with caplog.at_level(logging.ERROR, logger="neuronetz.tasks"):
        supervisor.start("test.flaky", flaky)
        try:
            await asyncio.wait_for(third.wait(), 10)
        finally:
            await supervisor.stop()
    assert len(runs) == 3
    assert tasks.RESTARTS["test.flaky"] - before == 2
    failures = [r for r in caplog.records if r.name == "neuronetz.tasks"]
    assert len(failures) == 2
    assert all(r.exc_info for r in failures)


async def test_a_periodic_step_runs_again_after_each_interval() -> None:
    calls: list[float] = []
    third = asyncio.Event()

    async def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            third.set()

    supervisor = tasks.Supervisor()
    started = time.monotonic()
    supervisor.every("test.periodic", 0.05, step)
    try:
        await asyncio.wait_for(third.wait(), 10)
    finally:
        await supervisor.stop()
    # the first run waits one interval too (the loop's clock may round a little: 0.04)
    assert calls[0] - started >= 0.04
    assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(calls))


async def test_a_batch_on_its_way_to_postgres_when_the_writer_stops_is_written_not_lost(
    pool: asyncpg.Pool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop of a worker used to cancel the writer in the middle of its batch: the batch
    was then neither in Postgres nor in the queue the last flush writes."""
    run = secrets.token_hex(4)
    writer = audit.AuditWriter(pool, capacity=10 * audit.BATCH, prompt_capacity=100, retention_days=30)
    writing, release = asyncio.Event(), asyncio.Event()
    write = writer._write

    async def slow_write(records: Any, prompts: Any) -> None:
        writing.set()
        await release.wait()
        await write(records, prompts)

    monkeypatch.setattr(writer, "_write", slow_write)
    writer.start()
    for i in range(audit.BATCH + 5):  # a full batch wakes the writer; five wait for the next one
        writer.submit(record(f"{run}-{i}"))
    await asyncio.wait_for(writing.wait(), 10)
    stopping = asyncio.create_task(writer.stop())
    await wait_until(lambda: not writer.tasks.tasks, 10, "the stop to cancel the writer's loop")
    release.set()
    await asyncio.wait_for(stopping, 30)
    written = await pool.fetchval("SELECT count(*) FROM request_log WHERE request_id LIKE $1", f"{run}-%")
    assert written == audit.BATCH + 5


def test_an_outage_warning_is_logged_once_then_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("neuronetz.test")
    warn = Throttled(log, "store down", interval=0.2)
    with caplog.at_level(logging.WARNING, logger="neuronetz.test"):
        for _ in range(500):
            warn(error="ConnectionError")
        time.sleep(0.25)
        warn(error="ConnectionError")
    lines = [r for r in caplog.records if r.name == "neuronetz.test"]
    assert len(lines) == 2
    assert lines[1].__dict__["fields"] == {"error": "ConnectionError", "repeated": 499}
