"""Limits and budgets: exact across replicas, fail closed, restart-safe, never overspent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from neuronetz import tenants
from neuronetz.app import App
from neuronetz.budgets import Ledger
from neuronetz.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from neuronetz.limits import EARLY, Admission, Call, Limiter, Limits, Settlement, Subject, in_flight, spent
from tests.asgi import ASGITransport, in_process, open_worker
from tests.emulator import Emulator
from tests.support import Admin, GatewayProcess, PrivateRedis, auth

GENERATE = {"model": "tiny", "prompt": "hi", "stream": False}


@pytest.fixture(scope="module")
def replica(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    with GatewayProcess(gateway_env) as process:
        yield process


async def wait_until_budgets_ready(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    """The first budgeted request of a tenant may meet a counter rebuild (fresh Redis): 503
    for a moment. Any other answer ends the wait."""
    deadline = time.monotonic() + 10
    while True:
        response = await client.post(url + "/api/generate", json={**GENERATE, "options": {"num_predict": 1}},
                                     headers=auth(key))  # fmt: skip
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.2)


# --- rate limits ---------------------------------------------------------------------------------


async def test_rpm_is_exact_across_two_replicas(gateway: GatewayProcess, replica: GatewayProcess, admin: Admin) -> None:
    key = await admin.key(rpm=6)
    async with httpx.AsyncClient() as client:
        answers = [
            await client.post((gateway, replica)[i % 2].url + "/api/generate", json=GENERATE, headers=auth(key))
            for i in range(10)
        ]
        statuses = [a.status_code for a in answers]
        assert statuses == [200] * 6 + [429] * 4
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:6]] == ["5", "4", "3", "2", "1", "0"]
        assert {a.headers["x-ratelimit-limit-requests"] for a in answers[:6]} == {"6"}
        seventh = answers[6]
        assert seventh.json()["error"] == "Rate limit reached: this key may send 6 requests per minute."
        wait = int(seventh.headers["retry-after"])
        assert 9 <= wait <= 10  # one request per 10 s comes free again
        await asyncio.sleep(wait)
        again = await client.post(replica.url + "/api/generate", json=GENERATE, headers=auth(key))
        assert again.status_code == 200
        assert (await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))).status_code == 429


async def test_a_tenants_limit_is_shared_by_its_keys(gateway: GatewayProcess, admin: Admin) -> None:
    tenant = await admin.tenant(rpm=4)
    first, second = await admin.key(tenant), await admin.key(tenant, rpm=100)  # a looser key limit: the tenant's wins
    async with httpx.AsyncClient() as client:
        statuses = [
            (await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(k))).status_code
            for k in (first, second, first, second, first, second)
        ]
    assert statuses == [200, 200, 200, 200, 429, 429]


async def test_responses_without_rate_limits_carry_no_rate_limit_headers(gateway: GatewayProcess, admin: Admin) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        response = await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))
    assert response.status_code == 200
    assert not any(name.startswith("x-ratelimit") for name in response.headers)


async def test_tpm_counts_real_tokens_and_refunds_what_was_not_used(gateway: GatewayProcess, admin: Admin) -> None:
    # Each request reserves its prompt estimate + 20 (its cap) but uses 1 + 10 tokens. Counting
    # reservations alone, 100 tokens a minute admit 4; refunding the unused part admits 8.
    key = await admin.key(tpm=100)
    body = {**GENERATE, "options": {"num_predict": 20}}
    async with httpx.AsyncClient() as client:
        statuses = []
        for _ in range(12):
            response = await client.post(gateway.url + "/api/generate", json=body, headers=auth(key))
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["error"] == "Token rate limit reached: this key may use 100 tokens per minute."
                assert int(response.headers["retry-after"]) >= 1
                break
    assert 7 <= statuses.count(200) <= 9, statuses


# --- concurrency -----------------------------------------------------------------------------------


async def test_max_concurrent_holds_and_slots_come_back(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=100, tokens=10)
    key = await admin.key(max_concurrent=2)
    body = {"model": "tiny", "prompt": "hi"}
    async with httpx.AsyncClient(timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post(gateway.url + "/api/generate", json=body, headers=auth(key)) for _ in range(6))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 200, 429, 429, 429, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["error"] == "Too many requests in flight: this key may have 2 at once."
        # After completion: both slots are free again, at once (the settlements are counted
        # before the next admissions: test_a_request_gives_its_slot_back_before_its_answers_last_bytes,
        # test_an_admission_waits_for_its_tenants_settlements_already_on_their_way).
        again = await asyncio.gather(
            *(client.post(gateway.url + "/api/generate", json=body, headers=auth(key)) for _ in range(2))
        )
        assert [answer.status_code for answer in again] == [200, 200]
        # After a client disconnect: the slot comes back (the forward is cancelled at once).
        async with client.stream("POST", gateway.url + "/api/generate", json=body, headers=auth(key)) as stream:
            async for _ in stream.aiter_lines():
                break
        assert await both_admitted(client, gateway.url, body, key) == [200, 200]


async def both_admitted(client: httpx.AsyncClient, url: str, body: dict[str, Any], key: str) -> list[int]:
    """Two requests at once, asked again for a few seconds while one meets a slot still held:
    the gateway learns of a client's disconnect a moment after the client has gone, and only
    then cancels the forward and settles."""
    deadline = time.monotonic() + 5
    while True:
        answers = await asyncio.gather(
            *(client.post(url + "/api/generate", json=body, headers=auth(key)) for _ in range(2))
        )
        statuses = [answer.status_code for answer in answers]
        if statuses == [200, 200] or time.monotonic() > deadline:
            return statuses
        assert all(answer.status_code == 200 or "in flight" in answer.json()["error"] for answer in answers)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_gives_its_slot_back_before_its_answers_last_bytes(
    gateway_env: dict[str, str], admin: Admin, stream: bool
) -> None:
    """A client that sends its next request the moment its answer is whole must find its slot
    free: the request is settled before the send that completes its answer (the last bytes of
    an answer of declared length, the end of a stream), not after it."""
    key = await admin.key(max_concurrent=1)
    async with open_worker(gateway_env) as worker:
        application = App()
        application.attach(worker)
        ends: list[tuple[int | None, bool]] = []  # (declared length, a lease still held) when the answer completed

        async def watched(scope: dict[str, Any], receive: Any, send: Any) -> None:
            length: int | None = None
            sent = 0

            async def watching(message: MutableMapping[str, Any]) -> None:
                nonlocal length, sent
                if message["type"] == "http.response.start":
                    declared = dict(message.get("headers", [])).get(b"content-length")
                    length = None if declared is None else int(declared)
                elif message["type"] == "http.response.body":
                    sent += len(message.get("body", b""))
                    if not ends and (sent == length or not message.get("more_body", False)):
                        ends.append((length, bool(worker.limiter.leases)))
                await send(message)

            await application(scope, receive, watching)

        async with httpx.AsyncClient(transport=ASGITransport(watched), base_url="http://gateway") as client:
            answer = await client.post("/api/generate", json={**GENERATE, "stream": stream}, headers=auth(key))
    assert answer.status_code == 200
    [(length, held)] = ends
    assert (length is None) is stream  # a whole answer of declared length; a stream without one
    assert not held


async def test_a_killed_replicas_slots_expire_with_their_lease(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=200, tokens=100)
    key = await admin.key(max_concurrent=1)
    body = {"model": "tiny", "prompt": "hi"}
    env = {**gateway_env, "GATEWAY_LEASE_TTL": "5"}
    with GatewayProcess(env) as doomed, GatewayProcess(env) as survivor:  # a failure stops both
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", doomed.url + "/api/generate", json=body, headers=auth(key)) as stream:
                async for _ in stream.aiter_lines():
                    break
                doomed.kill()  # holding the only slot, never to settle it
            killed = time.monotonic()
            short = {**GENERATE, "options": {"num_predict": 1}}
            blocked = await client.post(survivor.url + "/api/generate", json=short, headers=auth(key))
            assert blocked.status_code == 429
            while time.monotonic() - killed < 8:
                asked = time.monotonic()
                response = await client.post(survivor.url + "/api/generate", json=short, headers=auth(key))
                if response.status_code == 200:
                    break
                await asyncio.sleep(0.25)
            assert response.status_code == 200
            assert asked - killed < 6  # the lease (5 s) ran out, nothing more


# --- budgets ----------------------------------------------------------------------------------------


async def _burst(urls: list[str], key: str, count: int) -> tuple[int, list[int]]:
    """`count` concurrent requests spread over `urls`; returns (tokens served, statuses)."""
    body = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 8}}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
        answers = await asyncio.gather(
            *(client.post(urls[i % len(urls)] + "/api/generate", json=body, headers=auth(key)) for i in range(count))
        )
    served = sum(a.json()["prompt_eval_count"] + a.json()["eval_count"] for a in answers if a.status_code == 200)
    return served, [a.status_code for a in answers]


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_burst_never_overspends_a_budget(
    gateway: GatewayProcess, replica: GatewayProcess, emulator: Emulator, admin: Admin, replicas: int
) -> None:
    emulator.configure(token_delay_ms=20, tokens=8)
    key = await admin.key(daily_tokens=200)
    urls = [gateway.url, replica.url][:replicas]
    async with httpx.AsyncClient() as client:
        await wait_until_budgets_ready(client, urls[0], key)  # spends 1 + 1 tokens
    served, statuses = await _burst(urls, key, 40)
    assert 100 <= served <= 198, (served, statuses)
    assert set(statuses) == {200, 429}
    await asyncio.sleep(1.2)  # the ledger writes every second
    usage = await admin.pool.fetchval(
        "SELECT sum(prompt_tokens + completion_tokens) FROM usage_daily u JOIN api_keys k ON k.id = u.key_id "
        "WHERE k.prefix = $1",
        key[:11],
    )
    assert usage == served + 2


async def test_an_exhausted_budget_says_which_and_when_it_resets(gateway: GatewayProcess, admin: Admin) -> None:
    tenant = await admin.tenant(daily_tokens=6)
    key = await admin.key(tenant)
    async with httpx.AsyncClient() as client:
        first = await wait_until_budgets_ready(client, gateway.url, key)
        assert first.status_code == 200  # 1 + 1 tokens
        body = {**GENERATE, "options": {"num_predict": 3}}
        spent = await client.post(gateway.url + "/api/generate", json=body, headers=auth(key))
        assert spent.status_code == 200
        refused = await client.post(gateway.url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                                    headers=auth(key))  # fmt: skip
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d 00:00")
    assert error["message"] == f"The tenant's daily token budget of 6 is used up; it resets at {tomorrow} UTC."
    midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert abs(int(refused.headers["retry-after"]) - (midnight - dt.datetime.now(dt.UTC)).total_seconds()) < 5


async def test_the_gateway_caps_output_to_what_the_budget_allows(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(tokens=50)
    key = await admin.key(total_tokens=30)
    async with httpx.AsyncClient() as client:
        await wait_until_budgets_ready(client, gateway.url, key)  # 2 tokens
        emulator.clear_requests()
        response = await client.post(gateway.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, headers=auth(key))  # fmt: skip
    sent = emulator.requests("/v1/chat/completions")[0].json()
    # 28 left; the prompt is estimated at 1 + 4 (one message): the cap is what remains.
    assert sent["max_tokens"] == 23
    assert response.json()["usage"]["completion_tokens"] == 23
    assert response.json()["choices"][0]["finish_reason"] == "length"


# --- fail closed and restart-safe ------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    with PrivateRedis() as private:
        yield private


async def test_budgets_fail_closed_while_redis_is_down_and_recover_without_restart(
    gateway_env: dict[str, str], admin: Admin, private_redis: PrivateRedis
) -> None:
    budgeted, free = await admin.key(daily_tokens=10_000), await admin.key(rpm=1000)
    async with in_process({**gateway_env, "REDIS_URL": private_redis.url}) as client:
        assert (await wait_until_budgets_ready(client, "", budgeted)).status_code == 200
        private_redis.stop()
        down = await client.post("/api/generate", json=GENERATE, headers=auth(budgeted))
        assert down.status_code == 503
        assert "budget store is unreachable" in down.json()["error"]
        # Without a budget, limits fail open: an outage of Redis is not an outage of the models.
        assert (await client.post("/api/generate", json=GENERATE, headers=auth(free))).status_code == 200
        private_redis.start()
        back = await wait_until_budgets_ready(client, "", budgeted)
        assert back.status_code == 200


async def test_spend_survives_a_redis_restart(
    gateway_env: dict[str, str], admin: Admin, private_redis: PrivateRedis
) -> None:
    key = await admin.key(total_tokens=12)
    async with in_process({**gateway_env, "REDIS_URL": private_redis.url}) as client:
        await wait_until_budgets_ready(client, "", key)  # 2 tokens
        body = {**GENERATE, "options": {"num_predict": 9}}
        assert (await client.post("/api/generate", json=body, headers=auth(key))).status_code == 200
        refused = await client.post("/api/generate", json=GENERATE, headers=auth(key))
        assert refused.status_code == 429
        await asyncio.sleep(1.2)  # let the ledger write
        private_redis.stop()
        private_redis.start()  # empty: every counter is gone
        # A real loss: fail closed until the ledger's sums are back (not "a new tenant").
        first = await client.post("/api/generate", json=GENERATE, headers=auth(key))
        assert first.status_code == 503
        assert "rebuilt from the usage ledger" in first.json()["error"]
        again = await wait_until_budgets_ready(client, "", key)
        assert again.status_code == 429
        assert again.json()["error"] == "The key's total token budget of 12 is used up."


async def test_one_daily_budget_covers_every_model_also_when_rebuilt_from_the_ledger(
    gateway_env: dict[str, str], admin: Admin, private_redis: PrivateRedis
) -> None:
    """The ledger keeps each model's usage apart (normalised: `llama3.2` is `llama3.2:latest`),
    and the budget counts them together: spent on two models, the daily budget refuses both,
    and still does after Redis lost the counters and they were rebuilt from the ledger."""
    tenant = await admin.tenant()
    key = await admin.key(tenant, daily_tokens=12)
    async with in_process({**gateway_env, "REDIS_URL": private_redis.url}) as client:
        tiny = await wait_until_budgets_ready(client, "", key)  # 1 + 1 tokens on tiny
        assert tiny.status_code == 200, tiny.text
        body = {**GENERATE, "model": "llama3.2", "options": {"num_predict": 9}}
        llama = await client.post("/api/generate", json=body, headers=auth(key))
        assert llama.status_code == 200, llama.text
        for model in ("tiny", "llama3.2"):
            refused = await client.post("/api/generate", json={**GENERATE, "model": model}, headers=auth(key))
            assert refused.status_code == 429, refused.text
        spent = {
            name: answer.json()["prompt_eval_count"] + answer.json()["eval_count"]
            for name, answer in (("tiny:latest", tiny), ("llama3.2:latest", llama))
        }
        assert sum(spent.values()) == 12
        assert await _ledger_tokens(admin, tenant, 12) == 12
        rows = await admin.pool.fetch(
            "SELECT model, requests, prompt_tokens + completion_tokens AS tokens FROM usage_daily u "
            "JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = $1 ORDER BY model", key[:11],
        )  # fmt: skip
        assert [tuple(r) for r in rows] == [("llama3.2:latest", 1, spent["llama3.2:latest"]),
                                           ("tiny:latest", 1, spent["tiny:latest"])]  # fmt: skip
        private_redis.stop()
        private_redis.start()  # empty: every counter is gone
        again = await wait_until_budgets_ready(client, "", key)
        assert again.status_code == 429, again.text
        assert again.json()["error"].startswith("The key's daily token budget of 12 is used up")
        other = await client.post("/api/generate", json=body, headers=auth(key))
        assert other.status_code == 429, other.text


# --- the limiter itself, with an injected clock ----------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def limiter_with_clock(redis_url: str, redis_prefix: str, database_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    clock = Clock(dt.datetime(2026, 11, 26, 23, 59, 50, tzinfo=dt.UTC).timestamp())
    limiter = Limiter(client, Ledger(pool, clock), prefix=redis_prefix + "unit:", lease_ttl=30, default_cap=100,
                      min_output=1, clock=clock)  # fmt: skip
    yield limiter, clock
    await limiter.stop()
    await client.aclose()
    await pool.close()


async def _ready(limiter: Limiter, tenant_id: int) -> None:
    """The tenant's epoch marker, as a finished rebuild from an empty ledger leaves it."""
    await limiter.redis.set(f"{limiter.prefix}{{t{tenant_id}}}:epoch", "test")


async def test_a_daily_budget_resets_at_utc_midnight_and_a_total_one_never(
    limiter_with_clock: Any, admin: Admin
) -> None:
    limiter, clock = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 10**9
    daily = Subject(1, tenant_id, Limits(daily_tokens=20), Limits())
    total = Subject(2, tenant_id, Limits(total_tokens=20), Limits())
    await _ready(limiter, tenant_id)
    for subject in (daily, total):
        admission = await limiter.admit(subject, 5, 15)
        limiter.settle(admission, subject, 5, 15, model="tiny:latest")
        assert await limiter.flush_settlements()
        with pytest.raises(BudgetExceeded, match="used up"):
            await limiter.admit(subject, 5, 15)
    clock.now += 15  # 00:00:05 the next day
    assert (await limiter.admit(daily, 5, 15)) is not None
    with pytest.raises(BudgetExceeded, match="total token budget of 20 is used up"):
        await limiter.admit(total, 5, 15)


async def test_each_days_calls_are_encoded_as_redis_py_would_send_them(limiter_with_clock: Any) -> None:
    """The EVALSHA of an admission is encoded once per subject and day (KEYS and checks) and
    finished per request: byte for byte the command redis-py packs from the same arguments,
    and a new day's calls name the new day's counters."""
    limiter, clock = limiter_with_clock
    every = Limits(rpm=10, tpm=1000, max_concurrent=3, daily_tokens=100, monthly_tokens=1000, total_tokens=5000)
    subject = Subject(7, 8, every, every)
    packer = Connection()  # redis-py's own packing, in Python
    days = []
    for _ in range(2):
        checks = limiter.checks(subject, clock.now)
        assert limiter.checks(subject, clock.now) is checks  # encoded once per day
        call = Call(checks, ["admit", 30000, 1, "lease-0", 30, 12, "lease-1", 12, -1, 100, 1])
        assert len(call.args(limiter.script.sha)) > 60
        assert call.wire() == b"".join(packer.pack_command(*call.args(limiter.script.sha)))
        day = dt.datetime.fromtimestamp(clock.now, dt.UTC).strftime("d%Y%m%d").encode()
        assert call.wire().count(b":" + day) == 2  # the key's and the tenant's daily counters
        days.append(day)
        clock.now += 15  # past midnight: the next day's counters
    assert days[0] != days[1]


async def test_calls_after_redis_forgets_the_script_load_it_and_are_answered_in_order(
    limiter_with_clock: Any,
) -> None:
    limiter, _ = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 3 * 10**9
    subject = Subject(1, tenant_id, Limits(rpm=5, daily_tokens=100), Limits())
    await _ready(limiter, tenant_id)
    await limiter.redis.script_flush()  # what a Redis restart or failover does to loaded scripts
    # two admissions in one pipeline: both refused for the missing script, sent again, each its own reply
    first, second = await asyncio.gather(limiter.admit(subject, 5, 10), limiter.admit(subject, 5, 60))
    assert first is not None
    assert second is not None
    assert (first.reserved, second.reserved) == (15, 65)
    assert first.headers[1] != second.headers[1]  # remaining requests: 4 and 3
    await limiter.redis.script_flush()
    limiter.settle(first, subject, 5, 10, model="tiny")
    assert await limiter.flush_settlements()
    day = dt.datetime.fromtimestamp(limiter.clock(), dt.UTC).strftime("%Y%m%d")
    assert await limiter.redis.get(f"{limiter.prefix}{{t{tenant_id}}}:used:k1:d{day}") == b"15"


async def test_a_settlement_frees_its_slot_for_an_admission_sent_with_it(limiter_with_clock: Any) -> None:
    """A client that sends its next request the moment its answer ended: the settlement and
    the new admission come up in the same loop turn, and the slot is free for it."""
    limiter, _ = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 4 * 10**9
    subject = Subject(1, tenant_id, Limits(max_concurrent=1), Limits())
    first = await limiter.admit(subject, 5, 10)
    with pytest.raises(RateLimited, match="in flight"):
        await limiter.admit(subject, 5, 10)
    limiter.settle(first, subject, 5, 10, model="tiny")
    assert (await limiter.admit(subject, 5, 10)) is not None  # queued after the settlement, sent with it


def pipelines_of(limiter: Limiter, monkeypatch: pytest.MonkeyPatch) -> list[list[Call]]:
    """The calls of each pipeline the limiter sends from now on (every pipeline is made by
    `_batch`, whether it goes on the wire or through a task)."""
    sent: list[list[Call]] = []
    batch = limiter._batch

    def recorded(*args: Any) -> tuple[list[Call], list[list[Settlement]]]:
        calls, carried = batch(*args)
        if calls:
            sent.append(calls)
        return calls, carried

    monkeypatch.setattr(limiter, "_batch", recorded)
    return sent


async def test_a_keys_settlements_ride_in_its_next_admission_and_each_counts(
    limiter_with_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests end and the key's next one comes up in the same loop turn: one script
    call admits it and settles all three, each with its own usage and reservation."""
    limiter, clock = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 5 * 10**9
    every = Limits(rpm=1000, tpm=100_000, max_concurrent=10, daily_tokens=10_000, monthly_tokens=10**6,
                   total_tokens=10**7)  # fmt: skip
    subject = Subject(1, tenant_id, every, every)
    await _ready(limiter, tenant_id)
    ended = [await limiter.admit(subject, 5, 20) for _ in range(3)]
    pipelines = pipelines_of(limiter, monkeypatch)
    for admission, used in zip(ended, (7, 11, 13), strict=True):
        assert admission is not None
        limiter.settle(admission, subject, used, 0, model="tiny")
    admission = await limiter.admit(subject, 5, 20)
    assert admission is not None
    assert [len(calls) for calls in pipelines] == [1]
    assert await in_flight(limiter.redis, limiter.prefix, tenant_id, "t") == 1
    assert await in_flight(limiter.redis, limiter.prefix, tenant_id, "k1") == 1
    spent_tokens = {"daily_tokens": 31, "monthly_tokens": 31, "total_tokens": 31}
    assert await spent(limiter.redis, limiter.prefix, tenant_id, clock.now) == spent_tokens
    for sid in ("t", "k1"):  # only the new request's reservation is held
        assert await limiter.redis.hget(f"{limiter.prefix}{{t{tenant_id}}}:reserved:{sid}", "=") == b"25"
    # Tokens per minute: what the three used and the new one's reservation, not four reservations.
    remaining = int(dict(admission.headers)[b"x-ratelimit-remaining-tokens"])
    assert 100_000 - 31 - 25 <= remaining <= 100_000 - 25


async def test_a_settlement_goes_ahead_of_admissions_of_its_tenants_other_keys(limiter_with_clock: Any) -> None:
    """A tenant allows one request in flight. Its request on key A ends as one on key B and
    A's next one come up: A's settlement is not held back for A's next admission; B gets the
    slot it freed, and A's next one is refused."""
    limiter, _ = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 6 * 10**9
    a, b = (Subject(key_id, tenant_id, Limits(), Limits(max_concurrent=1)) for key_id in (1, 2))
    first = await limiter.admit(a, 5, 10)
    on_b, again_on_a = asyncio.ensure_future(limiter.admit(b, 5, 10)), asyncio.ensure_future(limiter.admit(a, 5, 10))
    limiter.settle(first, a, 5, 10, model="tiny")  # queued in the same turn, after both admissions
    answers = await asyncio.gather(on_b, again_on_a, return_exceptions=True)
    assert isinstance(answers[0], Admission)
    assert isinstance(answers[1], RateLimited)
    assert "in flight" in str(answers[1])


async def test_every_pipeline_goes_to_redis_on_one_connection_in_the_order_made(
    redis_url: str, redis_prefix: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One server: pipelines leave mid-turn once a few admissions are queued, all on the
    wire's one connection, and Redis counts them in the order written: a request's settlement
    still unanswered when the key's next admission is written frees its slot for it, every
    time (on pooled connections Redis could take the admission first)."""
    name = f"wire-{secrets.token_hex(4)}"
    client = aioredis.Redis.from_url(redis_url, client_name=name)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    limiter = Limiter(client, Ledger(pool), prefix=redis_prefix + "unit:", lease_ttl=30, default_cap=100, min_output=1)
    assert limiter.wire is not None
    pipelines = pipelines_of(limiter, monkeypatch)
    tenant_id = secrets.randbelow(10**9) + 11 * 10**9
    subject = Subject(1, tenant_id, Limits(max_concurrent=1), Limits(rpm=10**6))
    many = [Subject(2 + n, tenant_id, Limits(), Limits(rpm=10**6)) for n in range(40)]
    try:
        for _ in range(20):
            admission = await limiter.admit(subject, 5, 10)  # refused if the last settlement came second
            await asyncio.gather(*(limiter.admit(other, 5, 10) for other in many))  # in one turn
            limiter.settle(admission, subject, 5, 10, model="tiny")
            await asyncio.sleep(0)  # the turn that writes the settlement's pipeline
            assert limiter.wire.pending  # not answered yet when the next admission is written
        assert len(many) > EARLY
        assert len(pipelines) >= 20 * (len(many) // EARLY)  # the others' admissions left EARLY at a time
        async with aioredis.Redis.from_url(redis_url) as observer:
            connections = [c for c in await observer.client_list() if c.get("name") == name]
        assert len([c for c in connections if c["cmd"] == "evalsha"]) == 1
    finally:
        await limiter.stop()
        await client.aclose()
        await pool.close()


async def test_without_the_wire_an_admission_waits_for_its_tenants_settlements_on_their_way(
    limiter_with_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Redis Cluster pipelines go out on separate connections: a request's settlement is
    on its way (its pipeline sent, not yet answered) when the key's next request comes up.
    Sent at once, that admission could be counted first and meet the finished request still in
    flight; it waits for the answer instead, and the tenant's settlements that come up
    meanwhile wait with it and ride along."""
    limiter, _ = limiter_with_clock
    limiter.wire = None  # pooled connections, as with a Redis Cluster
    tenant_id = secrets.randbelow(10**9) + 8 * 10**9
    subject = Subject(1, tenant_id, Limits(max_concurrent=2), Limits())
    first, second = await limiter.admit(subject, 5, 10), await limiter.admit(subject, 5, 10)
    reached, release = asyncio.Event(), asyncio.Event()
    sent: list[list[Call]] = []
    send = limiter._pipelined

    async def settlement_held_on_the_way(calls: list[Call], *rest: Any) -> list[Any]:
        sent.append(calls)
        if calls[0].argv[0] == "settle":
            reached.set()
            await release.wait()
        replies: list[Any] = await send(calls, *rest)
        return replies

    monkeypatch.setattr(limiter, "_pipelined", settlement_held_on_the_way)
    limiter.settle(first, subject, 5, 10, model="tiny")
    await asyncio.wait_for(reached.wait(), 10)
    third = asyncio.ensure_future(limiter.admit(subject, 5, 10))
    limiter.settle(second, subject, 5, 10, model="tiny")
    for _ in range(50):  # loop turns, far more than sending a pipeline takes
        await asyncio.sleep(0)
    assert len(sent) == 1
    release.set()
    assert await asyncio.wait_for(third, 10) is not None
    assert [[call.argv[:3] for call in calls] for calls in sent] == [
        [["settle", limiter.lease_ttl_ms, 1]],
        [["admit", limiter.lease_ttl_ms, 1]],  # the second request's settlement rides in it
    ]
    assert await in_flight(limiter.redis, limiter.prefix, tenant_id, "k1") == 1


async def test_a_defect_in_sending_fails_the_waiting_admissions_instead_of_hanging_them(
    limiter_with_clock: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limiter, _ = limiter_with_clock
    subject = Subject(1, secrets.randbelow(10**9) + 9 * 10**9, Limits(rpm=10), Limits())

    def broken(*_: Any) -> Any:
        raise KeyError("a defect")

    monkeypatch.setattr(limiter, "_batch", broken)
    with pytest.raises(KeyError, match="a defect"):
        await asyncio.wait_for(limiter.admit(subject, 5, 10), 10)
    assert "limits pipeline failed" in caplog.text


async def test_an_expired_lease_charged_by_an_admission_counts_against_that_admission(
    limiter_with_clock: Any,
) -> None:
    """A request's holder died: its lease expires and the next admission charges its whole
    reservation to the budget, and must then see that charge: 100 - 65 - 5 leaves room for
    30 tokens of output, not 60."""
    limiter, _ = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 7 * 10**9
    subject = Subject(1, tenant_id, Limits(daily_tokens=100), Limits())
    await _ready(limiter, tenant_id)
    crashed = await limiter.admit(subject, 5, 60)
    assert crashed is not None
    assert crashed.reserved == 65
    limiter.leases.pop(crashed.lease)  # no one renews it
    await limiter.redis.zadd(f"{limiter.prefix}{{t{tenant_id}}}:lease:k1", {crashed.lease: 1})  # expired long ago
    after = await limiter.admit(subject, 5, 60)
    assert after is not None
    assert after.cap == 30


async def test_a_redis_that_stops_answering_fails_the_admission_in_bounded_time(
    redis_prefix: str, database_url: str
) -> None:
    """A Redis that takes the calls and never answers (hung, or a black hole on the way): the
    connection's socket timeout bounds the whole exchange, and a budgeted request gets 503."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.3)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    limiter = Limiter(client, Ledger(pool), prefix=redis_prefix + "unit:", lease_ttl=30, default_cap=100, min_output=1)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="budget store is unreachable"):
            await limiter.admit(Subject(1, 1, Limits(daily_tokens=100), Limits()), 5, 10)
        assert time.monotonic() - started < 10
        assert accepted  # it was reached, and did not answer
    finally:
        await client.aclose()
        await pool.close()
        for writer in accepted:
            writer.close()
        server.close()


async def test_admissions_held_behind_a_settlement_redis_did_not_answer_fail_with_it(
    redis_prefix: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the wire (a Redis Cluster), a Redis that stops answering while a tenant's
    settlement is on its way: the tenant's admission waiting behind it gets the same answer
    (503 with a budget) when that pipeline times out, rather than being sent to wait out a
    timeout of its own."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    client = aioredis.Redis(host="127.0.0.1", port=server.sockets[0].getsockname()[1], socket_timeout=0.5,
                            retry=Retry(NoBackoff(), 0))  # fmt: skip
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    limiter = Limiter(client, Ledger(pool), prefix=redis_prefix + "unit:", lease_ttl=30, default_cap=100, min_output=1)
    limiter.wire = None  # pooled connections, as with a Redis Cluster (the wire fails all it wrote at once)
    pipelines = pipelines_of(limiter, monkeypatch)
    subject = Subject(1, 1, Limits(daily_tokens=100), Limits())
    try:
        limiter.settle(Admission(subject, "ended", 10, 15, []), subject, 5, 10, model="tiny")
        await asyncio.sleep(0)  # its pipeline leaves in the next turn
        with pytest.raises(ServiceUnavailable, match="budget store is unreachable"):
            await asyncio.wait_for(limiter.admit(subject, 5, 10), 10)
        # The admission was never sent (the settlement may have been sent again meanwhile).
        assert {call.argv[0] for calls in pipelines for call in calls} == {"settle"}
    finally:
        await client.aclose()
        await pool.close()
        for writer in accepted:
            writer.close()
        server.close()


async def test_a_graceful_stop_hears_back_about_settlements_already_on_their_way(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A request ended and its settlement's pipeline is written, but Redis has not answered
    yet (it holds every client's commands for 0.3 s) when the worker stops: the stop waits
    for the answer rather than closing the connection under it, so the request's slot is
    given back instead of being held until its lease expires."""
    tenant_id = secrets.randbelow(10**9) + 12 * 10**9
    subject = Subject(1, tenant_id, Limits(max_concurrent=1), Limits())
    with PrivateRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        limiter = Limiter(client, Ledger(pool), prefix="stop:", lease_ttl=30, default_cap=100, min_output=1)
        try:
            admission = await limiter.admit(subject, 5, 10)
            async with aioredis.Redis.from_url(server.url) as other:
                await other.client_pause(300, all=True)
            limiter.settle(admission, subject, 5, 10, model="tiny")
            await asyncio.sleep(0)  # the turn that writes the settlement's pipeline
            assert limiter.wire is not None
            assert limiter.wire.pending
            await asyncio.wait_for(limiter.stop(), 10)
            assert await in_flight(client, "stop:", tenant_id, "k1") == 0
            assert "settlement failed; will retry" not in caplog.text
        finally:
            await client.aclose()
            await pool.close()


FATES = st.sampled_from(["done", "cancelled", "late"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 30), st.one_of(st.none(), st.integers(0, 60)), FATES), min_size=1, max_size=25
    )
)
async def test_budgets_hold_under_any_mix_of_sizes_caps_and_cancellations(
    limiter_with_clock: Any, requests: list[tuple[int, int | None, str]]
) -> None:
    limiter, clock = limiter_with_clock
    scope = secrets.randbelow(10**9) + 2 * 10**9  # a fresh key and tenant per example
    subject = Subject(scope, scope, Limits(daily_tokens=150), Limits(monthly_tokens=400))
    await _ready(limiter, scope)
    tag = f"{limiter.prefix}{{t{scope}}}:"
    day = dt.datetime.fromtimestamp(clock.now, dt.UTC).strftime("%Y%m%d")

    async def committed() -> int:
        spent = int(await limiter.redis.get(f"{tag}used:k{scope}:d{day}") or 0)
        amounts = {k.decode(): int(v) for k, v in (await limiter.redis.hgetall(f"{tag}reserved:k{scope}")).items()}
        assert amounts.pop("=", 0) == sum(amounts.values())  # the running sum is the sum
        return spent + sum(amounts.values())

    late = []
    for prompt, cap, fate in requests:
        try:
            admission = await limiter.admit(subject, prompt, cap)
        except (BudgetExceeded, RateLimited):
            continue
        assert admission is not None
        assert admission.cap is not None
        assert await committed() <= 150
        if fate == "late":
            late.append(admission)  # still in flight while the others come and go
            continue
        produced = admission.cap if fate == "done" else admission.cap // 2
        limiter.settle(admission, subject, prompt, produced, model="tiny:latest")
        assert await limiter.flush_settlements()
        assert await committed() <= 150
    for admission in late:
        limiter.settle(admission, subject, 1, admission.cap or 0, model="tiny:latest")
    assert await limiter.flush_settlements()
    assert await committed() <= 150
    outstanding = await limiter.redis.hgetall(f"{tag}reserved:k{scope}")
    assert outstanding in ({}, {b"=": b"0"})  # nothing outstanding
    assert await limiter.redis.zcard(f"{tag}lease:k{scope}") == 0


async def test_a_limit_change_reaches_every_replica_within_a_second(
    gateway: GatewayProcess, replica: GatewayProcess, admin: Admin
) -> None:
    key = await admin.key(rpm=1000)
    async with httpx.AsyncClient() as client:
        for process in (gateway, replica):
            assert (
                await client.post(process.url + "/api/generate", json=GENERATE, headers=auth(key))
            ).status_code == 200
        await tenants.update_key(admin.pool, key[:11], {"rpm": 2})  # what `set-limits --prefix … --rpm 2` does
        await asyncio.sleep(1.0)
        statuses = [
            (await client.post(p.url + "/api/generate", json=GENERATE, headers=auth(key))).status_code
            for p in (gateway, replica, gateway)
        ]
    assert statuses == [200, 200, 429]  # the new limit, in force everywhere, counted across both


async def test_the_script_is_loaded_again_after_redis_forgets_it(
    gateway: GatewayProcess, admin: Admin, redis_url: str
) -> None:
    key = await admin.key(rpm=100)
    async with httpx.AsyncClient() as client:
        assert (await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))).status_code == 200
        direct = aioredis.Redis.from_url(redis_url)
        await direct.script_flush()  # what a Redis restart or failover does to loaded scripts
        await direct.aclose()
        again = await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "98"


async def test_a_long_stream_keeps_its_slot_past_the_lease_time(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=100, tokens=80)  # 8 s: longer than the 5 s lease
    key = await admin.key(max_concurrent=1)
    with GatewayProcess({**gateway_env, "GATEWAY_LEASE_TTL": "5"}) as process:
        async with httpx.AsyncClient(timeout=30) as client:
            long = asyncio.create_task(
                client.post(process.url + "/api/generate", json={"model": "tiny", "prompt": "hi"}, headers=auth(key))
            )
            await asyncio.sleep(6.5)  # past the first lease: renewal must have kept it
            short = {**GENERATE, "options": {"num_predict": 1}}
            assert (await client.post(process.url + "/api/generate", json=short, headers=auth(key))).status_code == 429
            assert (await long).status_code == 200
            assert (await client.post(process.url + "/api/generate", json=short, headers=auth(key))).status_code == 200


# --- counters that Redis never held, and a Redis that comes back ------------------------------------------


async def _redis_has_held_data_for_a_while(redis_url: str, prefix: str) -> None:
    """The instance marker as a Redis that has served this gateway for a minute has it (the
    module's gateway may have started a moment ago)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        seconds, micros = await client.time()
        await client.set(prefix + "instance", seconds * 1000 + micros // 1000 - 60_000)
    finally:
        await client.aclose()


async def _ledger_tokens(admin: Admin, tenant: str, expected: int) -> int:
    deadline = time.monotonic() + 10
    while True:
        spent = await admin.pool.fetchval(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily u "
            "JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1", tenant,
        )  # fmt: skip
        if spent >= expected or time.monotonic() > deadline:
            return int(spent)
        await asyncio.sleep(0.1)


async def test_a_new_tenants_first_budgeted_request_is_served_at_once(
    gateway: GatewayProcess, admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    await _redis_has_held_data_for_a_while(redis_url, redis_prefix)
    key = await admin.key(daily_tokens=10_000)
    async with httpx.AsyncClient() as client:
        first = await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))
    assert first.status_code == 200, first.text


async def _spend_until_refused(client: httpx.AsyncClient, url: str, key: str, wait: float = 5.0) -> httpx.Response:
    deadline = time.monotonic() + wait
    while True:
        answer = await client.post(url + "/api/generate", json=GENERATE, headers=auth(key))
        if answer.status_code != 200 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.1)


async def test_a_first_budget_starts_from_the_spend_so_far(
    gateway: GatewayProcess, admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    """A tenant spends without a budget, then gets a monthly budget equal to what it spent:
    its next requests are refused at once, not after a rebuild wait or from a counter at 0."""
    await _redis_has_held_data_for_a_while(redis_url, redis_prefix)
    tenant = await admin.tenant()
    key = await admin.key(tenant)
    spent = 0
    async with httpx.AsyncClient() as client:
        for _ in range(4):
            answer = await client.post(gateway.url + "/api/generate", json=GENERATE, headers=auth(key))
            assert answer.status_code == 200, answer.text
            spent += answer.json()["prompt_eval_count"] + answer.json()["eval_count"]
        assert await _ledger_tokens(admin, tenant, spent) == spent
        await admin.pool.execute("UPDATE tenants SET monthly_tokens = $2 WHERE name = $1", tenant, spent)
        refused = await _spend_until_refused(client, gateway.url, key)
    assert refused.status_code == 429, refused.text
    assert "monthly token budget" in refused.json()["error"]


async def test_a_budget_added_next_to_another_starts_from_the_spend_so_far(
    limiter_with_clock: Any, admin: Admin
) -> None:
    """A key with only a daily budget spends; a monthly budget added later counts that spend
    (it was counted all along), so a monthly budget of what was spent is used up at once."""
    limiter, _ = limiter_with_clock
    tenant_id = secrets.randbelow(10**9) + 10**9
    await _ready(limiter, tenant_id)
    daily_only = Subject(7, tenant_id, Limits(daily_tokens=1000), Limits())
    for _ in range(3):
        admission = await limiter.admit(daily_only, 5, 15)
        limiter.settle(admission, daily_only, 5, 15, model="tiny:latest")
        assert await limiter.flush_settlements()
    with_monthly = Subject(7, tenant_id, Limits(daily_tokens=1000, monthly_tokens=60), Limits())
    with pytest.raises(BudgetExceeded, match="monthly token budget of 60 is used up"):
        await limiter.admit(with_monthly, 5, 15)


async def test_budgeted_requests_succeed_at_once_after_redis_restarts_with_its_data(
    gateway_env: dict[str, str], admin: Admin, private_redis: PrivateRedis
) -> None:
    key = await admin.key(daily_tokens=1_000_000)
    async with in_process({**gateway_env, "REDIS_URL": private_redis.url}) as client:
        assert (await wait_until_budgets_ready(client, "", key)).status_code == 200
        for _ in range(5):  # several pooled connections in use
            await asyncio.gather(*(client.post("/api/generate", json=GENERATE,
                                               headers=auth(key)) for _ in range(4)))  # fmt: skip
        redis = aioredis.Redis.from_url(private_redis.url)
        with contextlib.suppress(redis_exceptions.ConnectionError):
            await redis.shutdown(save=True)  # keeps its data on disk, as a persistent Redis would
        await redis.aclose()
        assert private_redis.process is not None
        private_redis.process.wait(10)
        private_redis.start()
        started = time.monotonic()
        answer = await client.post("/api/generate", json=GENERATE, headers=auth(key))
        elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert elapsed < 1.0
