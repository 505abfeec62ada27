"""Request helpers over the ASGI scope and the response senders every handler uses.

A `Request` is built once per HTTP request by `app.py`; handlers read the body through it
(bounded: 413 past the limit, never more than the limit held in memory) and answer with
`send_json` / `send_bytes`, or with `start` + `send_chunk` + `finish` when streaming.
Every response start carries `request.response_headers` (X-Request-ID and, once admitted,
the rate-limit headers), so no handler can forget them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, Protocol

import orjson

from neuronetz.errors import (
    ANTHROPIC,
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    anthropic_body,
    dialect_of,
)
from neuronetz.types import Message, Receive, Scope, Send

JSON = b"application/json"
DRAIN_LIMIT = 1 << 20
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def client_address(peer: str, forwarded_for: bytes | None, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy (Caddy), in which
    case the right-most X-Forwarded-For entry that is not itself a trusted proxy. Entries
    left of that were written by the client and prove nothing."""
    if forwarded_for is None or not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return hop if _valid_ip(hop) else peer
    return peer


def _valid_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def new_request_id() -> str:
    return os.urandom(12).hex()


class Principal(Protocol):
    """Whoever a request authenticated as. `auth.KeyRecord` is the one implementation; the
    request layer names only this much of it, so it does not depend on authentication."""

    @property
    def prefix(self) -> str: ...

    @property
    def tenant(self) -> str: ...


class BodyReaders:
    """How many requests of this worker are receiving a body in pieces right now, bounded: a
    slow upload holds a connection, a task and a growing buffer, and counts toward no limit of
    its key until it has arrived, so past `limit` further such bodies are refused (503) at
    once. A body that arrives in one piece (a chat request, almost always) is never refused
    for this: it holds nothing while it waits, and a burst of a thousand of them is no attack,
    while refusing them would let a few hundred trickling uploads shut everyone out."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.active = 0


class Request:
    """One HTTP request: method, normalised path, headers and a bounded body reader."""

    __slots__ = (
        "client",
        "dialect",
        "headers",
        "key",
        "method",
        "openai",
        "param",
        "path",
        "receive",
        "request_id",
        "response_headers",
        "scope",
    )

    def __init__(self, scope: Scope, receive: Receive, path: str) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path = path
        # Header names arrive lower-cased (ASGI spec); a repeated header keeps its last value,
        # which is all the gateway ever needs (Content-Length, X-Request-ID) — except for
        # Authorization, where a repetition is refused (see `authorization`).
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        client = scope.get("client")
        self.client: str = client[0] if client else ""
        self.openai = path.startswith("/v1/")
        self.dialect = dialect_of(path)  # the agent dialects' errors and streams differ (dialects.py)
        sent_id = self.headers.get(b"x-request-id")
        self.request_id = sent_id.decode() if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id) else new_request_id()
        self.response_headers: list[tuple[bytes, bytes]] = [(b"x-request-id", self.request_id.encode())]
        self.param: str | None = None  # the route's captured parameter (/v1/models/{model})
        self.key: Principal | None = None  # set once authenticated

    def single_header(self, name: bytes) -> bytes | None:
        """The header `name` (lower case); BadRequest when it comes more than once. Used for
        credentials: RFC 9110 §11.6.2 allows one, and a proxy in front that reads the first
        while this gateway read the last would authorise one key and charge another."""
        value = self.headers.get(name)
        repeats = value is not None and len(self.headers) != len(self.scope["headers"])  # cheap: usually False
        if repeats and sum(1 for found, _ in self.scope["headers"] if found == name) > 1:
            header = name.decode().title()
            raise BadRequest(f"The request has more than one {header} header; send exactly one.")
        return value

    async def body(self, limit: int, readers: BodyReaders | None = None) -> bytes:
        """Read the whole body, refusing (413) anything larger than `limit` bytes.

        A declared Content-Length over the limit is refused before a byte is read; a
        chunked body is counted as it arrives and refused as soon as it crosses the limit.
        With `readers`, the body must arrive within its timeout (408) and at most its limit
        of bodies arriving in pieces are read at once in this worker (503 beyond).
        """
        if readers is None:
            return await self._read(limit, None)
        try:
            async with asyncio.timeout(readers.timeout):
                return await self._read(limit, readers)
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {readers.timeout:g} seconds; send it faster or in full."
            ) from None

    async def _read(self, limit: int, readers: BodyReaders | None) -> bytes:
        declared = self.headers.get(b"content-length")
        length: int | None = None  # chunked: unknown until its end
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise BadRequest("The Content-Length header is not a number.") from None
            if length > limit:
                if length - limit <= DRAIN_LIMIT:  # nothing read yet: the whole body is the remainder
                    await self._drain({"more_body": True}, length)
                raise _too_large(limit)
        parts: list[bytes] = []
        size = 0
        counted: BodyReaders | None = None  # the bound this body counts against, once in pieces
        try:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    # Granian reports a malformed chunked body exactly like a client that hung up
                    # mid-upload. Either way the body is incomplete: a 400 reaches the client that
                    # is still there, and costs nothing when it is gone.
                    raise BadRequest(
                        "The request body ended before it was complete (or its chunked framing is malformed)."
                    )
                chunk: bytes = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        await self._drain(message)
                        raise _too_large(limit)
                    parts.append(chunk)
                if not message.get("more_body", False):
                    break
                # Granian ends every body with an empty message: a body whose declared length
                # is all here has arrived whole, however many messages close it.
                if readers is not None and counted is None and (length is None or size < length):
                    if readers.active >= readers.limit:
                        raise ServiceUnavailable(
                            "The gateway is receiving too many request bodies; retry shortly.", retry_after=1
                        )
                    readers.active += 1
                    counted = readers
        finally:
            if counted is not None:
                counted.active -= 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _drain(self, message: Message, budget: int = DRAIN_LIMIT) -> None:
        """Read and drop up to `budget` more bytes of a refused body (a body only a little over
        its limit). Most clients send their whole body before they read the answer; closing on
        them mid-upload would turn a clear 413 into a connection reset. A bigger remainder is
        cut off (Granian closes)."""
        drained = 0
        while message.get("more_body", False) and drained < budget:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))

    async def wait_for_disconnect(self) -> None:
        """Return when the client disconnects. Granian reports a vanished client only through
        receive(), so a proxy must watch this while it forwards. An unread
        body (GET routes) is simply drained on the way to the disconnect message."""
        while (await self.receive())["type"] != "http.disconnect":
            pass


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the {limit} bytes this gateway accepts.")


class DisconnectWatch:
    """Cancels `task` when the client of `request` goes away, and says so in `disconnected`.

    Granian reports a vanished client only through receive(), so a task listens. It starts
    `after` seconds in: most answers are done by then, and a client that left earlier is
    still noticed at once when it starts. `close` stops it; call it exactly once."""

    def __init__(self, request: Request, task: asyncio.Task[Any], after: float) -> None:
        self.request = request
        self.task = task
        self.disconnected = False
        self._listener: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after, self._listen)

    def _listen(self) -> None:
        self._listener = asyncio.create_task(self._wait())

    async def _wait(self) -> None:
        await self.request.wait_for_disconnect()
        self.disconnected = True
        self.task.cancel()

    def close(self) -> None:
        self._timer.cancel()
        if self._listener is not None:
            self._listener.cancel()


def parse_json(raw: bytes, max_elements: int | None = None) -> dict[str, Any]:
    """A request body as a JSON object; anything else is a 400 that says what was wrong.

    Parsing amplifies: `[{},{},…]` costs about 25 bytes of Python objects per byte of body
    (a 32 MiB body became 1 GB and held the event loop for seconds). So the number of values
    is bounded before anything is parsed: every value but the first follows a `,` or opens a
    container, and counting those bytes runs at memory speed. Commas inside strings count
    too, which only makes the bound stricter for prose; base64 images contain none.
    """
    if not raw:
        raise BadRequest("The request body is empty; this endpoint expects a JSON object.")
    if max_elements is not None:
        elements = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
        if elements > max_elements:
            raise PayloadTooLarge(
                f"The request body has too many JSON elements ({elements} commas and brackets; "
                f"at most {max_elements} are accepted)."
            )
    value = orjson_loads(raw) if len(raw) <= ORJSON_LIMIT else _stdlib_loads(raw)
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.")
    return value


# orjson reserves about 13 bytes per byte of input before it parses (yyjson sizes its value
# pool for the densest document that length could hold): 416 MB for a 32 MiB image. Above
# this size the standard library's parser, half as fast and sized by what it finds, reads
# the body instead; below it orjson's speed wins and its reserve is small.
ORJSON_LIMIT = 1 << 20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def orjson_loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc.msg} (at character {exc.pos}).") from None


def _stdlib_loads(raw: bytes) -> Any:
    """The standard parser held to orjson's rules: UTF-8 only, no NaN/Infinity, integers
    beyond 64 bits read as floats, no lone surrogates — so whatever it returns, orjson can
    write again (a rewritten body, a prompt log) and Postgres can store."""
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, parse_int=_json_int, parse_float=_json_float
        )
    except json.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc.msg} (at character {exc.pos}).") from None
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid JSON: it is not UTF-8 text.") from None
    except RecursionError:
        raise BadRequest("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError as exc:  # from the hooks below
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _reject_lone_surrogates(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _json_int(text: str) -> int | float:
    if len(text) <= 20:  # also keeps int() far from its 4,300-digit limit
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return _json_float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("a number is too large for a double")
    return value


def _reject_lone_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("The request body is not valid JSON: a \\u escape is a lone surrogate.") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


async def start(
    send: Send, request: Request, status: int, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type), *request.response_headers]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_chunk(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def finish(send: Send, last: bytes = b"") -> None:
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def send_bytes(
    send: Send,
    request: Request,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *request.response_headers]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, request: Request, status: int, value: Any) -> None:
    await send_bytes(send, request, status, orjson.dumps(value))


async def send_error(send: Send, request: Request, error: GatewayError) -> None:
    body = anthropic_body(error) if request.dialect == ANTHROPIC else error.body(request.openai)
    await send_bytes(send, request, error.status, body, extra=error.headers())
