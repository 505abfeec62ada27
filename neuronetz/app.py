"""Composition root: the ASGI application, its lifespan and the request pipeline.

Granian imports `neuronetz.app:app` in every worker process. The lifespan builds one
`Gateway` per worker (settings, Postgres pool, Redis client, the shared upstream client);
`App.__call__` runs every HTTP request through the pipeline in `handle`, top to bottom.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from neuronetz import config, db
from neuronetz.errors import BadRequest, Forbidden, GatewayError
from neuronetz.http import ClientDisconnected, Request, send_error, send_json
from neuronetz.router import Route, Router, is_blocked, normalize_path
from neuronetz.types import Receive, Scope, Send

log = logging.getLogger("neuronetz.app")
GET = frozenset({"GET", "HEAD"})


class Gateway:
    """What one worker process holds for its lifetime; opened and closed by the lifespan."""

    def __init__(
        self, settings: config.Settings, pool: asyncpg.Pool[Any], redis: aioredis.Redis, http: httpx.AsyncClient
    ) -> None:
        self.settings = settings
        self.db = pool
        self.redis = redis
        self.http = http

    @classmethod
    async def open(cls, settings: config.Settings) -> Gateway:
        pool = await db.create_pool(settings.database_url, settings.db_pool_size)
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10
        )
        # trust_env=False: proxy variables and .netrc in the environment must not redirect
        # traffic meant for the internal Ollama network (performance-anchors.md §6).
        http = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(5.0))
        return cls(settings, pool, redis, http)

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()
        await self.db.close()

    async def readiness(self) -> dict[str, Any]:
        """Check Postgres, Redis and the backends concurrently, each within ready_timeout."""
        timeout = self.settings.ready_timeout

        async def check(name: str, probe: Awaitable[Any]) -> tuple[str, dict[str, Any]]:
            try:
                async with asyncio.timeout(timeout):
                    await probe
            except TimeoutError:
                return name, {"ok": False, "error": f"no answer within {timeout:g} s"}
            except Exception as exc:  # any failure of a dependency is a failed check, not a crash
                return name, {"ok": False, "error": _describe(exc)}
            return name, {"ok": True}

        backends = self.settings.ollama_backends
        probes = [check("postgres", db.ping(self.db)), check("redis", self.redis.ping())]
        probes += [check(url, self._probe_backend(url)) for url in backends]
        results = dict(await asyncio.gather(*probes))
        each = {url: results.pop(url) for url in backends}
        if not each:
            results["backends"] = {"ok": False, "error": "no backend is configured (OLLAMA_BACKENDS is empty)"}
        else:
            results["backends"] = {"ok": any(state["ok"] for state in each.values()), "each": each}
        return results

    async def _probe_backend(self, url: str) -> None:
        response = await self.http.get(url + "/api/version")
        response.raise_for_status()


def _describe(exc: BaseException) -> str:
    """A short reason for a failed check that never repeats a URL (it may hold a password)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"answered HTTP {exc.response.status_code}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


class App:
    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.router = Router(
            [
                Route("/healthz", GET, self.healthz, public=True),
                Route("/readyz", GET, self.readyz, public=True),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        try:
            gateway = await Gateway.open(config.load(config.resolve_env_file(None)))
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": f"neuronetz could not start: {exc}"})
            return
        self.gateway = gateway
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await gateway.close()
            await send({"type": "lifespan.shutdown.complete"})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request pipeline: normalise → block → route → (authenticate …) → handle."""
        try:
            path = normalize_path(scope.get("raw_path") or scope["path"].encode())
        except BadRequest as error:
            request = Request(scope, receive, "/")
            request.openai = scope["path"].startswith("/v1/")
            await send_error(send, request, error)
            return
        request = Request(scope, receive, path)
        try:
            if is_blocked(path):
                raise Forbidden(
                    "This endpoint changes the models on the server and is blocked by the gateway.",
                    code="endpoint_blocked",
                )
            route, _ = self.router.resolve(path, request.method)
            await route.handler(request, send)
        except GatewayError as error:
            await send_error(send, request, error)
        except ClientDisconnected:
            pass

    async def healthz(self, request: Request, send: Send) -> None:
        await send_json(send, request, 200, {"status": "ok"})

    async def readyz(self, request: Request, send: Send) -> None:
        if self.gateway is None:
            await send_json(send, request, 503, {"status": "starting"})
            return
        checks = await self.gateway.readiness()
        ready = all(check["ok"] for check in checks.values())
        await send_json(send, request, 200 if ready else 503, {"status": "ready" if ready else "not ready", **checks})


app = App()
