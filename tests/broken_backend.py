"""A deliberately broken Ollama for the tests: a raw asyncio HTTP/1.1 server on its own thread
whose answers to model requests are whatever bytes a test scripts, however wrong.

It answers `/api/version`, `/api/tags` and `/api/ps` (the gateway's health checks; the model list can be
scripted too) and every other request with `answer(path, body)`, written as the given status
line, headers and body chunks, framed by closing the connection (RFC 9112 §6.3 item 8), so
no length or chunk framing gets in the way of what is being tested.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.support import free_port

TAGS = {"models": [{"name": "tiny:latest", "model": "tiny:latest", "size": 1, "digest": "0" * 64, "details": {}}]}


@dataclass
class Answer:
    status: int = 200
    content_type: bytes = b"application/json"
    chunks: Iterable[bytes] = ()
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def native_done(eval_count: Any = 3, prompt_eval_count: Any = 5, **extra: Any) -> bytes:
    record = {"model": "tiny", "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": "stop",
              "prompt_eval_count": prompt_eval_count, "eval_count": eval_count, **extra}  # fmt: skip
    return json.dumps(record, separators=(",", ":")).encode()  # not orjson: it cannot write 2**64


def native_chunk(text: str = "hi") -> bytes:
    return orjson.dumps({"model": "tiny", "created_at": "2026-01-01T00:00:00Z", "response": text, "done": False})


def default_tags() -> Iterable[bytes]:
    return [orjson.dumps(TAGS)]


def answered(answer: Answer | Callable[[str, dict[str, Any]], Answer]) -> Callable[[str, dict[str, Any]], Answer]:
    return answer if callable(answer) else (lambda path, body: answer)


class BrokenBackend:
    """`with BrokenBackend(answer) as backend:` serves on `backend.url`; `backend.bodies` are the
    JSON bodies of the model requests it received, in order."""

    def __init__(self, answer: Answer | Callable[[str, dict[str, Any]], Answer] | None = None) -> None:
        self.answer = answered(answer or Answer(chunks=[native_done()]))
        self.tags: Callable[[], Iterable[bytes]] = default_tags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            length = 0
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            raw = await reader.readexactly(length) if length else b""
            if path == "/api/version":
                answer = Answer(chunks=[b'{"version":"0.12.0"}'])
            elif path == "/api/tags":
                answer = Answer(chunks=self.tags())
            elif path == "/api/ps":  # the health checks' loaded-models probe: nothing loaded
                answer = Answer(chunks=[b'{"models":[]}'])
            else:
                body = orjson.loads(raw) if raw else {}
                self.bodies.append(body)
                answer = self.answer(path, body)
            head_out = [f"HTTP/1.1 {answer.status} X".encode(), b"content-type: " + answer.content_type,
                        b"connection: close", *(n + b": " + v for n, v in answer.headers)]  # fmt: skip
            writer.write(b"\r\n".join(head_out) + b"\r\n\r\n")
            for chunk in answer.chunks:
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()

    def __enter__(self) -> BrokenBackend:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
