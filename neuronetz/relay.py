"""Relays: pass a backend's answer through to the client while reading its usage.

Each relay is fed the upstream body chunk by chunk and returns what to send on at once, so
nothing is buffered beyond one line (NDJSON) or one event (SSE). Along the way it counts
completion tokens (one NDJSON line or one SSE content event is one token, as Ollama emits
them), takes the exact counters from the final record, notices the backend's own error
records, and — for OpenAI streams where the gateway asked for usage on the client's behalf —
removes the usage-only event so the client sees exactly what it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Usage:
    """Token counts of one request. `exact` is False until the backend reported its counters
    (after a disconnect or a cut-off stream, completion tokens are the chunks seen so far)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: bool = False


@dataclass(slots=True)
class Outcome:
    """What a relay learned from the answer."""

    usage: Usage = field(default_factory=Usage)
    finished: bool = False  # the backend's final record arrived (done / [DONE] / a whole body)
    error: str | None = None  # the backend's own error record, if it sent one
    text: list[str] | None = None  # the answer's text, assembled only for prompt logging


def _counters_native(record: dict[str, Any], usage: Usage) -> None:
    usage.prompt_tokens = int(record.get("prompt_eval_count") or 0)
    usage.completion_tokens = int(record.get("eval_count") or 0)
    usage.exact = True


def _counters_openai(counts: dict[str, Any], usage: Usage) -> None:
    usage.prompt_tokens = int(counts.get("prompt_tokens") or 0)
    usage.completion_tokens = int(counts.get("completion_tokens") or 0)
    usage.exact = True


class NdjsonRelay:
    """Native streams (`application/x-ndjson`): one JSON object per line (ollama-api.md §2.3)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.tail = b""

    def feed(self, chunk: bytes) -> bytes:
        lines = (self.tail + chunk).split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            if line:
                self._line(line)
        return chunk

    def _line(self, line: bytes) -> None:
        outcome = self.outcome
        # Only the final and error lines need parsing; content lines, which Ollama writes as
        # compact Go JSON with `"done":false`, are counted as they pass.
        if b'"done":false' in line and not line.startswith(b'{"error"') and outcome.text is None:
            outcome.usage.completion_tokens += 1
            return
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(record, dict):
            return
        if "error" in record:
            outcome.error = str(record["error"])
        elif record.get("done"):
            _counters_native(record, outcome.usage)
            outcome.finished = True
        else:
            outcome.usage.completion_tokens += 1
        if outcome.text is not None:
            piece = record.get("response") or (record.get("message") or {}).get("content")
            if piece:
                outcome.text.append(piece)


class SseRelay:
    """OpenAI streams (`text/event-stream`): `data: {json}` events separated by a blank line
    (ollama-api.md §3). With `strip_usage`, usage the client did not ask for is removed."""

    def __init__(self, outcome: Outcome, strip_usage: bool) -> None:
        self.outcome = outcome
        self.strip_usage = strip_usage
        self.tail = b""

    def feed(self, chunk: bytes) -> bytes:
        if b"\r" in chunk:  # SSE allows CRLF line ends; events are split on LF below
            chunk = chunk.replace(b"\r\n", b"\n")
        events = (self.tail + chunk).split(b"\n\n")
        self.tail = events.pop()
        out = [forwarded for event in events if (forwarded := self._event(event)) is not None]
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        outcome = self.outcome
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # comments and other fields pass untouched
        data = event[5:].lstrip(b" ")
        if data.startswith(b"[DONE]"):
            outcome.finished = True
            return event + b"\n\n"
        if b'"usage"' not in data and b'"error"' not in data and outcome.text is None:
            outcome.usage.completion_tokens += 1
            return event + b"\n\n"
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(record, dict):
            return event + b"\n\n"
        if record.get("error"):
            error = record["error"]
            outcome.error = str(error.get("message") if isinstance(error, dict) else error)
            return event + b"\n\n"
        usage = record.get("usage")
        choices = record.get("choices")
        if isinstance(usage, dict) and (usage.get("prompt_tokens") or usage.get("completion_tokens")):
            _counters_openai(usage, outcome.usage)
        elif choices:
            outcome.usage.completion_tokens += 1
        if outcome.text is not None and choices:
            choice = choices[0]
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if piece:
                outcome.text.append(piece)
        if self.strip_usage and usage is not None:
            if choices == []:
                return None  # the usage-only event exists because the gateway asked for it
            # /v1/completions puts zeroed usage on every event once usage is requested
            # (ollama-api.md §3, CompleteWriter): drop it there too.
            del record["usage"]
            return b"data: " + orjson.dumps(record) + b"\n\n"
        return event + b"\n\n"


class BodyRelay:
    """Whole (non-streaming) answers: passed through as they arrive, parsed at the end."""

    def __init__(self, outcome: Outcome, openai: bool) -> None:
        self.outcome = outcome
        self.openai = openai
        self.parts: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        self.parts.append(chunk)
        return chunk

    def close(self) -> None:
        outcome = self.outcome
        outcome.finished = True
        try:
            record = orjson.loads(b"".join(self.parts))
        except orjson.JSONDecodeError:
            return
        if not isinstance(record, dict):
            return
        if "error" in record:
            error = record["error"]
            outcome.error = str(error.get("message") if isinstance(error, dict) else error)
        elif self.openai and isinstance(record.get("usage"), dict):
            _counters_openai(record["usage"], outcome.usage)
        elif "prompt_eval_count" in record or "eval_count" in record:
            _counters_native(record, outcome.usage)
        if outcome.text is not None:
            text = _answer_text(record)
            if text:
                outcome.text.append(text)


def _answer_text(record: dict[str, Any]) -> str | None:
    if isinstance(record.get("response"), str):
        return str(record["response"])
    message = record.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        content = (choice.get("message") or {}).get("content") if isinstance(choice.get("message"), dict) else None
        return content if isinstance(content, str) else choice.get("text")
    return None
