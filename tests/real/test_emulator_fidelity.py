"""The emulator against the real server: for each route, the same request to both must give
answers of the same shape (fields, counters present, done_reason, finish_reason, where usage
sits in a /v1 stream) and the same errors (status and body) for an unknown model and bad JSON.
Content differs by design (the emulator's "Lorem ipsum" against tiny's gibberish), and so do the
numbers; what a gateway reads must not.

The emulator's `tiny` ends its reply after `Config.tokens` words (like `tiny-eos`), so caps
are compared where they bind (a cap below that length) and where they do not (0, -1: no limit).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.emulator import Config, Emulator, ModelSpec
from tests.real.exchange import SAMPLING, events, records, without

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def emulator_like_ollama() -> Iterator[Emulator]:
    """The emulator set to the real server's release (v0.24.0 frames /v1 streams the legacy way)."""
    with Emulator(Config(version="0.24.0", frame_style="legacy")) as emu:
        emu.add_model("tiny-embed", capabilities=("embedding",), embedding_length=64)
        yield emu


def shape(value: Any) -> Any:
    """The structure of a JSON value: field names and types; strings that carry a meaning a
    client acts on (done_reason, finish_reason, role, object) kept."""
    if isinstance(value, dict):
        return {k: v if k in {"done_reason", "finish_reason", "role", "object", "done"} else shape(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [shape(v) for v in value[:1]] if value and not isinstance(value[0], float) else ["number"]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def stream_shape(found: list[Any]) -> list[Any]:
    """A stream's shape: the first record, the last records (final chunk, usage, [DONE])."""
    shapes = [shape(r) if not isinstance(r, str) else r for r in found]
    return [shapes[0], *shapes[-3:]] if len(shapes) > 3 else shapes


def ask(url: str, path: str, body: dict[str, Any] | bytes) -> tuple[int, str, list[Any]]:
    content = body if isinstance(body, bytes) else None
    data = None if isinstance(body, bytes) else body
    response = httpx.post(url + path, json=data, content=content, timeout=60)
    return response.status_code, response.headers.get("content-type", "").split(";")[0], records(response)


GENERATION: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"model": "tiny", "messages": CHAT, "stream": False, "options": {"num_predict": 3}}),
    ("/api/chat", {"model": "tiny", "messages": CHAT, "options": {"num_predict": 3}}),
    ("/api/generate", {"model": "tiny", "prompt": "hello", "stream": False, "options": {"num_predict": 3}}),
    ("/api/generate", {"model": "tiny", "prompt": "hello", "options": {"num_predict": 3}}),
    ("/api/embed", {"model": "tiny-embed", "input": ["a", "b"]}),
    ("/api/embeddings", {"model": "tiny-embed", "prompt": "a"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 3}),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 3}),
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}),
    (
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    ("/v1/embeddings", {"model": "tiny-embed", "input": ["a", "b"]}),
]


def generation_id(case: tuple[str, dict[str, Any]]) -> str:
    path, body = case
    return f"{path}:{'stream' if body.get('stream', path in ('/api/chat', '/api/generate')) else 'whole'}" + (
        "+usage" if "stream_options" in body else ""
    )


@pytest.mark.parametrize("case", GENERATION, ids=generation_id)
def test_answers_have_the_real_shape(
    case: tuple[str, dict[str, Any]], ollama_url: str, emulator_like_ollama: Emulator
) -> None:
    path, body = case
    real = ask(ollama_url, path, body)
    emulated = ask(emulator_like_ollama.url, path, body)
    assert emulated[:2] == real[:2]
    assert len(emulated[2]) > 0
    assert stream_shape(emulated[2]) == stream_shape(real[2])


@pytest.mark.parametrize(("path", "field"), [("/api/generate", "options"), ("/v1/completions", "max_tokens")])
@pytest.mark.parametrize("cap", [0, -1])
def test_a_cap_of_zero_or_below_means_no_limit(
    path: str, field: str, cap: int, ollama_url: str, emulator_like_ollama: Emulator
) -> None:
    """Ollama applies num_predict only when it is above zero (`runner/ollamarunner/runner.go`);
    `tiny-eos` ends by itself, so the real answer is its whole reply, not an empty one."""
    limit: dict[str, Any] = (
        {"options": {**SAMPLING, "num_predict": cap}} if field == "options" else {**SAMPLING, "max_tokens": cap}
    )
    real = ask(ollama_url, path, {"model": "tiny-eos", "prompt": "hello", "stream": False, **limit})
    emulated = ask(emulator_like_ollama.url, path, {"model": "tiny", "prompt": "hello", "stream": False, **limit})
    for status, _, found in (real, emulated):
        assert status == 200
        final = found[-1]
        if path.startswith("/api/"):
            assert (final["done_reason"], final["eval_count"] > 0) == ("stop", True)
        else:
            assert (final["choices"][0]["finish_reason"], final["usage"]["completion_tokens"] > 0) == ("stop", True)


UNKNOWN_MODEL: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"messages": CHAT}),
    ("/api/generate", {"prompt": "x"}),
    ("/api/embed", {"input": "x"}),
    ("/api/embeddings", {"prompt": "x"}),
    ("/api/show", {}),
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/embeddings", {"input": "x"}),
]
ERRORS: list[tuple[str, dict[str, Any] | bytes]] = [
    (path, {"model": "no-such-model", **extra}) for path, extra in UNKNOWN_MODEL
] + [
    (path, b'{"model":')
    for path in ("/api/chat", "/api/generate", "/api/embed", "/v1/chat/completions", "/v1/completions")
]


@pytest.mark.parametrize(
    "case", ERRORS, ids=lambda c: f"{c[0]}:{'bad-json' if isinstance(c[1], bytes) else 'unknown-model'}"
)
def test_errors_have_the_real_status_and_body(
    case: tuple[str, dict[str, Any] | bytes], ollama_url: str, emulator_like_ollama: Emulator
) -> None:
    path, body = case
    assert ask(emulator_like_ollama.url, path, body) == ask(ollama_url, path, body)


def test_the_model_listing_has_the_real_shape(ollama_url: str, emulator_like_ollama: Emulator) -> None:
    emulator_like_ollama.set_models([ModelSpec("tiny")])
    try:
        for path in ("/api/tags", "/v1/models", "/v1/models/tiny"):
            real = httpx.get(ollama_url + path, timeout=30).json()
            emulated = httpx.get(emulator_like_ollama.url + path, timeout=30).json()
            for listing in (real, emulated):
                for name in ("models", "data"):
                    if name in listing:
                        listing[name] = [m for m in listing[name] if m.get("name", m.get("id")) == "tiny:latest"]
            assert shape(emulated) == shape(real), path
    finally:
        emulator_like_ollama.reset()
        emulator_like_ollama.add_model("tiny-embed", capabilities=("embedding",), embedding_length=64)


AGENTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/responses", {"model": "tiny", "input": "hello", "max_output_tokens": 3}),
    ("/v1/responses", {"model": "tiny", "input": "hello", "max_output_tokens": 3, "stream": True}),
    ("/v1/messages", {"model": "tiny", "messages": CHAT, "max_tokens": 3}),
    ("/v1/messages", {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}),
]


def event_shape(response: httpx.Response) -> list[tuple[str, Any]]:
    """An agent stream's events in order (runs of the same event as one: the number of deltas is
    the content's), each with the shape of its data."""
    found: list[tuple[str, Any]] = []
    for name, data in events(response):
        if not found or found[-1][0] != name:
            found.append((name, shape(data)))
    return found


@pytest.mark.parametrize("case", AGENTS, ids=lambda c: f"{c[0]}:{'stream' if c[1].get('stream') else 'whole'}")
def test_agent_answers_have_the_real_events_and_usage(
    case: tuple[str, dict[str, Any]], ollama_url: str, emulator_like_ollama: Emulator
) -> None:
    """Event names and order, where the usage sits (a Responses stream's `response.completed`;
    a Messages stream's `message_start` estimate and final `message_delta`) and the shape of a
    whole answer, as Ollama v0.24.0 sends them."""
    path, body = case
    answers = [httpx.post(url + path, json=body, timeout=60) for url in (ollama_url, emulator_like_ollama.url)]
    real, emulated = answers
    assert (emulated.status_code, emulated.headers["content-type"].split(";")[0]) == (
        real.status_code,
        real.headers["content-type"].split(";")[0],
    )
    if body.get("stream"):
        assert event_shape(emulated) == event_shape(real)
    else:
        assert shape(emulated.json()) == shape(real.json())


AGENT_ERRORS: list[tuple[str, dict[str, Any] | bytes]] = [
    ("/v1/responses", {"model": "no-such-model", "input": "x"}),
    ("/v1/responses", {"model": "no-such-model", "input": "x", "stream": True}),
    ("/v1/responses", b'{"model":'),
    ("/v1/messages", {"model": "no-such-model", "messages": CHAT, "max_tokens": 3}),
    ("/v1/messages", {"model": "no-such-model", "messages": CHAT, "max_tokens": 3, "stream": True}),
    ("/v1/messages", {"model": "tiny", "messages": CHAT, "max_tokens": 0}),
    ("/v1/messages", b'{"model":'),
]


def agent_error_id(case: tuple[str, dict[str, Any] | bytes]) -> str:
    path, body = case
    if isinstance(body, bytes):
        return f"{path}:bad-json"
    kind = "zero-max-tokens" if body.get("max_tokens") == 0 else "unknown-model"
    return f"{path}:{kind}{':stream' if body.get('stream') else ''}"


@pytest.mark.parametrize("case", AGENT_ERRORS, ids=agent_error_id)
def test_agent_errors_have_the_real_status_and_body(
    case: tuple[str, dict[str, Any] | bytes], ollama_url: str, emulator_like_ollama: Emulator
) -> None:
    """Status, media type and body (Anthropic's `request_id` aside: it is new on every answer)."""
    path, body = case
    real, emulated = (ask(url, path, body) for url in (ollama_url, emulator_like_ollama.url))
    assert emulated[:2] == real[:2]
    assert without(emulated[2], frozenset({"request_id"})) == without(real[2], frozenset({"request_id"}))
