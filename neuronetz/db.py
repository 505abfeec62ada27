"""Postgres access: connecting (with errors a person can act on) and the connection pool.

Queries live next to the code that runs them (keys.py, budgets.py, audit.py, ...) as plain
`$1` SQL strings; this module only knows how to reach the database, and which errors mean
that a store is unavailable (retry later) rather than that a row is bad (retrying is futile).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.exceptions

CONNECT_TIMEOUT = 5.0

# Postgres could not be asked or could not answer: worth retrying once it is back.
ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Postgres refused what we sent (SQLSTATE class 22 data exceptions such as a NUL in text or a
# number out of range, class 23 constraint violations), or asyncpg could not encode a value
# for its column (OverflowError, asyncpg's own DataError): the same rows fail every time.
# Catch these before ERRORS, which holds some of them.
# (asyncpg's client-side "invalid input for query argument" is a ValueError.)
DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, OverflowError, ValueError, TypeError)
# The same for Redis: a refused command (RedisError), a dead socket, a timeout, or a Redis
# Cluster whose slots redis-py cannot reach (RedisClusterException is no RedisError).
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, TimeoutError)
# What worker.redis_client builds: one server (directly or through Sentinel) or a Redis Cluster.
RedisClient = aioredis.Redis | redis.asyncio.cluster.RedisCluster


class DatabaseUnavailable(Exception):
    """Postgres could not be reached or refused us; str() is a sentence for the operator."""


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _explain(url: str, exc: BaseException) -> DatabaseUnavailable:
    where = redact(url)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseUnavailable(
            f"The database in DATABASE_URL ({where}) does not exist; run `migrate` to create it."
        )
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return DatabaseUnavailable(f"Postgres refused the credentials in DATABASE_URL ({where}).")
    if isinstance(exc, TimeoutError):
        return DatabaseUnavailable(f"Postgres at {where} did not answer within {CONNECT_TIMEOUT:g} s; is it running?")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return DatabaseUnavailable(f"Cannot reach Postgres at {where} ({reason}); start it or fix DATABASE_URL.")


async def connect(url: str) -> asyncpg.Connection[Any]:
    """One connection, for the CLI and the migration runner."""
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except ERRORS as exc:
        raise _explain(url, exc) from None


async def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist yet (first start of a fresh
    install). Needs a role allowed to CREATE DATABASE; otherwise the error says so."""
    try:
        connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except asyncpg.InvalidCatalogNameError:
        pass
    except ERRORS as exc:
        raise _explain(url, exc) from None
    else:
        await connection.close()
        return
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    admin = await connect(maintenance)
    try:
        # Identifiers cannot be bound as $1 parameters; quote_ident-style doubling of '"'
        # makes the name one identifier whatever it contains.
        await admin.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except asyncpg.DuplicateDatabaseError:
        pass  # another replica created it first
    except asyncpg.PostgresError as exc:
        raise DatabaseUnavailable(f"Could not create the database {name!r}: {exc}.") from None
    finally:
        await admin.close()


async def create_pool(url: str, size: int) -> asyncpg.Pool[Any]:
    """The per-worker pool. min_size=0: a worker starts (and answers /healthz) while
    Postgres is down, and connects when the first query needs it."""
    pool = asyncpg.create_pool(url, min_size=0, max_size=size, timeout=CONNECT_TIMEOUT, command_timeout=30)
    return await pool


async def ping(pool: asyncpg.Pool[Any]) -> None:
    """Raise unless Postgres answers `SELECT 1` (the caller bounds the wait)."""
    await pool.fetchval("SELECT 1")
