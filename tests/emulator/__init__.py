"""A faithful fake Ollama for the test suite and the benchmarks.

The authority is Ollama's API documentation (``docs/api.md`` and
``docs/openai.md`` in github.com/ollama/ollama) and its source; a §N in a
comment is a section of the API notes the emulator was first written from.
Where a real server was observed to differ, the comment names the release:
``tests/real/test_emulator_fidelity.py`` compares the emulator with a real
Ollama v0.24.0 whenever one is available. The server is written directly on
asyncio (uvloop when installed) so it can stall, drop the socket, and notice a
client leaving the moment its FIN arrives.

Python API (in-process; every method is thread-safe)::

    from tests.emulator import Emulator, Config, Fault, ModelSpec, count_prompt_tokens

    with Emulator(Config(tokens=5, token_delay_ms=20)) as emu:   # 127.0.0.1, free port
        emu.url                                  # "http://127.0.0.1:43817"
        emu.requests(path=None)                  # [RecordedRequest]: seq, method, path, target (raw), query,
                                                 #   headers (original case and order), body, at, monotonic;
                                                 #   .header(name) is case-insensitive, .json() parses the body
        emu.clear_requests()
        emu.wait_for_cancellations(count=1, timeout=1.0)   # [Cancellation(path, model, tokens_sent, at,
                                                 #   monotonic)], once there are `count` or the time is up
        emu.inject("error", after_tokens=2, model="tiny", times=1)   # or emu.inject(Fault(...));
                                                 #   no path = the next inference request (chat,
                                                 #   generate, embed...), never a health probe
        emu.clear_faults()
        emu.configure(token_delay_ms=5, frame_style="legacy")
        emu.add_model("m", capabilities=("completion", "tools"))
        emu.set_models([ModelSpec("only")])
        emu.stats()                              # Stats(requests, cancellations, in_flight, peak_in_flight,
                                                 #   generations, peak_generations: inference requests inside)
        emu.reset()                              # config, models, faults, records as at construction

``Config`` fields: version, tokens (10), thinking_tokens (3), first_token_delay_ms,
token_delay_ms, load_delay_ms, sleep_on_load, frame_style ("modern" | "legacy" |
"pre-0.5.2": where an Ollama release puts a /v1 stream's finish and usage events),
tool_calls_in_done, v1_error_style ("ollama" | "openai"), record, num_parallel
(0 = unlimited), max_queue (512), keep_alive_s, ignore_output_cap. ``ModelSpec``: name,
capabilities, family, parameter_size, quantization_level, size, modified_at,
context_length, embedding_length. Default models: ``tiny``,
``llama3.2`` (tools), ``qwen3`` (tools, thinking), ``llava`` (vision),
``nomic-embed-text`` (embedding). ``Fault`` kinds (status, error, drop, stall,
malformed, blank) and where each acts: see ``tests/emulator/faults.py``.

Records: request headers keep their original case and order, as a list of
pairs; the body is the exact bytes received (chunked bodies de-chunked). A
``Cancellation`` is recorded when a client closes (FIN or RST) before its
response is complete, from the socket callback itself, so ``monotonic`` is
within a millisecond of the close; ``tokens_sent`` counts steps already
written (or generated, for stream:false).

HTTP control API, for the emulator as its own process (JSON, never recorded, never faulted)::

    POST   /_emulator/config                       a partial update of Config; answers the new config
    GET    /_emulator/stats                        {"requests", "cancellations", "in_flight", "peak_in_flight",
                                                    "generations", "peak_generations"}

Routes: /api/version, /api/tags, /api/ps, /api/show, /api/generate, /api/chat, /api/embed,
/api/embeddings, /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models[/NAME],
/v1/responses and /v1/messages. Anything else is gin's ``404 page not found`` (and still
recorded, so a test sees a request a gateway should not have forwarded). Request bodies are
framed by Content-Length, as a gateway sends them; a chunked body is refused with 501.

Answers are deterministic: content is ``Config.tokens`` words of "Lorem ipsum
dolor sit amet ..." (tokens "Lorem", " ipsum", ...); thinking models first think
``thinking_tokens`` words of "Let me think about this carefully."; a tools-capable
model given ``tools`` calls the first tool (string arguments "test", numbers 1)
unless the last message is a tool result. ``options.num_predict`` / ``max_tokens``
above zero cut the answer (done_reason "length"); 0 and negative values mean no
limit, as in Ollama.
Embeddings are ``embedding_vector(text, model.embedding_length)``.

Token counting (``count_prompt_tokens(path, body)`` computes it): a token is a
whitespace-separated word. Generate and /v1 completions count the words of
system + prompt + suffix plus ``len(context)``; chat counts, per message, 1
plus the words of its content (a /v1 parts list counts once per part); embed
counts the words of every input. ``eval_count`` is the number of emitted steps
(thinking tokens, content tokens, one per tool call). Durations are nominal
and exact, in ns: load = 100 000 (+ load_delay_ms on a cold load), prompt_eval
= first_token_delay_ms + 10 000 per prompt token, eval = eval_count x
(token_delay_ms + 10 000), total = their sum (``tests/emulator/engine.py``).

CLI (the same server as a process; prints its URL, serves until SIGTERM/SIGINT)::

    python -m tests.emulator --host 127.0.0.1 --port 11434 [--tokens N] [--token-delay-ms MS]
        [--no-record] [--num-parallel N] [--max-queue N]      # the rest: POST /_emulator/config
"""

from __future__ import annotations

from .config import Config
from .emulator import Emulator
from .faults import Fault
from .prompt import count_prompt_tokens, embedding_vector
from .registry import DEFAULT_MODELS, ModelSpec
from .state import Cancellation, RecordedRequest, Stats

__all__ = [
    "DEFAULT_MODELS",
    "Cancellation",
    "Config",
    "Emulator",
    "Fault",
    "ModelSpec",
    "RecordedRequest",
    "Stats",
    "count_prompt_tokens",
    "embedding_vector",
]
