"""The ``/_emulator/*`` JSON control surface, for tests that run the emulator in another process.

Control requests bypass recording, fault injection and the Host/Origin checks,
so driving the emulator never shows up in what a test asserts about traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from .faults import Fault
from .registry import ModelSpec
from .state import State
from .wire import Request

if TYPE_CHECKING:
    from .connection import Exchange

Handler = Callable[[State, Request], Any]


def _body(request: Request) -> Any:
    try:
        return orjson.loads(request.body or b"null")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


def _requests(state: State, request: Request) -> Any:
    path = parse_qs(request.query).get("path", [None])[0]
    return {"requests": [recorded.to_json() for recorded in state.requests(path)]}


def _clear_requests(state: State, request: Request) -> Any:
    state.clear_requests()
    return {"requests": []}


def _cancellations(state: State, request: Request) -> Any:
    return {"cancellations": [c.to_json() for c in state.cancellations()], "count": state.stats().cancellations}


def _clear_cancellations(state: State, request: Request) -> Any:
    state.clear_cancellations()
    return {"cancellations": []}


def _faults(state: State, request: Request) -> Any:
    return {"faults": [fault.to_json() for fault in state.faults.armed()]}


def _add_faults(state: State, request: Request) -> Any:
    """One fault object or a list of them; all are validated before any is armed."""
    data = _body(request)
    faults = [Fault.from_json(item) for item in (data if isinstance(data, list) else [data])]
    for fault in faults:
        state.faults.add(fault)
    return _faults(state, request)


def _clear_faults(state: State, request: Request) -> Any:
    state.faults.clear()
    return {"faults": []}


def _config(state: State, request: Request) -> Any:
    return state.config.to_json()


def _configure(state: State, request: Request) -> Any:
    changes = _body(request)
    if not isinstance(changes, dict):
        raise ValueError("config changes must be a JSON object")
    return state.configure(changes).to_json()


def _models(state: State, request: Request) -> Any:
    return {"models": [spec.to_json() for spec in state.registry.models()]}


def _replace_models(state: State, request: Request) -> Any:
    data = _body(request)
    if not isinstance(data, list):
        raise ValueError("PUT /_emulator/models takes a JSON list of models")
    state.registry.replace([ModelSpec.from_json(item) for item in data])
    return _models(state, request)


def _add_model(state: State, request: Request) -> Any:
    state.registry.put(ModelSpec.from_json(_body(request)))
    return _models(state, request)


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


def _reset(state: State, request: Request) -> Any:
    state.reset()
    return _config(state, request)


ROUTES: dict[str, dict[str, Handler]] = {
    "/_emulator/requests": {"GET": _requests, "DELETE": _clear_requests},
    "/_emulator/cancellations": {"GET": _cancellations, "DELETE": _clear_cancellations},
    "/_emulator/faults": {"GET": _faults, "POST": _add_faults, "DELETE": _clear_faults},
    "/_emulator/config": {"GET": _config, "POST": _configure},
    "/_emulator/models": {"GET": _models, "PUT": _replace_models, "POST": _add_model},
    "/_emulator/stats": {"GET": _stats},
    "/_emulator/reset": {"POST": _reset},
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
        except (ValueError, TypeError) as exc:  # TypeError: a JSON object with the wrong fields for a dataclass
            status, answer = 400, {"error": str(exc)}
    exchange.respond(status, orjson.dumps(answer), "application/json")
