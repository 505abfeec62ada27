"""Several Ollama backends: selection, failover, aggregation, live configuration, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from neuronetz.backends import plan_backends_change
from tests.emulator import Emulator, ModelSpec
from tests.support import (
    METRICS_TOKEN,
    Admin,
    GatewayProcess,
    auth,
    env_file,
    forwarded,
    free_port,
    metric,
    run_cli,
    wait_until,
)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(scope="module")
def second() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh_second(request: pytest.FixtureRequest) -> None:
    if "second" in request.fixturenames:
        request.getfixturevalue("second").reset()


@pytest.fixture
def pair(gateway_env: dict[str, str], emulator: Emulator, second: Emulator) -> Iterator[GatewayProcess]:
    """A gateway in front of both emulators."""
    with GatewayProcess({**gateway_env, "OLLAMA_BACKENDS": f"{emulator.url},{second.url}"}) as process:
        yield process


async def post_many(url: str, key: str, count: int, body: dict[str, object] = CHAT) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(client.post(url + "/api/chat", json=body, headers=auth(key))
                                           for _ in range(count))))  # fmt: skip


async def test_health_checks_come_at_uneven_pauses_within_the_interval_and_find_a_dead_backend_in_two(
    gateway_env: dict[str, str], emulator: Emulator
) -> None:
    """Checks are spread (each pause the interval less up to a quarter, at random), never
    later than the interval: a dead backend is still marked down by its second check."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**gateway_env, "OLLAMA_BACKENDS": f"{emulator.url},{dead}", "GATEWAY_HEALTH_INTERVAL": "0.5"}
    emulator.clear_requests()
    with GatewayProcess(env) as process:
        async with httpx.AsyncClient(timeout=10) as client:

            async def dead_is_down() -> bool:
                scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
                answer = await client.get(process.url + "/metrics", headers=scrape)
                return metric(answer.text, "neuronetz_backend_up", backend=dead) == 0.0

            await wait_until(lambda: bool(emulator.requests("/api/version")), 10, "the first health check")
            # Down after the second failed check: at most one interval (+ scheduling) after the first.
            deadline = emulator.requests("/api/version")[0].monotonic + 0.5 + 1.0
            while not await dead_is_down():
                assert time.monotonic() < deadline, "the dead backend was not marked down within two checks"
                await asyncio.sleep(0.02)
            await wait_until(lambda: len(emulator.requests("/api/version")) >= 9, 15, "nine health checks")
    arrivals = [r.monotonic for r in emulator.requests("/api/version")][:9]
    pauses = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(pauses) < 0.5 + 0.3, pauses  # never (much) later than the interval
    assert min(pauses) < 0.47, pauses  # some came early: not every pause is the whole interval


async def test_requests_go_only_where_the_model_is(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    second.set_models([ModelSpec("qwen3")])  # the second one lacks tiny
    key = await admin.key()
    await asyncio.sleep(1.5)  # a health round notices the new model lists
    answers = await post_many(pair.url, key, 6)
    assert {a.status_code for a in answers} == {200}
    assert len(forwarded(emulator, "/api/chat")) == 6
    assert forwarded(second, "/api/chat") == []


async def test_the_backend_with_fewest_requests_in_flight_gets_the_next(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=100, tokens=10)
    second.configure(token_delay_ms=100, tokens=10)
    key = await admin.key()
    answers = await post_many(pair.url, key, 8)
    assert {a.status_code for a in answers} == {200}
    assert len(forwarded(emulator, "/api/chat")) == len(forwarded(second, "/api/chat")) == 4


async def test_a_slow_backend_gets_fewer_requests(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    emulator.configure(token_delay_ms=1000, tokens=10)  # 10 s per answer; the second is instant
    key = await admin.key()
    async with httpx.AsyncClient(timeout=60) as client:
        # A tie (nothing in flight anywhere) goes either way: send until one request is on the
        # slow backend, each answered by the fast one or seen arriving at the slow one.
        slow: asyncio.Task[httpx.Response] | None = None
        for _ in range(40):
            request = asyncio.create_task(client.post(pair.url + "/api/chat", json=CHAT, headers=auth(key)))

            def answered_or_held(request: asyncio.Task[httpx.Response] = request) -> bool:
                return request.done() or emulator.stats().in_flight == 1

            await wait_until(answered_or_held, 30, "an answer, or the request at the slow backend")
            if not request.done():
                slow = request
                break
            assert request.result().status_code == 200
        assert slow is not None, "every request went to the fast backend, none to the slow one"
        fast = len(forwarded(second, "/api/chat"))
        for _ in range(5):  # sequential, while the slow backend is still busy: all to the fast one
            assert (await client.post(pair.url + "/api/chat", json=CHAT, headers=auth(key))).status_code == 200
        assert emulator.stats().in_flight == 1, "the slow answer ended before the test could use it"
        assert (await slow).status_code == 200
    assert len(forwarded(emulator, "/api/chat")) == 1
    assert len(forwarded(second, "/api/chat")) == fast + 5


async def test_a_down_backend_is_skipped_and_benched(gateway_env: dict[str, str], emulator: Emulator,
                                                     admin: Admin) -> None:  # fmt: skip
    key = await admin.key()
    down = f"http://127.0.0.1:{free_port()}"
    with GatewayProcess({**gateway_env, "OLLAMA_BACKENDS": f"{down},{emulator.url}"}) as process:
        answers = await post_many(process.url, key, 6)
        async with httpx.AsyncClient() as client:
            ready = (await client.get(process.url + "/readyz", headers=auth(METRICS_TOKEN))).json()
    assert {a.status_code for a in answers} == {200}
    assert len(forwarded(emulator, "/api/chat")) == 6
    assert ready["backends"]["ok"] is True
    assert ready["backends"]["each"][down]["ok"] is False
    assert ready["backends"]["each"][emulator.url]["ok"] is True


async def test_a_busy_backend_is_retried_elsewhere_before_any_byte(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    busy = "server busy, please try again.  maximum pending requests exceeded"
    emulator.inject("status", status=503, message=busy, times=None)
    second.inject("status", status=503, message=busy, times=None)
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        both_busy = await client.post(pair.url + "/api/chat", json=CHAT, headers=auth(key))
        second.clear_faults()
        served = await client.post(pair.url + "/api/chat", json=CHAT, headers=auth(key))
    assert both_busy.status_code == 503
    assert both_busy.json() == {"error": "Every backend is busy; retry shortly."}
    assert served.status_code == 200


async def test_nothing_is_retried_once_the_backend_answered(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    for emu in (emulator, second):
        emu.inject("drop", after_tokens=2)
        emu.inject("status", status=500, message="runner failed")
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        dropped = await client.post(pair.url + "/api/chat", json={**CHAT, "stream": True}, headers=auth(key))
        failed = await client.post(pair.url + "/api/chat", json=CHAT, headers=auth(key))
    assert "error" in orjson.loads(dropped.text.splitlines()[-1])
    assert failed.status_code == 500
    assert failed.json() == {"error": "runner failed"}
    assert len(forwarded(emulator, "/api/chat")) + len(forwarded(second, "/api/chat")) == 2


async def test_lists_are_merged_across_backends_and_filtered(
    pair: GatewayProcess, emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    emulator.set_models([ModelSpec("tiny"), ModelSpec("llama3.2")])
    second.set_models([ModelSpec("tiny"), ModelSpec("qwen3"), ModelSpec("llava")])
    everything, some = await admin.key(), await admin.key(models=("tiny", "qwen3"))
    await asyncio.sleep(1.5)  # a health round notices the new model lists
    async with httpx.AsyncClient() as client:
        loaded = await client.post(pair.url + "/api/generate", json={"model": "qwen3", "prompt": "x", "stream": False},
                                   headers=auth(everything))  # fmt: skip
        assert loaded.status_code == 200
        tags = (await client.get(pair.url + "/api/tags", headers=auth(everything))).json()["models"]
        models = (await client.get(pair.url + "/v1/models", headers=auth(some))).json()["data"]
        ps = (await client.get(pair.url + "/api/ps", headers=auth(everything))).json()["models"]
    assert sorted(m["name"] for m in tags) == ["llama3.2:latest", "llava:latest", "qwen3:latest", "tiny:latest"]
    assert sorted(m["id"] for m in models) == ["qwen3:latest", "tiny:latest"]
    assert [m["name"] for m in ps] == ["qwen3:latest"]


async def test_unknown_models_are_404_and_unreachable_ones_503(
    gateway_env: dict[str, str], emulator: Emulator, admin: Admin
) -> None:
    key = await admin.key()
    async with httpx.AsyncClient() as client:
        with GatewayProcess(gateway_env) as process:
            emulator.add_model("fresh-model")  # appears after the last health round: found by a refresh
            fresh = await client.post(process.url + "/api/chat", json={**CHAT, "model": "fresh-model"},
                                      headers=auth(key))  # fmt: skip
            missing = await client.post(process.url + "/v1/chat/completions", json={**CHAT, "model": "nowhere"},
                                        headers=auth(key))  # fmt: skip
    assert fresh.status_code == 200
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "model 'nowhere' not found"


async def test_an_edited_env_file_is_applied_live_without_dropping_requests(
    gateway_env: dict[str, str], emulator: Emulator, second: Emulator, admin: Admin
) -> None:
    key = await admin.key()
    env = {k: v for k, v in gateway_env.items() if k != "OLLAMA_BACKENDS"}  # the file must decide
    with env_file(f"# backends\nOLLAMA_BACKENDS={emulator.url}\n") as path:
        process = GatewayProcess(env)
        process.args += ["--env-file", str(path)]
        with process:
            emulator.configure(token_delay_ms=100, tokens=40)  # a 4 s stream stays in flight throughout
            async with httpx.AsyncClient(timeout=30) as client:
                long = asyncio.create_task(
                    client.post(process.url + "/api/chat", json={**CHAT, "stream": True}, headers=auth(key))
                )
                await asyncio.sleep(0.3)
                for args in (["add-backend", second.url], ["remove-backend", emulator.url]):
                    result = await asyncio.to_thread(run_cli, *args, "--env-file", str(path))
                    assert result.returncode == 0, result.stderr
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline and not forwarded(second, "/api/chat"):
                    await client.post(process.url + "/api/chat", json=CHAT, headers=auth(key))
                    await asyncio.sleep(0.2)
                second.clear_requests()
                await client.post(process.url + "/api/chat", json=CHAT, headers=auth(key))
                assert len(forwarded(second, "/api/chat")) == 1  # the new list is in force
                # SIGHUP makes Granian respawn its workers gracefully: the running stream finishes.
                assert process.process is not None
                process.process.send_signal(signal.SIGHUP)
                streamed = await long
            lines = streamed.text.splitlines()
            assert len(lines) == 41
            assert orjson.loads(lines[-1])["done"] is True
            assert path.read_text() == f"# backends\nOLLAMA_BACKENDS={second.url}\n"


def backends_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI without this environment's OLLAMA_BACKENDS: the commands read the file given."""
    return run_cli(*args, unset=("OLLAMA_BACKENDS",))


# --- add-backend / remove-backend against real files --------------------------------------------------

ENV_TEXT = """\
# Production settings
DATABASE_URL="postgresql://gw:p#ss@db:5432/neuronetz"   # quoted, with a '#'

OLLAMA_BACKENDS='http://ollama-a:11434'
export REDIS_URL=redis://redis:6379/0
"""


def test_adding_keeps_every_other_line_and_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_TEXT)
    path.chmod(0o640)
    result = backends_cli("add-backend", "http://ollama-b:11434/", "--env-file", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OLLAMA_BACKENDS=http://ollama-a:11434,http://ollama-b:11434\n"
    assert path.read_text() == ENV_TEXT.replace(
        "OLLAMA_BACKENDS='http://ollama-a:11434'", "OLLAMA_BACKENDS=http://ollama-a:11434,http://ollama-b:11434"
    )
    assert path.stat().st_mode & 0o777 == 0o640
    assert not (tmp_path / ".env.tmp").exists()


def test_adding_twice_and_removing_what_is_absent_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_TEXT)
    again = backends_cli("add-backend", "http://ollama-a:11434", "--env-file", str(path))
    absent = backends_cli("remove-backend", "http://nowhere:1", "--env-file", str(path))
    assert again.returncode == absent.returncode == 0
    assert "already configured" in again.stderr
    assert "is not configured" in absent.stderr
    assert path.read_text() == ENV_TEXT


def test_a_missing_variable_or_file_is_created(tmp_path: Path) -> None:
    without = tmp_path / "without.env"
    without.write_text("FOO=1")  # no final newline either
    assert backends_cli("add-backend", "http://a:1", "--env-file", str(without)).returncode == 0
    assert without.read_text() == "FOO=1\nOLLAMA_BACKENDS=http://a:1\n"
    missing = tmp_path / "missing.env"
    result = backends_cli("add-backend", "http://a:1", "--env-file", str(missing))
    assert result.returncode == 0
    assert missing.read_text() == "OLLAMA_BACKENDS=http://a:1\n"
    assert missing.stat().st_mode & 0o777 == 0o600


def test_removing_the_last_backend_leaves_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("OLLAMA_BACKENDS=http://a:1\n")
    assert backends_cli("remove-backend", "http://a:1/", "--env-file", str(path)).returncode == 0
    assert path.read_text() == "OLLAMA_BACKENDS=\n"


@pytest.mark.parametrize("url", ["ftp://x", "ollama:11434", "http://", "http://user:pw@h:1"])
def test_a_bad_url_is_one_line_and_exit_1(tmp_path: Path, url: str) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_TEXT)
    result = backends_cli("add-backend", url, "--env-file", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: The URL")
    assert "Traceback" not in result.stderr
    assert path.read_text() == ENV_TEXT


def test_the_planned_change_is_computed_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ENV_TEXT)
    change, text = plan_backends_change(path, "http://ollama-b:11434", add=True)
    assert change.changed
    assert change.urls == ("http://ollama-a:11434", "http://ollama-b:11434")
    assert "OLLAMA_BACKENDS=http://ollama-a:11434,http://ollama-b:11434\n" in text
    assert path.read_text() == ENV_TEXT


def test_list_backends_probes_each_backend(emulator: Emulator, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    down = f"http://127.0.0.1:{free_port()}"
    path.write_text(f"OLLAMA_BACKENDS={emulator.url},{down}\nGATEWAY_PORT={free_port()}\n")
    result = backends_cli("list-backends", "--check", "--json", "--env-file", str(path))
    assert result.returncode == 0, result.stderr
    rows = {row["url"]: row["state"] for row in orjson.loads(result.stdout)}
    assert rows[emulator.url]["ok"] is True
    assert rows[emulator.url]["version"] == "0.33.0"
    assert "tiny:latest" in rows[emulator.url]["models"]
    assert rows[down]["ok"] is False
