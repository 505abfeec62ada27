"""Structured logs: one JSON object per line on stdout, for our own loggers and Granian's.

Log calls pass their structured data as `extra={"fields": {...}}`; the formatter merges it
into the line. Nothing here knows about requests: what goes into a line (and that it never
holds a secret or a prompt) is decided where the line is written.
"""

from __future__ import annotations

import logging
import logging.config
import sys
import time
from typing import Any

import orjson

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def dictconfig(level: str) -> dict[str, Any]:
    """A logging.config dict that sends every logger (Granian's included) through the JSON
    formatter; Granian applies it in each worker process, and `configure` in the CLI."""
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "json"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "neuronetz.logs.JsonFormatter"}},
        "handlers": {"console": handler, "access": handler},
        "root": {"handlers": ["console"], "level": LEVELS[level]},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": LEVELS[level], "propagate": False},
            "granian.access": {"handlers": ["access"], "level": LEVELS[level], "propagate": False},
            "neuronetz": {"level": LEVELS[level]},
            # httpx logs every request at INFO, URL included: too chatty, and a URL may hold a password.
            "httpx": {"level": logging.WARNING},
            "httpcore": {"level": logging.WARNING},
        },
    }


REQUESTS = logging.getLogger("neuronetz.request")
_second: tuple[int, str] = (0, "")


def request_line(fields: dict[str, Any]) -> None:
    """The per-request line, written straight to stdout: the same JSON the formatter makes,
    without a LogRecord and handler round per request (about a tenth of a proxied request's
    CPU at info level). Honours the level of the `neuronetz.request` logger."""
    global _second
    if not REQUESTS.isEnabledFor(logging.INFO):
        return
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    entry = {"ts": f"{_second[1]}.{int((now - whole) * 1000):03d}Z", "level": "info", "logger": REQUESTS.name,
             "msg": "request", **fields}  # fmt: skip
    stream = sys.stdout.buffer
    stream.write(orjson.dumps(entry, default=str) + b"\n")
    stream.flush()


def configure(level: str) -> None:
    logging.config.dictConfig(dictconfig(level))


class Throttled:
    """A warning that would repeat once per request while a dependency is down: the first
    occurrence is logged at once, later ones are counted and logged at most every `interval`
    seconds with `repeated` = how many were held back since the last line.

    >>> unreachable = Throttled(log, "limits not enforced: Redis unreachable")
    >>> unreachable(error="ConnectionError")   # per request; one line per 5 s at most
    """

    def __init__(self, logger: logging.Logger, message: str, interval: float = 5.0, level: int = logging.WARNING):
        self.logger = logger
        self.message = message
        self.interval = interval
        self.level = level
        self.held = 0
        self.last = -float("inf")

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        if self.held:
            fields["repeated"] = self.held
        self.held = 0
        self.last = now
        self.logger.log(self.level, self.message, extra={"fields": fields})
