"""Our own migration runner: plain numbered `.sql` files, applied forward only.

Each file `NNNN_description.sql` runs in its own transaction and is recorded in
`schema_migrations` with a SHA-256 of its text. The whole run holds a Postgres advisory
lock, so replicas that start together apply each file exactly once. A file whose text
changed after it was applied, or a database that knows migrations this binary does not,
stops the run with an error that says what to do: the schema is an interface shared with
neuronetz-console, so it only ever moves forward through new files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from neuronetz import db

# Arbitrary but fixed: the advisory-lock id every replica agrees on ("nz-migr" in ASCII).
LOCK_ID = 0x6E7A2D6D69677200
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migrations cannot be applied; str() says why and what to do."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """Inside the binary the files ship as `neuronetz/migrations`; in a source checkout they
    are the top-level `migrations/` (pyproject.toml maps one onto the other)."""
    packaged = Path(__file__).with_name("migrations")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "migrations"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name} is not named NNNN_description.sql.")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name} and {found[version].name} share the number {version:04d}.")
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


async def apply(connection: asyncpg.Connection[Any], migrations: list[Migration]) -> list[str]:
    """Apply what is pending under the advisory lock; return the names applied, in order."""
    await connection.execute("SELECT pg_advisory_lock($1)", LOCK_ID)
    try:
        await connection.execute(_CREATE_TABLE)
        rows = await connection.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {row["version"]: row for row in rows}
        known = {migration.version for migration in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            names = ", ".join(applied[version]["name"] for version in unknown)
            raise MigrationError(
                f"The database has migrations this binary does not know ({names}); run a newer neuronetz-gateway."
            )
        done: list[str] = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} was changed after it was applied (recorded checksum "
                        f"{row['checksum'][:12]}…, file {migration.checksum[:12]}…). Restore the original "
                        "file and put the change in a new migration."
                    )
                continue
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.name} failed and was rolled back: {exc}") from None
            done.append(migration.name)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", LOCK_ID)


async def migrate(url: str) -> list[str]:
    """Create the database if needed, then apply pending migrations; return what was applied."""
    migrations = discover()
    await db.ensure_database(url)
    connection = await db.connect(url)
    try:
        return await apply(connection, migrations)
    finally:
        await connection.close()
