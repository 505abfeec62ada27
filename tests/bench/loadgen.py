"""The rig shared by the gateway benchmarks: processes, pinning, a bench database, the load
generator and CPU/RSS sampling. Not a benchmark itself (no `bench_` prefix).

The load generator is deliberately cheaper than the thing it measures (README, Benchmarks,
"The rig"): raw asyncio protocols on uvloop, one keep-alive HTTP/1.1 connection per concurrent
client, request bytes built once, and a parser that reads only the status line,
Content-Length or chunked framing, and where the first body line ends (the first token of
an NDJSON stream). Closed loop: each connection sends its next request from the callback
that completed the previous one, so no task or future is created per request.

Placement (two cores): the emulator and this process on CPU 0, the gateway on CPU 1;
Redis and Postgres are shared services and float over both CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
CHAT_BODY = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":false}'
STREAM_BODY = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":true}'
LOADGEN_CPU = 0
GATEWAY_CPU = 1
TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- placement ------------------------------------------------------------------------------


# Decided once, before this process pins itself (after that its own affinity is one CPU).
_CAN_PIN = shutil.which("taskset") is not None and {LOADGEN_CPU, GATEWAY_CPU} <= os.sched_getaffinity(0)


def can_pin() -> bool:
    return _CAN_PIN


def pin_self(cpu: int) -> None:
    if can_pin():
        os.sched_setaffinity(0, {cpu})


def pinned(cpu: int | str, command: list[str]) -> list[str]:
    """`command` run on `cpu` (a number, or a taskset list such as "0,1")."""
    return ["taskset", "-c", str(cpu), *command] if can_pin() else command


SHARED_SERVICES = "Redis and Postgres not pinned (they float over both CPUs)"
# A server a benchmark starts itself inherits the CPU of the load generator that starts it.
OWN_SERVICES = f"the benchmark's own Redis and Postgres on CPU {LOADGEN_CPU} too"


def placement(services: str = SHARED_SERVICES) -> str:
    if not can_pin():
        return "NOT pinned (needs taskset and CPUs 0 and 1): read the numbers as indicative only"
    return (
        f"emulator + load generator on CPU {LOADGEN_CPU}, gateway (Granian main + worker) on CPU {GATEWAY_CPU}; "
        + services
    )


def raise_nofile(wanted: int = 65536) -> int:
    """Raise the open-file limit of this process (and of the children it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes ------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[int]:
        return process_tree(self.process.pid)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.tree()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _logfile(name: str) -> Path:
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"nzbench-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    return directory / f"{name}.log"


def start_emulator(*options: str, cpu: int = LOADGEN_CPU) -> Service:
    """`python -m tests.emulator` on a free port, pinned to `cpu`; its URL is its first line."""
    log = _logfile("emulator")
    command = pinned(cpu, [PYTHON, "-m", "tests.emulator", "--host", "127.0.0.1", "--port", "0", "--no-record",
                           *options])  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("wb"))
    assert process.stdout is not None
    url = process.stdout.readline().decode().strip()
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"The emulator did not start: {log.read_text(errors='replace')[-2000:]}")
    return Service("emulator", process, url, int(url.rsplit(":", 1)[1]), log)


def start_server(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    cpu: int | str = GATEWAY_CPU,
    timeout: float = 60.0,
    cwd: Path = ROOT,
) -> Service:
    """A server process pinned to `cpu`, ready once its /healthz answers 200."""
    log = _logfile(name)
    with log.open("ab") as sink:
        process = subprocess.Popen(pinned(cpu, command), cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    service = Service(name, process, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{service.tail()}")
        try:
            with urllib.request.urlopen(f"{service.url}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return service
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"{name} did not answer /healthz within {timeout} s:\n{service.tail()}")


def gateway_env(database_url: str, redis_prefix: str, backend: str, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GATEWAY_", "OLLAMA_", "REDIS_", "DATABASE_", "NEURONETZ_"))
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        REDIS_KEY_PREFIX=redis_prefix,
        OLLAMA_BACKENDS=backend,
        GATEWAY_SECRET="bench-secret-not-for-production",
        GATEWAY_LOG_LEVEL="warning",
        GATEWAY_MIGRATE_ON_START="false",
    )
    env.update(extra)
    return env


def start_rig(started: list[Service], database_url: str, redis_prefix: str, **extra: str) -> tuple[Service, Service]:
    """The emulator and one gateway in front of it, both added to `started` (see `services`)."""
    emulator = start_emulator()
    started.append(emulator)
    gateway = start_gateway(gateway_env(database_url, redis_prefix, emulator.url, **extra))
    started.append(gateway)
    return emulator, gateway


def start_gateway(
    env: dict[str, str], name: str = "gateway", workers: int = 1, cpu: int | str = GATEWAY_CPU, source: Path = ROOT
) -> Service:
    """`python -m neuronetz serve`, one Granian worker, as shipped; `source` is the tree whose
    neuronetz/ runs (another checkout, e.g. an earlier commit's, for before/after figures)."""
    port = free_port()
    command = [PYTHON, "-m", "neuronetz", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers)]
    if source != ROOT:  # `-m` finds the package in the working directory first; forked workers inherit it
        env = {**env, "PYTHONPATH": str(source)}
    return start_server(name, command, env, port, cpu=cpu, cwd=source)


def export_tree(ref: str, directory: Path) -> Path:
    """The files of git `ref` (a commit, branch or tag of this repository) written to `directory`."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def start_granian_app(target: str, env: dict[str, str], name: str) -> Service:
    """An ASGI module of ours (tests/bench/noop_app.py) under Granian with the serve flags that matter."""
    port = free_port()
    command = [PYTHON, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--http", "1", "--no-ws",
               "--workers", "1", "--host", "127.0.0.1", "--port", str(port), "--backlog", "2048", target]  # fmt: skip
    return start_server(name, command, env, port)


# --- /proc sampling -------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total


def core_busy() -> list[float]:
    """Busy jiffies per CPU (everything but idle and iowait), for per-core utilisation."""
    busy = []
    with open("/proc/stat", "rb") as handle:
        for line in handle:
            if line.startswith(b"cpu") and line[3:4].isdigit():
                values = [int(v) for v in line.split()[1:]]
                busy.append((sum(values) - values[3] - values[4]) / TICKS)
    return busy


@dataclass
class CpuShare:
    """CPU used over one measured interval, as a fraction of one core."""

    loadgen: float
    others: dict[str, float]
    cores: list[float]

    def describe(self) -> str:
        parts = [f"loadgen {self.loadgen:.0%}"]
        parts += [f"{name} {share:.0%}" for name, share in self.others.items()]
        cores = " ".join(f"{share:.0%}" for share in self.cores)
        return ", ".join(parts) + f"; other load {self.unaccounted:.0%}; cores busy {cores}"

    @property
    def unaccounted(self) -> float:
        """Busy CPU not spent by anything sampled: other people's processes on a shared box."""
        return max(0.0, sum(self.cores) - self.loadgen - sum(self.others.values()))


class CpuSampler:
    """Snapshot at start, difference at stop: this process, the named process groups, the cores.
    A group is a Service (its process tree, taken at the start) or a list of pids."""

    def __init__(self, groups: dict[str, Service | list[int]]) -> None:
        self.trees = {name: group.tree() if isinstance(group, Service) else group for name, group in groups.items()}
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.theirs = {name: cpu_seconds(pids) for name, pids in self.trees.items()}
        self.cores = core_busy()

    def stop(self) -> CpuShare:
        wall = time.perf_counter() - self.wall
        return CpuShare(
            (time.process_time() - self.own) / wall,
            {name: (cpu_seconds(pids) - self.theirs[name]) / wall for name, pids in self.trees.items()},
            [(after - before) / wall for before, after in zip(self.cores, core_busy(), strict=True)],
        )


def pids_named(*names: str) -> list[int]:
    """Every process whose command name is one of `names` (redis-server, postgres): shared
    services we only read about in /proc, never touch."""
    wanted = {name.encode()[:15] for name in names}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as handle:
                    if handle.read().strip() in wanted:
                        found.append(int(entry))
            except OSError:
                continue
    return found


# --- the bench database and Redis prefix ------------------------------------------------------


@dataclass
class BenchStore:
    database_url: str
    redis_url: str
    redis_prefix: str
    pool: Any  # asyncpg.Pool: kept loose so this module imports without the gateway's stubs


def _base_database_url() -> str:
    return os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.asynccontextmanager
async def bench_store(name: str) -> AsyncIterator[BenchStore]:
    """A fresh database with the schema and a Redis key prefix of our own; both removed after."""
    import asyncpg
    import redis.asyncio as aioredis

    from neuronetz import migrate

    base = _base_database_url()
    database = f"nzbench_{name}_{os.getpid()}"
    url = base.rsplit("/", 1)[0] + "/" + database
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"nzbench:{name}:{os.getpid()}:"
    await migrate.migrate(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        yield BenchStore(url, redis_url, prefix, pool)
    finally:
        await pool.close()
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        client = aioredis.Redis.from_url(redis_url)
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=prefix.replace("{", "\\{") + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await client.delete(*batch)
                    batch = []
            if batch:
                await client.delete(*batch)
        finally:
            await client.aclose()


async def make_key(store: BenchStore, tenant: str, **limits: int) -> str:
    """A tenant (with `t_`-prefixed limits) and one key in it (with the other limits)."""
    from neuronetz import tenants
    from neuronetz.limits import Limits

    tenant_limits = Limits(**{name[2:]: value for name, value in limits.items() if name.startswith("t_")})
    key_limits = Limits(**{name: value for name, value in limits.items() if not name.startswith("t_")})
    created = await tenants.create_tenant(store.pool, tenant, tenant_limits)
    _, key = await tenants.create_key(store.pool, tenant, "bench", limits=key_limits)
    if tenant_limits.has_budget or key_limits.has_budget:
        await _budgets_ready(store, created.id)
    return key


async def _budgets_ready(store: BenchStore, tenant_id: int) -> None:
    """Build a new budgeted tenant's counters now, as its first request would after the rebuild
    wait (503 until then: a fresh Redis prefix looks like a Redis that just lost its data)."""
    from neuronetz.budgets import Ledger
    from neuronetz.limits import Limiter
    from neuronetz.worker import redis_client

    client = redis_client(store.redis_url)
    limiter = Limiter(client, Ledger(store.pool), prefix=store.redis_prefix, lease_ttl=60, default_cap=1, min_output=1)
    try:
        await limiter.rebuild(tenant_id, wait=0.0)
    finally:
        await limiter.stop()
        await client.aclose()


# --- HTTP/1.1 requests and the client protocol -------------------------------------------------


def http_request(
    method: str, port: int, path: str, body: bytes = b"", key: str | None = None, key_header: str = "authorization"
) -> bytes:
    """`key_header` "x-api-key" sends the key the way Anthropic clients (Claude Code) do, with
    the `anthropic-version` header they always add; otherwise it goes as a Bearer token."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if key is not None and key_header == "x-api-key":
        head += f"x-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n"
    elif key is not None:
        head += f"Authorization: Bearer {key}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(6)


class Connection(asyncio.Protocol):
    """One keep-alive client connection that runs exchanges one after another.

    For every response it records the send time, the time the first body line was complete
    (for NDJSON: the first token), optionally the time of every later line, and the end
    time; then it calls `on_done(self)`, which may call `send()` again at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = _HEAD
        self.remaining = 0
        self.status = 0
        self.sent_at = 0.0
        self.first_line_at = 0.0
        self.line_times: list[float] | None = None  # set to a list to record every line
        self.body_bytes = 0
        self.on_done: Callable[[Connection], None] = _ignore
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        if self.sent_at:
            self.status = -1
            self.sent_at = 0.0
            self.on_done(self)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.status = 0
        self.first_line_at = 0.0
        self.body_bytes = 0
        if self.line_times is not None:
            self.line_times = []
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _body(self, data: bytes | bytearray) -> None:
        self.body_bytes += len(data)
        if b"\n" in data:
            now = time.perf_counter()
            if not self.first_line_at:
                self.first_line_at = now
            if self.line_times is not None:
                self.line_times.extend([now] * data.count(b"\n"))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while buffer:
            state = self.state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.status = int(buffer[9:12])
                head = bytes(buffer[:end]).lower()
                del buffer[: end + 4]
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.state = _CHUNK_SIZE
                    continue
                start = head.find(b"\r\ncontent-length:")
                self.remaining = int(head[start + 17 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
                self.state = _BODY
                if self.remaining == 0:
                    self._complete()
            elif state in (_BODY, _CHUNK_DATA):
                take = min(self.remaining, len(buffer))
                self._body(buffer[:take] if take < len(buffer) else buffer)
                del buffer[:take]
                self.remaining -= take
                if self.remaining == 0:
                    if state == _BODY:
                        self._complete()
                    else:
                        self.state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                del buffer[: end + 2]
                self.remaining = size
                self.state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self.state = _CHUNK_SIZE
            else:  # _TRAILER: no trailers expected, just the empty line
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._complete()
        return

    def _complete(self) -> None:
        self.state = _HEAD
        self.on_done(self)


def _ignore(connection: Connection) -> None:
    return None


async def connect(port: int, count: int, batch: int = 200) -> list[Connection]:
    """`count` connections to 127.0.0.1:port, opened `batch` at a time (a 1,000-connection
    burst would overflow a small accept backlog)."""
    loop = asyncio.get_running_loop()
    connections: list[Connection] = []
    while len(connections) < count:
        todo = min(batch, count - len(connections))
        opened = await asyncio.gather(
            *(loop.create_connection(Connection, "127.0.0.1", port) for _ in range(todo))
        )  # fmt: skip
        connections.extend(protocol for _, protocol in opened)
    return connections


def close_all(connections: Sequence[Connection]) -> None:
    for connection in connections:
        connection.close()


async def warm_until_served(port: int, request: bytes, then: int, seconds: float = 20.0) -> None:
    """Send `request` until the gateway answers 200 (a budgeted tenant's first requests get
    503 while its counters are rebuilt from the ledger), then `then` more."""
    connections = await connect(port, 1)
    deadline = time.monotonic() + seconds
    try:
        while (got := await closed_loop(connections, request, 0, requests=1)).errors or got.lost:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway still refuses after {seconds:g} s: {got.statuses}")
            await asyncio.sleep(0.3)
        await closed_loop(connections, request, 0, requests=then)
    finally:
        close_all(connections)


# --- driving load ---------------------------------------------------------------------------


@dataclass
class Run:
    """One closed-loop run: completed exchanges, their latencies (s) and the errors."""

    seconds: float
    latencies: list[float]
    errors: int  # non-2xx answers
    lost: int  # connections that broke (discarded, not gateway errors: see §8)
    cpu: CpuShare | None = None
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def closed_loop(
    connections: Sequence[Connection],
    request: bytes,
    seconds: float,
    sample: dict[str, Service | list[int]] | None = None,
    requests: int | None = None,
) -> Run:
    """Every connection sends `request` back to back for `seconds` (or until `requests`
    answers in total); latencies of the answers that completed in time are kept."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limit = requests if requests is not None else 1 << 62
    issued = errors = lost = 0
    active = 0
    started = time.perf_counter()
    deadline = started + seconds if requests is None else float("inf")

    def done(connection: Connection) -> None:
        nonlocal active, errors, lost, issued
        now = time.perf_counter()
        status = connection.status
        if status < 0:
            lost += 1
        else:
            latencies.append(now - connection.sent_at)
            if not 200 <= status < 300:
                errors += 1
                statuses[status] = statuses.get(status, 0) + 1
        connection.sent_at = 0.0
        if status >= 0 and now < deadline and issued < limit:
            issued += 1
            connection.send(request)
            return
        active -= 1
        if active == 0 and not finished.done():
            finished.set_result(None)

    sampler = CpuSampler(sample) if sample is not None else None
    for connection in connections:
        if connection.lost or issued >= limit:
            continue
        connection.on_done = done
        issued += 1
        active += 1
        connection.send(request)
    if active:
        await finished
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.on_done = _ignore
    return Run(elapsed, latencies, errors, lost, sampler.stop() if sampler else None, statuses)


@dataclass
class Stream:
    status: int
    ttft: float  # send to first complete body line (s)
    total: float  # send to end of the answer (s)
    gaps: list[float]  # between successive lines (s)


async def streams(
    connections: Sequence[Connection], request: bytes, each: int = 1, record_lines: bool = True, spread: float = 0.0
) -> list[Stream]:
    """Every connection runs `each` streaming exchanges back to back; one Stream per exchange.
    `spread` > 0 staggers the first sends evenly over that many seconds (steady arrivals
    instead of one synchronised burst)."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    results: list[Stream] = []
    left = {id(c): each for c in connections}
    active = len(connections)

    def done(connection: Connection) -> None:
        nonlocal active
        now = time.perf_counter()
        lines = connection.line_times or []
        gaps = [b - a for a, b in itertools.pairwise(lines)]
        first = connection.first_line_at - connection.sent_at if connection.first_line_at else float("nan")
        results.append(Stream(connection.status, first, now - connection.sent_at, gaps))
        connection.sent_at = 0.0
        left[id(connection)] -= 1
        if connection.status >= 0 and left[id(connection)] > 0:
            connection.send(request)
            return
        active -= 1
        if active == 0 and not finished.done():
            finished.set_result(None)

    for index, connection in enumerate(connections):
        connection.line_times = [] if record_lines else None
        connection.on_done = done
        if spread > 0:
            loop.call_later(spread * index / len(connections), connection.send, request)
        else:
            connection.send(request)
    await finished
    for connection in connections:
        connection.on_done = _ignore
        connection.line_times = None
    return results


# --- statistics and printing ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(cell).ljust(w) for cell, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def arguments(description: str, repeat: int) -> argparse.ArgumentParser:
    """A benchmark's command line with the options every one of them has."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Needs Postgres (BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres) and "
        "Redis (REDIS_URL, default redis://127.0.0.1:6379/0); creates its own database and key prefix and "
        "removes both at the end.",
    )
    add = parser.add_argument
    add("--seconds", type=float, default=3.0, help="measured seconds of each throughput run (default 3)")
    add("--repeat", type=int, default=repeat, help=f"repeats of each throughput run; median shown (default {repeat})")
    return parser


def report(title: str, summary: Sequence[Sequence[str]], *sections: str) -> None:
    """Print a benchmark's report: its title, the summary table against the targets, then
    each section's tables and method lines."""
    print(f"\n# neuronetz-gateway benchmark: {title}\n")
    print("## Summary")
    print(table(["figure", "measured", "target", "verdict"], summary))
    for section in sections:
        print("")
        print(section)


def run_main(run: Callable[[Any], Coroutine[Any, Any, int]], args: Any) -> int:
    with uvloop_runner() as runner:
        code: int = runner.run(run(args))
        return code


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def uvloop_runner() -> asyncio.Runner:
    import uvloop

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


@contextlib.contextmanager
def services() -> Iterator[list[Service]]:
    """Collects started services and stops them all on the way out, whatever happened."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()
