"""Fault injection: what can go wrong on the next request, or on requests for one model (§10).

Kinds and where they act:

* ``status``: answer ``status`` with ``body`` (or ``message`` shaped as the route's
  error JSON) before the first byte (any route, given its ``path``).
* ``error``: after ``after_tokens`` tokens, end the stream with ``{"error": message}``
  (status stays 200). With nothing written yet Ollama sends a real HTTP error
  instead, and so does the emulator (``streamResponse``, §4). Non-streaming
  requests get ``{"error": message}`` with ``status``. On /v1 the mid-stream form
  is an empty-delta chunk then EOF ("ollama" style) or an error frame ("openai").
* ``drop``: abort the TCP connection after ``after_tokens`` tokens, no final chunk.
* ``stall``: stop after ``after_tokens`` tokens and hold the connection open
  until the client leaves.
* ``malformed`` / ``blank``: insert a truncated JSON line / an empty line after
  ``after_tokens`` tokens, then carry on (streaming generation only).

Which requests a fault hits: with ``path`` set, only requests to that path
(any route, e.g. ``/api/tags``); without it, the next *inference* request
(generate, chat, embed, embeddings and their /v1 forms), so a gateway's health
probes of ``/api/version`` or ``/api/tags`` never eat a fault meant for a chat.
Only generation routes (generate, chat, /v1 chat and completions) have tokens;
elsewhere ``drop`` and ``stall`` act before the first byte, and only with
``after_tokens=0``. A fault that does not apply is not consumed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .config import V1_ERROR_STYLES
from .registry import model_key

KINDS = ("status", "error", "drop", "stall", "malformed", "blank")
GENERATION = frozenset(
    {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
)
INFERENCE = GENERATION | {"/api/embed", "/api/embeddings", "/v1/embeddings"}
BEFORE_RESPONSE = frozenset({"status", "drop", "stall"})  # what a route without tokens can do
STREAM_KINDS = frozenset({"error", "drop", "stall", "malformed", "blank"})
BUFFERED_KINDS = frozenset({"error", "drop", "stall"})  # stream:false has no lines to garble


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    after_tokens: int = 0
    status: int = 500
    message: str = "an error was encountered while running the model"  # docs/api/errors.mdx
    body: str | None = None  # raw body for ``status``; default is the route's error JSON of ``message``
    content_type: str | None = None  # for ``body``; None = the route's usual error Content-Type
    model: str | None = None  # only requests for this model (normalised like Ollama names)
    path: str | None = None  # only requests to this path
    times: int | None = 1  # how many requests it hits; None = until cleared
    v1_style: str | None = None  # overrides Config.v1_error_style for this fault

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.after_tokens < 0:
            raise ValueError("after_tokens must not be negative")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or None for every request")
        if self.v1_style is not None and self.v1_style not in V1_ERROR_STYLES:
            raise ValueError(f"v1_style must be 'ollama' or 'openai', not {self.v1_style!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")

    def targets(self, path: str) -> bool:
        if path != self.path and not (self.path is None and path in INFERENCE):
            return False
        # "after N tokens" needs tokens: on other routes only an immediate fault applies
        return path in GENERATION or self.kind == "status" or self.after_tokens == 0


class FaultBook:
    """Armed faults in the order they were added; the first match wins and is used up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[list[Any]] = []  # [fault, remaining or None]

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append([fault, fault.times])

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def wants_model(self) -> bool:
        """Whether matching needs the request's model, i.e. its body parsed early."""
        return any(entry[0].model is not None for entry in self._armed)

    def take(self, path: str, model: str | None, kinds: frozenset[str]) -> Fault | None:
        if not self._armed:  # the benchmark fast path: no lock when nothing is armed
            return None
        key = model_key(model) if model else None
        with self._lock:
            for index, entry in enumerate(self._armed):
                fault: Fault = entry[0]
                if fault.kind not in kinds or not fault.targets(path):
                    continue
                if fault.model is not None and model_key(fault.model) != key:
                    continue
                if entry[1] is not None:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._armed[index]
                return fault
        return None
