"""The real binary, built by build.py exactly as users build it, serves and migrates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, GatewayProcess


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("binary")
    output = directory / "neuronetz-gateway"
    subprocess.run(
        [sys.executable, "build.py", "--output", str(output), "--root", str(directory / "shiv")],
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
