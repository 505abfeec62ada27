"""Instructions per proxied request, counted by Valgrind: a figure the load on a shared
machine does not move, for comparing two versions of the request pipeline.

    .venv/bin/python tests/bench/count_request.py            (runs callgrind twice, prints the figure)
    .venv/bin/python tests/bench/count_request.py --drive N  (the driver alone, no Valgrind: N requests,
                                                              their latency and the garbage collector's pauses)

The driver opens a real `Worker` in this process (Postgres, Redis, the emulator as the backend,
a key without limits, as in bench_gateway.py) and calls the ASGI app directly with the scope,
receive and send Granian would give it, `POST /api/chat` after `POST /api/chat`, one at a
time, each in a task of its own as Granian runs them. Granian's Rust side is not counted, the
driver's few lines are (the same for every version). The periodic background work (metrics
snapshot, ledger and audit timers, journal heartbeat, health checks) is put off (QUIET): it
runs by the clock, and under Valgrind's fifty-fold slowdown it would be counted fifty times
over; what a request queues (its audit row, its journal entry) is still written, by the
writers' size triggers or at the end, and counted.

The figure: (instructions of a run of --many requests - those of a run of --few) / (many - few),
so start-up and imports cancel out; the garbage collector is off while counting. `--profile
FILE` writes the callgrind output of the larger run for callgrind_annotate. `--against REF`
counts git REF's neuronetz/ as well (before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.bench_limits import ON_KEY_AND_TENANT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Instructions per proxied request (Valgrind callgrind).")
    add = parser.add_argument
    add("--few", type=int, default=300, help="requests of the smaller run (default 300)")
    add("--many", type=int, default=1300, help="requests of the larger run (default 1300)")
    add("--drive", type=int, metavar="N", help="internal: run the driver for N requests")
    add("--backend", help="internal: the emulator's URL")
    add("--database-url", help="internal")
    add("--redis-prefix", help="internal")
    add("--key", help="internal")
    add("--profile", type=Path, help="keep the larger run's callgrind.out here")
    add("--against", metavar="REF", help="also count git REF's neuronetz/ (before/after)")
    add("--limits", action="store_true", help="a key and tenant with every limit and budget set (bench_limits.py's)")
    add("--source", type=Path, help="internal: the tree whose neuronetz/ the driver runs")
    return parser.parse_args(argv)


# Clock-driven work put off for the count: (module, constant) of each interval. app.WATCH_AFTER
# too: the disconnect watcher starts only for requests still running after 50 ms, which under
# Valgrind is every request, and on a real machine almost none.
QUIET = (("audit", "FLUSH_INTERVAL"), ("budgets", "LEDGER_INTERVAL"), ("journal", "HEARTBEAT_INTERVAL"),
         ("journal", "REPLAY_INTERVAL"), ("worker", "METRICS_INTERVAL"), ("worker", "ENV_POLL_INTERVAL"),
         ("app", "WATCH_AFTER"))  # fmt: skip


async def drive(count: int, backend: str, database_url: str, redis_prefix: str, key: str) -> None:
    import importlib

    from neuronetz import app, config
    from neuronetz.worker import Worker

    for module, name in QUIET:
        target = importlib.import_module(f"neuronetz.{module}")
        if hasattr(target, name):  # an older version may not have it
            setattr(target, name, 1e6)
    environ = loadgen.gateway_env(database_url, redis_prefix, backend, GATEWAY_HEALTH_INTERVAL="3600")
    worker = await Worker.open(config.load(None, environ=environ))
    application = app.App()
    application.attach(worker)
    # What the lifespan does after attaching (when the version measured has it).
    freeze = getattr(app, "freeze_startup_objects", None)
    if freeze is not None and not os.environ.get("NZBENCH_NO_FREEZE"):
        freeze()
    # Off while counting: a full collection (hundreds of millions of instructions in a process
    # that has not frozen its start-up objects) lands in one run or the other by chance. Its
    # pauses are measured without Valgrind (`--drive`, gc lines).
    if os.environ.get("NZBENCH_COUNTING"):
        gc.disable()
    length = str(len(loadgen.CHAT_BODY)).encode()
    headers = [(b"host", b"gateway"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode()), (b"content-length", length)]  # fmt: skip
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    statuses: dict[int, int] = {}

    async def one() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/api/chat", "raw_path": b"/api/chat", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": loadgen.CHAT_BODY, "more_body": False}
            return await asyncio.shield(never)  # the client stays: disconnect watchers wait

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await application(scope, receive, send)

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    began = 0.0

    def timed(phase: str, info: dict[str, int]) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - began)

    latencies = []
    gc.callbacks.append(timed)
    try:
        for _ in range(count):
            start = time.perf_counter()
            await asyncio.create_task(one())
            latencies.append(time.perf_counter() - start)
        await asyncio.sleep(1.5)  # one round of the once-a-second background work, for both runs
    finally:
        gc.callbacks.remove(timed)
        await worker.close()
    if statuses != {200: count}:
        raise SystemExit(f"not every request answered 200: {statuses}")
    latencies.sort()
    print(f"{count} requests in process: p50 {latencies[count // 2] * 1e3:.3f} ms, "
          f"p99 {latencies[int(count * 0.99)] * 1e3:.3f} ms, max {latencies[-1] * 1e3:.3f} ms")  # fmt: skip
    for generation, spent in pauses.items():
        if spent:
            print(f"  gc generation {generation}: {len(spent)} collections ({len(spent) / count:.3f} per request), "
                  f"{sum(spent) * 1e3:.1f} ms in all, longest {max(spent) * 1e3:.2f} ms")  # fmt: skip


def compile_tree(tree: Path) -> None:
    """Byte-compile `tree`'s neuronetz/ first, or the first run would count the compiler (an
    exported tree has no .pyc files)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "neuronetz")], check=True)


def warm_up(common: list[str]) -> None:
    """One request first, uncounted: the key's first verification runs Argon2id (a few hundred
    million instructions) and leaves a proof in Redis that every later run uses; counted, it
    would land in whichever run came first."""
    subprocess.run([sys.executable, __file__, "--drive", "1", *common], check=True, capture_output=True)


def callgrind(args: argparse.Namespace, count: int, out: Path, common: list[str], source: Path | None = None) -> int:
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
               "--drive", str(count), *common, *(["--source", str(source)] if source else [])]  # fmt: skip
    env = {**os.environ, "NZBENCH_COUNTING": "1"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"valgrind failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(found.group(1))


async def run(args: argparse.Namespace) -> int:
    async with loadgen.bench_store("count") as store:
        key = await loadgen.make_key(store, "bench", **(ON_KEY_AND_TENANT if args.limits else {}))
        with loadgen.services() as started:
            emulator = loadgen.start_emulator()
            started.append(emulator)
            common = ["--backend", emulator.url, "--database-url", store.database_url,
                      "--redis-prefix", store.redis_prefix, "--key", key]  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="nzbench-count-") as scratch:
                versions: list[tuple[str, Path | None]] = [("this tree", None)]
                if args.against:
                    tree = Path(scratch) / "against"
                    tree.mkdir()
                    versions.insert(0, (args.against, loadgen.export_tree(args.against, tree)))
                warm_up(common)
                for name, source in versions:
                    compile_tree(source or loadgen.ROOT)
                    began = time.monotonic()
                    few = callgrind(args, args.few, Path(scratch) / "few.out", common, source)
                    many_out = args.profile if args.profile and source is None else Path(scratch) / "many.out"
                    many = callgrind(args, args.many, many_out, common, source)
                    per_request = (many - few) / (args.many - args.few)
                    print(f"{name}: instructions per proxied request (in-process ASGI driver, callgrind): "
                          f"{per_request:,.0f}")  # fmt: skip
                    print(f"  runs: {args.few} requests {few:,} instructions, {args.many} requests {many:,}; "
                          f"{time.monotonic() - began:.0f} s under Valgrind; load average {os.getloadavg()[0]:.1f}",
                          flush=True)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive is not None:
        return loadgen.run_main(_drive, args)
    return loadgen.run_main(run, args)


async def _drive(args: argparse.Namespace) -> int:
    if args.source is not None:  # that tree's neuronetz/, imported from here on (drive imports it)
        sys.path.insert(0, str(args.source))
    await drive(args.drive, args.backend, args.database_url, args.redis_prefix, args.key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
