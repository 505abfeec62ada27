"""Benchmark (issue 12): what a hostile backend's huge answers cost the gateway's worker.

    python3 build.py bench bounds          (or: .venv/bin/python tests/bench/bench_bounds.py --help)

What it starts, all on 127.0.0.1: a bench database and Redis key prefix of its own (both
removed at the end), a scripted backend (tests/broken_backend.py, on a thread of this process)
and `python -m neuronetz serve --workers 1` with a key that has no limits. This process is the
client; it reads every answer as fast as it comes and keeps none of it.

Figures, each next to its target:
  1. RSS growth of the gateway's process tree while one non-streaming answer of --body-mb MB
     (300) passes through, sampled every 10 ms: the peak minus the level before (settings as
     shipped: the first 16 MiB are kept to read the usage, then let go);
  2. CPU seconds of the gateway's process tree for one native stream whose second line is
     --line-mb MB (30) long, and the same for one SSE event, with GATEWAY_MAX_RECORD_BYTES
     raised above it so the whole record is searched, parsed and forwarded (the worst case);
     quadratic buffering (a `tail + chunk` per 64 KiB chunk) took 7.7 s here.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.broken_backend import Answer, BrokenBackend, native_chunk, native_done

TARGET_RSS_MB = 50.0
TARGET_LINE_CPU_S = 0.5
CHUNK = 64 * 1024
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> Any:
    parser = loadgen.arguments("RSS for a huge backend body and CPU for a huge line, through the gateway.", repeat=3)
    parser.add_argument("--body-mb", type=int, default=300, help="size of the non-streaming answer (default 300)")
    parser.add_argument("--line-mb", type=int, default=30, help="length of the long stream record (default 30)")
    return parser.parse_args(argv)


def pieces(total: int) -> Iterator[bytes]:
    piece = b"y" * CHUNK
    for _ in range(total // CHUNK):
        yield piece


def answer_for(body_mb: int, line_mb: int) -> Any:
    def answer(path: str, body: dict[str, Any]) -> Answer:
        kind = body.get("prompt")
        if kind == "small":
            return Answer(chunks=[native_done()])
        if kind == "body":
            return Answer(chunks=[b'{"response":"', *pieces(body_mb * MB), b'","done":true,"eval_count":1}'])
        if kind == "line":
            long_line = [b'{"response":"', *pieces(line_mb * MB), b'","done":false}\n']
            return Answer(content_type=b"application/x-ndjson",
                          chunks=[native_chunk() + b"\n", *long_line, native_done() + b"\n"])  # fmt: skip
        long_event = [b'data: {"choices":[{"index":0,"delta":{"content":"', *pieces(line_mb * MB), b'"}}]}\n\n']
        return Answer(content_type=b"text/event-stream", chunks=[*long_event, b"data: [DONE]\n\n"])

    return answer


async def drain(client: httpx.AsyncClient, url: str, path: str, key: str, prompt: str) -> int:
    body = {"model": "tiny", "prompt": prompt, "stream": prompt in ("line", "event")}
    size = 0
    async with client.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200, response.status_code
        async for chunk in response.aiter_raw():
            size += len(chunk)
    return size


async def peak_rss_growth(service: loadgen.Service, work: Any) -> tuple[float, int]:
    """(peak RSS growth in MB while `work` runs, what `work` returned)."""
    pids = service.tree()
    before = loadgen.rss_kb(pids)
    peak = before
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, loadgen.rss_kb(pids))
        await asyncio.sleep(0.01)
    return (peak - before) / 1024, await task


async def cpu_of(service: loadgen.Service, work: Any) -> tuple[float, int]:
    pids = service.tree()
    before = loadgen.cpu_seconds(pids)
    result = await work
    return loadgen.cpu_seconds(pids) - before, result


async def run(args: Any) -> int:
    async with loadgen.bench_store("bounds") as store:
        key = await loadgen.make_key(store, "bounds")
        rss, cpu_ndjson, cpu_sse = [], [], []
        with BrokenBackend(answer_for(args.body_mb, args.line_mb)) as backend, loadgen.services() as started:
            # As shipped (GATEWAY_MAX_RECORD_BYTES at its default) for the memory figure, on a
            # gateway of its own: the long records below would leave freed heap to grow into.
            env = loadgen.gateway_env(store.database_url, store.redis_prefix, backend.url)
            gateway = loadgen.start_gateway(env)
            started.append(gateway)
            async with httpx.AsyncClient(timeout=600) as client:
                await drain(client, gateway.url, "/api/generate", key, "small")  # warm up, with small answers
                for _ in range(args.repeat):
                    body = drain(client, gateway.url, "/api/generate", key, "body")
                    growth, size = await peak_rss_growth(gateway, body)
                    assert size >= args.body_mb * MB, size
                    rss.append(growth)
            gateway.stop()
            env["GATEWAY_MAX_RECORD_BYTES"] = str((args.line_mb + 8) * MB)
            gateway = loadgen.start_gateway(env, "gateway-long-records")
            started.append(gateway)
            async with httpx.AsyncClient(timeout=600) as client:
                await drain(client, gateway.url, "/api/generate", key, "small")
                for _ in range(args.repeat):
                    seconds, size = await cpu_of(gateway, drain(client, gateway.url, "/api/generate", key, "line"))
                    assert size >= args.line_mb * MB, size
                    cpu_ndjson.append(seconds)
                    seconds, size = await cpu_of(gateway, drain(client, gateway.url, "/v1/completions", key, "event"))
                    assert size >= args.line_mb * MB, size
                    cpu_sse.append(seconds)
    worst_rss, worst_ndjson, worst_sse = max(rss), max(cpu_ndjson), max(cpu_sse)
    summary = [
        [f"worker RSS growth, {args.body_mb} MB body", f"{worst_rss:.1f} MB", f"<= {TARGET_RSS_MB:.0f} MB",
         loadgen.verdict(worst_rss <= TARGET_RSS_MB)],
        [f"worker CPU, {args.line_mb} MB NDJSON line", f"{worst_ndjson:.2f} s", f"<= {TARGET_LINE_CPU_S} s",
         loadgen.verdict(worst_ndjson <= TARGET_LINE_CPU_S)],
        [f"worker CPU, {args.line_mb} MB SSE event", f"{worst_sse:.2f} s", f"<= {TARGET_LINE_CPU_S} s",
         loadgen.verdict(worst_sse <= TARGET_LINE_CPU_S)],
    ]  # fmt: skip
    runs = loadgen.table(
        ["run", "RSS growth MB", "NDJSON line CPU s", "SSE event CPU s"],
        [
            [str(i + 1), f"{r:.1f}", f"{n:.2f}", f"{s:.2f}"]
            for i, (r, n, s) in enumerate(zip(rss, cpu_ndjson, cpu_sse, strict=True))
        ],
    )
    method = (f"Each figure is the worst of {args.repeat} runs; CPU is utime + stime of the gateway's process tree "
              "from /proc; RSS is the tree's resident set, sampled every 10 ms.")  # fmt: skip
    loadgen.report("bounded backend answers", summary, "## Runs\n" + runs, method)
    return 0 if worst_rss <= TARGET_RSS_MB and max(worst_ndjson, worst_sse) <= TARGET_LINE_CPU_S else 1


if __name__ == "__main__":
    sys.exit(loadgen.run_main(run, parse_args()))
