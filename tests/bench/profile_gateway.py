"""Where a proxied request's CPU goes, by component: the README's breakdown table.

    .venv/bin/python tests/bench/profile_gateway.py [--seconds 10] [--rate 250]

The rig of bench_gateway.py (emulator and this load generator on CPU 0, one Granian worker on
CPU 1, `POST /api/chat` with a key without limits, or with `--limits` every limit set, c=32) while two things are read:

* each thread of the worker from /proc (utime + stime): the event-loop thread, which runs all
  Python code, and Granian's Rust runtime threads, which read requests off the sockets and
  write answers (the py-spy samples below cannot see inside them);
* `py-spy record --native` of the event-loop thread: every sample is charged to the module of
  its innermost neuronetz frame (see `classify`), so library and C code (redis-py, asyncpg,
  orjson, uvloop's socket calls) counts for the code that called it.

Each component's share of the samples times the loop thread's CPU per request gives its
microseconds per request. py-spy stops the worker briefly for each sample; at the default
250 Hz that costs a few percent of its throughput, so the absolute figures are those of
bench_gateway.py, the split is this script's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.bench_limits import ON_KEY_AND_TENANT

# A sample is charged to the module of its innermost neuronetz frame (MODULES), so library and
# C code (redis-py, asyncpg, orjson, uvloop's socket calls) counts for the code that called
# it; frames leafward of that one that are the garbage collector or a call into Granian's
# Rust side (ASGI receive/send) are charged to those instead. Stacks without a neuronetz
# frame fall to OUTSIDE. Idle waits (epoll) are dropped; waits for the GIL counted apart.
MODULES = {
    "logs": "log line",
    "metrics": "metrics",
    "audit": "audit rows (queue, batched COPY)",
    "journal": "crash journal (Redis XADD per loop turn)",
    "budgets": "usage settlement, ledger",
    "usage": "usage settlement, ledger",
    "auth": "authentication",
    "keys": "authentication",
    "limits": "admission (limits, slots)",
    "slots": "admission (limits, slots)",
    "backends": "backend choice, health checks",
    "transport": "transport (HTTP/1.1 to the backend)",
    "h1": "transport (HTTP/1.1 to the backend)",
    "relay": "relay (answer back to the client)",
    "proxy": "relay (answer back to the client)",
    "dialects": "relay (answer back to the client)",
    "http": "request parsing, routing, body",
    "router": "request parsing, routing, body",
    "llm_tokens": "request parsing, routing, body",
    "tasks": "background tasks (supervisor, timers)",
    "worker": "background tasks (supervisor, timers)",
    "app": "pipeline (app.py: handle, inference, _forward)",
}
STARTUP = frozenset({"__main__", "cli", "server"})  # below every stack of the worker: not a component
APP_RECORDING = re.compile(r"^(App\._record|App\._model_label|App\._count) ")
NEURONETZ = re.compile(r"\(neuronetz/(\w+)\.py:")
GC = re.compile(r"gc_collect|collect_generations|\(gcmodule\.c")
GRANIAN = re.compile(r"_granian\.")
IDLE = re.compile(r"^(epoll_pwait|epoll_wait) ")
GIL_WAIT = re.compile(r"pthread_cond_(timed)?wait|take_gil")
OUTSIDE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ASGI calls into Granian (receive, send: waking its runtime thread)", re.compile(r"granian/|_granian")),
    ("event loop, tasks, futures (uvloop, asyncio)", re.compile(r"asyncio/|uvloop|\(loop\.c|libuv|\(core\.c")),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments("CPU per proxied request, by component (py-spy + /proc per thread).", repeat=1)
    add = parser.add_argument
    add("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    add("--concurrency", type=int, default=32, help="connections (default 32)")
    add("--keep", type=Path, help="also write py-spy's raw stacks to this file")
    add("--limits", action="store_true",
        help="a key whose key and tenant set every limit and budget (bench_limits.py's), not one without")  # fmt: skip
    parser.set_defaults(seconds=10.0)
    return parser.parse_args(argv)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid`, by thread name (threads of one name summed)."""
    found: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        label = "event loop (Python)" if int(tid) == pid else f"thread {name}"
        found[label] = found.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / loadgen.TICKS
    return found


def classify(stack: str) -> str | None:
    """The component of one sample's stack ("a;b;c", root first), None for an idle one."""
    frames = stack.split(";")
    if IDLE.match(frames[-1]):
        return None
    if any(GIL_WAIT.search(frame) for frame in frames[-3:]):
        return "(waiting for the GIL: not CPU)"
    for frame in reversed(frames):
        if GC.search(frame):
            return "garbage collector"
        if GRANIAN.search(frame):
            return OUTSIDE[0][0]
        found = NEURONETZ.search(frame)
        if found and found.group(1) not in STARTUP:
            if found.group(1) == "app" and APP_RECORDING.match(frame):
                return "recording (audit record, timestamps)"
            return MODULES.get(found.group(1), f"neuronetz/{found.group(1)}.py")
    for component, pattern in OUTSIDE:
        if any(pattern.search(frame) for frame in frames):
            return component
    return "other (interpreter, unattributed)"


LOOP_THREAD = "_run_module_as_main ("


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


async def run(args: argparse.Namespace) -> int:
    spy = py_spy()
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    async with loadgen.bench_store("prof") as store:
        key = await loadgen.make_key(store, "bench", **(ON_KEY_AND_TENANT if args.limits else {}))
        with loadgen.services() as started:
            _, gateway = loadgen.start_rig(started, store.database_url, store.redis_prefix)
            worker = gateway.tree()[1]
            request = loadgen.http_request("POST", gateway.port, "/api/chat", loadgen.CHAT_BODY, key)
            connections = await loadgen.connect(gateway.port, args.concurrency)
            try:
                await loadgen.closed_loop(connections, request, 0, requests=3000)  # warm-up: caches, pools
                # Unprofiled first: the CPU per request and its split over the worker's threads.
                threads_before = thread_cpu(worker)
                plain = await loadgen.closed_loop(connections, request, args.seconds, sample={"gateway": gateway})
                threads = {k: v - threads_before.get(k, 0.0) for k, v in thread_cpu(worker).items()}
                with tempfile.TemporaryDirectory(prefix="nzbench-profile-") as scratch:
                    raw = Path(scratch) / "stacks.txt"
                    spying = await asyncio.create_subprocess_exec(
                        spy, "record", "--native", "--format", "raw", "--rate", str(args.rate), "--duration",
                        str(round(args.seconds)), "--pid", str(worker), "--output", str(raw),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )  # fmt: skip
                    await asyncio.sleep(0.5)
                    profiled = await loadgen.closed_loop(connections, request, args.seconds - 1.0)
                    _, errors = await spying.communicate()
                    stacks = read(raw, args.keep)
            finally:
                loadgen.close_all(connections)
    if not stacks.strip():
        raise SystemExit(f"py-spy recorded nothing: {errors.decode(errors='replace')[-2000:]}")
    samples: Counter[str] = Counter()
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        # The event-loop thread only: the worker's main thread, forked from Granian's, whose
        # stacks start in runpy. The other threads' samples are mostly waits py-spy cannot
        # tell from work (a Rust thread in a futex, the Argon2 pool in a queue get).
        component = classify(stack) if LOOP_THREAD in stack else None
        if component is not None:
            samples[component] += int(count)
    waiting = samples.pop("(waiting for the GIL: not CPU)", 0)
    total = sum(samples.values())
    requests = len(plain.latencies)
    assert plain.cpu is not None
    per_request = plain.cpu.others["gateway"] * plain.seconds / requests * 1e6
    loop_us = threads.get("event loop (Python)", 0.0) / requests * 1e6
    which = "key and tenant with every limit and budget" if args.limits else "key without limits"
    print(f"\n# Where a proxied request's CPU goes (c={args.concurrency}, POST /api/chat, {which})\n")
    print(f"unprofiled: {plain.rps:,.0f} req/s, gateway CPU {per_request:.0f} us per request ({plain.cpu.describe()})")
    print(f"profiled ({args.rate} Hz, py-spy --native): {profiled.rps:,.0f} req/s, {total} samples\n")
    rows = [[name, f"{seconds / requests * 1e6:.0f} us"] for name, seconds in sorted(threads.items())]
    print("## Worker threads (/proc, unprofiled run)")
    print(loadgen.table(["thread", "CPU per request"], rows))
    print("\n## The event-loop thread by component (py-spy samples x its CPU per request)")
    rows = [[name, f"{n / total:.1%}", f"{n / total * loop_us:.0f} us"] for name, n in samples.most_common()]
    print(loadgen.table(["component", "share of samples", "per request"], rows))
    print(f"(and {waiting} samples of the loop thread waiting for the GIL, left out: not CPU)")
    return 0


def read(raw: Path, keep: Path | None) -> str:
    stacks = raw.read_text() if raw.exists() else ""
    if keep is not None:
        keep.write_text(stacks)
    return stacks


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
