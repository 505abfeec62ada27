"""Backend slots and the fair queue in front of them (README "Fair sharing").

A backend runs `slots` requests per model at once (Ollama's OLLAMA_NUM_PARALLEL: each loaded
model's runner takes that many; an embedding takes one like a generation, and a request that
makes Ollama load the model holds its slot through the load). The gateway never sends more:
a request that finds every slot of its model taken waits here, after authentication and
admission and before a backend is chosen, so whichever backend frees a slot first serves it.

The slots and the queue live in Redis (slots.lua), shared by every replica: acquiring is one
round trip that joins the queue and, when the fair order allows, takes a slot at once;
releasing is one round trip that hands the slot to the next waiter. A waiter learns of a
grant by pub/sub, and polls every POLL_INTERVAL as a fallback (which also keeps it alive in
the queue: a waiter not heard of for WAITER_TTL is skipped, so a crashed replica's waiters
block nobody). Slots are leases that expire after GATEWAY_LEASE_TTL unless renewed.

Without Redis a replica falls back to slots of its own (`LocalSlots`): each backend's full
slot count, first come first served, so the load stays bounded (by replicas times slots), never
unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from neuronetz import db, metrics, models
from neuronetz.auth import KeyRecord
from neuronetz.backends import Backend, BackendPool
from neuronetz.errors import RateLimited, ServiceUnavailable
from neuronetz.tasks import Supervisor

log = logging.getLogger("neuronetz.slots")
POLL_INTERVAL = 1.0  # seconds between a waiter's checks when no grant arrives by pub/sub
WAITER_TTL_MS = 5000  # a waiter unheard of for this long is skipped by the queue
WARM, COLD = 0, 1


@dataclass(eq=False)
class Slot:
    """One request's claim on a backend slot; release it exactly once."""

    backend: Backend
    lease: str
    base: str  # the model's Redis key, or "" for a slot of LocalSlots
    tenant: str
    key: str
    model: str
    waited: float  # seconds spent in the queue
    released: bool = field(default=False)


class LocalSlots:
    """Per-replica slots for when Redis is unreachable: FIFO per model, same limits."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, str], int] = {}
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def free(self, backend: Backend, model: str) -> bool:
        return backend.slots == 0 or self.used.get((backend.url, model), 0) < backend.slots

    def take(self, backend: Backend, model: str) -> None:
        self.used[(backend.url, model)] = self.used.get((backend.url, model), 0) + 1

    def give_back(self, backend: Backend, model: str) -> None:
        self.used[(backend.url, model)] -= 1
        line = self.waiting.get(model)
        while line:
            waiter = line.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait(self, model: str, deadline: float) -> None:
        """Until a slot of `model` is given back (TimeoutError at `deadline`, loop time)."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(model, deque()).append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # woken and gone: pass the wake-up on
                line = self.waiting.get(model)
                if line:
                    nxt = line.popleft()
                    if not nxt.done():
                        nxt.set_result(None)
            waiter.cancel()
            raise


class Scheduler:
    def __init__(
        self,
        client: db.RedisClient,
        pool: BackendPool,
        registry: metrics.Registry,
        *,
        prefix: str,
        lease_ttl: float,
        max_wait: float,
        max_depth: int,
    ) -> None:
        self.redis = client
        self.pool = pool
        self.registry = registry
        self.prefix = prefix
        self.channel = f"{prefix}slots:grants"
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.max_wait = max_wait
        self.max_depth = max_depth
        source = resources.files("neuronetz").joinpath("slots.lua").read_text(encoding="utf-8")
        self.script = client.register_script(source)
        self.local = LocalSlots()
        self.grants: dict[str, asyncio.Future[str]] = {}  # waiter id -> the backend granted to it
        self.held: dict[str, Slot] = {}
        self.waiting: dict[str, int] = {}  # tenant -> this worker's waiting requests
        self.tasks = Supervisor()
        self._releasing: set[asyncio.Task[None]] = set()

    def base(self, model: str) -> str:
        # One hash tag per model: its queue and slots live in one Redis Cluster slot.
        return f"{self.prefix}{{slots:{model}}}:"

    # --- acquiring ----------------------------------------------------------------------------

    async def acquire(self, key: KeyRecord, model: str | None, exclude: frozenset[Backend]) -> Slot | None:
        """Wait for a slot for `model` and return it, with its backend; None when no candidate
        backend has slots (queueing off: the pool chooses as before, no round trip)."""
        if not model:
            return None
        name = models.normalize(model)
        now = time.monotonic()
        candidates = [b for b in self.pool.backends if b not in exclude and b.available(now) and b.may_have(name)]
        if not candidates or all(b.slots == 0 for b in candidates):
            return None
        lease = os.urandom(9).hex()
        started = time.monotonic()
        self.waiting[key.tenant] = self.waiting.get(key.tenant, 0) + 1
        try:
            slot = await self._acquire(key, name, exclude, lease, started)
        finally:
            self.waiting[key.tenant] -= 1
        slot.backend.loaded |= {name}  # the model is in memory there now (or will be shortly)
        self.registry.observe("neuronetz_queue_wait_seconds", slot.waited, metrics.labels(tenant=key.tenant))
        return slot

    async def _acquire(
        self, key: KeyRecord, name: str, exclude: frozenset[Backend], lease: str, started: float
    ) -> Slot:
        base, tenant, key_id = self.base(name), str(key.tenant_id), str(key.key_id)
        deadline = started + self.max_wait
        grant: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.grants[lease] = grant
        joined = True  # from the first call on: a cancelled call may have joined (or got a slot) in Redis
        try:
            while True:
                try:
                    reply = await self.script(
                        keys=[base],
                        args=["acquire", self.channel, lease, tenant, key_id, key.weight, WAITER_TTL_MS,
                              self.lease_ttl_ms, self.max_depth, *self._candidates(name, exclude)],
                    )  # fmt: skip
                except db.REDIS_ERRORS as exc:
                    self._release_later(base, lease, tenant, key_id, "", name)
                    joined = False
                    log.warning("slots kept per replica: Redis unreachable", extra={"fields": {"error": repr(exc)}})
                    return await self._acquire_locally(key, name, exclude, lease, started, deadline)
                status = int(reply[0])
                if status == 0:
                    joined = False
                    raise RateLimited(
                        f"Too many requests of this tenant are waiting for {name} ({self.max_depth}); retry later.",
                        code="queue_full",
                        retry_after=2,
                    )
                url = _text(reply[1]) if status == 1 else None
                if url is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._timeout(name)
                    try:
                        url = await asyncio.wait_for(asyncio.shield(grant), min(POLL_INTERVAL, remaining))
                    except TimeoutError:
                        continue  # poll: refreshes this waiter's place and picks up a grant pub/sub missed
                slot = Slot(self._backend(url), lease, base, tenant, key_id, name, time.monotonic() - started)
                self.held[lease] = slot
                joined = False
                return slot
        finally:
            self.grants.pop(lease, None)
            if joined:  # left the queue: timed out or cancelled (the client went away)
                self._release_later(base, lease, tenant, key_id, "", name)

    def _backend(self, url: str) -> Backend:
        for backend in self.pool.backends:
            if backend.url == url:
                return backend
        return Backend(url)  # removed meanwhile: requests in flight finish where they are

    def _candidates(self, name: str, exclude: frozenset[Backend] = frozenset()) -> list[str | int]:
        """The backends that may serve `name` as the script takes them: url, slots, warm or cold."""
        now = time.monotonic()
        args: list[str | int] = []
        for b in self.pool.backends:
            if b not in exclude and b.available(now) and b.may_have(name):
                args += [b.url, b.slots, WARM if name in b.loaded else COLD]
        return args

    async def _acquire_locally(
        self, key: KeyRecord, name: str, exclude: frozenset[Backend], lease: str, started: float, deadline: float
    ) -> Slot:
        while True:
            now = time.monotonic()
            candidates = [b for b in self.pool.backends if b not in exclude and b.available(now) and b.may_have(name)]
            free = [b for b in candidates if self.local.free(b, name)]
            if free:
                best = min(free, key=lambda b: (WARM if name in b.loaded else COLD, -self._room(b, name)))
                self.local.take(best, name)
                slot = Slot(best, lease, "", str(key.tenant_id), str(key.key_id), name, now - started)
                self.held[lease] = slot
                return slot
            if deadline <= now:
                raise self._timeout(name)
            try:
                await self.local.wait(name, asyncio.get_running_loop().time() + deadline - now)
            except TimeoutError:
                raise self._timeout(name) from None

    def _room(self, backend: Backend, name: str) -> int:
        return backend.slots - self.local.used.get((backend.url, name), 0)

    def _timeout(self, name: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"Every backend slot for {name} stayed busy for {self.max_wait:g} s; retry shortly.",
            code="queue_timeout",
            retry_after=max(1.0, self.max_wait / 4),
        )

    # --- releasing ----------------------------------------------------------------------------

    def release(self, slot: Slot) -> None:
        """Give the slot back (synchronous: a cancelled request releases too); the next waiter
        gets it."""
        if slot.released:
            return
        slot.released = True
        self.held.pop(slot.lease, None)
        if not slot.base:
            self.local.give_back(slot.backend, slot.model)
            return
        self._release_later(slot.base, slot.lease, slot.tenant, slot.key, slot.backend.url, slot.model)

    def _release_later(self, base: str, lease: str, tenant: str, key_id: str, url: str, name: str) -> None:
        task = asyncio.create_task(self._release(base, lease, tenant, key_id, url, name))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, base: str, lease: str, tenant: str, key_id: str, url: str, name: str) -> None:
        try:
            await self.script(
                keys=[base],
                args=["release", self.channel, lease, tenant, key_id, url, self.lease_ttl_ms, *self._candidates(name)],
            )
        except db.REDIS_ERRORS as exc:  # the lease expires by itself
            log.warning("slot release failed", extra={"fields": {"error": repr(exc)}})

    # --- background work ----------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake waiters as grants are published; reconnect after a failure (polls cover the gap)."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        self._granted(message)
            except db.REDIS_ERRORS as exc:
                log.warning("slot grants not received; polling", extra={"fields": {"error": repr(exc)}})
                await asyncio.sleep(POLL_INTERVAL)

    def _granted(self, message: dict[str, Any]) -> None:
        lease, _, url = _text(message.get("data", b"")).partition(" ")
        grant = self.grants.get(lease)
        if grant is not None and not grant.done():
            grant.set_result(url)

    async def _renew_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_ms / 3000)
            by_base: dict[str, list[str]] = {}
            for slot in list(self.held.values()):
                if slot.base:
                    by_base.setdefault(slot.base, []).extend((slot.lease, slot.backend.url))
            for base, pairs in by_base.items():
                try:
                    await self.script(keys=[base], args=["renew", self.channel, self.lease_ttl_ms, *pairs])
                except db.REDIS_ERRORS as exc:
                    log.warning("slot lease renewal failed", extra={"fields": {"error": repr(exc)}})

    def refresh_gauges(self) -> None:
        registry = self.registry
        for tenant, count in self.waiting.items():
            registry.set("neuronetz_queue_waiting", float(count), metrics.labels(tenant=tenant))
        in_use: dict[tuple[str, str], int] = {}
        for slot in self.held.values():
            in_use[(slot.backend.url, slot.model)] = in_use.get((slot.backend.url, slot.model), 0) + 1
        for backend in self.pool.backends:
            for name in backend.loaded:
                in_use.setdefault((backend.url, name), 0)
        for (url, name), count in in_use.items():
            registry.set("neuronetz_backend_slots_in_use", float(count), metrics.labels(backend=url, model=name))

    def start(self) -> None:
        self.tasks.start("slots.grants", self._listen)
        self.tasks.start("slots.renewal", self._renew_periodically)

    async def stop(self) -> None:
        await self.tasks.stop()
        await asyncio.gather(*self._releasing, return_exceptions=True)


async def waiting(client: db.RedisClient, prefix: str) -> dict[int, int]:
    """Requests waiting for slots right now, per tenant id, over every model (for `usage`)."""
    totals: dict[int, int] = {}
    async for name in client.scan_iter(match=f"{prefix}{{slots:*}}:n", count=500):
        for tenant, count in (await client.hgetall(name)).items():
            totals[int(tenant)] = totals.get(int(tenant), 0) + max(int(count), 0)
    return totals


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
