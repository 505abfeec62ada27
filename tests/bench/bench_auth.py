"""Benchmark (issue 3): what authentication costs per request.

    python3 build.py bench auth             (or: .venv/bin/python tests/bench/bench_auth.py --help)

A. In-process, against the real Postgres and Redis: a `neuronetz.auth.Authenticator` built
   as worker.py builds it (its invalidation listener running), primed with one key; then
   `authenticate()` timed with time.process_time over many calls — on a cache hit, on a miss
   proven by the Redis record (Postgres fetch + Redis HGET), and on a miss that needs Argon2
   (Postgres fetch + Redis HGET + Argon2id in the auth thread + Redis HSET).
B. Requests/s of an authenticated no-op route (`GET /bench/noop` of tests/bench/noop_app.py:
   the gateway's whole pipeline for an authenticated request, minus proxying) vs the
   unauthenticated `/healthz` on the same Granian server, one worker, on CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.loadgen import Run, Service

TARGET_HIT_US = 50.0
TARGET_RATIO = 0.80


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments(
        "Authentication cost: in-process CPU per authenticate() (hit and misses) and req/s of an "
        "authenticated no-op route vs /healthz.",
        repeat=3,
    )
    add = parser.add_argument
    add("--hits", type=int, default=100_000, help="cache-hit calls timed (default 100000)")
    add("--redis-misses", type=int, default=300, help="misses proven by the Redis record (default 300)")
    add("--argon2-misses", type=int, default=12, help="misses that run Argon2id (default 12)")
    add("--no-diagnostics", action="store_true", help="skip the servers that price App._record")
    return parser.parse_args(argv)


# --- A. in-process --------------------------------------------------------------------------


async def in_process(store: loadgen.BenchStore, key: str, args: argparse.Namespace) -> tuple[list[str], float]:
    from neuronetz import auth as auth_module
    from neuronetz import keys
    from neuronetz.worker import redis_client

    redis = redis_client(store.redis_url)  # as worker.py builds it
    authenticator = auth_module.Authenticator(
        store.pool, redis, database_url=store.database_url, secret="bench-secret-not-for-production",
        redis_prefix=store.redis_prefix, cache_ttl=30.0, failures_per_minute=1_000_000, threads=1,
    )  # fmt: skip
    authenticator.start()
    lines: list[str] = []
    try:
        for _ in range(200):  # the listener connects within a few ms; caching is 1 s until it has
            if authenticator.listening:
                break
            await asyncio.sleep(0.05)
        header = f"Bearer {key}".encode()
        client = "127.0.0.1"
        await authenticator.authenticate(header, client)  # the first miss: Argon2, Redis record written
        shared: dict[str, Service | list[int]] = {
            "postgres": loadgen.pids_named("postgres"),
            "redis": loadgen.pids_named("redis-server"),
        }

        # Cache hits.
        for _ in range(2000):
            await authenticator.authenticate(header, client)
        calls_before = authenticator.argon2_calls
        wall = time.perf_counter()
        cpu = time.process_time()
        for _ in range(args.hits):
            await authenticator.authenticate(header, client)
        hit_cpu = (time.process_time() - cpu) / args.hits * 1e6
        hit_wall = (time.perf_counter() - wall) / args.hits * 1e6
        assert authenticator.argon2_calls == calls_before, "a cache hit ran Argon2"

        async def nothing() -> None:
            return None

        cpu = time.process_time()
        for _ in range(args.hits):
            await nothing()
        await_floor = (time.process_time() - cpu) / args.hits * 1e6
        secret = b"bench-secret-not-for-production"
        cpu = time.process_time()
        for _ in range(args.hits):
            hmac.digest(secret, key.encode(), "sha256")
        hmac_us = (time.process_time() - cpu) / args.hits * 1e6

        # Misses proven by the Redis record.
        async def timed_misses(count: int, before_each: Any) -> tuple[float, float, float, dict[str, float]]:
            walls: list[float] = []
            cpus = 0.0
            sampler = loadgen.CpuSampler(shared)
            busy = 0.0
            for _ in range(count):
                await before_each()
                start_cpu, start = time.process_time(), time.perf_counter()
                await authenticator.authenticate(header, client)
                walls.append(time.perf_counter() - start)
                cpus += time.process_time() - start_cpu
                busy += walls[-1]
            share = sampler.stop()
            elapsed = time.perf_counter() - sampler.wall
            # /proc counts CPU in 10 ms ticks: below 5 ticks in total the figure means nothing.
            servers = {
                name: value * elapsed / count * 1e6 if value * elapsed >= 0.05 else float("nan")
                for name, value in share.others.items()
            }
            return statistics.median(walls) * 1e3, loadgen.percentile(walls, 99) * 1e3, cpus / count * 1e6, servers

        async def clear_cache() -> None:
            authenticator.clear()

        prefix = keys.prefix_of(key)
        redis_record = f"{store.redis_prefix}auth:{prefix}"

        async def clear_cache_and_proof() -> None:
            authenticator.clear()
            await redis.delete(redis_record)

        argon_before = authenticator.argon2_calls
        redis_miss = await timed_misses(args.redis_misses, clear_cache)
        assert authenticator.argon2_calls == argon_before, "a miss with a Redis record ran Argon2"
        argon_miss = await timed_misses(args.argon2_misses, clear_cache_and_proof)
        argon_calls = authenticator.argon2_calls - argon_before

        # Argon2id alone, for scale.
        stored = await store.pool.fetchval("SELECT secret_hash FROM api_keys WHERE prefix = $1", prefix)
        cpu = time.process_time()
        for _ in range(3):
            keys.verify(stored, key)
        argon_alone = (time.process_time() - cpu) / 3 * 1e3

        lines.append("## A. authenticate(), in-process")
        lines.append(
            "method: neuronetz.auth.Authenticator on the bench database and Redis (listener running), this process "
            f"on CPU 0; hits: {args.hits:,} sequential awaited calls after 2,000 warm-up, time.process_time; misses: "
            "cache cleared before each call (and the Redis proof deleted for Argon2), process CPU (all threads) "
            "and wall per call; Postgres/Redis CPU = their processes' CPU over the loop / calls (shared services: "
            "includes anyone else's load)"
        )
        rows = [
            ["cache hit", f"{hit_cpu:.1f} us", f"{hit_wall:.1f} us", "-", "-",
             f"includes ~{await_floor:.1f} us for awaiting a coroutine; HMAC-SHA256 alone {hmac_us:.1f} us"],
            ["miss, Redis proof", f"{redis_miss[2]:.0f} us", f"{redis_miss[0]:.2f} ms (p99 {redis_miss[1]:.2f})",
             _us(redis_miss[3]["postgres"]), _us(redis_miss[3]["redis"]),
             f"Postgres fetch (key + tenant) + Redis HGET; {args.redis_misses} calls, 0 Argon2"],
            ["miss, Argon2", f"{argon_miss[2] / 1000:.1f} ms", f"{argon_miss[0]:.1f} ms (p99 {argon_miss[1]:.1f})",
             _us(argon_miss[3]["postgres"]), _us(argon_miss[3]["redis"]),
             f"+ Argon2id in the auth thread + Redis HSET/EXPIRE; {args.argon2_misses} calls, {argon_calls} Argon2; "
             f"keys.verify alone {argon_alone:.1f} ms CPU"],
        ]  # fmt: skip
        lines.append(
            loadgen.table(["path", "CPU per call", "wall per call (p50)", "Postgres CPU", "Redis CPU", "notes"], rows)
        )
        lines.append("")
    finally:
        await authenticator.stop()
        await redis.aclose()
    return lines, hit_cpu


def _us(value: float) -> str:
    return "< 5 ticks" if value != value else f"{value:.0f} us"


# --- B. no-op route vs /healthz -------------------------------------------------------------


NOOP = "/bench/noop (key)"
HEALTHZ = "/healthz (public)"
DIAGNOSTICS = (
    ("noaudit", "/bench/noop, no audit row (diagnostic)"),
    ("norecord", "/bench/noop, no _record at all (diagnostic)"),
)


async def routes(store: loadgen.BenchStore, key: str, args: argparse.Namespace) -> tuple[list[str], float, float]:
    """(lines, no-op / healthz, no-op without recording / healthz)."""
    lines: list[str] = []
    with loadgen.services() as started:
        emulator = loadgen.start_emulator()  # /readyz and the health checks want a backend
        started.append(emulator)
        env = loadgen.gateway_env(store.database_url, store.redis_prefix, emulator.url)
        server = loadgen.start_granian_app("tests.bench.noop_app:app", env, name="noop-app")
        started.append(server)
        shared: dict[str, Service | list[int]] = {
            "postgres": loadgen.pids_named("postgres"), "redis": loadgen.pids_named("redis-server"),
        }  # fmt: skip
        targets: dict[str, tuple[Service, bytes]] = {
            NOOP: (server, loadgen.http_request("GET", server.port, "/bench/noop", key=key)),
            HEALTHZ: (server, loadgen.http_request("GET", server.port, "/healthz")),
        }
        if not args.no_diagnostics:
            for variant, label in DIAGNOSTICS:
                extra = loadgen.start_granian_app(
                    "tests.bench.noop_app:app", {**env, "NZBENCH_PROXY": variant}, name=f"noop-{variant}"
                )
                started.append(extra)
                targets[label] = (extra, loadgen.http_request("GET", extra.port, "/bench/noop", key=key))
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        runs: dict[str, list[Run]] = {name: [] for name in targets}
        singles = {name: await loadgen.connect(target.port, 1) for name, (target, _) in targets.items()}
        for name, (_, request) in targets.items():
            await loadgen.closed_loop(singles[name], request, 0, requests=1000)
        for index in range(5):
            for name, (_, request) in list(targets.items())[:: 1 if index % 2 == 0 else -1]:
                got = await loadgen.closed_loop(singles[name], request, 0, requests=400)
                latencies[name].extend(got.latencies)
        for group in singles.values():
            loadgen.close_all(group)
        for index in range(args.repeat):
            for name, (target, request) in list(targets.items())[:: 1 if index % 2 == 0 else -1]:
                connections = await loadgen.connect(target.port, 32)
                await loadgen.closed_loop(connections, request, 0.5)
                got = await loadgen.closed_loop(
                    connections, request, args.seconds, sample={"gateway": target, **shared}
                )  # fmt: skip
                loadgen.close_all(connections)
                if got.errors or got.lost:
                    raise RuntimeError(f"{name}: {got.errors} errors {got.statuses}, {got.lost} lost")
                runs[name].append(got)
                await asyncio.sleep(0.3)
    lines.append("## B. Authenticated no-op route vs /healthz, one Granian worker")
    lines.append(
        "method: tests/bench/noop_app.py under `python -m granian --interface asgi --loop uvloop --http 1 --workers 1` "
        "on CPU 1 (load generator on CPU 0; Redis and Postgres float); GET requests, answers `{}` (2 B) and "
        '`{"status":"ok"}` (15 B); c=1: 5 interleaved rounds x 400 after 1,000 warm-up; c=32: closed loop, 0.5 s '
        f"warm-up + {args.seconds:g} s, {args.repeat} interleaved repeats, median run shown; /bench/noop runs the "
        "pipeline of an authenticated request (auth cache hit, then App._record: metrics, log call, audit row), "
        "/healthz skips both; the diagnostic rows are the same route on servers whose copy of app.py skips the "
        "audit row / all of App._record (NZBENCH_PROXY=noaudit / norecord): they price the recording, not a proposal"
    )
    rows = []
    medians = {name: sorted(group, key=lambda r: r.rps)[len(group) // 2] for name, group in runs.items()}
    rates = {name: statistics.median(r.rps for r in group) for name, group in runs.items()}
    for name in targets:
        got = medians[name]
        assert got.cpu is not None
        per = {
            group: got.cpu.others[group] * got.seconds / len(got.latencies) * 1e6 for group in ("gateway", "postgres")
        }
        rows.append([
            name, loadgen.ms(loadgen.median(latencies[name])), loadgen.ms(loadgen.percentile(latencies[name], 99)),
            f"{rates[name]:,.0f}", f"{rates[name] / rates[HEALTHZ]:.0%}", loadgen.ms(loadgen.median(got.latencies)),
            f"{per['gateway']:.0f}", f"{per['postgres']:.0f}", got.cpu.describe(),
        ])  # fmt: skip
    header = ["route", "p50 c=1", "p99 c=1", "req/s c=32", "of /healthz", "p50 c=32", "gateway CPU us/req",
              "Postgres CPU us/req", "CPU (share of one core, median run)"]  # fmt: skip
    lines.append(loadgen.table(header, rows))
    rig = medians[HEALTHZ].cpu
    assert rig is not None
    lines.append(
        f"rig check: load generator at {rig.loadgen:.0%} of CPU 0 on /healthz "
        f"({'RIG-BOUND: above 70 %' if rig.loadgen > 0.7 else 'not saturated'})"
    )
    auth_only = rates.get(DIAGNOSTICS[1][1], float("nan")) / rates[HEALTHZ]
    return lines, rates[NOOP] / rates[HEALTHZ], auth_only


async def run(args: argparse.Namespace) -> int:
    loadgen.raise_nofile()
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    async with loadgen.bench_store("auth") as store:
        key = await loadgen.make_key(store, "bench")
        section_a, hit = await in_process(store, key, args)
        print("  in-process done; no-op route vs /healthz", file=sys.stderr, flush=True)
        section_b, ratio, auth_only = await routes(store, key, args)
    summary = [
        ["auth CPU per request, cache hit", f"{hit:.1f} us", f"< {TARGET_HIT_US:g} us",
         loadgen.verdict(hit < TARGET_HIT_US)],
        ["req/s authenticated no-op / /healthz (c=32)", f"{ratio:.1%}", f">= {TARGET_RATIO:.0%}",
         loadgen.verdict(ratio >= TARGET_RATIO)],
        ["  same without App._record (auth alone; diagnostic)", f"{auth_only:.1%}", f"(>= {TARGET_RATIO:.0%})",
         "n/a" if auth_only != auth_only else loadgen.verdict(auth_only >= TARGET_RATIO)],
    ]  # fmt: skip
    loadgen.report("authentication (issue 3)", summary, f"placement: {loadgen.placement()}",
                   "\n".join(section_a), "\n".join(section_b))  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
