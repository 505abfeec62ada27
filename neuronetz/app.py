"""Composition root: the ASGI application, its lifespan and the request pipeline.

Granian imports `neuronetz.app:app` in every worker process. The lifespan opens one
`Worker` (worker.py) per worker. Every HTTP request runs through `App.handle`, and model
requests continue in `App.inference`; read together, top to bottom:

    normalise the path → block model-mutating endpoints → route → authenticate →
    read the body → check the model is allowed → admit (limits and budget reservation, one
    Redis round trip) → pick a backend → proxy and stream (failing over while nothing was
    sent; the client leaving cancels the backend at once) → settle the real usage (exactly
    once, also on errors and disconnects) → record: metrics, one JSON log line, audit row
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import orjson

from neuronetz import audit, config, dialects, llm_tokens, logs, metrics, models, proxy
from neuronetz.auth import KeyRecord, bearer_token
from neuronetz.errors import ANTHROPIC, BadRequest, Forbidden, GatewayError, NotFound, ServiceUnavailable
from neuronetz.http import (
    BodyReaders,
    DisconnectWatch,
    Request,
    client_address,
    parse_json,
    send_bytes,
    send_error,
    send_json,
)
from neuronetz.proxy import Exchange
from neuronetz.router import Route, Router, is_account, is_blocked, normalize_path
from neuronetz.types import Receive, Scope, Send
from neuronetz.worker import Worker

log = logging.getLogger("neuronetz.app")
GET = frozenset({"GET", "HEAD"})
GET_ONLY = frozenset({"GET"})
POST = frozenset({"POST"})
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
WATCH_AFTER = 0.05  # seconds into a forwarded request before its disconnect watcher starts
# How long a stopping worker waits for requests to finish before closing its writers. Streams
# still running then were cut by the drain (worker.py); what is left is their bookkeeping.
REQUESTS_PATIENCE = 5.0


@dataclass(frozen=True)
class Endpoint:
    """A forwarded route: where it goes on the backend and how its answer is read."""

    backend_path: str  # the canonical path sent to the backend
    kind: str  # "inference", "show", "listing" or "info"
    methods: frozenset[str] = POST
    stream_default: bool = False  # native generation streams unless told otherwise
    generates: bool = False  # produces completion tokens (not an embedding)
    usage_events: bool = False  # an OpenAI stream that can carry a usage event
    images: bool = False  # may carry base64 images: GATEWAY_MAX_BODY_BYTES, else the text limit


# Default deny: these and nothing else are forwarded (Ollama's server/routes.go for methods).
# Images travel only in generate/chat-like bodies (`images`, `image_url` and `input_image`
# parts, Anthropic `image` blocks); every other body is text, and gets the far smaller
# GATEWAY_MAX_TEXT_BODY_BYTES.
ENDPOINTS = {
    "/api/version": Endpoint("/api/version", "info", GET),
    "/api/tags": Endpoint("/api/tags", "listing", GET),
    "/api/ps": Endpoint("/api/ps", "listing", GET_ONLY),
    "/api/status": Endpoint("/api/status", "status", GET_ONLY),  # answered by the gateway: its own policy
    "/api/show": Endpoint("/api/show", "show"),
    "/api/generate": Endpoint("/api/generate", "inference", stream_default=True, generates=True, images=True),
    "/api/chat": Endpoint("/api/chat", "inference", stream_default=True, generates=True, images=True),
    "/api/embed": Endpoint("/api/embed", "inference"),
    "/api/embeddings": Endpoint("/api/embeddings", "inference"),
    "/v1/chat/completions": Endpoint(
        "/v1/chat/completions", "inference", generates=True, usage_events=True, images=True
    ),
    "/v1/completions": Endpoint("/v1/completions", "inference", generates=True, usage_events=True),
    "/v1/embeddings": Endpoint("/v1/embeddings", "inference"),
    "/v1/models": Endpoint("/v1/models", "listing", GET_ONLY),
    "/v1/models/{model}": Endpoint("/v1/models/", "show", GET_ONLY),
    "/v1/responses": Endpoint("/v1/responses", "inference", generates=True, images=True),
    "/v1/messages": Endpoint("/v1/messages", "inference", generates=True, images=True),
    # Ollama has no such route; Anthropic clients size their requests with it (README).
    "/v1/messages/count_tokens": Endpoint("/v1/messages/count_tokens", "count", images=True),
}


class App:
    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.requests: set[asyncio.Task[Any]] = set()  # being handled: a stop waits for them
        self.readers = BodyReaders(1, 1.0)  # replaced by the configured bounds in `attach`
        routes = [
            Route("/", GET, self.root, public=True),
            Route("/healthz", GET, self.healthz, public=True),
            Route("/readyz", GET, self.readyz, public=True),
            Route("/metrics", GET_ONLY, self.metrics, public=True),
        ]
        handlers = {
            "inference": self.inference, "show": self.show, "listing": self.listing, "info": self.info,
            "count": self.count_tokens, "status": self.status,
        }  # fmt: skip
        for path, endpoint in ENDPOINTS.items():
            routes.append(Route(path, endpoint.methods, partial(handlers[endpoint.kind], endpoint)))
        self.router = Router(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            task = asyncio.current_task()
            if task is None:  # Granian runs every request in a task; this is a bug if reached
                raise RuntimeError("an ASGI call must run inside a task")
            self.requests.add(task)
            try:
                await self.handle(scope, receive, send)
            finally:
                self.requests.discard(task)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            worker = await Worker.open(config.load(config.resolve_env_file(None)))
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": f"neuronetz could not start: {exc}"})
            return
        self.attach(worker)
        freeze_startup_objects()
        log.info("worker started", extra={"fields": {"backends": list(worker.backends.urls)}})
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown: Granian sends it once its connections are closed
        log.info("worker stopping")
        await self.finish_requests(REQUESTS_PATIENCE)
        await worker.close()
        log.info("worker stopped")
        await send({"type": "lifespan.shutdown.complete"})

    async def finish_requests(self, patience: float) -> None:
        """Wait for the requests still being handled. A connection is closed once the last byte
        of its answer is sent, which can be before the request's coroutine has settled its
        usage and handed over its audit record; closing the writers first would lose both."""
        pending = [task for task in self.requests if not task.done()]
        if not pending:
            return
        log.info("waiting for requests to finish", extra={"fields": {"requests": len(pending)}})
        _, left = await asyncio.wait(pending, timeout=patience)
        if left:
            log.error("requests unfinished at shutdown", extra={"fields": {"requests": len(left)}})

    def attach(self, worker: Worker) -> None:
        """Serve with `worker` (the lifespan's, or a test's)."""
        self.worker = worker
        self.readers = BodyReaders(worker.settings.max_body_readers, worker.settings.body_timeout)

    def _worker(self) -> Worker:
        if self.worker is None:
            raise ServiceUnavailable("The gateway is still starting.", retry_after=1)
        return self.worker

    # --- the pipeline -------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(time.perf_counter())
        try:
            path = normalize_path(scope.get("raw_path") or scope["path"].encode())
        except BadRequest as error:
            request = Request(scope, receive, "/")
            request.openai = scope["path"].startswith("/v1/")
            await send_error(send, request, error)
            self._count(None, error.status, exchange)
            return
        request = Request(scope, receive, path)
        route: Route | None = None
        try:
            if is_blocked(path):
                raise Forbidden(
                    "This endpoint changes the models on the server and is blocked by the gateway.",
                    code="endpoint_blocked",
                )
            if is_account(path):
                raise Forbidden(
                    "This endpoint acts for the server owner's ollama.com account and is blocked by the gateway.",
                    code="endpoint_blocked",
                )
            route, request.param = self.router.resolve(path, request.method)
            if not route.public:
                worker = self._worker()
                request.client = client_address(
                    request.client, request.headers.get(b"x-forwarded-for"), worker.settings.trusted_proxies
                )
                authorization = dialects.credential(
                    request.dialect, request.single_header(b"authorization"), request.single_header(b"x-api-key")
                )
                request.key = await worker.auth.authenticate(authorization, request.client)
            await route.handler(request, send, exchange)
        except GatewayError as error:
            exchange.status, exchange.error_code = error.status, error.code
            if not exchange.started:
                await send_error(send, request, error)
        except Exception:
            # A bug (Starlette's ServerErrorMiddleware is the model): the client still gets an
            # answer in its dialect with its request id, the log one traceback, the audit a row.
            log.exception("unexpected error", extra={"fields": {"request_id": request.request_id}})
            message = "The gateway failed unexpectedly; the error is logged under this request id."
            if exchange.started:
                await proxy.end_with_error(send, request, exchange, message, "internal_error")
            else:
                await send_error(send, request, GatewayError(message))
            exchange.status, exchange.error_code = 500, "internal_error"
        finally:
            if route is not None and route.public:
                pass  # health checks and scrapes are not requests worth recording
            elif route is None:
                self._count(None, exchange.status, exchange)
            else:
                self._record(request, route, exchange)

    async def _read(self, endpoint: Endpoint, request: Request, exchange: Exchange) -> tuple[bytes, dict[str, Any]]:
        """The request body, read within its route's bounds and parsed, and its model checked
        against the key's allow-list (a body without a model is the backend's to answer)."""
        settings = self._worker().settings
        raw = await request.body(_body_limit(settings, endpoint), self.readers)
        exchange.bytes_in = len(raw)
        body = parse_json(raw, settings.max_json_elements)
        model = exchange.model = _model_of(body)
        if model is not None:
            _key(request).check_model(model)
        return raw, body

    async def inference(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        worker = self._worker()
        key = _key(request)
        raw, body = await self._read(endpoint, request, exchange)
        model = exchange.model
        openai, dialect = request.openai, request.dialect
        if dialect is None:
            estimate = llm_tokens.estimate_prompt(body)
            requested = llm_tokens.requested_cap(body, openai, endpoint.generates)
        else:
            estimate, requested = dialects.estimate_prompt(body, dialect), dialects.requested_cap(body, dialect)
        removed = [] if key.allow_cloud or not endpoint.generates else dialects.remove_server_tools(body)
        if removed:
            # Removed, not refused: Codex declares web_search on every request.
            exchange.removed_tools = ",".join(removed)
            request.response_headers.append((dialects.REMOVED_TOOLS_HEADER, exchange.removed_tools.encode()))
        admission = await worker.limiter.admit(key.subject, estimate, requested)
        rewrite, strip_usage = bool(removed), False
        cap = None
        if admission is not None:
            request.response_headers.extend(admission.headers)
            cap = admission.cap if endpoint.generates else None
            if cap is not None and cap != requested:
                if dialect is None:
                    llm_tokens.set_cap(body, openai, cap)
                else:
                    dialects.set_cap(body, dialect, cap)
                rewrite = True
        if endpoint.usage_events and body.get("stream", endpoint.stream_default) is True:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Ask for the usage the client did not ask for, and take it out again on the
                # way back (relay.py): accounting needs it, the client must not see it.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                rewrite = strip_usage = True
        if key.log_prompts:
            exchange.prompt = _prompt_of(body)
            exchange.outcome.text = []

        def settle() -> None:
            # Synchronous (queued for the next Redis pipeline): a cancelled request settles too.
            exchange.complete = None  # once
            usage = exchange.outcome.usage
            if exchange.backend is None:  # nothing reached a backend: nothing to charge
                prompt, completion = 0, 0
            elif usage.exact or exchange.outcome.refused:
                # Counted by the backend; or refused by it (an error status or a whole error body),
                # which costs only what it reported (usually nothing), never the estimate.
                prompt, completion = usage.prompt_tokens, usage.completion_tokens
            else:  # cut short (disconnect, failure, unreadable counters): the estimate and the tokens seen
                prompt, completion = estimate, usage.completion_tokens
                usage.prompt_tokens = estimate
            worker.limiter.settle(admission, key.subject, prompt, completion, model=_ledger_model(model))

        exchange.complete = settle  # before the answer's last bytes, when it completes (proxy.py)
        try:
            async with self._forwarding(request, send, exchange):
                await worker.forwarder.forward(
                    request, send, exchange, model, endpoint.backend_path, orjson.dumps(body) if rewrite else raw,
                    queue_as=key, strip_usage=strip_usage, cap=cap,
                )  # fmt: skip
        finally:
            if exchange.complete is not None:  # it did not complete: an error, a disconnect
                settle()

    async def show(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        raw: bytes | None
        if request.param is not None:  # /v1/models/{model}
            exchange.model, raw = request.param, None
            _key(request).check_model(request.param)
            path = endpoint.backend_path + quote(request.param, safe=":/")
        else:
            raw, _ = await self._read(endpoint, request, exchange)
            path = endpoint.backend_path
        async with self._forwarding(request, send, exchange) as worker:
            await worker.forwarder.forward(request, send, exchange, exchange.model, path, raw)

    async def count_tokens(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        """POST /v1/messages/count_tokens, answered here from the gateway's prompt estimate:
        authenticated, checked against the model allow-list and counted as a request (RPM),
        but it generates nothing, so it spends no tokens."""
        worker = self._worker()
        key = _key(request)
        _, body = await self._read(endpoint, request, exchange)
        if exchange.model is None:
            raise BadRequest("The field 'model' is required.")
        admission = await worker.limiter.admit(key.subject, 0, 0)
        if admission is not None:
            request.response_headers.extend(admission.headers)
        worker.limiter.settle(admission, key.subject, 0, 0, model=_ledger_model(exchange.model))
        exchange.status = 200
        await send_json(send, request, 200, {"input_tokens": dialects.estimate_prompt(body, ANTHROPIC)})

    async def info(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        async with self._forwarding(request, send, exchange) as worker:
            await worker.forwarder.forward(request, send, exchange, None, endpoint.backend_path, None)

    async def listing(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        """/api/tags, /api/ps and /v1/models: every available backend's list, merged without
        duplicates and reduced to the models this key may use."""
        worker = self._worker()
        key = _key(request)
        openai = request.openai
        entries = await worker.backends.gather_listing(endpoint.backend_path, "data" if openai else "models")
        allowed = [e for e in entries if key.allows(str(e.get("id" if openai else "name", "")))]
        body = {"object": "list", "data": allowed or None} if openai else {"models": allowed}
        exchange.status = 200
        await send_json(send, request, 200, body)

    @contextlib.asynccontextmanager
    async def _forwarding(self, request: Request, send: Send, exchange: Exchange) -> AsyncIterator[Worker]:
        """Around a forward (proxy.Forwarder): the client going away cancels it at once, and so
        does the drain at a stop, which ends an answer already started with an error record."""
        worker = self._worker()
        task = asyncio.current_task()
        if task is None:  # __call__ refuses to run outside a task: never reached
            raise RuntimeError("forwarding must run inside a task")
        watch = DisconnectWatch(request, task, WATCH_AFTER)
        worker.in_flight.add(task)
        try:
            yield worker
        except asyncio.CancelledError:
            if not (watch.disconnected or worker.draining):
                raise
            task.uncancel()
            if watch.disconnected:
                exchange.disconnected = True
            elif exchange.started:
                await proxy.end_with_error(
                    send, request, exchange, "The gateway is restarting; the answer was cut off.", "gateway_restart"
                )
            else:
                raise ServiceUnavailable("The gateway is restarting; retry.", retry_after=1) from None
        finally:
            worker.in_flight.discard(task)
            watch.close()
            if watch.disconnected and task.cancelling():
                # The client left just as the answer ended: the watcher's cancellation is still
                # pending and would hit the settlement that comes next. Nobody is waiting for it.
                task.uncancel()
                exchange.disconnected = True

    async def status(self, endpoint: Endpoint, request: Request, send: Send, exchange: Exchange) -> None:
        """GET /api/status in Ollama's shape, but the gateway's policy for this key: whether it
        may use cloud models, not whether the backend is signed in to ollama.com."""
        exchange.status = 200
        await send_json(send, request, 200, {"cloud": {"disabled": not _key(request).allow_cloud, "source": "gateway"}})

    # --- public routes ------------------------------------------------------------------------

    async def root(self, request: Request, send: Send, exchange: Exchange) -> None:
        """`GET /` and `HEAD /` as Ollama answers them, without a key: clients probe it to find
        out whether an Ollama is there, and the answer says nothing more than that."""
        await send_bytes(send, request, 200, b"Ollama is running", content_type=b"text/plain; charset=utf-8")

    async def healthz(self, request: Request, send: Send, exchange: Exchange) -> None:
        await send_json(send, request, 200, {"status": "ok"})

    async def readyz(self, request: Request, send: Send, exchange: Exchange) -> None:
        """Ready or not, with the names of the failing checks. The detail — backend URLs,
        versions, model lists, requests in flight — maps the internal network, so only a
        caller with the metrics token sees it; a failure's detail also goes to the log."""
        if self.worker is None:
            await send_json(send, request, 503, {"status": "starting"})
            return
        checks = await self.worker.readiness()
        failing = [name for name, check in checks.items() if not check["ok"]]
        status = 503 if failing else 200
        if failing:
            log.warning("not ready", extra={"fields": {"failing": failing, "checks": checks}})
        if self._metrics_token_presented(self.worker, request):
            await send_json(send, request, status, {"status": "not ready" if failing else "ready", **checks})
        else:
            await send_json(send, request, status, {"status": "not ready" if failing else "ready", "failing": failing})

    async def metrics(self, request: Request, send: Send, exchange: Exchange) -> None:
        """Prometheus text for this instance (all its workers). Requires GATEWAY_METRICS_TOKEN
        as a bearer token; without one configured, the route does not exist."""
        worker = self._worker()
        if not worker.settings.metrics_token:
            raise NotFound("There is no route /metrics on this gateway (set GATEWAY_METRICS_TOKEN to enable it).")
        if not self._metrics_token_presented(worker, request):
            raise Forbidden("GET /metrics needs `Authorization: Bearer <GATEWAY_METRICS_TOKEN>`.", code="forbidden")
        await send_bytes(send, request, 200, await worker.metrics_text(), content_type=PROMETHEUS)

    @staticmethod
    def _metrics_token_presented(worker: Worker, request: Request) -> bool:
        expected = worker.settings.metrics_token
        presented = bearer_token(request.single_header(b"authorization")) or ""
        return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())

    # --- recording ----------------------------------------------------------------------------

    def _count(self, route: Route | None, status: int, exchange: Exchange) -> None:
        """Metrics for a request refused before it reached authentication."""
        if self.worker is not None:
            key = metrics.labels(route=route.path if route else "unmatched", status=str(status), model="")
            self.worker.metrics.inc("neuronetz_requests_total", key=key)

    def _record(self, request: Request, route: Route, exchange: Exchange) -> None:
        """Metrics, the request's JSON log line and its audit row (and prompt row, if the key
        opted in). Never a secret or a prompt in the first three."""
        worker = self.worker
        if worker is None:
            return
        duration = time.perf_counter() - exchange.started_at
        status = exchange.status or (499 if exchange.disconnected else 500)
        key = request.key if isinstance(request.key, KeyRecord) else None
        ttfb = (exchange.first_byte_at - exchange.started_at) * 1000 if exchange.first_byte_at is not None else None
        self._observe(worker, route, exchange, key, status, duration)
        usage = exchange.outcome.usage
        logs.request_line(
            {
                "request_id": request.request_id,
                "tenant": key.tenant if key else None,
                "key": key.prefix if key else None,
                "method": request.method,
                "route": route.path,
                "model": exchange.model,
                "backend": exchange.backend,
                "status": status,
                "error": exchange.error_code,
                "stream": exchange.stream,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "ttfb_ms": round(ttfb, 2) if ttfb is not None else None,
                "duration_ms": round(duration * 1000, 2),
                "disconnected": exchange.disconnected,
                "queue_wait_ms": round(exchange.queue_wait_ms, 1) if exchange.queue_wait_ms is not None else None,
            }
        )
        created = dt.datetime.fromtimestamp(time.time() - duration, dt.UTC)
        record = audit.Record(
            created_at=created, request_id=request.request_id, tenant_id=key.tenant_id if key else None,
            key_prefix=key.prefix if key else None, client_addr=_inet(request.client), method=request.method,
            route=route.path, model=exchange.model, backend=exchange.backend, status=status,
            error_code=exchange.error_code, stream=exchange.stream, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, bytes_in=exchange.bytes_in, bytes_out=exchange.bytes_out,
            ttfb_ms=ttfb, duration_ms=duration * 1000, disconnected=exchange.disconnected,
            removed_tools=exchange.removed_tools, queue_wait_ms=exchange.queue_wait_ms,
        )  # fmt: skip
        prompt = None
        if key is not None and key.log_prompts and key.prompt_ttl_days and exchange.prompt is not None:
            prompt = audit.Prompt(
                created_at=created, request_id=request.request_id, tenant_id=key.tenant_id, key_prefix=key.prefix,
                model=exchange.model, expires_at=created + dt.timedelta(days=key.prompt_ttl_days),
                request=orjson.dumps(exchange.prompt).decode(), response="".join(exchange.outcome.text or []),
            )  # fmt: skip
        worker.audit.submit(record, prompt)

    def _observe(
        self, worker: Worker, route: Route, exchange: Exchange, key: KeyRecord | None, status: int, duration: float
    ) -> None:
        """The request in the metrics: its count and times, its tokens (by model, and by tenant),
        and why it was refused, if a limit refused it."""
        registry = worker.metrics
        model_label = self._model_label(worker, exchange.model)
        registry.inc(
            "neuronetz_requests_total", key=metrics.labels(route=route.path, status=str(status), model=model_label)
        )
        registry.observe("neuronetz_request_duration_seconds", duration, metrics.labels(route=route.path))
        if exchange.forwarded_at is not None:
            waited = (exchange.queue_wait_ms or 0.0) / 1000  # waiting for a slot is not overhead
            registry.observe("neuronetz_gateway_overhead_seconds", exchange.forwarded_at - exchange.started_at - waited)
            if exchange.backend_head_at is not None:
                registry.observe(
                    "neuronetz_backend_first_byte_seconds", exchange.backend_head_at - exchange.forwarded_at
                )
        usage = exchange.outcome.usage
        if usage.prompt_tokens or usage.completion_tokens:
            for direction, count in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
                registry.inc("neuronetz_tokens_total", count, metrics.labels(direction=direction, model=model_label))
                if key is not None:
                    registry.inc(
                        "neuronetz_tenant_tokens_total", count, metrics.labels(direction=direction, tenant=key.tenant)
                    )
        if exchange.error_code in ("rate_limit_exceeded", "budget_exceeded", "queue_full", "queue_timeout"):
            registry.inc("neuronetz_refusals_total", key=metrics.labels(reason=exchange.error_code))

    @staticmethod
    def _model_label(worker: Worker, model: str | None) -> str:
        """The model as a metrics label: only names some backend has, so a client cannot blow
        up the number of series with made-up names."""
        if not model:
            return ""
        name = models.normalize(model)
        return name if worker.backends.known(name) else "other"


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, classes, pools, caches: a few hundred
    thousand objects) out of the garbage collector's sight. A full collection otherwise walks
    them all, a pause of tens of milliseconds every few thousand requests that lands on
    whichever request is running; frozen, they are never walked again, and a full collection
    only sees what was made since. They all live as long as the worker anyway. The collection
    first keeps start-up garbage from being frozen with them (`gc.freeze`'s documentation)."""
    gc.collect()
    gc.freeze()


def _body_limit(settings: config.Settings, endpoint: Endpoint) -> int:
    if endpoint.images:
        return settings.max_body_bytes
    return min(settings.max_body_bytes, settings.max_text_body_bytes)


def _key(request: Request) -> KeyRecord:
    key = request.key
    if not isinstance(key, KeyRecord):  # routes without a key are marked public; reaching this is a bug
        raise RuntimeError("an authenticated route ran without a key")
    return key


def _model_of(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is None:
        return None  # the backend answers a missing model in its own words (400 or 404)
    if not isinstance(model, str):
        raise BadRequest("The field 'model' must be a string.")
    # No model name holds a control character, and the name goes into log lines, metrics
    # labels and Postgres text columns (which refuse U+0000): refused here, before anything.
    if not model.isprintable():
        raise BadRequest("The field 'model' contains control characters.")
    # Nor is any that long, and the name becomes part of a usage ledger row's key.
    if len(model) > models.MAX_LENGTH:
        raise BadRequest(f"The field 'model' is longer than {models.MAX_LENGTH} characters; no model name is.")
    return model


def _ledger_model(model: str | None) -> str:
    """The model as the usage ledger records it: normalised, so `Llama3.2` and `llama3.2:latest`
    share one row; '' when the request named none."""
    return models.normalize(model) if model else ""


def _prompt_of(body: dict[str, Any]) -> dict[str, Any]:
    """What prompt logging keeps of a request: its text, with images replaced by a marker."""
    kept: dict[str, Any] = {}
    for field in ("system", "prompt", "suffix", "input"):
        if field in body:
            kept[field] = body[field]
    messages = body.get("messages")
    if isinstance(messages, list):
        kept["messages"] = [_text_only(m) for m in messages if isinstance(m, dict)]
    return kept


def _text_only(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        content = [p if not (isinstance(p, dict) and p.get("type") == "image_url") else "[image]" for p in content]
    kept = {"role": message.get("role"), "content": content}
    if message.get("images"):
        kept["images"] = len(message["images"])
    return kept


@functools.lru_cache(maxsize=4096)
def _inet(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address for the audit row's `inet` column. Memoised: the same clients come
    back, and `ipaddress` parses in Python (about 2 % of a proxied request's CPU)."""
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


app = App()
