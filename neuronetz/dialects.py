"""The two agent dialects Ollama speaks besides its own and OpenAI's chat: the OpenAI Responses
API (`/v1/responses`) and the Anthropic Messages API (`/v1/messages`).

Everything that differs per dialect lives here, so the pipeline in app.py and the proxy stay
dialect-blind: where the output cap is written, how the prompt is estimated, where the usage
sits in a whole answer and in a stream of typed events (`event: NAME` + `data: JSON`), how a
stream that the gateway must cut ends, how a refusal is worded, and where an Anthropic
client puts its key.

Wire facts, from Ollama's `middleware/openai.go`, `openai/responses.go`,
`middleware/anthropic.go` and `anthropic/anthropic.go` and observed on Ollama 0.24:
- Responses streams end with `response.completed` (or `response.incomplete` /
  `response.failed`), whose `response.usage` has `input_tokens` / `output_tokens`; there is
  no `[DONE]`. `max_output_tokens` of 0 or less means "no limit", like `num_predict`.
- Messages streams carry only an *estimate* of the input tokens in `message_start` (2 for a
  prompt whose real count is 25); the real counts come in the final `message_delta`, then
  `message_stop` ends the stream. `max_tokens` is required and must be positive.
"""

from __future__ import annotations

from typing import Any

import orjson

from neuronetz import llm_tokens
from neuronetz.auth import bearer_token
from neuronetz.errors import ANTHROPIC, RESPONSES, BadRequest
from neuronetz.relay import BodyRelay, Outcome, SseRelay, json_object, read_count, read_counters

# Events that carry one generated token each (counted while the stream runs, for the cap).
_DELTAS = {
    RESPONSES: frozenset(
        {
            b"response.output_text.delta",
            b"response.reasoning_text.delta",
            b"response.reasoning_summary_text.delta",
            b"response.function_call_arguments.delta",
        }
    ),
    ANTHROPIC: frozenset({b"content_block_delta"}),
}
_RESPONSES_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})

# Server-side tools: the backend runs them itself and reaches the internet on its owner's
# ollama.com account (the Responses API's built-in `web_search`, Anthropic's versioned
# `web_search_…` / `web_fetch_…` tool types). Client tools (`function`, `custom`, Anthropic
# tools without a type) are the client's to run and stay. Checked on every generating route,
# not only these two: a tool type no dialect defines there is removed all the same.
_SERVER_TOOLS = ("web_search", "web_fetch")
REMOVED_TOOLS_HEADER = b"x-neuronetz-removed-tools"


def credential(dialect: str | None, authorization: bytes | None, api_key: bytes | None) -> bytes | None:
    """The Authorization header to authenticate with. Anthropic clients send the key as
    `x-api-key` (Claude Code with ANTHROPIC_API_KEY) or as a Bearer token (with
    ANTHROPIC_AUTH_TOKEN), some SDK versions both: the same key twice is fine, two different
    keys are refused, since the gateway could not say which one the caller meant to spend."""
    if dialect != ANTHROPIC or api_key is None:
        return authorization
    key = api_key.strip()
    if authorization is not None:
        bearer = bearer_token(authorization)
        if bearer is None or bearer.encode() != key:
            raise BadRequest("The request carries two different API keys (x-api-key and Authorization); send one.")
    return b"Bearer " + key


def remove_server_tools(body: dict[str, Any]) -> list[str]:
    """Take the server-side tools out of `body["tools"]`; returns their types, in order."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    kept, removed = [], []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(_SERVER_TOOLS):
            removed.append(kind)
        else:
            kept.append(tool)
    if removed:
        body["tools"] = kept
    return removed


# --- the output cap and the prompt estimate ---------------------------------------------------------


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def requested_cap(body: dict[str, Any], dialect: str) -> int | None:
    """The client's output cap: `max_output_tokens` (0 or less: no cap) or `max_tokens`."""
    return _positive(body.get("max_output_tokens" if dialect == RESPONSES else "max_tokens"))


def set_cap(body: dict[str, Any], dialect: str, cap: int) -> None:
    """Write the gateway's cap. On /v1/messages only a valid `max_tokens` is shortened: one
    that is missing or not positive is Ollama's to refuse (400), and nothing is generated."""
    if dialect == RESPONSES:
        body["max_output_tokens"] = cap
    elif _positive(body.get("max_tokens")) is not None:
        body["max_tokens"] = cap


def _parts(content: Any) -> Any:
    """Content blocks of either dialect as the chat content parts llm_tokens.estimate_prompt reads:
    text stays text, images become image parts, tool calls and results count as their text."""
    if not isinstance(content, list):
        return content
    parts: list[Any] = []
    for block in content:
        if not isinstance(block, dict):
            parts.append(block)
        elif block.get("type") in ("image", "input_image"):
            parts.append({"type": "image_url"})
        elif isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif block.get("type") == "tool_result":
            parts.extend(_flat(_parts(block.get("content"))))
        elif "input" in block:
            parts.append(orjson.dumps(block["input"]).decode())
    return parts


def _flat(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if isinstance(value, str) else []


def estimate_prompt(body: dict[str, Any], dialect: str) -> int:
    """The prompt estimate, with the dialect's fields mapped onto chat messages. Ollama turns
    each of them — a plain-string `input`, `instructions`, `system` — into a chat message with
    its template around it, so each counts as one (an estimate below the real count would let
    a burst overspend a budget by the difference on every request)."""
    if dialect == RESPONSES:
        first, items = body.get("instructions"), body.get("input")
        if isinstance(items, str):
            items = [{"content": items}]
    else:
        first, items = body.get("system"), body.get("messages")
    messages = [{"content": _parts(first)}] if first else []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            content = item.get("content", item.get("output", item.get("arguments")))
            messages.append({"content": _parts(content)})
    return llm_tokens.estimate_prompt({"messages": messages, "tools": body.get("tools")})


# --- reading the answer ------------------------------------------------------------------------------


def _take_usage(usage: Any, outcome: Outcome) -> None:
    """Counters of `usage` (`input_tokens`, `output_tokens`), validated like every backend
    counter (relay.read_counters). Anthropic's own API puts input_tokens only in
    message_start; where a final usage lacks it, only the output count is taken and the
    prompt is settled on the estimate. No usage at all: the estimate and the tokens seen."""
    if not isinstance(usage, dict):
        return
    if "input_tokens" in usage:
        read_counters(usage, "input_tokens", "output_tokens", outcome)
        return
    completion = read_count(usage, "output_tokens")
    if completion is None:
        outcome.invalid = "The backend reported an invalid output token count."
    else:
        outcome.usage.completion_tokens = completion


def _error_message(record: dict[str, Any]) -> str | None:
    error = record.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")
    if error:
        return str(error)
    if record.get("type") == "error":  # a Responses `error` event: code and message at the top
        return str(record.get("message") or "error")
    return None


def _answer_text(record: dict[str, Any]) -> str:
    """The text of a whole answer: Responses' `output[].content[]`, Messages' `content[]`."""
    blocks: list[Any] = []
    output = record.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict) and isinstance(item.get("content"), list):
                blocks.extend(item["content"])
    elif isinstance(record.get("content"), list):
        blocks = record["content"]
    return "".join(b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str))


class WholeRelay(BodyRelay):
    """A whole (non-streaming) answer of either dialect: passed through, read at the end
    within BodyRelay's bound."""

    def __init__(self, outcome: Outcome, max_record: int) -> None:
        super().__init__(outcome, True, max_record)

    def _take(self, record: dict[str, Any]) -> None:
        outcome = self.outcome
        message = _error_message(record)
        if message is not None:
            outcome.error, outcome.refused = message, True
            return
        _take_usage(record.get("usage"), outcome)
        if outcome.text is not None:
            outcome.text.append(_answer_text(record))


class EventRelay(SseRelay):
    """A stream of typed SSE events (`event: NAME\ndata: JSON\n\n`), passed on unchanged.

    Framing, bounds and the unterminated last event are SseRelay's; token-carrying events are
    counted by name without parsing them, and only the events that carry usage, end the
    stream or report an error are parsed."""

    def __init__(self, outcome: Outcome, dialect: str, max_record: int) -> None:
        super().__init__(outcome, False, max_record)
        self.dialect = dialect
        self.deltas = _DELTAS[dialect]

    def _event(self, event: bytes) -> bytes | None:
        outcome = self.outcome
        name = b""
        data: list[bytes] = []
        for line in event.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        forwarded = event + b"\n\n"
        if name in self.deltas:
            outcome.usage.completion_tokens += 1
            if outcome.text is None:
                return forwarded
        record = json_object(b"\n".join(data))
        if record is None:
            return forwarded
        if name == b"error":
            outcome.error = _error_message(record) or "error"
        elif self.dialect == RESPONSES:
            self._responses(name, record)
        else:
            self._messages(name, record)
        return forwarded

    def _responses(self, name: bytes, record: dict[str, Any]) -> None:
        outcome = self.outcome
        if name in _RESPONSES_TERMINAL:
            response = record.get("response")
            if isinstance(response, dict):
                _take_usage(response.get("usage"), outcome)
                if name == b"response.failed":
                    outcome.error = _error_message(response) or "the response failed"
            outcome.finished = True
        elif name == b"response.output_text.delta" and outcome.text is not None:
            delta = record.get("delta")
            if isinstance(delta, str):
                outcome.text.append(delta)

    def _messages(self, name: bytes, record: dict[str, Any]) -> None:
        outcome = self.outcome
        if name == b"message_delta":
            _take_usage(record.get("usage"), outcome)  # the real counts; message_start's are a guess
        elif name == b"message_stop":
            outcome.finished = True
        elif name == b"content_block_delta" and outcome.text is not None:
            delta = record.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                outcome.text.append(delta["text"])


def stream_error(dialect: str, message: str, code: str) -> bytes:
    """The event that ends a stream the gateway cut (cap reached, backend failed), in the
    dialect's own terms, so the SDK raises instead of waiting for an end that never comes:
    Anthropic's `error` event, and the Responses API's `error` event (which also carries an
    `error` object: the openai SDK raises on any event whose data has one)."""
    body: dict[str, Any]
    if dialect == ANTHROPIC:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
    else:
        details = {"message": message, "type": "api_error", "code": code, "param": None}
        body = {"type": "error", "code": code, "message": message, "param": None, "error": details}
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
