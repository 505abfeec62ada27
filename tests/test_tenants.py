"""The tenant and key commands, as an operator runs them."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable

import orjson
import pytest

from tests.support import ROOT

Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def run(database_url: str) -> Runner:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "neuronetz", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "DATABASE_URL": database_url, "NO_COLOR": "1"},
        )  # fmt: skip

    return run


def tidy_failure(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_the_key_lifecycle(run: Runner) -> None:
    tenant = f"acme-{secrets.token_hex(3)}"
    created = run("create-tenant", "--name", tenant, "--rpm", "60", "--daily-tokens", "100000")
    assert created.returncode == 0
    assert created.stdout == f"created tenant {tenant} (rpm=60 daily=100000)\n"
    made = run("create-key", "--tenant", tenant, "--name", "ci", "--models", "Llama3.2,qwen3:7b",
               "--expires-in-days", "30", "--tpm", "1000")  # fmt: skip
    assert made.returncode == 0
    key = made.stdout.strip()
    assert re.fullmatch(r"nz_[a-z0-9]{8}[A-Za-z0-9_-]{43}", key)  # alone on stdout: `KEY=$(...)` works
    assert "shown only this once" in made.stderr
    listed = orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)
    assert listed == [
        {
            "prefix": key[:11], "name": "ci", "tenant": tenant, "status": "active",
            "created_at": listed[0]["created_at"], "expires_at": listed[0]["expires_at"], "last_used_at": None,
            "allowed_models": ["llama3.2:latest", "qwen3:7b"], "log_prompts": False, "prompt_ttl_days": None,
            "rpm": None, "tpm": 1000, "max_concurrent": None, "daily_tokens": None, "monthly_tokens": None,
            "total_tokens": None, "allow_cloud": None,
        }
    ]  # fmt: skip
    table = run("list-keys", "--tenant", tenant).stdout
    assert table.splitlines()[0].split()[:4] == ["PREFIX", "NAME", "TENANT", "STATUS"]
    assert key[11:] not in table
    assert run("set-limits", "--prefix", key[:11], "--tpm", "none", "--rpm", "5").returncode == 0
    assert orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)[0]["tpm"] is None
    revoked = run("revoke-key", "--prefix", key[:11])
    assert revoked.returncode == 0
    assert "revoked key" in revoked.stdout
    assert "already revoked" in run("revoke-key", "--prefix", key[:11]).stdout
    assert orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)[0]["status"] == "revoked"
    tenants = orjson.loads(run("list-tenants", "--json").stdout)
    (mine,) = [t for t in tenants if t["name"] == tenant]
    assert (mine["keys"], mine["rpm"], mine["daily_tokens"]) == (1, 60, 100000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create-key", "--tenant", "no-such-tenant", "--name", "x"], "There is no tenant named 'no-such-tenant'"),
        (["create-tenant", "--name", "bad name!"], "is not a valid tenant name"),
        (["create-tenant", "--name", "x", "--rpm", "0"], "--rpm must be at least 1, got 0"),
        (["create-tenant", "--name", "x", "--daily-tokens", "lots"], "--daily-tokens takes a whole number"),
        (["create-key", "--tenant", "x", "--name", "y", "--expires", "2001-01-01"], "is in the past"),
        (["create-key", "--tenant", "x", "--name", "y", "--expires", "soon"], "--expires must be an ISO 8601 date"),
        (["create-key", "--tenant", "x", "--name", "y", "--log-prompts"], "--log-prompts needs --prompt-ttl-days"),
        (["revoke-key", "--prefix", "nz_zzzzzzzz"], "There is no key with the prefix 'nz_zzzzzzzz'"),
        (["revoke-key", "--prefix", "sk-123"], "is not a key prefix"),
        (["set-limits", "--tenant", "no-such-tenant", "--rpm", "1"], "There is no tenant named"),
        (["list-keys", "--tenant", "no-such-tenant"], "There is no tenant named"),
        (["usage", "--prefix", "nz_zzzzzzzz"], "There is no key with the prefix"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(run: Runner, args: list[str], message: str) -> None:
    tidy_failure(run(*args), message)


def test_duplicates_are_refused(run: Runner) -> None:
    tenant = f"dup-{secrets.token_hex(3)}"
    assert run("create-tenant", "--name", tenant).returncode == 0
    tidy_failure(run("create-tenant", "--name", tenant), f"A tenant named '{tenant}' already exists.")
    assert run("create-key", "--tenant", tenant, "--name", "k").returncode == 0
    tidy_failure(run("create-key", "--tenant", tenant, "--name", "k"), "already has a key named 'k'")


def test_usage_reports_tokens_against_budgets(run: Runner) -> None:
    tenant = f"use-{secrets.token_hex(3)}"
    run("create-tenant", "--name", tenant, "--monthly-tokens", "5000")
    key = run("create-key", "--tenant", tenant, "--name", "k", "--daily-tokens", "300").stdout.strip()
    table = run("usage", "--tenant", tenant)
    assert table.returncode == 0
    assert table.stdout.splitlines()[1].split()[:9] == [tenant, key[:11], "k", "0", "/", "0/300", "0", "/", "0/5000"]
    report = orjson.loads(run("usage", "--prefix", key[:11], "--json").stdout)
    assert report[0]["tokens_today"] == 0
    assert report[0]["key_limits"]["daily_tokens"] == 300
    assert report[0]["tenant_limits"]["monthly_tokens"] == 5000


def test_cloud_access_is_set_per_tenant_overridden_per_key_and_listed(run: Runner) -> None:
    tenant = f"cloud-{secrets.token_hex(3)}"
    assert run("create-tenant", "--name", tenant, "--allow-cloud").returncode == 0
    (row,) = [t for t in orjson.loads(run("list-tenants", "--json").stdout) if t["name"] == tenant]
    assert row["allow_cloud"] is True
    key = run("create-key", "--tenant", tenant, "--name", "k", "--no-allow-cloud").stdout.strip()
    (listed,) = orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)
    assert listed["allow_cloud"] is False
    assert run("set-limits", "--prefix", key[:11], "--allow-cloud").returncode == 0
    table = run("list-keys", "--tenant", tenant).stdout.splitlines()
    assert table[0].split()[-1] == "CLOUD"
    assert table[1].split()[-1] == "allowed"
    assert run("set-limits", "--tenant", tenant, "--no-allow-cloud").returncode == 0
    assert "off" in run("list-tenants").stdout.split(tenant, 1)[1].splitlines()[0]
