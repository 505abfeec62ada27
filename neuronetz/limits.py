"""Rate limits, concurrency and token budgets: admission and settlement in one round trip each.

`Limiter.admit` runs limits.lua once to check and charge every limit of a key and its tenant;
`Limiter.settle` runs it once more with the real usage. The wire contract (keys, arguments,
replies) is at the top of limits.lua; why it works this way (reservations, leases, failing
closed for budgets and open for rates when Redis is away, rebuilds from the ledger) is in the
README's "Limits and budgets" (and "Scaling out" for Redis Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, NamedTuple, NoReturn

import hiredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from neuronetz import db
from neuronetz.budgets import PERIODS, REBUILD_WAIT, Ledger, new_epoch, period
from neuronetz.db import REDIS_ERRORS as REDIS_ERRORS  # also what the CLI catches
from neuronetz.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from neuronetz.logs import Throttled
from neuronetz.tasks import Supervisor
from neuronetz.wire import Wire

log = logging.getLogger("neuronetz.limits")

# Admissions queued in one event-loop turn that are written to Redis at once, without waiting
# for the end of the turn (see `_admit_together`; 1, 2, 4 and 8 measured alike, README).
EARLY = 4

# The order is the database's and the CLI's: `--rpm`, `--tpm`, `--max-concurrent`, ...
LIMIT_NAMES = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens", "total_tokens")
BUDGET_NAMES = ("daily_tokens", "monthly_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class Limits:
    """None means: on a tenant, unlimited; on a key, inherit the tenant's value."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    total_tokens: int | None = None

    @classmethod
    def from_row(cls, row: Any, prefix: str = "") -> Limits:
        return cls(*(row[prefix + name] for name in LIMIT_NAMES))

    def as_dict(self) -> dict[str, int | None]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @property
    def has_budget(self) -> bool:
        return any(getattr(self, name) is not None for name in BUDGET_NAMES)

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_NAMES)


@dataclass(frozen=True, slots=True)
class Subject:
    """Whom a request is charged to: the key and its tenant, with their own limits."""

    key_id: int
    tenant_id: int
    key: Limits  # as set on the key; None = inherited (covered by the tenant's check)
    tenant: Limits
    # Asked on every request: worked out once.
    limited: bool = field(init=False, compare=False)  # any limit at all on the key or its tenant
    budgeted: bool = field(init=False, compare=False)  # a token budget on either

    def __post_init__(self) -> None:
        object.__setattr__(self, "limited", self.key.any or self.tenant.any)
        object.__setattr__(self, "budgeted", self.key.has_budget or self.tenant.has_budget)


@dataclass(slots=True)
class Admission:
    """An admitted request's claim on its limits; settle it exactly once."""

    subject: Subject
    lease: str
    cap: int | None  # the output cap to enforce (None: no token limit applies)
    reserved: int  # tokens reserved (prompt estimate + cap)
    headers: list[tuple[bytes, bytes]]
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Checks:
    """What limits.lua is told about one subject's limits: its KEYS, the checks in its ARGV
    (see limits.lua) and the lease zsets among the KEYS (for renewal). The EVALSHA of every
    request of the subject starts with the same KEYS and ends with the same checks, only the
    few arguments in between differ (`Call`); so those two parts are encoded for the wire once,
    here, and each request encodes only its own arguments (a request's CPU in redis-py and
    hiredis grows with the number of arguments; tests/bench/bench_limits.py)."""

    keys: list[str]
    args: list[str | int]
    leases: list[str]
    head: bytes  # EVALSHA <sha> <number of keys> KEYS..., RESP bulk strings
    tail: bytes  # the checks, RESP bulk strings
    tenant_id: int | None = None  # whose counters the KEYS are (None: a call outside the request path)


class Settlement(NamedTuple):
    """A finished request's usage, queued for the next pipeline (limits.lua's settlement)."""

    queued: float  # time.monotonic()
    checks: Checks
    lease: str
    reserved: int
    used: int


@dataclass(frozen=True, slots=True)
class Call:
    """One limits.lua call: a subject's checks and this call's own leading ARGV."""

    checks: Checks
    argv: list[str | int]

    def wire(self) -> bytes:
        """The EVALSHA as RESP, ready for `send_packed_command`."""
        count = 3 + len(self.checks.keys) + len(self.argv) + len(self.checks.args)
        return b"*%d\r\n%b%b%b" % (count, self.checks.head, _bulk(self.argv), self.checks.tail)

    def args(self, sha: str) -> tuple[str | int, ...]:
        """The same EVALSHA as arguments, for redis-py's cluster pipelines."""
        return ("EVALSHA", sha, len(self.checks.keys), *self.checks.keys, *self.argv, *self.checks.args)


def _bulk(values: list[str | int]) -> bytes:
    """Values as consecutive RESP bulk strings: hiredis's packing of a command without the
    array header that counts its parts (the caller writes that header for the whole call)."""
    if not values:
        return b""
    parts: Any = tuple(values)  # (hiredis's stub types the tuple as a single value)
    packed: bytes = hiredis.pack_command(parts)
    return packed[packed.index(b"\n") + 1 :]


def _duration(ms: int) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


class Limiter:
    def __init__(
        self,
        client: db.RedisClient,
        ledger: Ledger,
        *,
        prefix: str,
        lease_ttl: float,
        default_cap: int,
        min_output: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.ledger = ledger
        self.prefix = prefix
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.default_cap = default_cap
        self.min_output = min_output
        self.clock = clock
        self.script = client.register_script(resources.files("neuronetz").joinpath("limits.lua").read_text())
        # One server (directly or through Sentinel): every pipeline on one connection, in order.
        self.wire = None if isinstance(client, RedisCluster) else Wire(client.connection_pool)
        self.leases: dict[str, list[str]] = {}  # lease id -> lease zsets, for renewal
        # Lease ids: unique to this limiter (a random prefix) and request (a count); drawing 9
        # random bytes per request cost a system call.
        self._lease_prefix = os.urandom(8).hex() + "."
        self._lease_numbers = itertools.count()
        self.settlements: list[Settlement] = []
        self._scheduled = False
        self._admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]] = []
        self._in_flight: set[asyncio.Future[bool]] = set()  # pipelines sent and not answered yet
        self._unanswered: set[int | None] = set()  # tenants whose settlements are in an unanswered pipeline
        self._holding = False  # a flush left calls queued behind such a pipeline
        self._checks: dict[int, tuple[Subject, int, Checks]] = {}  # key id -> (subject, day, its checks)
        self.rebuilding: dict[int, asyncio.Task[None]] = {}
        self.tasks = Supervisor()
        self.unenforced = Throttled(log, "limits not enforced: Redis unreachable")
        self.settle_failed = Throttled(log, "settlement failed; will retry")
        self.renew_failed = Throttled(log, "lease renewal failed")
        self.rebuild_failed = Throttled(log, "budget rebuild failed")

    # --- the keys and checks of one request -------------------------------------------------------

    def _tag(self, tenant_id: int) -> str:
        return tag(self.prefix, tenant_id)

    def checks(self, subject: Subject, now: float) -> Checks:
        """KEYS and ARGV checks for limits.lua, and the lease zsets among the KEYS; memoised,
        encoded, per subject and UTC day (the periods' ids cannot change within a day; their
        TTLs only need to outlive the period). Found by key id, then compared: a subject is the
        same object for every request of a key until its record is reloaded, and hashing one
        would cost more than the rest of the lookup."""
        day = int(now // 86400)
        found = self._checks.get(subject.key_id)
        if found is not None and found[1] == day and (found[0] is subject or found[0] == subject):
            return found[2]
        if len(self._checks) > 10_000:
            self._checks.clear()
        checks = self._build_checks(subject, now)
        self._checks[subject.key_id] = (subject, day, checks)
        return checks

    def _build_checks(self, subject: Subject, now: float) -> Checks:
        tag = self._tag(subject.tenant_id)
        keys: list[str] = []
        args: list[str | int] = []
        leases: list[str] = []
        if subject.budgeted:
            keys.append(tag + "epoch")
            args.append("E")
        for scope, limits, sid in (("key", subject.key, f"k{subject.key_id}"), ("tenant", subject.tenant, "t")):
            if limits.rpm is not None:
                keys.append(f"{tag}rpm:{sid}")
                args += ["R", f"{scope}:rpm", limits.rpm]
            if limits.tpm is not None:
                keys.append(f"{tag}tpm:{sid}")
                args += ["T", f"{scope}:tpm", limits.tpm]
            if limits.max_concurrent is not None or limits.has_budget:
                keys += [f"{tag}lease:{sid}", f"{tag}reserved:{sid}"]
                leases.append(f"{tag}lease:{sid}")
                args += ["L", f"{scope}:max_concurrent", limits.max_concurrent or 0]
            if subject.budgeted:
                # Every period is counted, budget or not (-1: count only): a budget added later
                # then starts from what was spent, as the ledger has it, not from zero.
                for name in BUDGET_NAMES:
                    limit = getattr(limits, name)
                    current = period(name, now)
                    keys.append(f"{tag}used:{sid}:{current.id}")
                    args += ["B", f"{scope}:{name}", -1 if limit is None else limit, current.ttl]
        return self._encoded(keys, args, leases, subject.tenant_id)

    def _encoded(self, keys: list[str], args: list[str | int], leases: list[str], tenant_id: int | None) -> Checks:
        head = _bulk(["EVALSHA", self.script.sha, len(keys), *keys])
        return Checks(keys, args, leases, head, _bulk(args), tenant_id)

    def _call(self, keys: list[str], argv: list[str | int]) -> Call:
        """A call outside the request path, whose arguments are all its own."""
        return Call(self._encoded(keys, [], [], None), argv)

    # --- admission and settlement ---------------------------------------------------------------

    async def admit(self, subject: Subject, prompt_estimate: int, requested_cap: int | None) -> Admission | None:
        """Charge the request against every limit of its key and tenant, or raise the refusal
        (RateLimited / BudgetExceeded 429, ServiceUnavailable 503). None: nothing to enforce."""
        if not subject.limited:
            return None
        now = self.clock()
        checks = self.checks(subject, now)
        lease = f"{self._lease_prefix}{next(self._lease_numbers):x}"
        own: list[str | int] = [
            lease, prompt_estimate, -1 if requested_cap is None else requested_cap, self.default_cap, self.min_output
        ]  # fmt: skip
        try:
            reply = await self._admit_together(checks, own)
            if int(reply[0]) == 0 and _text(reply[1]) == "rebuild" and await self._build_new(subject.tenant_id):
                reply = await self._admit_together(checks, own)
        except REDIS_ERRORS as exc:
            if subject.budgeted:
                raise ServiceUnavailable(
                    "The budget store is unreachable: requests with a token budget are refused until it is back.",
                    retry_after=2,
                ) from None
            self.unenforced(error=type(exc).__name__)
            return None
        if int(reply[0]) == 0:
            self._refuse(subject, _text(reply[1]), int(reply[2]), _text(reply[3]), now)
        cap, reserved = int(reply[1]), int(reply[2])
        if checks.leases:
            self.leases[lease] = checks.leases
        return Admission(subject, lease, cap if cap >= 0 else None, reserved, _headers(reply))

    def _refuse(self, subject: Subject, reason: str, retry_ms: int, label: str, now: float) -> NoReturn:
        scope, _, name = label.partition(":")
        limits = subject.key if scope == "key" else subject.tenant
        limit = getattr(limits, name, None)
        retry = retry_ms / 1000
        if reason == "rebuild":
            raise ServiceUnavailable(
                "Budget counters are being rebuilt from the usage ledger (Redis lost its data, or Postgres "
                "cannot be read right now); retry shortly.",
                retry_after=3,
            )
        if reason == "rpm":
            raise RateLimited(
                f"Rate limit reached: this {scope} may send {limit} requests per minute.", retry_after=retry
            )
        if reason == "tpm":
            raise RateLimited(f"Token rate limit reached: this {scope} may use {limit} tokens per minute.",
                              retry_after=retry)  # fmt: skip
        if reason == "tpm_too_large":
            raise RateLimited(f"This request needs more tokens than this {scope}'s limit of {limit} per minute allows.")
        if reason == "concurrency":
            raise RateLimited(f"Too many requests in flight: this {scope} may have {limit} at once.", retry_after=retry)
        what = PERIODS.get(name, name)
        if reason == "budget_reserved":
            raise BudgetExceeded(
                f"The {scope}'s {what} token budget of {limit} is committed to requests in flight; retry shortly.",
                retry_after=1,
            )
        resets = period(name, now).resets_at
        if resets is None:
            raise BudgetExceeded(f"The {scope}'s total token budget of {limit} is used up.")
        raise BudgetExceeded(
            f"The {scope}'s {what} token budget of {limit} is used up; it resets at {resets:%Y-%m-%d %H:%M} UTC.",
            retry_after=resets.timestamp() - now,
        )

    def settle(
        self, admission: Admission | None, subject: Subject, prompt: int, completion: int, *, model: str
    ) -> None:
        """Record the real usage: in the ledger always (under `model`, see `Ledger.record`), and
        against the limits exactly once per admission (a second call is a no-op); limits and
        budgets count every model alike. The settlement leaves the request path: it rides along
        with the next pipeline (see `_flush`, `_batch`), which only ever holds a slot or a
        reservation a moment longer, never less."""
        self.ledger.record(subject.key_id, subject.tenant_id, prompt, completion, model=model)
        if admission is None or admission.settled:
            return
        admission.settled = True
        self.leases.pop(admission.lease, None)
        checks = self.checks(subject, self.clock())
        self.settlements.append(Settlement(time.monotonic(), checks, admission.lease, admission.reserved,
                                           prompt + completion))  # fmt: skip
        self._schedule()

    # --- one pipeline per loop turn -----------------------------------------------------------------
    #
    # Every admission and settlement that comes up in one turn of the event loop goes to Redis in
    # one pipeline. Each request still costs exactly one round trip to admit, but a pipeline of
    # many costs redis-py a quarter of the CPU per command that separate calls do, and a key's
    # settlements ride inside the call of its next admission: one script call per request
    # instead of two (tests/bench/bench_limits.py).
    #
    # On one server (directly or through Sentinel) the pipelines are written to one connection
    # the moment they are made (`Wire`), and once EARLY admissions are queued the pipeline leaves
    # without waiting for the end of the turn: Redis works on it while the worker goes on.
    #
    # Order: a request that ended must give back its slot before its tenant's next admission is
    # counted. Within a pipeline `_batch` puts settlements first; across pipelines the wire's one
    # connection keeps them in the order written. On a Redis Cluster, pipelines go out on
    # connections of redis-py's cluster client, which Redis may take in any order, so there,
    # while a pipeline carrying a tenant's settlements is unanswered, that tenant's new calls
    # wait and go together in the pipeline after it: at most one such pipeline per tenant is in
    # flight.

    async def _admit_together(self, checks: Checks, own: list[str | int]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._admissions.append((checks, own, future))
        if self.wire is not None and len(self._admissions) >= EARLY:
            self._flush()
        else:
            self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        admissions, self._admissions = self._admissions, []
        settlements, self.settlements = self.settlements, []
        self._holding = False
        if self._unanswered:  # (only without the wire)
            busy = self._unanswered
            self._admissions = [item for item in admissions if item[0].tenant_id in busy]
            self.settlements = [item for item in settlements if item.checks.tenant_id in busy]
            self._holding = bool(self._admissions or self.settlements)
            admissions = [item for item in admissions if item[0].tenant_id not in busy]
            settlements = [item for item in settlements if item.checks.tenant_id not in busy]
        admissions = [item for item in admissions if not item[2].done()]  # not for a request cancelled meanwhile
        if not (admissions or settlements):
            return
        # (none of them busy: see above)
        if self.wire is not None:
            self._start(admissions, settlements)
            return
        tenants = {item.checks.tenant_id for item in settlements}
        self._unanswered |= tenants
        self._start(admissions, settlements).add_done_callback(lambda _: self._answered(tenants))

    def _start(
        self,
        admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]],
        settlements: list[Settlement],
    ) -> asyncio.Future[bool]:
        """Send one pipeline: written now on the wire, its replies handed out when they come
        (`_answer`), or sent by a task (`_send`); the future says whether every settlement
        reached Redis."""
        calls: list[Call] | None = None
        carried: list[list[Settlement]] = []
        written = None
        try:
            calls, carried = self._batch(admissions, settlements)
            if self.wire is not None and calls:
                written = self.wire.send(_payload(calls), len(calls))
        except Exception as exc:  # a defect here must fail its requests, not leave them waiting
            log.exception("limits pipeline failed")
            calls = None
            _fail(admissions, exc)
        if written is not None and calls is not None:
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            written.add_done_callback(lambda _: self._answer(admissions, calls, carried, written, done))
            self._in_flight.add(done)
            done.add_done_callback(self._in_flight.discard)
            return done
        return self._task(self._send(admissions, calls, carried, written))

    def _answer(
        self,
        admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]],
        calls: list[Call],
        carried: list[list[Settlement]],
        written: asyncio.Future[list[Any]],
        done: asyncio.Future[bool],
    ) -> None:
        """The replies of a pipeline written on the wire, in the callback of their arrival (a
        task per pipeline cost more than the rest of its handling); the rare reply that needs
        more round trips (a Redis that forgot the script) is left to `_send`."""
        exc = written.exception()
        replies = [exc] * len(calls) if exc is not None else written.result()
        if exc is None and any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
            task = self._task(self._send(admissions, calls, carried, written))
            task.add_done_callback(lambda _: done.set_result(not task.cancelled() and task.result()))
            return
        try:
            done.set_result(self._deliver(admissions, carried, replies))
        except Exception as exc:  # a defect here must fail its requests, not leave them waiting
            log.exception("limits pipeline failed")
            _fail(admissions, exc)
            done.set_result(False)

    def _task(self, coroutine: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
        task = asyncio.create_task(coroutine)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return task

    def _answered(self, tenants: set[int | None]) -> None:
        self._unanswered -= tenants
        if self._holding:
            self._holding = False
            self._schedule()

    def _batch(
        self,
        admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]],
        settlements: list[Settlement],
    ) -> tuple[list[Call], list[list[Settlement]]]:
        """One pipeline's calls, and the settlements each carries. A key's settlements go
        together in one call: inside its first admission of the batch when the batch holds no
        other key of its tenant, otherwise in a call of their own ahead of every admission. Either
        way a request that ended gives back its slot before any admission of its tenant that came
        up with it is counted (a client that sends its next request as soon as the last one ended
        must not meet its own finished request in flight)."""
        subjects: dict[int | None, set[int]] = {}  # tenant -> its Checks in this batch, by id
        groups: dict[int, list[Settlement]] = {}
        for settlement in settlements:
            subjects.setdefault(settlement.checks.tenant_id, set()).add(id(settlement.checks))
            groups.setdefault(id(settlement.checks), []).append(settlement)
        for checks, _, _ in admissions:
            subjects.setdefault(checks.tenant_id, set()).add(id(checks))
        calls: list[Call] = []
        carried: list[list[Settlement]] = []
        riding = {id(checks) for checks, _, _ in admissions if len(subjects[checks.tenant_id]) == 1}
        for identity, group in groups.items():
            if identity not in riding:
                calls.append(self._settling("settle", group[0].checks, group, []))
                carried.append(group)
        for checks, own, _ in admissions:
            group = groups.pop(id(checks), []) if id(checks) in riding else []
            calls.append(self._settling("admit", checks, group, own))
            carried.append(group)
        return calls, carried

    def _settling(self, mode: str, checks: Checks, group: list[Settlement], own: list[str | int]) -> Call:
        argv: list[str | int] = [mode, self.lease_ttl_ms, len(group)]
        for settlement in group:
            argv += [settlement.lease, settlement.reserved, settlement.used]
        return Call(checks, argv + own)

    async def _send(
        self,
        admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]],
        calls: list[Call] | None,
        carried: list[list[Settlement]],
        written: asyncio.Future[list[Any]] | None,
    ) -> bool:
        if calls is None:  # failed in `_start`
            return False
        try:
            replies = await self._pipelined(calls, written) if calls else []
            return self._deliver(admissions, carried, replies)
        except Exception as exc:  # a defect here must fail its requests, not leave them waiting
            log.exception("limits pipeline failed")
            _fail(admissions, exc)
            return False

    def _deliver(
        self,
        admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]],
        carried: list[list[Settlement]],
        replies: list[Any],
    ) -> bool:
        """Hand each admission its reply; keep the settlements Redis was not reached with."""
        for (_, _, future), reply in zip(admissions, replies[len(replies) - len(admissions) :], strict=True):
            if not future.done():  # the request may have been cancelled meanwhile
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        unsent: list[Settlement] = []
        error: BaseException | None = None
        for group, reply in zip(carried, replies, strict=True):
            if not group:
                continue
            if _unreachable(reply):
                unsent += group
                error = reply
            elif isinstance(reply, Exception):
                log.error("settlement refused by Redis", extra={"fields": {"error": str(reply)}})
        if error is not None:
            self._keep(unsent, error)
            if self.wire is None:
                # Admissions held behind these settlements (see `_flush`) would only wait for
                # the same timeout again: they get this answer now.
                lost = {item.checks.tenant_id for item in unsent}
                _fail([item for item in self._admissions if item[0].tenant_id in lost], error)
                self._admissions = [item for item in self._admissions if item[0].tenant_id not in lost]
        return error is None

    def _keep(self, settlements: list[Settlement], exc: BaseException) -> None:
        """Hold settlements through a Redis outage until their leases would have expired anyway
        (then the lease charges the full reservation, never less than was used), and retry."""
        horizon = time.monotonic() - self.lease_ttl_ms / 1000
        kept = [item for item in settlements if item.queued > horizon]
        if settlements:
            self.settle_failed(error=type(exc).__name__, pending=len(kept), given_up=len(settlements) - len(kept))
        self.settlements = kept + self.settlements
        if kept:
            asyncio.get_running_loop().call_later(0.5, self._schedule)

    async def flush_settlements(self) -> bool:
        """Send queued settlements now (for shutdown and tests); False if Redis refused."""
        settlements, self.settlements = self.settlements, []
        return await self._start([], settlements)

    async def _pipelined(self, calls: list[Call], written: asyncio.Future[list[Any]] | None = None) -> list[Any]:
        """EVALSHA each call; the replies in order, errors in place (a Redis that cannot be
        reached: its error in place of every call it should have answered).

        One pipeline per Redis server: on a Redis Cluster the calls are grouped by the
        primary that holds their tenant's slot and sent to each concurrently, so a primary
        that is down fails only its own tenants' calls. (redis-py's cluster pipeline splits
        by node too, but fails the whole pipeline when any node fails.) `written`: the calls
        were written on the wire already, these are their replies to come."""
        if not isinstance(self.redis, RedisCluster):
            return await self._on_server(calls, None, written)
        cluster = self.redis
        groups: dict[str, list[int]] = {}
        try:
            await cluster.initialize()  # a no-op unless the topology is unknown or changed
            for index, call in enumerate(calls):
                node = cluster.get_node_from_key(call.checks.keys[0])
                groups.setdefault(node.name if node is not None else "", []).append(index)
        except REDIS_ERRORS as exc:  # no node answers, or a slot has no primary
            return [exc] * len(calls)
        replies: list[Any] = [None] * len(calls)
        answers = await asyncio.gather(
            *(self._on_server([calls[i] for i in indices], name or None) for name, indices in groups.items())
        )
        for indices, answer in zip(groups.values(), answers, strict=True):
            for index, reply in zip(indices, answer, strict=True):
                replies[index] = reply
        return replies

    async def _on_server(
        self, calls: list[Call], node: str | None, written: asyncio.Future[list[Any]] | None = None
    ) -> list[Any]:
        """One server's pipeline. Sent directly rather than through redis-py's Script, whose
        pipelines ask SCRIPT EXISTS first (a second round trip every time); a server that
        forgot the script (restart, failover) gets it loaded once, then the pipeline again."""
        try:
            replies = await written if written is not None else await self._send_pipeline(calls)
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                if isinstance(self.redis, RedisCluster):
                    primary = self.redis.get_node(node_name=node)
                    await self.redis.execute_command("SCRIPT LOAD", self.script.script, target_nodes=primary)
                else:
                    await self.redis.script_load(self.script.script)
                replies = await self._send_pipeline(calls)
        except REDIS_ERRORS as exc:
            return [exc] * len(calls)
        return replies

    async def _send_pipeline(self, calls: list[Call]) -> list[Any]:
        if self.wire is not None:  # standalone and Sentinel, without redis-py's per-command work
            return await self.wire.send(_payload(calls), len(calls))
        # A Redis Cluster: its client's pipelines follow slots that moved (MOVED, ASK); they pack in Python.
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                # (redis-py's cluster pipelines refuse `evalsha` by name, not the command itself)
                pipe.execute_command(*call.args(self.script.sha))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    # --- background work ----------------------------------------------------------------------------

    async def renew(self) -> None:
        """Extend the leases of requests still in flight (long streams outlive one lease)."""
        if not self.leases:
            return
        calls = [self._call(zsets, ["renew", self.lease_ttl_ms, lease]) for lease, zsets in list(self.leases.items())]
        for reply in await self._pipelined(calls):
            if isinstance(reply, Exception):
                self.renew_failed(error=type(reply).__name__)
                return

    async def since_loss(self, tenant_id: int) -> float:
        """Seconds since a gateway first saw the data of the Redis that holds a tenant's
        counters. A Redis that lost its data (restart, flush, failover to an empty replica)
        has lost this marker too, so the first call after the loss creates it again and
        answers 0."""
        return await self._marker_age(await self._marker(tenant_id))

    async def _marker_age(self, marker: str) -> float:
        reply = await self._script([marker], ["instance"])
        return int(reply[0]) / 1000

    async def _marker(self, tenant_id: int) -> str:
        """The instance marker of the server holding a tenant's slot. Each primary of a Redis
        Cluster loses its data on its own, so each has a marker of its own: a key in the first
        slot of the `{s<n>}` tags (n = 0, 1, 2, ...) that the primary serves; every gateway
        finds the same one. (Moving that slot to another primary moves the marker with it;
        the primary then starts a new one, which only makes a tenant whose counters are
        missing at that moment wait for a rebuild.)"""
        if not isinstance(self.redis, RedisCluster):
            return self.prefix + "instance"
        await self.redis.initialize()
        slot = self.redis.keyslot(self._tag(tenant_id))
        primary = self.redis.get_node_from_key(self._tag(tenant_id))
        marker = _node_marker(self.redis, self.prefix, primary.name) if primary is not None else None
        if marker is None:
            raise redis.exceptions.SlotNotCoveredError(f"no primary serves slot {slot}")
        return marker

    async def _script(self, keys: list[str], argv: list[str | int]) -> list[Any]:
        """One limits.lua call outside the request path, loading the script where missing."""
        reply = (await self._pipelined([self._call(keys, argv)]))[0]
        if isinstance(reply, Exception):
            raise reply
        result: list[Any] = reply
        return result

    async def _build_new(self, tenant_id: int) -> bool:
        """A tenant's counters are missing. If this Redis has held its data for longer than
        the rebuild wait, it never held this tenant's counters (a new tenant, or a first
        budget): build them from the ledger now and say so (True). Otherwise Redis lost its
        data moments ago, and settlements of every replica may still be on their way to the
        ledger: start a rebuild that waits for them first, and fail closed meanwhile (False)."""
        lost_ago = await self.since_loss(tenant_id)
        if lost_ago >= REBUILD_WAIT:
            await self.rebuild(tenant_id, wait=0.0)
            return True
        task = self.rebuilding.get(tenant_id)
        if task is None or task.done():
            self.rebuilding[tenant_id] = asyncio.create_task(self.rebuild(tenant_id, REBUILD_WAIT - lost_ago))
        return False

    async def rebuild(self, tenant_id: int, wait: float = REBUILD_WAIT) -> None:
        """Re-create a tenant's budget counters from the ledger, after `wait` seconds."""
        tag = self._tag(tenant_id)
        lock = tag + "rebuild"
        try:
            if not await self.redis.set(lock, "1", nx=True, px=15000):
                return  # another replica is on it
            try:
                await asyncio.sleep(wait)
                await self.ledger.flush()
                now = self.clock()
                sums = await self.ledger.sums(tenant_id, now)
                totals = [sum(s[i] for s in sums.values()) for i in range(3)]
                keys: list[str] = [tag + "epoch"]
                args: list[str | int] = ["rebuild", new_epoch()]
                for sid, values in [("t", totals), *((f"k{k}", list(v)) for k, v in sums.items())]:
                    for index, name in enumerate(BUDGET_NAMES):
                        current = period(name, now)
                        keys.append(f"{tag}used:{sid}:{current.id}")
                        args += [values[index], current.ttl]
                await self._script(keys, args)
                log.info("budget counters built", extra={"fields": {"tenant_id": tenant_id, "waited_s": wait}})
            finally:
                await self.redis.delete(lock)
        except (*REDIS_ERRORS, *db.ERRORS) as exc:  # the next budgeted request tries again
            self.rebuild_failed(tenant_id=tenant_id, error=repr(exc))

    async def _mark_instance(self) -> None:
        """Create this Redis's instance marker at startup if it has none, so that on a fresh
        install the first budgeted request does not wait for a rebuild. If Redis is down, the
        first budgeted request after it is back creates it, and waits (it may be a loss)."""
        with contextlib.suppress(*REDIS_ERRORS):
            if not isinstance(self.redis, RedisCluster):
                await self._marker_age(self.prefix + "instance")
                return
            await self.redis.initialize()
            for primary in self.redis.get_primaries():
                marker = _node_marker(self.redis, self.prefix, primary.name)
                if marker is not None:
                    await self._marker_age(marker)

    def start(self) -> None:
        self.tasks.every("limits.renewal", self.lease_ttl_ms / 3000, self.renew)
        self.tasks.start("limits.instance", self._mark_instance)

    async def stop(self) -> None:
        """Stop the background work after sending what is still queued and hearing back about
        every pipeline on its way (closing the wire would fail their settlements); a few tries:
        the leases of anything left over expire by themselves."""
        for _ in range(5):
            sent = await self.flush_settlements()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            if sent and not self.settlements:  # (a failed pipeline puts its settlements back)
                break
            await asyncio.sleep(0.5)
        await self.tasks.stop()
        for task in self.rebuilding.values():
            task.cancel()
        await asyncio.gather(*self.rebuilding.values(), return_exceptions=True)
        if self.wire is not None:
            await self.wire.close()


def tag(prefix: str, tenant_id: int) -> str:
    """One hash tag per tenant: every key a request touches lives in one Redis Cluster slot."""
    return f"{prefix}{{t{tenant_id}}}:"


async def in_flight(client: db.RedisClient, prefix: str, tenant_id: int, sid: str) -> int:
    """Requests holding an unexpired lease for a scope (`t` or `k<key id>`) right now."""
    count: int = await client.zcount(f"{tag(prefix, tenant_id)}lease:{sid}", f"({int(time.time() * 1000)}", "+inf")
    return count


async def spent(client: db.RedisClient, prefix: str, tenant_id: int, now: float) -> dict[str, int]:
    """Tokens a tenant's budget counters hold for the periods `now` is in, by budget name
    (daily_tokens, ...). A counter Redis does not hold is left out: the tenant has not been
    budgeted since Redis started, or its counters were lost and are not rebuilt yet."""
    names = list(BUDGET_NAMES)
    # One slot (the tenant's hash tag), so one MGET also on a Redis Cluster.
    values = await client.mget([f"{tag(prefix, tenant_id)}used:t:{period(name, now).id}" for name in names])
    return {name: int(value) for name, value in zip(names, values, strict=True) if value is not None}


def _node_marker(cluster: RedisCluster, prefix: str, node: str) -> str | None:
    """The instance marker of one cluster primary (see `Limiter._marker`); None if it serves
    no slots. A primary serving 1/k of the slots is found in about k steps; the tags `{s0}` to
    `{s155593}` cover every slot, so the search ends."""
    owned = {slot for slot, nodes in cluster.nodes_manager.slots_cache.items() if nodes and nodes[0].name == node}
    if not owned:
        return None
    n = 0
    while key_slot(f"s{n}".encode()) not in owned:
        n += 1
    return f"{prefix}{{s{n}}}:instance"


def _payload(calls: list[Call]) -> bytes:
    return b"".join([call.wire() for call in calls])


def _fail(admissions: list[tuple[Checks, list[str | int], asyncio.Future[list[Any]]]], exc: BaseException) -> None:
    """Admissions that will not be answered get `exc` (unless their request is gone)."""
    for _, _, future in admissions:
        if not future.done():
            future.set_exception(exc)


def _unreachable(reply: Any) -> bool:
    """An error that says a server was not reached or is not serving its slots (retrying
    later helps), as opposed to one refusing the call itself (retrying never helps)."""
    if isinstance(reply, redis.exceptions.ResponseError):
        return isinstance(reply, (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError))
    return isinstance(reply, REDIS_ERRORS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _headers(reply: list[Any]) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers from an admission's reply (integers, -1: no such limit)."""
    headers: list[tuple[bytes, bytes]] = []
    if reply[3] >= 0:
        headers += (
            (b"x-ratelimit-limit-requests", b"%d" % reply[3]),
            (b"x-ratelimit-remaining-requests", b"%d" % max(reply[4], 0)),
            (b"x-ratelimit-reset-requests", _duration(reply[5]).encode()),
        )
    if reply[6] >= 0:
        headers += (
            (b"x-ratelimit-limit-tokens", b"%d" % reply[6]),
            (b"x-ratelimit-remaining-tokens", b"%d" % max(reply[7], 0)),
            (b"x-ratelimit-reset-tokens", _duration(reply[8]).encode()),
        )
    return headers
