"""Soak (issue 11): mixed traffic for minutes while the gateway's dependencies fail under it.

    python3 build.py bench soak             (or: .venv/bin/python tests/bench/bench_soak.py --duration 180)

A gateway with two Granian workers in front of two emulators, on a private redis-server (this
benchmark restarts it; the shared one is never touched) and on Postgres through a TCP proxy the
benchmark controls. Closed-loop clients send a mix of /api/generate, /api/chat, /v1/chat/completions
and /v1/completions, streaming or not, for four tenants (no limits; a budget far away; a budget
used up during the run; rpm and concurrency limits), and one request in ten is abandoned after
its first bytes. At fixed points of the run:

  15 %  Redis restarts empty (stopped, started again 2 s later): budgets are rebuilt from the ledger
  35 %  a backend is SIGKILLed and started again 5 s later on the same port
  55 %  Postgres is cut for 10 s (every connection dropped, new ones refused)
  75 %  one gateway worker is SIGKILLed (Granian starts another)

Afterwards (the gateway still running, as a crash would leave it) it waits for the audit and the
ledger to settle and prints: requests sent vs finished vs audit rows; per tenant the tokens the
clients saw vs the audit vs the ledger; errors around each fault and the time to recover; the
gateway's RSS over time. A request is *finished* when its client read a whole answer (any status);
those cut by the worker's death or abandoned by the client are in flight, which a crash may lose.
Targets: no finished request missing from the audit, ledger == audit for every tenant; budgeted
requests served again within 1 s + the 2.5 s rebuild wait after Redis returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.support import PrivateRedis, TcpProxy

ROUTES = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions")
TENANTS = {
    "free": {},
    "budgeted": {"daily_tokens": 10**12},
    "capped": {"daily_tokens": 30_000},
    "limited": {"rpm": 3000, "max_concurrent": 3},
}
REBUILD_WAIT = 2.5  # 2 x the ledger interval + 0.5 s: budgeted requests wait this long after a Redis loss
RECOVERY_TARGET = 1.0 + REBUILD_WAIT
KEY_STORE_DOWN = "The key store is unavailable"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak: mixed traffic with cancellations through a Redis restart, a backend kill, a Postgres "
        "cut and a worker SIGKILL; audit, ledger and client-seen tokens compared afterwards.",
        epilog="Needs Postgres (BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres) and "
        "redis-server on PATH; creates its own database and Redis and removes both at the end.",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--concurrency", type=int, default=12, help="clients sending at once (default 12)")
    return parser.parse_args(argv)


@dataclass
class Sent:
    request_id: str
    tenant: str
    started: float
    ended: float
    status: int  # of the answer's head; 0 when none came
    outcome: str  # "finished" (the client read a whole answer), "abandoned" (it left) or "broken" (the connection)
    tokens: int | None  # prompt + completion tokens the answer reported, when it did
    error: str = ""  # the start of an error answer


@dataclass
class Fault:
    name: str
    start: float
    restored: float = 0.0
    note: str = ""


@dataclass
class Soak:
    base: float = field(default_factory=time.monotonic)
    sent: list[Sent] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    stop: bool = False

    def now(self) -> float:
        return time.monotonic() - self.base


def body_for(route: str, stream: bool) -> bytes:
    text = random.choice(["why is the sky blue", "hi", "tell me a story about a dog in the rain"])
    body: dict[str, Any] = {"model": "tiny", "stream": stream}
    if route in ("/api/chat", "/v1/chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if route.startswith("/v1") and stream:
        body["stream_options"] = {"include_usage": True}  # so the client sees what it was charged
    return orjson.dumps(body)


def reported_tokens(route: str, stream: bool, content: bytes) -> int | None:
    """Prompt + completion tokens the answer itself reports (its final record or usage)."""
    try:
        if not stream:
            record = orjson.loads(content)
        elif route.startswith("/api"):
            record = orjson.loads(content.strip().rsplit(b"\n", 1)[-1])
        else:
            events = [e.removeprefix(b"data: ") for e in content.split(b"\n\n") if e.startswith(b"data: {")]
            record = orjson.loads(events[-1])
        if route.startswith("/api"):
            return int(record["prompt_eval_count"]) + int(record["eval_count"])
        return int(record["usage"]["prompt_tokens"]) + int(record["usage"]["completion_tokens"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None


async def client_loop(soak: Soak, client: httpx.AsyncClient, url: str, keys: dict[str, str], number: int) -> None:
    count = 0
    while not soak.stop:
        count += 1
        tenant = random.choice(list(keys))
        route, stream, abandon = random.choice(ROUTES), random.random() < 0.5, random.random() < 0.1
        request_id = f"soak-{number}-{count}"
        headers = {"Authorization": f"Bearer {keys[tenant]}", "X-Request-ID": request_id,
                   "Content-Type": "application/json"}  # fmt: skip
        started, status, outcome, tokens, error = soak.now(), 0, "broken", None, ""
        try:
            async with client.stream("POST", url + route, content=body_for(route, stream), headers=headers) as answer:
                status = answer.status_code
                if abandon and status == 200:
                    async for _ in answer.aiter_raw():
                        break  # the first bytes, then the client leaves
                    outcome = "abandoned"
                else:
                    content = await answer.aread()
                    outcome = "finished"
                    if status == 200:
                        tokens = reported_tokens(route, stream, content)
                    else:
                        error = content[:80].decode(errors="replace")
        except httpx.HTTPError:
            outcome = "broken"
        soak.sent.append(Sent(request_id, tenant, started, soak.now(), status, outcome, tokens, error))


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def start_emulator(port: int) -> loadgen.Service:
    # Each answer streams 20 tokens 2 ms apart, so abandoned and killed requests really are mid-answer.
    return loadgen.start_emulator("--port", str(port), "--tokens", "20", "--token-delay-ms", "2")


async def faults(soak: Soak, duration: float, redis: PrivateRedis, emulators: list[loadgen.Service],
                 proxy: TcpProxy, gateway: loadgen.Service) -> None:  # fmt: skip
    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, duration * fraction - soak.now()))

    await at(0.15)
    fault = Fault("Redis restart (empty)", soak.now())
    soak.faults.append(fault)
    redis.stop()
    await asyncio.sleep(2)
    redis.start()
    fault.restored = soak.now()

    await at(0.35)
    fault = Fault("backend SIGKILL, back after 5 s", soak.now())
    soak.faults.append(fault)
    emulators[0].process.send_signal(signal.SIGKILL)
    emulators[0].process.wait()
    await asyncio.sleep(5)
    emulators[0] = start_emulator(emulators[0].port)
    fault.restored = soak.now()

    await at(0.55)
    fault = Fault("Postgres cut for 10 s", soak.now())
    soak.faults.append(fault)
    proxy.cut()
    await asyncio.sleep(10)
    proxy.restore()
    fault.restored = soak.now()

    await at(0.75)
    fault = Fault("worker SIGKILL", soak.now())
    soak.faults.append(fault)
    worker = children(gateway.pid)[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker, signal.SIGKILL)
    fault.restored = soak.now()
    fault.note = f"pid {worker}"


async def sample_rss(soak: Soak, gateway: loadgen.Service, every: float) -> None:
    while not soak.stop:
        soak.rss.append((soak.now(), loadgen.rss_kb(gateway.tree())))
        await asyncio.sleep(every)


async def fetch_audit(pool: Any, ids: list[str]) -> dict[str, tuple[int, int, str]]:
    """request id -> (status, tokens, tenant) of the audit rows of these requests."""
    found: dict[str, tuple[int, int, str]] = {}
    for i in range(0, len(ids), 5000):
        rows = await pool.fetch(
            "SELECT r.request_id, r.status, r.prompt_tokens + r.completion_tokens AS tokens, t.name FROM request_log r "
            "JOIN tenants t ON t.id = r.tenant_id WHERE r.request_id = ANY($1::text[])",
            ids[i : i + 5000],
        )
        found.update({r["request_id"]: (r["status"], r["tokens"], r["name"]) for r in rows})
    return found


async def ledger_by_tenant(pool: Any) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT t.name, sum(u.prompt_tokens + u.completion_tokens) AS tokens FROM usage_daily u "
        "JOIN tenants t ON t.id = u.tenant_id GROUP BY t.name"
    )
    return {r["name"].removeprefix("soak-"): int(r["tokens"]) for r in rows}


async def audit_by_tenant(pool: Any) -> dict[str, tuple[int, int]]:
    rows = await pool.fetch(
        "SELECT t.name, count(*) AS n, sum(r.prompt_tokens + r.completion_tokens) AS tokens FROM request_log r "
        "JOIN tenants t ON t.id = r.tenant_id GROUP BY t.name"
    )
    return {r["name"].removeprefix("soak-"): (int(r["n"]), int(r["tokens"])) for r in rows}


async def settle(pool: Any, soak: Soak) -> tuple[dict[str, tuple[int, int, str]], float]:
    """Waits (up to 90 s: a dead worker's journal is taken over after its 10 s heartbeat) until
    every finished request is audited and the ledger equals the audit, or nothing changes any more."""
    started = time.monotonic()
    finished_ids = [s.request_id for s in soak.sent if s.outcome == "finished" and KEY_STORE_DOWN not in s.error]
    last: tuple[Any, ...] = ()
    stable_since = time.monotonic()
    while True:
        audit = await fetch_audit(pool, finished_ids)
        ledger, audited = await ledger_by_tenant(pool), await audit_by_tenant(pool)
        done = len(audit) == len(finished_ids) and all(ledger.get(t, 0) == audited.get(t, (0, 0))[1] for t in TENANTS)
        state = (len(audit), tuple(sorted(ledger.items())), tuple(sorted(audited.items())))
        if state != last:
            last, stable_since = state, time.monotonic()
        if done and time.monotonic() - started > 15:  # past the journal takeover's heartbeat
            return audit, time.monotonic() - started
        if time.monotonic() - stable_since > 30 or time.monotonic() - started > 90:
            return audit, time.monotonic() - started
        await asyncio.sleep(1)


def report(soak: Soak, audit: dict[str, tuple[int, int, str]], ledger: dict[str, int],
           audited: dict[str, tuple[int, int]], settled_after: float, args: argparse.Namespace) -> None:  # fmt: skip
    sent = soak.sent
    finished = [s for s in sent if s.outcome == "finished"]
    abandoned = [s for s in sent if s.outcome == "abandoned"]
    broken = [s for s in sent if s.outcome == "broken"]
    # Refused before a key could be checked (its worker had not cached it and Postgres was away):
    # no tenant to audit it under, so it is counted apart.
    unchecked = [s for s in finished if KEY_STORE_DOWN in s.error]
    missing = [s for s in finished if s.request_id not in audit and KEY_STORE_DOWN not in s.error]
    wrong_status = [s for s in finished if s.request_id in audit and audit[s.request_id][0] != s.status]
    rows = sum(n for n, _ in audited.values())
    print(f"\nSoak: {args.duration:.0f} s, {args.concurrency} clients, gateway with 2 workers; {loadgen.placement()}")
    print("\nRequests")
    print(f"  sent {len(sent)}, finished {len(finished)}, abandoned by the client {len(abandoned)}, "
          f"cut (connection broke) {len(broken)}")  # fmt: skip
    print(f"  audit rows {rows} (sent - audit rows = {len(sent) - rows}: refused before authentication, "
          "in flight when the worker died)")  # fmt: skip
    examples = [(s.request_id, round(s.started, 1), s.status) for s in missing[:5]]
    print(f"  finished requests missing from the audit: {len(missing)} (target 0)"
          + (f", e.g. {examples}" if missing else ""))  # fmt: skip
    print(f"  finished requests audited with another status than the client saw: {len(wrong_status)}")
    print(f"  refused before authentication ({KEY_STORE_DOWN!r}, not audited by design): {len(unchecked)}")
    print(f"  statuses: {dict(sorted(Counter(s.status for s in sent).items()))}")

    print("\nTokens per tenant")
    print(f"  {'tenant':<10} {'client-seen':>12} {'audit, same':>12} {'audit, all':>12} {'ledger':>12} "
          f"{'ledger-audit':>13}  budget")  # fmt: skip
    for tenant, limits in TENANTS.items():
        seen = [s for s in finished if s.tenant == tenant and s.tokens is not None and s.request_id in audit]
        client_seen = sum(s.tokens or 0 for s in seen)
        audit_same = sum(audit[s.request_id][1] for s in seen)
        audit_all = audited.get(tenant, (0, 0))[1]
        in_ledger = ledger.get(tenant, 0)
        budget = limits.get("daily_tokens")
        print(f"  {tenant:<10} {client_seen:>12} {audit_same:>12} {audit_all:>12} {in_ledger:>12} "
              f"{in_ledger - audit_all:>13}  {budget if budget is not None else '-'}")  # fmt: skip
    print("  (client-seen: what whole 200 answers reported; 'audit, same': the audit of those requests)")
    print(f"  the audit and the ledger settled {settled_after:.0f} s after the traffic stopped")

    print("\nFaults (errors: answers other than 200 and 429, and broken connections, of requests that ended after "
          "the fault began and began before 5 s after it was undone; recovery: from undoing it to the end of the "
          "last such error that began after it)")  # fmt: skip
    for fault in soak.faults:
        window = [s for s in sent if s.ended >= fault.start and s.started <= fault.restored + 5
                  and (s.status not in (200, 429) or s.outcome == "broken")]  # fmt: skip
        after = [s for s in window if s.started >= fault.restored]
        recovery = max((s.ended for s in after), default=fault.restored) - fault.restored
        errors = dict(Counter(f"{s.status} {s.error[:70]}" if s.outcome != "broken" else "connection broke"
                              for s in window).most_common())  # fmt: skip
        by_tenant = dict(sorted(Counter(s.tenant for s in window).items()))
        target = f" (target {RECOVERY_TARGET:.1f} s)" if fault.name.startswith("Redis") else ""
        print(f"  {fault.name} at {fault.start:.0f} s, undone after {fault.restored - fault.start:.1f} s {fault.note}")
        print(f"    errors by tenant {by_tenant}: {len(window) - len(after)} began before it was undone, "
              f"{len(after)} after; recovered {recovery:.2f} s after{target}")  # fmt: skip
        for error, count in errors.items():
            print(f"      {count:6d}  {error}")

    print("\nGateway RSS (all processes)")
    for at, kb in soak.rss:
        print(f"  {at:6.0f} s  {kb / 1024:7.1f} MB")


async def main(args: argparse.Namespace) -> None:
    loadgen.raise_nofile()
    async with loadgen.bench_store("soak") as store:
        keys = {tenant: await loadgen.make_key(store, f"soak-{tenant}", **limits) for tenant, limits in TENANTS.items()}
        postgres = urlsplit(store.database_url)
        with PrivateRedis() as redis, TcpProxy(postgres.port or 5432) as proxy:
            database_url = postgres._replace(
                netloc=f"{postgres.username or 'postgres'}@127.0.0.1:{proxy.port}"
            ).geturl()
            emulators = [start_emulator(loadgen.free_port()), start_emulator(loadgen.free_port())]
            env = loadgen.gateway_env(database_url, store.redis_prefix, ",".join(e.url for e in emulators),
                                      REDIS_URL=redis.url, GATEWAY_HEALTH_INTERVAL="1")  # fmt: skip
            port = loadgen.free_port()
            command = [loadgen.PYTHON, "-m", "neuronetz", "serve", "--host", "127.0.0.1", "--port", str(port),
                       "--workers", "2"]  # fmt: skip
            gateway = loadgen.start_server("gateway", command, env, port)
            try:
                soak = Soak()
                limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
                async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                    clients = [asyncio.create_task(client_loop(soak, client, gateway.url, keys, n))
                               for n in range(args.concurrency)]  # fmt: skip
                    sampler = asyncio.create_task(sample_rss(soak, gateway, max(args.duration / 20, 5)))
                    await faults(soak, args.duration, redis, emulators, proxy, gateway)
                    await asyncio.sleep(max(0.0, args.duration - soak.now()))
                    soak.stop = True
                    await asyncio.gather(*clients)
                    await sampler
                soak.rss.append((soak.now(), loadgen.rss_kb(gateway.tree())))
                audit, settled_after = await settle(store.pool, soak)
                report(soak, audit, await ledger_by_tenant(store.pool), await audit_by_tenant(store.pool),
                       settled_after, args)  # fmt: skip
            finally:
                gateway.stop()
                for emulator in emulators:
                    emulator.stop()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
