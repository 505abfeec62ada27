"""Relays: pass a backend's answer through to the client while reading its usage.

Each relay is fed the backend's body chunk by chunk and returns what to send on at once. The
streaming relays forward whole records only — NDJSON lines, SSE events — so an error record
the gateway adds always starts a record of its own; nothing is buffered beyond one record,
and a record is found by searching only the bytes that arrived since the last search, so a
long one costs linear time. Along the way they count completion tokens (one NDJSON line or
one SSE content event is one token, as Ollama emits them), take the exact counters from the
final record, notice the backend's own error records, and — for OpenAI streams where the
gateway asked for usage on the client's behalf — remove the usage-only event so the client
sees exactly what it asked for.

Counters are read only when they are integers in [0, MAX_TOKENS]; anything else (negative,
huge, a float, a bool, a string) makes the answer a backend error whose usage stays what
was seen, so nothing a backend sends can poison the ledger or the audit log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from neuronetz.llm_tokens import BYTES_PER_TOKEN, MAX_TOKENS


class RecordTooLong(Exception):
    """One NDJSON line or SSE event outgrew the bound: the stream cannot go on."""


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
    refused: bool = False  # the backend refused the request (error status or whole error body)
    invalid: str | None = None  # why the answer cannot be trusted (bad counters, too long to read)
    text: list[str] | None = None  # the answer's text, assembled only for prompt logging


def read_count(counts: dict[str, Any], name: str) -> int | None:
    """A counter as a backend reported it: absent is 0; None when it is no count at all."""
    value = counts.get(name, 0)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def read_counters(counts: dict[str, Any], prompt_name: str, completion_name: str, outcome: Outcome) -> None:
    prompt, completion = read_count(counts, prompt_name), read_count(counts, completion_name)
    if prompt is None or completion is None:
        outcome.invalid = f"The backend reported invalid token counts ({prompt_name}, {completion_name})."
        return
    usage = outcome.usage
    usage.prompt_tokens, usage.completion_tokens, usage.exact = prompt, completion, True


class _Records:
    """Splits a byte stream at `separator` in linear time: each search starts where the last
    one ended (less the separator's length, which a chunk boundary may split), and consumed
    records leave from the front of a bytearray, which CPython does without moving the rest."""

    __slots__ = ("buffer", "limit", "scanned", "separator")

    def __init__(self, separator: bytes, limit: int) -> None:
        self.buffer = bytearray()
        self.separator = separator
        self.limit = limit
        self.scanned = 0

    def split(self, chunk: bytes) -> list[bytes]:
        """The records `chunk` completes; raises RecordTooLong past the bound."""
        buffer, separator = self.buffer, self.separator
        buffer += chunk
        records: list[bytes] = []
        start = 0
        end = buffer.find(separator, self.scanned)
        while end >= 0:
            if end - start > self.limit:  # completed by this chunk, but too long all the same
                raise RecordTooLong
            records.append(bytes(buffer[start:end]))
            start = end + len(separator)
            end = buffer.find(separator, start)
        if start:
            del buffer[:start]
        if len(buffer) > self.limit:
            raise RecordTooLong
        self.scanned = max(len(buffer) - len(separator) + 1, 0)
        return records

    def rest(self) -> bytes:
        """What is left at the end of the stream: an unterminated last record, or nothing."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


class NdjsonRelay:
    """Native streams (`application/x-ndjson`): one JSON object per line (docs/ollama.md §2.3)."""

    def __init__(self, outcome: Outcome, max_record: int) -> None:
        self.outcome = outcome
        self.records = _Records(b"\n", max_record)

    def feed(self, chunk: bytes) -> bytes:
        lines = self.records.split(chunk)
        for line in lines:
            if line:
                self._line(line)
        if len(lines) == 1:
            return lines[0] + b"\n"
        return b"\n".join(lines) + b"\n" if lines else b""

    def close(self) -> bytes:
        """A last line without its newline is still a line: read and forward it, terminated."""
        line = self.records.rest()
        if not line.strip():
            return b""
        self._line(line)
        return line + b"\n"

    def _line(self, line: bytes) -> None:
        outcome = self.outcome
        # Only the final and error lines need parsing; content lines, which Ollama writes as
        # compact Go JSON with `"done":false`, are counted as they pass.
        if b'"done":false' in line and not line.startswith(b'{"error"') and outcome.text is None:
            outcome.usage.completion_tokens += 1
            return
        record = json_object(line)
        if record is None:
            return
        if "error" in record:
            outcome.error = _error_message(record["error"])
        elif record.get("done"):
            read_counters(record, "prompt_eval_count", "eval_count", outcome)
            outcome.finished = True
        else:
            outcome.usage.completion_tokens += 1
        if outcome.text is not None:
            piece = _answer_text(record)
            if piece:
                outcome.text.append(piece)


class SseRelay:
    """OpenAI streams (`text/event-stream`): `data: {json}` events separated by a blank line
    (docs/ollama.md §3). With `strip_usage`, usage the client did not ask for is removed."""

    def __init__(self, outcome: Outcome, strip_usage: bool, max_record: int) -> None:
        self.outcome = outcome
        self.strip_usage = strip_usage
        self.records = _Records(b"\n\n", max_record)
        self.cr = False  # the last chunk ended in CR: its LF may open the next one

    def feed(self, chunk: bytes) -> bytes:
        if self.cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the CR already became an LF
        self.cr = chunk.endswith(b"\r")
        if b"\r" in chunk:  # SSE allows CRLF and CR line ends; events are split on LF below
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return self._forward(self.records.split(chunk))

    def close(self) -> bytes:
        """A last event without its blank line is still an event: read and forward it."""
        event = self.records.rest().strip(b"\n")
        return self._forward([event]) if event else b""

    def _forward(self, events: list[bytes]) -> bytes:
        return b"".join([forwarded for event in events if (forwarded := self._event(event)) is not None])

    def _event(self, event: bytes) -> bytes | None:
        outcome = self.outcome
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # comments and other fields pass untouched
        data = event[5:].lstrip(b" ")
        if data.startswith(b"[DONE]"):
            outcome.finished = True
            return event + b"\n\n"
        if b'"usage"' not in data and b'"error"' not in data and outcome.text is None:
            # Every event but the finish event is output; the byte test spares parsing them.
            if b'"finish_reason":null' in data or _has_output(json_object(data)):
                outcome.usage.completion_tokens += 1
            return event + b"\n\n"
        record = json_object(data)
        if record is None:
            return event + b"\n\n"
        if record.get("error"):
            outcome.error = _error_message(record["error"])
            return event + b"\n\n"
        usage = record.get("usage")
        choices = record.get("choices")
        if isinstance(usage, dict) and (usage.get("prompt_tokens") or usage.get("completion_tokens")):
            read_counters(usage, "prompt_tokens", "completion_tokens", outcome)
        elif choices and _has_output(record):
            outcome.usage.completion_tokens += 1
        if outcome.text is not None and choices:
            piece = _answer_text(record)
            if piece:
                outcome.text.append(piece)
        if self.strip_usage and usage is not None:
            if choices == []:
                return None  # the usage-only event exists because the gateway asked for it
            # /v1/completions puts zeroed usage on every event once usage is requested
            # (docs/ollama.md §3, CompleteWriter): drop it there too.
            del record["usage"]
            return b"data: " + orjson.dumps(record) + b"\n\n"
        return event + b"\n\n"


class BodyRelay:
    """Whole (non-streaming) answers: passed through as they arrive, parsed at the end.

    Only the first `max_record` bytes are kept for that; an answer longer than that still
    reaches the client whole, but its counters cannot be read: it is a backend error charged
    one token per BYTES_PER_TOKEN bytes, as is an answer with nonsensical counters (a backend
    that sends no usable counts must not get its work for free)."""

    def __init__(self, outcome: Outcome, openai: bool, max_record: int) -> None:
        self.outcome = outcome
        self.openai = openai
        self.limit = max_record
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.parts.append(chunk)
        elif self.parts:
            self.parts.clear()
        return chunk

    def close(self) -> None:
        outcome = self.outcome
        outcome.finished = True
        if self.size > self.limit:
            outcome.invalid = f"The backend's answer is longer than {self.limit} bytes; its usage cannot be read."
        else:
            self._read(b"".join(self.parts))
        if outcome.invalid is not None:
            outcome.usage.completion_tokens = min(math.ceil(self.size / BYTES_PER_TOKEN), MAX_TOKENS)

    def _read(self, body: bytes) -> None:
        record = json_object(body)
        if record is not None:
            self._take(record)

    def _take(self, record: dict[str, Any]) -> None:
        outcome = self.outcome
        if "error" in record:
            outcome.error = _error_message(record["error"])
            outcome.refused = True
        elif self.openai and isinstance(record.get("usage"), dict):
            read_counters(record["usage"], "prompt_tokens", "completion_tokens", outcome)
        elif "prompt_eval_count" in record or "eval_count" in record:
            read_counters(record, "prompt_eval_count", "eval_count", outcome)
        elif record.get("done") is False:
            # Ollama cut a generation short (a runner that fell into repeating itself) and sent
            # what it had without counts: the work was done all the same, so it is charged by size.
            outcome.invalid = "The backend's answer ended unfinished, without token counts."
        if outcome.text is not None:
            text = _answer_text(record)
            if text:
                outcome.text.append(text)


def json_object(data: bytes) -> dict[str, Any] | None:
    """The JSON object in `data`; None for anything else (malformed, or another JSON type),
    which the relays pass on without reading."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _error_message(error: Any) -> str:
    return str(error.get("message") if isinstance(error, dict) else error)


def _has_output(record: dict[str, Any] | None) -> bool:
    """Whether an OpenAI stream event carries generated output (text, reasoning, a tool call)
    rather than only the reason the answer finished. Unreadable counts as output: a backend
    must not hide its work from the count that way."""
    if record is None:
        return True
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    choice = choices[0]
    if not isinstance(choice, dict):
        return True
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"))
    return bool(choice.get("text"))


def _answer_text(record: dict[str, Any]) -> str | None:
    """The text of an answer or of one chunk of it, in whichever dialect: `response`,
    `message.content`, or the first choice's `delta.content`, `message.content` or `text`."""
    if isinstance(record.get("response"), str):
        return str(record["response"])
    message = record.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        for part in (choice.get("delta"), choice.get("message")):
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                return str(part["content"])
        return choice["text"] if isinstance(choice.get("text"), str) else None
    return None
