"""Benchmark (issue 16): what one gateway request costs the shared services, Redis and Postgres.

    python3 build.py bench services        (or: .venv/bin/python tests/bench/bench_services.py --help)

A private redis-server and a private Postgres cluster (initdb + postgres with
pg_stat_statements preloaded), each on a free loopback port and removed at the end, so that
every counter read here is this gateway's alone even on a shared machine. One gateway
(`serve --workers 1`, audit on, prompt logging off) in front of the emulator; a closed loop of
non-streaming POST /api/chat at c=1 and c=16 for a key with every limit and budget set on key
and tenant (generous: nothing is refused) and for a key with none.

Per request, between a snapshot before the requests and one after the writers have flushed:
- Redis: commands (INFO commandstats), round trips (INFO stats total_reads_processed: one
  read event per pipeline or command the gateway sends), server CPU (INFO used_cpu_user +
  used_cpu_sys) and the commands' own time (commandstats usec).
- Postgres: statements and their execution time (pg_stat_statements), CPU of every process
  of the private cluster (/proc), WAL bytes (pg_current_wal_lsn) and table bytes (size of
  the ledger and audit tables).
The carrying capacity printed is 1 s of one core divided by the CPU per request: Redis runs
commands on one core; Postgres gets one core per busy connection, so the figure is per core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen

# Generous: nothing is refused at a few thousand requests per second for minutes. Each request
# reserves its prompt estimate + GATEWAY_DEFAULT_MAX_TOKENS (1,024) until it settles. (tpm: the
# column is an integer.)
EVERY_LIMIT = {
    "rpm": 100_000_000, "tpm": 2_000_000_000, "max_concurrent": 100_000,
    "daily_tokens": 10**15, "monthly_tokens": 10**15, "total_tokens": 10**15,
}  # fmt: skip
WRITER_TABLES = ("usage_daily", "request_log", "journal_progress")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000, help="requests per measured run (default 3000)")
    return parser.parse_args(argv)


# --- private servers ------------------------------------------------------------------------------


def _wait(ready: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout} s")


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    import redis

    directory = tempfile.mkdtemp(prefix="nzbench-redis-")
    port = loadgen.free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: redis.Redis(port=port).ping(), "the private redis-server")
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.terminate()
        process.wait(15)
        shutil.rmtree(directory, ignore_errors=True)


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError("no Postgres server binaries under /usr/lib/postgresql (apt-get install postgresql)")
    return versions[-1].parent


@contextlib.contextmanager
def private_postgres() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """initdb + postgres in a temporary directory; run as the `postgres` user when we are
    root (Postgres refuses to run as root)."""
    binaries = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="nzbench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = loadgen.free_port()
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True, timeout=120)  # fmt: skip
    process = subprocess.Popen(
        [*as_user, str(binaries / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1", "-c", "shared_preload_libraries=pg_stat_statements",
         "-c", "pg_stat_statements.track=all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    ready = [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    try:
        _wait(lambda: subprocess.run(ready, check=False).returncode == 0, "the private Postgres")
        yield url, process
    finally:
        # A fast shutdown, sent to the postmaster itself (runuser in between need not pass it on).
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((root / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            for pid in reversed(loadgen.process_tree(process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


# --- snapshots ---------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    redis_cpu: float  # s
    redis_reads: int
    redis_commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    pg_cpu: float  # s, every process of the private cluster, living or reaped
    wal: int  # bytes
    table_bytes: int
    audited: int
    ledgered: int


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and every process below it now, including what the children they
    have already reaped used (cutime + cstime): backends of closed connections count too."""
    total = 0
    for pid in loadgen.process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


async def snapshot(redis: Any, pg: Any, postgres: int) -> Snapshot:
    cpu = await redis.info("cpu")
    stats = await redis.info("stats")
    commands = await redis.info("commandstats")
    return Snapshot(
        cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        stats["total_reads_processed"],
        {name.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for name, v in commands.items()},
        tree_cpu(postgres),
        await pg.fetchval("SELECT (pg_current_wal_lsn() - '0/0')::bigint"),
        await pg.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c WHERE c.relkind IN ('r', 'p') AND "
            "(c.relname = ANY($1) OR c.relname LIKE 'request_log%')",
            list(WRITER_TABLES),
        ),
        await pg.fetchval("SELECT count(*) FROM request_log"),
        await pg.fetchval("SELECT coalesce(sum(requests), 0) FROM usage_daily"),
    )


async def statements(pg: Any) -> tuple[int, float, list[tuple[str, int, float]]]:
    """Statements the gateway ran since the last reset: total calls, total ms, top 5."""
    rows = await pg.fetch(
        "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() AND s.query NOT LIKE '%pg_stat%' "
        "AND s.query NOT LIKE '%pg_current_wal_lsn%' AND s.query NOT LIKE '%pg_total_relation_size%' "
        "AND s.query NOT LIKE 'SELECT count(*) FROM request_log%' "
        "AND s.query NOT LIKE 'SELECT coalesce(sum(requests)%' "
        "ORDER BY s.total_exec_time DESC"
    )
    top = [(" ".join(r["query"].split())[:70], r["calls"], r["total_exec_time"]) for r in rows[:5]]
    return sum(r["calls"] for r in rows), sum(r["total_exec_time"] for r in rows), top


# --- one measured run ------------------------------------------------------------------------------------


async def measure(
    port: int, request: bytes, concurrency: int, n: int, redis: Any, pg: Any, postgres: int
) -> dict[str, Any]:
    await redis.config_resetstat()
    await pg.execute("SELECT pg_stat_statements_reset()")
    before = await snapshot(redis, pg, postgres)
    connections = await loadgen.connect(port, concurrency)
    started = time.perf_counter()
    try:
        got = await loadgen.closed_loop(connections, request, 0, requests=n)
    finally:
        loadgen.close_all(connections)
    elapsed = time.perf_counter() - started
    if got.errors or got.lost:
        raise RuntimeError(f"{got.errors} errors {got.statuses}, {got.lost} lost")
    # The audit writer and the ledger write in batches (at least once a second): wait for both.
    deadline = time.monotonic() + 30
    while True:
        after = await snapshot(redis, pg, postgres)
        if after.audited - before.audited >= n and after.ledgered - before.ledgered >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the audit records or the ledger did not arrive within 30 s")
        await asyncio.sleep(0.2)
    calls, ms, top = await statements(pg)
    # CONFIG RESETSTAT zeroed the command counters; INFO is this benchmark's own.
    commands = {name: value for name, value in after.redis_commands.items() if name not in ("info", "config|resetstat")}
    return {
        "rps": n / elapsed,
        "redis_cpu_us": (after.redis_cpu - before.redis_cpu) / n * 1e6,
        "redis_reads": (after.redis_reads - before.redis_reads) / n,
        "redis_commands": sum(c for c, _ in commands.values()) / n,
        # A script's commands are counted in commandstats twice: on their own and inside EVALSHA.
        "script_usec": commands.get("evalsha", (0, 0))[1] / max(commands.get("evalsha", (0, 0))[0], 1),
        "redis_by_command": {name: (c / n, u / max(c, 1)) for name, (c, u) in commands.items() if c},
        "pg_cpu_us": (after.pg_cpu - before.pg_cpu) / n * 1e6,
        "pg_statements": calls / n,
        "pg_exec_us": ms * 1000 / n,
        "wal_bytes": (after.wal - before.wal) / n,
        "table_bytes": (after.table_bytes - before.table_bytes) / n,
        "top": top,
        "seconds": elapsed,
    }


async def run(args: argparse.Namespace) -> int:
    import asyncpg
    import redis.asyncio as aioredis

    from neuronetz import migrate, tenants
    from neuronetz.limits import Limits

    loadgen.raise_nofile()
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with private_redis() as (redis_url, redis_process), private_postgres() as (pg_admin_url, pg_process):
        database_url = pg_admin_url.rsplit("/", 1)[0] + "/neuronetz"
        await migrate.migrate(database_url)
        pg = await asyncpg.connect(database_url)
        redis = aioredis.Redis.from_url(redis_url)
        try:
            await pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            keys = {}
            for label, limits in (("every limit", EVERY_LIMIT), ("no limits", {})):
                tenant = label.replace(" ", "-")
                await tenants.create_tenant(pg, tenant, Limits(**limits))
                keys[label] = (await tenants.create_key(pg, tenant, "bench", limits=Limits(**limits)))[1]
            with loadgen.services() as started:
                _, gateway = loadgen.start_rig(started, database_url, "nzbench:services:", REDIS_URL=redis_url)
                for label, key in keys.items():
                    request = loadgen.http_request("POST", gateway.port, "/api/chat", loadgen.CHAT_BODY, key)
                    await loadgen.warm_until_served(gateway.port, request, then=500)
                    for concurrency in (1, 16):
                        print(f"  {label}, c={concurrency}", file=sys.stderr, flush=True)
                        results[label, concurrency] = await measure(
                            gateway.port, request, concurrency, args.requests, redis, pg, pg_process.pid
                        )
        finally:
            await redis.aclose()
            await pg.close()
        del redis_process
    report(results, args)
    return 0


def report(results: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace) -> None:
    rows = []
    for (label, concurrency), r in results.items():
        rows.append([
            label, str(concurrency), f"{r['rps']:,.0f}", f"{r['redis_reads']:.2f}", f"{r['redis_commands']:.2f}",
            f"{r['script_usec']:.0f}", f"{r['redis_cpu_us']:.0f}", f"{r['pg_statements']:.3f}",
            f"{r['pg_exec_us']:.1f}", f"{r['pg_cpu_us']:.0f}", f"{r['wal_bytes']:,.0f}", f"{r['table_bytes']:,.0f}",
        ])  # fmt: skip
    busiest = results["every limit", 16]
    redis_capacity = 1e6 / max(busiest["redis_cpu_us"], 1e-9)
    pg_capacity = 1e6 / max(busiest["pg_cpu_us"], 1e-9)
    wal_mb = busiest["wal_bytes"] * 1000 / 1e6
    summary = [
        ["Redis round trips per request, every limit, c=16", f"{busiest['redis_reads']:.2f}", "n/a", "n/a"],
        ["Redis CPU per request, every limit, c=16", f"{busiest['redis_cpu_us']:.0f} us", "n/a", "n/a"],
        ["Postgres CPU per request (audit + ledger), c=16", f"{busiest['pg_cpu_us']:.0f} us", "n/a", "n/a"],
        ["requests/s one Redis core carries, every limit", f"~{redis_capacity:,.0f}", "n/a", "n/a"],
        ["requests/s per Postgres core, audit + ledger", f"~{pg_capacity:,.0f}", "n/a", "n/a"],
        ["WAL per 1,000 requests/s", f"{wal_mb:.1f} MB/s", "n/a", "n/a"],
    ]  # fmt: skip
    by_command = ", ".join(
        f"{name} {calls:.2f}x {usec:.0f} us"
        for name, (calls, usec) in sorted(busiest["redis_by_command"].items(), key=lambda item: -item[1][0])
    )
    top = "\n".join(
        f"  {calls / args.requests:.3f}/req {ms * 1000 / args.requests:.1f} us/req  {query}"
        for query, calls, ms in busiest["top"]
    )
    loadgen.report(
        "what a request costs Redis and Postgres (issue 16)",
        summary,
        f"placement: {loadgen.placement(loadgen.OWN_SERVICES)} (private servers of this run: nobody else's load in "
        "their counters)",
        "\n".join(
            [
                "## Per request",
                "method: one gateway (serve --workers 1, audit on, prompt logging off) in front of the emulator; "
                f"non-streaming POST /api/chat, closed loop of {args.requests:,} requests after 500 warm-up; counters "
                "read before and after (after the writers flushed). Round trips = Redis read events "
                "(total_reads_processed); Redis CPU = used_cpu_user + used_cpu_sys of the private redis-server; "
                "us per EVALSHA = commandstats usec (wall time inside Redis, the script's commands included); "
                "Postgres CPU = /proc CPU of every process of the private cluster "
                "(backends, WAL writer, checkpointer, autovacuum); statements and exec time = pg_stat_statements; "
                "WAL = pg_current_wal_lsn; table bytes = growth of usage_daily, request_log*, journal_progress",
                loadgen.table(
                    [
                        "key",
                        "c",
                        "req/s",
                        "Redis round trips",
                        "Redis commands",
                        "us per EVALSHA",
                        "Redis CPU us",
                        "PG statements",
                        "PG exec us",
                        "PG CPU us",
                        "WAL bytes",
                        "table bytes",
                    ],
                    rows,
                ),
                "",
                f"Redis commands per request, every limit, c=16 (calls per request, us per call): {by_command}",
                "Postgres statements, every limit, c=16 (most time first):",
                top,
            ]
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
