"""The real binary, built by build.py as users build it: it serves, migrates, and fails tidily
when it runs as an unprivileged user against a .env file it may not write (the container)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, GatewayProcess

# Debian's own interpreter when there is one, as in the container; its packages need the
# environment markers of its exact patch version (packaging-shiv-granian-distroless.md §5).
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = "65534"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A directory everyone may read (pytest's own temporary directories are private)."""
    directory = Path(tempfile.mkdtemp(prefix="neuronetz-binary-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def binary(workdir: Path) -> Path:
    output = workdir / "neuronetz-gateway"
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else os.path.realpath(sys.executable)
    subprocess.run(
        [sys.executable, "build.py", "--python", python, "--output", str(output), "--root", str(workdir / "shiv")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return output


def test_the_binary_migrates_and_serves(binary: Path, database_url: str, redis_url: str) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "OLLAMA_BACKENDS": ""}
    migrated = subprocess.run(
        [str(binary), "migrate"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == "the database is up to date"
    with GatewayProcess(env, command=[str(binary)]) as gateway:
        assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(gateway.url + "/readyz").status_code == 503
        health = subprocess.run(
            [str(binary), "healthcheck", "--url", gateway.url + "/healthz"], capture_output=True, timeout=30
        )
        assert health.returncode == 0
        assert gateway.stop() == 0


def test_the_binary_extracts_into_the_root_baked_in_at_build_time(binary: Path) -> None:
    extracted = list((binary.parent / "shiv").glob("neuronetz-gateway_*/site-packages/neuronetz/migrations/*.sql"))
    assert extracted, "the binary did not extract into its --root"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges to another user needs root")
def test_add_backend_as_an_unprivileged_user_fails_tidily_and_leaves_the_file(binary: Path, workdir: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    config = workdir / "config"  # owned by root, like a host directory mounted into the container
    config.mkdir(mode=0o755, exist_ok=True)
    env_file = config / ".env"
    original = "# host-owned\nOLLAMA_BACKENDS=http://ollama:11434\n"
    env_file.write_text(original)
    env_file.chmod(0o644)
    result = subprocess.run(
        ["setpriv", "--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", str(binary),
         "add-backend", "http://ollama-2:11434", "--env-file", str(env_file)],
        capture_output=True, text=True, timeout=60, cwd=config,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot write {env_file} (permission denied): the file is unchanged.")
    assert "docker exec -u root <container> neuronetz-gateway add-backend http://ollama-2:11434" in result.stderr
    assert result.stdout == "OLLAMA_BACKENDS=http://ollama:11434,http://ollama-2:11434\n"
    assert env_file.read_text() == original
    assert sorted(p.name for p in config.iterdir()) == [".env"]  # no .env.tmp left behind
