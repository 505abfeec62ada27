"""``python -m tests.emulator``: the emulator as its own process, for benchmarks and out-of-process tests."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .config import Config
from .server import Server, new_event_loop
from .state import State

DEFAULTS = Config()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.emulator",
        description="A faithful fake Ollama server.",
        epilog="Every other setting of Config: POST a JSON object to /_emulator/config.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=11434, help="0 picks a free port; the URL is printed either way")
    add("--tokens", type=int, default=DEFAULTS.tokens, help="content tokens per answer")
    add("--token-delay-ms", type=float, default=0.0)
    add("--no-record", action="store_true", help="keep no request records (benchmarks)")
    add("--num-parallel", type=int, default=0, help="generations at once; 0 = unlimited")
    add("--max-queue", type=int, default=DEFAULTS.max_queue, help="waiting requests before 503")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    return Config(
        tokens=args.tokens,
        token_delay_ms=args.token_delay_ms,
        record=not args.no_record,
        num_parallel=args.num_parallel,
        max_queue=args.max_queue,
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
    except ValueError as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(State(config), args.host, args.port))
    except OSError as exc:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
