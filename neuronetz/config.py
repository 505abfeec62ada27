"""Configuration: one frozen `Settings`, built once from the environment and the .env file.

Precedence: the process environment wins over the .env file, which wins over the defaults
below. Every variable is declared exactly once in `VARIABLES` (name, default, parser and a
one-line description); `.env.example` and the README's table are checked against it by the
tests, so a new setting cannot go undocumented. A bad value raises `ConfigError` with one
sentence naming the variable and what was expected; nothing here opens a connection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from neuronetz import envfile

DEFAULT_ENV_FILE = Path(".env")
# The CLI passes the chosen --env-file to Granian's worker processes through this variable,
# so every worker builds the same Settings as the process that started it.
ENV_FILE_VARIABLE = "NEURONETZ_ENV_FILE"

_N = TypeVar("_N", int, float)


class ConfigError(Exception):
    """A configuration value is missing or wrong; str(error) is the sentence for the user."""


# --- value parsers: each takes the raw string and the variable name, returns the value ---


def _number(
    convert: Callable[[str], _N], low: _N, high: _N, noun: str, shown: str = "{}", unit: str = ""
) -> Callable[[str, str], _N]:
    def parse(raw: str, name: str) -> _N:
        try:
            value = convert(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be {noun}, got {raw!r}.") from None
        if not low <= value <= high:
            between = f"{shown.format(low)} and {shown.format(high)}{unit}"
            raise ConfigError(f"{name} must be between {between}, got {shown.format(value)}.")
        return value

    return parse


def _integer(low: int, high: int) -> Callable[[str, str], int]:
    return _number(int, low, high, "a whole number")


def _seconds(low: float, high: float) -> Callable[[str, str], float]:
    return _number(float, low, high, "a number of seconds", "{:g}", " seconds")


def _boolean(raw: str, name: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.")


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}.")
        return value

    return parse


def _text(raw: str, name: str) -> str:
    return raw.strip()


def _networks(raw: str, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    try:
        return tuple(ip_network(item.strip(), strict=False) for item in raw.split(",") if item.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated IP addresses or CIDR ranges, got {raw!r}.") from None


def _redis_prefix(raw: str, name: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() or ch in "{}*?[]" for ch in value):
        raise ConfigError(f"{name} must be a non-empty key prefix without spaces, braces or glob characters.")
    return value


def _sentinel_master(raw: str, name: str) -> str:
    value = raw.strip()
    if not value or len(value) > 200 or not value.isprintable() or any(ch.isspace() for ch in value):
        raise ConfigError(f"{name} must be the name the Sentinels monitor the primary under, got {raw!r}.")
    return value


def _host(raw: str, name: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() or ch in "/?#" for ch in value):
        raise ConfigError(f"{name} must be a host name or IP address to listen on, got {raw!r}.")
    return value


def _url(schemes: tuple[str, ...], example: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        value = raw.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{name} must be a URL like {example}, got {raw!r}.") from None
        if parts.scheme not in schemes or not (parts.hostname or parts.path):
            raise ConfigError(f"{name} must be a URL like {example}, got {raw!r}.")
        return value

    return parse


def _redis_urls(raw: str, name: str) -> str:
    """One URL, or several separated by commas (seed nodes of a cluster, or Sentinels); each
    is checked, and whether several fit REDIS_MODE is checked in `load`."""
    one = _url(("redis", "rediss", "unix"), "redis://host:6379/0")
    return ",".join(one(item, name) for item in raw.split(","))


def parse_backend_url(raw: str, name: str = "OLLAMA_BACKENDS") -> str:
    """Validate one Ollama base URL and return it in canonical form (no trailing slash).

    >>> parse_backend_url("http://ollama:11434/")
    'http://ollama:11434'
    """
    value = raw.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid URL (expected e.g. http://ollama:11434).") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {raw!r} must be an http:// or https:// URL with a host, e.g. http://ollama:11434.")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{name}: {raw!r} must not carry a query, fragment or credentials.")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def parse_backends(raw: str, name: str = "OLLAMA_BACKENDS") -> tuple[str, ...]:
    """Comma-separated backend URLs, validated, canonical and de-duplicated in order. An
    entry may carry options after the URL (`http://gpu1:11434;slots=4`, see `backend_slots`)."""
    return tuple(backend_specs(raw, name))


def backend_specs(raw: str, name: str = "OLLAMA_BACKENDS") -> dict[str, int | None]:
    """Each backend URL with its own slot count (None: GATEWAY_BACKEND_SLOTS applies), in order.

    >>> backend_specs("http://a:11434;slots=4, http://b:11434")
    {'http://a:11434': 4, 'http://b:11434': None}
    """
    specs: dict[str, int | None] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        url_part, *options = item.split(";")
        url = parse_backend_url(url_part, name)
        slots: int | None = None
        for option in options:
            option_name, _, value = option.strip().partition("=")
            if option_name.strip() != "slots":
                raise ConfigError(f"{name}: unknown option {option.strip()!r} after {url} (only ;slots=N is known).")
            slots = _integer(0, MAX_SLOTS)(value, f"{name}: slots of {url}")
        if url not in specs:
            specs[url] = slots
    return specs


def render_backend(url: str, slots: int | None) -> str:
    """One OLLAMA_BACKENDS entry, the inverse of `backend_specs` for one backend."""
    return url if slots is None else f"{url};slots={slots}"


MAX_SLOTS = 4096


@dataclass(frozen=True)
class Variable:
    name: str
    field: str
    default: str
    parse: Callable[[str, str], Any]
    doc: str  # the one description: `python3 build.py docs` writes it into .env.example and README.md
    section: str = ""  # set on the first variable of a section of .env.example
    former: str = ""  # the name it had before, still read so that older .env files keep working

    def raw(self, environ: Mapping[str, str], file_values: Mapping[str, str]) -> tuple[str, str]:
        """(value, the name it was given under): the environment before the file, the current
        name before the former one, else the default."""
        for source in (environ, file_values):
            for name in (self.name, self.former):
                if name and name in source:
                    return source[name], name
        return self.default, self.name


# fmt: off
VARIABLES: tuple[Variable, ...] = (
    Variable("DATABASE_URL", "database_url", "postgresql://127.0.0.1:5432/neuronetz",
             _url(("postgres", "postgresql"), "postgresql://user:password@host:5432/neuronetz"),
             "Postgres: tenants, keys, the usage ledger and the audit log. Created if missing (needs a "
             "role that may `CREATE DATABASE`).", section="Dependencies"),
    Variable("REDIS_URL", "redis_url", "redis://127.0.0.1:6379/0", _redis_urls,
             "Redis: the key cache, rate-limit and budget counters. Run it with `maxmemory-policy "
             "noeviction`: an evicted counter is a forgotten limit. With REDIS_MODE cluster or sentinel: "
             "comma-separated seed node or Sentinel URLs."),
    Variable("REDIS_MODE", "redis_mode", "standalone", _choice("standalone", "cluster", "sentinel"),
             "`standalone` (one server), `cluster` (Redis Cluster: REDIS_URL lists one or more seed "
             "nodes) or `sentinel` (REDIS_URL lists the Sentinels; REDIS_SENTINEL_MASTER names the primary "
             "they monitor). README, Scaling out."),
    Variable("REDIS_SENTINEL_MASTER", "redis_sentinel_master", "mymaster", _sentinel_master,
             "With REDIS_MODE=sentinel: the name under which the Sentinels monitor the primary."),
    Variable("REDIS_KEY_PREFIX", "redis_prefix", "nz:", _redis_prefix,
             "Prefix of every Redis key the gateway writes (to share one Redis between installations)."),
    Variable("OLLAMA_BACKENDS", "ollama_backends", "http://127.0.0.1:11434", parse_backends,
             "Comma-separated Ollama base URLs (http/https, host, optional port and path), each optionally "
             "with its own slots: `http://gpu1:11434;slots=4` (README, Fair sharing). `add-backend` and "
             "`remove-backend` edit this line of the env file and a running gateway applies the change "
             "within a few seconds (unless OLLAMA_BACKENDS is also set in the process environment, which "
             "wins)."),
    Variable("GATEWAY_BACKEND_SLOTS", "backend_slots", "0", _integer(0, MAX_SLOTS),
             "Requests each backend runs at once per model (set it to the backends' "
             "`OLLAMA_NUM_PARALLEL`). Beyond it requests wait in the gateway, in fair order across "
             "tenants. 0: no gateway queue."),
    Variable("GATEWAY_QUEUE_MAX_WAIT", "queue_max_wait", "30", _seconds(0.1, 3600),
             "Seconds a request may wait for a backend slot before 503 `queue_timeout` with `Retry-After`."),
    Variable("GATEWAY_QUEUE_MAX_DEPTH", "queue_max_depth", "64", _integer(1, 100_000),
             "Requests one tenant may have waiting for one model's slots before 429 `queue_full`."),
    Variable("GATEWAY_HOST", "host", "127.0.0.1", _host,
             "Address to listen on (`0.0.0.0` in the container).", section="Serving"),
    Variable("GATEWAY_PORT", "port", "8080", _integer(1, 65535),
             "TCP port to listen on."),
    Variable("GATEWAY_WORKERS", "workers", "1", _integer(1, 64),
             "Granian worker processes; one per core is a good start."),
    Variable("GATEWAY_MIGRATE_ON_START", "migrate_on_start", "true", _boolean,
             "`serve` applies pending migrations before it starts (true/false)."),
    Variable("GATEWAY_MAX_BODY_BYTES", "max_body_bytes", str(32 * 1024 * 1024), _integer(1024, 1 << 30),
             "Largest request body in bytes; larger ones get 413. Base64 images need tens of MB."),
    Variable("GATEWAY_MAX_RECORD_BYTES", "max_record_bytes", str(16 * 1024 * 1024), _integer(65536, 1 << 30),
             "Longest backend record the gateway reads, in bytes: one NDJSON line or SSE event (a longer "
             "one ends the stream with an error record), or a whole non-streaming answer (a longer one is "
             "passed through but is a backend error; README, Streaming and usage). Raise it for very large "
             "embedding batches."),
    Variable("GATEWAY_MAX_TEXT_BODY_BYTES", "max_text_body_bytes", str(4 * 1024 * 1024), _integer(1024, 1 << 30),
             "Largest body in bytes on routes that carry no images: `/api/embed`, `/api/embeddings`, "
             "`/v1/embeddings`, `/v1/completions`, `/api/show`; 413 above it."),
    Variable("GATEWAY_MAX_JSON_ELEMENTS", "max_json_elements", str(1 << 18), _integer(1024, 100_000_000),
             "Most JSON values (commas plus opening brackets) a request body may hold; bounds the memory "
             "and time parsing one body can take (413 above it; README, Security model)."),
    Variable("GATEWAY_BODY_TIMEOUT", "body_timeout", "60", _seconds(1, 3600),
             "Seconds a client has to send its whole request body; 408 after it."),
    Variable("GATEWAY_MAX_BODY_READERS", "max_body_readers", "256", _integer(1, 100_000),
             "Request bodies one worker receives in pieces at once (uploads that do not arrive in one "
             "go); beyond it further ones get 503 at once. Bodies that arrive whole are never refused "
             "for this."),
    Variable("GATEWAY_READY_TIMEOUT", "ready_timeout", "1.0", _seconds(0.05, 30),
             "Seconds each `/readyz` check (Postgres, Redis, backends) may take before it counts as "
             "failed."),
    Variable("GATEWAY_SHUTDOWN_TIMEOUT", "shutdown_timeout", "30", _integer(1, 3600),
             "Seconds in-flight requests get to finish after SIGTERM; answers still streaming near the end "
             "are cut with an error record, settled and audited before the worker exits."),
    Variable("GATEWAY_DB_POOL_SIZE", "db_pool_size", "10", _integer(1, 500),
             "Postgres connections per worker process."),
    Variable("GATEWAY_LOG_LEVEL", "log_level", "info", _choice("debug", "info", "warning", "error"),
             "`debug`, `info`, `warning` or `error`: the level of the JSON log lines on stdout; `info` "
             "writes one line per request."),
    Variable("GATEWAY_SECRET", "secret", "", _text,
             "**Set it in production**, the same on every replica: verified keys are cached in Redis under "
             "an HMAC with it. Generate one with `openssl rand -hex 32`. Empty: each process draws its own "
             "(everything works, but workers do not share verifications).", section="Keys and authentication"),
    Variable("GATEWAY_KEY_CACHE_TTL", "key_cache_ttl", "30", _seconds(1, 3600),
             "Seconds a verified key stays in a worker's memory. Revocations, expiry and limit changes "
             "arrive within a second anyway (Postgres NOTIFY); this is only the backstop."),
    Variable("GATEWAY_AUTH_FAILURES_PER_MINUTE", "auth_failures_per_minute", "60", _integer(1, 1_000_000),
             "Refused authentications a client address may cause per minute (per worker) before 429."),
    Variable("GATEWAY_AUTH_THREADS", "auth_threads", "1", _integer(1, 64),
             "Threads per worker that verify Argon2id hashes (cache misses only)."),
    Variable("GATEWAY_TRUSTED_PROXIES", "trusted_proxies", "127.0.0.1,::1", _networks,
             "Peers whose `X-Forwarded-For` is believed (Caddy): comma-separated IPs or CIDR ranges."),
    Variable("GATEWAY_BACKEND_CONNECT_TIMEOUT", "connect_timeout", "5", _seconds(0.1, 600),
             "Seconds to open a connection to a backend.", section="Backends",
             former="GATEWAY_UPSTREAM_CONNECT_TIMEOUT"),
    Variable("GATEWAY_BACKEND_FIRST_BYTE_TIMEOUT", "first_byte_timeout", "300", _seconds(1, 86400),
             "Seconds a backend may take to start answering (loading a model takes a while).",
             former="GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT"),
    Variable("GATEWAY_BACKEND_IDLE_TIMEOUT", "idle_timeout", "120", _seconds(1, 86400),
             "Seconds a backend may stay silent in the middle of an answer.",
             former="GATEWAY_UPSTREAM_IDLE_TIMEOUT"),
    Variable("GATEWAY_BACKEND_TOTAL_TIMEOUT", "total_timeout", "1800", _seconds(1, 86400),
             "Seconds one request to a backend may take in all.",
             former="GATEWAY_UPSTREAM_TOTAL_TIMEOUT"),
    Variable("GATEWAY_BACKEND_MAX_CONNECTIONS", "backend_connections", "4096", _integer(1, 100_000),
             "Connections per backend per worker: one per request in flight (a stream holds its own for "
             "its whole length); requests beyond it wait. An idle connection costs about 2 KB.",
             former="GATEWAY_UPSTREAM_MAX_CONNECTIONS"),
    Variable("GATEWAY_HEALTH_INTERVAL", "health_interval", "5", _seconds(0.2, 3600),
             "Seconds between active health checks (and model-list refreshes) of each backend."),
    Variable("GATEWAY_BACKEND_COOLDOWN", "backend_cooldown", "10", _seconds(0.1, 3600),
             "Seconds a backend is benched after a connection failure or three answers >= 500 in a row."),
    Variable("GATEWAY_DEFAULT_MAX_TOKENS", "default_max_tokens", "1024", _integer(1, 1_000_000),
             "Output cap written into requests that set none when a TPM limit or a budget applies.",
             section="Limits and budgets"),
    Variable("GATEWAY_MIN_OUTPUT_TOKENS", "min_output_tokens", "16", _integer(0, 1_000_000),
             "Fewest output tokens worth admitting a request for; below that it is refused (429)."),
    Variable("GATEWAY_LEASE_TTL", "lease_ttl", "60", _seconds(5, 3600),
             "Seconds a request's concurrency/reservation lease lives unless renewed: how long the slots "
             "and reservations of a crashed replica stay taken."),
    Variable("GATEWAY_METRICS_TOKEN", "metrics_token", "", _text,
             "Bearer token that `GET /metrics` requires. Empty: `/metrics` is disabled (404).",
             section="Observability"),
    Variable("GATEWAY_AUDIT_QUEUE", "audit_queue", "20000", _integer(100, 10_000_000),
             "Audit records a worker holds while Postgres is slow or away; beyond it, new records are "
             "dropped and counted (`neuronetz_audit_records_dropped_total`)."),
    Variable("GATEWAY_AUDIT_RETENTION_DAYS", "audit_retention_days", "90", _integer(1, 36500),
             "Days of request metadata kept; older monthly partitions are dropped."),
)
# fmt: on


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its environment, validated."""

    database_url: str
    redis_url: str
    ollama_backends: tuple[str, ...]
    backend_slots: int
    queue_max_wait: float
    queue_max_depth: int
    host: str
    port: int
    workers: int
    migrate_on_start: bool
    max_body_bytes: int
    max_record_bytes: int
    max_text_body_bytes: int
    max_json_elements: int
    body_timeout: float
    max_body_readers: int
    ready_timeout: float
    shutdown_timeout: int
    db_pool_size: int
    log_level: str
    secret: str
    redis_prefix: str
    redis_mode: str
    redis_sentinel_master: str
    key_cache_ttl: float
    auth_failures_per_minute: int
    auth_threads: int
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    connect_timeout: float
    first_byte_timeout: float
    idle_timeout: float
    total_timeout: float
    backend_connections: int
    health_interval: float
    backend_cooldown: float
    default_max_tokens: int
    min_output_tokens: int
    lease_ttl: float
    metrics_token: str
    audit_queue: int
    audit_retention_days: int
    env_file: Path | None = None
    slots_by_backend: Mapping[str, int | None] = dataclasses.field(default_factory=dict)  # ;slots=N overrides

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def resolve_env_file(explicit: str | None) -> Path | None:
    """The .env file to read: the one given (which must exist), else ./.env when present."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"The env file {path} does not exist (given with --env-file).")
        return path
    inherited = os.environ.get(ENV_FILE_VARIABLE)
    if inherited:
        return Path(inherited)
    try:
        return DEFAULT_ENV_FILE if DEFAULT_ENV_FILE.is_file() else None
    except PermissionError:
        raise ConfigError(
            f"The working directory {Path.cwd()} cannot be searched for {DEFAULT_ENV_FILE}: permission denied."
        ) from None


def load(env_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `environ` (default: os.environ) over the values in `env_file`."""
    environ = os.environ if environ is None else environ
    try:
        file_values = envfile.read(env_file) if env_file is not None else {}
    except envfile.EnvFileError as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, Any] = {}
    for variable in VARIABLES:
        raw, name = variable.raw(environ, file_values)
        values[variable.field] = variable.parse(raw, name)
    if values["redis_mode"] == "standalone" and "," in values["redis_url"]:
        raise ConfigError("REDIS_URL lists several servers: set REDIS_MODE to cluster or sentinel, or give one URL.")
    if values["redis_mode"] != "standalone" and "unix://" in values["redis_url"]:
        raise ConfigError(f"REDIS_MODE={values['redis_mode']} needs redis:// or rediss:// URLs in REDIS_URL.")
    backends = environ.get("OLLAMA_BACKENDS", file_values.get("OLLAMA_BACKENDS", ""))
    return Settings(**values, env_file=env_file, slots_by_backend=backend_specs(backends))
