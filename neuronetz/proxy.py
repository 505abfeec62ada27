"""Forward one request to one backend and stream the answer back.

What goes to the backend is built here, not copied: the canonical path of the matched route, an
allow-list of request headers (so `Authorization`, cookies, `Origin` and hop-by-hop headers
never reach Ollama), and `Host` set for the backend, which Ollama checks on loopback
(docs/ollama.md §6). The answer goes back chunk by chunk through a relay (relay.py) that
reads the usage on the way.

`Forwarder` chooses the backend (through a backend slot when the gateway queues) and fails
over to the next while nothing reached the client, as Caddy's `proxyLoopIteration` does.

Failures map to statuses in one place, `backend_error`: before any byte from the backend a
connect failure is `BackendUnreachable` (the caller may try another backend, because nothing
reached this one), a timeout 504 and anything else 502. After the answer started, the
stream is ended with an error record in the caller's dialect — Ollama itself sends none on
`/v1`, which leaves clients with a silently truncated answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

from neuronetz import __version__, dialects, http
from neuronetz.auth import KeyRecord
from neuronetz.backends import Backend, BackendPool
from neuronetz.errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable, error_body
from neuronetz.http import Request
from neuronetz.relay import BodyRelay, NdjsonRelay, Outcome, RecordTooLong, SseRelay
from neuronetz.slots import Scheduler
from neuronetz.types import Send

log = logging.getLogger("neuronetz.proxy")
# Request headers a backend may see. Everything else — Authorization, Cookie, Origin (which
# makes Ollama answer 403), Forwarded/X-Forwarded-*, hop-by-hop headers — stays here.
# anthropic-version / anthropic-beta select behaviour on /v1/messages; x-api-key (a gateway
# key on that route) is not here and so never forwarded. X-Request-ID is the gateway's own (below).
FORWARDED_REQUEST_HEADERS = (b"content-type", b"accept", b"user-agent", b"anthropic-version", b"anthropic-beta")
USER_AGENT = f"neuronetz-gateway/{__version__}".encode()
NDJSON = b"application/x-ndjson"
# Ollama's final record and OpenAI's finish/usage events count as chunks too: allow for them
# before deciding that a backend ignored the output cap.
CAP_SLACK = 3
EVENT_STREAM = b"text/event-stream"
DEFAULT_CONTENT_TYPE = b"application/json"
# A Content-Type goes back to the client as it came: only visible ASCII, space and tab (RFC 9110
# §5.5 field-value, without obs-text), so a backend cannot break or smuggle a response head.
CONTENT_TYPE_BYTES = frozenset(range(0x20, 0x7F)) | {0x09}


@dataclass(frozen=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float
    total: float

    @functools.cached_property
    def extension(self) -> dict[str, float]:
        """httpx's timeout extension: reads are the idle timeout between chunks."""
        return {"connect": self.connect, "read": self.idle, "write": self.idle, "pool": 5.0}


class BackendUnreachable(Exception):
    """Nothing reached the backend (or it said "busy" before answering): safe to retry elsewhere."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.reason = reason


@dataclass(slots=True)
class Exchange:
    """One request's passage through the gateway, filled in as it goes and read at the end
    by the limiter (usage), the metrics, the request log line and the audit row."""

    # Times are time.perf_counter(): uvloop's loop.time() has millisecond resolution.
    started_at: float  # when the request arrived
    model: str | None = None
    backend: str | None = None  # set while a backend has (or may have) the request
    status: int = 0
    error_code: str | None = None
    stream: bool = False
    started: bool = False  # the response head went to the client
    ended: bool = False  # the answer's last body message went to the client
    forwarded_at: float | None = None  # time the request went to the backend
    backend_head_at: float | None = None  # time the backend's response head arrived
    first_byte_at: float | None = None  # time the first body byte went to the client
    bytes_in: int = 0
    bytes_out: int = 0
    disconnected: bool = False
    queue_wait_ms: float | None = None  # time spent waiting for a backend slot (slots.py)
    prompt: dict[str, Any] | None = None  # kept only for keys that log prompts
    removed_tools: str | None = None  # server-side tools taken out of the request (dialects.py)
    outcome: Outcome = field(default_factory=Outcome)
    # Called once the answer is whole and its usage read, before its last bytes go to the
    # client (app.py settles the request's limits there): a client that sends its next request
    # the moment this one ended must find its slot free. Errors and cancellations settle after.
    complete: Callable[[], None] | None = None


def backend_error(exc: BaseException, backend: str) -> GatewayError | BackendUnreachable:
    """The one mapping of backend failures (Caddy's statusError): unreachable before any byte
    → retry elsewhere; timeouts → 504; everything else → 502."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendUnreachable(backend, "connection failed")
    if isinstance(exc, httpx.PoolTimeout):
        return ServiceUnavailable("Too many requests are waiting for this backend; retry shortly.", retry_after=1)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return GatewayTimeout("The backend did not answer in time.")
    return BadGateway("The backend failed while answering.")


@functools.lru_cache(maxsize=1024)
def backend_url(backend: str, path: str) -> httpx.URL:
    """The URL of `path` on `backend`, parsed once: httpx parses a URL given as text on every
    request (about 4 % of a proxied request's CPU, tests/bench/profile_gateway.py), while a URL
    object passes through as it is. Paths are the routes' canonical ones (plus a
    model name on /v1/models/{model}), so few distinct pairs ever come by."""
    return httpx.URL(backend + path)


def backend_headers(request: Request, backend_host: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", backend_host.encode())]
    for name in FORWARDED_REQUEST_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            headers.append((name, value))
    if b"user-agent" not in request.headers:
        headers.append((b"user-agent", USER_AGENT))
    # The gateway's id, always: the client's only when it was sane (http.Request), so the
    # backend's logs name the request exactly as the response, the log line and the audit do.
    headers.append((b"x-request-id", request.request_id.encode()))
    return headers


def error_record(openai: bool, message: str, code: str) -> bytes:
    """The record that ends a stream that failed after it started, in the caller's dialect."""
    body = error_body(openai, message, "api_error", code)
    return b"data: " + body + b"\n\n" if openai else body + b"\n"


@dataclass(frozen=True)
class Forwarder:
    """Forwarding with failover: what a worker needs to reach any of its backends."""

    transport: httpx.AsyncBaseTransport
    backends: BackendPool
    slots: Scheduler
    timeouts: Timeouts
    max_record: int

    async def forward(
        self,
        request: Request,
        send: Send,
        exchange: Exchange,
        model: str | None,
        path: str,
        body: bytes | None,
        *,
        queue_as: KeyRecord | None = None,
        strip_usage: bool = False,
        cap: int | None = None,
    ) -> None:
        """`forward` to a backend chosen for `model`, and to the next one while the previous
        could not be reached (nothing reached it, nothing reached the client). With
        `queue_as`, the request first waits for a backend slot in that key's turn."""
        tried: set[Backend] = set()
        last: BackendUnreachable | None = None
        while True:
            slot = await self.slots.acquire(queue_as, model, frozenset(tried)) if queue_as is not None else None
            if slot is not None:
                _add_queue_wait(request, exchange, slot.waited)
            try:
                backend = slot.backend if slot is not None else await self.backends.choose(model, frozenset(tried))
            except ServiceUnavailable:
                if last is None:
                    raise
                if last.reason.startswith("busy"):
                    raise ServiceUnavailable("Every backend is busy; retry shortly.", retry_after=2) from None
                raise BadGateway("No backend could be reached.") from None
            backend.in_flight += 1
            try:
                await forward(
                    self.transport, backend.url, backend.host, path, request, body, send, exchange,
                    self.timeouts, self.max_record, strip_usage=strip_usage, cap=cap,
                )  # fmt: skip
            except BackendUnreachable as exc:
                exchange.backend = None
                if not exc.reason.startswith("busy"):
                    self.backends.failed(backend, exc.reason)
                tried.add(backend)
                last = exc
                continue
            finally:
                backend.in_flight -= 1
                if slot is not None:
                    self.slots.release(slot)
            self.backends.answered(backend, exchange.status)
            return


def _add_queue_wait(request: Request, exchange: Exchange, waited: float) -> None:
    """Count a slot wait; after a failover the request waited again: one header, the total."""
    exchange.queue_wait_ms = (exchange.queue_wait_ms or 0.0) + waited * 1000
    headers = request.response_headers
    headers[:] = [header for header in headers if header[0] != b"x-queue-wait-ms"]
    headers.append((b"x-queue-wait-ms", str(round(exchange.queue_wait_ms)).encode()))


async def forward(
    transport: httpx.AsyncBaseTransport,
    backend: str,
    backend_host: str,
    path: str,
    request: Request,
    body: bytes | None,
    send: Send,
    exchange: Exchange,
    timeouts: Timeouts,
    max_record: int,
    *,
    strip_usage: bool = False,
    cap: int | None = None,
) -> None:
    """Send `body` to `backend` + `path` and relay the answer to the client through `send`.

    Raises BackendUnreachable while nothing has been sent to the client and the backend
    cannot have processed the request; GatewayError for other failures before the answer
    started. After it started, failures end the stream with an error record instead.
    A stream that runs past `cap` completion tokens (a backend ignoring the cap it was
    given) is cut there, so a budget is never overspent by more than the prompt estimate;
    a whole answer past it is a backend error, charged what the backend reported. One
    stream record (line, event) longer than `max_record` bytes ends the stream.
    """
    exchange.backend = backend
    # An httpx.Request handed straight to the transport: AsyncClient.send and build_request
    # would add cookies, auth, redirects, event hooks and default headers the gateway never
    # uses, for about a fifth of a proxied request's CPU (tests/bench/bench_gateway.py). The body
    # goes as a ready stream: `content=` would have httpx look through the headers again to add
    # Content-Length, which our transport adds itself (transport.py).
    outgoing = httpx.Request(
        request.method,
        backend_url(backend, path),
        headers=backend_headers(request, backend_host),
        stream=httpx.ByteStream(body or b""),
        extensions={"timeout": timeouts.extension, "first_byte_timeout": timeouts.first_byte},
    )
    try:
        async with asyncio.timeout(timeouts.total):
            await _exchange(transport, outgoing, backend, request, send, exchange, max_record, strip_usage, cap)
    except TimeoutError:
        if not exchange.started:
            raise GatewayTimeout("The backend did not finish in time.") from None
        await end_with_error(send, request, exchange, "The backend did not finish in time.", "backend_timeout")


async def _exchange(
    transport: httpx.AsyncBaseTransport,
    outgoing: httpx.Request,
    backend: str,
    request: Request,
    send: Send,
    exchange: Exchange,
    max_record: int,
    strip_usage: bool,
    cap: int | None,
) -> None:
    exchange.forwarded_at = time.perf_counter()
    try:
        response = await transport.handle_async_request(outgoing)
    except httpx.HTTPError as exc:
        raise backend_error(exc, backend) from None
    exchange.backend_head_at = time.perf_counter()
    try:
        status = response.status_code
        if status == 503:
            # Ollama's "server busy" (queue full) comes before any work: another backend may
            # take it (docs/ollama.md §9.10). The caller decides; nothing was sent yet.
            raise BackendUnreachable(backend, "busy (503)")
        content_type, length = _head(response)
        exchange.status = status
        outcome = exchange.outcome
        outcome.refused = status >= 400
        relay: NdjsonRelay | SseRelay | BodyRelay | dialects.EventRelay
        if request.dialect is not None:  # typed events or a whole answer of an agent dialect
            exchange.stream = content_type.startswith(EVENT_STREAM)
            relay = (
                dialects.EventRelay(outcome, request.dialect, max_record)
                if exchange.stream
                else dialects.WholeRelay(outcome, max_record)
            )
        elif content_type.startswith(NDJSON):
            relay, exchange.stream = NdjsonRelay(outcome, max_record), True
        elif content_type.startswith(EVENT_STREAM):
            relay, exchange.stream = SseRelay(outcome, strip_usage, max_record), True
        else:
            relay = BodyRelay(outcome, request.openai, max_record)
        extra: list[tuple[bytes, bytes]] = []
        whole: int | None = None  # the length of a whole answer that declared it
        if not exchange.stream and length is not None and length.isascii() and length.isdigit():
            extra.append((b"content-length", length))
            whole = int(length)
        await _start(send, request, exchange, status, content_type, extra)
        held = b""  # an answer of declared length: its latest bytes, the last ones sent once it is complete
        try:
            async for chunk in cast(httpx.AsyncByteStream, response.stream):
                forwarded = relay.feed(chunk)
                if forwarded:
                    if whole is None:
                        await _body(send, exchange, forwarded)
                    else:
                        if held:
                            await _body(send, exchange, held, whole)
                        held = forwarded
                if cap is not None and exchange.stream and outcome.usage.completion_tokens > cap + CAP_SLACK:
                    message = "The answer reached the output token limit and was cut off."
                    await end_with_error(send, request, exchange, message, "max_tokens_reached")
                    return
        except httpx.HTTPError as exc:
            failure = backend_error(exc, backend)
            message = failure.message if isinstance(failure, GatewayError) else "The backend connection failed."
            code = failure.code if isinstance(failure, GatewayError) else "backend_error"
            await end_with_error(send, request, exchange, message, code)
            return
        except RecordTooLong:
            message = f"The backend sent a record longer than {max_record} bytes; the answer was cut off."
            _distrust(request, message)
            await end_with_error(send, request, exchange, message, "backend_error")
            return
        if isinstance(relay, BodyRelay):
            relay.close()
            if cap is not None and outcome.usage.completion_tokens > cap + CAP_SLACK:
                outcome.invalid = "The backend ignored the output token limit."
        else:
            last = relay.close()
            if last:
                await _body(send, exchange, last)
            if not outcome.finished and outcome.error is None and status == 200:
                # The backend closed a stream cleanly but without its final record.
                await end_with_error(send, request, exchange, "The backend ended the answer early.", "backend_error")
                return
        if outcome.invalid is not None:
            _distrust(request, outcome.invalid)
        if outcome.error is not None or outcome.invalid is not None:
            # The backend's own error record, passed on, or an answer that cannot be trusted:
            # audited as a backend error.
            exchange.error_code = "backend_error"
        if exchange.complete is not None:
            exchange.complete()
        if held:
            await _body(send, exchange, held, whole)
        if not exchange.ended:
            await http.finish(send)
    finally:
        await response.aclose()


def _distrust(request: Request, reason: str) -> None:
    """One line for an answer whose usage could not be read as sent; the request's own log
    line (same request id) names the backend and what was charged."""
    log.warning("backend answer not trusted", extra={"fields": {"request_id": request.request_id, "reason": reason}})


def _head(response: httpx.Response) -> tuple[bytes, bytes | None]:
    """The backend's Content-Type and Content-Length as sent, in one pass over the raw
    headers (httpx's `headers.get` decodes every header to find one).

    The Content-Type is the first one sent, or application/json when there is none; one that
    could not go back to a client unchanged is refused before the answer starts, so the
    client gets a 502 in its dialect rather than a broken head. The Content-Length values are
    joined as httpx's `get` joins them: several are then not a plain number, which the caller
    does not pass on."""
    content_type: bytes | None = None
    lengths: list[bytes] = []
    for name, value in response.headers.raw:
        lowered = name.lower()
        if lowered == b"content-type" and content_type is None:
            if not value or not CONTENT_TYPE_BYTES.issuperset(value):
                raise BadGateway("The backend answered with an invalid Content-Type.")
            content_type = value
        elif lowered == b"content-length":
            lengths.append(value)
    return content_type or DEFAULT_CONTENT_TYPE, b", ".join(lengths) if lengths else None


async def _start(
    send: Send, request: Request, exchange: Exchange, status: int, content_type: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    if exchange.stream:
        # Tell buffering proxies in front (nginx; Caddy flushes streams by itself) not to hold events.
        extra = [*extra, (b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]
    await http.start(send, request, status, content_type, extra)
    exchange.started = True


async def _body(send: Send, exchange: Exchange, chunk: bytes, whole: int | None = None) -> None:
    if exchange.first_byte_at is None:
        exchange.first_byte_at = time.perf_counter()
    exchange.bytes_out += len(chunk)
    if exchange.bytes_out == whole:
        # The last bytes of an answer of declared length end it as well: one ASGI send, and
        # one wake-up of Granian's runtime thread, fewer per request than a separate end.
        exchange.ended = True
        await http.finish(send, chunk)
    else:
        await http.send_chunk(send, chunk)


async def end_with_error(send: Send, request: Request, exchange: Exchange, message: str, code: str) -> None:
    """End a started answer with an error record (or, when the head has not gone out yet
    because the answer is whole, nothing more can be said than the status)."""
    exchange.error_code = code
    if not exchange.started or exchange.ended:
        return
    if exchange.stream:
        dialect = request.dialect
        record = (
            dialects.stream_error(dialect, message, code) if dialect else error_record(request.openai, message, code)
        )
        await _body(send, exchange, record)
    await http.finish(send)
