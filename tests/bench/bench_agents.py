"""Benchmark (issue 14): the agent routes /v1/responses and /v1/messages next to /v1/chat/completions.

    python3 build.py bench agents          (or: .venv/bin/python tests/bench/bench_agents.py --help)

The rig of bench_gateway.py (tests/bench/loadgen.py: the emulator and this process on CPU 0, one
Granian worker on CPU 1, a key without limits). Each route gets an equivalent small body (one
user message "hi", the emulator's 10 tokens) and is measured gateway vs direct to the emulator,
which speaks all three. The key goes as a Bearer token, and on /v1/messages as `x-api-key`
with `anthropic-version` (what Claude Code sends); the same bytes go to the emulator.

Figures per route, each run repeated `--runs` times (the spread is printed: the machine is shared):
  1. added latency p50/p99 at c=1 (gateway - direct), six targets in interleaved rounds;
  2. time-to-first-token overhead at c=1 of streams, interleaved rounds;
  3. requests/s at c=32 as a fraction of direct.
Target: each agent route's overhead within 10 % of chat's (added latency and TTFT at most
1.1 x chat's; the req/s fraction at least 0.9 x chat's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.bench_gateway import (
    Target,
    configure_emulator,
    cpu_us_per_request,
    latency_rounds,
    median_run,
    round_stats,
    shared_services,
    throughput,
)
from tests.bench.loadgen import Service

TARGET_FACTOR = 1.10


@dataclass(frozen=True)
class Route:
    path: str
    body: bytes  # without the "stream" member, added per request kind
    key_header: str

    def request(self, port: int, key: str, stream: bool) -> bytes:
        body = self.body[:-1] + (b',"stream":true}' if stream else b',"stream":false}')
        return loadgen.http_request("POST", port, self.path, body, key, self.key_header)


ROUTES = (
    Route("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"hi"}]}', "authorization"),
    Route("/v1/responses", b'{"model":"tiny","input":[{"role":"user","content":"hi"}]}', "authorization"),
    Route("/v1/messages", b'{"model":"tiny","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}', "x-api-key"),
)
CHAT = ROUTES[0].path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments("Agent routes vs /v1/chat/completions: added latency, TTFT, req/s.", repeat=2)
    add = parser.add_argument
    add("--runs", type=int, default=3, help="whole measurement runs; median and spread shown (default 3)")
    add("--rounds", type=int, default=6, help="interleaved rounds for the c=1 latency (default 6)")
    add("--per-round", type=int, default=150, help="sequential requests per target per round (default 150)")
    add("--ttft-rounds", type=int, default=4, help="interleaved rounds of streams at c=1 (default 4)")
    add("--ttft-per-round", type=int, default=6, help="streams per target per round (default 6)")
    return parser.parse_args(argv)


@dataclass
class Figures:
    """One run's figures for one route."""

    added_p50: float
    added_p99: float
    ttft_p50: float
    ratio: float
    cpu_us: float  # the gateway's CPU per request at c=32: steadier than req/s on a loaded box


async def ttft_rounds(emulator: Service, targets: Sequence[Target], rounds: int, per_round: int) -> dict[str, float]:
    """Median TTFT per target at c=1: streams of 5 tokens (first after 20 ms, then every 20 ms),
    one connection per target, the order rotating from round to round. Every route's first
    body line leaves the emulator with the first token (the opening events are sent with it)."""
    configure_emulator(emulator, tokens=5, first_token_delay_ms=20, token_delay_ms=20)
    connections = {t.name: await loadgen.connect(t.port, 1) for t in targets}
    try:
        firsts: dict[str, list[float]] = {t.name: [] for t in targets}
        for target in targets:
            await loadgen.streams(connections[target.name], target.request, each=2)
        for index in range(rounds):
            for target in list(targets[index % len(targets) :]) + list(targets[: index % len(targets)]):
                got = await loadgen.streams(connections[target.name], target.request, each=per_round)
                bad = [s.status for s in got if s.status != 200]
                if bad:
                    raise RuntimeError(f"{target.name}: streams answered {bad}")
                firsts[target.name].extend(s.ttft for s in got)
        return {name: loadgen.median(values) for name, values in firsts.items()}
    finally:
        configure_emulator(emulator, tokens=10, first_token_delay_ms=0, token_delay_ms=0)
        for group in connections.values():
            loadgen.close_all(group)


async def one_run(
    args: argparse.Namespace, emulator: Service, plain: list[Target], streaming: list[Target]
) -> dict[str, Figures]:
    samples = await latency_rounds(plain, args.rounds, args.per_round)
    first = await ttft_rounds(emulator, streaming, args.ttft_rounds, args.ttft_per_round)
    runs = await throughput(plain, 32, args.seconds, args.repeat)
    figures = {}
    for route in ROUTES:
        direct, gateway = f"direct {route.path}", f"gateway {route.path}"
        d50, d99 = round_stats(samples[direct])
        g50, g99 = round_stats(samples[gateway])
        through = median_run(runs[gateway])
        ratio = through.rps / median_run(runs[direct]).rps
        cpu = cpu_us_per_request(through, "gateway")
        figures[route.path] = Figures(g50 - d50, g99 - d99, first[gateway] - first[direct], ratio, cpu)
    return figures


def spread(values: Sequence[float], show: Callable[[float], str]) -> str:
    """Median of the runs, then (min .. max)."""
    if len(values) == 1:
        return show(values[0])
    return f"{show(statistics.median(values))} ({show(min(values))} .. {show(max(values))})"


def ms(value: float) -> str:
    return f"{value * 1000:+.3f} ms"


def us(value: float) -> str:
    return f"{value:.0f} us"


def pct(value: float) -> str:
    return f"{value:.1%}"


async def run(args: argparse.Namespace) -> int:
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    results: list[dict[str, Figures]] = []
    async with loadgen.bench_store("agents") as store:
        key = await loadgen.make_key(store, "bench")
        with loadgen.services() as started:
            emulator, gateway = loadgen.start_rig(started, store.database_url, store.redis_prefix)
            shared = shared_services()
            plain: list[Target] = []
            streaming: list[Target] = []
            for route in ROUTES:
                for where, port, group in (("direct", emulator.port, None), ("gateway", gateway.port, gateway)):
                    sample: dict[str, Service | list[int]] = {"emulator": emulator, **shared}
                    if group is not None:
                        sample["gateway"] = group
                    name = f"{where} {route.path}"
                    plain.append(Target(name, port, route.request(port, key, stream=False), sample))
                    streaming.append(Target(name, port, route.request(port, key, stream=True), {}))
            for target in plain:  # first request: Argon2 once, pools opened; every route answers 200
                warm = await loadgen.connect(target.port, 8)
                check = await loadgen.closed_loop(warm, target.request, 0, requests=800)
                loadgen.close_all(warm)
                if check.errors or check.lost:
                    raise RuntimeError(f"{target.name}: {check.errors} errors {check.statuses}, {check.lost} lost")
            noise = loadgen.CpuSampler({"emulator": emulator, "gateway": gateway, **shared})
            for index in range(args.runs):
                print(f"  run {index + 1} of {args.runs}", file=sys.stderr, flush=True)
                results.append(await one_run(args, emulator, plain, streaming))
            quiet = noise.stop()

    rows = []
    for route in ROUTES:
        got = [r[route.path] for r in results]
        rows.append([
            route.path, route.key_header, spread([f.added_p50 for f in got], ms),
            spread([f.added_p99 for f in got], ms), spread([f.ttft_p50 for f in got], ms),
            spread([f.ratio for f in got], pct), spread([f.cpu_us for f in got], us),
        ])  # fmt: skip
    summary = []
    chat = [r[CHAT] for r in results]
    chat_p50 = statistics.median(f.added_p50 for f in chat)
    chat_ttft = statistics.median(f.ttft_p50 for f in chat)
    chat_ratio = statistics.median(f.ratio for f in chat)
    for route in ROUTES[1:]:
        got = [r[route.path] for r in results]
        p50 = statistics.median(f.added_p50 for f in got)
        first = statistics.median(f.ttft_p50 for f in got)
        ratio = statistics.median(f.ratio for f in got)
        summary += [
            [f"{route.path} added p50, c=1", f"{ms(p50)} vs chat {ms(chat_p50)}",
             f"<= {ms(TARGET_FACTOR * chat_p50)}", loadgen.verdict(p50 <= TARGET_FACTOR * chat_p50)],
            [f"{route.path} TTFT overhead p50, c=1", f"{ms(first)} vs chat {ms(chat_ttft)}",
             f"<= {ms(TARGET_FACTOR * chat_ttft)}", loadgen.verdict(first <= TARGET_FACTOR * chat_ttft)],
            [f"{route.path} req/s c=32 of direct", f"{pct(ratio)} vs chat {pct(chat_ratio)}",
             f">= {pct(chat_ratio / TARGET_FACTOR)}", loadgen.verdict(ratio >= chat_ratio / TARGET_FACTOR)],
        ]  # fmt: skip
    section = "\n".join([
        "## Rig",
        f"- placement: {loadgen.placement()}",
        "- gateway: `python -m neuronetz serve --workers 1`, GATEWAY_LOG_LEVEL=warning, one key without limits",
        "- bodies (plus \"stream\"): " + "; ".join(f"{r.path} {r.body.decode()}" for r in ROUTES),
        f"- CPU over all runs (a shared box: 'other load' is other people's work): {quiet.describe()}",
        "",
        f"## Per route: median of {args.runs} runs (min .. max)",
        f"method: added latency = gateway - direct, {args.rounds} interleaved rounds x {args.per_round} sequential "
        "requests per target on one keep-alive connection (p50 = median of round medians, p99 pooled); TTFT = "
        f"send to the first complete body line, emulator 5 tokens 20 ms apart, {args.ttft_rounds} interleaved "
        f"rounds x {args.ttft_per_round} streams, median gateway - median direct; req/s = closed loop at c=32, "
        f"{args.seconds:g} s after 1 s warm-up, median of {args.repeat}, gateway / direct",
        loadgen.table(["route", "key as", "added p50", "added p99", "TTFT overhead", "req/s c=32 of direct",
                      "gateway CPU/req c=32"], rows),
        f"target: agent routes within {TARGET_FACTOR - 1:.0%} of {CHAT} (added latency and TTFT at most "
        f"{TARGET_FACTOR:g} x chat's, req/s fraction at least chat's / {TARGET_FACTOR:g})",
    ])  # fmt: skip
    loadgen.report("agent routes (issue 14)", summary, section)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
