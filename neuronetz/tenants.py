"""Tenants and their API keys as stored in Postgres: the administration queries.

The CLI (and nothing on the request path except `fetch_key`) calls these. Failures a user
can fix — an unknown tenant, a duplicate name, an unknown prefix — raise `AdminError` with
the sentence to show. Secrets never leave `create_key`: the full key is returned once to be
printed, and no function here returns a hash.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from neuronetz import keys
from neuronetz.limits import BUDGET_NAMES, LIMIT_NAMES, Limits

# Runtime asyncpg classes are not generic (only their stubs are), hence the string alias.
Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.Pool[Any]"

# The largest value each limit column holds: rates and concurrency are `integer`, budgets `bigint`.
INTEGER_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
LIMIT_MAX = {name: BIGINT_MAX if name in BUDGET_NAMES else INTEGER_MAX for name in LIMIT_NAMES}
# Day counts (expiries, prompt retention) stop at 100 years: the moments they make must stay
# within what Python's datetime (year 9999) can hold wherever they are added to "now".
MAX_DAYS = 36_500
MAX_KEY_NAME = 128
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdminError(Exception):
    """A user-facing failure of an administration command."""


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    limits: Limits
    created_at: dt.datetime
    keys: int = 0
    allow_cloud: bool = False  # cloud models and server-side tools for the tenant's keys
    weight: int = 1  # share of backend slots while several tenants wait (slots.py)


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never its secret, never its hash."""

    prefix: str
    name: str
    tenant: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    allowed_models: tuple[str, ...] | None
    log_prompts: bool
    prompt_ttl_days: int | None
    limits: Limits
    replaced_by: str | None = None  # the prefix of the key `rotate-key` made to succeed this one
    replaces: str | None = None  # the prefix of the key this one succeeded
    allow_cloud: bool | None = None  # None: the tenant's setting applies

    def status(self, now: dt.datetime | None = None) -> str:
        now = now or dt.datetime.now(dt.UTC)
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _tenant(row: Any) -> Tenant:
    return Tenant(
        row["id"],
        row["name"],
        Limits.from_row(row),
        row["created_at"],
        row.get("keys", 0),
        row["allow_cloud"],
        row.get("weight", 1),
    )


def check_tenant_name(name: str) -> None:
    """The table's CHECK, tested first: a NUL or an unencodable character would otherwise fail in
    the driver rather than as a constraint."""
    if not _TENANT_NAME.fullmatch(name):
        raise AdminError(
            f"{name!r} is not a valid tenant name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit."
        )


def check_key_name(name: str) -> None:
    """Key names are free text, but never control or formatting characters (newlines, ANSI escapes,
    bidirectional overrides, U+0000): a name must not be able to forge lines in a listing."""
    if not 1 <= len(name) <= MAX_KEY_NAME or not name.isprintable():
        raise AdminError(
            f"{name!r} is not a valid key name: use 1-{MAX_KEY_NAME} characters, without control or formatting "
            "characters."
        )


async def create_tenant(
    db: Connection, name: str, limits: Limits, *, allow_cloud: bool = False, weight: int = 1
) -> Tenant:
    check_tenant_name(name)
    try:
        row = await db.fetchrow(
            "INSERT INTO tenants (name, rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens, "
            "allow_cloud, weight) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            name,
            *limits.as_dict().values(),
            allow_cloud,
            weight,
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"A tenant named {name!r} already exists.") from None
    return _tenant(row)


async def list_tenants(db: Connection) -> list[Tenant]:
    rows = await db.fetch(
        "SELECT t.*, (SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id) AS keys FROM tenants t ORDER BY t.name"
    )
    return [_tenant(row) for row in rows]


async def tenant_id(db: Connection, name: str) -> int:
    found: int | None = await db.fetchval("SELECT id FROM tenants WHERE name = $1", name)
    if found is None:
        raise AdminError(f"There is no tenant named {name!r} (list them with `list-tenants`).")
    return found


_KEY_INFO = """
SELECT k.prefix, k.name, t.name AS tenant, k.created_at, k.expires_at, k.revoked_at, k.last_used_at,
       k.allowed_models, k.log_prompts, k.prompt_ttl_days, k.rpm, k.tpm, k.max_concurrent,
       k.daily_tokens, k.monthly_tokens, k.total_tokens, k.replaced_by, k.allow_cloud,
       (SELECT p.prefix FROM api_keys p WHERE p.replaced_by = k.prefix) AS replaces
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
"""


def _key_info(row: Any) -> KeyInfo:
    models = row["allowed_models"]
    return KeyInfo(
        row["prefix"],
        row["name"],
        row["tenant"],
        row["created_at"],
        row["expires_at"],
        row["revoked_at"],
        row["last_used_at"],
        tuple(models) if models is not None else None,
        row["log_prompts"],
        row["prompt_ttl_days"],
        Limits.from_row(row),
        row["replaced_by"],
        row["replaces"],
        row["allow_cloud"],
    )


_INSERT_KEY = """
INSERT INTO api_keys (tenant_id, name, prefix, secret_hash, expires_at, allowed_models, log_prompts, prompt_ttl_days,
                      rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens, allow_cloud)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
"""


async def create_key(
    db: Connection,
    tenant: str,
    name: str,
    *,
    expires_at: dt.datetime | None = None,
    models: tuple[str, ...] | None = None,
    prompt_ttl_days: int | None = None,
    limits: Limits | None = None,
    allow_cloud: bool | None = None,
) -> tuple[KeyInfo, str]:
    """Create a key; returns its info and the full key, which is never available again.
    `prompt_ttl_days` set means the key opted in to prompt logging for that many days;
    `allow_cloud` None means the tenant's setting applies."""
    limits = limits or Limits()
    check_key_name(name)
    owner = await tenant_id(db, tenant)
    new = keys.generate()
    key_hash = await asyncio.to_thread(new.hash)
    try:
        await db.execute(
            _INSERT_KEY,
            owner,
            name,
            new.prefix,
            key_hash,
            expires_at,
            list(models) if models is not None else None,
            prompt_ttl_days is not None,
            prompt_ttl_days,
            *limits.as_dict().values(),
            allow_cloud,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "api_keys_prefix_key":  # 36^8 prefixes: a collision is rare but possible
            return await create_key(
                db, tenant, name, expires_at=expires_at, models=models, prompt_ttl_days=prompt_ttl_days, limits=limits,
                allow_cloud=allow_cloud,
            )  # fmt: skip
        raise AdminError(f"Tenant {tenant!r} already has a key named {name!r}.") from None
    return await get_key(db, new.prefix), new.key


async def get_key(db: Connection, prefix: str) -> KeyInfo:
    row = await db.fetchrow(_KEY_INFO + "WHERE k.prefix = $1", prefix)
    if row is None:
        raise AdminError(f"There is no key with the prefix {prefix!r} (list them with `list-keys`).")
    return _key_info(row)


async def list_keys(db: Connection, tenant: str | None = None) -> list[KeyInfo]:
    if tenant is None:
        rows = await db.fetch(_KEY_INFO + "ORDER BY t.name, k.created_at")
    else:
        await tenant_id(db, tenant)
        rows = await db.fetch(_KEY_INFO + "WHERE t.name = $1 ORDER BY k.created_at", tenant)
    return [_key_info(row) for row in rows]


async def revoke_key(db: Connection, prefix: str) -> tuple[KeyInfo, bool]:
    """Revoke the key; returns its info and whether it was active before (False when it was
    already revoked, which is not an error: revoking twice is harmless)."""
    changed = await db.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL RETURNING prefix", prefix
    )
    return await get_key(db, prefix), changed is not None


_LOCK_KEY = """
SELECT expires_at, revoked_at, replaced_by, expires_at <= now() AS expired FROM api_keys WHERE prefix = $1 FOR UPDATE
"""
# The old key names its successor and stops at the end of the grace period, or earlier if it
# was going to expire earlier anyway. (LEAST ignores a NULL expiry.) Both statements fire the
# invalidation trigger, so every replica re-reads the old key within a second and from then
# on checks the new expiry on every request, cached or not.
_RETIRE_KEY = """
UPDATE api_keys SET replaced_by = $2, expires_at = LEAST(expires_at, now() + $3::interval) WHERE prefix = $1
"""
_INSERT_SUCCESSOR = """
INSERT INTO api_keys (tenant_id, name, prefix, secret_hash, expires_at, allowed_models, log_prompts, prompt_ttl_days,
                      rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens, allow_cloud)
SELECT tenant_id, name, $2, $3, $4, allowed_models, log_prompts, prompt_ttl_days,
       rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens, allow_cloud
FROM api_keys WHERE prefix = $1
"""


@dataclass(frozen=True)
class Rotation:
    old: KeyInfo
    new: KeyInfo
    key: str  # the new key, shown to the user exactly once, never stored


async def rotate_key(
    db: asyncpg.Connection[Any], prefix: str, *, grace: dt.timedelta, expires_at: dt.datetime | None = None
) -> Rotation:
    """A successor for the key `prefix`, with its tenant, name, limits, models and prompt settings,
    and its expiry unless `expires_at` is given; the old key works for `grace` more at most."""
    new = keys.generate()
    key_hash = await asyncio.to_thread(new.hash)
    try:
        async with db.transaction():
            old = await db.fetchrow(_LOCK_KEY, prefix)
            if old is None:
                raise AdminError(f"There is no key with the prefix {prefix!r} (list them with `list-keys`).")
            if old["replaced_by"] is not None:
                raise AdminError(f"Key {prefix} was already rotated to {old['replaced_by']}: rotate that one instead.")
            if old["revoked_at"] is not None or old["expired"]:
                state = "revoked" if old["revoked_at"] is not None else "expired"
                raise AdminError(f"Key {prefix} is {state}, so there is nothing to rotate: create a new key instead.")
            await db.execute(_RETIRE_KEY, prefix, new.prefix, grace)
            successor_expiry = expires_at if expires_at is not None else old["expires_at"]
            await db.execute(_INSERT_SUCCESSOR, prefix, new.prefix, key_hash, successor_expiry)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "api_keys_prefix_key":  # 36^8 prefixes: a collision is rare but possible
            return await rotate_key(db, prefix, grace=grace, expires_at=expires_at)
        raise
    return Rotation(await get_key(db, prefix), await get_key(db, new.prefix), new.key)


async def update_tenant(db: Connection, name: str, changes: dict[str, Any]) -> Tenant:
    """Apply `changes` (limit name → value, None clears the limit back to unlimited)."""
    owner = await tenant_id(db, name)
    changes = dict(changes)
    weight = changes.pop("weight", None)
    if weight is not None:
        await db.execute("UPDATE tenants SET weight = $2 WHERE id = $1", owner, weight)
    if changes:
        await _update(db, "tenants", owner, changes)
    row = await db.fetchrow("SELECT * FROM tenants WHERE id = $1", owner)
    return _tenant(row)


async def update_key(db: Connection, prefix: str, changes: dict[str, Any]) -> KeyInfo:
    """Apply `changes` to a key: limits (None = inherit the tenant's), `allowed_models`
    (None = all), `log_prompts`/`prompt_ttl_days`, `expires_at`."""
    await get_key(db, prefix)
    if changes:
        await _update(db, "api_keys", prefix, changes)
    return await get_key(db, prefix)


# Updates are static statements, built once here from the column lists below: each column
# takes `$n+1` when flag `$n` says so and keeps its value otherwise, so one statement serves
# every combination of flags and nothing a caller gives ever becomes part of the SQL.
_LIMIT_TYPES = (("rpm", "integer"), ("tpm", "integer"), ("max_concurrent", "integer"),
                ("daily_tokens", "bigint"), ("monthly_tokens", "bigint"), ("total_tokens", "bigint"))  # fmt: skip
_UPDATABLE = {
    "tenants": ("id", (*_LIMIT_TYPES, ("allow_cloud", "boolean"))),
    "api_keys": ("prefix", (
        *_LIMIT_TYPES, ("allowed_models", "text[]"), ("log_prompts", "boolean"), ("prompt_ttl_days", "integer"),
        ("expires_at", "timestamptz"), ("allow_cloud", "boolean"),
    )),
}  # fmt: skip


def _static_update(table: str, where: str, columns: tuple[tuple[str, str], ...]) -> str:
    sets = ",\n".join(
        f"    {name} = CASE WHEN ${2 * i + 2} THEN ${2 * i + 3}::{kind} ELSE {name} END"
        for i, (name, kind) in enumerate(columns)
    )
    # Only this module's literals are formatted in (bandit cannot tell).
    return f"UPDATE {table} SET\n{sets}\nWHERE {where} = $1"  # nosec B608


_COLUMNS = {
    table: (_static_update(table, where, columns), tuple(name for name, _ in columns))
    for table, (where, columns) in _UPDATABLE.items()
}


async def _update(db: Connection, table: str, key: object, changes: dict[str, Any]) -> None:
    statement, columns = _COLUMNS[table]
    unknown = set(changes) - set(columns)
    if unknown:
        raise ValueError(f"cannot update {sorted(unknown)} on {table}")
    arguments: list[Any] = []
    for column in columns:
        arguments += [column in changes, changes.get(column)]
    try:
        await db.execute(statement, key, *arguments)
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name == "api_keys_check":  # NOT log_prompts OR prompt_ttl_days IS NOT NULL
            raise AdminError("Prompt logging needs --prompt-ttl-days (how long prompts are kept).") from None
        raise AdminError(f"A value is out of range ({exc.constraint_name}).") from None


# --- the request path -------------------------------------------------------------------

FETCH_KEY = """
SELECT k.id, k.prefix, k.name, k.secret_hash, k.expires_at, k.revoked_at, k.allowed_models, k.log_prompts,
       k.prompt_ttl_days, k.rpm, k.tpm, k.max_concurrent, k.daily_tokens, k.monthly_tokens, k.total_tokens,
       t.id AS tenant_id, t.name AS tenant_name, t.rpm AS t_rpm, t.tpm AS t_tpm, t.max_concurrent AS t_max_concurrent,
       t.daily_tokens AS t_daily_tokens, t.monthly_tokens AS t_monthly_tokens, t.total_tokens AS t_total_tokens,
       COALESCE(k.allow_cloud, t.allow_cloud) AS allow_cloud, t.weight AS t_weight
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
WHERE k.prefix = $1
"""


async def fetch_key(db: Connection, prefix: str) -> Any:
    """The key with its tenant, for authentication on a cache miss; None if unknown."""
    return await db.fetchrow(FETCH_KEY, prefix)
