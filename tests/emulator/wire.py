"""HTTP/1.1 wire format: an incremental request parser and response framing.

The parser is fed whatever the socket delivers and returns every request that
became complete, so keep-alive and pipelined requests come out in order. Body
bytes accumulate in a ``bytearray`` whose front deletions are O(1) in CPython,
so a 50 MB base64 image body costs a couple of copies, never a rescan. Bodies
are framed by Content-Length, as a gateway sends them; a chunked one is refused
with 501.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

MAX_HEAD_BYTES = 1 << 20  # Go's http.DefaultMaxHeaderBytes

_HEAD, _LENGTH = range(2)


class ParseError(Exception):
    """The bytes are not HTTP/1.1; the connection answers ``status`` and closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    target: str  # the request-target exactly as sent, query included
    path: str  # percent-decoded: gin routes on URL.Path, not RawPath
    query: str
    version: str
    headers: list[tuple[str, str]]  # original case and order, as received
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """First value of header ``name``, compared case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


class RequestParser:
    """Turns a byte stream into ``Request`` objects (Content-Length bodies)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._scan_from = 0
        self._need = 0
        self._head: Request | None = None

    def feed(self, data: bytes) -> list[Request]:
        buf = self._buf
        buf += data
        done: list[Request] = []
        while True:
            if self._state == _HEAD:
                end = buf.find(b"\r\n\r\n", self._scan_from)
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise ParseError(431, "request header fields too large")
                    self._scan_from = max(0, len(buf) - 3)
                    return done
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._scan_from = 0
                ready = self._start(head)
                if ready is not None:
                    done.append(ready)
            else:  # _LENGTH
                if len(buf) < self._need:
                    return done
                with memoryview(buf) as view:
                    body = bytes(view[: self._need])
                del buf[: self._need]
                done.append(self._finish(body))

    def _start(self, head: bytes) -> Request | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ParseError(400, "malformed request line")
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or line[0] in " \t":
                raise ParseError(400, "malformed header line")
            headers.append((name, value.strip(" \t")))
        path, _, query = target.partition("?")
        request = Request(method, target, unquote(path), query, version, headers, b"", True)
        if version == "HTTP/1.1" and request.header("host") is None:
            raise ParseError(400, "missing required Host header")
        tokens = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
        request.keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        self._head = request
        if request.header("transfer-encoding") is not None:
            raise ParseError(501, "unsupported transfer encoding")
        lengths = {value.strip() for key, value in headers if key.lower() == "content-length"}
        if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            raise ParseError(400, "bad Content-Length")
        self._need = int(lengths.pop()) if lengths else 0
        if self._need == 0:
            return self._finish(b"")
        self._state = _LENGTH
        return None

    def _finish(self, body: bytes) -> Request:
        request = self._head
        assert request is not None  # a body state is only entered after a head
        request.body = body
        self._head = None
        self._state = _HEAD
        return request


def reason_phrase(status: int) -> str:
    """Go writes ``status code N`` for codes it has no text for, such as Ollama's 499."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status code {status}"


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header net/http adds to every response, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Status line and header block; net/http sorts header names, so we do too."""
    headers.append(("Date", http_date()))
    headers.sort(key=lambda item: item[0])
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunked-transfer-encoding frame."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(ns: int) -> str:
    """A UTC instant as Go's ``time.Time`` marshals it: RFC 3339 with trailing zeros trimmed."""
    global _second_cache
    seconds, fraction = divmod(ns, 1_000_000_000)
    if _second_cache[0] != seconds:
        _second_cache = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    if fraction:
        return f"{_second_cache[1]}.{fraction:09d}".rstrip("0") + "Z"
    return _second_cache[1] + "Z"
