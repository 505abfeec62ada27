"""The response parser of h1.py against h11 (the parser httpx's default transport uses).

Hypothesis builds responses (interim 1xx heads, a final head, a body framed by length, chunks or
close) and breaks some of them with byte-level mutations; the whole response and then EOF go to
both parsers. They must agree: both accept with the same status, headers, body and leftover
bytes, or both reject. A difference is allowed in one direction only, where we are stricter than
h11 on purpose (we are a gateway, and a response whose framing is in doubt becomes a 502; see
h1.py), or more lenient in the one place RFC 9112 asks for it. Each is listed in STRICTER or
LENIENT with the rule behind it, recognised from the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import re

import h11
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from neuronetz import h1

MAX_HEAD = 64 * 1024
Parsed = tuple[int, list[tuple[bytes, bytes]], bytes, bytes]  # status, headers, body, bytes left over

# Where we reject what h11 accepts, and why.
STRICTER = {
    # RFC 9110 §5.5: controls (NUL, DEL, ...) in a field value or reason phrase; RFC 9112 §2.2: a
    # bare CR or LF is not a line end (h11 accepts a bare LF and any control but NUL and \s).
    "control byte or bare CR/LF": re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|(?<!\r)\n|\r(?!\n)"),
    # RFC 9112 §5.2: obs-fold, which a gateway may reject (h11 unfolds it).
    "obs-fold": re.compile(rb"\n[ \t]"),
    # RFC 9112 §2.3: only HTTP/1.0 and HTTP/1.1 (h11 takes any HTTP/d.d).
    "other version": re.compile(rb"HTTP/(?!1\.[01] )\d\.\d"),
    # RFC 9110 §15: status codes run to 599 (h11 takes any three digits).
    "status above 599": re.compile(rb"HTTP/\d\.\d [6-9]\d\d"),
    # RFC 9110 §8.6 lets a recipient reject a repeated or listed Content-Length (h11 collapses
    # them); more than 18 digits is more than an exabyte (h11 allows 20).
    "Content-Length repeated, listed or huge": re.compile(
        rb"(?is)content-length.*content-length|content-length:[^\r\n]*,|content-length:[ \t]*\d{19}"
    ),
    # RFC 9112 §6.3 item 3 and §6.1: Transfer-Encoding with Content-Length "ought to be handled as
    # an error", and in HTTP/1.0 it is faulty framing (h11 lets chunked win).
    "Transfer-Encoding with Content-Length or in HTTP/1.0": re.compile(
        rb"(?is)(content-length.*transfer-encoding|transfer-encoding.*content-length|^HTTP/1\.0.*transfer-encoding)"
    ),
    # RFC 9110 §15.2.2: 101 answers an Upgrade, and we never ask for one.
    "101 without an upgrade": re.compile(rb"HTTP/\d\.\d 101"),
    # 16 hex digits already describe an exabyte (h11 allows 20).
    "chunk size above 16 digits": re.compile(rb"\n[0-9a-fA-F]{17}"),
}
# Where we accept what h11 rejects: RFC 9112 §7.1.1 allows BWS before a chunk extension's ";".
LENIENT = {"whitespace before a chunk extension": re.compile(rb"\n[0-9a-fA-F]+[ \t]+;")}


async def ours(wire: bytes, head_request: bool) -> Parsed | str:
    """Parse `wire` then EOF with h1.Connection, as the transport does; a string says why not."""
    conn = h1.Connection(asyncio.get_running_loop())
    conn.buffer += wire
    conn.eof = True  # nothing more will arrive, so no read ever waits on a socket
    try:
        head = await conn.read_response_head(head_request, None, None, MAX_HEAD)
        if head is None:
            return "closed before a response"
        body = b"".join([data async for data in conn.read_body(head, None, MAX_HEAD)])
    except httpx.RemoteProtocolError as exc:  # anything else leaving the parser fails the test
        return str(exc)
    return head.status, _normalised(head.headers), body, bytes(conn.buffer)


def theirs(wire: bytes, head_request: bool) -> Parsed | str:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=b"HEAD" if head_request else b"GET", target=b"/", headers=[(b"Host", b"a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(wire)
    conn.receive_data(b"")
    response: h11.Response | None = None
    body = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return str(exc)
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            headers = _normalised(list(response.headers.raw_items()))
            return response.status_code, headers, b"".join(body), conn.trailing_data[0]
        elif not isinstance(event, h11.InformationalResponse):
            return f"h11 ended with {event!r}"


def _normalised(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # Transfer codings are case-insensitive (RFC 9112 §7); h11 lowercases them, we pass them on.
    return [(name, value.lower() if name.lower() == b"transfer-encoding" else value) for name, value in headers]


TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.one_of(
    st.sampled_from(["Content-Type", "X-Request-ID", "Date", "Server", "Link", "Vary"]), st.text(TCHAR, min_size=1)
)
values = st.binary(max_size=40).map(lambda raw: raw.translate(None, bytes(range(0x20)) + b"\x7f").strip(b" \t"))
fields = st.lists(st.tuples(names.map(str.encode), values), max_size=5)
reasons = st.sampled_from([b" OK", b" Not Found", b"", b" ", b" caf\xc3\xa9 \tok"])
# Bodies without CR, LF or controls, so that any such byte on the wire belongs to the framing or a head.
bodies = st.binary(max_size=200).map(lambda raw: raw.translate(None, bytes(range(0x20)) + b"\x7f"))
MUTATION_BYTES = b"\r\n\0 \t:;,0aF\x01\x7f\x80"


def head(version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"%b %d%b\r\n%b\r\n" % (version, status, reason, b"".join(b"%b: %b\r\n" % field for field in headers))


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    wire = b""
    for _ in range(draw(st.integers(0, 2))):
        wire += head(b"HTTP/1.1", draw(st.sampled_from([100, 102, 103])), draw(reasons), draw(fields))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 500, 502, 599]))
    headers = draw(fields)
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        headers.insert(draw(st.integers(0, len(headers))), (b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        headers.append((draw(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding"])), b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        extension = draw(st.sampled_from([b"", b";a=1", b';q="x"']))
        payload = b"".join(b"%x%b\r\n%b\r\n" % (len(piece), extension, piece) for piece in pieces if piece)
        payload += b"0\r\n" + b"".join(b"%b: %b\r\n" % field for field in draw(fields)) + b"\r\n"
    else:
        payload = body
    wire += head(version, status, draw(reasons), headers) + payload
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):  # about half the responses are broken
        at = draw(st.integers(0, len(wire)))
        byte = bytes([draw(st.sampled_from(MUTATION_BYTES))])
        wire = draw(
            st.sampled_from(
                [wire[:at] + byte + wire[at:], wire[:at] + byte + wire[at + 1 :], wire[:at] + wire[at + 1 :], wire[:at]]
            )
        )
    return wire


# 400 examples take ~20 s on an idle core; the timeout leaves room for a loaded machine (pytest-timeout
# interrupting Hypothesis mid-example reports a misleading FlakyStrategyDefinition).
@pytest.mark.timeout(600)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=responses(), head_request=st.booleans())
@example(wire=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab", head_request=False)
@example(wire=b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", head_request=False)
@example(wire=b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n", head_request=False)
@example(wire=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a\r\nhello\r\n0\r\n\r\n", head_request=False)
async def test_the_response_parser_agrees_with_h11(wire: bytes, head_request: bool) -> None:
    mine, reference = await ours(wire, head_request), theirs(wire, head_request)
    if isinstance(mine, str) and not isinstance(reference, str):
        assert [rule for rule, pattern in STRICTER.items() if pattern.search(wire)], f"we refused: {mine}"
    elif isinstance(reference, str) and not isinstance(mine, str):
        assert [rule for rule, pattern in LENIENT.items() if pattern.search(wire)], f"h11 refused: {reference}"
    elif not isinstance(mine, str):
        assert mine == reference
