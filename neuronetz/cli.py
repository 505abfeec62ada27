"""The command line: argparse only. Each command parses its flags and calls the function that
does the work; expected failures become one red line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import ipaddress
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import httpx
import orjson

from neuronetz import (
    __version__,
    audit,
    backends,
    budgets,
    config,
    db,
    envfile,
    keys,
    limits,
    logs,
    migrate,
    models,
    slots,
    tenants,
    usage,
)
from neuronetz.limits import BUDGET_NAMES, LIMIT_NAMES, Limits
from neuronetz.tenants import LIMIT_MAX, MAX_DAYS

PROG = "neuronetz-gateway"
T = TypeVar("T")


class CliError(Exception):
    """An expected, user-facing failure; str() is the one line the user sees."""


def _colour(text: str, code: str) -> str:
    if sys.stderr.isatty() and "NO_COLOR" not in os.environ:
        return f"\033[{code}m{text}\033[0m"
    return text


def error_line(message: str) -> None:
    print(_colour(f"error: {shown(message)}", "31"), file=sys.stderr)


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


# --- tenants and keys ---------------------------------------------------------------------


def whole(flag: str, minimum: int, maximum: int) -> Callable[[str], int]:
    """argparse type for a whole-number flag within [minimum, maximum]: every number is checked
    here, before it can overflow a column, a datetime or a timeout."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag} takes a whole number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"--{flag} must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def limit_value(name: str, minimum: int, maximum: int) -> Callable[[str], int | None]:
    """argparse type for a limit flag: a whole number the column can hold, or `none` to clear it."""
    number = whole(name, minimum, maximum)

    def parse(raw: str) -> int | None:
        if raw.strip().lower() == "none":
            return None
        try:
            return number(raw)
        except argparse.ArgumentTypeError as exc:
            message = str(exc).replace("takes a whole number", "takes a whole number or 'none'")
            raise argparse.ArgumentTypeError(message) from None

    return parse


def seconds(flag: str, maximum: float) -> Callable[[str], float]:
    """argparse type for a duration in seconds: finite, positive, at most `maximum`."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag} takes a number of seconds, got {raw!r}") from None
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise argparse.ArgumentTypeError(f"--{flag} must be more than 0 and at most {maximum:g}, got {raw}")
        return value

    return parse


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (a key's unset limit inherits the tenant's; 'none' clears one)")
    for name in LIMIT_NAMES:
        flag = name.replace("_", "-")
        budget = name in BUDGET_NAMES
        help_text = {
            "rpm": "requests per minute",
            "tpm": "tokens (prompt + completion) per minute",
            "max_concurrent": "requests in flight at once",
            "daily_tokens": "token budget per UTC day",
            "monthly_tokens": "token budget per UTC calendar month",
            "total_tokens": "token budget for all time",
        }[name]
        group.add_argument(
            f"--{flag}",
            dest=name,
            metavar="N",
            type=limit_value(flag, 0 if budget else 1, LIMIT_MAX[name]),
            default=argparse.SUPPRESS,
            help=help_text,
        )


def add_weight_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight",
        metavar="W",
        type=bounded_weight,
        help="the tenant's share of busy backends (1-1000, default 1): 3 gets three times the slots of 1",
    )


def bounded_weight(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weight must be a whole number, got {raw!r}") from None
    if not 1 <= value <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"--weight must be between 1 and {MAX_WEIGHT}, got {value}")
    return value


MAX_WEIGHT = 1000  # the tenants.weight column's CHECK


def _weight(weight: int) -> str:
    """A tenant's weight for a summary line; the default of 1 goes without saying."""
    return "" if weight == 1 else f"; weight {weight}"


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(args, name) for name in LIMIT_NAMES if name in args})


def limit_changes(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in LIMIT_NAMES if name in args}


def parse_models(raw: str) -> tuple[str, ...] | None:
    if raw.strip().lower() == "all":
        return None
    names = tuple(dict.fromkeys(models.normalize(m) for m in raw.split(",") if m.strip()))
    if not names:
        raise CliError("--models needs at least one model name (or 'all').")
    for name in names:
        if not name.isprintable():
            raise CliError(f"--models: {name!r} is not a model name (it has control or formatting characters).")
    return names


def parse_expiry(args: argparse.Namespace) -> dt.datetime | None:
    now = dt.datetime.now(dt.UTC)
    if args.expires_in_days is not None:
        return now + dt.timedelta(days=args.expires_in_days)
    if args.expires is None:
        return None
    moment = parse_moment("expires", args.expires, "an ISO 8601 date or time, e.g. 2027-01-31 or 2027-01-31T18:00Z")
    if moment <= now:
        raise CliError(f"--expires {args.expires} is in the past.")
    if moment - now > dt.timedelta(days=MAX_DAYS):
        raise CliError(f"--expires {args.expires} is more than {MAX_DAYS} days (100 years) away.")
    return moment


def prompt_logging(args: argparse.Namespace) -> int | None:
    """The prompt TTL in days when the key opts in to prompt logging, else None."""
    if args.log_prompts and args.prompt_ttl_days is None:
        raise CliError("--log-prompts needs --prompt-ttl-days D: how many days prompts are kept.")
    if args.prompt_ttl_days is not None and not args.log_prompts:
        raise CliError("--prompt-ttl-days only applies together with --log-prompts.")
    ttl: int | None = args.prompt_ttl_days
    return ttl


async def with_database(args: argparse.Namespace, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    connection = await db.connect(settings_from(args).database_url)
    try:
        return await work(connection)
    except asyncpg.UndefinedTableError:
        raise CliError("The database has no neuronetz tables yet: run `migrate` first.") from None
    finally:
        await connection.close()


def cmd_create_tenant(args: argparse.Namespace) -> int:
    allow_cloud = bool(args.allow_cloud)
    tenant = run_async(
        with_database(
            args,
            lambda c: tenants.create_tenant(c, args.name, limits_from(args), allow_cloud=allow_cloud,
                                            weight=args.weight or 1),
        )
    )  # fmt: skip
    print(f"created tenant {tenant.name} ({describe_limits(tenant.limits, 'unlimited')}{_weight(tenant.weight)})")
    return 0


def cmd_list_tenants(args: argparse.Namespace) -> int:
    found = run_async(with_database(args, tenants.list_tenants))
    if args.json:
        print_json(
            [
                {"name": t.name, "keys": t.keys, "created_at": t.created_at, **t.limits.as_dict(),
                 "allow_cloud": t.allow_cloud, "weight": t.weight}
                for t in found
            ]
        )  # fmt: skip
    else:
        print_table(
            ["TENANT", "KEYS", "CREATED", "LIMITS", "CLOUD", "WEIGHT"],
            [
                [
                    t.name,
                    str(t.keys),
                    when(t.created_at),
                    describe_limits(t.limits, "unlimited"),
                    cloud(t.allow_cloud),
                    str(t.weight),
                ]
                for t in found
            ],
        )
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    ttl = prompt_logging(args)
    expires = parse_expiry(args)
    allowed = parse_models(args.models) if args.models is not None else None
    info, key = run_async(
        with_database(
            args,
            lambda c: tenants.create_key(
                c,
                args.tenant,
                args.name,
                expires_at=expires,
                models=allowed,
                prompt_ttl_days=ttl,
                limits=limits_from(args),
                allow_cloud=args.allow_cloud,
            ),
        )
    )
    print(f"created key {info.prefix} ({shown(info.name)}) for tenant {info.tenant}", file=sys.stderr)
    print_new_key(key)
    return 0


def print_new_key(key: str) -> None:
    print(key)  # alone on stdout, so that `KEY=$(neuronetz-gateway create-key ...)` works
    print("Store this key now: it is shown only this once and cannot be recovered.", file=sys.stderr)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    prefix = checked_prefix(args.prefix)
    grace = parse_span("grace", args.grace)
    expires = parse_expiry(args)
    rotation = run_async(with_database(args, lambda c: tenants.rotate_key(c, prefix, grace=grace, expires_at=expires)))
    old, new = rotation.old, rotation.new
    print(f"rotated key {old.prefix} ({shown(old.name)}) of tenant {old.tenant}: the new key is {new.prefix}; "
          f"{old.prefix} works until {when(old.expires_at, seconds=True)} UTC", file=sys.stderr)  # fmt: skip
    print_new_key(rotation.key)
    return 0


def key_row(key: tenants.KeyInfo) -> dict[str, Any]:
    return {
        "prefix": key.prefix,
        "name": key.name,
        "tenant": key.tenant,
        "status": key.status(),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "allowed_models": list(key.allowed_models) if key.allowed_models is not None else None,
        "log_prompts": key.log_prompts,
        "prompt_ttl_days": key.prompt_ttl_days,
        **key.limits.as_dict(),
        "replaced_by": key.replaced_by,
        "replaces": key.replaces,
        "allow_cloud": key.allow_cloud,
    }


def cloud(allowed: bool | None) -> str:
    """A key's or tenant's cloud setting in a table (None: the key inherits the tenant's)."""
    return "inherit" if allowed is None else "allowed" if allowed else "off"


def cmd_list_keys(args: argparse.Namespace) -> int:
    found = run_async(with_database(args, lambda c: tenants.list_keys(c, args.tenant)))
    if args.json:
        print_json([key_row(k) for k in found])
        return 0
    rows = [
        [
            k.prefix,
            k.name,
            k.tenant,
            k.status(),
            when(k.created_at),
            when(k.expires_at),
            when(k.last_used_at),
            ",".join(k.allowed_models) if k.allowed_models is not None else "all",
            f"{k.prompt_ttl_days}d" if k.log_prompts else "off",
            describe_limits(k.limits, "inherit"),
            rotation_of(k),
            cloud(k.allow_cloud),
        ]
        for k in found
    ]
    print_table(
        ["PREFIX", "NAME", "TENANT", "STATUS", "CREATED", "EXPIRES", "LAST USED", "MODELS", "PROMPTS", "LIMITS",
         "ROTATION", "CLOUD"], rows,
    )  # fmt: skip
    return 0


def rotation_of(key: tenants.KeyInfo) -> str:
    parts = [f"replaces {key.replaces}"] if key.replaces else []
    parts += [f"replaced by {key.replaced_by}"] if key.replaced_by else []
    return "; ".join(parts) or "-"


def checked_prefix(raw: str) -> str:
    prefix = raw.strip()
    if not keys.PREFIX_PATTERN.fullmatch(prefix):
        raise CliError(f"{prefix!r} is not a key prefix: it looks like nz_ followed by 8 lowercase letters or digits.")
    return prefix


def cmd_revoke_key(args: argparse.Namespace) -> int:
    prefix = checked_prefix(args.prefix)
    info, was_active = run_async(with_database(args, lambda c: tenants.revoke_key(c, prefix)))
    name = shown(info.name)
    if was_active:
        print(f"revoked key {info.prefix} ({name}) of tenant {info.tenant}; every replica refuses it within 1 s")
    else:
        print(f"key {info.prefix} ({name}) was already revoked")
    return 0


def cmd_set_limits(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = limit_changes(args)
    if args.weight is not None:
        if args.tenant is None:
            raise CliError("--weight applies to tenants: use --tenant.")
        changes["weight"] = args.weight
    if args.allow_cloud is not None:
        changes["allow_cloud"] = args.allow_cloud
    if args.tenant is not None:
        for flag in ("models", "log_prompts", "no_log_prompts", "prompt_ttl_days"):
            if getattr(args, flag) not in (None, False):
                raise CliError(f"--{flag.replace('_', '-')} applies to keys: use --prefix.")
        if not changes:
            raise CliError("Nothing to change: give at least one limit flag, e.g. --rpm 60.")
        tenant = run_async(with_database(args, lambda c: tenants.update_tenant(c, args.tenant, changes)))
        print(f"tenant {tenant.name}: {describe_limits(tenant.limits, 'unlimited')}{_weight(tenant.weight)}")
        return 0
    if args.models is not None:
        models_ = parse_models(args.models)
        changes["allowed_models"] = list(models_) if models_ is not None else None
    if args.no_log_prompts:
        if args.log_prompts:
            raise CliError("--log-prompts and --no-log-prompts contradict each other.")
        changes.update(log_prompts=False, prompt_ttl_days=None)
    elif args.log_prompts or args.prompt_ttl_days is not None:
        changes.update(log_prompts=True, prompt_ttl_days=prompt_logging(args))
    if not changes:
        raise CliError("Nothing to change: give at least one flag, e.g. --rpm 60 or --models llama3.2.")
    key = run_async(with_database(args, lambda c: tenants.update_key(c, args.prefix, changes)))
    print(
        shown(
            f"key {key.prefix} ({key.name}): {describe_limits(key.limits, 'inherit')}; models "
            f"{','.join(key.allowed_models) if key.allowed_models is not None else 'all'}; prompt logging "
            f"{f'{key.prompt_ttl_days}d' if key.log_prompts else 'off'}. Every replica applies it within 1 s."
        )
    )
    return 0


# --- backends -------------------------------------------------------------------------------


def env_path(args: argparse.Namespace) -> Path:
    return Path(args.env_file) if args.env_file else config.DEFAULT_ENV_FILE


def cmd_change_backend(args: argparse.Namespace, add: bool) -> int:
    path = env_path(args)
    try:
        change, text = backends.plan_backends_change(path, args.url, add)
    except config.ConfigError as exc:
        raise CliError(str(exc).replace("URL:", "The URL", 1)) from None
    except OSError as exc:
        raise CliError(f"Cannot read {path}: {exc.strerror}.") from None
    verb = "add-backend" if add else "remove-backend"
    if not change.changed:
        state = "is already configured" if add else "is not configured"
        print(f"{args.url} {state} in {path}; nothing to change.", file=sys.stderr)
        print(change.line)
        return 0
    try:
        envfile.write_atomically(path, text)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        error_line(f"cannot write {path} ({reason}): the file is unchanged.")
        hint = (
            f"This process runs as uid {os.getuid()}; in the container the .env file belongs to the host user.\n"
            "Two ways forward:\n"
            f"  1. run the command as root in the container (same files, ownership bypassed):\n"
            f"       docker exec -u root <container> neuronetz-gateway {verb} {args.url}\n"
            f"  2. or edit {path} by hand so that it has this line:"
        )
        print(_colour(hint, "31"), file=sys.stderr)
        print(change.line)
        return 1
    print(f"{'added' if add else 'removed'} {args.url} in {path}; running gateways apply it within a few seconds",
          file=sys.stderr)  # fmt: skip
    if not change.was_set:
        print(f"note: {path} did not set OLLAMA_BACKENDS before; it now lists only what is shown.", file=sys.stderr)
    if "OLLAMA_BACKENDS" in os.environ:
        print("note: OLLAMA_BACKENDS is also set in this environment, and the environment wins over the file.",
              file=sys.stderr)  # fmt: skip
    print(change.line)
    return 0


def cmd_list_backends(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    states = _gateway_view(settings) if not args.check else None
    source = "gateway"
    if states is None and args.check:
        states, source = run_async(_probe_backends(settings.ollama_backends)), "probe"
    rows = []
    for url in settings.ollama_backends:
        state = (states or {}).get(url)
        rows.append({"url": url, **({"state": state} if state is not None else {})})
    if args.json:
        print_json(rows)
        return 0
    if states is None:
        print("(no gateway answered on this host; use --check to probe the backends directly)", file=sys.stderr)
    elif source == "gateway":
        print("(as the running gateway sees them)", file=sys.stderr)
    table = []
    for row in rows:
        state = row.get("state") or {}
        health = "-" if not state else "up" if state.get("ok") else f"down ({state.get('error', 'unavailable')})"
        own = settings.slots_by_backend.get(row["url"])
        capacity = (settings.backend_slots if own is None else own) or "-"
        use = f"{state['in_flight']}/{capacity}" if "in_flight" in state else f"-/{capacity}"
        loaded, listed = ",".join(state.get("loaded") or []) or "-", ",".join(state.get("models") or []) or "-"
        table.append([row["url"], health, str(state.get("version") or "-"), use, loaded, listed])
    print_table(["BACKEND", "HEALTH", "VERSION", "IN USE/SLOTS", "LOADED", "MODELS"], table)
    return 0


def _gateway_view(settings: config.Settings) -> dict[str, Any] | None:
    url = f"http://{_connectable(settings.host)}:{settings.port}/readyz"
    # /readyz shows backend detail only to the holder of the metrics token.
    headers = {"Authorization": f"Bearer {settings.metrics_token}"} if settings.metrics_token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=1.5) as response:  # nosec B310
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError):
        return None
    try:
        each: dict[str, Any] = orjson.loads(body)["backends"].get("each") or {}
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return each


async def _probe_backends(urls: tuple[str, ...]) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=3.0) as client:
        # One probe decides: a one-off check has no earlier rounds to confirm a failure.
        pool = backends.BackendPool(urls, client, interval=60, cooldown=0, failures_to_mark_down=1)
        await pool.refresh()
        return {backend.url: backend.state() for backend in pool.backends}


# --- usage, audit, prompts -------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> int:
    if args.start is not None:
        return usage_export(args)
    for flag, given in (("--to", args.end), ("--by", args.by), ("--csv", args.csv)):
        if given:
            raise CliError(f"{flag} belongs to a usage export: give the first day with --from YYYY-MM-DD.")
    settings = settings_from(args)

    async def work(connection: Any) -> list[dict[str, Any]]:
        if args.tenant is not None:
            await tenants.tenant_id(connection, args.tenant)
        if args.prefix is not None:
            await tenants.get_key(connection, args.prefix)
        report = await budgets.usage_report(connection, tenant=args.tenant, prefix=args.prefix, now=time.time())
        limits_of = {k.prefix: k for k in await tenants.list_keys(connection, args.tenant)}
        tenant_limits = {t.name: t.limits for t in await tenants.list_tenants(connection)}
        flights = await _in_flight(settings, report)
        queued = await _waiting(settings)
        for row in report:
            row["waiting_tenant"] = queued.get(row["tenant_id"], 0)
            key = limits_of[row["prefix"]]
            row["key_limits"] = key.limits.as_dict()
            row["tenant_limits"] = tenant_limits[row["tenant"]].as_dict()
            row["in_flight_key"], row["in_flight_tenant"] = flights.get(row["key_id"], (None, None))
        return report

    report = run_async(with_database(args, work))
    if args.json:
        print_json(report)
        return 0
    table = []
    for row in report:
        flight = "-" if row["in_flight_key"] is None else f"{row['in_flight_key']}/{row['in_flight_tenant']}"
        if row["waiting_tenant"]:
            flight += f" (tenant: {row['waiting_tenant']} waiting)"
        table.append([
            row["tenant"], row["prefix"], row["name"],
            f"{row['requests_today']} / {_against(row, 'tokens_today', 'daily_tokens')}",
            f"{row['requests_month']} / {_against(row, 'tokens_month', 'monthly_tokens')}",
            f"{row['requests_total']} / {_against(row, 'tokens_total', 'total_tokens')}",
            flight,
        ])  # fmt: skip
    print_table(["TENANT", "KEY", "NAME", "TODAY req/tokens", "MONTH req/tokens", "TOTAL req/tokens", "IN FLIGHT"],
                table)  # fmt: skip
    print("tokens are shown as used/budget where a budget applies (the key's own, else its tenant's); "
          "IN FLIGHT is key/tenant, counted where a concurrency limit or budget applies", file=sys.stderr)  # fmt: skip
    return 0


GROUPINGS = ("day", "key", "model")


def parse_grouping(raw: str) -> frozenset[str]:
    """`--by` with one or more of day, key and model, comma-separated: `--by day,model`."""
    wanted = frozenset(part.strip() for part in raw.split(",") if part.strip())
    if not wanted or not wanted <= set(GROUPINGS):
        raise argparse.ArgumentTypeError(
            f"--by takes one or more of day, key and model, comma-separated (e.g. day,model); got {raw!r}"
        )
    return wanted


def parse_day(flag: str) -> Callable[[str], dt.date]:
    def parse(raw: str) -> dt.date:
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag} takes a UTC day as YYYY-MM-DD, got {raw!r}") from None

    return parse


def usage_export(args: argparse.Namespace) -> int:
    if args.csv and args.json:
        raise CliError("--csv and --json contradict each other: choose one.")
    start: dt.date = args.start
    end: dt.date = args.end if args.end is not None else dt.datetime.now(dt.UTC).date()
    if end < start:
        raise CliError(f"The last day {end} (--to) is before the first day {start} (--from).")
    grouping = args.by or frozenset()

    async def work(connection: Any) -> list[dict[str, Any]]:
        if args.tenant is not None:
            await tenants.tenant_id(connection, args.tenant)
        if args.prefix is not None:
            await tenants.get_key(connection, args.prefix)
        return await usage.export(
            connection, start=start, end=end, by_day="day" in grouping, by_key="key" in grouping,
            by_model="model" in grouping, tenant=args.tenant, prefix=args.prefix,
        )  # fmt: skip

    rows = run_async(with_database(args, work))
    if args.json:
        print_json(rows)
    elif args.csv:
        print_csv(usage.COLUMNS, rows)
    else:
        print_table([c.upper() for c in usage.COLUMNS], [["" if r[c] is None else str(r[c]) for c in usage.COLUMNS]
                                                          for r in rows])  # fmt: skip
    return 0


def _against(row: dict[str, Any], used: str, budget: str) -> str:
    """`used/budget` with the budget that applies (the key's own, else its tenant's)."""
    limit = row["key_limits"][budget] if row["key_limits"][budget] is not None else row["tenant_limits"][budget]
    return f"{row[used]}/{limit}" if limit is not None else str(row[used])


async def _in_flight(settings: config.Settings, report: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """Requests holding a lease right now, per key and its tenant; empty if Redis is away."""
    from neuronetz.worker import connect_redis  # the gateway's own client: standalone, Sentinel or Cluster

    client = connect_redis(settings)
    prefix = settings.redis_prefix
    try:
        return {
            row["key_id"]: (
                await limits.in_flight(client, prefix, row["tenant_id"], f"k{row['key_id']}"),
                await limits.in_flight(client, prefix, row["tenant_id"], "t"),
            )
            for row in report
        }
    except limits.REDIS_ERRORS:
        return {}
    finally:
        await client.aclose()


async def _waiting(settings: config.Settings) -> dict[int, int]:
    """Requests waiting for a backend slot right now, per tenant id; empty if Redis is away."""
    from neuronetz.worker import connect_redis  # the gateway's own client: standalone, Sentinel or Cluster

    client = connect_redis(settings)
    try:
        return await slots.waiting(client, settings.redis_prefix)
    except limits.REDIS_ERRORS:
        return {}
    finally:
        await client.aclose()


_SPAN = re.compile(r"([0-9]{1,12})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def span(flag: str, raw: str) -> dt.timedelta | None:
    """`30s`, `30m`, `2h`, `7d` as a timedelta, at most MAX_DAYS long; None if `raw` is no span."""
    match = _SPAN.fullmatch(raw.strip())
    if match is None:
        return None
    length = int(match[1]) * _UNITS[match[2]]
    if length > MAX_DAYS * 86400:
        raise CliError(f"--{flag} {raw} is longer than {MAX_DAYS} days (100 years).")
    return dt.timedelta(seconds=length)


def parse_span(flag: str, raw: str) -> dt.timedelta:
    length = span(flag, raw)
    if length is None:
        raise CliError(f"--{flag} takes a span like 30s, 30m, 2h or 7d; got {raw!r}.")
    return length


def parse_moment(flag: str, raw: str, expected: str) -> dt.datetime:
    """An ISO 8601 time (UTC unless it says otherwise), in UTC: a time whose offset moves it
    out of the years 1-9999 would otherwise fail later, in the database driver."""
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise CliError(f"--{flag} takes {expected}; got {raw!r}.") from None
    try:
        return moment.replace(tzinfo=moment.tzinfo or dt.UTC).astimezone(dt.UTC)
    except OverflowError:
        raise CliError(f"--{flag} {raw} is outside the years 1 to 9999 in UTC.") from None


def parse_since(raw: str) -> dt.datetime:
    """`--since` as ISO 8601 (UTC unless it says otherwise) or a span back from now: 30m, 2h, 7d."""
    back = span("since", raw)
    if back is not None:
        return dt.datetime.now(dt.UTC) - back
    return parse_moment("since", raw, "an ISO 8601 time or a span like 30m, 2h or 7d")


def cmd_audit(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None

    async def work(connection: Any) -> list[dict[str, Any]]:
        tenant = await tenants.tenant_id(connection, args.tenant) if args.tenant is not None else None
        return await audit.recent(connection, tenant_id=tenant, prefix=args.prefix, since=since, limit=args.limit)

    records = run_async(with_database(args, work))
    if args.json:
        print_json(records)
        return 0
    print_table(
        ["TIME", "REQUEST ID", "TENANT", "KEY", "CLIENT", "ROUTE", "MODEL", "STATUS", "TOKENS", "TTFB ms", "TOTAL ms"],
        [_audit_row(record) for record in records],
    )
    return 0


def _audit_row(r: dict[str, Any]) -> list[str]:
    status = str(r["status"]) + (f" {r['error_code']}" if r["error_code"] else "")
    return [
        r["created_at"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"), r["request_id"], r["tenant"] or "-",
        r["key_prefix"] or "-", str(r["client_addr"] or "-"), r["route"], r["model"] or "-",
        status + (" (client left)" if r["disconnected"] else ""), f"{r['prompt_tokens']}+{r['completion_tokens']}",
        f"{r['ttfb_ms']:.1f}" if r["ttfb_ms"] is not None else "-", f"{r['duration_ms']:.1f}",
    ]  # fmt: skip


def cmd_purge_prompts(args: argparse.Namespace) -> int:
    deleted = run_async(with_database(args, audit.purge_prompts))
    print(f"deleted {deleted} prompt log rows past their expiry")
    return 0


# --- output -------------------------------------------------------------------------------


def when(moment: dt.datetime | None, seconds: bool = False) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def shown(text: str) -> str:
    """`text` with every character a terminal acts on or hides (newlines, ANSI escapes, other
    control characters, bidirectional overrides, zero-width and other formatting characters)
    written as a Python-style escape such as `\\n`, `\\x1b` or `\\u202e`. Names, models and
    routes may have been stored by other tools or sent by clients: they must not be able to add
    lines or colours to what the CLI prints."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # astral characters are written as a UTF-16 surrogate pair (RFC 8259, section 7)
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def describe_limits(limits: Limits, unset: str) -> str:
    parts = [
        f"{name.replace('_tokens', '').replace('max_', '')}={value}"
        for name, value in limits.as_dict().items()
        if value is not None
    ]
    return " ".join(parts) if parts else unset


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    """Indented JSON in which no string holds a character a terminal acts on: orjson escapes
    C0 controls itself; the rest (DEL, C1 controls, formatting characters) become `\\uXXXX`
    here, which denotes the same string. A raw newline left in the text is indentation."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
    print("\n".join(
        line if line.isprintable() else "".join(c if c.isprintable() else _json_escape(c) for c in line)
        for line in text.split("\n")
    ))  # fmt: skip


def print_csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """RFC 4180 CSV with a header line and LF line ends; a field is quoted only when it holds a
    comma or a quote, and escaped like a table cell, so every record is one line."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if row[c] is None else shown(str(row[c])) for c in columns] for row in rows])


# --- parser -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one tidy line and exit 1 like every other user error."""

    def error(self, message: str) -> NoReturn:
        error_line(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--env-file", metavar="PATH", help="read settings from this .env file (default: ./.env when present)"
    )
    parser = Parser(
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
    serve.add_argument("--port", type=whole("port", 1, 65535), help="port to listen on (default: GATEWAY_PORT)")
    serve.add_argument("--workers", type=whole("workers", 1, 64), help="worker processes (default: GATEWAY_WORKERS)")
    command("migrate", cmd_migrate, "apply pending database migrations and print what was done")
    health = command("healthcheck", cmd_healthcheck, "exit 0 if the gateway's /healthz answers 200")
    health.add_argument("--url", help="the URL to check (default: http://127.0.0.1:GATEWAY_PORT/healthz)")
    health.add_argument("--timeout", type=seconds("timeout", 3600), default=3.0, help="seconds to wait (default: 3)")
    command("selfcheck", cmd_selfcheck, "import every dependency of the binary and print their versions")

    create_tenant = command("create-tenant", cmd_create_tenant, "create a tenant, optionally with limits")
    create_tenant.add_argument("--name", required=True, help="unique tenant name (letters, digits, . _ -)")
    add_limit_flags(create_tenant)
    add_weight_flag(create_tenant)
    add_cloud_flag(create_tenant)
    list_tenants = command("list-tenants", cmd_list_tenants, "list tenants with their limits")
    list_tenants.add_argument("--json", action="store_true", help="print one JSON array")

    create_key = command("create-key", cmd_create_key, "create an API key and print it, exactly once")
    create_key.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    create_key.add_argument("--name", required=True, help="a name for the key, unique within the tenant")
    add_expiry_flags(create_key)
    create_key.add_argument("--models", metavar="m1,m2", help="allow only these models (default: all)")
    add_prompt_flags(create_key)
    add_limit_flags(create_key)
    add_cloud_flag(create_key)

    list_keys = command("list-keys", cmd_list_keys, "list API keys (never their secrets)")
    list_keys.add_argument("--tenant", help="only this tenant's keys")
    list_keys.add_argument("--json", action="store_true", help="print one JSON array")
    revoke = command("revoke-key", cmd_revoke_key, "revoke a key; every replica refuses it within 1 s")
    revoke.add_argument("--prefix", required=True, metavar="nz_xxxxxxxx", help="the key's public prefix")
    rotate = command(
        "rotate-key", cmd_rotate_key, "replace a key by a new one with the same settings; the old one works for --grace"
    )
    rotate.add_argument("--prefix", required=True, metavar="nz_xxxxxxxx", help="the key to replace")
    rotate.add_argument(
        "--grace",
        default="24h",
        metavar="SPAN",
        help="how long the old key keeps working: 0s, 30m, 24h, 7d (default 24h)",
    )
    add_expiry_flags(rotate, "(default: the old key's expiry)")

    set_limits = command("set-limits", cmd_set_limits, "change a tenant's or a key's limits (applied within 1 s)")
    target = set_limits.add_mutually_exclusive_group(required=True)
    target.add_argument("--tenant", help="change this tenant")
    target.add_argument("--prefix", metavar="nz_xxxxxxxx", help="change this key")
    set_limits.add_argument("--models", metavar="m1,m2", help="a key's allowed models, or 'all'")
    add_prompt_flags(set_limits)
    set_limits.add_argument("--no-log-prompts", action="store_true", help="stop logging this key's prompts")
    add_limit_flags(set_limits)
    add_weight_flag(set_limits)
    add_cloud_flag(set_limits)

    for name, add in (("add-backend", True), ("remove-backend", False)):
        verb = "add an Ollama base URL to" if add else "remove an Ollama base URL from"
        change = command(name, partial(cmd_change_backend, add=add), f"{verb} OLLAMA_BACKENDS in the .env file")
        change.add_argument("url", metavar="URL", help="e.g. http://ollama:11434")
    list_backends = command("list-backends", cmd_list_backends, "show the configured backends and their health")
    list_backends.add_argument("--check", action="store_true", help="probe each backend from here")
    list_backends.add_argument("--json", action="store_true", help="print one JSON array")

    usage_ = command(
        "usage",
        cmd_usage,
        "requests and tokens today, this month and in total, against budgets; with --from, the ledger over a range "
        "of days per tenant (for chargeback)",
    )
    # The export's columns are an interface for scripts: listed where a script's author looks.
    usage_.epilog = (
        f"With --from, every row has these columns, in this order: {', '.join(usage.COLUMNS)}. The period is the "
        "row's day with --by day, else --from to --to; key_prefix and key_name are empty (JSON null) unless split by "
        "key, model unless split by model. Models are named as the gateway compares them (lower case, ':latest' when "
        "untagged); an empty model is usage the ledger has no model for (recorded before it kept models, or a "
        "request that named none)."
    )
    usage_.add_argument("--tenant", help="only this tenant's keys")
    usage_.add_argument("--prefix", metavar="nz_xxxxxxxx", help="only this key")
    usage_.add_argument("--json", action="store_true", help="print one JSON array")
    usage_.add_argument("--from", dest="start", metavar="YYYY-MM-DD", type=parse_day("from"), help="first UTC day")
    usage_.add_argument(
        "--to", dest="end", metavar="YYYY-MM-DD", type=parse_day("to"), help="last UTC day (default: today)"
    )
    usage_.add_argument(
        "--by",
        type=parse_grouping,
        metavar="day|key|model[,...]",
        help="split each tenant's usage by day, key and/or model, e.g. --by day,model",
    )
    usage_.add_argument("--csv", action="store_true", help="print CSV with a header line")
    audit_ = command("audit", cmd_audit, "recent request records, newest first")
    audit_.add_argument("--tenant", help="only this tenant")
    audit_.add_argument("--prefix", metavar="nz_xxxxxxxx", help="only this key")
    audit_.add_argument("--since", metavar="T", help="ISO 8601 time, or a span back from now: 30m, 2h, 7d")
    audit_.add_argument(
        "--limit", type=whole("limit", 1, 100_000), default=50, metavar="N", help="at most N records (default 50)"
    )
    audit_.add_argument("--json", action="store_true", help="print one JSON array")
    command("purge-prompts", cmd_purge_prompts, "delete prompt logs past their TTL now (the gateway also does it)")
    return parser


def add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-prompts", action="store_true", help="log this key's prompts and answers (opt-in)")
    parser.add_argument(
        "--prompt-ttl-days",
        metavar="D",
        type=whole("prompt-ttl-days", 1, MAX_DAYS),
        help="days logged prompts are kept",
    )


def add_expiry_flags(parser: argparse.ArgumentParser, default: str = "") -> None:
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires",
        metavar="ISO8601",
        help=" ".join(filter(None, ["expiry time, e.g. 2027-01-31 or 2027-01-31T18:00Z (UTC)", default])),
    )
    expiry.add_argument(
        "--expires-in-days", metavar="D", type=whole("expires-in-days", 1, MAX_DAYS), help="expire D days from now"
    )


def add_cloud_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-cloud", action=argparse.BooleanOptionalAction, default=None,
        help="allow Ollama cloud models (…:cloud, …-cloud) and server-side tools such as web_search, which run on "
        "the server owner's ollama.com account (default: off; a key inherits its tenant's setting)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    for raw in argv if argv is not None else sys.argv[1:]:
        try:
            raw.encode()
        except UnicodeEncodeError:  # bytes that were not UTF-8, smuggled in by surrogateescape
            error_line(f"The argument {raw!r} is not valid UTF-8 text.")
            return 1
    args = build_parser().parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except (
        CliError,
        config.ConfigError,
        envfile.EnvFileError,
        db.DatabaseUnavailable,
        migrate.MigrationError,
        tenants.AdminError,
    ) as exc:
        error_line(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
