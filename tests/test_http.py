from __future__ import annotations

from typing import Any

import orjson
import pytest

from neuronetz.errors import BadRequest, BudgetExceeded, NotFound, PayloadTooLarge, RateLimited, Unauthorized
from neuronetz.http import DRAIN_LIMIT, Request, parse_json
from neuronetz.types import Message


def make_request(
    messages: list[dict[str, Any]], headers: list[tuple[bytes, bytes]] | None = None, path: str = "/api/chat"
) -> tuple[Request, dict[str, int]]:
    received: list[Message] = list(messages)
    reads = {"count": 0}

    async def receive() -> Message:
        reads["count"] += 1
        return received.pop(0) if received else {"type": "http.disconnect"}

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path, "headers": headers or []}
    return Request(scope, receive, path), reads


async def test_body_is_assembled_from_chunks() -> None:
    request, _ = make_request(
        [{"type": "http.request", "body": b'{"a":', "more_body": True}, {"type": "http.request", "body": b"1}"}]
    )
    assert parse_json(await request.body(1024)) == {"a": 1}


async def test_a_declared_length_far_over_the_limit_is_refused_without_reading() -> None:
    request, reads = make_request([], headers=[(b"content-length", str(1024 + DRAIN_LIMIT + 1).encode())])
    with pytest.raises(PayloadTooLarge):
        await request.body(1024)
    assert reads["count"] == 0


async def test_a_body_over_the_limit_is_held_no_longer_than_the_limit_but_drained() -> None:
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": i < 9} for i in range(10)]
    request, reads = make_request(chunks)
    with pytest.raises(PayloadTooLarge):
        await request.body(1024)
    # Refused at the second chunk; the rest is read and dropped so the client can read its 413.
    assert reads["count"] == 10


async def test_a_body_cut_off_while_reading_is_a_400() -> None:
    request, _ = make_request([{"type": "http.request", "body": b"{", "more_body": True}])
    with pytest.raises(BadRequest, match="ended before it was complete"):
        await request.body(1024)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The request body is empty"),
        (b"{nope", "The request body is not valid JSON"),
        (b"[1, 2]", "The request body must be a JSON object."),
        (b"\xff\xfe", "The request body is not valid JSON"),
    ],
)
async def test_malformed_json_is_a_400_saying_what_is_wrong(body: bytes, message: str) -> None:
    request, _ = make_request([{"type": "http.request", "body": body}])
    with pytest.raises(BadRequest, match=message):
        parse_json(await request.body(1024))


def test_request_id_is_echoed_only_when_sane() -> None:
    request, _ = make_request([], headers=[(b"x-request-id", b"abc-123.XYZ:9")])
    assert request.request_id == "abc-123.XYZ:9"
    request, _ = make_request([], headers=[(b"x-request-id", b"bad id\r\nx")])
    assert request.request_id != "bad id\r\nx"
    assert len(request.request_id) == 24


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a":"\\ud800"}', "surrogate"),
        (b'{"a":NaN}', "NaN"),
        (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"a":"\xff"}', "not UTF-8"),
        (b'{"a":1e400}', "too large|infinity"),
    ],
)
def test_large_bodies_are_held_to_the_same_json_rules(body: bytes, message: str) -> None:
    padded = body + b" " * (1 << 20)  # past the size where the standard library parses instead of orjson
    with pytest.raises(BadRequest, match=message):
        parse_json(padded)
    with pytest.raises(BadRequest):
        parse_json(body)


def test_large_bodies_read_numbers_as_orjson_does() -> None:
    body = b'{"a":18446744073709551615,"b":18446744073709551616,"c":' + b"9" * 30 + b',"d":-1.5}'
    for raw in (body, body + b" " * (1 << 20)):
        value = parse_json(raw)
        assert value["a"] == 18446744073709551615
        assert isinstance(value["b"], float)
        assert isinstance(value["c"], float)
        assert orjson.loads(orjson.dumps(value))["d"] == -1.5
        with pytest.raises(BadRequest):  # a double would be infinite
            parse_json(raw.replace(b"9" * 30, b"9" * 5000))


def test_a_body_with_more_json_values_than_allowed_is_413_before_parsing() -> None:
    assert parse_json(b'{"a":[' + b",".join([b"{}"] * 99) + b"]}", 200) == {"a": [{}] * 99}
    with pytest.raises(PayloadTooLarge, match="too many JSON elements"):
        parse_json(b'{"a":[' + b",".join([b"{}"] * 101) + b"]}", 200)


def test_a_second_authorization_header_is_a_400() -> None:
    one, _ = make_request([], headers=[(b"authorization", b"Bearer a"), (b"accept", b"*/*"), (b"accept", b"x")])
    assert one.single_header(b"authorization") == b"Bearer a"
    two, _ = make_request([], headers=[(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")])
    with pytest.raises(BadRequest, match="more than one Authorization header"):
        two.single_header(b"authorization")


def test_errors_render_in_the_ollama_dialect() -> None:
    assert orjson.loads(NotFound("no such model").body(openai_dialect=False)) == {"error": "no such model"}


def test_errors_render_in_the_openai_dialect() -> None:
    body = orjson.loads(RateLimited("slow down", retry_after=1.2).body(openai_dialect=True))
    assert body == {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded", "param": None}
    }


def test_rate_limit_and_auth_headers() -> None:
    assert RateLimited("x", retry_after=1.2).headers() == [(b"retry-after", b"2")]
    # Both official OpenAI SDKs obey x-should-retry before Retry-After: a used-up budget is final.
    assert BudgetExceeded("x", retry_after=86400).headers() == [
        (b"retry-after", b"86400"),
        (b"x-should-retry", b"false"),
    ]
    assert BudgetExceeded("x").code == "budget_exceeded"
    assert (b"www-authenticate", b"Bearer") in Unauthorized("x").headers()
