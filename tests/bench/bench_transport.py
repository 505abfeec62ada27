"""Benchmark: what each httpx transport costs per request against a local Ollama stand-in.

    python3 build.py bench transport         (or: .venv/bin/python tests/bench/bench_transport.py --help)

The backend is a tiny asyncio server in a separate process that answers every request with
a ~1.4 KB JSON body, like a non-streaming `POST /api/chat`, on keep-alive connections. When
`taskset` exists and there are two CPUs, the server runs on CPU 0 and this client on CPU 1, so
the client's CPU time (`time.process_time`) excludes the server. Both sides run on uvloop.

Columns, each the median of --repeat runs:
  CPU us/req  process CPU time over --requests sequential requests, divided by their number
  p50 us      median wall time of one of those sequential requests (server included)
  req/s c=32  requests completed per second by 32 concurrent tasks over --seconds

Not collected by pytest (no test_ prefix); it prints numbers and asserts only that every
answer is a 200 with the full body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from neuronetz.transport import Transport

PAYLOAD = b'{"model":"llama3.2","messages":[{"role":"user","content":"Say hello."}],"stream":false}'
ANSWER = (
    b'{"model":"llama3.2","created_at":"2026-11-26T10:00:00.000000000Z","message":{"role":"assistant",'
    b'"content":"Hello! How can I help you today?"},"done_reason":"stop","done":true,'
    b'"total_duration":412345678,"load_duration":12345678,"prompt_eval_count":26,'
    b'"prompt_eval_duration":123456789,"eval_count":8,"eval_duration":234567890,"context":['
    + b",".join(b"%d" % (128000 + i) for i in range(140))
    + b"]}"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 GMT\r\nContent-Length: %d\r\n\r\n%b" % (len(ANSWER), ANSWER)
)
TIMEOUT = httpx.Timeout(10.0)
CONCURRENCY = 32

Send = Callable[[], Awaitable[None]]


class _Upstream(asyncio.Protocol):
    """Answer each request (head plus Content-Length body) with RESPONSE, keeping the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.transport.write(RESPONSE)


async def serve() -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_backend(pinned: bool) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, __file__, "--serve"]
    if pinned:
        command = ["taskset", "-c", "0", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}/api/chat"


def check(status: int, body: bytes) -> None:
    if status != 200 or len(body) != len(ANSWER):
        raise RuntimeError(f"Unexpected answer from the backend: {status}, {len(body)} bytes.")


def via_client(client: httpx.AsyncClient, url: str) -> Send:
    """A request as the gateway makes it: build, send with stream=True, read, close."""

    async def send() -> None:
        response = await client.send(client.build_request("POST", url, content=PAYLOAD), stream=True)
        check(response.status_code, await response.aread())
        await response.aclose()

    return send


def direct(transport: Transport, url: str) -> Send:
    """The transport alone: one prebuilt request, the body read from the response stream."""
    request = httpx.Request("POST", url, content=PAYLOAD, extensions={"timeout": TIMEOUT.as_dict()})

    async def send() -> None:
        response = await transport.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        check(response.status_code, b"".join([chunk async for chunk in response.stream]))
        await response.stream.aclose()

    return send


class _Raw(asyncio.Protocol):
    """The floor: a bare keep-alive request/response on one asyncio connection, no httpx at all."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = bytearray()
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= len(RESPONSE) and self.done is not None:
            check(200 if self.buffer.startswith(b"HTTP/1.1 200") else 0, bytes(self.buffer[-len(ANSWER) :]))
            self.buffer.clear()
            self.done.set_result(None)

    async def send(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)
        await self.done


async def raw_floor(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """One connection per concurrent task, handed out round-robin (each task holds its own)."""
    port = int(url.split(":")[2].split("/")[0])
    request = b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%b" % (len(PAYLOAD), PAYLOAD)
    loop = asyncio.get_running_loop()
    idle: list[_Raw] = []
    for _ in range(CONCURRENCY):
        _, protocol = await loop.create_connection(lambda: _Raw(request), "127.0.0.1", port)
        idle.append(protocol)

    async def send() -> None:
        connection = idle.pop()
        try:
            await connection.send()
        finally:
            idle.append(connection)

    async def close() -> None:
        for connection in idle:
            connection.transport.close()

    return send, close


async def measure(send: Send, requests: int, seconds: float) -> tuple[float, float, float]:
    """(CPU us per request, p50 wall us, requests per second at c=32) for one variant."""
    for _ in range(300):  # warm up: connections open, caches filled
        await send()
    latencies = []
    cpu_start = time.process_time()
    for _ in range(requests):
        start = time.perf_counter()
        await send()
        latencies.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu_start) / requests

    completed = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            await send()
            completed += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return cpu * 1e6, statistics.median(latencies) * 1e6, completed / (time.perf_counter() - started)


async def run(
    url: str, requests: int, seconds: float, repeat: int
) -> list[tuple[str, list[tuple[float, float, float]]]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    variants: list[tuple[str, Callable[[], Awaitable[tuple[Send, Callable[[], Awaitable[None]]]]]]] = []

    def client_variant(name: str, make: Callable[[], httpx.AsyncBaseTransport | None]) -> None:
        async def setup() -> tuple[Send, Callable[[], Awaitable[None]]]:
            transport = make()
            client = httpx.AsyncClient(transport=transport, limits=limits, timeout=TIMEOUT, trust_env=False)
            return via_client(client, url), client.aclose

        variants.append((name, setup))

    async def direct_setup() -> tuple[Send, Callable[[], Awaitable[None]]]:
        transport = Transport()
        return direct(transport, url), transport.aclose

    async def raw_setup() -> tuple[Send, Callable[[], Awaitable[None]]]:
        return await raw_floor(url)

    client_variant("httpx, default transport (httpcore)", lambda: None)
    client_variant("httpx + AiohttpTransport", lambda: AiohttpTransport(limits=limits, trust_env=False))
    client_variant("httpx + Transport, send(stream=True)", Transport)
    variants.append(("Transport.handle_async_request", direct_setup))
    variants.append(("floor: bare asyncio keep-alive, no httpx", raw_setup))

    results = []
    for name, setup in variants:
        runs = []
        for _ in range(repeat):
            send, close = await setup()
            runs.append(await measure(send, requests, seconds))
            await close()
        results.append((name, runs))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per run (CPU, p50)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each c=32 run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is shown")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
        return 0

    pinned = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2
    if pinned:
        os.sched_setaffinity(0, {1})  # the client on CPU 1; the backend gets CPU 0 below
    process, url = start_backend(pinned)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(url, args.requests, args.seconds, args.repeat))
    finally:
        process.terminate()
        process.wait()

    placement = "server on CPU 0, client on CPU 1" if pinned else "not pinned (no taskset or one CPU)"
    print(
        f"\n{len(RESPONSE)}-byte answers, {args.requests} sequential requests, c=32 for {args.seconds} s, {placement}"
    )
    print(f"median of {args.repeat} runs; Python {sys.version.split()[0]}, httpx {httpx.__version__}, uvloop\n")
    print(f"| {'variant':<46} | {'CPU us/req':>10} | {'p50 us':>7} | {'req/s c=32':>10} |")
    print(f"|{'-' * 48}|{'-' * 11}:|{'-' * 8}:|{'-' * 11}:|")
    for name, runs in results:
        cpu, p50, rps = (statistics.median(run[i] for run in runs) for i in range(3))
        print(f"| {name:<46} | {cpu:>10.0f} | {p50:>7.0f} | {rps:>10.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
