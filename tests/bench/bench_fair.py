"""Benchmark: fair sharing of a busy backend (README "Fair sharing").

    python3 build.py bench fair             (or: .venv/bin/python tests/bench/bench_fair.py --help)

The emulator runs 2 requests at once (`--num-parallel 2`, Ollama's FIFO queue behind them),
50 tokens at 20 ms each: about one second per answer.

A. Tenant "batch" keeps 32 requests in flight, tenant "chat" sends one at a time. Fair: the
   gateway with 2 slots for the backend; FIFO: the gateway forwarding everything
   (GATEWAY_BACKEND_SLOTS=0), so the emulator's own queue decides. Chat's wait is its latency
   minus the answer's own time (the emulator's nominal total_duration), the same measure in
   both modes. Slot utilisation: the emulator's generations in progress (sampled every 50 ms;
   at most 2 run), over 2.
B. Two tenants of weights 3 and 1, 16 in flight each: the split of answers.
C. Scenario A with two gateway replicas sharing the slots through Redis: batch spread over
   both, chat on the second; the emulator's peak of requests at once.
D. A replica holding both slots is killed (SIGKILL); how long until the other replica gets a
   slot (GATEWAY_LEASE_TTL=5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from tests.bench import loadgen
from tests.bench.loadgen import Service

BODY = {"model": "tiny", "prompt": "hi", "stream": False}
EMULATOR = ("--num-parallel", "2", "--tokens", "50", "--token-delay-ms", "20", "--max-queue", "4096")
SLOTS = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = loadgen.arguments("Fair sharing: chat's wait behind a batch job, weights, two replicas.", repeat=1)
    add = parser.add_argument
    parser.set_defaults(seconds=40.0)
    add("--weights-seconds", type=float, default=60.0, help="length of scenario B (default 60)")
    add("--skip", default="", help="scenarios to skip, e.g. CD")
    return parser.parse_args(argv)


class Load:
    """Closed loops of requests for one tenant, recording what came back."""

    def __init__(self, client: httpx.AsyncClient, key: str) -> None:
        self.client, self.key = client, key
        self.waits: list[float] = []  # s: latency minus the answer's own time
        self.header_waits: list[float] = []  # s: x-queue-wait-ms
        self.done = 0
        self.errors: dict[int, int] = {}
        self.recording = False

    async def loop(self, urls: Sequence[str], stop: float, index: int) -> None:
        url = urls[index % len(urls)] + "/api/generate"
        headers = {"authorization": f"Bearer {self.key}"}
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                answer = await self.client.post(url, json=BODY, headers=headers)
            except httpx.HTTPError:
                self.errors[0] = self.errors.get(0, 0) + 1
                continue
            if not self.recording or time.monotonic() > stop:
                continue
            if answer.status_code != 200:
                self.errors[answer.status_code] = self.errors.get(answer.status_code, 0) + 1
                continue
            self.done += 1
            own = answer.json().get("total_duration", 0) / 1e9
            self.waits.append(max(0.0, time.monotonic() - started - own))
            if "x-queue-wait-ms" in answer.headers:
                self.header_waits.append(int(answer.headers["x-queue-wait-ms"]) / 1000)


async def sample(emulator: Service, stop: float, into: list[int]) -> None:
    async with httpx.AsyncClient() as client:
        while time.monotonic() < stop:
            stats = (await client.get(emulator.url + "/_emulator/stats")).json()
            into.append(int(stats["generations"]))
            await asyncio.sleep(0.05)


async def drive(loads: list[tuple[Load, int, Sequence[str]]], emulator: Service, seconds: float,
                warmup: float = 3.0) -> tuple[float, list[int]]:  # fmt: skip
    """Run every load's loops for warmup + seconds; record only the measured part."""
    start = time.monotonic()
    stop = start + warmup + seconds
    samples: list[int] = []
    tasks = [asyncio.create_task(load.loop(urls, stop, i)) for load, n, urls in loads for i in range(n)]
    await asyncio.sleep(warmup)
    for load, _, _ in loads:
        load.recording = True
    measured = time.monotonic()
    await sample(emulator, stop, samples)
    await asyncio.gather(*tasks)  # answers after `stop` are not counted
    return stop - measured, samples


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def utilisation(samples: list[int]) -> float:
    return statistics.fmean(min(s, SLOTS) for s in samples) / SLOTS if samples else float("nan")


async def scenario_a(store: loadgen.BenchStore, keys: dict[str, str], args: argparse.Namespace,
                     replicas: int = 1) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    for mode, slots in (("fair", str(SLOTS)), ("fifo", "0")):
        if replicas > 1 and mode == "fifo":
            continue
        with loadgen.services() as started:
            emulator = loadgen.start_emulator(*EMULATOR)
            started.append(emulator)
            env = loadgen.gateway_env(store.database_url, store.redis_prefix, emulator.url, GATEWAY_BACKEND_SLOTS=slots,
                                      GATEWAY_QUEUE_MAX_WAIT="120", GATEWAY_QUEUE_MAX_DEPTH="64")  # fmt: skip
            gateways = [loadgen.start_gateway(env, f"gateway-{mode}-{i}") for i in range(replicas)]
            started += gateways
            urls = [g.url for g in gateways]
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:
                batch, chat = Load(client, keys["batch"]), Load(client, keys["chat"])
                seconds, samples = await drive([(batch, 32, urls), (chat, 1, urls[-1:])], emulator, args.seconds)
                async with httpx.AsyncClient() as probe:
                    peak = (await probe.get(emulator.url + "/_emulator/stats")).json()["peak_generations"]
        results[mode] = {
            "chat_p50": quantile(chat.waits, 0.5), "chat_p95": quantile(chat.waits, 0.95), "chat_n": len(chat.waits),
            "header_p50": quantile(chat.header_waits, 0.5), "header_p95": quantile(chat.header_waits, 0.95),
            "util": utilisation(samples), "batch_rps": batch.done / seconds, "seconds": seconds, "peak": peak,
            "total_rps": (batch.done + chat.done) / seconds,
            "errors": {**batch.errors, **{f"chat {k}": v for k, v in chat.errors.items()}},
        }  # fmt: skip
        print(f"  A ({replicas} replica(s), {mode}) done", file=sys.stderr, flush=True)
    return results


async def scenario_b(store: loadgen.BenchStore, keys: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    with loadgen.services() as started:
        emulator = loadgen.start_emulator(*EMULATOR)
        started.append(emulator)
        env = loadgen.gateway_env(store.database_url, store.redis_prefix, emulator.url,
                                  GATEWAY_BACKEND_SLOTS=str(SLOTS), GATEWAY_QUEUE_MAX_WAIT="120")  # fmt: skip
        gateway = loadgen.start_gateway(env, "gateway-weights")
        started.append(gateway)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            heavy, light = Load(client, keys["weight3"]), Load(client, keys["weight1"])
            seconds, _ = await drive([(heavy, 16, [gateway.url]), (light, 16, [gateway.url])], emulator,
                                     args.weights_seconds)  # fmt: skip
    print("  B done", file=sys.stderr, flush=True)
    return {"heavy": heavy.done, "light": light.done, "seconds": seconds}


async def scenario_d(store: loadgen.BenchStore, keys: dict[str, str]) -> dict[str, Any]:
    """Kill the replica holding both slots; time until the survivor is served."""
    with loadgen.services() as started:
        emulator = loadgen.start_emulator("--num-parallel", "2", "--tokens", "100000", "--token-delay-ms", "20")
        started.append(emulator)
        env = loadgen.gateway_env(store.database_url, store.redis_prefix, emulator.url,
                                  GATEWAY_BACKEND_SLOTS=str(SLOTS), GATEWAY_LEASE_TTL="5",
                                  GATEWAY_QUEUE_MAX_WAIT="60")  # fmt: skip
        doomed = loadgen.start_gateway(env, "gateway-doomed")
        survivor = loadgen.start_gateway(env, "gateway-survivor")
        started += [survivor, doomed]
        headers = {"authorization": f"Bearer {keys['batch']}"}
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.create_task(client.post(doomed.url + "/api/generate", json={**BODY, "stream": True},
                                                       headers=headers)) for _ in range(SLOTS)]  # fmt: skip
            deadline = time.monotonic() + 30
            while (await client.get(emulator.url + "/_emulator/stats")).json()["generations"] < SLOTS:
                if time.monotonic() > deadline:
                    raise RuntimeError("the streams of the replica to kill did not start")
                await asyncio.sleep(0.02)
            for pid in reversed(doomed.tree()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            answer = await client.post(survivor.url + "/api/generate", json={**BODY, "options": {"num_predict": 1}},
                                       headers={"authorization": f"Bearer {keys['chat']}"})  # fmt: skip
            back = time.monotonic() - killed
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    print("  D done", file=sys.stderr, flush=True)
    return {"status": answer.status_code, "seconds": back, "lease": 5.0}


def fmt(seconds: float) -> str:
    return f"{seconds:.2f} s"


async def run(args: argparse.Namespace) -> int:
    loadgen.raise_nofile()
    loadgen.pin_self(loadgen.LOADGEN_CPU)
    from neuronetz import tenants
    from neuronetz.limits import Limits

    async with loadgen.bench_store("fair") as store:
        keys: dict[str, str] = {}
        for name, weight in (("batch", 1), ("chat", 1), ("weight3", 3), ("weight1", 1)):
            await tenants.create_tenant(store.pool, name, Limits(), weight=weight)
            _, keys[name] = await tenants.create_key(store.pool, name, "bench")
        a = await scenario_a(store, keys, args)
        b = await scenario_b(store, keys, args) if "B" not in args.skip else None
        c = await scenario_a(store, keys, args, replicas=2) if "C" not in args.skip else None
        d = await scenario_d(store, keys) if "D" not in args.skip else None
    fair, fifo = a["fair"], a["fifo"]
    ratio = fair["batch_rps"] / fifo["total_rps"] if fifo["total_rps"] else float("nan")
    total = fair["total_rps"] / fifo["total_rps"] if fifo["total_rps"] else float("nan")
    summary = [
        ["A: chat wait p50 (fair)", fmt(fair["chat_p50"]), "<= 1 s", loadgen.verdict(fair["chat_p50"] <= 1.0)],
        ["A: chat wait p95 (fair)", fmt(fair["chat_p95"]), "<= 2 s", loadgen.verdict(fair["chat_p95"] <= 2.0)],
        ["A: chat wait p50 / p95 (FIFO baseline)", f"{fmt(fifo['chat_p50'])} / {fmt(fifo['chat_p95'])}", "~16 s",
         "n/a"],
        ["A: slot utilisation while work waits (fair)", f"{fair['util']:.1%}", ">= 95 %",
         loadgen.verdict(fair["util"] >= 0.95)],
        ["A: batch answers/s (fair) / all answers/s (FIFO)", f"{ratio:.1%}", ">= 95 %", loadgen.verdict(ratio >= 0.95)],
        ["A: all answers/s fair / FIFO (work-conserving)", f"{total:.1%}", ">= 95 %", loadgen.verdict(total >= 0.95)],
        ["A: peak requests at the backend (fair)", str(fair["peak"]), f"<= {SLOTS}",
         loadgen.verdict(fair["peak"] <= SLOTS)],
    ]  # fmt: skip
    if b is not None:
        split = b["heavy"] / max(1, b["light"])
        summary.append([f"B: answers weight 3 : weight 1 ({b['seconds']:.0f} s)",
                        f"{split:.2f} : 1 ({b['heavy']}:{b['light']})", "3 : 1 +- 10 %",
                        loadgen.verdict(abs(split - 3) <= 0.3)])  # fmt: skip
    if c is not None:
        two = c["fair"]
        summary += [
            ["C: chat wait p50 / p95, two replicas", f"{fmt(two['chat_p50'])} / {fmt(two['chat_p95'])}",
             "<= 1 s / <= 2 s", loadgen.verdict(two["chat_p50"] <= 1.0 and two["chat_p95"] <= 2.0)],
            ["C: slot utilisation, two replicas", f"{two['util']:.1%}", ">= 95 %",
             loadgen.verdict(two["util"] >= 0.95)],
            ["C: all answers/s two replicas / FIFO", f"{two['total_rps'] / fifo['total_rps']:.1%}", ">= 95 %",
             loadgen.verdict(two["total_rps"] / fifo["total_rps"] >= 0.95)],
            ["C: peak requests at the backend", str(two["peak"]), f"<= {SLOTS}", loadgen.verdict(two["peak"] <= SLOTS)],
        ]  # fmt: skip
    if d is not None:
        ok = d["status"] == 200 and d["seconds"] <= d["lease"] + 1
        summary.append(["D: slots back after SIGKILL of their replica", f"{fmt(d['seconds'])} (HTTP {d['status']})",
                        f"<= lease {d['lease']:g} s + 1 s poll", loadgen.verdict(ok)])  # fmt: skip
    details = ["## Scenario A details", loadgen.table(
        ["mode", "chat answers", "chat wait p50", "chat wait p95", "x-queue-wait-ms p50/p95", "batch/all answers/s",
         "utilisation", "peak at backend", "errors"],
        [[mode, str(r["chat_n"]), fmt(r["chat_p50"]), fmt(r["chat_p95"]),
          f"{fmt(r['header_p50'])} / {fmt(r['header_p95'])}" if r["header_p50"] == r["header_p50"] else "-",
          f"{r['batch_rps']:.2f} / {r['total_rps']:.2f}", f"{r['util']:.1%}", str(r["peak"]), str(r["errors"] or "-")]
         for mode, r in [*a.items(), *((("fair, 2 replicas", c["fair"]),) if c else ())]],
    ), f"measured {args.seconds:g} s after 3 s of warm-up; emulator {' '.join(EMULATOR)}"]  # fmt: skip
    loadgen.report("fair sharing (issue 15)", summary, f"placement: {loadgen.placement()}", "\n".join(details))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return loadgen.run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
