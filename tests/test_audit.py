"""Audit rows, prompt logging, metrics and logs: nothing lost, nothing leaked."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from neuronetz import audit
from tests.asgi import ASGITransport, lifespan
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, TcpProxy, auth, metric, run_cli, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "a secret recipe"}], "stream": False}


async def rows_for(admin: Admin, column: str, value: Any, count: int, wait: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait
    while True:
        rows = await admin.pool.fetch(f"SELECT * FROM request_log WHERE {column} = $1", value)
        if len(rows) >= count or time.monotonic() > deadline:
            return [dict(row) for row in rows]
        await asyncio.sleep(0.2)


async def test_every_authenticated_request_leaves_a_complete_row(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    tenant = await admin.tenant_of(key)
    headers = {**auth(key), "X-Forwarded-For": "198.51.100.23", "X-Request-ID": "audit-full-1"}
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/api/chat", json={**CHAT, "stream": True}, headers=headers)
    (row,) = await rows_for(admin, "request_id", "audit-full-1", 1)
    tenant_id = await admin.pool.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
    assert row["tenant_id"] == tenant_id
    assert row["key_prefix"] == key[:11]
    assert str(row["client_addr"]) == "198.51.100.23"  # from the trusted proxy's X-Forwarded-For
    assert (row["method"], row["route"], row["model"], row["status"]) == ("POST", "/api/chat", "tiny", 200)
    assert row["backend"].startswith("http://127.0.0.1:")
    assert row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 10)
    assert row["bytes_in"] == len(orjson.dumps({**CHAT, "stream": True}))
    assert row["bytes_out"] == len(response.content)
    assert 0 < row["ttfb_ms"] <= row["duration_ms"]
    assert row["disconnected"] is False
    assert row["error_code"] is None


async def test_refused_requests_are_recorded_with_their_code(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(models=("qwen3",))
    async with httpx.AsyncClient() as client:
        await client.get(gateway.url + "/api/tags", headers={**auth("nz_00000000" + "A" * 43), "X-Request-ID": "a-401"})
        await client.post(gateway.url + "/api/chat", json=CHAT, headers={**auth(key), "X-Request-ID": "a-403"})
        await client.post(gateway.url + "/api/pull", json={}, headers={"X-Request-ID": "a-blocked"})
    (unauthorized,) = await rows_for(admin, "request_id", "a-401", 1)
    (forbidden,) = await rows_for(admin, "request_id", "a-403", 1)
    assert (unauthorized["status"], unauthorized["error_code"], unauthorized["key_prefix"]) == (
        401, "invalid_api_key", None,
    )  # fmt: skip
    assert (forbidden["status"], forbidden["error_code"]) == (403, "model_not_allowed")
    # Refused before authentication: counted in the metrics, not in the audit log.
    assert await rows_for(admin, "request_id", "a-blocked", 1, wait=1.5) == []
    async with httpx.AsyncClient() as client:
        text = (await client.get(gateway.url + "/metrics", headers=auth(METRICS_TOKEN))).text
    assert metric(text, "neuronetz_requests_total", model="", route="unmatched", status="403") >= 1


async def test_prompts_are_stored_only_for_keys_that_opted_in(gateway: GatewayProcess, admin: Admin) -> None:
    silent, logged = await admin.key(), await admin.key(prompt_ttl_days=7)
    async with httpx.AsyncClient() as client:
        for key, request_id in ((silent, "p-silent"), (logged, "p-logged")):
            for stream in (False, True):
                body = {**CHAT, "stream": stream}
                await client.post(gateway.url + "/api/chat", json=body,
                                  headers={**auth(key), "X-Request-ID": f"{request_id}-{stream}"})  # fmt: skip
    await rows_for(admin, "key_prefix", logged[:11], 2)
    await asyncio.sleep(0.5)
    assert await admin.pool.fetchval("SELECT count(*) FROM prompt_log WHERE key_prefix = $1", silent[:11]) == 0
    rows = await admin.pool.fetch("SELECT * FROM prompt_log WHERE key_prefix = $1 ORDER BY request_id", logged[:11])
    assert len(rows) == 2
    for row in rows:
        assert orjson.loads(row["request"]) == {"messages": [{"role": "user", "content": "a secret recipe"}]}
        assert row["response"].startswith("Lorem ipsum dolor")  # assembled from the stream for the streamed one
        assert dt.timedelta(days=6.99) < row["expires_at"] - row["created_at"] <= dt.timedelta(days=7)
    # The metadata row never holds the text.
    metadata = await admin.pool.fetch("SELECT * FROM request_log WHERE key_prefix = $1", logged[:11])
    assert "secret recipe" not in str([dict(r) for r in metadata])


async def test_expired_prompts_disappear(gateway: GatewayProcess, admin: Admin, database_url: str) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await admin.pool.execute(
        "INSERT INTO prompt_log VALUES ($1, 'old-1', 1, 'nz_00000000', 'tiny', $2, '{}', 'x'), "
        "($1, 'fresh-1', 1, 'nz_00000000', 'tiny', $3, '{}', 'y')",
        past - dt.timedelta(days=8), past, past + dt.timedelta(days=1),
    )  # fmt: skip
    result = await asyncio.to_thread(run_cli, "purge-prompts", env={"DATABASE_URL": database_url})
    assert result.returncode == 0
    assert result.stdout.startswith("deleted ")
    left = {r["request_id"] for r in await admin.pool.fetch("SELECT request_id FROM prompt_log")}
    assert "old-1" not in left
    assert "fresh-1" in left


async def test_partitions_are_made_ahead_and_dropped_past_retention(admin: Admin) -> None:
    await admin.pool.execute(
        "CREATE TABLE IF NOT EXISTS request_log_2020_01 PARTITION OF request_log "
        "FOR VALUES FROM ('2020-01-01') TO ('2020-02-01')"
    )
    done = await audit.maintenance(admin.pool, retention_days=90, today=dt.date(2026, 11, 26))
    names = {r["relname"] for r in await admin.pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'request_log'::regclass")}  # fmt: skip
    assert {"request_log_2026_11", "request_log_2026_12", "request_log_2027_01"} <= names
    assert "request_log_2020_01" not in names
    assert done["dropped"] >= 1


async def test_a_month_whose_rows_went_to_the_default_partition_still_gets_its_partition(admin: Admin) -> None:
    """Rows written while maintenance could not run land in the default partition; creating
    their month's partition must move them, not fail at every maintenance run."""
    stray = f"stray-{secrets.token_hex(4)}"
    await admin.pool.execute(
        "INSERT INTO request_log (created_at, request_id, method, route, status, duration_ms) "
        "VALUES ($1, $2, 'POST', '/api/chat', 200, 1)",
        dt.datetime(2031, 5, 15, tzinfo=dt.UTC), stray,
    )  # fmt: skip
    assert await admin.pool.fetchval("SELECT count(*) FROM request_log_default WHERE request_id = $1", stray) == 1
    done = await audit.maintenance(admin.pool, retention_days=36500, today=dt.date(2031, 5, 10))
    assert done["created"] >= 1
    assert await admin.pool.fetchval("SELECT count(*) FROM request_log_2031_05 WHERE request_id = $1", stray) == 1
    assert await admin.pool.fetchval("SELECT count(*) FROM request_log_default WHERE request_id = $1", stray) == 0
    default = await admin.pool.fetchval(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = 'request_log_default'"
    )
    assert default == "DEFAULT"  # attached again


async def test_a_full_queue_drops_prompts_before_metadata_and_counts_both() -> None:
    writer = audit.AuditWriter(None, capacity=4, prompt_capacity=10, retention_days=1)  # type: ignore[arg-type]
    for i in range(6):
        writer.submit((i,), prompt=(i,))
    assert len(writer.records) == 4
    assert len(writer.prompts) == 2  # past half the metadata queue, prompts are shed first
    assert writer.dropped == {"metadata": 2, "prompt": 4}


async def test_sigterm_with_80_requests_in_flight_writes_80_records(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=400, tokens=10)  # 4 s each: long enough to see all 80 at once
    key = await admin.key()
    with GatewayProcess(gateway_env) as process:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            requests = [
                asyncio.create_task(
                    client.post(process.url + "/api/chat", json={**CHAT, "stream": True}, headers=auth(key))
                )
                for _ in range(80)
            ]
            for _ in range(600):  # up to 30 s on a busy machine
                if emulator.stats().in_flight >= 80:
                    break
                await asyncio.sleep(0.05)
            assert emulator.stats().in_flight == 80
            stopping = asyncio.create_task(asyncio.to_thread(process.stop))
            answers = await asyncio.gather(*requests)
            assert await stopping == 0
            log = process.log()
    assert [a.status_code for a in answers] == [200] * 80
    rows = await rows_for(admin, "key_prefix", key[:11], 80, wait=10)
    assert len(rows) == 80, log
    assert all(r["completion_tokens"] == 10 for r in rows)


async def test_a_stop_signalled_while_a_request_runs_still_gets_its_record(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granian starts the lifespan shutdown once the connections are closed, which can come
    before a request's coroutine has handed over its record; here it comes even earlier."""
    emulator.configure(token_delay_ms=100, tokens=5)
    key = await admin.key()
    async with lifespan(gateway_env, monkeypatch) as span:
        assert span.app.worker is not None, span.sent
        async with httpx.AsyncClient(transport=ASGITransport(span.app), base_url="http://gateway") as client:
            answer = asyncio.create_task(client.post("/api/chat", json=CHAT, headers=auth(key)))
            await wait_until(lambda: emulator.stats().in_flight == 1, 30, "the request at the backend")
            stopping = asyncio.create_task(span.stop())
            assert (await answer).status_code == 200
            await stopping
    assert span.sent[-1] == {"type": "lifespan.shutdown.complete"}
    rows = await rows_for(admin, "key_prefix", key[:11], 1, wait=0)
    assert [r["completion_tokens"] for r in rows] == [5]


async def test_records_survive_a_postgres_outage(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    postgres = urlsplit(gateway_env["DATABASE_URL"])
    with TcpProxy(postgres.port or 5432) as proxy:
        env = {**gateway_env, "DATABASE_URL": postgres._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()}
        with GatewayProcess(env) as process:
            async with httpx.AsyncClient() as client:

                async def burst(count: int) -> list[int]:
                    return [
                        (await client.post(process.url + "/api/chat", json=CHAT, headers=auth(key))).status_code
                        for _ in range(count)
                    ]

                before = await burst(10)
                proxy.cut()  # Postgres is gone for the gateway
                during = await burst(30)
                await asyncio.sleep(3)
                during += await burst(10)
                proxy.restore()
                after = await burst(10)
    # The key was verified before the outage and stays usable during it (stale-if-error).
    assert before == during[:10] == after == [200] * 10
    rows = await rows_for(admin, "key_prefix", key[:11], 60, wait=15)
    assert len(rows) == 60
    assert sum(r["status"] == 200 for r in rows) == 60


async def test_metrics_need_the_token_and_sum_every_worker(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    with GatewayProcess(gateway_env, workers=2) as process:
        async with httpx.AsyncClient() as client:
            assert (await client.get(process.url + "/metrics")).status_code == 403
            assert (await client.get(process.url + "/metrics", headers=auth("wrong"))).status_code == 403
            for _ in range(40):  # new connections: spread over both workers
                async with httpx.AsyncClient() as fresh:
                    await fresh.post(process.url + "/api/chat", json=CHAT, headers=auth(key))
            await asyncio.sleep(1.5)  # each worker publishes its numbers every second
            response = await client.get(process.url + "/metrics", headers=auth(METRICS_TOKEN))
    text = response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(text, "neuronetz_workers") == 2
    assert metric(text, "neuronetz_requests_total", model="tiny:latest", route="/api/chat", status="200") == 40
    assert metric(text, "neuronetz_tokens_total", direction="completion", model="tiny:latest") == 400
    assert metric(text, "neuronetz_request_duration_seconds_count", route="/api/chat") == 40
    assert metric(text, "neuronetz_gateway_overhead_seconds_count") == 40
    for name in ("neuronetz_in_flight_requests", "neuronetz_audit_queue_depth", "neuronetz_backend_up",
                 "neuronetz_audit_records_written_total", "neuronetz_audit_records_dropped_total",
                 "neuronetz_refusals_total", "neuronetz_backend_first_byte_seconds"):  # fmt: skip
        assert f"# TYPE {name} " in text
    assert key[11:] not in text
    assert "secret recipe" not in text


async def test_metrics_are_off_without_a_token(gateway_env: dict[str, str]) -> None:
    with GatewayProcess({**gateway_env, "GATEWAY_METRICS_TOKEN": ""}) as process:
        async with httpx.AsyncClient() as client:
            assert (await client.get(process.url + "/metrics", headers=auth("anything"))).status_code == 404


async def test_one_json_log_line_per_request_without_secrets_or_prompts(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(prompt_ttl_days=1)
    async with httpx.AsyncClient() as client:
        await client.post(gateway.url + "/api/chat", json=CHAT, headers={**auth(key), "X-Request-ID": "log-line-1"})
    await asyncio.sleep(0.3)
    lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    (entry,) = [line for line in lines if line.get("request_id") == "log-line-1"]
    assert entry["msg"] == "request"
    assert entry["key"] == key[:11]
    assert (entry["route"], entry["status"], entry["model"]) == ("/api/chat", 200, "tiny")
    assert entry["completion_tokens"] == 10
    assert entry["duration_ms"] > 0
    log = gateway.log()
    assert key[11:] not in log
    assert "secret recipe" not in log


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_audit_command_shows_recent_records(
    gateway: GatewayProcess, admin: Admin, database_url: str, as_json: bool
) -> None:
    key = await admin.key()
    tenant = await admin.tenant_of(key)
    async with httpx.AsyncClient() as client:
        for i in range(3):
            await client.post(gateway.url + "/api/chat", json=CHAT, headers={**auth(key), "X-Request-ID": f"cli-{i}"})
    await rows_for(admin, "key_prefix", key[:11], 3)
    args = ["audit", "--tenant", tenant, "--since", "10m", "--limit", "2", *(["--json"] if as_json else [])]
    result = await asyncio.to_thread(run_cli, *args, env={"DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    if as_json:
        records = orjson.loads(result.stdout)
        assert [r["request_id"] for r in records] == ["cli-2", "cli-1"]
        assert records[0]["key_prefix"] == key[:11]
    else:
        lines = result.stdout.splitlines()
        assert lines[0].split()[:3] == ["TIME", "REQUEST", "ID"]
        assert len(lines) == 3
        assert "cli-2" in lines[1]
    wrong = await asyncio.to_thread(run_cli, "audit", "--since", "yesterday-ish", env={"DATABASE_URL": database_url})
    assert wrong.returncode == 1
    assert "--since takes an ISO 8601 time" in wrong.stderr
