"""The command line as users run it: exit codes and one tidy line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import ROOT, free_port, run_cli


def assert_tidy_failure(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "healthcheck", "selfcheck", "rotate-key", "usage"):
        assert command in result.stdout


def test_usage_help_lists_the_export_columns_in_their_order() -> None:
    """Scripts depend on the export's columns: `usage --help` names them, in the README's order."""
    result = run_cli("usage", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps the epilog
    columns = "period_start, period_end, tenant, key_prefix, key_name, model, requests, prompt_tokens, "
    assert columns + "completion_tokens, total_tokens." in text
    assert "--by day|key|model[,...]" in text


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999999999999999999999"], "--port must be between 1 and 65535"),
        (["serve", "--workers", "0"], "--workers must be between 1 and 64, got 0"),
        (["healthcheck", "--url", "http://127.0.0.1:9/", "--timeout", "nan"], "--timeout must be more than 0"),
        (["healthcheck", "--url", "http://127.0.0.1:9/", "--timeout", "-1"], "--timeout must be more than 0"),
        (["healthcheck", "--url", "http://127.0.0.1:9/", "--timeout", "1e999"], "--timeout must be more than 0"),
        (["audit", "--since", "99999999d"], "--since 99999999d is longer than 36500 days"),
        (["audit", "--since", "9" * 30 + "s"], "--since takes an ISO 8601 time or a span"),
        (["audit", "--since", "\u00b2d"], "--since takes an ISO 8601 time or a span"),  # isdigit(), yet no int
        (["audit", "--since", "9999-12-31T23:59-14:00"], "--since 9999-12-31T23:59-14:00 is outside the years 1"),
        (["audit", "--limit", "0"], "--limit must be between 1 and 100000, got 0"),
        (["rotate-key", "--prefix", "nz_zzzzzzzz", "--grace", "99999999d"], "--grace 99999999d is longer than"),
        (["rotate-key", "--prefix", "nz_zzzzzzzz", "--grace", "soon"], "--grace takes a span like 30s"),
        (["usage", "--from", "2026-11-31"], "--from takes a UTC day as YYYY-MM-DD"),
        (
            ["usage", "--from", "2026-11-02", "--to", "2026-11-01"],
            "The last day 2026-11-01 (--to) is before the first day 2026-11-02",
        ),
        (["usage", "--from", "2026-11-01", "--by", "week"], "--by takes one or more of day, key and model"),
        (["usage", "--from", "2026-11-01", "--by", ","], "--by takes one or more of day, key and model"),
        (["usage", "--by", "day"], "--by belongs to a usage export: give the first day with --from"),
        (["usage", "--from", "2026-11-01", "--csv", "--json"], "--csv and --json contradict each other"),
    ],
)
def test_out_of_range_and_malformed_values_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    # Exit 1, like every other expected failure: scripts test one code for "the command refused".
    assert_tidy_failure(run_cli(*args), message)


def test_an_argument_that_is_not_utf8_is_one_line_and_exit_1() -> None:
    # Bytes that are not UTF-8 reach Python as lone surrogates, which no database driver can encode.
    result = subprocess.run(
        [sys.executable.encode(), b"-m", b"neuronetz", b"list-keys", b"--tenant", b"\xff\x1b[2J"],
        cwd=ROOT, capture_output=True, timeout=60, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result
    assert result.stderr == b"error: The argument '\\udcff\\x1b[2J' is not valid UTF-8 text.\n"
