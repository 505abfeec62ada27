"""What the emulated model reads: the token-counting rule and deterministic embeddings.

The token rule (exported as ``count_prompt_tokens`` so gateway tests can compute
the ``prompt_eval_count`` they should see):

* a token is a whitespace-separated word (``len(text.split())``);
* ``/api/generate`` and ``/v1/completions``: words of ``system`` + ``prompt`` +
  ``suffix``, plus ``len(context)`` for the deprecated ``context`` array, which
  Ollama re-reads as prompt;
* ``/api/chat`` and ``/v1/chat/completions``: for every message, 1 (its role
  marker) plus the words of its content. A ``/v1`` message whose content is a
  list of parts counts once per part, because Ollama splits it into one native
  message per part (``FromChatRequest``);
* ``/api/embed``, ``/v1/embeddings``: words of every input; ``/api/embeddings``:
  words of ``prompt``.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any


def words(text: str) -> int:
    return len(text.split())


def token_id(token: str) -> int:
    """A stable id for the ``context`` array, from a CRC of the token's text."""
    return zlib.crc32(token.strip().encode()) % 100_000 + 100


def token_ids(text: str) -> list[int]:
    """One id per word of a prompt."""
    return [token_id(word) for word in text.split()]


def text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a /v1 parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/v1 messages as Ollama's ``FromChatRequest`` turns them into native ones.

    A parts list becomes one message per part (text parts carry the text, image
    parts none); roles are lower-cased as ``Message.UnmarshalJSON`` does.
    """
    native: list[dict[str, Any]] = []
    for message in messages:
        role = str(message.get("role") or "").lower()
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                text = part.get("text", "") if isinstance(part, dict) and part.get("type") == "text" else ""
                native.append({"role": role, "content": text})
        else:
            native.append({"role": role, "content": content if isinstance(content, str) else ""})
    return native


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(1 + words(text_of(message.get("content"))) for message in messages)


def generate_prompt_tokens(body: Mapping[str, Any]) -> int:
    text = " ".join(str(body.get(key) or "") for key in ("system", "prompt", "suffix"))
    return words(text) + len(body.get("context") or [])


def embed_inputs(value: Any) -> list[str]:
    """``input`` as a list of texts; an empty string means no input (EmbedHandler)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def count_prompt_tokens(path: str, body: Mapping[str, Any]) -> int:
    """The ``prompt_eval_count`` (or ``usage.prompt_tokens``) the emulator reports for ``body`` sent to ``path``."""
    if path in ("/api/generate", "/v1/completions"):
        return generate_prompt_tokens(body)
    if path == "/api/chat":
        return chat_prompt_tokens(list(body.get("messages") or []))
    if path == "/v1/chat/completions":
        return chat_prompt_tokens(native_messages(list(body.get("messages") or [])))
    if path in ("/api/embed", "/v1/embeddings"):
        return sum(words(text) for text in embed_inputs(body.get("input")))
    if path == "/api/embeddings":
        return words(str(body.get("prompt") or ""))
    raise ValueError(f"{path} reports no prompt token count")


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit-norm vector seeded from sha-3 of ``text``; equal texts give equal vectors.

    Components are rounded to 7 significant digits, about what Go prints for the
    ``float32`` values Ollama returns, so the norm is 1 within ~1e-6.
    """
    raw = hashlib.shake_256(text.encode()).digest(4 * dimensions)
    values = struct.unpack(f"<{dimensions}i", raw)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [float(f"{v / norm:.7g}") for v in values]


def truncated(vector: list[float], dimensions: int | None) -> list[float]:
    """``dimensions`` keeps the first N components and re-normalises (EmbedHandler)."""
    if not dimensions or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [float(f"{v / norm:.7g}") for v in head]
