"""What one worker process holds for its lifetime, and its background work.

`Worker.open` builds the pools and clients and starts the background tasks (invalidation
listener, ledger and audit writers, lease renewal, backend health checks, the .env watcher,
metrics publishing); `close` stops them and writes what is still queued. The request
pipeline itself lives in app.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import hiredis
import httpx
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from neuronetz import config, db, envfile, limits, metrics, proxy, tasks, tenants
from neuronetz.audit import AuditWriter, Record
from neuronetz.auth import Authenticator
from neuronetz.backends import BackendPool, failure_reason
from neuronetz.budgets import PERIODS, Ledger
from neuronetz.journal import Journal
from neuronetz.limits import BUDGET_NAMES, Limiter
from neuronetz.slots import Scheduler
from neuronetz.transport import Transport

log = logging.getLogger("neuronetz.worker")
ENV_POLL_INTERVAL = 2.0
METRICS_INTERVAL = 1.0
BUDGET_GAUGES_TIMEOUT = 1.0  # a scrape waits this long at most for Postgres and Redis
STOP_PATIENCE = 15.0  # per part of a stopping worker (see `Worker.close`)


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool[Any],
        redis: db.RedisClient,
        transport: Transport,
        http: httpx.AsyncClient,
    ) -> None:
        self.settings = settings
        self.db = pool
        self.redis = redis
        self.transport = transport  # the proxy's path to the backends
        self.http = http  # the same transport behind httpx's client, for health checks and lists
        self.auth = Authenticator(
            pool,
            redis,
            database_url=settings.database_url,
            secret=settings.secret,
            redis_prefix=settings.redis_prefix,
            cache_ttl=settings.key_cache_ttl,
            failures_per_minute=settings.auth_failures_per_minute,
            threads=settings.auth_threads,
        )
        self.backends = BackendPool(
            settings.ollama_backends, http, settings.health_interval, settings.backend_cooldown,
            slots=settings.backend_slots, slots_by_backend=settings.slots_by_backend,
        )  # fmt: skip
        self.journal = Journal(redis, pool, settings.redis_prefix)
        self.ledger = Ledger(pool, journal=self.journal)
        self.limiter = Limiter(
            redis,
            self.ledger,
            prefix=settings.redis_prefix,
            lease_ttl=settings.lease_ttl,
            default_cap=settings.default_max_tokens,
            min_output=settings.min_output_tokens,
        )
        # The journal's appends go on the limiter's wire: written in the turn they are made.
        self.journal.wire = self.limiter.wire
        self.audit = AuditWriter(
            pool,
            capacity=settings.audit_queue,
            prompt_capacity=max(100, settings.audit_queue // 10),
            retention_days=settings.audit_retention_days,
            journal=self.journal,
        )
        self.timeouts = proxy.Timeouts(
            settings.connect_timeout, settings.first_byte_timeout, settings.idle_timeout, settings.total_timeout
        )
        self.metrics = metrics.Registry()
        self.slots = Scheduler(
            redis, self.backends, self.metrics, prefix=settings.redis_prefix, lease_ttl=settings.lease_ttl,
            max_wait=settings.queue_max_wait, max_depth=settings.queue_max_depth,
        )  # fmt: skip
        self.forwarder = proxy.Forwarder(transport, self.backends, self.slots, self.timeouts, settings.max_record_bytes)
        self.shared_metrics = metrics.Shared()
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.tasks = tasks.Supervisor()

    @classmethod
    async def open(cls, settings: config.Settings) -> Worker:
        pool = await db.create_pool(settings.database_url, settings.db_pool_size)
        redis = connect_redis(settings)
        # Our own HTTP/1.1 transport (transport.py): httpx's default one costs several times the
        # CPU per request (`python3 build.py bench transport`). trust_env=False: proxy variables and .netrc must
        # not redirect traffic meant for the internal Ollama network.
        transport = Transport(max_connections=settings.backend_connections, max_keepalive=settings.backend_connections)
        http = httpx.AsyncClient(transport=transport, trust_env=False, timeout=httpx.Timeout(5.0))
        # httpx adds Accept, Accept-Encoding and its User-Agent to every request unless told
        # otherwise. Accept-Encoding must not reach Ollama: whatever the gateway reads from a
        # backend, it must read uncompressed.
        http.headers.clear()
        http.headers["user-agent"] = proxy.USER_AGENT.decode()
        worker = cls(settings, pool, redis, transport, http)
        worker.start()
        return worker

    def start(self) -> None:
        self.auth.start()
        self.ledger.start()
        self.limiter.start()
        self.slots.start()
        self.audit.start()
        # A dead worker's journal is handed to this worker's own writers (and so its journal).
        self.journal.start(
            lambda key, tenant, day, prompt, completion, model: self.ledger.record(
                key, tenant, prompt, completion, day, model=model
            ),
            lambda record: self.audit.submit(Record(*record)),  # an older worker's record lacks the newest fields
        )
        self.tasks.start("backends.health", self.backends.run)
        self.tasks.start("worker.env_file", self._watch_env_file)
        self.tasks.start("worker.metrics", self._publish_metrics)
        self._hook_signals()

    async def close(self, patience: float = STOP_PATIENCE) -> None:
        """Stop every part, writers after what feeds them and connections last. Each part has
        `patience` seconds (the writers retry for less): one that does not stop in time is
        named in an error line and left behind, so a stop never hangs on one part, and the
        database pool, which waits for every connection to come back, is terminated."""
        parts: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            # (the limiter after the journal: it closes the wire the journal writes on)
            ("background tasks", self.tasks.stop), ("fair queue", self.slots.stop), ("ledger", self.ledger.stop),
            ("audit", self.audit.stop), ("journal", self.journal.stop), ("limiter", self.limiter.stop),
            ("authentication", self.auth.stop), ("backend client", self.http.aclose), ("redis", self.redis.aclose),
            ("database pool", self.db.close),
        ]  # fmt: skip
        for name, stop in parts:
            try:
                async with asyncio.timeout(patience):
                    await stop()
            except TimeoutError:
                log.error("a part of the worker did not stop in time", extra={"fields": {"part": name}})
                if stop == self.db.close:
                    self.db.terminate()
        self.shared_metrics.remove()

    # --- shutdown -------------------------------------------------------------------------------

    def _hook_signals(self) -> None:
        """Learn when Granian starts a graceful stop. Granian's own handler (installed before
        the lifespan runs) stops accepting and waits for in-flight requests; ours is chained
        in front of it to cut answers still streaming when the stop deadline nears, so their
        usage is settled and their audit records written before the worker exits."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(number: int, frame: Any, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin_shutdown)
                if callable(previous):
                    previous(number, frame)

            signal.signal(signum, handler)

    def begin_shutdown(self) -> None:
        if self.draining:
            return
        timeout = self.settings.shutdown_timeout
        grace = max(0.0, timeout - min(5.0, timeout / 4))
        log.info("draining", extra={"fields": {"in_flight": len(self.in_flight), "cut_after_s": grace}})
        asyncio.get_running_loop().call_later(grace, self._cut_in_flight)

    def _cut_in_flight(self) -> None:
        self.draining = True
        for task in list(self.in_flight):
            task.cancel()

    # --- readiness ------------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Postgres, Redis and the backends, checked concurrently, each within ready_timeout."""
        timeout = self.settings.ready_timeout

        async def check(probe: Awaitable[Any]) -> dict[str, Any]:
            try:
                async with asyncio.timeout(timeout):
                    await probe
            except TimeoutError:
                return {"ok": False, "error": f"no answer within {timeout:g} s"}
            except Exception as exc:  # any failure of a dependency is a failed check, not a crash
                return {"ok": False, "error": failure_reason(exc)}
            return {"ok": True}

        checks = await asyncio.gather(check(db.ping(self.db)), check(self.redis.ping()), check(self.backends.refresh()))
        return {"postgres": checks[0], "redis": checks[1], "backends": self.backends.readiness()}

    # --- live configuration ---------------------------------------------------------------------

    async def _watch_env_file(self) -> None:
        """Apply a changed OLLAMA_BACKENDS from the .env file within a few seconds, without a
        restart (add-backend / remove-backend edit it). A value in the process environment
        wins over the file, as everywhere, so then file edits are ignored."""
        path = self.settings.env_file
        if path is None:
            return
        if "OLLAMA_BACKENDS" in os.environ:
            log.info("OLLAMA_BACKENDS is set in the environment; edits of the .env file are not applied live")
            return
        seen = _stamp(path)
        known = dict(self.settings.slots_by_backend)
        while True:
            await asyncio.sleep(ENV_POLL_INTERVAL)
            stamp = _stamp(path)
            if stamp == seen:
                continue
            seen = stamp
            try:
                raw = envfile.read(path).get("OLLAMA_BACKENDS", "")
                specs = config.backend_specs(raw)
            except (envfile.EnvFileError, config.ConfigError) as exc:
                log.error("ignoring the changed env file", extra={"fields": {"error": str(exc)}})
                continue
            if tuple(specs) != self.backends.urls or specs != known:
                known = specs
                self.backends.reconfigure(tuple(specs), specs)
                await self.backends.refresh()

    # --- metrics --------------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        registry = self.metrics
        registry.set("neuronetz_in_flight_requests", float(len(self.in_flight)))
        registry.set("neuronetz_audit_queue_depth", float(len(self.audit.records)))
        registry.set("neuronetz_ledger_pending", float(len(self.ledger.pending)))
        registry.counters["neuronetz_audit_records_written_total"][()] = float(self.audit.written)
        for kind, count in self.audit.dropped.items():
            registry.counters["neuronetz_audit_records_dropped_total"][metrics.labels(kind=kind)] = float(count)
        for kind, count in self.audit.invalid.items():
            registry.counters["neuronetz_audit_records_invalid_total"][metrics.labels(kind=kind)] = float(count)
        registry.counters["neuronetz_audit_records_repaired_total"][()] = float(self.audit.repaired)
        registry.counters["neuronetz_ledger_rows_dropped_total"][()] = float(self.ledger.dropped)
        for task, count in tasks.RESTARTS.items():
            registry.counters["neuronetz_background_task_restarts_total"][metrics.labels(task=task)] = float(count)
        registry.counters["neuronetz_argon2_verifications_total"][()] = float(self.auth.argon2_calls)
        registry.counters["neuronetz_auth_failures_total"][()] = float(self.auth.refusals)
        for backend in self.backends.backends:
            key = metrics.labels(backend=backend.url)
            registry.set("neuronetz_backend_up", 1.0 if backend.state()["ok"] else 0.0, key)
            registry.set("neuronetz_backend_in_flight", float(backend.in_flight), key)
        self.slots.refresh_gauges()

    async def _publish_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            self.refresh_gauges()
            try:
                self.shared_metrics.publish(self.metrics)
            except OSError as exc:
                log.debug("metrics snapshot not written", extra={"fields": {"error": str(exc)}})

    async def metrics_text(self) -> bytes:
        self.refresh_gauges()
        merged = self.shared_metrics.collect(self.metrics)
        try:
            await asyncio.wait_for(self._budget_gauges(merged), BUDGET_GAUGES_TIMEOUT)
        except (TimeoutError, *db.ERRORS, *db.REDIS_ERRORS) as exc:  # the rest of the scrape still counts
            log.debug("tenant budget gauges left out", extra={"fields": {"error": type(exc).__name__}})
        return metrics.render(merged)

    async def _budget_gauges(self, registry: metrics.Registry) -> None:
        """Every tenant budget and what Redis counts against it now, set on the scrape's sum:
        one value per instance, not per worker. Tenants are few; one MGET each."""
        now = time.time()
        for tenant in await tenants.list_tenants(self.db):
            budgets = {name: getattr(tenant.limits, name) for name in BUDGET_NAMES}
            if all(limit is None for limit in budgets.values()):
                continue
            used = await limits.spent(self.redis, self.settings.redis_prefix, tenant.id, now)
            for name, limit in budgets.items():
                if limit is None:
                    continue
                key = metrics.labels(tenant=tenant.name, period=PERIODS[name])
                registry.set("neuronetz_tenant_budget_tokens", float(limit), key)
                if name in used:
                    registry.set("neuronetz_tenant_budget_used_tokens", float(used[name]), key)


class _PackedInC:
    """redis-py's asyncio connections pack commands in Python, a large share of the CPU of one
    admission (an EVALSHA with some 70 arguments; `python3 build.py bench limits`); hiredis,
    already installed for parsing, packs in C for a fraction of that. (redis-py's own
    HiredisRespSerializer would first walk every argument in Python, which is most of the cost again.)"""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD" is two words on the wire
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise redis.exceptions.DataError(str(exc)) from None


_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": 5, "health_check_interval": 10}


def connect_redis(settings: config.Settings) -> db.RedisClient:
    """The client REDIS_MODE asks for (see `redis_client` for what they share)."""
    urls = settings.redis_url.split(",")
    if settings.redis_mode == "cluster":
        return cluster_client(urls)
    if settings.redis_mode == "sentinel":
        return sentinel_client(urls, settings.redis_sentinel_master)
    return redis_client(settings.redis_url)


def redis_client(url: str) -> aioredis.Redis:
    """The worker's Redis pool. A pooled connection that the server closed while it sat idle
    (Redis restarted) must be replaced before a command is sent on it, or the first request
    on each such connection fails long after Redis is back. redis-py checks for that on
    checkout, but skips the check while "maintenance notifications" (a Redis Enterprise
    feature) may be on, which its default "auto" means; we turn them off."""
    pool = aioredis.ConnectionPool.from_url(
        url, **_OPTIONS, maint_notifications_config=MaintNotificationsConfig(enabled=False)
    )
    base = pool.connection_class
    pool.connection_class = type(f"Packed{base.__name__}", (_PackedInC, base), {})
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def sentinel_client(urls: list[str], master: str) -> aioredis.Redis:
    """The primary the Sentinels at `urls` name `master`, followed through failovers. The
    first URL's credentials, database and TLS are the primary's; the Sentinels are asked
    without credentials (over TLS when the primary uses it). Commands are packed in C here
    too: redis-py takes the Sentinel-managed connection class as a parameter."""
    parsed = [parse_url(url) for url in urls]
    tls = parsed[0].get("connection_class") is SSLConnection
    base = SentinelManagedSSLConnection if tls else SentinelManagedConnection
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [(item["host"], item.get("port", 26379)) for item in parsed],
        sentinel_kwargs={"socket_connect_timeout": 2, "socket_timeout": 5, "ssl": tls},
    )
    client: aioredis.Redis = sentinel.master_for(
        master, connection_class=type(f"Packed{base.__name__}", (_PackedInC, base), {}),
        username=parsed[0].get("username"), password=parsed[0].get("password"), db=parsed[0].get("db", 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False), **_OPTIONS,
    )  # fmt: skip
    return client


def cluster_client(urls: list[str]) -> RedisCluster:
    """A Redis Cluster, discovered from the seed nodes at `urls` (the first one's credentials
    and TLS apply to all). Slots whose primary is down fail alone, so the other tenants stay
    served (the servers need `cluster-require-full-coverage no` for the same reason); and
    redis-py does not retry a failed node itself, since the limiter's callers already know
    what to do (fail closed or open, keep settlements): its retries close and reopen every
    node's connections, which would stall the healthy primaries too. Commands are packed in
    Python here: RedisCluster builds its node connections from a class it takes no parameter
    for."""
    parsed = [parse_url(url) for url in urls]
    return RedisCluster(
        startup_nodes=[ClusterNode(item["host"], item.get("port", 6379)) for item in parsed],
        require_full_coverage=False, retry=Retry(NoBackoff(), 0),
        username=parsed[0].get("username"), password=parsed[0].get("password"),
        ssl=parsed[0].get("connection_class") is SSLConnection,
        maint_notifications_config=MaintNotificationsConfig(enabled=False), **_OPTIONS,
    )  # fmt: skip


def _stamp(path: Any) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
