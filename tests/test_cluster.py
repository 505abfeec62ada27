"""The gateway on a Redis Cluster and behind Sentinel: limits, budgets, revocation and rebuilds
as on one Redis, and a dead primary failing only its own tenants' budgets closed.

Every server here is a private redis-server on free loopback ports (the shared Redis is never
touched); the fixtures stop all of them whatever happens in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import pytest_asyncio
import redis
from redis.crc import key_slot

from neuronetz import config, tenants
from neuronetz.limits import tag
from tests.emulator import Emulator
from tests.support import ROOT, Admin, GatewayProcess, auth, free_port

GENERATE = {"model": "tiny", "prompt": "hi", "stream": False}
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def _wait(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if callable(condition) and condition():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout} s")


class Server:
    """One redis-server process in a directory of its own; `start` again after `kill` brings
    it back on the same port with the same cluster configuration (nodes.conf) and no data."""

    def __init__(self, args: list[str], directory: Path, port: int) -> None:
        self.args, self.dir, self.port = args, directory, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait(lambda: self.client().ping(), f"redis-server on port {self.port} did not answer")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


class Cluster:
    """A Redis Cluster of three primaries without replicas on free loopback ports.

    `cluster-require-full-coverage no`: the primaries that are up keep serving their slots
    while another is down, as the README asks of a production cluster."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="neuronetz-cluster-"))
        self.servers: list[Server] = []
        for index in range(3):
            port, bus = free_port(), free_port()
            directory = self.root / str(index)
            directory.mkdir()
            args = [
                REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no", "--dir", str(directory),
            ]  # fmt: skip
            self.servers.append(Server(args, directory, port))
        self.url = ",".join(f"redis://127.0.0.1:{server.port}" for server in self.servers)

    def start(self) -> Cluster:
        for server in self.servers:
            server.start()
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        return self

    def wait_ok(self) -> None:
        def ok() -> bool:
            return all(s.client().cluster("INFO")["cluster_state"] == "ok" for s in self.servers)

        _wait(ok, "the cluster did not reach cluster_state:ok", timeout=30)

    def server_of(self, key: str) -> Server:
        """The primary serving `key`'s slot."""
        slot = key_slot(key.encode())
        for start, end, primary, *_ in self.servers[0].client().cluster("SLOTS"):
            if start <= slot <= end:
                return next(s for s in self.servers if s.port == int(primary[1]))
        raise LookupError(f"no primary serves slot {slot}")

    def stop(self) -> None:
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    servers = Cluster()
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def cluster_gateway(gateway_env: dict[str, str], cluster: Cluster) -> Iterator[GatewayProcess]:
    env = {**gateway_env, "REDIS_MODE": "cluster", "REDIS_URL": cluster.url}
    with GatewayProcess(env) as process:
        yield process


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield http


async def generate(client: httpx.AsyncClient, gateway: GatewayProcess, key: str, **options: int) -> httpx.Response:
    body = {**GENERATE, "options": options} if options else GENERATE
    return await client.post(gateway.url + "/api/generate", json=body, headers=auth(key))


async def until_not_503(
    client: httpx.AsyncClient, gateway: GatewayProcess, key: str, num_predict: int = 1
) -> httpx.Response:
    """A budgeted tenant's first request on a Redis that just lost its data (or never had
    it) may meet a counter rebuild: 503 for a moment. Any other answer ends the wait."""
    deadline = time.monotonic() + 15
    while True:
        response = await generate(client, gateway, key, num_predict=num_predict)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.2)


async def tenant_tag(admin: Admin, key: str, prefix: str) -> str:
    tenant_id = await admin.pool.fetchval("SELECT tenant_id FROM api_keys WHERE prefix = $1", key[:11])
    return tag(prefix, tenant_id)


async def keys_on_each_primary(
    admin: Admin, cluster: Cluster, prefix: str, new_key: Callable[[], Awaitable[str]]
) -> list[str]:
    """One new key (of a new tenant) whose tenant's slot is on each primary, in server order."""
    found: dict[int, str] = {}
    while len(found) < len(cluster.servers):
        key = await new_key()
        server = cluster.server_of(await tenant_tag(admin, key, prefix))
        found.setdefault(cluster.servers.index(server), key)
    return [found[index] for index in range(len(cluster.servers))]


async def ledger_has(admin: Admin, key: str, tokens: int) -> None:
    deadline = time.monotonic() + 10
    query = (
        "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily u"
        " JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = $1"
    )
    while await admin.pool.fetchval(query, key[:11]) < tokens:
        assert time.monotonic() < deadline, "the ledger did not receive the usage"
        await asyncio.sleep(0.1)


# --- Redis Cluster ------------------------------------------------------------------------------


async def test_rate_and_concurrency_limits_hold_on_a_cluster(
    cluster_gateway: GatewayProcess, cluster: Cluster, emulator: Emulator, admin: Admin, redis_prefix: str,
    client: httpx.AsyncClient,
) -> None:  # fmt: skip
    for key in await keys_on_each_primary(admin, cluster, redis_prefix, lambda: admin.key(rpm=3)):
        statuses = [(await generate(client, cluster_gateway, key)).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
    # The counters live on the tenant's own primary, under the tenant's hash tag.
    slotted = [s for s in cluster.servers if any(True for _ in s.client().scan_iter(match=redis_prefix + "{t*}:rpm:*"))]
    assert len(slotted) == 3
    # The crash journal (one stream and heartbeat per worker) works on a cluster too.
    journals = [k for s in cluster.servers for k in s.client().scan_iter(match=redis_prefix + "journal*")]
    assert any(b"journal-alive:" in k for k in journals), journals
    assert any(b"journal:" in k for k in journals), journals
    assert "journal append failed" not in cluster_gateway.log()
    emulator.configure(token_delay_ms=100, tokens=10)
    key = await admin.key(max_concurrent=2)
    answers = await asyncio.gather(
        *(client.post(cluster_gateway.url + "/api/generate", json={"model": "tiny", "prompt": "hi"},
                      headers=auth(key)) for _ in range(5))
    )  # fmt: skip
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429]
    again = await asyncio.gather(*(generate(client, cluster_gateway, key) for _ in range(2)))
    assert [a.status_code for a in again] == [200, 200]


async def test_budgets_and_revocation_on_a_cluster(
    cluster_gateway: GatewayProcess, cluster: Cluster, admin: Admin, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    for key in await keys_on_each_primary(admin, cluster, redis_prefix, lambda: admin.key(daily_tokens=20)):
        assert (await until_not_503(client, cluster_gateway, key)).status_code == 200  # 2 tokens
        assert (await generate(client, cluster_gateway, key, num_predict=10)).status_code == 200  # 11 more
        refused = await generate(client, cluster_gateway, key, num_predict=10)
        assert refused.status_code == 429
        assert "daily token budget of 20" in refused.json()["error"]
    key = await admin.key()
    assert (await generate(client, cluster_gateway, key)).status_code == 200
    await tenants.revoke_key(admin.pool, key[:11])
    revoked_at = time.monotonic()
    while (await generate(client, cluster_gateway, key)).status_code != 401:
        assert time.monotonic() - revoked_at < 1.0, "a revoked key still worked after a second"
        await asyncio.sleep(0.05)


async def test_budgets_are_rebuilt_after_every_primary_is_flushed(
    cluster_gateway: GatewayProcess, cluster: Cluster, admin: Admin, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    keys = await keys_on_each_primary(admin, cluster, redis_prefix, lambda: admin.key(total_tokens=12))
    for key in keys:
        await until_not_503(client, cluster_gateway, key)  # 2 tokens
        assert (await generate(client, cluster_gateway, key, num_predict=9)).status_code == 200  # 10 more
        assert (await generate(client, cluster_gateway, key)).status_code == 429
        await ledger_has(admin, key, 12)
    for server in cluster.servers:
        server.client().flushall()
    first = await generate(client, cluster_gateway, keys[0])
    assert first.status_code == 503  # a real loss: fail closed until the ledger's sums are back
    assert "rebuilt from the usage ledger" in first.json()["error"]
    for key in keys:
        again = await until_not_503(client, cluster_gateway, key)
        assert again.status_code == 429
        assert again.json()["error"] == "The key's total token budget of 12 is used up."


async def test_a_dead_primary_fails_only_its_own_budgets_closed_and_recovers(
    cluster_gateway: GatewayProcess, cluster: Cluster, admin: Admin, redis_prefix: str, client: httpx.AsyncClient
) -> None:
    budgeted = await keys_on_each_primary(admin, cluster, redis_prefix, lambda: admin.key(daily_tokens=100_000))
    unbudgeted = await keys_on_each_primary(admin, cluster, redis_prefix, lambda: admin.key(rpm=1000))
    for key in budgeted:
        assert (await until_not_503(client, cluster_gateway, key)).status_code == 200
    victim = cluster.servers[0]
    victim.kill()
    try:
        # Many requests at once, so that admissions for every primary share the limiter's
        # batches: the dead primary's must not take the others down with them.
        for _ in range(3):
            answers = await asyncio.gather(*(generate(client, cluster_gateway, k) for k in budgeted * 4 + unbudgeted))
            statuses = [a.status_code for a in answers]
            for index, key in enumerate(budgeted * 4):
                expected = 503 if key == budgeted[0] else 200
                assert statuses[index] == expected, (index % 3, statuses)
            assert statuses[len(budgeted) * 4 :] == [200, 200, 200]  # no budget: fail open
        refused = answers[0].json()["error"]
        assert "budget store is unreachable" in refused
    finally:
        victim.start()  # same port, same nodes.conf, no data
    cluster.wait_ok()
    back = await until_not_503(client, cluster_gateway, budgeted[0])
    assert back.status_code == 200
    for key in budgeted[1:]:
        assert (await generate(client, cluster_gateway, key)).status_code == 200


async def test_a_cluster_with_no_primary_up_fails_budgets_closed_at_once(
    cluster_gateway: GatewayProcess, cluster: Cluster, admin: Admin, client: httpx.AsyncClient
) -> None:
    budgeted, free = await admin.key(daily_tokens=100_000), await admin.key(rpm=1000)
    assert (await until_not_503(client, cluster_gateway, budgeted)).status_code == 200
    for server in cluster.servers:
        server.kill()
    try:
        for _ in range(3):  # the first finds dead connections, the next ones no node to ask at all
            started = time.monotonic()
            down = await generate(client, cluster_gateway, budgeted)
            assert down.status_code == 503
            assert time.monotonic() - started < 5
            assert (await generate(client, cluster_gateway, free)).status_code == 200
    finally:
        for server in cluster.servers:
            server.start()
    cluster.wait_ok()
    assert (await until_not_503(client, cluster_gateway, budgeted)).status_code == 200


# --- Sentinel -------------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[tuple[Server, Server, Server]]:
    """A primary, its replica and one Sentinel monitoring them as `mymaster` (quorum 1,
    a primary silent for 1 s is failed over)."""
    root = Path(tempfile.mkdtemp(prefix="neuronetz-sentinel-"))
    port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
    primary = Server([REDIS_SERVER, "--port", str(port), *common], root, port)
    replica = Server([REDIS_SERVER, "--port", str(replica_port), "--replicaof", "127.0.0.1", str(port), *common],
                     root, replica_port)  # fmt: skip
    conf = root / "sentinel.conf"  # Sentinel rewrites its file, so it is one of the test's own
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {root}\n"
        f"sentinel monitor mymaster 127.0.0.1 {port} 1\nsentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    watcher = Server([REDIS_SERVER, str(conf), "--sentinel"], root, sentinel_port)
    try:
        primary.start()
        replica.start()
        watcher.start()
        _wait(lambda: watcher.client().sentinel_slaves("mymaster"), "the Sentinel did not find the replica")
        yield primary, replica, watcher
    finally:
        watcher.kill()
        replica.kill()
        primary.kill()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_gateway_works_through_sentinel_and_follows_a_failover(
    gateway_env: dict[str, str], sentinel: tuple[Server, Server, Server], admin: Admin, redis_prefix: str,
    client: httpx.AsyncClient,
) -> None:  # fmt: skip
    primary, replica, watcher = sentinel
    env = {**gateway_env, "REDIS_MODE": "sentinel", "REDIS_URL": f"redis://127.0.0.1:{watcher.port}/0",
           "REDIS_SENTINEL_MASTER": "mymaster"}  # fmt: skip
    with GatewayProcess(env) as process:
        key = await admin.key(rpm=2, daily_tokens=1000)
        assert (await until_not_503(client, process, key)).status_code == 200
        assert (await generate(client, process, key)).status_code == 200
        refused = await generate(client, process, key)
        assert refused.status_code == 429
        assert "2 requests per minute" in refused.json()["error"]
        limited = await admin.key(daily_tokens=20)
        assert (await until_not_503(client, process, limited)).status_code == 200  # 2 tokens
        assert (await generate(client, process, limited, num_predict=10)).status_code == 200  # 11 more
        spent = await generate(client, process, limited, num_predict=10)
        assert spent.status_code == 429
        assert "daily token budget of 20" in spent.json()["error"]
        # The counters are on the primary the Sentinel named.
        assert any(True for _ in primary.client().scan_iter(match=redis_prefix + "{t*}:rpm:*"))

        # Replication is asynchronous: a failover loses what the replica has not received yet.
        def caught_up() -> bool:
            offset = primary.client().info("replication")["master_repl_offset"]
            return bool(replica.client().info("replication")["slave_repl_offset"] == offset)

        _wait(caught_up, "the replica did not catch up")
        assert replica.client().dbsize() == primary.client().dbsize()
        primary.kill()

        def promoted() -> bool:
            address = watcher.client().sentinel_get_master_addr_by_name("mymaster")
            return isinstance(address, tuple) and int(address[1]) == replica.port

        _wait(promoted, "the Sentinel did not promote the replica", timeout=30)
        # The promoted replica has the counters: spent stays spent, the rate limit holds.
        after = await until_not_503(client, process, limited, num_predict=10)
        assert after.status_code == 429
        assert "daily token budget of 20" in after.json()["error"]
        assert (await generate(client, process, key)).status_code == 429
        assert any(True for _ in replica.client().scan_iter(match=redis_prefix + "{t*}:used:*"))


# --- replicas behind Caddy ----------------------------------------------------------------------


def test_the_replicas_caddyfile_balances_streams_and_checks_health() -> None:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("needs caddy (Debian package caddy)")
    home = tempfile.mkdtemp(prefix="neuronetz-caddy-")
    try:
        result = subprocess.run(
            [caddy, "adapt", "--config", "ops/caddy/Caddyfile.replicas.example", "--adapter", "caddyfile"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
            env={"PATH": "/usr/bin:/bin", "HOME": home, "NEURONETZ_DOMAIN": "gw.example.com",
                 "ACME_EMAIL": "ops@example.com"},
        )  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert "not formatted" not in result.stderr, "run `caddy fmt --overwrite ops/caddy/Caddyfile.replicas.example`"
    (server,) = orjson.loads(result.stdout)["apps"]["http"]["servers"].values()
    (route,) = server["routes"]
    (handler,) = [h for r in route["handle"][0]["routes"] for h in r["handle"] if h["handler"] == "reverse_proxy"]
    assert len(handler["upstreams"]) >= 2
    assert handler["health_checks"]["active"]["uri"] == "/healthz"
    assert handler["health_checks"]["passive"]["max_fails"] == 3
    assert handler["load_balancing"]["selection_policy"] == {"policy": "least_conn"}
    assert handler["flush_interval"] == -1, "streamed chunks must reach the client at once"


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"REDIS_URL": "redis://a:6379,redis://b:6379"}, "REDIS_URL lists several servers: set REDIS_MODE"),
        ({"REDIS_MODE": "cluster", "REDIS_URL": "unix:///run/redis.sock"}, "REDIS_MODE=cluster needs redis://"),
        ({"REDIS_MODE": "ring"}, "REDIS_MODE must be one of standalone, cluster, sentinel, got 'ring'."),
        ({"REDIS_MODE": "cluster", "REDIS_URL": "redis://a:6379,http://b"}, "REDIS_URL must be a URL like redis://"),
        ({"REDIS_MODE": "sentinel", "REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER must be the name"),
    ],
)
def test_a_redis_setting_that_cannot_work_is_one_sentence(environ: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, environ=environ)
    assert str(caught.value).startswith(message)


def test_cluster_and_sentinel_take_several_urls() -> None:
    urls = "redis://:pw@r1:6379, rediss://r2:6380"
    settings = config.load(None, environ={"REDIS_MODE": "cluster", "REDIS_URL": urls})
    assert (settings.redis_mode, settings.redis_url) == ("cluster", "redis://:pw@r1:6379,rediss://r2:6380")
    settings = config.load(None, environ={"REDIS_MODE": "Sentinel", "REDIS_URL": "redis://s1:26379"})
    assert (settings.redis_mode, settings.redis_sentinel_master) == ("sentinel", "mymaster")
