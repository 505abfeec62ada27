"""Models the emulator knows (``/api/tags``) and the ones it has "loaded" (``/api/ps``)."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CAPABILITIES = ("completion", "tools", "thinking", "embedding", "vision", "insert")
DEFAULT_HOST = "registry.ollama.ai"  # types/model/name.go defaults (§5)
DEFAULT_NAMESPACE = "library"
FOREVER_S = (2**63 - 1) / 1e9  # a negative keep_alive becomes math.MaxInt64 nanoseconds (api/types.go)


@dataclass(frozen=True, slots=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """``[host/][namespace/]model[:tag]`` with Ollama's defaults filled in."""
        rest, tag = text, "latest"
        head, sep, maybe_tag = text.rpartition(":")
        if sep and "/" not in maybe_tag:
            rest, tag = head, maybe_tag
        parts = rest.split("/")
        host = parts[-3] if len(parts) >= 3 else DEFAULT_HOST
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        return cls(host, namespace, parts[-1], tag)

    @property
    def short(self) -> str:
        """``DisplayShortest``: defaults dropped, tag kept (``llama3.2:latest``)."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


@functools.lru_cache(maxsize=4096)  # every request looks its model up; names repeat
def model_key(name: str) -> str:
    """Lookup key: tag added, compared case-insensitively like ``getExistingName`` (§5)."""
    return ModelName.parse(name).full.lower()


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One installed model; its answer is ``Config.tokens`` words of a fixed sequence."""

    name: str
    capabilities: tuple[str, ...] = ("completion",)
    family: str = "llama"
    parameter_size: str = "1.2B"
    quantization_level: str = "Q4_K_M"
    size: int = 1_321_098_329
    modified_at: float = 1_735_689_600.0  # 2025-01-01T00:00:00Z
    context_length: int = 4096
    embedding_length: int = 2048

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model needs a name")
        object.__setattr__(self, "name", ModelName.parse(self.name).short)
        object.__setattr__(self, "capabilities", tuple(self.capabilities))
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {', '.join(CAPABILITIES)}")

    @property
    def digest(self) -> str:
        """Hex sha256 without prefix, as ``/api/tags`` shows it; stable per name."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


DEFAULT_MODELS = (
    ModelSpec("tiny", parameter_size="135M", size=91_739_413, modified_at=1_735_776_000.0),
    ModelSpec(
        "llama3.2",
        ("completion", "tools"),
        parameter_size="3.2B",
        size=2_019_393_189,
        modified_at=1_735_689_600.0,
        context_length=131_072,
        embedding_length=3072,
    ),
    ModelSpec(
        "qwen3",
        ("completion", "tools", "thinking"),
        family="qwen3",
        parameter_size="8.2B",
        size=5_225_388_164,
        modified_at=1_735_603_200.0,
        context_length=40_960,
        embedding_length=4096,
    ),
    ModelSpec(
        "llava",
        ("completion", "vision"),
        parameter_size="7B",
        quantization_level="Q4_0",
        size=4_733_363_377,
        modified_at=1_735_516_800.0,
    ),
    ModelSpec(
        "nomic-embed-text",
        ("embedding",),
        family="nomic-bert",
        parameter_size="137M",
        quantization_level="F16",
        size=274_302_450,
        modified_at=1_735_430_400.0,
        context_length=2048,
        embedding_length=768,
    ),
)


@dataclass(frozen=True, slots=True)
class Loaded:
    spec: ModelSpec
    expires_at: float  # epoch seconds
    context_length: int


class Registry:
    """Thread-safe: the event loop serves from it while a test thread edits it."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._lock = threading.Lock()
        self._models = {model_key(spec.name): spec for spec in specs}
        self._loaded: dict[str, Loaded] = {}

    def get(self, name: str) -> ModelSpec | None:
        with self._lock:
            return self._models.get(model_key(name))

    def models(self) -> list[ModelSpec]:
        """Newest first, the order of ``/api/tags`` (``sortListModelResponses``)."""
        with self._lock:
            return sorted(self._models.values(), key=lambda spec: spec.modified_at, reverse=True)

    def put(self, spec: ModelSpec) -> None:
        with self._lock:
            self._models[model_key(spec.name)] = spec

    def replace(self, specs: Iterable[ModelSpec]) -> None:
        with self._lock:
            self._models = {model_key(spec.name): spec for spec in specs}
            self._loaded.clear()

    def load(self, spec: ModelSpec, keep_alive_s: float, context_length: int) -> bool:
        """Mark ``spec`` loaded until now + keep_alive; True when it was not loaded (a cold load)."""
        key = model_key(spec.name)
        now = time.time()
        with self._lock:
            current = self._loaded.get(key)
            cold = current is None or current.expires_at <= now
            self._loaded[key] = Loaded(spec, now + keep_alive_s, context_length)
        return cold

    def unload(self, spec: ModelSpec) -> None:
        with self._lock:
            self._loaded.pop(model_key(spec.name), None)

    def loaded(self) -> list[Loaded]:
        """Unexpired runners, longest time left first (``PsHandler``)."""
        now = time.time()
        with self._lock:
            for key in [key for key, item in self._loaded.items() if item.expires_at <= now]:
                del self._loaded[key]
            return sorted(self._loaded.values(), key=lambda item: item.expires_at, reverse=True)
