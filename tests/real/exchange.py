"""Reading answers of a real Ollama (and of the gateway in front of it) for comparison."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

# What legitimately differs between two runs of the same request: clocks, durations, ids (the
# agent dialects add `completed_at`, the output item's `item_id` and Anthropic's `request_id`).
VOLATILE = frozenset(
    {"created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "id", "created"}
    | {"completed_at", "item_id", "request_id"}
)
# /api/ps: when each model unloads moves with every use.
VOLATILE_PS = VOLATILE | {"expires_at"}
SAMPLING = {"seed": 42, "temperature": 0}


def without(value: Any, volatile: frozenset[str] = VOLATILE) -> Any:
    if isinstance(value, dict):
        return {k: without(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [without(v, volatile) for v in value]
    return value


def records(response: httpx.Response) -> list[Any]:
    """The JSON records of an answer: the body, each NDJSON line, or each SSE `data:` payload
    (the `[DONE]` sentinel kept as a string)."""
    kind = response.headers.get("content-type", "")
    text = response.text
    if kind.startswith("text/event-stream"):
        payloads = [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]
        return [p if p == "[DONE]" else orjson.loads(p) for p in payloads]
    if kind.startswith("application/x-ndjson"):
        return [orjson.loads(line) for line in text.splitlines() if line.strip()]
    return [orjson.loads(text)] if text else []


def events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(name, data) of each typed SSE event (`event: NAME` + `data: JSON`) of an agent-dialect
    stream, in order."""
    found: list[tuple[str, Any]] = []
    for block in response.text.split("\n\n"):
        lines = block.splitlines()
        name = next((line[len("event:") :].strip() for line in lines if line.startswith("event:")), "")
        data = "\n".join(line[len("data:") :].strip() for line in lines if line.startswith("data:"))
        if name or data:
            found.append((name, orjson.loads(data) if data else None))
    return found


def agent_usage(found: list[Any]) -> tuple[int, int] | None:
    """(input_tokens, output_tokens) an agent-dialect answer reports last: a whole answer's
    `usage`, a Responses stream's terminal `response.usage`, a Messages stream's final
    `message_delta` usage (never message_start's estimate, which comes first)."""
    for record in reversed(found):
        if not isinstance(record, dict):
            continue
        usage = (record.get("response") or {}).get("usage") if "response" in record else record.get("usage")
        if isinstance(usage, dict) and "input_tokens" in usage:
            return int(usage["input_tokens"]), int(usage["output_tokens"])
    return None


def comparable(path: str, response: httpx.Response) -> tuple[int, list[Any]]:
    """(status, records without volatile fields); listings sorted by name (the gateway merges
    backends' lists)."""
    volatile = VOLATILE_PS if path == "/api/ps" else VOLATILE - {"id"} if path.startswith("/v1/models") else VOLATILE
    found = [without(r, volatile) for r in records(response)]
    for record in found:
        if isinstance(record, dict) and isinstance(record.get("models"), list):
            record["models"].sort(key=lambda m: m["name"])
        if isinstance(record, dict) and path == "/v1/models" and isinstance(record.get("data"), list):
            record["data"].sort(key=lambda m: m["id"])
    return response.status_code, found


def native_usage(found: list[Any]) -> tuple[int, int] | None:
    """(prompt_eval_count, eval_count) of a native answer's final record."""
    final = found[-1] if found else None
    if isinstance(final, dict) and final.get("done"):
        return int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    return None


def openai_usage(found: list[Any]) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the last usage object of a /v1 answer."""
    for record in reversed(found):
        usage = record.get("usage") if isinstance(record, dict) else None
        if usage and usage.get("total_tokens"):
            return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return None
