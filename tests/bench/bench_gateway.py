"""Benchmark (issue 4): the Ollama emulator directly vs through the gateway, in one run.

    python3 build.py bench gateway          (or: .venv/bin/python tests/bench/bench_gateway.py --help)

What it starts, all on 127.0.0.1: a bench database and Redis key prefix of its own (both
removed at the end), the emulator (`python -m tests.emulator`) and `python -m neuronetz serve
--workers 1` with a key that has no limits (authentication on, no Redis round trip per
request, audit rows written in batches). Placement (README, Benchmarks, "The rig"): the emulator and
this process, which is the load generator (tests/bench/loadgen.py: raw asyncio protocols on
uvloop, keep-alive, prebuilt request bytes, closed loop), on CPU 0; the gateway on CPU 1;
Redis and Postgres are shared and float.

Figures, each next to its target:
  1. added latency p50/p99 at c=1: gateway minus direct, interleaved rounds;
  2. requests/s at c=32 and c=256, gateway and direct (the direct figure is the rig's ceiling);
  3. time to first token of streams, gateway minus direct, at c=1 (interleaved) and c=64;
  4. worker scaling: req/s at c=32 with `--workers 2` on both CPUs (sharing CPU 0 with the
     emulator and the load generator) next to one worker on CPU 1;
  5. RSS of the gateway's process tree per concurrent slow stream (1,000 streams of 10 s).

`--against REF` adds a gateway built from git REF (e.g. `--against HEAD` while trying an
uncommitted change, or the previous release) to figures 1-3, interleaved with the others:
before/after figures from one run, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.loadgen import Run, Service

TARGET_P50_MS = 1.0
TARGET_P99_MS = 2.0
TARGET_RATIO = 0.40
TARGET_TTFT_MS = 1.5
TARGET_STREAM_KB = 300.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments(
        "Emulator directly vs through the gateway: added latency, req/s, TTFT, memory per stream.",
        repeat=2,
    )
    add = parser.add_argument
    add("--rounds", type=int, default=10, help="interleaved rounds for the c=1 latency (default 10)")
    add("--per-round", type=int, default=200, help="sequential requests per target per round (default 200)")
    add("--streams", type=int, default=1000, help="concurrent slow streams for the memory figure (default 1000)")
    add("--stream-seconds", type=float, default=10.0, help="length of each slow stream (default 10)")
    add("--no-memory", action="store_true", help="skip the memory figure")
    add("--no-info-log", action="store_true", help="skip the second gateway with GATEWAY_LOG_LEVEL=info")
    add("--no-scaling", action="store_true", help="skip the 2-worker figure")
    add("--against", metavar="REF", help="also measure a gateway built from git REF, interleaved (before/after)")
    return parser.parse_args(argv)


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    request: bytes
    sample: dict[str, Service | list[int]]


def configure_emulator(emulator: Service, **changes: float) -> None:
    request = urllib.request.Request(
        f"{emulator.url}/_emulator/config", data=json.dumps(changes).encode(), method="POST"
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as answer:
        answer.read()


def emulator_stats(emulator: Service) -> dict[str, int]:
    with urllib.request.urlopen(f"{emulator.url}/_emulator/stats", timeout=5) as answer:
        stats: dict[str, int] = json.loads(answer.read())
        return stats


def shared_services() -> dict[str, Service | list[int]]:
    return {"redis": loadgen.pids_named("redis-server"), "postgres": loadgen.pids_named("postgres")}


async def latency_rounds(
    targets: Sequence[Target], rounds: int, per_round: int, warmup: int = 200
) -> dict[str, list[list[float]]]:
    """c=1, one connection per target; each round runs `per_round` sequential requests on
    every target, the order rotating from round to round (noise hits every target alike)."""
    connections = {t.name: (await loadgen.connect(t.port, 1)) for t in targets}
    try:
        for target in targets:
            await loadgen.closed_loop(connections[target.name], target.request, 0, requests=warmup)
        samples: dict[str, list[list[float]]] = {t.name: [] for t in targets}
        for index in range(rounds):
            order = list(targets[index % len(targets) :]) + list(targets[: index % len(targets)])
            for target in order:
                run = await loadgen.closed_loop(connections[target.name], target.request, 0, requests=per_round)
                if run.errors or run.lost:
                    raise RuntimeError(f"{target.name}: {run.errors} errors {run.statuses}, {run.lost} lost")
                samples[target.name].append(run.latencies)
        return samples
    finally:
        for group in connections.values():
            loadgen.close_all(group)


async def throughput(
    targets: Sequence[Target], concurrency: int, seconds: float, repeat: int, warmup: float = 1.0
) -> dict[str, list[Run]]:
    """Closed loop at `concurrency` on each target in turn, `repeat` times, order rotating."""
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    for index in range(repeat):
        order = list(targets[index % len(targets) :]) + list(targets[: index % len(targets)])
        for target in order:
            connections = await loadgen.connect(target.port, concurrency)
            try:
                await loadgen.closed_loop(connections, target.request, warmup)
                runs[target.name].append(
                    await loadgen.closed_loop(connections, target.request, seconds, sample=target.sample)
                )
            finally:
                loadgen.close_all(connections)
            await asyncio.sleep(0.3)
    return runs


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.rps)[len(runs) // 2]


def cpu_us_per_request(run: Run, group: str) -> float:
    if run.cpu is None or not run.latencies:
        return float("nan")
    return run.cpu.others.get(group, float("nan")) * run.seconds / len(run.latencies) * 1e6


def round_stats(samples: list[list[float]]) -> tuple[float, float]:
    """(median of the round medians, p99 of all samples pooled)."""
    pooled = [value for one in samples for value in one]
    return statistics.median(loadgen.median(one) for one in samples), loadgen.percentile(pooled, 99)


def rig_check(gateway: Run, ceiling: float, loadgen_share: float) -> str:
    if gateway.rps >= 0.9 * ceiling:
        return f"RIG-BOUND: within 10 % of the rig's ceiling ({ceiling:,.0f} req/s); the gateway is not measured"
    if loadgen_share > 0.7:
        return "RIG-BOUND: the load generator used more than 70 % of its core"
    return f"gateway-bound ({gateway.rps / ceiling:.0%} of the rig's ceiling, load generator {loadgen_share:.0%})"


# --- the sections ---------------------------------------------------------------------------


async def rig_ceilings(direct: Target) -> tuple[Run, float]:
    """The emulator alone with the load generator moved to CPU 1 (the gateways idle there):
    the best of two 1.5 s runs at c=32, and the load generator's CPU us per request."""
    loadgen.pin_self(loadgen.GATEWAY_CPU)
    try:
        connections = await loadgen.connect(direct.port, 32)
        try:
            await loadgen.closed_loop(connections, direct.request, 0.5)
            runs = [await loadgen.closed_loop(connections, direct.request, 1.5, sample=direct.sample) for _ in "ab"]
        finally:
            loadgen.close_all(connections)
    finally:
        loadgen.pin_self(loadgen.LOADGEN_CPU)
    best = max(runs, key=lambda run: run.rps)
    assert best.cpu is not None
    return best, best.cpu.loadgen * best.seconds / len(best.latencies) * 1e6


async def ttft(
    emulator: Service, targets: Sequence[Target], rounds: int = 5, per_round: int = 8
) -> dict[str, dict[int, list[loadgen.Stream]]]:
    """Streams of 5 tokens, first token after 20 ms, then one every 20 ms: c=1 interleaved
    rounds, then c=64 (three streams per connection, staggered), each target in turn, twice."""
    configure_emulator(emulator, tokens=5, first_token_delay_ms=20, token_delay_ms=20)
    results: dict[str, dict[int, list[loadgen.Stream]]] = {t.name: {} for t in targets}
    try:
        singles = {t.name: await loadgen.connect(t.port, 1) for t in targets}
        for target in targets:  # warm-up
            await loadgen.streams(singles[target.name], target.request, each=2)
        for index in range(rounds):
            for target in targets if index % 2 == 0 else targets[::-1]:
                got = await loadgen.streams(singles[target.name], target.request, each=per_round)
                results[target.name].setdefault(1, []).extend(got)
        for group in singles.values():
            loadgen.close_all(group)
        for index in range(2):
            for target in targets if index % 2 == 0 else targets[::-1]:
                connections = await loadgen.connect(target.port, 64)
                got = await loadgen.streams(connections, target.request, each=3, spread=0.12)
                results[target.name].setdefault(64, []).extend(got)
                loadgen.close_all(connections)
    finally:
        configure_emulator(emulator, tokens=10, first_token_delay_ms=0, token_delay_ms=0)
    return results


@dataclass
class Memory:
    streams: int
    idle_kb: int
    connected_kb: int
    steady_kb: int
    peak_kb: int
    after_kb: int
    ok: int
    statuses: dict[int, int]
    all_concurrent: bool
    emulator_peak: int
    gateway_cpu: float
    seconds: float

    @property
    def per_stream_kb(self) -> float:
        return (self.steady_kb - self.idle_kb) / self.streams


async def memory(emulator: Service, env: dict[str, str], key: str, count: int, seconds: float) -> Memory:
    """A fresh gateway, warmed up; RSS of its process tree idle, with `count` idle keep-alive
    connections, and while `count` streams of `seconds` each run at once."""
    # The default pool (4096 connections per backend) holds 1,000 streams; more need more.
    env = {**env, "GATEWAY_BACKEND_MAX_CONNECTIONS": str(max(4096, 2 * count))}
    gateway = loadgen.start_gateway(env, name="gateway-memory")
    try:
        chat = loadgen.http_request("POST", gateway.port, "/api/chat", loadgen.CHAT_BODY, key)
        stream = loadgen.http_request("POST", gateway.port, "/api/chat", loadgen.STREAM_BODY, key)
        warm = await loadgen.connect(gateway.port, 16)
        await loadgen.closed_loop(warm, chat, 0, requests=2000)
        await loadgen.streams(warm, stream, each=4)
        loadgen.close_all(warm)
        await asyncio.sleep(1.5)
        tree = gateway.tree()
        idle = loadgen.rss_kb(tree)
        tokens = max(1, round(seconds / 0.2))
        configure_emulator(emulator, tokens=tokens, first_token_delay_ms=200, token_delay_ms=200)
        try:
            connections = await loadgen.connect(gateway.port, count)
            await asyncio.sleep(1.0)
            connected = loadgen.rss_kb(tree)
            before = loadgen.cpu_seconds(tree)
            started = time.perf_counter()
            task = asyncio.create_task(loadgen.streams(connections, stream, record_lines=False))
            samples: list[int] = []
            peak = 0
            all_started = False
            while not task.done():
                await asyncio.sleep(0.25)
                rss = loadgen.rss_kb(tree)
                peak = max(peak, rss)
                running = sum(1 for c in connections if c.first_line_at and c.sent_at)
                all_started = all_started or running == count
                if running == count:
                    samples.append(rss)
            results = task.result()
            elapsed = time.perf_counter() - started
            gateway_cpu = (loadgen.cpu_seconds(tree) - before) / elapsed
            loadgen.close_all(connections)
        finally:
            configure_emulator(emulator, tokens=10, first_token_delay_ms=0, token_delay_ms=0)
        await asyncio.sleep(3.0)
        after = loadgen.rss_kb(tree)
        statuses: dict[int, int] = {}
        for result in results:
            statuses[result.status] = statuses.get(result.status, 0) + 1
        steady = int(statistics.median(samples)) if samples else peak
        return Memory(
            count, idle, connected, steady, peak, after, statuses.get(200, 0), statuses, all_started,
            emulator_stats(emulator).get("peak_in_flight", -1), gateway_cpu, elapsed,
        )  # fmt: skip
    finally:
        gateway.stop()


# --- the report -----------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value * 1000:.3f} ms" if not math.isnan(value) else "n/a"


def delta_ms(value: float) -> str:
    return f"{value * 1000:+.3f} ms"


async def run(args: argparse.Namespace) -> int:
    nofile = loadgen.raise_nofile(max(65536, 4 * args.streams + 1024))
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    lines: list[str] = []
    summary: list[list[str]] = []
    out = lines.append
    async with loadgen.bench_store("gw") as store:
        key = await loadgen.make_key(store, "bench")
        with loadgen.services() as started:
            emulator = loadgen.start_emulator()
            started.append(emulator)
            env = loadgen.gateway_env(
                store.database_url, store.redis_prefix, emulator.url
            )  # also for the variants below
            gateway = loadgen.start_gateway(env)
            started.append(gateway)
            before: Service | None = None
            if args.against:
                # Removed at exit with the object (weakref.finalize), also when the run fails.
                scratch = tempfile.TemporaryDirectory(prefix="nzbench-against-")
                source = loadgen.export_tree(args.against, Path(scratch.name))
                before = loadgen.start_gateway(env, name="gateway-against", source=source)
                started.append(before)
            info: Service | None = None
            if not args.no_info_log:
                info = loadgen.start_gateway({**env, "GATEWAY_LOG_LEVEL": "info"}, name="gateway-info")
                started.append(info)
            shared = shared_services()

            def target(name: str, port: int, group: Service | None) -> Target:
                sample: dict[str, Service | list[int]] = {"emulator": emulator, **shared}
                if group is not None:
                    sample["gateway"] = group
                request = loadgen.http_request("POST", port, "/api/chat", loadgen.CHAT_BODY, key)
                return Target(name, port, request, sample)

            direct = target("direct", emulator.port, None)
            through = target("gateway", gateway.port, gateway)
            targets = [direct, through]
            against = f"gateway ({args.against})"
            if before is not None:
                targets.append(target(against, before.port, before))
            if info is not None:
                targets.append(target("gateway (log info)", info.port, info))
            for one in targets[1:]:  # first request: Argon2 once, pools opened
                warm = await loadgen.connect(one.port, 8)
                await loadgen.closed_loop(warm, one.request, 0, requests=1000)
                loadgen.close_all(warm)
            print("  warmed up; measuring the rig's ceilings", file=sys.stderr, flush=True)

            ceiling_run, loadgen_us = await rig_ceilings(direct)
            assert ceiling_run.cpu is not None
            out("## Rig")
            out(f"- placement: {loadgen.placement()}; open-file limit {nofile}")
            out(
                f"- Python {sys.version.split()[0]}, Granian {_version('granian')}, uvloop; load generator: "
                "tests/bench/loadgen.py (raw asyncio protocols on uvloop, keep-alive, prebuilt requests, closed loop)"
            )
            out(
                f"- request: POST /api/chat, body {len(loadgen.CHAT_BODY)} B ({loadgen.CHAT_BODY.decode()}), "
                f"whole request {len(direct.request)} B with the Authorization header (sent to both); "
                f"answer {_answer_size(direct)} B of JSON (emulator: 10 tokens, no delays)"
            )
            out(
                "- gateway: `python -m neuronetz serve --workers 1`, GATEWAY_LOG_LEVEL=warning, one key without "
                "limits (authentication on; no Redis round trip), audit rows batched to Postgres"
            )
            out(
                f"- emulator ceiling (alone: load generator moved to CPU 1, c=32, best of 2 x 1.5 s): "
                f"{ceiling_run.rps:,.0f} req/s; {ceiling_run.cpu.describe()}"
            )
            out(
                f"- load generator cost: {loadgen_us:.0f} us CPU per request -> about {1e6 / loadgen_us:,.0f} req/s "
                "on a whole core"
            )
            print("  c=1 latency", file=sys.stderr, flush=True)

            # 1. added latency at c=1
            noise = loadgen.CpuSampler(
                {"emulator": emulator, **shared, **{t.name: t.sample["gateway"] for t in targets[1:]}}
            )
            samples = await latency_rounds(targets, args.rounds, args.per_round)
            quiet = noise.stop()
            direct_p50, direct_p99 = round_stats(samples["direct"])
            out("")
            out("## 1. Added latency at c=1 (non-streaming /api/chat)")
            out(
                f"method: one keep-alive connection per target, {args.rounds} interleaved rounds x {args.per_round} "
                "sequential requests per target (order rotating), 200 warm-up requests each; p50 = median of "
                "round medians, p99 = pooled; added = gateway - direct"
            )
            rows = []
            for one in targets:
                p50, p99 = round_stats(samples[one.name])
                added = "" if one is direct else f"{delta_ms(p50 - direct_p50)} / {delta_ms(p99 - direct_p99)}"
                rows.append([one.name, fmt_ms(p50), fmt_ms(p99), added])
            out(loadgen.table(["target", "p50", "p99", "added p50 / p99"], rows))
            out(f"CPU over the whole section (p99 is sensitive to other load on this shared box): {quiet.describe()}")
            gw_p50, gw_p99 = round_stats(samples["gateway"])
            added_p50, added_p99 = gw_p50 - direct_p50, gw_p99 - direct_p99
            summary.append(["added latency p50, c=1", delta_ms(added_p50), f"<= {TARGET_P50_MS:g} ms",
                            loadgen.verdict(added_p50 * 1000 <= TARGET_P50_MS)])  # fmt: skip
            summary.append(["added latency p99, c=1", delta_ms(added_p99), f"<= {TARGET_P99_MS:g} ms",
                            loadgen.verdict(added_p99 * 1000 <= TARGET_P99_MS)])  # fmt: skip
            if before is not None:
                was_p50, was_p99 = round_stats(samples[against])
                summary.append([f"  before: {against}", f"{delta_ms(was_p50 - direct_p50)} / "
                                f"{delta_ms(was_p99 - direct_p99)}", "(p50 / p99)", "(before)"])  # fmt: skip
            if info is not None:
                info_p50, info_p99 = round_stats(samples["gateway (log info)"])
                summary.append(["  same, GATEWAY_LOG_LEVEL=info", f"{delta_ms(info_p50 - direct_p50)} / "
                                f"{delta_ms(info_p99 - direct_p99)}", "(p50 / p99)", "(info)"])  # fmt: skip

            # 2. throughput
            out("")
            out("## 2. Requests/s (non-streaming /api/chat)")
            out(
                f"method: closed loop, c keep-alive connections, 1 s warm-up then {args.seconds:g} s measured, "
                f"{args.repeat} repeats interleaved across targets (median shown); CPU sampled from /proc over "
                "the measured interval (share of one core); the direct run is the rig's ceiling at that c "
                "(emulator + load generator share CPU 0)"
            )
            for concurrency in (32, 256):
                print(f"  c={concurrency}", file=sys.stderr, flush=True)
                chosen = targets if concurrency == 32 else [t for t in targets if t.name != "gateway (log info)"]
                runs = await throughput(chosen, concurrency, args.seconds, args.repeat)
                best = {name: median_run(group) for name, group in runs.items()}
                rows = []
                for one in chosen:
                    got = best[one.name]
                    cpu = got.cpu
                    assert cpu is not None
                    ratio = "" if one is direct else f"{got.rps / best['direct'].rps:.1%}"
                    rows.append([
                        one.name, f"{got.rps:,.0f}", ratio, fmt_ms(loadgen.median(got.latencies)),
                        fmt_ms(loadgen.percentile(got.latencies, 99)), f"{got.errors}/{got.lost}",
                        f"{cpu_us_per_request(got, 'gateway'):.0f}" if one is not direct else "",
                        cpu.describe(),
                    ])  # fmt: skip
                out(f"c={concurrency}:")
                out(loadgen.table(["target", "req/s", "of direct", "p50", "p99", "errors/lost",
                                   "gateway CPU us/req", "CPU (share of one core)"], rows))  # fmt: skip
                gateway_run, direct_run = best["gateway"], best["direct"]
                assert gateway_run.cpu is not None
                out(f"rig check c={concurrency}: {rig_check(gateway_run, direct_run.rps, gateway_run.cpu.loadgen)}")
                ratio_value = gateway_run.rps / direct_run.rps
                summary.append([
                    f"req/s c={concurrency}: gateway / direct",
                    f"{gateway_run.rps:,.0f} / {direct_run.rps:,.0f} = {ratio_value:.1%}",
                    f">= {TARGET_RATIO:.0%}" if concurrency == 32 else "(none)",
                    loadgen.verdict(ratio_value >= TARGET_RATIO) if concurrency == 32 else "n/a",
                ])  # fmt: skip
                if before is not None:
                    was = best[against]
                    summary.append([f"  before: {against}", f"{was.rps:,.0f} = {was.rps / direct_run.rps:.1%}",
                                    "(before)", "(before)"])  # fmt: skip
                summary.append([f"gateway CPU per proxied request, c={concurrency}",
                                f"{cpu_us_per_request(gateway_run, 'gateway'):.0f} us", "(report)", "n/a"])  # fmt: skip
                if before is not None:
                    summary.append([f"  before: {against}", f"{cpu_us_per_request(best[against], 'gateway'):.0f} us",
                                    "(before)", "(before)"])  # fmt: skip
                if concurrency == 32:
                    direct_c32 = direct_run
            if info is not None:
                info.stop()
                started.remove(info)

            # 3. TTFT
            print("  streams: time to first token", file=sys.stderr, flush=True)
            stream_targets = [Target(t.name, t.port, _stream_request(t.port, key), {}) for t in targets
                              if t.name != "gateway (log info)"]  # fmt: skip
            streams = await ttft(emulator, stream_targets)
            out("")
            out("## 3. Time to first token (NDJSON /api/chat, stream:true)")
            out(
                "method: emulator with 5 tokens, first after 20 ms then every 20 ms; TTFT = send to the first "
                "complete body line; c=1: 5 interleaved rounds x 8 streams per target on one connection (+2 "
                "warm-up); c=64: 64 connections x 3 streams back to back, first sends staggered over 120 ms "
                "(steady arrivals, not one burst), twice per target, interleaved; gap = between successive lines"
            )
            rows = []
            ttft_delta: dict[int, float] = {}
            ttft_before: dict[int, float] = {}
            for concurrency in (1, 64):
                base = streams["direct"][concurrency]
                for name in streams:
                    streamed = streams[name][concurrency]
                    bad = sum(1 for s in streamed if s.status != 200)
                    first = [s.ttft for s in streamed]
                    gaps = [g for s in streamed for g in s.gaps]
                    delta = ""
                    if name != "direct":
                        d50 = loadgen.median(first) - loadgen.median([s.ttft for s in base])
                        d99 = loadgen.percentile(first, 99) - loadgen.percentile([s.ttft for s in base], 99)
                        if name == "gateway":
                            ttft_delta[concurrency] = d50
                        else:
                            ttft_before[concurrency] = d50
                        delta = f"{delta_ms(d50)} / {delta_ms(d99)}"
                    rows.append([
                        f"c={concurrency} {name}", str(len(streamed)), str(bad), fmt_ms(loadgen.median(first)),
                        fmt_ms(loadgen.percentile(first, 99)), delta, fmt_ms(loadgen.median(gaps)),
                        fmt_ms(loadgen.percentile(gaps, 99)), fmt_ms(loadgen.median([s.total for s in streamed])),
                    ])  # fmt: skip
            out(loadgen.table(["target", "streams", "non-200", "TTFT p50", "TTFT p99", "added p50 / p99",
                               "gap p50", "gap p99", "total p50"], rows))  # fmt: skip
            summary.append(["TTFT overhead p50, c=1", delta_ms(ttft_delta[1]), f"<= {TARGET_TTFT_MS:g} ms",
                            loadgen.verdict(ttft_delta[1] * 1000 <= TARGET_TTFT_MS)])  # fmt: skip
            if ttft_before:
                summary.append([f"  before: {against}", delta_ms(ttft_before[1]), "(before)", "(before)"])
            summary.append(["  same at c=64", delta_ms(ttft_delta[64]), f"(<= {TARGET_TTFT_MS:g} ms)",
                            loadgen.verdict(ttft_delta[64] * 1000 <= TARGET_TTFT_MS)])  # fmt: skip
            if before is not None:
                before.stop()
                started.remove(before)

            # 4. worker scaling
            if not args.no_scaling:
                print("  c=32 with 2 workers", file=sys.stderr, flush=True)
                both = f"{loadgen.LOADGEN_CPU},{loadgen.GATEWAY_CPU}"
                pair = loadgen.start_gateway(env, name="gateway-2-workers", workers=2, cpu=both)
                started.append(pair)
                two = target("gateway, 2 workers", pair.port, pair)
                warm = await loadgen.connect(two.port, 8)
                await loadgen.closed_loop(warm, two.request, 0, requests=1000)
                loadgen.close_all(warm)
                runs = await throughput([through, two], 32, args.seconds, args.repeat)
                one_run, two_run = median_run(runs["gateway"]), median_run(runs[two.name])
                out("")
                out("## 4. Worker scaling (non-streaming /api/chat, c=32)")
                out(
                    "method: as in 2; `--workers 2` may run on both CPUs, so its workers share CPU 0 with the "
                    "emulator and the load generator; interleaved with the 1-worker gateway on CPU 1; "
                    f"'of direct' against section 2's direct run ({direct_c32.rps:,.0f} req/s)"
                )
                rows = []
                for name, got in (("1 worker (CPU 1)", one_run), ("2 workers (CPUs 0-1)", two_run)):
                    assert got.cpu is not None
                    rows.append([name, f"{got.rps:,.0f}", f"{got.rps / direct_c32.rps:.1%}",
                                 fmt_ms(loadgen.median(got.latencies)), fmt_ms(loadgen.percentile(got.latencies, 99)),
                                 f"{got.errors}/{got.lost}", got.cpu.describe()])  # fmt: skip
                out(loadgen.table(["gateway", "req/s", "of direct", "p50", "p99", "errors/lost",
                                   "CPU (share of one core)"], rows))  # fmt: skip
                summary.append(["req/s c=32, 2 workers on 2 cores / direct",
                                f"{two_run.rps:,.0f} = {two_run.rps / direct_c32.rps:.1%} "
                                f"({two_run.rps / one_run.rps:.2f} x 1 worker)", "(report)", "n/a"])  # fmt: skip
                pair.stop()
                started.remove(pair)

            # 5. memory
            gateway.stop()
            started.remove(gateway)
            if not args.no_memory:
                print(f"  memory: {args.streams} streams of {args.stream_seconds:g} s", file=sys.stderr, flush=True)
                mem = await memory(emulator, env, key, args.streams, args.stream_seconds)
                out("")
                out(f"## 5. Memory per concurrent stream ({mem.streams} streams)")
                out(
                    f"method: a fresh gateway (GATEWAY_BACKEND_MAX_CONNECTIONS={max(4096, 2 * args.streams)}), "
                    "warmed with 2,000 requests and 64 streams; "
                    f"RSS (/proc statm) summed over Granian main + worker: idle; with {mem.streams} idle "
                    f"keep-alive connections; steady = median of 4 Hz samples while all {mem.streams} streams "
                    f"ran (emulator: {max(1, round(args.stream_seconds / 0.2))} tokens, 200 ms apart); "
                    "after = 3 s after they ended"
                )
                rows = [
                    ["idle", f"{mem.idle_kb / 1024:.1f} MB", ""],
                    [f"{mem.streams} idle connections", f"{mem.connected_kb / 1024:.1f} MB",
                     f"{(mem.connected_kb - mem.idle_kb) / mem.streams:.1f} KB per connection"],
                    ["steady (streams running)", f"{mem.steady_kb / 1024:.1f} MB",
                     f"{mem.per_stream_kb:.1f} KB per stream"],
                    ["peak", f"{mem.peak_kb / 1024:.1f} MB", f"{(mem.peak_kb - mem.idle_kb) / mem.streams:.1f} KB"],
                    ["after", f"{mem.after_kb / 1024:.1f} MB", ""],
                ]  # fmt: skip
                out(loadgen.table(["state", "RSS", "per stream"], rows))
                out(
                    f"streams: {mem.ok} answered 200 of {mem.streams} {mem.statuses}; all running at once: "
                    f"{'yes' if mem.all_concurrent else 'NO'}; emulator peak in flight {mem.emulator_peak}; "
                    f"gateway CPU {mem.gateway_cpu:.0%} of CPU 1 over {mem.seconds:.1f} s"
                )
                summary.append([f"memory per concurrent stream ({mem.streams})", f"{mem.per_stream_kb:.1f} KB",
                                f"<= {TARGET_STREAM_KB:g} KB",
                                loadgen.verdict(mem.per_stream_kb <= TARGET_STREAM_KB and mem.all_concurrent
                                                and mem.ok == mem.streams)])  # fmt: skip

    loadgen.report("the proxy (issue 4)", summary, "\n".join(lines))
    return 0


def _stream_request(port: int, key: str) -> bytes:
    return loadgen.http_request("POST", port, "/api/chat", loadgen.STREAM_BODY, key)


def _answer_size(direct: Target) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{direct.port}/api/chat", data=loadgen.CHAT_BODY, method="POST"
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as answer:
        return len(answer.read())


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
