"""Fair sharing: backend slots, the fair queue in Redis, and their invariants.

The queue's order is checked on the Lua script itself, one grant at a time, so it is exact;
the gateway tests check what a client and the emulator see: never more requests at a backend
than its slots, a waiter that leaves holds nothing, bounded waiting in both dialects.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from neuronetz import backends, config, metrics, models, tenants
from neuronetz.auth import KeyRecord
from neuronetz.limits import Limits, Subject
from neuronetz.slots import Scheduler
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess, audit_row, auth, forwarded, free_port, metric, run_cli

SCRIPT = (Path(__file__).resolve().parent.parent / "neuronetz" / "slots.lua").read_text()
CHANNEL = "test-grants"
STREAM = {"model": "tiny", "prompt": "hi", "stream": True}


# --- configuration ------------------------------------------------------------------------------


def test_plain_backend_lists_stay_valid_and_slots_are_per_backend() -> None:
    assert config.parse_backends("http://a:11434, http://b:11434/") == ("http://a:11434", "http://b:11434")
    assert config.backend_specs("http://a:11434;slots=4,http://b:11434") == {
        "http://a:11434": 4,
        "http://b:11434": None,
    }
    settings = config.load(None, {"OLLAMA_BACKENDS": "http://a:11434;slots=0", "GATEWAY_BACKEND_SLOTS": "2"})
    assert settings.ollama_backends == ("http://a:11434",)
    assert settings.slots_by_backend == {"http://a:11434": 0}
    assert settings.backend_slots == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("http://a:11434;slot=4", "unknown option 'slot=4'"),
        ("http://a:11434;slots=-1", "between 0 and 4096"),
        ("http://a:11434;slots=four", "whole number"),
    ],
)
def test_bad_backend_options_are_named(raw: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.backend_specs(raw)


def test_add_and_remove_backend_keep_the_other_backends_slots(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("OLLAMA_BACKENDS=http://a:11434;slots=4\n")
    change, text = backends.plan_backends_change(env, "http://b:11434", add=True)
    assert change.line == 'OLLAMA_BACKENDS="http://a:11434;slots=4,http://b:11434"'
    env.write_text(text)
    change, text = backends.plan_backends_change(env, "http://b:11434;slots=2", add=True)
    assert change.changed
    assert change.line == 'OLLAMA_BACKENDS="http://a:11434;slots=4,http://b:11434;slots=2"'
    env.write_text(text)
    change, _ = backends.plan_backends_change(env, "http://a:11434", add=False)
    assert change.line == 'OLLAMA_BACKENDS="http://b:11434;slots=2"'


async def test_weight_is_stored_with_the_tenant(admin: Admin) -> None:
    name = f"t-{secrets.token_hex(4)}"
    created = await tenants.create_tenant(admin.pool, name, Limits(), weight=3)
    assert created.weight == 3
    updated = await tenants.update_tenant(admin.pool, name, {"weight": 5, "rpm": 10})
    assert (updated.weight, updated.limits.rpm) == (5, 10)


def test_weight_on_the_command_line(database_url: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env={"DATABASE_URL": database_url})

    name = f"t-{secrets.token_hex(4)}"
    created = run("create-tenant", "--name", name, "--weight", "3")
    assert created.stdout == f"created tenant {name} (unlimited; weight 3)\n", created
    changed = run("set-limits", "--tenant", name, "--weight", "1")
    assert changed.stdout == f"tenant {name}: unlimited\n", changed
    listed = orjson.loads(run("list-tenants", "--json").stdout)
    assert next(t for t in listed if t["name"] == name)["weight"] == 1

    def weight_column() -> tuple[str, str]:
        header, *rows = run("list-tenants").stdout.splitlines()
        return header.split()[-1], next(row for row in rows if row.startswith(name + " ")).split()[-1]

    assert weight_column() == ("WEIGHT", "1")
    assert run("set-limits", "--tenant", name, "--weight", "7").returncode == 0
    assert weight_column() == ("WEIGHT", "7")
    for bad in ("0", "1001", "x"):
        refused = run("create-tenant", "--name", name + "b", "--weight", bad)
        assert refused.returncode == 1
        assert "--weight must be" in refused.stderr
        assert "Traceback" not in refused.stderr


# --- the queue's order, on the script --------------------------------------------------------------


class Queue:
    """The script on one model's fresh keys, driven one call at a time."""

    def __init__(self, client: aioredis.Redis, base: str) -> None:
        self.script = client.register_script(SCRIPT)
        self.client = client
        self.base = base

    async def acquire(self, waiter: str, tenant: int, key: int, weight: int = 1, *, slots: int = 1,
                      depth: int = 100, ttl_ms: int = 60000, cands: list[Any] | None = None) -> list[Any]:  # fmt: skip
        cands = cands if cands is not None else ["b1", slots, 0]
        reply: list[Any] = await self.script(
            keys=[self.base],
            args=["acquire", CHANNEL, waiter, tenant, key, weight, ttl_ms, 60000, depth, *cands],
        )
        return [v.decode() if isinstance(v, bytes) else v for v in reply]

    async def release(self, waiter: str, tenant: int, key: int, backend: str = "b1", slots: int = 1) -> str | None:
        """Release `waiter`'s slot; returns the waiter the freed slot went to, if any."""
        await self.script(
            keys=[self.base], args=["release", CHANNEL, waiter, tenant, key, backend, 60000, "b1", slots, 0]
        )
        granted = [k async for k in self.client.scan_iter(match=self.base + "g:*")]
        if not granted:
            return None
        assert len(granted) == 1
        await self.client.delete(granted[0])  # taken, as the waiter's replica would
        return str(granted[0].decode().rsplit(":", 1)[1])

    async def in_use(self, backend: str = "b1") -> int:
        count: int = await self.client.zcard(self.base + "s:" + backend)
        return count


@pytest_asyncio.fixture
async def queue(redis_url: str, redis_prefix: str) -> AsyncIterator[Queue]:
    client = aioredis.Redis.from_url(redis_url)
    base = f"{redis_prefix}{{slots:test-{secrets.token_hex(4)}}}:"
    try:
        yield Queue(client, base)
    finally:
        keys = [k async for k in client.scan_iter(match=base.replace("{", "\\{").replace("}", "\\}") + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def drain(queue: Queue, holder: str, owners: dict[str, tuple[int, int]], count: int) -> list[str]:
    """Release the slot `count` times, each time from whoever got it last; the grant order."""
    order: list[str] = []
    current = holder
    for _ in range(count):
        tenant, key = owners[current]
        granted = await queue.release(current, tenant, key)
        assert granted is not None
        assert await queue.in_use() == 1  # the freed slot went straight to the next waiter
        order.append(granted)
        current = granted
    return order


async def test_backlogged_tenants_get_slots_in_proportion_to_their_weights(queue: Queue) -> None:
    assert (await queue.acquire("hold", 9, 90))[0] == 1
    owners = {"hold": (9, 90)}
    for i in range(12):
        for tenant, weight in ((1, 3), (2, 1)):
            waiter = f"t{tenant}-{i}"
            owners[waiter] = (tenant, tenant * 10)
            assert (await queue.acquire(waiter, tenant, tenant * 10, weight))[0] == 2
    order = await drain(queue, "hold", owners, 16)
    tenants_served = [owners[w][0] for w in order]
    assert tenants_served.count(1) == 12
    assert tenants_served.count(2) == 4
    # Interleaved, not in blocks: every window of four holds three of the heavier tenant.
    for start in range(0, 16, 4):
        assert tenants_served[start : start + 4].count(1) == 3
    assert [w for w in order if w.startswith("t1")] == [f"t1-{i}" for i in range(12)]  # FIFO in a key


async def test_keys_of_a_tenant_take_turns_and_each_key_is_fifo(queue: Queue) -> None:
    assert (await queue.acquire("hold", 9, 90))[0] == 1
    owners = {"hold": (9, 90)}
    for i in range(3):
        owners[f"a{i}"] = (1, 11)
        await queue.acquire(f"a{i}", 1, 11)
    owners["b0"] = (1, 12)
    await queue.acquire("b0", 1, 12)
    assert await drain(queue, "hold", owners, 4) == ["a0", "b0", "a1", "a2"]


async def test_an_idle_tenant_earns_no_credit_and_a_returning_one_is_served_next(queue: Queue) -> None:
    assert (await queue.acquire("hold", 9, 90))[0] == 1
    owners = {"hold": (9, 90)}
    for i in range(6):
        owners[f"a{i}"] = (1, 11)
        await queue.acquire(f"a{i}", 1, 11)
    order = await drain(queue, "hold", owners, 3)  # tenant 1 alone: work-conserving
    owners["b0"] = (2, 21)
    await queue.acquire("b0", 2, 21)
    order += await drain(queue, order[-1], owners, 3)
    assert order == ["a0", "a1", "a2", "b0", "a3", "a4"]


async def test_slots_are_never_exceeded_and_a_dead_waiter_is_skipped(queue: Queue) -> None:
    assert (await queue.acquire("r1", 1, 11, slots=2))[0] == 1
    assert (await queue.acquire("r2", 1, 11, slots=2))[0] == 1
    assert (await queue.acquire("dead", 2, 21, slots=2, ttl_ms=1))[0] == 2
    assert (await queue.acquire("live", 3, 31, slots=2))[0] == 2
    assert await queue.in_use() == 2
    deadline = time.monotonic() + 5
    while await queue.client.zscore(queue.base + "w", "dead") is not None:  # expire "dead" (1 ms ttl)
        if (await queue.client.zscore(queue.base + "w", "dead") or 0) < await server_ms(queue.client):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await queue.release("r1", 1, 11, slots=2) == "live"
    assert await queue.in_use() == 2
    assert await queue.client.hget(queue.base + "n", "2") == b"0"  # the dead waiter no longer counts


async def test_queue_depth_is_bounded_per_tenant(queue: Queue) -> None:
    assert (await queue.acquire("hold", 9, 90))[0] == 1
    assert (await queue.acquire("w1", 1, 11, depth=2))[0] == 2
    assert (await queue.acquire("w2", 1, 12, depth=2))[0] == 2
    assert await queue.acquire("w3", 1, 11, depth=2) == [0, "queue_full"]
    assert (await queue.acquire("x1", 2, 21, depth=2))[0] == 2  # another tenant's depth is its own


async def test_a_leaving_waiter_holds_nothing_and_a_loaded_backend_is_preferred(queue: Queue) -> None:
    cands: list[Any] = ["cold", 1, 1, "warm", 1, 0]
    assert await queue.acquire("r1", 1, 11, cands=cands) == [1, "warm"]
    assert await queue.acquire("r2", 1, 11, cands=cands) == [1, "cold"]  # warm is full: work-conserving
    assert (await queue.acquire("w", 2, 21, cands=cands))[0] == 2
    await queue.script(keys=[queue.base], args=["release", CHANNEL, "w", 2, 21, "", 60000, *cands])
    assert await queue.client.zcard(queue.base + "w") == 0
    assert await queue.client.llen(queue.base + "q:21") == 0
    assert await queue.client.zcard(queue.base + "tq") == 0
    assert await queue.in_use("warm") + await queue.in_use("cold") == 2


async def server_ms(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds * 1000 + micros / 1000


# --- through the gateway --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fair_env(gateway_env: dict[str, str], emulator: Emulator) -> dict[str, str]:
    # The per-backend override (`;slots=2`) over a default of no queue: the syntax end to end.
    return {**gateway_env, "OLLAMA_BACKENDS": f"{emulator.url};slots=2", "GATEWAY_QUEUE_MAX_DEPTH": "2"}


@pytest.fixture(scope="module")
def fair(fair_env: dict[str, str]) -> Iterator[GatewayProcess]:
    with GatewayProcess(fair_env) as process:
        yield process


@pytest.fixture(scope="module")
def impatient(fair_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A second replica sharing the slots through Redis, that waits at most half a second."""
    with GatewayProcess({**fair_env, "GATEWAY_QUEUE_MAX_WAIT": "0.5"}) as process:
        yield process


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


async def ready_for_budgets(client: httpx.AsyncClient, url: str, key: str) -> None:
    """A fresh Redis prefix answers a tenant's first budgeted request with 503 while its
    counters are rebuilt; wait that out."""
    deadline = time.monotonic() + 10
    body = {**STREAM, "stream": False, "options": {"num_predict": 1}}
    while (await client.post(url + "/api/generate", json=body, headers=auth(key))).status_code == 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


class Holder:
    """A stream that holds a slot until closed."""

    def __init__(self, client: httpx.AsyncClient, url: str, key: str) -> None:
        self.client, self.url, self.key = client, url, key
        self.task: asyncio.Task[int] | None = None
        self.started = asyncio.Event()

    async def _run(self) -> int:
        async with self.client.stream("POST", self.url + "/api/generate", json=STREAM, headers=auth(self.key)) as r:
            self.started.set()
            async for _ in r.aiter_lines():
                pass
            return r.status_code

    async def __aenter__(self) -> Holder:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def waiting_key(redis_prefix: str) -> str:
    return f"{redis_prefix}{{slots:{models.normalize('tiny')}}}:n"


async def test_the_backend_never_gets_more_than_its_slots(fair: GatewayProcess, emulator: Emulator,
                                                           admin: Admin) -> None:  # fmt: skip
    emulator.configure(tokens=5, token_delay_ms=10)
    keys = [await admin.key() for _ in range(6)]  # two requests each: within the depth of 2
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(
            *(
                client.post(fair.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(keys[i % 6]))
                for i in range(12)
            )
        )
    assert [a.status_code for a in answers] == [200] * 12
    assert emulator.stats().peak_generations == 2  # all slots used, never more
    assert all(a.headers.get("x-queue-wait-ms", "").isdigit() for a in answers)
    assert max(int(a.headers["x-queue-wait-ms"]) for a in answers) > 0  # some waited in the gateway
    logged = [orjson.loads(line) for line in fair.log().splitlines() if '"queue_wait_ms"' in line]
    assert any(entry["queue_wait_ms"] for entry in logged)


async def test_a_waiter_that_leaves_holds_nothing(fair: GatewayProcess, emulator: Emulator, admin: Admin,
                                                  redis_url: str, redis_prefix: str) -> None:  # fmt: skip
    emulator.configure(tokens=10_000, token_delay_ms=20)
    holder_key = await admin.key()
    tenant = await admin.tenant(daily_tokens=1_000_000)
    waiter_key = await admin.key(tenant)
    tenant_id = await tenants.tenant_id(admin.pool, tenant)
    client_redis = aioredis.Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await ready_for_budgets(client, fair.url, waiter_key)
            async with Holder(client, fair.url, holder_key) as one, Holder(client, fair.url, holder_key) as two:
                await one.started.wait()
                await two.started.wait()
                emulator.clear_requests()
                waiter = asyncio.create_task(
                    client.post(fair.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(waiter_key))
                )

                async def queued() -> bool:
                    return await client_redis.hget(waiting_key(redis_prefix), str(tenant_id)) == b"1"

                await until(queued, "the request waits in the gateway")
                waiter.cancel()  # the client goes away
                await asyncio.gather(waiter, return_exceptions=True)

                async def left() -> bool:
                    return await client_redis.hget(waiting_key(redis_prefix), str(tenant_id)) == b"0"

                await until(left, "the waiter left the queue")
                reserved_key = f"{redis_prefix}{{t{tenant_id}}}:reserved:t"

                async def unreserved() -> bool:
                    return int(await client_redis.hget(reserved_key, "=") or 0) == 0

                await until(unreserved, "the budget reservation is released")
                assert forwarded(emulator, "/api/generate") == []  # it never reached the backend
            # Both holders gone: the slots are free at once for the next request.
            emulator.configure(tokens=2, token_delay_ms=0)
            answer = await client.post(fair.url + "/api/generate", json={**STREAM, "stream": False},
                                       headers=auth(waiter_key))  # fmt: skip
            assert answer.status_code == 200
    finally:
        await client_redis.aclose()


async def test_a_wait_is_in_the_audit_row_and_the_metrics(
    fair: GatewayProcess, gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(tokens=10_000, token_delay_ms=20)
    holder_key = await admin.key()
    tenant = await admin.tenant()
    key = await admin.key(tenant)
    slots = {"backend": emulator.url, "model": models.normalize("tiny")}

    async def scrape() -> str:
        return (await client.get(fair.url + "/metrics", headers=auth(METRICS_TOKEN))).text

    async with httpx.AsyncClient(timeout=30) as client:
        async with Holder(client, fair.url, holder_key) as one, Holder(client, fair.url, holder_key) as two:
            await one.started.wait()
            await two.started.wait()
            assert metric(await scrape(), "neuronetz_backend_slots_in_use", **slots) == 2
            emulator.configure(tokens=2, token_delay_ms=0)  # for the waiter, once it has its slot
            waiter = asyncio.create_task(
                client.post(fair.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(key))
            )

            async def waiting() -> bool:
                return metric(await scrape(), "neuronetz_queue_waiting", tenant=tenant) == 1

            await until(waiting, "the gauge counts the waiting request")
        answer = await waiter  # the holders are gone: it gets a slot
        assert answer.status_code == 200
        wait_ms = int(answer.headers["x-queue-wait-ms"])
        assert wait_ms > 0

        async def settled() -> bool:
            text = await scrape()
            return (
                metric(text, "neuronetz_queue_waiting", tenant=tenant) == 0
                and metric(text, "neuronetz_backend_slots_in_use", **slots) == 0
            )

        await until(settled, "nothing waits and no slot is held")
        text = await scrape()
        assert metric(text, "neuronetz_queue_wait_seconds_count", tenant=tenant) == 1
        assert metric(text, "neuronetz_queue_wait_seconds_sum", tenant=tenant) == pytest.approx(
            wait_ms / 1000, abs=0.002
        )
        row = await audit_row(admin, answer.headers["x-request-id"])
        assert row["queue_wait_ms"] == pytest.approx(wait_ms, abs=1)
        # Without slots there is no queue: nothing to record.
        direct = await client.post(gateway.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(key))
        assert direct.status_code == 200
        assert "x-queue-wait-ms" not in direct.headers
        assert (await audit_row(admin, direct.headers["x-request-id"]))["queue_wait_ms"] is None


async def test_list_backends_shows_the_slots_in_use_and_the_loaded_models(
    fair: GatewayProcess, fair_env: dict[str, str], emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(tokens=10_000, token_delay_ms=20)
    key = await admin.key()

    async def listed() -> list[str]:
        # As an operator runs it next to the gateway: the same settings, the gateway's port.
        result = await asyncio.to_thread(run_cli, "list-backends", env={**fair_env, "GATEWAY_PORT": str(fair.port)})
        assert result.returncode == 0, result.stderr
        header, row = result.stdout.splitlines()
        assert header.split()[3:5] == ["IN", "USE/SLOTS"]
        return row.split()

    async with (
        httpx.AsyncClient(timeout=30) as client,
        Holder(client, fair.url, key) as one,
        Holder(client, fair.url, key) as two,
    ):
        await one.started.wait()
        await two.started.wait()
        url, health, _, in_use, loaded, _ = await listed()
        assert (url, health, in_use, loaded) == (emulator.url, "up", "2/2", "tiny:latest")
    row: list[str] = []

    async def released() -> bool:
        row[:] = await listed()
        return row[3] == "0/2"

    await until(released, "list-backends shows the slots free again")
    assert row[4] == "tiny:latest"


async def test_waiting_is_bounded_in_the_callers_dialect(
    fair: GatewayProcess, impatient: GatewayProcess, emulator: Emulator, admin: Admin, redis_url: str,
    redis_prefix: str
) -> None:  # fmt: skip
    emulator.configure(tokens=10_000, token_delay_ms=20)
    holder_key, key = await admin.key(), await admin.key()
    client_redis = aioredis.Redis.from_url(redis_url)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        httpx.AsyncClient(timeout=30) as client,
        contextlib.aclosing(client_redis),
        Holder(client, fair.url, holder_key) as one,
        Holder(client, fair.url, holder_key) as two,
    ):
        await one.started.wait()
        await two.started.wait()
        # The other replica sees the slots taken through Redis and waits its half second.
        answer = await client.post(impatient.url + "/v1/chat/completions", headers=auth(key), json=chat)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "queue_timeout"
        assert int(answer.headers["retry-after"]) >= 1
        # Depth 2 per tenant: the third waiter of one tenant is refused at once.
        waiters = [
            asyncio.create_task(
                client.post(fair.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(key))
            )
            for _ in range(2)
        ]
        try:
            tenant_id = await tenants.tenant_id(admin.pool, await admin.tenant_of(key))

            async def depth_reached() -> bool:
                return await client_redis.hget(waiting_key(redis_prefix), str(tenant_id)) == b"2"

            await until(depth_reached, "two requests of the tenant wait")
            third = await client.post(fair.url + "/api/generate", json={**STREAM, "stream": False},
                                      headers=auth(key))  # fmt: skip
            assert third.status_code == 429
            assert set(third.json()) == {"error"}
            assert "waiting" in third.json()["error"]
        finally:
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        # Counted by reason; the waits are in the histogram.
        text = (await client.get(fair.url + "/metrics", headers=auth(METRICS_TOKEN))).text
        assert metric(text, "neuronetz_refusals_total", reason="queue_full") >= 1
        impatient_text = (await client.get(impatient.url + "/metrics", headers=auth(METRICS_TOKEN))).text
        assert metric(impatient_text, "neuronetz_refusals_total", reason="queue_timeout") >= 1


@pytest.fixture(scope="module")
def second() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


async def test_a_warm_backend_is_preferred_until_its_slots_are_full(
    gateway_env: dict[str, str], emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    second.reset()
    key = await admin.key()
    # The cold backend first: without the preference, ties would go to it.
    env = {**gateway_env, "OLLAMA_BACKENDS": f"{second.url},{emulator.url}", "GATEWAY_BACKEND_SLOTS": "2"}
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(emulator.url + "/api/generate", json={**STREAM, "stream": False})  # loads tiny there

            async def seen_loaded() -> bool:
                readyz = await client.get(process.url + "/readyz", headers=auth(METRICS_TOKEN))
                each = readyz.json()["backends"]["each"]
                return "tiny:latest" in each[emulator.url]["loaded"]

            await until(seen_loaded, "a health check reads /api/ps")
            for _ in range(8):  # one at a time: the warm backend always has a free slot
                answer = await client.post(process.url + "/api/generate", json={**STREAM, "stream": False},
                                           headers=auth(key))  # fmt: skip
                assert answer.status_code == 200
            assert forwarded(second, "/api/generate") == []  # no cold start
            emulator.configure(tokens=20, token_delay_ms=50)
            answers = await asyncio.gather(
                *(client.post(process.url + "/api/generate", json={**STREAM, "stream": False}, headers=auth(key))
                  for _ in range(4))
            )  # fmt: skip
            assert [a.status_code for a in answers] == [200] * 4
            assert len(forwarded(second, "/api/generate")) >= 1  # warm slots full: the cold one serves


# --- without Redis ----------------------------------------------------------------------------------


async def test_without_redis_each_replica_keeps_slots_of_its_own() -> None:
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    async with httpx.AsyncClient() as http:
        pool = backends.BackendPool(["http://gpu:11434"], http, interval=60, cooldown=1, slots=1)
        scheduler = Scheduler(unreachable, pool, metrics.Registry(), prefix="nzt:", lease_ttl=60, max_wait=30,
                              max_depth=10)  # fmt: skip
        key = KeyRecord(1, "nz_aaaaaaaa", "k", 1, "t", None, False, None, False, None,
                        Subject(1, 1, Limits(), Limits()))  # fmt: skip
        first = await scheduler.acquire(key, "tiny", frozenset())
        assert first is not None
        assert first.base == ""
        second = asyncio.create_task(scheduler.acquire(key, "tiny", frozenset()))
        await asyncio.sleep(0)
        for _ in range(100):  # it tries Redis first, then waits locally
            if scheduler.local.waiting.get("tiny:latest"):
                break
            await asyncio.sleep(0.01)
        assert not second.done()  # bounded: the one slot is taken
        scheduler.release(first)
        granted = await asyncio.wait_for(second, 5)
        assert granted is not None
        assert granted.backend is first.backend
        scheduler.release(granted)
        assert scheduler.local.used == {("http://gpu:11434", "tiny:latest"): 0}
    await unreachable.aclose()
