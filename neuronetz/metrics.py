"""Prometheus metrics: counters, gauges and histograms with a hand-written text exposition.

Each Granian worker counts in its own memory (a dict update per event). A scrape can land on
any worker, so every worker writes a snapshot of its counters to a small file in a shared
directory once a second, and `/metrics` answers with the sum over the live workers of this
instance (its own numbers fresh, the others' at most a second old). Gauges that describe
shared state (backend health, queue depth) are per worker and summed too, which is what a
dashboard wants for queue depth and in-flight counts; backend health is reported as the
number of workers that consider the backend up. The tenant budget gauges are the exception:
they describe Redis's counters, so the worker answering the scrape reads them then and sets
them on the sum (worker.py), never adding them up over workers.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

Labels = tuple[tuple[str, str], ...]
# Seconds: sub-millisecond gateway overhead up to multi-minute generations.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SNAPSHOT_MAX_AGE = 10.0

HELP = {
    "neuronetz_requests_total": ("counter", "Requests answered, by route, status and model."),
    "neuronetz_tokens_total": ("counter", "Tokens processed, by direction (prompt, completion) and model."),
    # Tenants, not keys: tenants are few and made by the operator, keys are many.
    "neuronetz_tenant_tokens_total": ("counter", "Tokens processed, by tenant and direction (prompt, completion)."),
    "neuronetz_tenant_budget_tokens": ("gauge", "A tenant's token budget, by period (daily, monthly, total)."),
    "neuronetz_tenant_budget_used_tokens": ("gauge", "Tokens counted against a tenant's budget in its current period."),
    "neuronetz_request_duration_seconds": ("histogram", "Time from request to the end of the answer, by route."),
    "neuronetz_gateway_overhead_seconds": ("histogram", "Time spent in the gateway before the backend was asked."),
    "neuronetz_backend_first_byte_seconds": ("histogram", "Time from asking a backend to its first byte."),
    "neuronetz_in_flight_requests": ("gauge", "Requests being answered right now."),
    "neuronetz_refusals_total": ("counter", "Requests refused by a limit, by reason (rpm, tpm, concurrency, budget)."),
    "neuronetz_auth_failures_total": ("counter", "Refused authentications."),
    "neuronetz_argon2_verifications_total": ("counter", "Argon2id verifications (key cache misses)."),
    "neuronetz_backend_up": ("gauge", "Workers that consider the backend available."),
    "neuronetz_backend_in_flight": ("gauge", "Requests in flight per backend."),
    "neuronetz_audit_queue_depth": ("gauge", "Audit records waiting to be written."),
    "neuronetz_audit_records_written_total": ("counter", "Audit records written to Postgres."),
    "neuronetz_audit_records_dropped_total": ("counter", "Audit records dropped because a queue was full, by kind."),
    "neuronetz_audit_records_invalid_total": ("counter", "Audit records Postgres refused even repaired, by kind."),
    "neuronetz_audit_records_repaired_total": ("counter", "Audit records written after removing NULs or clamping."),
    "neuronetz_ledger_pending": ("gauge", "Usage ledger rows waiting to be written."),
    "neuronetz_ledger_rows_dropped_total": ("counter", "Usage ledger rows Postgres refused for their content."),
    "neuronetz_background_task_restarts_total": ("counter", "Background tasks restarted after a failure, by task."),
    "neuronetz_queue_waiting": ("gauge", "Requests waiting for a backend slot, by tenant."),
    "neuronetz_queue_wait_seconds": ("histogram", "Time requests waited for a backend slot, by tenant."),
    "neuronetz_backend_slots_in_use": ("gauge", "Backend slots this instance's requests hold, by backend, model."),
    "neuronetz_workers": ("gauge", "Worker processes reporting into this scrape."),
}


@functools.lru_cache(maxsize=4096)
def labels(**values: str) -> Labels:
    """A series' labels in canonical order; memoised, as the same few repeat per request."""
    return tuple(sorted(values.items()))


class Registry:
    def __init__(self) -> None:
        self.counters: defaultdict[str, defaultdict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: defaultdict[str, dict[Labels, float]] = defaultdict(dict)
        # histogram: name -> labels -> [bucket counts..., +Inf count, sum]
        self.histograms: defaultdict[str, dict[Labels, list[float]]] = defaultdict(dict)

    def inc(self, name: str, by: float = 1.0, key: Labels = ()) -> None:
        self.counters[name][key] += by

    def set(self, name: str, value: float, key: Labels = ()) -> None:
        self.gauges[name][key] = value

    def observe(self, name: str, value: float, key: Labels = ()) -> None:
        series = self.histograms[name].get(key)
        if series is None:
            series = self.histograms[name][key] = [0.0] * (len(BUCKETS) + 2)
        series[bisect.bisect_left(BUCKETS, value)] += 1  # the first bucket with value <= bound; or +Inf
        series[-1] += value

    def snapshot(self) -> dict[str, Any]:
        def dump(table: dict[str, Any]) -> dict[str, list[Any]]:
            return {
                name: [[list(map(list, key)), value] for key, value in series.items()] for name, series in table.items()
            }

        return {"counters": dump(self.counters), "gauges": dump(self.gauges), "histograms": dump(self.histograms)}


def merge(snapshots: list[dict[str, Any]]) -> Registry:
    total = Registry()
    for snapshot in snapshots:
        for kind in ("counters", "gauges", "histograms"):
            for name, series in snapshot[kind].items():
                for key_list, value in series:
                    key = tuple((k, v) for k, v in key_list)
                    if kind == "counters":
                        total.counters[name][key] += value
                    elif kind == "gauges":
                        total.gauges[name][key] = total.gauges[name].get(key, 0.0) + value
                    else:
                        current = total.histograms[name].setdefault(key, [0.0] * len(value))
                        total.histograms[name][key] = [a + b for a, b in zip(current, value, strict=True)]
    return total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _series(name: str, key: Labels, value: float, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = (*key, *extra)
    label_text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""
    number = "+Inf" if value == math.inf else repr(float(value)) if not float(value).is_integer() else str(int(value))
    return f"{name}{label_text} {number}"


def render(registry: Registry) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for name, (kind, help_text) in HELP.items():
        table: dict[Labels, Any] | None = (
            registry.counters.get(name) if kind == "counter" else
            registry.gauges.get(name) if kind == "gauge" else registry.histograms.get(name)
        )  # fmt: skip
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for key, value in sorted((table or {}).items()):
            if kind != "histogram":
                lines.append(_series(name, key, value))
                continue
            cumulative = 0.0
            for bound, count in zip((*BUCKETS, math.inf), value[:-1], strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else repr(bound)
                lines.append(_series(name + "_bucket", key, cumulative, (("le", le),)))
            lines.append(_series(name + "_sum", key, value[-1]))
            lines.append(_series(name + "_count", key, cumulative))
    return ("\n".join(lines) + "\n").encode()


class Shared:
    """The per-instance directory where workers leave their snapshots for each other."""

    def __init__(self, directory: str | None = None) -> None:
        # /dev/shm is memory and writable in containers with a read-only root; the directory
        # below it is ours alone (checked in publish), so its world-writability is harmless.
        shm = "/dev/shm"  # noqa: S108  # nosec B108
        base = directory or (shm if os.access(shm, os.W_OK) else tempfile.gettempdir())
        # Granian's main process is every worker's parent: its pid names this instance.
        self.directory = Path(base) / f"neuronetz-metrics-{os.getppid()}"
        self.path = self.directory / f"worker-{os.getpid()}.json"

    def publish(self, registry: Registry) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        owner = self.directory.lstat()
        if self.directory.is_symlink() or owner.st_uid != os.getuid() or owner.st_mode & 0o077:
            raise PermissionError(f"{self.directory} is not a private directory of this user")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(registry.snapshot()))
        tmp.replace(self.path)

    def collect(self, own: Registry) -> Registry:
        snapshots = [own.snapshot()]
        now = time.time()
        for path in self.directory.glob("worker-*.json"):
            if path == self.path:
                continue
            try:
                if now - path.stat().st_mtime > SNAPSHOT_MAX_AGE:
                    path.unlink(missing_ok=True)  # a worker that is gone
                    continue
                snapshots.append(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue
        merged = merge(snapshots)
        merged.set("neuronetz_workers", float(len(snapshots)))
        return merged

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
