"""One HTTP/1.1 client connection: the wire format and the asyncio protocol that reads it.

`transport.py` pools these and adapts them to httpx; everything about bytes on one socket is here.
`Connection` is an `asyncio.Protocol` without the StreamReader/StreamWriter layer: the loop
appends to a bytearray and wakes the one task reading it, and a timeout is a timer handle on
that wake-up future rather than an `asyncio.wait_for` task.

Where RFC 9112 lets a recipient choose between leniency and rejection we reject, because a
gateway that guesses at framing can be made to splice one response into the next (response
splitting, RFC 9112 §11.2); a rejected response becomes a 502, which §5.2 allows a gateway.
tests/test_h1.py compares this parser with h11's and lists each place where it is stricter.

    >>> head = parse_response_head(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2", head_request=False)
    >>> head.status, head.framing, head.length, head.keep_alive
    (200, <Framing.LENGTH: 1>, 2, True)
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import AsyncIterator
from typing import NamedTuple, cast

import httpx

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_OWS = b" \t"
# RFC 9110 §5.6.2: tchar, the bytes of a token such as a field name.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5: a field value (and RFC 9112 §4 a reason phrase) holds VCHAR, obs-text, SP and HTAB;
# every other control byte, DEL included, is invalid.
_VCHAR_OR_OBS_TEXT = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])
_FIELD_VALUE = b"\t " + _VCHAR_OR_OBS_TEXT
# 18 decimal digits stay below 2**63 (an exabyte); int() of a longer run costs time, and past
# 4,300 digits raises ValueError instead of telling a transport error.
_MAX_LENGTH_DIGITS = 18
# 16 hex digits already describe an exabyte; a longer size line is an attack on int(), not a body.
_MAX_CHUNK_SIZE_DIGITS = 16
_MAX_CHUNK_LINE = 4096
# Pause the socket when a slow consumer lets this much response data pile up; resumed on the next wait.
_READ_HIGH_WATER = 256 * 1024
LAST_CHUNK = b"0\r\n\r\n"
# 1xx responses before the final one (RFC 9110 §15.2): 100 Continue, 102 Processing now and then,
# 103 Early Hints. More than this is a server looping, not informing; their bytes together count
# against the head size limit.
MAX_INTERIM_RESPONSES = 32


class Framing(enum.Enum):
    """How the end of a response body is found (RFC 9112 §6.3)."""

    NONE = 0  # HEAD, 1xx, 204, 304, or Content-Length: 0: the head is the whole message
    LENGTH = 1  # exactly `length` bytes follow the head
    CHUNKED = 2  # the chunked transfer coding (§7.1)
    CLOSE = 3  # everything until the server closes the connection


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    framing: Framing
    length: int  # body bytes for Framing.LENGTH, 0 otherwise
    keep_alive: bool  # the server allows another exchange on this connection


class RequestFraming(NamedTuple):
    """What the caller's request headers already say about the body and the connection."""

    length: int | None  # the Content-Length value, if present
    chunked: bool  # a Transfer-Encoding is present; chunked must then be its final coding (§6.1)
    close: bool  # the caller sent `Connection: close`


def malformed(what: str) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"The backend sent a malformed response: {what}.")


def _is_length(value: bytes) -> bool:
    """A Content-Length value (RFC 9110 §8.6: 1*DIGIT), of at most _MAX_LENGTH_DIGITS digits."""
    return value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS


def valid_field(name: bytes, value: bytes) -> bool:
    """Is `name` a token and `value` (OWS already stripped) a field value (RFC 9110 §5.1, §5.5)?

    bytes.translate deletes the allowed bytes in C, so the check stays linear and cheap on the hot
    path; what is left over is the offending part. CR, LF and NUL are among the refused bytes, so a
    valid field can never start a new header line or a new message (RFC 9112 §11.2).
    """
    return bool(name) and not name.translate(None, _TCHAR) and not value.translate(None, _FIELD_VALUE)


def _tokens(value: bytes) -> set[bytes]:
    """The comma-separated, case-insensitive options of a Connection header (RFC 9110 §7.6.1)."""
    return {token.strip(_OWS) for token in value.lower().split(b",")}


def scan_request_headers(headers: list[tuple[bytes, bytes]]) -> RequestFraming:
    length: int | None = None
    chunked = close = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if not _is_length(value):
                raise httpx.LocalProtocolError(f"Content-Length must be a decimal number, got {value[:40]!r}.")
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = True
        elif lowered == b"connection":
            close = b"close" in _tokens(value)
    return RequestFraming(length, chunked, close)


def encode_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and header section (RFC 9112 §3, §5), headers in the caller's order.

    A CR or LF inside a name, a value or the target would let a header value start a new header
    or a new request (§11.2): every field must be valid, and the target must hold no CR, LF or SP.
    """
    for name, value in headers:
        if not valid_field(name, value):
            raise httpx.LocalProtocolError(f"The request header {name[:100]!r} is not a valid field (RFC 9110 §5).")
    if not target or target.translate(None, _VCHAR_OR_OBS_TEXT):
        raise httpx.LocalProtocolError("The request target is empty or contains SP or a control character.")
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 §7.1): hex size, CRLF, data, CRLF."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    value = value.strip(_OWS)
    # §5.1: a field name is a token, so whitespace before the colon, a line without a colon and
    # an obs-fold (a line starting with whitespace, §5.2, which a gateway may reject) all fail
    # here; RFC 9110 §5.5: CR, LF, NUL and other controls in a value must not be passed on.
    if not valid_field(name, value) or len(name) == len(line):
        raise malformed(f"bad header line {line[:100]!r}")
    return name, value


def parse_response_head(data: bytes, head_request: bool) -> ResponseHead:
    """Parse a status line and header section, `data` without the final CRLF CRLF."""
    # §2.2: a bare CR is not a line end and we do not accept a bare LF as one either; one left
    # inside a line fails the checks of the status line or of the field it sits in.
    lines = data.split(b"\r\n")
    # §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]; some servers omit the
    # second SP when the reason is empty, which costs nothing to accept.
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    # §2.3: the version is case-sensitive; RFC 9110 §15: a status code is three digits, 100-599.
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or code < b"100"
        or code > b"599"
        or reason.translate(None, _FIELD_VALUE)
    ):
        raise malformed(f"status line {lines[0][:100]!r}")
    status = int(code)

    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    connection: set[bytes] = set()
    for line in lines[1:]:
        name, value = _field(line)
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            # §6.3 item 5: an invalid length, or several that differ, is unrecoverable. RFC 9110
            # §8.6 lets a recipient either reject the same length repeated ("5, 5", or two
            # fields) or collapse it; we reject it, as everything else whose framing is in doubt,
            # so the head passed on always carries the one length the body was read by.
            if length is not None:
                raise malformed("more than one Content-Length header")
            if not _is_length(value):
                raise malformed(f"Content-Length {value[:40]!r}")
            length = int(value)
        elif lowered == b"transfer-encoding":
            # A coding other than plain chunked would reach the client still encoded.
            if chunked or value.lower() != b"chunked":
                raise malformed(f"Transfer-Encoding {value[:40]!r}, or more than one")
            chunked = True
        elif lowered == b"connection":
            connection |= _tokens(value)

    # §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
    keep_alive = b"close" not in connection and (version == b"HTTP/1.1" or b"keep-alive" in connection)
    # §6.3 item 1: these responses end with their head, whatever the framing headers say.
    if head_request or status < 200 or status == 204 or status == 304:
        return ResponseHead(status, reason, version, headers, Framing.NONE, 0, keep_alive)
    if chunked:
        # §6.3 item 3: Transfer-Encoding next to Content-Length "ought to be handled as an error";
        # §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        if length is not None or version != b"HTTP/1.1":
            raise malformed("Transfer-Encoding with Content-Length or in HTTP/1.0")
        return ResponseHead(status, reason, version, headers, Framing.CHUNKED, 0, keep_alive)
    if length is not None:
        framing = Framing.LENGTH if length else Framing.NONE
        return ResponseHead(status, reason, version, headers, framing, length, keep_alive)
    # §6.3 item 8: no framing headers, so the body runs until the connection closes.
    return ResponseHead(status, reason, version, headers, Framing.CLOSE, 0, False)


def chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (RFC 9112 §7.1), ignoring any chunk extensions.

    chunk = chunk-size [ chunk-ext ] CRLF, and §7.1.1 says unrecognized extensions must be
    ignored; BWS is allowed before the ";". int(x, 16) alone would also take "0x1f", "+1f",
    "1_f" and surrounding spaces, so the digits are checked first. Extensions hold tokens and
    quoted strings, never a control byte: a bare LF there would let the line end where a
    lenient parser further along ends it differently.
    """
    size, _, extensions = line.partition(b";")
    size = size.rstrip(_OWS)
    if (
        not size
        or len(size) > _MAX_CHUNK_SIZE_DIGITS
        or size.strip(_HEX_DIGITS)
        or extensions.translate(None, _FIELD_VALUE)
    ):
        raise malformed(f"chunk size line {line[:100]!r}")
    return int(size, 16)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
    """One TCP or TLS connection: a receive buffer filled by the loop and read by one task at a time."""

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buffer = bytearray()
        self.eof = False  # the peer closed, or the connection broke; nothing more will arrive
        self.error: Exception | None = None  # why it broke, if it did not close cleanly
        self.idle = False  # set by the pool while no request is outstanding
        self.idle_since = 0.0
        self.reused = False  # completed at least one exchange
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Bytes while no request is outstanding answer nothing we sent (HTTP/1.1 has no
            # unsolicited responses); whatever the server meant, the next exchange cannot trust them.
            self.abort()
            return
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> None:
        # Returning None lets asyncio close our side too: after the server's FIN the connection
        # cannot carry another exchange (RFC 9112 §9.6).
        self.eof = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = self.error or exc
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self.eof = True
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent data included: the server sees the EOF (or RST) at once.

        A task still reading this connection wakes up (in connection_lost) to a ReadError, so that
        a body read until close cannot mistake our own abort for its end.
        """
        self.eof = True
        self.error = self.error or ConnectionAbortedError("closed by the gateway")
        self.transport.abort()

    def ended(self, where: str) -> httpx.TransportError:
        if self.error is not None:
            return httpx.ReadError(f"The backend connection broke {where}: {self.error!r}.")
        return httpx.RemoteProtocolError(f"The backend closed the connection {where}.")

    async def wait(self, seconds: float | None, on_timeout: type[httpx.TimeoutException]) -> None:
        """Sleep until bytes, EOF or write buffer space arrive; more than `seconds` of silence raise."""
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        waiter = self._waiter = self.loop.create_future()
        timer = None if seconds is None else self.loop.call_later(seconds, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            raise on_timeout(f"The backend connection made no progress for {seconds} s.") from None
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def drain(self, seconds: float | None) -> None:
        while self._writing_paused:
            if self.eof:
                raise httpx.WriteError("The backend connection closed while the request was being sent.")
            await self.wait(seconds, httpx.WriteTimeout)

    async def read_response_head(
        self, head_request: bool, first_byte_seconds: float | None, seconds: float | None, limit: int
    ) -> ResponseHead | None:
        """The final response head, after any 1xx ones; None if the peer closed before sending a byte.

        `first_byte_seconds` bounds the time to the whole final head, interim responses included:
        a server sending `102 Processing` every half second must not hold the request open for
        longer than a server sending nothing. `seconds` bounds the silence inside one head.
        """
        deadline = None if first_byte_seconds is None else self.loop.time() + first_byte_seconds
        interim = 0
        while True:
            raw = await self._read_head(deadline, seconds, limit)
            if raw is None:
                if interim:
                    raise self.ended("after an interim response")
                return None
            head = parse_response_head(raw, head_request)
            if head.status >= 200:
                return head
            if head.status == 101:
                raise malformed("101 Switching Protocols, but we asked for no upgrade")
            # RFC 9110 §15.2: other 1xx responses (100 Continue, 102, 103) are skipped.
            interim += 1
            limit -= len(raw) + 4
            if interim > MAX_INTERIM_RESPONSES or limit < 0:
                raise malformed(f"more than {MAX_INTERIM_RESPONSES} interim responses, or their heads too long")

    async def _read_head(self, deadline: float | None, seconds: float | None, limit: int) -> bytes | None:
        """The next head without its final CRLF CRLF, or None if the peer closed before sending a byte."""
        scanned = 0
        while (end := self.buffer.find(b"\r\n\r\n", scanned)) < 0:
            if len(self.buffer) > limit:
                raise malformed(f"a response head longer than {limit} bytes")
            if self.eof:
                if not self.buffer:
                    return None
                raise self.ended("in the middle of the response head")
            scanned = max(0, len(self.buffer) - 3)
            wait = seconds if self.buffer else None
            if deadline is not None:
                left = deadline - self.loop.time()
                wait = left if wait is None else min(wait, left)
            try:
                await self.wait(wait, httpx.ReadTimeout)
            except httpx.ReadTimeout:
                if deadline is not None and self.loop.time() >= deadline:
                    raise httpx.ReadTimeout(
                        "The backend sent no final response head within the first-byte timeout."
                    ) from None
                raise
        if end > limit:
            raise malformed(f"a response head longer than {limit} bytes")
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        return head

    async def read_line(self, seconds: float | None, limit: int) -> bytes:
        """One CRLF-terminated line of a chunked body, without the CRLF."""
        scanned = 0
        while (end := self.buffer.find(b"\r\n", scanned)) < 0:
            if len(self.buffer) > limit:
                raise malformed(f"a chunked-body line longer than {limit} bytes")
            if self.eof:
                raise self.ended("inside the chunked body")
            scanned = max(0, len(self.buffer) - 1)
            await self.wait(seconds, httpx.ReadTimeout)
        if end > limit:
            raise malformed(f"a chunked-body line longer than {limit} bytes")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def read_some(self, limit: int, seconds: float | None) -> bytes:
        """Whatever has arrived, up to `limit` bytes, waiting only while nothing has; b"" at EOF."""
        while not self.buffer:
            if self.eof:
                return b""
            await self.wait(seconds, httpx.ReadTimeout)
        if len(self.buffer) <= limit:
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:limit])
            del self.buffer[:limit]
        return data

    async def read_body(self, head: ResponseHead, seconds: float | None, max_trailers: int) -> AsyncIterator[bytes]:
        """The body after `head`, each piece yielded as soon as the socket delivers it.

        `seconds` bounds each wait for more bytes, not the whole body: an LLM stream may run for
        minutes, but a backend silent for longer than the read timeout is stuck.
        """
        if head.framing is Framing.LENGTH:
            remaining = head.length
            while remaining:
                data = await self.read_some(remaining, seconds)
                if not data:
                    raise self.ended("before the end of the response body")
                remaining -= len(data)
                yield data
        elif head.framing is Framing.CHUNKED:
            while size := chunk_size(await self.read_line(seconds, _MAX_CHUNK_LINE)):
                while size:
                    data = await self.read_some(size, seconds)
                    if not data:
                        raise self.ended("inside a chunk")
                    size -= len(data)
                    yield data
                if await self.read_line(seconds, _MAX_CHUNK_LINE):  # chunk-data is followed by CRLF
                    raise malformed("chunk data longer than its size")
            # §7.1.2: the trailer fields end with an empty line. httpx has no place for them, so
            # they are checked to be fields (anything else means lost framing) and dropped.
            trailers = 0
            while line := await self.read_line(seconds, max_trailers):
                _field(line)
                trailers += len(line)
                if trailers > max_trailers:
                    raise malformed(f"trailers longer than {max_trailers} bytes")
        elif head.framing is Framing.CLOSE:
            while data := await self.read_some(sys.maxsize, seconds):
                yield data
            if self.error is not None:  # a reset is not the end of the body, only a close is
                raise self.ended("before the end of the response body")
