"""The backend pool: which Ollama servers are healthy, which models each has, and selection.

Selection sees only `available()` backends — healthy by the last active check and not
benched by passive failures (Caddy's `Available`) — that may have the requested model, and
takes the one with the fewest requests in flight; ties go round-robin so equal backends
share the load. A model nobody is known to have triggers one refresh of every model list
before the answer is 404; a model whose holders are all down is 503.

Active checks run every GATEWAY_HEALTH_INTERVAL seconds, less up to a quarter at random
(`GET /api/version`, cheap, with a short timeout) and refresh each backend's `/api/tags`.
Passive checks: a connection failure or a 5xx answer benches a backend for
GATEWAY_BACKEND_COOLDOWN seconds, or until an active check finds it answering again.
Reconfiguring (a changed OLLAMA_BACKENDS) keeps the state of unchanged backends; requests in
flight on a removed backend finish where they are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from neuronetz import config, envfile, models
from neuronetz.errors import BadGateway, NotFound, ServiceUnavailable

log = logging.getLogger("neuronetz.backends")
CHECK_TIMEOUT = 2.0
# The gateway's own requests to backends say so, e.g. in Ollama's logs and in the tests' emulator.
CHECK_HEADERS = {"user-agent": "neuronetz-gateway (health check)"}
LISTING_HEADERS = {"user-agent": "neuronetz-gateway (model listing)"}
# orjson.JSONDecodeError is a ValueError, as is a JSON answer of the wrong shape or size.
FETCH_ERRORS = (httpx.HTTPError, TimeoutError, ValueError)
# The longest version or model list read from a backend. An entry of /api/tags is about 400
# bytes, so this holds some 20,000 models; a longer answer fails the check or listing instead
# of being read whole on every health interval.
MAX_LISTING_BYTES = 8 * 1024 * 1024


class ListingTooLong(ValueError):
    """A backend's version or model list is longer than MAX_LISTING_BYTES."""


SERVER_ERRORS_TO_BENCH = 3
# One slow answer to a health check (a busy backend, a GC pause) must not take a backend out
# of rotation; two in a row do. Connection failures of real requests bench it at once.
CHECK_FAILURES_TO_MARK_DOWN = 2
# Each pause between checks is GATEWAY_HEALTH_INTERVAL shortened by up to this fraction, at
# random: never longer, so a dead backend is still marked down within two intervals.
CHECK_JITTER = 0.25


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = True  # optimistic until the first check: a fresh gateway serves at once
    benched_until: float = 0.0
    models: frozenset[str] | None = None  # normalised names; None until first listed
    in_flight: int = 0
    version: str | None = None
    error: str | None = None
    server_errors: int = 0  # 5xx answers in a row
    check_failures: int = 0  # failed health checks in a row
    slots: int = 0  # requests per model at once (fair.py); 0: unbounded, no gateway queue
    loaded: frozenset[str] = frozenset()  # normalised names of the models in memory (/api/ps)

    @property
    def host(self) -> str:
        """The Host header Ollama expects: its own host:port (docs/ollama.md §6)."""
        return urlsplit(self.url).netloc

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.benched_until

    def may_have(self, model: str) -> bool:
        return self.models is None or model in self.models

    def state(self) -> dict[str, Any]:
        return {
            "ok": self.available(time.monotonic()),
            "healthy": self.healthy,
            "version": self.version,
            "models": sorted(self.models) if self.models is not None else None,
            "in_flight": self.in_flight,
            "slots": self.slots,
            "loaded": sorted(self.loaded),
            **({"error": self.error} if self.error else {}),
        }


class BackendPool:
    def __init__(
        self,
        urls: Iterable[str],
        client: httpx.AsyncClient,
        interval: float,
        cooldown: float,
        failures_to_mark_down: int = CHECK_FAILURES_TO_MARK_DOWN,
        slots: int = 0,
        slots_by_backend: Mapping[str, int | None] | None = None,
    ) -> None:
        self.client = client
        self.interval = interval
        self.cooldown = cooldown
        self.failures_to_mark_down = failures_to_mark_down
        self.default_slots = slots
        self.backends: list[Backend] = []
        self.reconfigure(urls, slots_by_backend, quiet=True)
        self._ties = itertools.count()
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(backend.url for backend in self.backends)

    def reconfigure(
        self, urls: Iterable[str], slots_by_backend: Mapping[str, int | None] | None = None, *, quiet: bool = False
    ) -> None:
        current = {backend.url: backend for backend in self.backends}
        self.backends = [current.get(url) or Backend(url) for url in urls]
        overrides = slots_by_backend or {}
        for backend in self.backends:
            own = overrides.get(backend.url)
            backend.slots = self.default_slots if own is None else own
        if not quiet:
            log.info("backends reconfigured", extra={"fields": {"backends": list(self.urls)}})

    # --- selection ------------------------------------------------------------------------

    def known(self, model: str) -> bool:
        """Whether some backend's last model list has `model` (a normalized name)."""
        return any(b.models is not None and model in b.models for b in self.backends)

    def select(self, model: str | None, exclude: frozenset[Backend] = frozenset()) -> Backend | None:
        """The available backend with the fewest requests in flight that may have `model`
        (any available backend when `model` is None); None when there is none."""
        now = time.monotonic()
        wanted = models.normalize(model) if model else None
        candidates = [
            b for b in self.backends if b not in exclude and b.available(now) and (wanted is None or b.may_have(wanted))
        ]
        if not candidates:
            return None
        fewest = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == fewest]
        # Warm before cold: loading a model takes seconds to minutes, so of the equally busy
        # backends one that has it in memory wins (with slots, slots.py prefers warm ones
        # until all their slots are taken).
        warm = [b for b in tied if wanted is not None and wanted in b.loaded]
        tied = warm or tied
        return tied[next(self._ties) % len(tied)]

    async def choose(self, model: str | None, exclude: frozenset[Backend] = frozenset()) -> Backend:
        """`select`, refreshing the model lists once when nobody is known to have `model`;
        NotFound when the model exists on no backend, ServiceUnavailable when its holders are down."""
        backend = self.select(model, exclude)
        if backend is not None:
            return backend
        if not self.backends:
            raise ServiceUnavailable("No Ollama backend is configured.", retry_after=5)
        if model and not exclude:
            wanted = models.normalize(model)
            if not self.known(wanted):
                await self.refresh()
                backend = self.select(model, exclude)
                if backend is not None:
                    return backend
                if all(b.models is not None and wanted not in b.models for b in self.backends):
                    raise NotFound(f"model '{model}' not found", code="model_not_found")
        raise ServiceUnavailable("No healthy Ollama backend can serve this request right now.", retry_after=5)

    # --- passive health ------------------------------------------------------------------------

    def failed(self, backend: Backend, reason: str) -> None:
        backend.benched_until = time.monotonic() + self.cooldown
        backend.error = reason
        log.warning("backend benched", extra={"fields": {"backend": backend.url, "reason": reason}})

    def answered(self, backend: Backend, status: int) -> None:
        """Passive health from a finished exchange: repeated 5xx answers bench a backend."""
        if status >= 500:
            backend.server_errors += 1
            if backend.server_errors >= SERVER_ERRORS_TO_BENCH:
                backend.server_errors = 0
                self.failed(backend, f"{SERVER_ERRORS_TO_BENCH} answers with status {status} in a row")
        else:
            backend.server_errors = 0

    # --- listings -------------------------------------------------------------------------------

    async def gather_listing(self, path: str, field_name: str) -> list[dict[str, Any]]:
        """`path` (/api/tags, /api/ps or /v1/models) from every available backend, merged:
        the first backend's entry wins for a name several have, order as the backends sent it."""
        now = time.monotonic()
        available = [b for b in self.backends if b.available(now)]
        if not available:
            raise ServiceUnavailable("No healthy Ollama backend can answer right now.", retry_after=5)
        answers = await asyncio.gather(*(self._list(b, path, field_name) for b in available))
        if all(answer is None for answer in answers):
            raise BadGateway("No backend answered the model list.")
        merged: dict[str, dict[str, Any]] = {}
        for answer in answers:
            for entry in answer or []:
                name = models.normalize(str(entry.get("id") or entry.get("name") or entry.get("model") or ""))
                merged.setdefault(name, entry)
        return list(merged.values())

    async def _list(self, backend: Backend, path: str, field_name: str) -> list[dict[str, Any]] | None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT * 5):
                return _entries(await self._json(backend.url + path, LISTING_HEADERS), field_name)
        except FETCH_ERRORS as exc:
            self.failed(backend, failure_reason(exc))
            return None

    async def _json(self, url: str, headers: dict[str, str]) -> dict[str, Any]:
        """GET a JSON object of at most MAX_LISTING_BYTES from a backend; raises one of
        FETCH_ERRORS otherwise."""
        body = bytearray()
        async with self.client.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    raise ListingTooLong(f"answered more than {MAX_LISTING_BYTES} bytes")
        document = orjson.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the answer is not a JSON object")
        return document

    # --- active health and model lists ---------------------------------------------------------

    async def check(self, backend: Backend) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                version = await self._json(backend.url + "/api/version", CHECK_HEADERS)
                listing = _entries(await self._json(backend.url + "/api/tags", CHECK_HEADERS), "models")
                try:
                    running: list[dict[str, Any]] | None = _entries(
                        await self._json(backend.url + "/api/ps", CHECK_HEADERS), "models"
                    )
                except FETCH_ERRORS:  # /api/ps only informs warm-before-cold: a backend without it still serves
                    running = None
        except FETCH_ERRORS as exc:
            backend.check_failures += 1
            backend.error = failure_reason(exc)
            if backend.healthy and backend.check_failures >= self.failures_to_mark_down:
                log.warning("backend unhealthy", extra={"fields": {"backend": backend.url, "error": backend.error}})
                backend.healthy = False
            return
        backend.check_failures = 0
        if not backend.healthy:
            log.info("backend healthy again", extra={"fields": {"backend": backend.url}})
        backend.healthy = True
        backend.benched_until = 0.0
        backend.error = None
        backend.version = str(version.get("version") or "") or None
        backend.models = frozenset(models.normalize(str(m.get("name", ""))) for m in listing)
        if running is not None:
            backend.loaded = frozenset(models.normalize(str(m.get("name") or m.get("model") or "")) for m in running)

    async def refresh(self) -> None:
        """Check every backend now; concurrent callers share one refresh."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._check_all())
        await asyncio.shield(self._refreshing)

    async def _check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def run(self) -> None:
        """Check every backend now and then again and again, each pause a little shorter than
        the interval at random. Workers started together, and every one's once-a-second
        writers, otherwise check in the same instant every time: their answers' parsing and
        the writers' batches would land on the same requests, adding to the same tail."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval * (1 - CHECK_JITTER * random.random()))  # noqa: S311  # nosec B311

    def readiness(self) -> dict[str, Any]:
        if not self.backends:
            return {"ok": False, "error": "no backend is configured (OLLAMA_BACKENDS is empty)"}
        each = {backend.url: backend.state() for backend in self.backends}
        return {"ok": any(state["ok"] for state in each.values()), "each": each}


def _entries(document: dict[str, Any], field_name: str) -> list[dict[str, Any]]:
    entries = document.get(field_name)
    return [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed check that never repeats a URL (it may carry a password)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"answered HTTP {exc.response.status_code}"
    if isinstance(exc, ListingTooLong):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


# --- the configured list, as add-backend / remove-backend edit it -----------------------------------


@dataclass(frozen=True)
class BackendsChange:
    changed: bool
    urls: tuple[str, ...]
    line: str  # the OLLAMA_BACKENDS=… line the file has (or should have)
    was_set: bool  # the file set OLLAMA_BACKENDS before


def plan_backends_change(path: Path, url: str, add: bool) -> tuple[BackendsChange, str]:
    """The new OLLAMA_BACKENDS for the .env file at `path` after adding or removing `url`, and
    the file's new text. A missing file or variable counts as an empty list."""
    if ";" in url:  # `URL;slots=N`: the backend with its own slot count
        ((canonical, slots),) = config.backend_specs(url, "URL").items()
    else:
        canonical, slots = config.parse_backend_url(url, "URL"), None
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    values = envfile.parse(text, source=str(path))
    was_set = "OLLAMA_BACKENDS" in values
    current = config.backend_specs(values.get("OLLAMA_BACKENDS", ""))
    wanted = dict(current)
    if add:
        # Adding a listed backend again keeps its slots unless new ones are given.
        wanted[canonical] = slots if slots is not None else current.get(canonical)
    else:
        wanted.pop(canonical, None)
    value = ",".join(config.render_backend(u, n) for u, n in wanted.items())
    line = envfile.render_assignment("OLLAMA_BACKENDS", value)
    return BackendsChange(wanted != current, tuple(wanted), line, was_set), envfile.with_variable(
        text, "OLLAMA_BACKENDS", value
    )
