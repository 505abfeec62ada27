#!/usr/bin/env python3
"""Build, test and benchmark neuronetz-gateway. Standard library only at the top level.

python3 build.py                      build ./neuronetz-gateway (a shiv zipapp)
python3 build.py --python /usr/bin/python3 --root /opt/neuronetz
                                      ... with that interpreter in the shebang and a fixed
                                      extraction root (what the container image uses)
python3 build.py test [pytest args]   .venv + gates (ruff, mypy --strict, bandit) + pytest
python3 build.py audit                pip-audit of the pinned runtime dependencies
python3 build.py bench [names]        the benchmarks in tests/bench (they print tables)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
BINARY = ROOT / "neuronetz-gateway"
VENV = ROOT / ".venv"
SHIV = "shiv==1.0.8"
ENTRY_POINT = "neuronetz.cli:main"


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


def services_reachable() -> None:
    """Fail with instructions unless Postgres and Redis answer on the test URLs."""
    checks = [
        (
            "Postgres",
            os.environ.get("TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/postgres"),
            5432,
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        ),
        (
            "Redis",
            os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            6379,
            'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no',
        ),
    ]
    for name, url, default_port, how in checks:
        parts = urlsplit(url)
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        try:
            socket.create_connection(address, timeout=3).close()
        except OSError:
            fail(
                f"{name} is not reachable at {address[0]}:{address[1]}. Start it (as root):\n    {how}\n"
                f"or install it: apt-get install -y postgresql redis-server"
            )


def test(pytest_args: list[str]) -> None:
    python = ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])
    services_reachable()
    bin_dir = python.parent
    run(bin_dir / "ruff", "check", ".")
    run(bin_dir / "ruff", "format", "--check", ".")
    run(bin_dir / "mypy")
    run(bin_dir / "bandit", "--quiet", "-c", "pyproject.toml", "-r", "neuronetz")
    # Tests spend most of their time waiting on gateway processes: two workers, one file each.
    pytest_args = pytest_args or ["-n", "2", "--dist", "loadfile"]
    # pytest exits 5 when it collected nothing: for this project that is a broken test run.
    code = subprocess.run([str(python), "-m", "pytest", *pytest_args], cwd=ROOT, check=False).returncode  # noqa: S603
    if code == 5:
        fail("pytest collected no tests: check the arguments and tests/ .")
    if code != 0:
        fail(f"pytest failed (exit {code}).")


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


def bench(names: list[str]) -> None:
    python = ensure_venv(VENV, sys.executable, ["-e", ".[test]"], [ROOT / "pyproject.toml"])
    scripts = sorted((ROOT / "tests" / "bench").glob("bench_*.py"))
    chosen = [s for s in scripts if not names or any(n in s.stem for n in names)]
    if not chosen:
        fail(f"No benchmark matches {names}; available: {', '.join(s.stem for s in scripts)}")
    for script in chosen:
        run(python, script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="build", choices=["build", "test", "audit", "bench"])
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
    elif args.command == "bench":
        bench(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "build":
        build(args.python, args.root, args.output.resolve())
    else:
        audit()


if __name__ == "__main__":
    main()
