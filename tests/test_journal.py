"""The crash journal: a worker killed without warning loses no finished request's usage or
audit record; nothing is counted twice."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.asgi import open_worker
from tests.support import Admin, GatewayProcess, TcpProxy, auth, ledger_settles

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "count to ten"}], "stream": False}


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


async def journal_records(redis_url: str, prefix: str) -> int:
    """Records in every journal of this run (each stream entry holds one loop turn's records)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        total = 0
        async for key in client.scan_iter(match=prefix + "journal:*"):
            entries: list[Any] = await client.xrange(key) or []
            total += sum(len(orjson.loads(fields[b"v"])) for _, fields in entries)
        return total
    finally:
        await client.aclose()


async def test_a_sigkilled_worker_loses_no_finished_request(
    gateway_env: dict[str, str], admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    """The victim cannot reach Postgres (so nothing it finished is written before it dies);
    its worker is SIGKILLed; another worker writes everything the dead one finished, once."""
    key = await admin.key()
    run = secrets.token_hex(4)
    postgres = urlsplit(gateway_env["DATABASE_URL"])
    with TcpProxy(postgres.port or 5432) as proxy:
        cut_env = {**gateway_env, "DATABASE_URL": postgres._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()}
        with GatewayProcess(cut_env) as victim, GatewayProcess(gateway_env):
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as client:

                async def chat(i: int) -> httpx.Response:
                    return await client.post(victim.url + "/api/chat", json=CHAT,
                                             headers={**auth(key), "X-Request-ID": f"{run}-{i}"})  # fmt: skip

                first = await chat(0)  # the key is cached from here on
                assert first.status_code == 200
                before = await journal_records(redis_url, redis_prefix)
                proxy.cut()
                answers = [first, *await asyncio.gather(*(chat(i) for i in range(1, 61)))]
                assert [a.status_code for a in answers] == [200] * 61
                for _ in range(100):  # the journal has the 60 requests' usage and audit records
                    if await journal_records(redis_url, redis_prefix) >= before + 120:
                        break
                    await asyncio.sleep(0.05)
                (worker,) = children(victim.process.pid)  # type: ignore[union-attr]
                os.kill(worker, signal.SIGKILL)
            tokens = sum(a.json()["prompt_eval_count"] + a.json()["eval_count"] for a in answers)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                audited = await admin.pool.fetchval("SELECT count(*) FROM request_log WHERE request_id LIKE $1",
                                                    f"{run}-%")  # fmt: skip
                ledger = await admin.pool.fetchrow(
                    "SELECT sum(requests) AS requests, sum(prompt_tokens + completion_tokens) AS tokens "
                    "FROM usage_daily u JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = $1", key[:11],
                )  # fmt: skip
                # Written by whichever worker takes the dead one's journal over: the other replica
                # or the worker Granian starts in its place.
                if audited >= 61 and ledger is not None and (ledger["requests"] or 0) >= 61:
                    break
                await asyncio.sleep(0.25)
    assert audited == 61
    assert ledger is not None
    assert (ledger["requests"], ledger["tokens"]) == (61, tokens)


async def key_and_ids(admin: Admin) -> tuple[str, int, int]:
    """A new key, its id and its tenant's id."""
    key = await admin.key()
    row = await admin.pool.fetchrow("SELECT id, tenant_id FROM api_keys WHERE prefix = $1", key[:11])
    assert row is not None
    return key, row["id"], row["tenant_id"]


async def plant_dead_journal(redis_url: str, prefix: str, worker: str, turns: list[dict[bytes, bytes]]) -> None:
    """A journal of `worker` with one stream entry per turn (as written, or damaged), and no
    heartbeat: the worker is dead."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for number, fields in enumerate(turns, 1):
            await client.xadd(f"{prefix}journal:{worker}", fields, id=f"{number}-1")  # type: ignore[arg-type]
        await client.sadd(prefix + "journals", worker)
    finally:
        await client.aclose()


async def test_an_unreadable_journal_entry_is_skipped_and_the_others_handed_on_once(
    gateway_env: dict[str, str], admin: Admin, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, key_id, tenant_id = await key_and_ids(admin)
    prefix = f"{redis_prefix}damaged{secrets.token_hex(2)}:"  # journals of this test only
    dead = "damaged-host-1-abcdef"
    turns = [
        [[1, "u", [key_id, tenant_id, "2026-11-30", 1, 2, "tiny:latest"]], [2, "u", [key_id, "x"]], [3, "a", [7]],
         [4, "u", [key_id, tenant_id, "not a day", 1, 2, "tiny:latest"]], "junk"],
        {"not": "a list"},
        [[5, "u", [key_id, tenant_id, "2026-11-30", 10, 20, "tiny:latest"]]],
    ]  # fmt: skip
    await plant_dead_journal(redis_url, prefix, dead, [*({b"v": orjson.dumps(t)} for t in turns), {b"x": b"no v"}])
    async with open_worker({**gateway_env, "REDIS_KEY_PREFIX": prefix}) as worker:
        worker.journal.connected_since = asyncio.get_running_loop().time() - 60
        assert await worker.journal.replay_dead() == 2  # the two good entries, once
        assert await worker.journal.replay_dead() == 0  # the journal is gone: nothing is handed on twice
    skipped = [r for r in caplog.records if r.getMessage() == "unreadable journal entry skipped"]
    assert len(skipped) == 6
    assert all(r.__dict__["fields"]["worker"] == dead for r in skipped)
    await ledger_settles(admin, key, 33)


async def test_an_older_workers_journal_still_replays_its_usage_under_no_model_and_its_audit_records(
    gateway_env: dict[str, str], admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    """A worker of a version whose ledger knew no models journals usage as [key, tenant, day,
    prompt, completion]; one of today's workers takes its journal over (an upgrade that
    replaces workers killed mid-flight): that usage lands under model '', the entries with a
    model under theirs, each once. Its audit records, without the columns added since, are
    written with those NULL."""
    key, key_id, tenant_id = await key_and_ids(admin)
    prefix = f"{redis_prefix}older{secrets.token_hex(2)}:"  # journals of this test only
    dead = "old-host-7-abcdef"
    audit_record = [
        "2026-11-30T12:00:00+00:00", f"older-{prefix}", tenant_id, key[:11], "127.0.0.1", "POST", "/api/chat",
        "tiny:latest", None, 200, None, False, 10, 20, 30, 40, 1.5, 2.5, False, None,
    ]  # fmt: skip
    entries = [
        [1, "u", [key_id, tenant_id, "2026-11-30", 10, 20]],  # written by the older worker
        [2, "u", [key_id, tenant_id, "2026-11-30", 1, 2, "tiny:latest"]],
        [3, "u", [key_id, tenant_id, "2026-11-30", 100, 200]],
        [4, "a", audit_record],  # with the columns of its version
    ]
    await plant_dead_journal(redis_url, prefix, dead, [{b"v": orjson.dumps(entries)}])
    async with open_worker({**gateway_env, "REDIS_KEY_PREFIX": prefix}) as worker:
        # As if this worker's own heartbeats had succeeded for long enough to judge others dead.
        worker.journal.connected_since = asyncio.get_running_loop().time() - 60
        assert await worker.journal.replay_dead() == 4
    rows = await admin.pool.fetch(
        "SELECT day, model, requests, prompt_tokens, completion_tokens FROM usage_daily WHERE key_id = $1 "
        "ORDER BY model", key_id,
    )  # fmt: skip
    day = dt.date(2026, 11, 30)
    assert [tuple(r) for r in rows] == [(day, "", 2, 110, 220), (day, "tiny:latest", 1, 1, 2)]
    audited = await admin.pool.fetchrow("SELECT * FROM request_log WHERE request_id = $1", f"older-{prefix}")
    assert audited is not None
    assert (audited["completion_tokens"], audited["queue_wait_ms"]) == (20, None)


async def test_each_turns_entry_goes_on_the_wire_without_waiting_for_the_last_and_arrives_in_order(
    gateway_env: dict[str, str], redis_prefix: str
) -> None:
    """On one Redis server the journal writes each turn's entry on the worker's wire in the
    next turn, without waiting for the answer to the one before (the wire's one connection
    keeps them in order: Redis refuses an entry whose id is below the stream's last)."""
    prefix = f"{redis_prefix}wire{secrets.token_hex(2)}:"
    async with open_worker({**gateway_env, "REDIS_KEY_PREFIX": prefix}) as worker:
        journal = worker.journal
        assert journal.wire is not None
        assert journal.wire is worker.limiter.wire
        written: list[asyncio.Future[list[Any]]] = []
        for turn in range(1, 6):
            journal.usage(turn, 1, dt.date(2026, 12, 2), turn, 0, "tiny")
            journal.usage(turn, 1, dt.date(2026, 12, 2), turn, 1, "tiny")  # the same turn: the same entry
            await asyncio.sleep(0)  # the turn that writes it
            assert journal._written is not None  # written by then
            written.append(journal._written)
        assert len({id(future) for future in written}) == 5  # each turn's, none held back
        answers = await asyncio.wait_for(asyncio.gather(*written), 10)
        entries: list[Any] = await worker.redis.xrange(journal.stream(journal.worker)) or []
    assert all(not isinstance(reply, Exception) for answer in answers for reply in answer)
    assert [entry_id for entry_id, _ in entries] == [f"{2 * turn}-1".encode() for turn in range(1, 6)]
    assert [[record[2][0] for record in orjson.loads(fields[b"v"])] for _, fields in entries] == [
        [turn, turn] for turn in range(1, 6)
    ]
