"""The whole pipeline under generated input: Hypothesis writes request bodies (wrong types, NUL and
control characters, huge and negative numbers, every cap field at 0/-1/-2/huge/strings/floats/
bools) and backend answers (counters out of range, missing or strings; truncated streams; error
records and statuses) on every generating route, streaming and not, some of them abandoned by the
client mid-answer. Each answer is checked as it comes (never a 500, an error in the caller's
dialect, the caller's X-Request-ID); after the run, Postgres and Redis are checked: one audit row
per authenticated request, the ledger equal to the audited usage of every key, a budgeted key
within its budget and the documented slack, and nothing left reserved or leased."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronetz.llm_tokens import MAX_TOKENS
from tests.broken_backend import Answer, BrokenBackend, native_chunk, native_done
from tests.emulator import Emulator
from tests.emulator.faults import Fault
from tests.support import Admin, GatewayProcess, auth, ready_budget

ROUTES = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
# Where each /v1 route takes its output cap.
CAP_FIELDS = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens",
              "/v1/responses": "max_output_tokens", "/v1/messages": "max_tokens"}  # fmt: skip
# What an authenticated model request may be answered with. 500 only when the backend said so (and
# the gateway forwards its words): the gateway's own 500 is a bug in it.
STATUSES = {200, 400, 403, 404, 413, 422, 429, 502, 503, 504}
GATEWAY_FAILED = "internal_error"
EXAMPLES = 100  # per backend: about 20 s each on a loaded 2-core machine

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24) | st.sampled_from(
    ["\x00", "tiny\x00", "a\x1b[31mred\x1b[0m", "line\nbreak\r\n", "\u2028\u0085", "why is the sky blue"]
)
# Anything JSON can carry where a field wants something else; stdlib json writes integers of any size.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(text, st.integers(min_value=-3, max_value=3), max_size=2),
)
CAPS: list[Any] = [0, -1, -2, 1, 5, 40, 10**7, 10**7 + 1, 2**31, 2**63, 2**64, -(2**63), "5", "", 1.5, 2.0, -0.0,
                   1e308, True, False, None, [], {}]  # fmt: skip
caps = st.sampled_from(CAPS)
counters = st.one_of(
    st.integers(min_value=0, max_value=60),
    st.sampled_from([-1, 2**31, 2**63 - 1, 2**64, MAX_TOKENS + 1, "abc", "12", 1.5, None, True, [3]]),
)


# The caps a client may rightly send: Ollama reads 0 and below as "no limit" (-1 its default, -2
# fill the context), so each of them must still end with the gateway's own cap on a budget.
valid_caps: st.SearchStrategy[Any] = st.sampled_from([0, -1, -2, 1, 5, 40, 10**7])


@st.composite
def bodies(draw: st.DrawFn, route: str) -> bytes:
    """A request body for `route`: half of them valid (any text, any valid cap), the others with
    hostile fields: wrong types, huge numbers, caps that are not integers in range, not JSON."""
    hostile = draw(st.booleans())
    if hostile and draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(st.binary(max_size=40))  # not JSON at all, or not an object

    def value(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return good | junk if hostile else good

    cap = caps if hostile else valid_caps
    body: dict[str, Any] = {"model": draw(value(st.just("tiny")))}
    if route in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
        message = st.fixed_dictionaries({"role": value(st.sampled_from(["user", "system", "assistant"])),
                                         "content": value(text)})  # fmt: skip
        body["messages"] = draw(value(st.lists(message, min_size=1, max_size=3)))
    elif route == "/v1/responses":
        body["input"] = draw(value(text))
    else:
        body["prompt"] = draw(value(text))
    if route in ("/v1/responses", "/v1/messages") and draw(st.booleans()):
        body["instructions" if route == "/v1/responses" else "system"] = draw(value(text))
    stream = draw(value(st.booleans()) | st.just("absent"))
    if stream != "absent":
        body["stream"] = stream
    if route.startswith("/v1"):
        if draw(st.booleans()):
            body[CAP_FIELDS[route]] = draw(cap)
        if route == "/v1/chat/completions" and draw(st.booleans()):
            body["stream_options"] = draw(value(st.just({"include_usage": True})))
        if route == "/v1/chat/completions" and draw(st.integers(min_value=0, max_value=3)) == 0:
            # OpenAI's newer name for the cap, which Ollama ignores: no way around a budget.
            body["max_completion_tokens"] = draw(cap)
    elif draw(st.booleans()):
        body["options"] = draw(value(st.fixed_dictionaries({"num_predict": cap})))
    if route == "/api/generate" and draw(st.integers(min_value=0, max_value=5)) == 0:
        body["images"] = draw(st.lists(value(st.just("AA==")), max_size=40))
    return json.dumps(body).encode()


def event(name: str, data: dict[str, Any]) -> bytes:
    """One typed SSE event; stdlib json, which writes counters of any size."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps({"type": name, **data}).encode() + b"\n\n"


@st.composite
def hostile_answers(draw: st.DrawFn, route: str) -> Answer:
    """What a broken backend sends back: the route's format or another, with counters that make
    no sense, cut anywhere, or a refusal in the route's own error shape."""
    openai = route.startswith("/v1")
    status = draw(st.sampled_from([200, 200, 200, 200, 400, 404, 500, 503]))
    if status != 200:
        message = draw(text)
        error: Any = {"message": message, "type": "api_error", "param": None, "code": None} if openai else message
        refusal = {"error": error}
        if route == "/v1/messages":  # Anthropic's shape
            refusal = {"type": "error", "error": {"type": "api_error", "message": message}}
        return Answer(status=status, chunks=[json.dumps(refusal).encode()])
    prompt_count, eval_count = draw(counters), draw(counters)
    shape = draw(st.sampled_from(["ndjson", "native", "sse", "openai", "events", "agent", "error record"]))
    # The agent shapes in the route's own dialect, and either one on the other routes.
    anthropic = route == "/v1/messages" if route in ("/v1/responses", "/v1/messages") else draw(st.booleans())
    agent_usage = {"input_tokens": prompt_count, "output_tokens": eval_count}
    if shape == "ndjson":
        pieces = [native_chunk() + b"\n" for _ in range(draw(st.integers(min_value=0, max_value=6)))]
        data, content_type = b"".join(pieces) + native_done(eval_count, prompt_count) + b"\n", b"application/x-ndjson"
    elif shape == "native":
        data, content_type = native_done(eval_count, prompt_count, response="hi there"), b"application/json"
    elif shape == "sse":
        delta = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        usage = json.dumps({"choices": [], "usage": {"prompt_tokens": prompt_count, "completion_tokens": eval_count}})
        count = draw(st.integers(min_value=0, max_value=6))
        data = delta * count + b"data: " + usage.encode() + b"\n\ndata: [DONE]\n\n"
        content_type = b"text/event-stream"
    elif shape == "openai":
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "text": "hi"}
        usage_record = {"prompt_tokens": prompt_count, "completion_tokens": eval_count}
        data = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage_record}).encode()
        content_type = b"application/json"
    elif shape == "events":  # typed events, the usage in the final ones
        count = draw(st.integers(min_value=0, max_value=6))
        if anthropic:
            delta = event("content_block_delta", {"delta": {"type": "text_delta", "text": "hi"}})
            data = delta * count + event("message_delta", {"usage": agent_usage}) + event("message_stop", {})
        else:
            delta = event("response.output_text.delta", {"delta": "hi"})
            data = delta * count + event("response.completed", {"response": {"usage": agent_usage}})
        content_type = b"text/event-stream"
    elif shape == "agent":
        output: dict[str, Any] = {"content": [{"type": "text", "text": "hi"}]} if anthropic else (
            {"output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]}
        )  # fmt: skip
        data, content_type = json.dumps({**output, "usage": agent_usage}).encode(), b"application/json"
    else:
        data = native_chunk() + b"\n" + json.dumps({"error": draw(text)}).encode() + b"\n"
        content_type = b"application/x-ndjson"
    if draw(st.booleans()):  # truncated anywhere: the connection closes mid-answer
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    size = draw(st.sampled_from([1, 7, 65536]))
    return Answer(content_type=content_type, chunks=[data[i : i + size] for i in range(0, len(data), size)])


emulator_faults = st.one_of(
    st.none(),
    st.builds(lambda kind, after: {"kind": kind, "after_tokens": after},
              st.sampled_from(["error", "drop", "malformed", "blank"]), st.integers(min_value=0, max_value=4)),
    st.builds(lambda status: {"kind": "status", "status": status}, st.sampled_from([400, 404, 500, 503])),
)  # fmt: skip


@dataclass
class Sent:
    request_id: str
    key: str
    route: str
    status: int
    abandoned: bool


@dataclass
class Run:
    """Every request a test sent, for the checks after the run."""

    sent: list[Sent] = field(default_factory=list)

    def send(
        self, client: httpx.Client, url: str, key: str, route: str, body: bytes, abandon: bool, backend_500: bool
    ) -> None:
        request_id = "p-" + secrets.token_hex(8)
        headers = {**auth(key), "X-Request-ID": request_id, "Content-Type": "application/json"}
        with client.stream("POST", url + route, content=body, headers=headers) as response:
            if abandon and response.status_code == 200:
                next(response.iter_raw(), b"")  # the first bytes, then the client leaves
                self.sent.append(Sent(request_id, key, route, response.status_code, abandoned=True))
                return
            content = response.read()
        self.sent.append(Sent(request_id, key, route, response.status_code, abandoned=False))
        assert response.headers.get("x-request-id") == request_id, (route, body, response.headers)
        allowed = STATUSES | ({500} if backend_500 else set())
        assert response.status_code in allowed, (route, body, response.status_code, content[:300])
        assert GATEWAY_FAILED.encode() not in content, (route, body, content[:300])
        if response.status_code >= 400:
            error = json.loads(content)["error"]  # the caller's dialect, whoever refused it
            if route.startswith("/v1"):
                assert isinstance(error, dict), (route, body, content[:300])
                assert isinstance(error["message"], str), (route, body, content[:300])
            else:
                assert isinstance(error, str), (route, body, content[:300])


async def key_ids(admin: Admin, key: str) -> tuple[int, int]:
    row = await admin.pool.fetchrow("SELECT id, tenant_id FROM api_keys WHERE prefix = $1", key[:11])
    assert row is not None
    return int(row["id"]), int(row["tenant_id"])


async def eventually(check: Any, within: float = 20.0) -> None:
    """Runs the async `check` until it stops raising AssertionError, or raises its last one."""
    deadline = time.monotonic() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def check_invariants(admin: Admin, redis_url: str, prefix: str, run: Run) -> dict[str, int]:
    """Audit, ledger and Redis after the run; returns the audited tokens per key prefix."""
    ids = [s.request_id for s in run.sent]
    keys = sorted({s.key for s in run.sent})

    async def audited() -> None:
        rows = await admin.pool.fetch(
            "SELECT request_id, count(*) AS n, max(status) AS status FROM request_log "
            "WHERE request_id = ANY($1::text[]) GROUP BY request_id",
            ids,
        )
        found = {r["request_id"]: (r["n"], r["status"]) for r in rows}
        missing = [s for s in run.sent if s.request_id not in found]
        assert not missing, f"{len(missing)} of {len(ids)} requests not audited, e.g. {missing[:3]}"
        assert all(n == 1 for n, _ in found.values()), "a request audited more than once"
        wrong = [(s, found[s.request_id][1]) for s in run.sent
                 if not s.abandoned and found[s.request_id][1] != s.status]  # fmt: skip
        assert not wrong, f"audited with another status than the client saw: {wrong[:3]}"

    await eventually(audited)

    audit_sums: dict[str, int] = {}

    async def ledger_matches() -> None:
        for key in keys:
            audit = await admin.pool.fetchval(
                "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM request_log WHERE key_prefix = $1",
                key[:11],
            )
            ledger = await admin.pool.fetchval(
                "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily u "
                "JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = $1",
                key[:11],
            )
            assert ledger == audit, f"key {key[:11]}: ledger {ledger} != audited {audit}"
            audit_sums[key[:11]] = int(audit)

    await eventually(ledger_matches)

    client = aioredis.Redis.from_url(redis_url)
    try:
        tenants = {(await key_ids(admin, key))[1] for key in keys}

        async def released() -> None:
            for tenant in tenants:
                async for name in client.scan_iter(match=f"{prefix}{{t{tenant}}}:*", count=1000):
                    kind = name.decode().rsplit(":", 2)[-2]
                    if kind == "lease":
                        assert await client.zcard(name) == 0, f"{name!r} still holds leases"
                    elif kind == "reserved":
                        held = await client.hgetall(name)
                        assert int(held.get(b"=", 0)) == 0, f"{name!r} still reserves {held}"
                        assert len(held) <= 1, f"{name!r} still reserves {held}"

        await eventually(released)
        for key in keys:
            key_id, tenant = await key_ids(admin, key)
            counted = await client.get(f"{prefix}{{t{tenant}}}:used:k{key_id}:all")
            if counted is not None:  # a budgeted key's counter: Redis agrees with the books
                assert int(counted) == audit_sums[key[:11]], f"key {key[:11]}: Redis counts {int(counted)}"
    finally:
        await client.aclose()
    return audit_sums


def run_examples(test: Any) -> None:
    settings(max_examples=EXAMPLES, deadline=None, database=None,
             suppress_health_check=list(HealthCheck))(test)()  # fmt: skip


@pytest.fixture(scope="module")
def backend() -> Iterator[BrokenBackend]:
    with BrokenBackend() as broken:
        yield broken


@pytest.fixture(scope="module")
def hostile_gateway(gateway_env: dict[str, str], backend: BrokenBackend) -> Iterator[GatewayProcess]:
    with GatewayProcess({**gateway_env, "OLLAMA_BACKENDS": backend.url}) as process:
        yield process


async def test_whatever_a_backend_answers_the_client_gets_its_dialect_and_the_books_balance(
    hostile_gateway: GatewayProcess, backend: BrokenBackend, admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    plain, prompts = await admin.key(), await admin.key(prompt_ttl_days=1)
    budgeted = await admin.key(daily_tokens=2000)
    run = Run()
    with httpx.Client(timeout=30) as client:

        @given(data=st.data(), route=st.sampled_from(ROUTES), key=st.sampled_from([plain, prompts, budgeted]),
               abandon=st.integers(min_value=0, max_value=9))  # fmt: skip
        def example(data: st.DataObject, route: str, key: str, abandon: int) -> None:
            answer = data.draw(hostile_answers(route))
            backend.answer = lambda path, body: answer
            run.send(client, hostile_gateway.url, key, route, data.draw(bodies(route)), abandon == 0,
                     backend_500=answer.status == 500)  # fmt: skip

        run_examples(example)
    await check_invariants(admin, redis_url, redis_prefix, run)
    assert "unexpected error" not in hostile_gateway.log()  # no gateway bug's traceback


async def test_an_honest_backend_with_faults_keeps_every_budget_and_the_books_balance(
    gateway: GatewayProcess, emulator: Emulator, admin: Admin, redis_url: str, redis_prefix: str
) -> None:
    budget = 250
    plain, budgeted = await admin.key(), await admin.key(daily_tokens=budget)
    async with httpx.AsyncClient() as warm:
        # A new tenant's counters may wait out a rebuild (2.5 s of 503s), which can outlast the whole run.
        await ready_budget(warm, gateway.url, budgeted)
    emulator.configure(tokens=30)
    run = Run()
    with httpx.Client(timeout=30) as client:

        @given(data=st.data(), route=st.sampled_from(ROUTES), fault=emulator_faults,
               key=st.sampled_from([plain, budgeted, budgeted]),
               abandon=st.integers(min_value=0, max_value=9))  # fmt: skip
        def example(data: st.DataObject, route: str, fault: dict[str, Any] | None, key: str, abandon: int) -> None:
            emulator.clear_faults()
            if fault is not None:
                emulator.inject(Fault(**fault))
            # Ollama's own 500s: a status fault, or an error before the first token (a whole answer's
            # error is a 500 too, and a stream's first line can be one).
            backend_500 = fault is not None and (fault.get("status") == 500 or fault["kind"] == "error")
            run.send(client, gateway.url, key, route, data.draw(bodies(route)), abandon == 0, backend_500)

        run_examples(example)
    emulator.clear_faults()
    audited = await check_invariants(admin, redis_url, redis_prefix, run)
    assert "unexpected error" not in gateway.log()  # no gateway bug's traceback
    # One request at a time: a budget is overspent at most by one request's prompt-estimate error
    # (at most its whole prompt) and the 3 chunks of slack past the cap it was admitted with.
    largest_prompt = await admin.pool.fetchval(
        "SELECT coalesce(max(prompt_tokens), 0) FROM request_log WHERE key_prefix = $1", budgeted[:11]
    )
    assert audited[budgeted[:11]] <= budget + largest_prompt + 3, (audited, largest_prompt)
    assert audited[budgeted[:11]] > 0  # the budgeted key was really served
