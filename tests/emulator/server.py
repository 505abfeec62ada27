"""The route table, the request pipeline top to bottom, and the listening socket.

For every Ollama request: record it, route it, apply a before-the-first-byte fault, run the
handler, and turn an ``ApiError`` into the route's error shape. A path or method the table
does not have is gin's plain-text ``404 page not found``; the routes a gateway must never
forward are deliberately absent, so such a request is still recorded for a test to see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson

from . import agents, control, management, native, v1
from .connection import Connection, Exchange
from .decoding import ApiError
from .faults import BEFORE_RESPONSE, GENERATION, Fault
from .native import JSON_UTF8
from .state import State
from .v1 import V1_JSON, error_body

Handler = Callable[[Exchange], Awaitable[None]]

ROUTES: dict[str, dict[str, Handler]] = {
    "/api/version": {"HEAD": management.version, "GET": management.version},
    "/api/tags": {"HEAD": management.tags, "GET": management.tags},
    "/api/show": {"POST": management.show},
    "/api/ps": {"GET": management.ps},
    "/api/generate": {"POST": native.generate},
    "/api/chat": {"POST": native.chat},
    "/api/embed": {"POST": native.embed},
    "/api/embeddings": {"POST": native.embeddings},
    "/v1/chat/completions": {"POST": v1.chat_completions},
    "/v1/completions": {"POST": v1.completions},
    "/v1/embeddings": {"POST": v1.embeddings},
    "/v1/models": {"GET": v1.models},
    "/v1/responses": {"POST": agents.responses},
    "/v1/messages": {"POST": agents.messages},
}
MODEL_ROUTE = "/v1/models/"  # ``/v1/models/:model``: one non-empty path segment


def handler_for(method: str, path: str) -> Handler | None:
    rest = path.removeprefix(MODEL_ROUTE)
    if rest != path and rest and "/" not in rest:
        return v1.model if method == "GET" else None
    return ROUTES.get(path, {}).get(method)


_JUST_STATUS = frozenset({"status"})


def answer_error(exchange: Exchange, error: ApiError) -> None:
    if exchange.request.path == "/v1/messages":  # middleware/anthropic.go writes Anthropic's shape
        exchange.respond(error.status, agents.anthropic_error(error.status, error.message), V1_JSON)
    elif not exchange.v1:
        exchange.respond(error.status, orjson.dumps({"error": error.message}), JSON_UTF8)
    elif error.middleware:
        exchange.respond(error.status, error_body(error.status, error.message), JSON_UTF8)
    else:
        exchange.respond(error.status, error_body(error.status, error.message) + b"\n", V1_JSON)


def _model_of(exchange: Exchange) -> str | None:
    """The model a request is for, only needed when a fault is armed for one model."""
    path = exchange.request.path
    if path.startswith(MODEL_ROUTE):
        return path.removeprefix(MODEL_ROUTE)
    try:
        body = orjson.loads(exchange.request.body)
    except orjson.JSONDecodeError:
        return None
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None


async def _early_fault(exchange: Exchange, fault: Fault) -> None:
    if fault.kind == "drop":
        exchange.drop()
    elif fault.kind == "stall":
        await exchange.hold()
    elif fault.body is not None:
        exchange.respond(fault.status, fault.body.encode(), fault.content_type)
    else:
        answer_error(exchange, ApiError(fault.status, fault.message))


async def dispatch(exchange: Exchange) -> None:
    request = exchange.request
    if request.path.startswith("/_emulator/"):
        control.handle(exchange)
        return
    state = exchange.state
    state.note_request(request)
    state.enter()
    try:
        handler = handler_for(request.method, request.path)
        if handler is None:
            exchange.respond(404, b"404 page not found", "text/plain")
        else:
            kinds = _JUST_STATUS if request.path in GENERATION else BEFORE_RESPONSE
            fault = state.faults.take(request.path, _model_of(exchange) if state.faults.wants_model() else None, kinds)
            if fault is not None:
                await _early_fault(exchange, fault)
            else:
                await handler(exchange)
    except ApiError as error:
        answer_error(exchange, error)
    finally:
        state.leave()


class Server:
    """The listening socket; connections are tracked so ``stop`` can cut them."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen and return the bound port (useful with ``port=0``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self.state, dispatch, self.connections), host, port, backlog=4096, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.abort()
        await self._server.wait_closed()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it is what the gateway runs on, and it keeps the mock cheap (§8)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
