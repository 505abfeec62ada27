"""Fixtures: a Postgres database and a Redis key prefix of this run's own (services.md).

Each run creates `neuronetz_test_<random>`, migrates it and drops it at the end; it never
touches a database it did not create. Redis keys live under a per-run prefix and only
those are deleted. TEST_DATABASE_URL (a maintenance database to connect to, default the
local `postgres`) and TEST_REDIS_URL override the defaults.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from neuronetz import migrate

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
