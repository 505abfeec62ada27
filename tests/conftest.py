"""Fixtures: a Postgres database and a Redis key prefix of this run's own.

Each run creates `neuronetz_test_<random>`, migrates it and drops it at the end; it never
touches a database it did not create. Redis keys live under a per-run prefix and only
those are deleted. TEST_DATABASE_URL (a maintenance database to connect to, default the
local `postgres`) and TEST_REDIS_URL override the defaults.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
import redis

from neuronetz import migrate
from tests.asgi import in_process
from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, Admin, GatewayProcess

ADMIN_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def database_url_named(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_DATABASE_URL)._replace(path=f"/{name}"))


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def create_database() -> tuple[str, str]:
    name = f"neuronetz_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return name, database_url_named(name)


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database shared by the whole run."""
    name, url = create_database()
    try:
        asyncio.run(migrate.migrate(url))
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    """A database with nothing in it, for migration tests."""
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"nzt{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    """A fake Ollama of this module's own (tests may configure it and inject faults)."""
    with Emulator() as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh_emulator(request: pytest.FixtureRequest) -> None:
    """Every test starts with the module's emulator as it was built: no leftover faults,
    delays or records from the test before."""
    if "emulator" in request.fixturenames:
        request.getfixturevalue("emulator").reset()


@pytest.fixture(scope="module")
def gateway_env(database_url: str, redis_url: str, redis_prefix: str, emulator: Emulator) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_prefix,
        "OLLAMA_BACKENDS": emulator.url,
        "GATEWAY_SECRET": "test-secret-not-for-production",
        "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
        "GATEWAY_MIGRATE_ON_START": "false",
        "GATEWAY_HEALTH_INTERVAL": "1",
    }


@pytest.fixture(scope="module")
def gateway(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """One gateway process for the module, on the module's emulator."""
    with GatewayProcess(gateway_env) as process:
        yield process


@pytest_asyncio.fixture(scope="module")
async def asgi(gateway_env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """The module's gateway in this process, driven through its ASGI callable (tests/asgi.py):
    for tests that need no server in front of the application."""
    async with in_process(gateway_env) as client:
        yield client


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def admin(database_url: str) -> AsyncIterator[Admin]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield Admin(pool)
    finally:
        await pool.close()
