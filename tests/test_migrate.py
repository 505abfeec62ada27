from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import asyncpg
import pytest

from neuronetz import migrate
from neuronetz.migrate import Migration, MigrationError


async def _applied(url: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        return [row["name"] for row in await connection.fetch("SELECT name FROM schema_migrations ORDER BY version")]
    finally:
        await connection.close()


async def test_fresh_database_gets_every_migration_then_nothing(empty_database_url: str) -> None:
    names = [m.name for m in migrate.discover()]
    assert await migrate.migrate(empty_database_url) == names
    assert await migrate.migrate(empty_database_url) == []
    assert await _applied(empty_database_url) == names


async def test_concurrent_runners_apply_each_file_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate.migrate(empty_database_url) for _ in range(4)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in migrate.discover())


async def test_a_changed_applied_file_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), directory)
    connection = await asyncpg.connect(empty_database_url)
    try:
        await migrate.apply(connection, migrate.discover(directory))
        first = sorted(directory.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- an innocent edit\n")
        with pytest.raises(MigrationError, match=re.escape(f"{first.name} was changed after it was applied")):
            await migrate.apply(connection, migrate.discover(directory))
    finally:
        await connection.close()


async def test_a_failing_migration_is_rolled_back_and_named(empty_database_url: str) -> None:
    broken = [Migration(1, "0001_broken.sql", "CREATE TABLE t (a int); SELECT no_such_function();")]
    connection = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(MigrationError, match=re.escape("0001_broken.sql failed and was rolled back")):
            await migrate.apply(connection, broken)
        assert await connection.fetchval("SELECT to_regclass('t')") is None
    finally:
        await connection.close()


async def test_a_database_newer_than_the_binary_is_refused(empty_database_url: str) -> None:
    await migrate.migrate(empty_database_url)
    connection = await asyncpg.connect(empty_database_url)
    try:
        await connection.execute("INSERT INTO schema_migrations VALUES (9999, '9999_future.sql', 'x')")
        with pytest.raises(MigrationError, match=re.escape("9999_future.sql")):
            await migrate.apply(connection, migrate.discover())
    finally:
        await connection.close()


def test_badly_named_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_short.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match=re.escape("NNNN_description.sql")):
        migrate.discover(tmp_path)
