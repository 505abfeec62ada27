"""``python -m tests.emulator``: the emulator as its own process, for benchmarks and out-of-process tests."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from .config import FRAME_STYLES, V1_ERROR_STYLES, Config
from .registry import ModelSpec
from .server import Server, new_event_loop
from .state import State

DEFAULTS = Config()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description="A faithful fake Ollama server.")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=11434, help="0 picks a free port; the URL is printed either way")
    add("--ollama-version", default=DEFAULTS.version, help="what /api/version reports")
    add("--tokens", type=int, default=DEFAULTS.tokens, help="content tokens per answer")
    add("--thinking-tokens", type=int, default=DEFAULTS.thinking_tokens)
    add("--first-token-delay-ms", type=float, default=0.0)
    add("--token-delay-ms", type=float, default=0.0)
    add("--load-delay-ms", type=float, default=0.0, help="load_duration reported on a cold load")
    add("--sleep-on-load", action="store_true", help="also really wait --load-delay-ms on a cold load")
    add("--frame-style", choices=FRAME_STYLES, default=DEFAULTS.frame_style, help="/v1 streaming layout")
    add("--tool-calls-in-done", action="store_true", help="send tool calls in the done chunk")
    add("--v1-error-style", choices=V1_ERROR_STYLES, default=DEFAULTS.v1_error_style)
    add("--no-record", action="store_true", help="keep no request records (benchmarks)")
    add("--num-parallel", type=int, default=0, help="generations at once; 0 = unlimited")
    add("--max-queue", type=int, default=DEFAULTS.max_queue, help="waiting requests before 503")
    add("--loopback-host-check", action="store_true", help="403 for non-local Host headers, as on 127.0.0.1")
    add("--no-origin-check", action="store_true", help="accept any Origin header")
    add("--origins", default="", help="extra allowed origins, comma-separated (like OLLAMA_ORIGINS)")
    add("--keep-alive-s", type=float, default=DEFAULTS.keep_alive_s)
    add("--models-json", help="file with a JSON list of model specs replacing the default models")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    return Config(
        version=args.ollama_version,
        tokens=args.tokens,
        thinking_tokens=args.thinking_tokens,
        first_token_delay_ms=args.first_token_delay_ms,
        token_delay_ms=args.token_delay_ms,
        load_delay_ms=args.load_delay_ms,
        sleep_on_load=args.sleep_on_load,
        frame_style=args.frame_style,
        tool_calls_in_done=args.tool_calls_in_done,
        v1_error_style=args.v1_error_style,
        record=not args.no_record,
        num_parallel=args.num_parallel,
        max_queue=args.max_queue,
        loopback=args.loopback_host_check,
        check_origin=not args.no_origin_check,
        origins=tuple(o for o in args.origins.split(",") if o),
        keep_alive_s=args.keep_alive_s,
    )


async def serve(state: State, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then close every connection."""
    server = Server(state)
    bound = await server.start(host, port)
    print(f"http://{f'[{host}]' if ':' in host else host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from(args)
        models = None
        if args.models_json:
            with open(args.models_json, encoding="utf-8") as handle:
                models = [ModelSpec.from_json(item) for item in json.load(handle)]
    except (ValueError, TypeError, OSError) as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(State(config, models), args.host, args.port))
    except OSError as exc:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
