"""What the emulated model writes, and when: deterministic tokens, counters, pacing, faults.

A request becomes a ``Plan`` (the steps to emit, the done reason, the metrics)
before anything is written, so the counters in the final chunk are exact. The
``run`` loop then paces the steps with real sleeps and hands each to a ``Sink``,
which frames it for its surface: NDJSON or one JSON object (native), SSE or
one JSON object (/v1).

Durations are nominal, computed from the configuration rather than measured,
so tests can assert exact values (§10 "fake clock"):

* ``load_duration`` = 0.1 ms + ``load_delay_ms`` when the model was not loaded;
* ``prompt_eval_duration`` = ``first_token_delay_ms`` + 10 µs per prompt token;
* ``eval_duration`` = ``eval_count`` x (``token_delay_ms`` + 10 µs);
* ``total_duration`` = the sum of the three.

``eval_count`` counts every emitted step: thinking tokens, content tokens and a
tool call (one each, also when the call rides in the done chunk).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config
from .faults import Fault
from .registry import ModelSpec

if TYPE_CHECKING:
    from .connection import Exchange

LOREM = (
    "Lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
)
THINKING = ("Let", "me", "think", "about", "this", "carefully.")
SCHEDULE_NS = 100_000
PER_TOKEN_NS = 10_000


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token: a piece of thinking, of content, or a tool call."""

    thinking: str = ""
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Ask:
    """A generation request reduced to what shapes the answer."""

    spec: ModelSpec
    prompt_tokens: int
    think: bool
    seed: str = ""  # the last message's text: seeds a tool call's id
    tools: Sequence[dict[str, Any]] = ()
    num_predict: int | None = None
    cold: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]
    done_reason: str  # stop | length | load | unload
    metrics: dict[str, int]  # Go Metrics order, zero values omitted (omitempty)
    final_tool_calls: tuple[dict[str, Any], ...] = ()  # carried by the done chunk (§2.3)
    wait_s: float = 0.0  # before the first token: cold-load sleep + first-token delay
    token_delay_s: float = 0.0
    thinking: str = ""  # all thinking, joined, for stream:false
    content: str = ""  # all content, joined

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens), as every dialect's usage reports them."""
        return self.metrics.get("prompt_eval_count", 0), self.metrics.get("eval_count", 0)


def single(done_reason: str) -> Plan:
    """The answer to a load or unload call: no tokens, no metrics (§2.2)."""
    return Plan((), done_reason, {})


def _cycled(source: Sequence[str], count: int) -> list[str]:
    """``count`` words of ``source``, repeated as needed, as tokens that join single-spaced."""
    words = itertools.islice(itertools.cycle(source), count)
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def tool_call(tools: Sequence[dict[str, Any]], seed: str) -> dict[str, Any]:
    """A call of the first tool, arguments filled per JSON-schema type; id ``call_`` + 8 of [a-z0-9]."""
    function = tools[0].get("function") or {}
    properties = (function.get("parameters") or {}).get("properties") or {}
    samples = {"string": "test", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    arguments = {name: samples.get(schema.get("type")) for name, schema in properties.items()}
    digest = hashlib.sha256(seed.encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    call_id = "call_" + "".join(alphabet[b % 36] for b in digest[:8])
    return {"id": call_id, "function": {"index": 0, "name": function.get("name", ""), "arguments": arguments}}


def metrics(config: Config, prompt_tokens: int, eval_count: int, cold: bool) -> dict[str, int]:
    first_ms, token_ms = config.first_token_delay_ms, config.token_delay_ms
    load = SCHEDULE_NS + (round(config.load_delay_ms * 1e6) if cold else 0)
    prompt = round(first_ms * 1e6) + prompt_tokens * PER_TOKEN_NS
    evaluation = eval_count * (round(token_ms * 1e6) + PER_TOKEN_NS)
    values = {
        "total_duration": load + prompt + evaluation,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt,
        "eval_count": eval_count,
        "eval_duration": evaluation,
    }
    return {key: value for key, value in values.items() if value}


def make_plan(config: Config, ask: Ask) -> Plan:
    spec = ask.spec
    steps = [Step(thinking=t) for t in _cycled(THINKING, config.thinking_tokens)] if ask.think else []
    if ask.tools:
        steps.append(Step(tool_calls=(tool_call(ask.tools, spec.name + ask.seed),)))
    else:
        steps += [Step(content=token) for token in _cycled(LOREM, config.tokens)]
    reason = "stop"
    # A cap applies only when it is above zero: 0, -1 (no limit) and -2 (fill the context) all
    # let the answer run to its end (`runner/ollamarunner/runner.go` checks `numPredict > 0`;
    # observed on v0.24.0 for `num_predict` and for `max_tokens: 0` on /v1).
    if ask.num_predict is not None and 0 < ask.num_predict < len(steps):
        steps, reason = steps[: ask.num_predict], "length"
    final: tuple[dict[str, Any], ...] = ()
    if config.tool_calls_in_done and steps and steps[-1].tool_calls:
        final = steps.pop().tool_calls
    eval_count = len(steps) + (1 if final else 0)
    wait_ms = config.first_token_delay_ms + (config.load_delay_ms if ask.cold and config.sleep_on_load else 0.0)
    return Plan(
        tuple(steps),
        reason,
        metrics(config, ask.prompt_tokens, eval_count, ask.cold),
        final,
        wait_ms / 1000,
        config.token_delay_ms / 1000,
        "".join(s.thinking for s in steps),
        "".join(s.content for s in steps),
    )


class Sink(abc.ABC):
    """Frames the steps of one answer for one surface (native, /v1, an agent dialect), streamed
    or whole. A stream's pieces go out as they come, the status line with the first of them."""

    content_type: str  # of the stream

    def __init__(self, exchange: Exchange, model: str, stream: bool) -> None:
        self.exchange = exchange
        self.model = model
        self.stream = stream

    def write(self, data: bytes) -> None:
        if not self.exchange.started:
            self.exchange.start(200, self.content_type)
        self.exchange.send(data)

    def garble(self, kind: str) -> None:
        """The ``blank`` and ``malformed`` faults: an empty line or a record cut off in its middle."""
        if self.stream:
            self.write(b"\n" if kind == "blank" else self.cut_record())

    @abc.abstractmethod
    def cut_record(self) -> bytes:
        """A record of this surface's stream cut off in its middle."""

    @abc.abstractmethod
    def step(self, step: Step) -> None: ...

    @abc.abstractmethod
    def finish(self, plan: Plan) -> None: ...

    @abc.abstractmethod
    def fail(self, fault: Fault) -> None: ...


async def run(exchange: Exchange, plan: Plan, sink: Sink, fault: Fault | None) -> None:
    """Emit ``plan`` through ``sink`` in real time, applying ``fault`` after its token count.

    Token i is due at start + wait + i x token_delay (absolute deadlines, so sleep
    jitter does not accumulate). The done chunk follows the last token at once.
    """
    loop = asyncio.get_running_loop()
    first_due = loop.time() + plan.wait_s
    for index, step in enumerate(plan.steps):
        if fault is not None and fault.after_tokens == index and await _inject(exchange, sink, fault):
            return
        delay = first_due + index * plan.token_delay_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif exchange.started:
            # Without delays, still give the loop a turn between lines: that is when a
            # departed client is noticed (Go checks ctx.Done() per token, §9.11).
            await asyncio.sleep(0)
        sink.step(step)
        exchange.tokens_sent = index + 1
        await exchange.drain()
    if fault is not None and fault.after_tokens >= len(plan.steps) and await _inject(exchange, sink, fault):
        return
    delay = first_due - loop.time()
    if delay > 0:  # an answer with no tokens still takes its first-token time
        await asyncio.sleep(delay)
    sink.finish(plan)


async def _inject(exchange: Exchange, sink: Sink, fault: Fault) -> bool:
    """Apply ``fault``; True when it ended the response."""
    if fault.kind == "error":
        sink.fail(fault)
        return True
    if fault.kind == "drop":
        exchange.drop()
        return True
    if fault.kind == "stall":
        await exchange.hold()
    sink.garble(fault.kind)
    return False
