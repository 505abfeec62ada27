"""Token arithmetic on a request body: the prompt estimate, the client's output cap, and the
cap the gateway writes in when limits need one.

The gateway cannot run each model's tokenizer, so the prompt is estimated: one token per
four bytes of text (about what Llama- and Qwen-family tokenizers produce for English and
code; the `/v1` usage of real answers is used to settle, so the estimate only sizes the
reservation), plus 4 tokens per chat message for its template and 768 per image. The
estimate's error bounds how far a budget can be overspent (README, "Worst case").

Every token count the gateway uses — this estimate, a client's cap, a backend's counters —
is an integer in [0, MAX_TOKENS]. Ten million is above the context window of any model
Ollama serves (a prompt and its answer both fit in one), so no real request comes near it,
and it sits far inside the audit log's int4 columns and the Lua numbers of the limiter.
"""

from __future__ import annotations

import math
from typing import Any

from neuronetz.errors import BadRequest

BYTES_PER_TOKEN = 4
PER_MESSAGE = 4
PER_IMAGE = 768
MAX_TOKENS = 10_000_000


def _text_size(value: Any) -> tuple[int, int]:
    """(bytes of text, number of images) in a prompt-like value: strings, lists of strings
    or of OpenAI content parts."""
    if isinstance(value, str):
        return len(value.encode()), 0
    size = images = 0
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                size += len(part.encode())
            elif isinstance(part, dict):
                if part.get("type") == "image_url":
                    images += 1
                text = part.get("text")
                if isinstance(text, str):
                    size += len(text.encode())
    return size, images


def estimate_prompt(body: dict[str, Any]) -> int:
    size = images = extra = 0
    for field in ("prompt", "system", "suffix", "input"):
        s, i = _text_size(body.get(field))
        size, images = size + s, images + i
    if isinstance(body.get("images"), list):
        images += len(body["images"])
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            s, i = _text_size(message.get("content"))
            size, images, extra = size + s, images + i, extra + PER_MESSAGE
            if isinstance(message.get("images"), list):
                images += len(message["images"])
    if body.get("tools"):
        size += len(str(body["tools"]))
    # A million dummy images in a 6 MB body would otherwise "need" 768 M tokens.
    return min(math.ceil(size / BYTES_PER_TOKEN) + extra + images * PER_IMAGE, MAX_TOKENS)


def requested_cap(body: dict[str, Any], openai: bool, produces_text: bool) -> int | None:
    """The output cap the client set: `max_tokens` on /v1, `options.num_predict` natively;
    None for no cap, 0 for embeddings, which generate nothing.

    Ollama limits the output only when `num_predict > 0` (its runner checks
    `numPredict > 0`; -1 is its default and -2 "fill the context"), and `/v1` passes
    `max_tokens` on as `num_predict`, so 0 and below mean "no limit", never "no output".
    Anything but a JSON integer (a bool, a float, a string) is refused: Ollama would read a
    float natively as its integer part but refuse it on /v1, and a guess either way could let
    a request through with a cap the gateway did not reserve for.
    """
    if not produces_text:
        return 0
    if openai:
        name, value = "max_tokens", body.get("max_tokens")
    else:
        options = body.get("options")
        name, value = "options.num_predict", options.get("num_predict") if isinstance(options, dict) else None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value > MAX_TOKENS:
        raise BadRequest(f"The field '{name}' must be an integer of at most {MAX_TOKENS} (0 or less means no limit).")
    return value if value > 0 else None


def set_cap(body: dict[str, Any], openai: bool, cap: int) -> None:
    """Write the output cap into the body where the backend reads it (docs/ollama.md §3:
    `max_tokens` becomes `options.num_predict`)."""
    if openai:
        body["max_tokens"] = cap
    else:
        options = body.get("options")
        body["options"] = {**(options if isinstance(options, dict) else {}), "num_predict": cap}
