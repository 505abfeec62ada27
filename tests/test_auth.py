"""Authentication over real HTTP against two gateway replicas sharing Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from neuronetz import keys, tenants
from neuronetz.auth import MAX_REFUSED_KEYS, MAX_TRACKED_CLIENTS, Authenticator
from neuronetz.errors import Unauthorized
from tests.support import METRICS_TOKEN, ROOT, Admin, GatewayProcess, TcpProxy, auth, metric, run_cli

UNAUTHORIZED = {"error": "Invalid or missing API key: send `Authorization: Bearer <key>` with an active key."}


@pytest.fixture(scope="module")
def replica(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A second gateway on the same Postgres, Redis and backend."""
    with GatewayProcess(gateway_env) as process:
        yield process


async def argon2_calls(gateway: GatewayProcess) -> float:
    async with httpx.AsyncClient() as client:
        response = await client.get(gateway.url + "/metrics", headers=auth(METRICS_TOKEN))
    return metric(response.text, "neuronetz_argon2_verifications_total")


def test_keys_have_the_documented_shape_and_never_repeat() -> None:
    made = [keys.generate() for _ in range(500)]
    for new in made:
        assert re.fullmatch(r"nz_[a-z0-9]{8}[A-Za-z0-9_-]{43}", new.key)
        assert new.key.startswith(new.prefix)
        assert keys.prefix_of(new.key) == new.prefix
    assert len({new.key for new in made}) == len({new.prefix for new in made}) == 500


@pytest.mark.parametrize(
    "malformed",
    ["", "nz_abc", "nz_ABCDEFGH" + "x" * 40, "nz_abcdefgh" + "x" * 31, "sk-" + "x" * 48, "nz_abcdefgh x" * 4],
)
def test_malformed_keys_have_no_prefix(malformed: str) -> None:
    assert keys.prefix_of(malformed) is None


async def test_a_valid_key_is_accepted(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        response = await client.get(gateway.url + "/api/version", headers=auth(key))
    assert response.status_code == 200
    assert response.json() == {"version": "0.33.0"}


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer nz_short",
        "Bearer nz_zzzzzzzz" + "A" * 43,  # well-formed, unknown prefix
        "Token nz_zzzzzzzz" + "A" * 43,
    ],
)
async def test_missing_and_unknown_keys_get_the_same_401(gateway: GatewayProcess, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with httpx.AsyncClient() as client:
        native = await client.get(gateway.url + "/api/tags", headers=headers)
        openai = await client.get(gateway.url + "/v1/models", headers=headers)
    assert native.status_code == openai.status_code == 401
    assert native.headers["www-authenticate"] == openai.headers["www-authenticate"] == "Bearer"
    assert native.json() == UNAUTHORIZED
    assert openai.json()["error"]["message"] == UNAUTHORIZED["error"]
    assert openai.json()["error"]["type"] == "authentication_error"


async def test_scheme_is_case_insensitive_and_whitespace_tolerated(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        response = await client.get(gateway.url + "/api/version", headers={"Authorization": f"bEaReR \t  {key}"})
    assert response.status_code == 200


async def test_wrong_secret_revoked_and_expired_keys_get_the_same_401(gateway: GatewayProcess, admin: Admin) -> None:
    tenant = await admin.tenant()
    good = await admin.key(tenant)
    wrong = good[:11] + ("B" if good[11] != "B" else "C") + good[12:]
    revoked = await admin.key(tenant)
    await tenants.revoke_key(admin.pool, revoked[:11])
    expired = await admin.key(tenant, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    await asyncio.sleep(1.1)
    async with httpx.AsyncClient() as client:
        for key in (wrong, revoked, expired):
            response = await client.get(gateway.url + "/api/version", headers=auth(key))
            assert response.status_code == 401
            assert response.json() == UNAUTHORIZED
            assert key[11:] not in response.text


async def test_a_key_expires_while_it_is_cached(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    async with httpx.AsyncClient() as client:
        assert (await client.get(gateway.url + "/api/version", headers=auth(key))).status_code == 200
        await asyncio.sleep(2.2)
        assert (await client.get(gateway.url + "/api/version", headers=auth(key))).status_code == 401


async def test_a_model_outside_the_allow_list_is_403(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(models=("llama3.2:latest",))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with httpx.AsyncClient() as client:
        native = await client.post(gateway.url + "/api/chat", json=body, headers=auth(key))
        openai = await client.post(gateway.url + "/v1/chat/completions", json=body, headers=auth(key))
        allowed = await client.post(gateway.url + "/api/chat", json={**body, "model": "Llama3.2"}, headers=auth(key))
        tags = await client.get(gateway.url + "/api/tags", headers=auth(key))
    assert native.status_code == openai.status_code == 403
    assert native.json() == {"error": "This API key may not use the model 'tiny'."}
    assert openai.json()["error"]["code"] == "model_not_allowed"
    assert allowed.status_code == 200
    assert [m["name"] for m in tags.json()["models"]] == ["llama3.2:latest"]


async def test_revoking_on_one_replica_is_refused_by_the_other_within_one_second(
    gateway: GatewayProcess, replica: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        for process in (gateway, replica):  # both cache the key
            assert (await client.get(process.url + "/api/version", headers=auth(key))).status_code == 200
        revoked_at = time.monotonic()
        await tenants.revoke_key(admin.pool, key[:11])  # what `revoke-key` does
        refused: dict[str, float] = {}
        while len(refused) < 2 and time.monotonic() - revoked_at < 3:
            for process in (gateway, replica):
                if process.url not in refused:
                    response = await client.get(process.url + "/api/version", headers=auth(key))
                    if response.status_code == 401:
                        refused[process.url] = time.monotonic() - revoked_at
            await asyncio.sleep(0.02)
    assert len(refused) == 2, refused
    assert max(refused.values()) < 1.0, refused


async def test_a_rotated_key_is_refused_on_every_replica_within_a_second_of_its_grace_end(
    gateway: GatewayProcess, replica: GatewayProcess, admin: Admin, database_url: str
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        for process in (gateway, replica):  # both cache the key, with no expiry yet
            assert (await client.get(process.url + "/api/version", headers=auth(key))).status_code == 200
        rotated = run_cli("rotate-key", "--prefix", key[:11], "--grace", "3s", env={"DATABASE_URL": database_url})
        assert rotated.returncode == 0, rotated
        new = rotated.stdout.strip()
        grace_ends = await admin.pool.fetchval("SELECT expires_at FROM api_keys WHERE prefix = $1", key[:11])
        for process in (gateway, replica):
            assert (await client.get(process.url + "/api/version", headers=auth(new))).status_code == 200
        # Each replica answers the old key 200 until the grace period ends, and 401 to a request
        # sent within a second after it.
        accepted: set[str] = set()
        refused: dict[str, tuple[dt.datetime, dt.datetime]] = {}  # url -> (sent, answered)
        while len(refused) < 2 and dt.datetime.now(dt.UTC) < grace_ends + dt.timedelta(seconds=3):
            for process in (gateway, replica):
                if process.url not in refused:
                    sent = dt.datetime.now(dt.UTC)
                    status = (await client.get(process.url + "/api/version", headers=auth(key))).status_code
                    assert status in (200, 401), status
                    if status == 200:
                        accepted.add(process.url)
                    else:
                        refused[process.url] = (sent, dt.datetime.now(dt.UTC))
            await asyncio.sleep(0.02)
        for process in (gateway, replica):
            assert process.url in accepted, f"{process.url} refused the old key during its grace period"
            assert process.url in refused, f"{process.url} still accepted the old key 3 s after its grace period"
            sent, answered = refused[process.url]
            assert answered >= grace_ends, (process.url, answered, grace_ends)  # not refused early
            assert sent < grace_ends + dt.timedelta(seconds=1), (process.url, sent, grace_ends)
            assert (await client.get(process.url + "/api/version", headers=auth(key))).status_code == 401
            assert (await client.get(process.url + "/api/version", headers=auth(new))).status_code == 200


async def test_a_limit_change_made_with_psql_reaches_every_replica(
    gateway: GatewayProcess, replica: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        for process in (gateway, replica):
            assert (await client.get(process.url + "/api/version", headers=auth(key))).status_code == 200
        # An operator's hand-written UPDATE, not our CLI: the trigger still tells every replica.
        await admin.pool.execute("UPDATE api_keys SET allowed_models = '{qwen3:latest}' WHERE prefix = $1", key[:11])
        await asyncio.sleep(1.0)
        body = {"model": "tiny", "prompt": "x", "stream": False}
        for process in (gateway, replica):
            response = await client.post(process.url + "/api/generate", json=body, headers=auth(key))
            assert response.status_code == 403, process.url


async def test_a_cache_hit_runs_no_argon2(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    before = await argon2_calls(gateway)
    async with httpx.AsyncClient() as client:
        for _ in range(20):
            assert (await client.get(gateway.url + "/api/version", headers=auth(key))).status_code == 200
    assert await argon2_calls(gateway) - before == 1


async def test_concurrent_first_requests_verify_once_and_replicas_share_the_proof(
    gateway: GatewayProcess, replica: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key()
    first_before, second_before = await argon2_calls(gateway), await argon2_calls(replica)
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(
            *(client.get(gateway.url + "/api/version", headers=auth(key)) for _ in range(20))
        )
        assert {a.status_code for a in answers} == {200}
        answers = await asyncio.gather(
            *(client.get(replica.url + "/api/version", headers=auth(key)) for _ in range(20))
        )
        assert {a.status_code for a in answers} == {200}
    assert await argon2_calls(gateway) - first_before == 1
    # The replica trusts Redis's record that this key (by its HMAC) matched this hash.
    assert await argon2_calls(replica) - second_before == 0


async def test_a_flood_of_bad_keys_leaves_good_keys_fast(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    victim = await admin.key()
    env = {**gateway_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "30"}
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:

            async def latencies(count: int) -> tuple[list[float], list[float]]:
                """The good key's and, alternating with it, an unauthenticated route's: both
                wait alike for this busy machine; only the first waits for authentication."""
                good: list[float] = []
                control: list[float] = []
                for _ in range(count):  # /api/status is the gateway's own answer, like /healthz
                    for path, headers, times in (("/api/status", auth(key), good), ("/healthz", {}, control)):
                        start = time.perf_counter()
                        response = await client.get(process.url + path, headers=headers)
                        assert response.status_code == 200
                        times.append(time.perf_counter() - start)
                return good, control

            await latencies(10)  # the good key is in the cache from here on
            flooding = True
            statuses: list[int] = []

            async def flood() -> None:
                n = 0
                while flooding:
                    n += 1
                    bad = victim[:11] + os.urandom(16).hex() + "x" * 11 if n % 2 else f"nz_{n:08d}" + "A" * 43
                    statuses.append((await client.get(process.url + "/api/tags", headers=auth(bad))).status_code)

            flooders = [asyncio.create_task(flood()) for _ in range(8)]
            try:
                deadline = time.monotonic() + 30  # until the address is cut off, however loaded the machine
                while statuses.count(429) <= 10 * statuses.count(401):
                    assert time.monotonic() < deadline, f"{statuses.count(429)} refusals with 429 only"
                    await asyncio.sleep(0.02)
                good, control = await latencies(60)  # while the flood goes on
            finally:
                flooding = False
                await asyncio.gather(*flooders)
            argon2 = await argon2_calls(process)
    # The address was cut off after 30 failures, so the flood cost at most 30 Argon2 runs
    # (half of the attempts are unknown prefixes, refused without Argon2 at all) ...
    assert 0 < statuses.count(401) <= 30
    assert 1 <= argon2 <= 30
    # ... and the good key, answered from the cache, kept the pace of a route without
    # authentication: less apart than one Argon2id verification (25-30 ms here), which a good
    # key queued behind the flood's verifications would pay at least.
    assert statistics.median(good) - statistics.median(control) < 0.02, (good, control)


async def test_too_many_failures_from_one_address_get_429(gateway_env: dict[str, str], admin: Admin) -> None:
    env = {**gateway_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "5"}
    warm, cold = await admin.key(), await admin.key()
    address = {"X-Forwarded-For": "203.0.113.7"}  # the peer is loopback: a trusted proxy, like Caddy
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient() as client:

            async def status(key: str, headers: dict[str, str] = address) -> httpx.Response:
                return await client.get(process.url + "/api/tags", headers={**auth(key), **headers})

            assert (await status(warm)).status_code == 200
            bad = "nz_00000000" + "A" * 43
            codes = [(await status(bad)).status_code for _ in range(7)]
            limited = await status(bad)
            other_client = await status(bad, {"X-Forwarded-For": "203.0.113.8"})
            cached_key = await status(warm)
            uncached_key = await status(cold)
    assert codes == [401] * 5 + [429] * 2
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert other_client.status_code == 401  # counted per client address, not per proxy
    assert cached_key.status_code == 200  # a key already verified costs nothing: still served
    assert uncached_key.status_code == 429  # verifying a new one is work: not for this address, for now


async def test_the_secret_is_stored_only_as_argon2id_and_shown_nowhere(
    gateway: GatewayProcess, admin: Admin, database_url: str
) -> None:
    key = await admin.key(prompt_ttl_days=1)
    secret = key[11:]
    stored = await admin.pool.fetchval("SELECT secret_hash FROM api_keys WHERE prefix = $1", key[:11])
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    async with httpx.AsyncClient() as client:
        await client.post(gateway.url + "/api/generate", json={"model": "tiny", "prompt": "hi"}, headers=auth(key))
        await client.post(gateway.url + "/api/generate", json={"model": "nope"}, headers=auth(key + "x"))
    await asyncio.sleep(1.5)  # the audit writer flushes every second
    dump = await asyncio.to_thread(_output, ["pg_dump", "--data-only", database_url])
    listing = await asyncio.to_thread(_output, [sys.executable, "-m", "neuronetz", "list-keys", "--json"], database_url)
    assert key[:11] in listing
    assert key[:11] in dump
    for text in (dump, listing, gateway.log()):
        assert secret not in text


def _output(command: list[str], database_url: str | None = None) -> str:
    env = {**os.environ, **({"DATABASE_URL": database_url} if database_url else {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout


async def test_last_used_is_written_once_per_flush_not_per_request(gateway_env: dict[str, str], admin: Admin) -> None:
    key = await admin.key()
    with GatewayProcess(gateway_env) as process:
        async with httpx.AsyncClient() as client:
            for _ in range(5):
                assert (await client.get(process.url + "/api/version", headers=auth(key))).status_code == 200
        # Coalesced: nothing is written per request; the worker flushes once a minute and at shutdown.
        assert await admin.pool.fetchval("SELECT last_used_at FROM api_keys WHERE prefix = $1", key[:11]) is None
        assert process.stop() == 0
    used = await admin.pool.fetchval("SELECT last_used_at FROM api_keys WHERE prefix = $1", key[:11])
    assert used is not None
    assert abs((dt.datetime.now(dt.UTC) - used).total_seconds()) < 30


class _SlowPool:
    """A pool whose key lookup waits until the test lets it go."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool
        self.fetching = asyncio.Event()
        self.release = asyncio.Event()

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.fetching.set()
        await self.release.wait()
        return await self.pool.fetchrow(query, *args)


async def test_a_lookup_that_raced_an_invalidation_is_not_cached(
    admin: Admin, redis_url: str, redis_prefix: str, database_url: str
) -> None:
    key = await admin.key()
    slow = _SlowPool(admin.pool)
    client = aioredis.Redis.from_url(redis_url)
    authenticator = Authenticator(
        slow,  # type: ignore[arg-type]
        client, database_url=database_url, secret="s", redis_prefix=redis_prefix, cache_ttl=30,
        failures_per_minute=100, threads=1,
    )  # fmt: skip
    authenticator.listening = True
    try:
        lookup = asyncio.create_task(authenticator.authenticate(f"Bearer {key}".encode(), "127.0.0.1"))
        await slow.fetching.wait()
        authenticator.invalidate(f"key:{key[:11]}")  # e.g. revoked while this lookup was reading
        slow.release.set()
        assert (await lookup).prefix == key[:11]  # this request started before: it is served
        assert authenticator.cache == {}  # but what it read is not trusted for the next one
        await authenticator.authenticate(f"Bearer {key}".encode(), "127.0.0.1")
        assert len(authenticator.cache) == 1  # a lookup without a race is cached as usual
    finally:
        authenticator.executor.shutdown()
        await client.aclose()


async def test_rotating_ipv6_addresses_of_one_64_share_one_failure_allowance(
    gateway_env: dict[str, str], admin: Admin
) -> None:
    env = {**gateway_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "5"}
    bad = "nz_00000000" + "A" * 43
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient() as client:

            async def status(address: str) -> int:
                headers = {**auth(bad), "X-Forwarded-For": address}
                return (await client.get(process.url + "/api/tags", headers=headers)).status_code

            rotating = [await status(f"2001:db8:1:2:{n:x}::1") for n in range(1, 9)]
            neighbour = await status("2001:db8:1:3::1")  # another /64: another subscriber
            mapped = [await status(f"::ffff:198.51.100.{n}") for n in range(1, 3)]  # IPv4 stays per address
    assert rotating == [401] * 5 + [429] * 3
    assert neighbour == 401
    assert mapped == [401, 401]


async def test_wrong_secrets_for_one_key_from_many_addresses_cost_bounded_argon2(
    gateway_env: dict[str, str], admin: Admin
) -> None:
    env = {**gateway_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "5"}
    target, fresh = await admin.key(), await admin.key()
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient() as client:
            before = await argon2_calls(process)
            statuses = []
            for n in range(20):  # a different address each time: the per-address limit never bites
                wrong = target[:11] + os.urandom(16).hex() + "x" * 11
                headers = {**auth(wrong), "X-Forwarded-For": f"198.51.100.{n + 1}"}
                statuses.append((await client.get(process.url + "/api/tags", headers=headers)).status_code)
            spent = await argon2_calls(process) - before
            never_used = await client.get(process.url + "/api/tags", headers=auth(fresh))
            limited = await client.get(process.url + "/api/tags", headers=auth(wrong))
    assert statuses == [401] * 5 + [429] * 15
    assert spent <= 5
    assert never_used.status_code == 200  # the Argon2 pool was never full
    assert limited.headers["x-should-retry"] == "false"
    assert "for this key" in limited.json()["error"]


def test_refusals_per_second_stay_flat_as_addresses_grow() -> None:
    """Every refusal is O(1) and the tables are bounded, however many addresses a flood uses."""
    authenticator = Authenticator(
        None,  # type: ignore[arg-type]  # refusing a missing key touches neither store
        None,  # type: ignore[arg-type]
        database_url="", secret="s", redis_prefix="", cache_ttl=30, failures_per_minute=1_000, threads=1,
    )  # fmt: skip

    def refuse(first: int, count: int, budget: float) -> float:
        """Refusals per second over `count` new addresses; fails past `budget` seconds."""
        started = time.perf_counter()
        for n in range(first, first + count):
            with contextlib.suppress(Unauthorized):
                _refuse_now(authenticator, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
            if n % 1000 == 0:
                assert time.perf_counter() - started < budget, f"slowed down after {n:,} addresses"
        return count / (time.perf_counter() - started)

    # All within one minute: the failure windows of every address are still open at the end.
    try:
        early = refuse(0, 20_000, 10.0)
        refuse(20_000, 130_000, 30.0)
        late = refuse(150_000, 20_000, 10.0)
    finally:
        authenticator.executor.shutdown()
    print(f"\nrefusals/s: {early:,.0f} with few addresses known, {late:,.0f} after 150,000 addresses")
    assert late > early / 3
    assert len(authenticator.failures.windows) <= MAX_TRACKED_CLIENTS


def _refuse_now(authenticator: Authenticator, address: str) -> None:
    """One refused request (no key at all) from `address`, as `authenticate` handles it."""
    coroutine = authenticator.authenticate(None, address)
    try:
        coroutine.send(None)  # refuses before its first await
    except StopIteration:
        raise AssertionError("a request without a key was accepted") from None
    finally:
        coroutine.close()


async def test_refused_keys_are_remembered_in_a_bounded_table_apart_from_verified_ones(
    admin: Admin, redis_url: str, redis_prefix: str, database_url: str
) -> None:
    key = await admin.key()
    client = aioredis.Redis.from_url(redis_url)
    authenticator = Authenticator(
        admin.pool, client, database_url=database_url, secret="s", redis_prefix=redis_prefix, cache_ttl=30,
        failures_per_minute=1_000_000, threads=1,
    )  # fmt: skip
    authenticator.listening = True
    try:
        await authenticator.authenticate(f"Bearer {key}".encode(), "127.0.0.1")
        for n in range(MAX_REFUSED_KEYS + 500):  # malformed keys: refused without any lookup
            with contextlib.suppress(Unauthorized):
                await authenticator.authenticate(f"Bearer nz_bad{n}".encode(), f"10.0.{n >> 8 & 255}.{n & 255}")
        assert len(authenticator.refused) == MAX_REFUSED_KEYS
        assert len(authenticator.cache) == 1  # the verified key was not pushed out
        assert (await authenticator.authenticate(f"Bearer {key}".encode(), "127.0.0.1")).prefix == key[:11]
    finally:
        authenticator.executor.shutdown()
        await client.aclose()


async def test_a_postgres_cut_costs_cached_keys_nothing_and_logs_a_few_lines(
    gateway_env: dict[str, str], admin: Admin, database_url: str
) -> None:
    cached, uncached = await admin.key(), await admin.key()
    port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(port) as proxy:
        env = {**gateway_env, "DATABASE_URL": database_url.replace(f":{port}/", f":{proxy.port}/")}
        with GatewayProcess(env) as process:
            async with httpx.AsyncClient() as client:
                before = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    assert (await client.get(process.url + "/api/version", headers=auth(cached))).status_code == 200
                    before.append(time.perf_counter() - t0)
                proxy.cut()
                statuses, latencies = [], []
                started = time.monotonic()
                while time.monotonic() - started < 3.0:  # well past the one second a key stays fresh
                    t0 = time.perf_counter()
                    statuses.append((await client.get(process.url + "/api/version", headers=auth(cached))).status_code)
                    latencies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                refused = await client.get(process.url + "/api/version", headers=auth(uncached))
                refused_in = time.perf_counter() - t0
                proxy.restore()
                # Past the lookup backoff's longest interval: the cache is emptied when the
                # invalidation listener reconnects, and lookups must reach Postgres at once then.
                after: list[int] = []
                started = time.monotonic()
                while time.monotonic() - started < 6.0:
                    after.append((await client.get(process.url + "/api/version", headers=auth(cached))).status_code)
                recovered = await client.get(process.url + "/api/version", headers=auth(uncached))
            lines = [line for line in process.log().splitlines() if "key lookup failed" in line]
    assert set(statuses) == {200}  # stale-if-error
    assert set(after) == {200}
    assert recovered.status_code == 200
    assert len(statuses) > 50
    assert len(lines) <= 3, lines  # once, then at most every few seconds with a count
    assert refused.status_code == 503
    assert refused_in < 0.5
    print(f"\np50 before the cut {statistics.median(before) * 1000:.1f} ms, during it "
          f"{statistics.median(latencies) * 1000:.1f} ms over {len(statuses)} requests")  # fmt: skip
