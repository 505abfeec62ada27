"""The command line: argparse only. Each command parses its flags and calls the function that
does the work; expected failures become one red line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from neuronetz import __version__, config, db, envfile, logs, migrate

PROG = "neuronetz-gateway"
T = TypeVar("T")


class CliError(Exception):
    """An expected, user-facing failure; str() is the one line the user sees."""


def _colour(text: str, code: str) -> str:
    if sys.stderr.isatty() and "NO_COLOR" not in os.environ:
        return f"\033[{code}m{text}\033[0m"
    return text


def error_line(message: str) -> None:
    print(_colour(f"error: {message}", "31"), file=sys.stderr)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def settings_from(args: argparse.Namespace) -> config.Settings:
    return config.load(config.resolve_env_file(args.env_file))


# --- commands -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from neuronetz import server

    settings = settings_from(args)
    overrides = {name: getattr(args, name) for name in ("host", "port", "workers") if getattr(args, name) is not None}
    settings = settings.replace(**overrides)
    logs.configure(settings.log_level)
    if settings.migrate_on_start:
        for name in run_async(_migrate_when_reachable(settings.database_url, wait=30.0)):
            print(f"applied {name}", file=sys.stderr)
    server.serve(settings)
    return 0


async def _migrate_when_reachable(url: str, wait: float) -> list[str]:
    """Migrate, retrying while Postgres is still starting (containers start together)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await migrate.migrate(url)
        except db.DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


def cmd_migrate(args: argparse.Namespace) -> int:
    return run_async(_migrate_and_report(settings_from(args).database_url))


async def _migrate_and_report(url: str) -> int:
    applied = await migrate.migrate(url)
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("the database is up to date")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        settings = settings_from(args)
        url = f"http://{_connectable(settings.host)}:{settings.port}/healthz"
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--url must be an http:// or https:// URL, got {url!r}.")
    try:
        # The scheme was checked above, so urlopen cannot be pointed at file:// or the like.
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310  # nosec B310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"{url} is not answering: {getattr(exc, 'reason', exc)}.") from None
    if status != 200:
        raise CliError(f"{url} answered HTTP {status}.")
    return 0


def _connectable(host: str) -> str:
    """A server listening on every address (0.0.0.0, ::) is reached on loopback."""
    try:
        return "127.0.0.1" if ipaddress.ip_address(host).is_unspecified else host
    except ValueError:
        return host


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Import every compiled dependency and use it once; `build.py` runs this on the binary."""
    from importlib.metadata import version

    import argon2
    import asyncpg
    import hiredis
    import orjson
    import uvloop
    from granian import _granian  # noqa: F401 - the Rust extension itself

    from neuronetz import app  # noqa: F401 - the whole application imports cleanly

    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    hasher.verify(hasher.hash("selfcheck"), "selfcheck")
    orjson.loads(orjson.dumps({"ok": True}))
    uvloop.new_event_loop().close()
    hiredis.Reader().feed(b"+OK\r\n")
    asyncpg.Record  # noqa: B018 - the compiled protocol module is loaded by this import
    packages = ("granian", "httpx", "asyncpg", "redis", "hiredis", "argon2-cffi", "orjson", "uvloop")
    versions = {"neuronetz-gateway": __version__, "python": sys.version.split()[0]}
    versions.update({name: version(name) for name in packages})
    for name, number in versions.items():
        print(f"{name:18} {number}")
    print(f"migrations         {len(migrate.discover())} found")
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--env-file", metavar="PATH", help="read settings from this .env file (default: ./.env when present)"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A secure, multi-tenant API gateway in front of Ollama servers.",
        epilog="Settings come from the environment and the .env file; see the README for every variable.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        parser_ = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser_.set_defaults(handler=handler)
        return parser_

    serve = command("serve", cmd_serve, "run migrations (unless disabled) and serve the gateway on Granian")
    serve.add_argument("--host", help="address to listen on (default: GATEWAY_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default: GATEWAY_PORT)")
    serve.add_argument("--workers", type=int, help="worker processes (default: GATEWAY_WORKERS)")
    command("migrate", cmd_migrate, "apply pending database migrations and print what was done")
    health = command("healthcheck", cmd_healthcheck, "exit 0 if the gateway's /healthz answers 200")
    health.add_argument("--url", help="the URL to check (default: http://127.0.0.1:GATEWAY_PORT/healthz)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: 3)")
    command("selfcheck", cmd_selfcheck, "import every dependency of the binary and print their versions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        if getattr(args, "port", None) is not None and not 1 <= args.port <= 65535:
            raise CliError(f"--port must be between 1 and 65535, got {args.port}.")
        if getattr(args, "workers", None) is not None and not 1 <= args.workers <= 64:
            raise CliError(f"--workers must be between 1 and 64, got {args.workers}.")
        return handler(args)
    except (
        CliError,
        config.ConfigError,
        envfile.EnvFileError,
        db.DatabaseUnavailable,
        migrate.MigrationError,
    ) as exc:
        error_line(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
