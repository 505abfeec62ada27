"""Authentication: from `Authorization: Bearer <key>` to the key's record, fast and revocable.

The hot path does no Argon2 and no I/O: a verified key is cached in the worker's memory
under a keyed hash of the presented key (HMAC-SHA256 with GATEWAY_SECRET), so a cache hit
costs one HMAC and a dict lookup. On a miss the worker reads the key's row from Postgres and
needs proof that the presented key matches its Argon2id hash: either a record in Redis that
this exact key (by its HMAC) was verified against this exact hash, or a fresh Argon2id
verification in a small thread pool. Concurrent misses for one key share one verification.

Revocation, expiry and limit changes reach every replica within a second: a Postgres
trigger NOTIFYs every change to a key or tenant row (whoever made it), each worker LISTENs
and drops what it cached. While that listener is down, the worker caches for one second
only, and it empties its cache whenever the listener (re)connects, so a lost notification
can never keep a revoked key alive for longer than that. A lookup that started before an
invalidation never caches what it read (generation counters). One exception, on purpose:
while Postgres itself cannot be reached, keys verified in the last five minutes keep
working (stale-if-error), because nobody can revoke a key without that database either;
only a replica cut off from a Postgres that others still reach could serve a revoked key,
for as long as that lasts.

Nothing here lets anyone test a guessed key more cheaply than Argon2: Redis and the
process only ever hold HMACs under a secret that lives in neither Redis nor Postgres.

Refusals cost O(1) and memory stays bounded whatever a flood does: failures are counted per
client address (IPv6 per /64) and per key prefix in LRU tables of fixed size, refused keys
are remembered in a table of their own that cannot push verified keys out, and while
Postgres is unreachable lookups back off instead of each request trying it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any, NoReturn

import asyncpg

from neuronetz import db, keys, models, tenants
from neuronetz.errors import Forbidden, RateLimited, ServiceUnavailable, Unauthorized
from neuronetz.limits import Limits, Subject
from neuronetz.logs import Throttled
from neuronetz.tasks import Supervisor

log = logging.getLogger("neuronetz.auth")

CHANNEL = "neuronetz_invalidate"
UNAUTHORIZED = "Invalid or missing API key: send `Authorization: Bearer <key>` with an active key."
FAILURE_TTL = 10.0  # seconds a refused key is remembered, so repeating it costs nothing
DEGRADED_TTL = 1.0  # cache lifetime while invalidations cannot be received
# While Postgres cannot be reached, a key verified in the last few minutes keeps working
# (stale-if-error): an outage of the database should not become an outage of every model,
# and revoking a key needs that very database.
STALE_IF_ERROR = 300.0
VERIFIED_TTL = 86400  # seconds Redis remembers that a key matched a hash
MAX_PENDING_VERIFICATIONS = 32
LAST_USED_INTERVAL = 60.0
# Table sizes: enough for every key and every client a worker plausibly sees, small enough
# that a flood of made-up keys or addresses cannot grow a worker past a few tens of MB.
MAX_CACHED_KEYS = 100_000
MAX_REFUSED_KEYS = 20_000
MAX_TRACKED_CLIENTS = 65_536
# While Postgres cannot be reached, key lookups wait this long between attempts (doubling
# from the first to the last): every other request fails fast or is served stale-if-error.
DB_BACKOFF = (0.25, 5.0)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the request pipeline knows about an authenticated key."""

    key_id: int
    prefix: str
    name: str
    tenant_id: int
    tenant: str
    expires_at: float | None  # epoch seconds
    revoked: bool
    allowed_models: frozenset[str] | None  # normalised names; None: every model
    log_prompts: bool
    prompt_ttl_days: int | None
    subject: Subject  # the key's and the tenant's own limits, for the limiter
    allow_cloud: bool = False  # cloud models and server-side tools (the key's setting, else the tenant's)
    weight: int = 1  # the tenant's share in the queue for backend slots (slots.py)

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def allows(self, model: str) -> bool:
        if not self.allow_cloud and models.is_cloud(model):
            return False
        return self.allowed_models is None or models.normalize(model) in self.allowed_models

    def check_model(self, model: str) -> None:
        if not self.allow_cloud and models.is_cloud(model):
            raise Forbidden(
                f"{model!r} is a cloud model, which runs on the server owner's ollama.com account; this API key "
                "may not use cloud models (ask the operator for --allow-cloud).",
                code="cloud_not_allowed",
            )
        if not self.allows(model):
            raise Forbidden(f"This API key may not use the model {model!r}.", code="model_not_allowed")


def record_from_row(row: Any) -> KeyRecord:
    expires: dt.datetime | None = row["expires_at"]
    allowed = row["allowed_models"]
    return KeyRecord(
        key_id=row["id"],
        prefix=row["prefix"],
        name=row["name"],
        tenant_id=row["tenant_id"],
        tenant=row["tenant_name"],
        expires_at=expires.timestamp() if expires is not None else None,
        revoked=row["revoked_at"] is not None,
        allowed_models=frozenset(models.normalize(m) for m in allowed) if allowed is not None else None,
        log_prompts=row["log_prompts"],
        prompt_ttl_days=row["prompt_ttl_days"],
        subject=Subject(row["id"], row["tenant_id"], Limits.from_row(row), Limits.from_row(row, prefix="t_")),
        allow_cloud=row["allow_cloud"],
        weight=row.get("t_weight", 1),
    )


def bearer_token(header: bytes | None) -> str | None:
    """The key from `Authorization: Bearer <key>` (scheme case-insensitive, surrounding
    whitespace tolerated); None for any other shape."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    try:
        return token.decode("ascii") if token else None
    except UnicodeDecodeError:
        return None


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None  # None: the presented key was refused
    prefix: str
    fresh_until: float
    stale_until: float  # usable past freshness only while Postgres is unreachable


def client_group(address: str) -> str:
    """The unit failures are counted in: an IPv4 address, or an IPv6 /64 — one subscriber
    usually holds a whole /64 (RFC 6177), so counting single IPv6 addresses would give one
    client 2^64 fresh allowances. IPv4-mapped IPv6 addresses count as their IPv4 address.

    >>> client_group("2001:db8:1:2:aaaa::1")
    '2001:db8:1:2::/64'
    """
    if ":" not in address:
        return address
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{IPv6Address(int(ip) >> 64 << 64)}/64"
    return address


class FailureLimiter:
    """Counts refused authentications per name (a client group, a key prefix) in a fixed
    one-minute window; past the limit, that name's cache misses are refused before any work.
    Per worker process on purpose: it protects this process's CPU from floods of keys.

    O(1) per call and bounded: the table is an LRU of `max_names` entries ordered by last
    failure, so a flood of new names evicts the names that failed longest ago."""

    def __init__(self, per_minute: int, what: str, max_names: int = MAX_TRACKED_CLIENTS) -> None:
        self.per_minute = per_minute
        self.what = what
        self.max_names = max_names
        self.windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def check(self, name: str, now: float) -> None:
        window = self.windows.get(name)
        if window is not None and now - window[0] < 60.0 and window[1] >= self.per_minute:
            # Waiting does not mend a wrong key, and openai-node sleeps any Retry-After: let
            # SDKs raise at once instead of retrying.
            raise RateLimited(
                f"Too many failed authentications {self.what}; retry later.",
                retry_after=60.0 - (now - window[0]),
                should_retry=False,
            )

    def failed(self, name: str, now: float) -> None:
        start, count = self.windows.pop(name, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        self.windows[name] = (start, count + 1)  # (re)inserted last: the most recent failure
        if len(self.windows) > self.max_names:
            self.windows.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis_client: db.RedisClient,
        *,
        database_url: str,
        secret: str,
        redis_prefix: str,
        cache_ttl: float,
        failures_per_minute: int,
        threads: int,
    ) -> None:
        self.pool = pool
        self.redis = redis_client
        self.database_url = database_url
        # Without a configured secret each process draws its own: correct, but then workers
        # cannot share the Redis record of verified keys (each verifies once on its own).
        self.secret = secret.encode() if secret else os.urandom(32)
        self.redis_prefix = redis_prefix
        self.cache_ttl = cache_ttl
        self.failures = FailureLimiter(failures_per_minute, "from this address")
        # Wrong secrets for one existing prefix each cost an Argon2 run, whichever address
        # sends them: counted per prefix too, so rotating addresses cannot fill the pool.
        self.prefix_failures = FailureLimiter(failures_per_minute, "for this key")
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self.cache: dict[bytes, _Entry] = {}  # verified keys, oldest first
        self.refused: dict[bytes, _Entry] = {}  # refused keys, apart: they cannot evict the verified
        self.db_backoff = 0.0
        self.db_retry_at = 0.0
        self.db_unreachable = Throttled(log, "key lookup failed: Postgres unreachable")
        self.inflight: dict[bytes, asyncio.Future[KeyRecord | None]] = {}
        self.generation = 0  # bumped by tenant changes and listener (re)connects
        self.key_generations: dict[str, int] = {}
        self.listening = False
        self.pending_verifications = 0
        self.argon2_calls = 0
        self.refusals = 0
        self.last_used: dict[str, float] = {}
        self.tasks = Supervisor()

    # --- the request path ---------------------------------------------------------------

    async def authenticate(self, authorization: bytes | None, client: str) -> KeyRecord:
        """The record of the key in `authorization`; Unauthorized (401) otherwise."""
        key = bearer_token(authorization)
        if key is None:
            self._refuse(client_group(client), time.monotonic())
        digest = hmac.digest(self.secret, key.encode(), "sha256")
        now = time.monotonic()
        wall = time.time()
        entry = self.cache.get(digest)
        if entry is not None and entry.fresh_until > now and entry.record is not None and entry.record.usable(wall):
            self.last_used[entry.record.prefix] = wall
            return entry.record  # the hot path: one HMAC, one dict lookup, no I/O
        # Anything else is work or a refusal: an address past its failure limit gets 429 first.
        group = client_group(client)
        self.failures.check(group, now)
        if entry is None:
            entry = self.refused.get(digest)
        if entry is not None and entry.fresh_until > now:
            record = entry.record
        else:
            try:
                record = await self._resolve(key, digest)
            except ServiceUnavailable:
                if entry is None or entry.record is None or entry.stale_until <= now:
                    raise
                record = entry.record
        if record is None or not record.usable(wall):
            self._refuse(group, time.monotonic())
        self.last_used[record.prefix] = wall
        return record

    def _refuse(self, group: str, now: float) -> NoReturn:
        self.failures.check(group, now)
        self.refusals += 1
        self.failures.failed(group, now)
        raise Unauthorized(UNAUTHORIZED)

    async def _resolve(self, key: str, digest: bytes) -> KeyRecord | None:
        pending = self.inflight.get(digest)
        if pending is not None:  # another request is already verifying this very key
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self.inflight[digest] = future
        try:
            record = await self._lookup(key, digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # the waiters re-raise it; mark it retrieved
            raise
        else:
            future.set_result(record)
            return record
        finally:
            del self.inflight[digest]

    async def _lookup(self, key: str, digest: bytes) -> KeyRecord | None:
        prefix = keys.prefix_of(key)
        if prefix is None:
            self._remember(digest, None, "", self.generation, 0)
            return None
        generation, key_generation = self.generation, self.key_generations.get(prefix, 0)
        row = await self._fetch(prefix)
        # An unknown prefix is refused without Argon2: prefixes are public, and hashing a
        # dummy would let anyone burn this CPU with random keys.
        record = None
        if row is not None and await self._verified(key, digest, prefix, row["secret_hash"]):
            record = record_from_row(row)
        self._remember(digest, record, prefix, generation, key_generation)
        return record

    async def _fetch(self, prefix: str) -> Any:
        """The key's row. While Postgres is unreachable, one lookup tries it after each backoff
        interval and the others fail at once (the caller serves cached keys stale-if-error),
        instead of every request paying a failed connection and a log line."""
        now = time.monotonic()
        unavailable = ServiceUnavailable("The key store is unavailable; retry shortly.", retry_after=1)
        if now < self.db_retry_at:
            raise unavailable
        if self.db_backoff:
            self.db_retry_at = now + self.db_backoff  # this lookup probes; the others wait for it
        try:
            row = await tenants.fetch_key(self.pool, prefix)
        except db.ERRORS as exc:
            low, high = DB_BACKOFF
            self.db_backoff = min(high, max(low, self.db_backoff * 2))
            self.db_retry_at = time.monotonic() + self.db_backoff
            self.db_unreachable(error=type(exc).__name__, retry_in=self.db_backoff)
            raise unavailable from None
        if self.db_backoff:
            log.info("key lookups reach Postgres again")
            self.db_backoff = self.db_retry_at = 0.0
        return row

    async def _verified(self, key: str, digest: bytes, prefix: str, key_hash: str) -> bool:
        fingerprint = hashlib.sha256(key_hash.encode()).hexdigest()[:32]
        redis_key = f"{self.redis_prefix}auth:{prefix}"
        field = digest.hex()
        try:
            known = await self.redis.hget(redis_key, field)
            if isinstance(known, bytes) and hmac.compare_digest(known, fingerprint.encode()):
                return True
        except db.REDIS_ERRORS:
            pass  # Redis is an optimisation here; Argon2 still decides
        self.prefix_failures.check(prefix, time.monotonic())
        if self.pending_verifications >= MAX_PENDING_VERIFICATIONS:
            raise ServiceUnavailable("Too many keys are being verified right now; retry shortly.", retry_after=1)
        self.pending_verifications += 1
        self.argon2_calls += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self.executor, keys.verify, key_hash, key)
        finally:
            self.pending_verifications -= 1
        if not ok:
            self.prefix_failures.failed(prefix, time.monotonic())
        else:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(redis_key, field, fingerprint)
                    pipe.expire(redis_key, VERIFIED_TTL)
                    await pipe.execute()
            except db.REDIS_ERRORS:
                pass
        return ok

    def _remember(
        self, digest: bytes, record: KeyRecord | None, prefix: str, generation: int, key_generation: int
    ) -> None:
        if generation != self.generation or key_generation != self.key_generations.get(prefix, 0):
            return  # invalidated while we looked: what we read may already be stale
        ttl = self.cache_ttl if self.listening else DEGRADED_TTL
        if record is None:
            ttl = min(ttl, FAILURE_TTL)
        elif record.expires_at is not None:  # never serve a key past its expiry from cache
            ttl = min(ttl, max(0.0, record.expires_at - time.time()))
        now = time.monotonic()
        table, bound = (self.cache, MAX_CACHED_KEYS) if record is not None else (self.refused, MAX_REFUSED_KEYS)
        if digest not in table and len(table) >= bound:
            del table[next(iter(table))]  # the oldest entry: O(1), dicts keep insertion order
        table[digest] = _Entry(record, prefix, now + ttl, now + STALE_IF_ERROR)

    # --- invalidation ---------------------------------------------------------------------

    def invalidate(self, subject: str) -> None:
        """Drop what a NOTIFY payload (`key:<prefix>` or `tenant:<id>`) names."""
        kind, _, value = subject.partition(":")
        if kind == "key":
            self.key_generations[value] = self.key_generations.get(value, 0) + 1
            self.cache = {d: e for d, e in self.cache.items() if e.prefix != value}
            self.refused = {d: e for d, e in self.refused.items() if e.prefix != value}
        elif kind == "tenant":
            tenant_id = int(value)
            self.generation += 1
            self.cache = {d: e for d, e in self.cache.items() if e.record is None or e.record.tenant_id != tenant_id}
        else:
            self.clear()

    def clear(self) -> None:
        self.generation += 1
        self.cache = {}
        self.refused = {}

    def _expire_soon(self) -> None:
        """Invalidations can no longer arrive: nothing cached stays fresh past DEGRADED_TTL
        (entries are kept as stale-if-error fallbacks)."""
        limit = time.monotonic() + DEGRADED_TTL
        self.generation += 1
        for entry in self.cache.values():
            entry.fresh_until = min(entry.fresh_until, limit)

    async def listen(self) -> None:
        """Hold a LISTEN connection, forever: reconnect after any failure. When it drops,
        cached keys stay fresh for one more second at most; when it is (re)established, the
        cache is emptied (notifications may have been missed in between)."""
        while True:
            connection: asyncpg.Connection[Any] | None = None
            lost = asyncio.Event()
            try:
                connection = await asyncpg.connect(self.database_url, timeout=5)
                connection.add_termination_listener(lambda _, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, lambda _c, _p, _ch, payload: self.invalidate(payload))
                self.clear()
                # Postgres answers again: lookups must not wait out a backoff with the cache empty.
                self.db_backoff = self.db_retry_at = 0.0
                self.listening = True
                # A silently dead network path delivers no termination event: probe it.
                while not lost.is_set():
                    await connection.execute("SELECT 1", timeout=2)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: degrade, then reconnect
                log.debug("invalidation listener down", extra={"fields": {"error": type(exc).__name__}})
            finally:
                if self.listening:
                    self.listening = False
                    self._expire_soon()
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(1.0)

    # --- last_used_at, coalesced --------------------------------------------------------------

    async def flush_last_used(self) -> None:
        """Write last_used_at for keys used since the last flush: one UPDATE per flush, so a
        busy key costs one write a minute, not one per request."""
        if not self.last_used:
            return
        used, self.last_used = self.last_used, {}
        prefixes = list(used)
        stamps = [dt.datetime.fromtimestamp(used[p], dt.UTC) for p in prefixes]
        try:
            await self.pool.execute(
                "UPDATE api_keys SET last_used_at = v.at FROM unnest($1::text[], $2::timestamptz[]) AS v(prefix, at) "
                "WHERE api_keys.prefix = v.prefix AND (last_used_at IS NULL OR last_used_at < v.at)",
                prefixes,
                stamps,
            )
        except db.ERRORS:
            for prefix, stamp in used.items():  # keep them for the next attempt
                self.last_used[prefix] = max(stamp, self.last_used.get(prefix, 0.0))

    def start(self) -> None:
        self.tasks.start("auth.listener", self.listen)
        self.tasks.every("auth.last_used", LAST_USED_INTERVAL, self.flush_last_used)

    async def stop(self) -> None:
        await self.tasks.stop()
        await self.flush_last_used()
        self.executor.shutdown(wait=False, cancel_futures=True)
