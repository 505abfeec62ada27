"""The ``/_emulator/*`` JSON control surface, for the emulator run as its own process
(``python -m tests.emulator``, as the benchmarks and the demo run it).

Control requests bypass recording and fault injection, so driving the emulator never shows
up in what a test asserts about traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .state import State
from .wire import Request

if TYPE_CHECKING:
    from .connection import Exchange

Handler = Callable[[State, Request], Any]


def _configure(state: State, request: Request) -> Any:
    """A partial update of ``Config``; answers the whole new config."""
    try:
        changes = orjson.loads(request.body or b"null")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(changes, dict):
        raise ValueError("config changes must be a JSON object")
    return state.configure(changes).to_json()


def _stats(state: State, request: Request) -> Any:
    stats = state.stats()
    return {
        "requests": stats.requests,
        "cancellations": stats.cancellations,
        "in_flight": stats.in_flight,
        "peak_in_flight": stats.peak_in_flight,
        "generations": stats.generations,
        "peak_generations": stats.peak_generations,
    }


ROUTES: dict[str, dict[str, Handler]] = {
    "/_emulator/config": {"POST": _configure},
    "/_emulator/stats": {"GET": _stats},
}


def handle(exchange: Exchange) -> None:
    request = exchange.request
    methods = ROUTES.get(request.path)
    if methods is None:
        status, answer = 404, {"error": f"no control endpoint {request.path}; see tests/emulator/__init__.py"}
    elif request.method not in methods:
        status, answer = 405, {"error": f"{request.path} takes {', '.join(methods)}"}
    else:
        try:
            status, answer = 200, methods[request.method](exchange.state, request)
        except ValueError as exc:
            status, answer = 400, {"error": str(exc)}
    exchange.respond(status, orjson.dumps(answer), "application/json")
