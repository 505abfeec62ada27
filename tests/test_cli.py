"""The command line as users run it: exit codes and one tidy line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT, free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuronetz", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_tidy_failure(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "healthcheck", "selfcheck"):
        assert command in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("neuronetz-gateway ")


@pytest.mark.parametrize("command", ["migrate", "serve"])
def test_a_bad_setting_is_one_line_and_exit_1(command: str) -> None:
    assert_tidy_failure(run_cli(command, env={"GATEWAY_PORT": "0"}), "GATEWAY_PORT must be between 1 and 65535")


def test_an_unreachable_database_is_one_line_and_exit_1() -> None:
    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/x"
    result = run_cli("migrate", env={"DATABASE_URL": url})
    assert_tidy_failure(result, "Cannot reach Postgres at postgresql://u:***@127.0.0.1")
    assert "hunter2" not in result.stderr


def test_a_missing_env_file_is_one_line_and_exit_1() -> None:
    assert_tidy_failure(run_cli("migrate", "--env-file", "/nonexistent/.env"), "does not exist")


def test_healthcheck_fails_tidily_when_nothing_answers() -> None:
    result = run_cli("healthcheck", "--url", f"http://127.0.0.1:{free_port()}/healthz")
    assert_tidy_failure(result, "is not answering")


def test_out_of_range_flag_is_one_line_and_exit_1() -> None:
    assert_tidy_failure(run_cli("serve", "--port", "70000"), "--port must be between 1 and 65535")
