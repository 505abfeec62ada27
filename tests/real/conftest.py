"""The real-Ollama tier: one real Ollama server per test worker, the tiny models on it, and a
gateway in front of it (see tests/real/ollama.py for where the server comes from).

Every test here carries the `real_ollama` marker (`-m "not real_ollama"` leaves the tier out).
Without a server the tier is skipped with one line saying how to enable it; with
REQUIRE_REAL_OLLAMA=1 (CI sets it when the server is there) that skip is a failure instead, so
the tier cannot silently stop running.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from tests.real.ollama import (
    HOW_TO_ENABLE,
    OllamaServer,
    Unavailable,
    find_binary,
    gguf_dir,
    missing_models,
    register_models,
)
from tests.support import METRICS_TOKEN, Admin, GatewayProcess

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.real_ollama)


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("REQUIRE_REAL_OLLAMA") == "1":
        pytest.fail(f"REQUIRE_REAL_OLLAMA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ollama_binary() -> Path:
    binary = find_binary()
    if binary is None:
        unavailable("no ollama binary (shared folder or PATH) to start servers of the test's own")
    return binary


@pytest.fixture(scope="session")
def ollama_url() -> Iterator[str]:
    """The base URL of a real Ollama that has the tiny models."""
    binary = find_binary()
    models = gguf_dir()
    if binary is not None:
        if models is None:
            unavailable("the tiny models' GGUF files are missing: set NEURONETZ_TEST_OLLAMA_GGUF_DIR")
        with OllamaServer(binary) as server:
            register_models(server.url, models)
            yield server.url
        return
    url = os.environ.get("NEURONETZ_TEST_OLLAMA_URL", "").rstrip("/")
    if not url:
        unavailable(HOW_TO_ENABLE)
    try:
        if missing_models(url) and models is not None:
            register_models(url, models)
        missing = missing_models(url)
    except (Unavailable, OSError) as exc:
        unavailable(f"the Ollama at {url} cannot be used: {exc}")
    if missing:
        unavailable(f"{url} lacks {', '.join(missing)} and no GGUF files: set NEURONETZ_TEST_OLLAMA_GGUF_DIR")
    yield url


@pytest.fixture(scope="session")
def models_dir() -> Path:
    directory = gguf_dir()
    if directory is None:
        unavailable("the tiny models' GGUF files are missing: set NEURONETZ_TEST_OLLAMA_GGUF_DIR")
    return directory


def gateway_settings(database_url: str, redis_url: str, redis_prefix: str, backends: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_prefix,
        "OLLAMA_BACKENDS": backends,
        "GATEWAY_SECRET": "test-secret-not-for-production",
        "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
        "GATEWAY_MIGRATE_ON_START": "false",
        "GATEWAY_HEALTH_INTERVAL": "1",
    }


def redis_held_data_for_a_while(redis_url: str, prefix: str) -> None:
    """Set the instance marker as a Redis that has served the gateway for a minute has it. On a
    fresh key prefix (or one another test of this worker just flushed to simulate a loss) the
    gateway cannot tell a new Redis from one that lost its data moments ago, and refuses
    budgeted requests with 503 while it waits to rebuild (fail closed) — a test's new tenant
    would otherwise race that wait."""
    client = redis.Redis.from_url(redis_url)
    try:
        seconds, micros = client.time()
        client.set(prefix + "instance", seconds * 1000 + micros // 1000 - 60_000)
    finally:
        client.close()


@pytest.fixture(scope="session")
def real_gateway(database_url: str, redis_url: str, redis_prefix: str, ollama_url: str) -> Iterator[GatewayProcess]:
    """A gateway whose only backend is the real Ollama."""
    redis_held_data_for_a_while(redis_url, redis_prefix)
    with GatewayProcess(gateway_settings(database_url, redis_url, redis_prefix, ollama_url)) as process:
        yield process


KeyMaker = Callable[..., Awaitable[str]]


@pytest.fixture
def budgeted_key(admin: Admin, redis_url: str, redis_prefix: str) -> KeyMaker:
    """`await budgeted_key(daily_tokens=100)`: a key of a new tenant with those limits (a new
    tenant's budgeted requests are served at once: its counters start from its empty ledger)."""

    async def make(**limits: int | None) -> str:
        redis_held_data_for_a_while(redis_url, redis_prefix)
        return await admin.key(await admin.tenant(allow_cloud=False, **limits))

    return make
