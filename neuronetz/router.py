"""The tiny router: path normalisation, the hard block list, and a table of routes.

Routing happens on the *normalised* path, and the gateway forwards the canonical path of
the route it matched — never the raw path the client sent. So nothing a client does with
case, repeated or trailing slashes, percent-encoding (double encoding included), dot
segments, `;` parameters, backslashes, NUL or whitespace can reach a route it did not
match, and the model-mutating Ollama endpoints are refused before authentication.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from neuronetz.errors import BadRequest, MethodNotAllowed, NotFound
from neuronetz.http import Request
from neuronetz.types import Send

# (request, send, exchange): the exchange (proxy.Exchange) records the request's outcome.
Handler = Callable[[Request, Send, Any], Awaitable[None]]

# Model-mutating Ollama endpoints: 403 for every method, not configurable.
BLOCKED_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs"})
BLOCKED_PREFIX = "/api/blobs/"
# Ollama's account endpoints act for, or spend, the server owner's ollama.com account
# (server/routes.go: WhoamiHandler, SignoutHandler, the web_search/web_fetch proxies to
# ollama.com): refused like the model-mutating ones, for every method, before authentication.
ACCOUNT_PATHS = frozenset(
    {"/api/me", "/api/signout", "/api/user/keys", "/api/experimental/web_search", "/api/experimental/web_fetch"}
)
ACCOUNT_PREFIX = "/api/user/keys/"
# Percent-decoding is repeated until the path stops changing; a path that still decodes
# further after this many rounds was built to confuse some layer, so it is refused.
_DECODE_ROUNDS = 4


def normalize_path(raw: bytes) -> str:
    """Reduce a raw request path to the one canonical form every decision is made on.

    >>> normalize_path(b"//API/./v1/..//pull%252F;x=1/")
    '/API/pull'

    Raises BadRequest for paths that cannot be reduced unambiguously: not starting with
    '/', undecodable or non-ASCII bytes, control characters or whitespace, encodings
    nested deeper than any client needs, and '..' climbing above the root.
    """
    path = raw.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        raise BadRequest("The request path must start with '/'.")
    for _ in range(_DECODE_ROUNDS):
        if b"%" not in path:
            break
        decoded = unquote_to_bytes(path)
        if decoded == path:
            break
        path = decoded
    else:
        if b"%" in path and unquote_to_bytes(path) != path:
            raise BadRequest("The request path is percent-encoded too many times to be read unambiguously.")
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("The request path contains non-ASCII characters.") from None
    if any(ch <= " " or ch == "\x7f" for ch in text):
        raise BadRequest("The request path contains whitespace or control characters.")
    segments: list[str] = []
    # Some servers treat '\' as '/', and ';' starts RFC 3986 path parameters that some
    # servers strip: normalise both so neither can disguise a blocked endpoint.
    for segment in text.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise BadRequest("The request path climbs above the root with '..'.")
            segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def is_blocked(path: str) -> bool:
    """True for the model-mutating endpoints, whatever their case (path is normalised)."""
    lowered = path.lower()
    return lowered in BLOCKED_PATHS or lowered.startswith(BLOCKED_PREFIX)


def is_account(path: str) -> bool:
    """True for Ollama's ollama.com account endpoints, whatever their case (path is normalised)."""
    lowered = path.lower()
    return lowered in ACCOUNT_PATHS or lowered.startswith(ACCOUNT_PREFIX)


class Match(enum.Enum):
    NONE = 0
    PARTIAL = 1  # the path matched but not the method: 405
    FULL = 2


@dataclass(frozen=True)
class Route:
    """A path and the methods it answers. A path ending in `{name}` captures the rest of the
    path as one parameter (model names contain '/' and ':'), e.g. `/v1/models/{model}`."""

    path: str
    methods: frozenset[str]
    handler: Handler
    public: bool = False  # answered without an API key (health checks)

    @property
    def param(self) -> str | None:
        if self.path.endswith("}"):
            return self.path[self.path.rindex("{") + 1 : -1]
        return None

    @property
    def prefix(self) -> str:
        return self.path[: self.path.rindex("{")] if self.param else self.path

    def matches(self, path: str, method: str) -> tuple[Match, str | None]:
        if self.param:
            if not path.startswith(self.prefix) or len(path) == len(self.prefix):
                return Match.NONE, None
            value: str | None = path[len(self.prefix) :]
        elif path == self.path:
            value = None
        else:
            return Match.NONE, None
        return (Match.FULL if method in self.methods else Match.PARTIAL), value


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        # Exact paths are a dict lookup; only parameterised routes are scanned.
        self._exact = {route.path: route for route in self.routes if route.param is None}
        self._patterns = tuple(route for route in self.routes if route.param is not None)

    def resolve(self, path: str, method: str) -> tuple[Route, str | None]:
        """The route for (path, method) and its captured parameter; NotFound or
        MethodNotAllowed (with the allowed methods) otherwise."""
        route = self._exact.get(path)
        if route is not None:
            if method in route.methods:
                return route, None
            raise MethodNotAllowed(f"Method {method} is not allowed on {path}.", allowed=_allowed(route))
        for route in self._patterns:
            match, value = route.matches(path, method)
            if match is Match.FULL:
                return route, value
            if match is Match.PARTIAL:
                raise MethodNotAllowed(f"Method {method} is not allowed on {path}.", allowed=_allowed(route))
        raise NotFound(f"There is no route {path} on this gateway.")


def _allowed(route: Route) -> tuple[str, ...]:
    return tuple(sorted(route.methods))
