"""Request helpers over the ASGI scope and the response senders every handler uses.

A `Request` is built once per HTTP request by `app.py`; handlers read the body through it
(bounded: 413 past the limit, never more than the limit held in memory) and answer with
`send_json` / `send_bytes`, or with `start` + `send_chunk` + `finish` when streaming.
Every response start carries `request.response_headers` (X-Request-ID and, once admitted,
the rate-limit headers), so no handler can forget them.
"""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING, Any

import orjson

from neuronetz.dialects import ANTHROPIC
from neuronetz.dialects import error_body as anthropic_error
from neuronetz.dialects import of_path as dialect_of
from neuronetz.errors import BadRequest, GatewayError, PayloadTooLarge
from neuronetz.types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from neuronetz.auth import KeyRecord

JSON = b"application/json"
DRAIN_LIMIT = 1 << 20
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


class ClientDisconnected(Exception):
    """The client went away (http.disconnect) before the request finished."""


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
        "query",
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
        self.query: bytes = scope.get("query_string", b"")
        # Header names arrive lower-cased (ASGI spec); a repeated header keeps its last value,
        # which is all the gateway ever needs (Authorization, Content-Length, X-Request-ID).
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        client = scope.get("client")
        self.client: str = client[0] if client else ""
        self.openai = path.startswith("/v1/")
        self.dialect = dialect_of(path)  # the agent dialects' errors and streams differ (dialects.py)
        sent_id = self.headers.get(b"x-request-id")
        self.request_id = sent_id.decode() if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id) else new_request_id()
        self.response_headers: list[tuple[bytes, bytes]] = [(b"x-request-id", self.request_id.encode())]
        self.param: str | None = None  # the route's captured parameter (/v1/models/{model})
        self.key: KeyRecord | None = None  # set once authenticated

    async def body(self, limit: int) -> bytes:
        """Read the whole body, refusing (413) anything larger than `limit` bytes.

        A declared Content-Length over the limit is refused before a byte is read; a
        chunked body is counted as it arrives and refused as soon as it crosses the limit.
        """
        declared = self.headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise BadRequest("The Content-Length header is not a number.") from None
            if length > limit:
                if length - limit <= DRAIN_LIMIT:
                    await self._drain({"more_body": True})
                raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this gateway accepts.")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await self._drain(message)
                    raise PayloadTooLarge(f"The request body is larger than the {limit} bytes this gateway accepts.")
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _drain(self, message: Message) -> None:
        """Read and drop up to DRAIN_LIMIT more bytes of a refused body. Most clients send their
        whole body before they read the answer; closing on them mid-upload would turn a clear
        413 into a connection reset. A bigger remainder is cut off (Granian closes)."""
        drained = 0
        while message.get("more_body", False) and drained < DRAIN_LIMIT:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))

    async def wait_for_disconnect(self) -> None:
        """Return when the client disconnects. Granian reports a vanished client only through
        receive() (measurements.md), so a proxy must watch this while it forwards. An unread
        body (GET routes) is simply drained on the way to the disconnect message."""
        while (await self.receive())["type"] != "http.disconnect":
            pass


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; anything else is a 400 that says what was wrong."""
    if not raw:
        raise BadRequest("The request body is empty; this endpoint expects a JSON object.")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc.msg} (at character {exc.pos}).") from None
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.")
    return value


async def start(
    send: Send, request: Request, status: int, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type), *request.response_headers]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_chunk(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def finish(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


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
    body = anthropic_error(error) if request.dialect == ANTHROPIC else error.body(request.openai)
    await send_bytes(send, request, error.status, body, extra=error.headers())
