"""The route table, the request pipeline top to bottom, and the listening socket.

For every Ollama request: record it, apply the CORS and Host middlewares (they
run before routing in Ollama, so they also guard 404s), route it, apply a
before-the-first-byte fault, run the handler, and turn an ``ApiError`` into
the route's error shape.

Routing follows gin as Ollama configures it (§1): a lookup is FULL (path and
method known), PARTIAL (path known, method not: 405 with an ``Allow`` header,
since Ollama sets ``HandleMethodNotAllowed``) or NONE (404). Those bodies are
gin's plain-text defaults, not JSON.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from . import agents, control, management, native, v1
from .config import Config
from .connection import Connection, Exchange
from .decoding import ApiError
from .faults import BEFORE_RESPONSE, GENERATION, Fault
from .native import JSON_UTF8
from .state import State
from .v1 import V1_JSON, error_body

Handler = Callable[[Exchange], Awaitable[None]]


async def _not_emulated(exchange: Exchange) -> None:
    """Routes Ollama has that the emulator only knows by name, so 404 and 405 stay faithful."""
    raise ApiError(501, f"the emulator does not implement {exchange.request.path}")


ROUTES: dict[str, dict[str, Handler]] = {
    "/": {"HEAD": management.root, "GET": management.root},
    "/api/version": {"HEAD": management.version, "GET": management.version},
    "/api/status": {"GET": _not_emulated},
    "/api/pull": {"POST": management.pull},
    "/api/push": {"POST": management.push},
    "/api/tags": {"HEAD": management.tags, "GET": management.tags},
    "/api/show": {"POST": management.show},
    "/api/delete": {"DELETE": management.delete},
    "/api/me": {"POST": _not_emulated},
    "/api/signout": {"POST": _not_emulated},
    "/api/create": {"POST": management.create},
    "/api/copy": {"POST": management.copy},
    "/api/experimental/web_search": {"POST": _not_emulated},
    "/api/experimental/web_fetch": {"POST": _not_emulated},
    "/api/experimental/model-recommendations": {"GET": _not_emulated},
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
    "/v1/audio/transcriptions": {"POST": _not_emulated},
    "/v1/messages": {"POST": agents.messages},
}
# ``/prefix/:param`` routes: the parameter is one non-empty path segment.
PARAM_ROUTES: dict[str, dict[str, Handler]] = {
    "/api/blobs/": {"POST": management.blob, "HEAD": management.blob},
    "/api/user/keys/": {"DELETE": _not_emulated},
    "/v1/models/": {"GET": v1.model},
}
_TREE_ORDER = ("HEAD", "GET", "POST", "DELETE")  # gin lists Allow in method-tree creation order


@dataclass(frozen=True, slots=True)
class Match:
    handler: Handler | None  # FULL match
    allowed: tuple[str, ...] = ()  # PARTIAL: the methods the path does take
    redirect: str | None = None  # gin's RedirectTrailingSlash target


def _methods(path: str) -> dict[str, Handler] | None:
    methods = ROUTES.get(path)
    if methods is not None:
        return methods
    for prefix, table in PARAM_ROUTES.items():
        rest = path[len(prefix) :]
        if path.startswith(prefix) and rest and "/" not in rest:
            return table
    return None


def match(method: str, path: str) -> Match:
    methods = _methods(path)
    if methods is not None and method in methods:
        return Match(methods[method])
    if path != "/" and path.endswith("/") and method in (_methods(path[:-1]) or {}):
        return Match(None, redirect=path[:-1])
    if methods:
        return Match(None, tuple(m for m in _TREE_ORDER if m in methods))
    return Match(None)


# envconfig.AllowedOrigins; "*" matches any run of characters (gin-contrib/cors AllowWildcard).
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
        for scheme in ("http", "https")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
EXTENSION_SCHEMES = ("chrome-extension://", "safari-extension://", "moz-extension://", "ms-browser-extension://")
CORS_HEADERS = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,X-Stainless-Arch,"
    "X-Stainless-Async,X-Stainless-Custom-Poll-Interval,X-Stainless-Helper-Method,X-Stainless-Lang,"
    "X-Stainless-Os,X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout"
)
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_JUST_STATUS = frozenset({"status"})


def origin_allowed(origin: str, extra: tuple[str, ...]) -> bool:
    if origin.startswith(EXTENSION_SCHEMES):
        return True
    for pattern in (*extra, *DEFAULT_ORIGINS):
        prefix, star, suffix = pattern.partition("*")
        if origin == pattern or (star and origin.startswith(prefix) and origin[len(prefix) :].endswith(suffix)):
            return True
    return False


def host_allowed(host_header: str) -> bool:
    """``allowedHostsMiddleware`` (§6): local names and loopback, private or unspecified IPs."""
    host = host_header
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower()
        return host in ("", "localhost", socket.gethostname().lower()) or host.endswith(
            (".localhost", ".local", ".internal")
        )
    return ip.is_loopback or ip.is_unspecified or any(ip in net for net in _PRIVATE if net.version == ip.version)


def answer_error(exchange: Exchange, error: ApiError) -> None:
    if exchange.request.path == "/v1/messages":  # middleware/anthropic.go writes Anthropic's shape
        exchange.respond(error.status, agents.anthropic_error(error.status, error.message), V1_JSON)
    elif not exchange.v1:
        exchange.respond(error.status, orjson.dumps({"error": error.message}), JSON_UTF8)
    elif error.middleware:
        exchange.respond(error.status, error_body(error.status, error.message), JSON_UTF8)
    else:
        exchange.respond(error.status, error_body(error.status, error.message) + b"\n", V1_JSON)


def _cors(exchange: Exchange, config: Config) -> bool:
    """gin-contrib/cors ``applyCors``; True when it answered the request itself."""
    request = exchange.request
    origin = request.header("origin")
    host = request.header("host") or ""
    if not origin or origin in (f"http://{host}", f"https://{host}") or not config.check_origin:
        return False
    if not origin_allowed(origin, config.origins):
        exchange.respond(403)
        return True
    allow = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    if request.method == "OPTIONS":
        exchange.respond(
            204,
            headers=[
                *allow,
                ("Access-Control-Allow-Headers", CORS_HEADERS),
                ("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
                ("Access-Control-Max-Age", "43200"),
            ],
        )
        return True
    exchange.extra_headers = allow
    return False


def _model_of(exchange: Exchange) -> str | None:
    """The model a request is for, only needed when a fault is armed for one model."""
    path = exchange.request.path
    if path.startswith("/v1/models/"):
        return path.removeprefix("/v1/models/")
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
        config = state.config
        if _cors(exchange, config):
            return
        if config.loopback and not host_allowed(request.header("host") or ""):
            exchange.respond(403)  # AbortWithStatus: no body
            return
        found = match(request.method, request.path)
        if found.redirect is not None:
            target = found.redirect + ("?" + request.query if request.query else "")
            code = 301 if request.method == "GET" else 307
            body = f'<a href="{html.escape(target)}">Moved Permanently</a>.\n\n'.encode() if code == 301 else b""
            exchange.respond(code, body, "text/html; charset=utf-8" if body else None, [("Location", target)])
        elif found.handler is None and found.allowed:
            exchange.respond(405, b"405 method not allowed", "text/plain", [("Allow", ", ".join(found.allowed))])
        elif found.handler is None:
            exchange.respond(404, b"404 page not found", "text/plain")
        else:
            kinds = _JUST_STATUS if request.path in GENERATION else BEFORE_RESPONSE
            fault = state.faults.take(request.path, _model_of(exchange) if state.faults.wants_model() else None, kinds)
            if fault is not None:
                await _early_fault(exchange, fault)
            else:
                await found.handler(exchange)
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
