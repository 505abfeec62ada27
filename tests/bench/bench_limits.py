"""Benchmark (issue 6): what rate limits and token budgets cost per request.

    python3 build.py bench limits           (or: .venv/bin/python tests/bench/bench_limits.py --help)

A. In-process: a `neuronetz.limits.Limiter` built as worker.py builds it (with its Ledger),
   for a key whose key and tenant both set every limit (rpm, tpm, max_concurrent and the
   daily, monthly and total budgets); `admit` + `settle` timed over many sequential
   requests: Redis round trips counted on the client, process CPU (time.process_time),
   wall time, the Redis server's CPU and limits.lua's own time per call (INFO commandstats,
   usec_per_call of EVALSHA). The same for a key without limits.
B. Gateway requests/s at c=32 (`--concurrency`; `python -m neuronetz serve --workers 1` on CPU 1) with that
   fully limited key (generous values: nothing is refused) vs a key of another tenant with no
   limits at all, interleaved runs.

Both against a redis-server of the benchmark's own (on a free port, removed after), so its
CPU and command statistics hold no one else's work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.bench_services import EVERY_LIMIT, private_postgres, private_redis
from tests.bench.loadgen import Run, Service

TARGET_ROUND_TRIPS = (1, 1)
TARGET_RATIO = 0.85
# For `make_key`: EVERY_LIMIT on the key and on its tenant.
ON_KEY_AND_TENANT = {**EVERY_LIMIT, **{f"t_{name}": value for name, value in EVERY_LIMIT.items()}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments(
        "Limits and budgets: Redis round trips and CPU per admission + settlement, and gateway req/s "
        "with every limit set vs none.",
        repeat=3,
    )
    add = parser.add_argument
    add("--requests", type=int, default=3000, help="sequential admit+settle pairs timed (default 3000)")
    add("--concurrency", type=int, default=32, help="connections in section B (default 32, the target's)")
    return parser.parse_args(argv)


# --- A. in-process --------------------------------------------------------------------------


async def in_process(
    store: loadgen.BenchStore, keys: dict[str, str], args: argparse.Namespace, redis_pid: int
) -> tuple[list[str], dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    import redis.asyncio as aioredis

    from neuronetz import keys as key_module
    from neuronetz import tenants
    from neuronetz.auth import record_from_row
    from neuronetz.budgets import Ledger
    from neuronetz.errors import ServiceUnavailable
    from neuronetz.limits import Limiter
    from neuronetz.worker import redis_client

    # As worker.py builds it; round trips are counted where commands leave for Redis: a batch
    # written on the limiter's wire, or a packed command (a pipeline is one send, as it is one
    # round trip).
    redis = redis_client(store.redis_url)
    counted = {"n": 0}
    base = redis.connection_pool.connection_class

    class Counting(base):  # type: ignore[valid-type, misc]
        async def send_packed_command(self, *command: Any, **options: Any) -> Any:
            counted["n"] += 1
            return await super().send_packed_command(*command, **options)

    redis.connection_pool.connection_class = Counting
    ledger = Ledger(store.pool)
    ledger.start()
    limiter = Limiter(redis, ledger, prefix=store.redis_prefix, lease_ttl=60.0, default_cap=1024, min_output=16)
    wire = limiter.wire
    assert wire is not None  # a standalone Redis
    write = wire.send

    def counting_send(payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        counted["n"] += 1
        return write(payload, replies)

    wire.send = counting_send  # type: ignore[method-assign]
    limiter.start()
    shared: dict[str, Service | list[int]] = {"redis": [redis_pid]}
    stats = aioredis.Redis.from_url(store.redis_url)
    rows = []
    trips: dict[str, tuple[float, float]] = {}
    costs: dict[str, tuple[float, float]] = {}  # CPU us per admit + settle, limits.lua us per call
    try:
        for label, key in keys.items():
            prefix = key_module.prefix_of(key)
            assert prefix is not None
            subject = record_from_row(await tenants.fetch_key(store.pool, prefix)).subject
            # The first budgeted request of a tenant finds no epoch marker and starts the rebuild
            # from the ledger (503 meanwhile); wait for it, as a real client would retry.
            deadline = time.monotonic() + 15
            while True:
                try:
                    admission = await limiter.admit(subject, 12, None)
                    break
                except ServiceUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            limiter.settle(admission, subject, 2, 10, model="tiny:latest")
            await limiter.flush_settlements()
            for _ in range(200):  # warm-up
                admission = await limiter.admit(subject, 12, None)
                limiter.settle(admission, subject, 2, 10, model="tiny:latest")
                await limiter.flush_settlements()
            admit_trips = settle_trips = 0
            admit_cpu = settle_cpu = 0.0
            walls: list[float] = []
            await stats.config_resetstat()
            sampler = loadgen.CpuSampler(shared)
            for _ in range(args.requests):
                before, cpu, wall = counted["n"], time.process_time(), time.perf_counter()
                admission = await limiter.admit(subject, 12, None)
                middle, cpu_middle = counted["n"], time.process_time()
                # Queued by the request, sent by the background flush: here flushed at once, so
                # each request pays its own round trip (the gateway batches them under load).
                limiter.settle(admission, subject, 2, 10, model="tiny:latest")
                await limiter.flush_settlements()
                walls.append(time.perf_counter() - wall)
                admit_cpu += cpu_middle - cpu
                settle_cpu += time.process_time() - cpu_middle
                admit_trips += middle - before
                settle_trips += counted["n"] - middle
            share = sampler.stop()
            elapsed = time.perf_counter() - sampler.wall
            script = (await stats.info("commandstats")).get("cmdstat_evalsha", {})
            n = args.requests
            now = time.time()
            cpu = time.process_time()
            for _ in range(n):
                limiter.checks(subject, now)
            checks_us = (time.process_time() - cpu) / n * 1e6
            together = await concurrent_cpu(limiter, subject, args.concurrency)
            redis_us = share.others["redis"] * elapsed / n * 1e6
            trips[label] = (admit_trips / n, settle_trips / n)
            costs[label] = ((admit_cpu + settle_cpu) / n * 1e6, script["usec_per_call"] if script else 0.0)
            rows.append([
                label, f"{admit_trips / n:g} + {settle_trips / n:g}", f"{admit_cpu / n * 1e6:.0f} us",
                f"{settle_cpu / n * 1e6:.0f} us", f"{checks_us:.0f} us", f"{statistics.median(walls) * 1e3:.3f} ms",
                f"{redis_us:.0f} us" if share.others["redis"] * elapsed >= 0.05 else "< tick",
                f"{script['usec_per_call']:.0f} us" if script else "-", f"{together:.0f} us",
            ])  # fmt: skip
    finally:
        await limiter.stop()
        await ledger.stop()
        await redis.aclose()
        await stats.aclose()
    lines = [
        "## A. Limiter.admit + Limiter.settle, in-process",
        "method: neuronetz.limits.Limiter (+ Ledger, started) on the bench Redis prefix, built as worker.py builds "
        f"it (lease 60 s, default cap 1,024, min output 16); {args.requests:,} sequential requests after 200 warm-up, "
        "prompt estimate 12, usage 2 + 10 tokens; round trips = Redis commands sent by the client (execute_command; "
        "a pipeline would count once); CPU = time.process_time of this process on CPU 0; checks() = the KEYS/ARGV "
        "building alone, which admit and settle each run once; Redis CPU = the benchmark's own redis-server's CPU "
        "over the loop / requests; limits.lua per call = INFO commandstats usec_per_call of EVALSHA over the loop "
        "(admit and settle alike); at c=N: N tasks admitting, yielding three turns, settling, again, on this "
        "process's event loop (uvloop) for 3 x 1 s: process CPU per request, median (the batching the gateway "
        "does under load, without HTTP)",
        loadgen.table(
            [
                "key",
                "round trips admit + settle",
                "CPU admit",
                "CPU settle",
                "of which checks() each",
                "wall admit+settle p50",
                "Redis CPU per request",
                "limits.lua per call",
                f"CPU per request at c={args.concurrency}",
            ],
            rows,
        ),
        "",
    ]
    return lines, trips, costs


async def concurrent_cpu(limiter: Any, subject: Any, concurrency: int) -> float:
    """Process CPU per admitted and settled request with `concurrency` tasks at it (µs, median
    of three 1-second runs)."""
    running = True
    done = 0

    async def client() -> None:
        nonlocal done
        while running:
            admission = await limiter.admit(subject, 12, None)
            for _ in range(3):  # the request's other work: its turns of the event loop
                await asyncio.sleep(0)
            limiter.settle(admission, subject, 2, 10, model="tiny:latest")
            done += 1

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    costs = []
    try:
        await asyncio.sleep(0.3)
        for _ in range(3):
            before, cpu = done, time.process_time()
            await asyncio.sleep(1.0)
            costs.append((time.process_time() - cpu) / max(done - before, 1) * 1e6)
    finally:
        running = False
        await asyncio.gather(*tasks)
        await limiter.flush_settlements()
    return statistics.median(costs)


# --- B. through the gateway -----------------------------------------------------------------


async def through_gateway(
    store: loadgen.BenchStore, keys: dict[str, str], args: argparse.Namespace, redis_pid: int, postgres_pid: int
) -> tuple[list[str], float]:
    with loadgen.services() as started:
        emulator, gateway = loadgen.start_rig(started, store.database_url, store.redis_prefix)
        sample: dict[str, Service | list[int]] = {
            "gateway": gateway, "emulator": emulator, "redis": [redis_pid],
        }  # fmt: skip
        requests = {
            label: loadgen.http_request("POST", gateway.port, "/api/chat", loadgen.CHAT_BODY, key)
            for label, key in keys.items()
        }
        for request in requests.values():
            await loadgen.warm_until_served(gateway.port, request, then=1000)
        runs: dict[str, list[Run]] = {label: [] for label in requests}
        for index in range(args.repeat):
            for label, request in list(requests.items())[:: 1 if index % 2 == 0 else -1]:
                connections = await loadgen.connect(gateway.port, args.concurrency)
                sample["postgres"] = loadgen.process_tree(postgres_pid)  # with the backends opened since
                await loadgen.closed_loop(connections, request, 1.0)
                got = await loadgen.closed_loop(connections, request, args.seconds, sample=sample)
                loadgen.close_all(connections)
                if got.errors or got.lost:
                    raise RuntimeError(f"{label}: {got.errors} errors {got.statuses}, {got.lost} lost")
                runs[label].append(got)
                await asyncio.sleep(0.3)
    rows = []
    for label, group in runs.items():
        chosen = sorted(group, key=lambda r: r.rps)[len(group) // 2]
        assert chosen.cpu is not None
        per = {
            name: chosen.cpu.others[name] * chosen.seconds / len(chosen.latencies) * 1e6
            for name in ("gateway", "redis")
        }
        rows.append([
            label, f"{chosen.rps:,.0f}", f"{statistics.median(r.rps for r in group):,.0f}",
            loadgen.ms(loadgen.median(chosen.latencies)), loadgen.ms(loadgen.percentile(chosen.latencies, 99)),
            f"{per['gateway']:.0f}", f"{per['redis']:.0f}", chosen.cpu.describe(),
        ])  # fmt: skip
    # The ratio of each repeat's two runs, which ran back to back, then the median of those: the
    # host's speed drifts by 10-20 % over tens of seconds, far more than between two neighbours.
    limited, free = runs.values()
    ratio = statistics.median(a.rps / b.rps for a, b in zip(limited, free, strict=True))
    lines = [
        f"## B. Gateway requests/s at c={args.concurrency}: every limit and budget set vs none",
        "method: `python -m neuronetz serve --workers 1` on CPU 1, emulator + load generator and the benchmark's "
        "own Redis and Postgres on CPU 0; non-streaming POST /api/chat (75 B body, 337 B answer); closed loop, "
        f"{args.concurrency} "
        f"keep-alive connections, 1 s warm-up + {args.seconds:g} s, {args.repeat} interleaved repeats (median run "
        "shown; the ratio is the median of each repeat's two runs' ratio); keys of two tenants: one with every "
        "limit on key and tenant (generous: none refuses), one with none",
        loadgen.table(
            [
                "key",
                "req/s (median run)",
                "median of runs",
                "p50",
                "p99",
                "gateway CPU us/req",
                "Redis CPU us/req",
                "CPU (share of one core)",
            ],
            rows,
        ),
        "",
    ]
    return lines, ratio


async def run(args: argparse.Namespace) -> int:
    loadgen.raise_nofile()
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    # Both servers private and on the load generator's CPU: a shared Postgres floats, and under
    # the limits' Redis load the scheduler moved it onto the gateway's CPU (11 % of it), which
    # priced the rig rather than the limits.
    with private_redis() as (redis_url, redis_process), private_postgres() as (postgres_url, postgres_process):
        os.environ["REDIS_URL"] = redis_url  # read by the bench store and the gateway's environment
        os.environ["BENCH_POSTGRES_URL"] = postgres_url
        return await measure(args, redis_process.pid, postgres_process.pid)


async def measure(args: argparse.Namespace, redis_pid: int, postgres_pid: int) -> int:
    async with loadgen.bench_store("limits") as store:
        keys = {
            "every limit (key + tenant)": await loadgen.make_key(store, "limited", **ON_KEY_AND_TENANT),
            "no limits": await loadgen.make_key(store, "free"),
        }
        section_a, trips, costs = await in_process(store, keys, args, redis_pid)
        print("  in-process done; through the gateway", file=sys.stderr, flush=True)
        section_b, ratio = await through_gateway(store, keys, args, redis_pid, postgres_pid)
    admit, settle = trips["every limit (key + tenant)"]
    cpu, script = costs["every limit (key + tenant)"]
    summary = [
        ["Redis round trips per request, every limit (admit + settle)", f"{admit:g} + {settle:g}", "1 + 1",
         loadgen.verdict((admit, settle) == TARGET_ROUND_TRIPS)],
        [f"gateway req/s c={args.concurrency}, every limit / none", f"{ratio:.1%}", f">= {TARGET_RATIO:.0%}",
         loadgen.verdict(ratio >= TARGET_RATIO)],
        ["worker CPU per admit + settle, every limit, sequential", f"{cpu:.0f} us", "report", "n/a"],
        ["limits.lua per call (Redis, INFO commandstats)", f"{script:.0f} us", "report", "n/a"],
    ]  # fmt: skip
    loadgen.report("limits and budgets (issue 6)", summary, f"placement: {loadgen.placement(loadgen.OWN_SERVICES)}",
                   "(CPU per admission + settlement and the script's time: see section A; no numeric target was set "
                   "for them)",
                   "\n".join(section_a), "\n".join(section_b))  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
