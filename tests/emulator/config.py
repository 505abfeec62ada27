"""The emulator's knobs: one frozen dataclass, replaced whole when a test changes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FRAME_STYLES = ("modern", "legacy", "pre-0.5.2")
V1_ERROR_STYLES = ("ollama", "openai")


@dataclass(frozen=True, slots=True)
class Config:
    """Behaviour shared by every model; a ``ModelSpec`` may override the delays.

    Defaults follow Ollama where Ollama has one, except ``num_parallel``: Ollama
    serialises per model (OLLAMA_NUM_PARALLEL=1), but a benchmark mock must not,
    so 0 here means "no limit" and the queue is off until a test turns it on.
    """

    version: str = "0.33.0"
    tokens: int = 10  # content tokens per answer when the model has no fixed reply
    thinking_tokens: int = 3  # thinking tokens a thinking model emits first (§2.3)
    first_token_delay_ms: float = 0.0
    token_delay_ms: float = 0.0
    load_delay_ms: float = 0.0  # reported as load_duration on a cold load
    sleep_on_load: bool = False  # also really wait load_delay_ms on a cold load (§10)
    frame_style: str = "modern"  # /v1 SSE layout: modern >= 0.32.6, legacy, pre-0.5.2 (§3)
    tool_calls_in_done: bool = False  # tool calls ride in the done chunk instead of their own (§2.3)
    v1_error_style: str = "ollama"  # mid-stream /v1 failure: "ollama" truncation or "openai" error frame (§4)
    record: bool = True  # keep every request; benchmarks switch this off to save memory
    num_parallel: int = 0  # generations at once; 0 = unlimited
    max_queue: int = 512  # waiting requests beyond num_parallel before 503 (OLLAMA_MAX_QUEUE)
    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE default of 5m
    ignore_output_cap: bool = False  # generate past num_predict / max_tokens: a backend a gateway must cut

    def __post_init__(self) -> None:
        if self.frame_style not in FRAME_STYLES:
            raise ValueError(f"frame_style must be one of {', '.join(FRAME_STYLES)}, not {self.frame_style!r}")
        if self.v1_error_style not in V1_ERROR_STYLES:
            raise ValueError(f"v1_error_style must be 'ollama' or 'openai', not {self.v1_error_style!r}")
        numbers = ("tokens", "thinking_tokens", "num_parallel", "max_queue", "first_token_delay_ms")
        for name in (*numbers, "token_delay_ms", "load_delay_ms", "keep_alive_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def at_most(self, version: str) -> bool:
        """Whether the emulated Ollama is `version` or older (``"0.24.0"``), for behaviour
        observed on a real older release that differs from the current one."""

        def parts(text: str) -> tuple[int, ...]:
            return tuple(int(p) if p.isdigit() else 0 for p in text.split("-")[0].split("."))

        return parts(self.version) <= parts(version)

    def replace(self, changes: Mapping[str, Any]) -> Config:
        """A copy with ``changes`` applied; unknown keys and wrong types raise ``ValueError``."""
        current = self.to_json()
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        merged = {key: _coerce(key, value, current[key]) for key, value in changes.items()}
        return dataclasses.replace(self, **merged)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, example: Any) -> Any:
    """Check a JSON value against the type of the field's current value."""
    if isinstance(example, bool):
        ok = isinstance(value, bool)
    elif isinstance(example, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(example, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"config key {key!r} has the wrong type: {value!r}")
    return value
