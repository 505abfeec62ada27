"""The tenant and key commands, as an operator runs them."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
import subprocess
from collections.abc import Callable

import httpx
import orjson
import pytest

from neuronetz import keys, tenants
from neuronetz.limits import Limits
from tests.support import Admin, GatewayProcess, auth, run_cli

Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def run(database_url: str) -> Runner:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env={"DATABASE_URL": database_url})

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
            "total_tokens": None, "replaced_by": None, "replaces": None, "allow_cloud": None,
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
        (["create-tenant", "--name", "x", "--rpm", "0"], "--rpm must be between 1 and 2147483647, got 0"),
        (["create-tenant", "--name", "x", "--daily-tokens", "lots"], "--daily-tokens takes a whole number"),
        (["create-key", "--tenant", "x", "--name", "y", "--expires", "2001-01-01"], "is in the past"),
        (["create-key", "--tenant", "x", "--name", "y", "--expires", "soon"], "--expires takes an ISO 8601 date"),
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


@pytest.fixture(scope="module")
def existing(run: Runner) -> tuple[str, str]:
    """A tenant and one of its keys, so that a bad value meets a real row, not 'no such tenant'."""
    tenant = f"range-{secrets.token_hex(3)}"
    assert run("create-tenant", "--name", tenant, "--rpm", "5").returncode == 0
    key = run("create-key", "--tenant", tenant, "--name", "k").stdout.strip()
    return tenant, key[:11]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set-limits", "--tenant", "{tenant}", "--rpm", "2147483648"], "--rpm must be between 1 and 2147483647"),
        (["set-limits", "--tenant", "{tenant}", "--tpm", "99999999999"], "--tpm must be between 1 and 2147483647"),
        (["set-limits", "--tenant", "{tenant}", "--max-concurrent", "-1"], "--max-concurrent must be between 1 and"),
        (["set-limits", "--tenant", "{tenant}", "--daily-tokens", "9223372036854775808"],
         "--daily-tokens must be between 0 and 9223372036854775807"),
        (["set-limits", "--prefix", "{prefix}", "--monthly-tokens", "9223372036854775808"],
         "--monthly-tokens must be between 0 and 9223372036854775807"),
        (["set-limits", "--prefix", "{prefix}", "--total-tokens", "-1"], "--total-tokens must be between 0 and"),
        (["set-limits", "--prefix", "{prefix}", "--log-prompts", "--prompt-ttl-days", "99999999999"],
         "--prompt-ttl-days must be between 1 and 36500"),
        (["create-tenant", "--name", "r-{prefix}", "--rpm", "2147483648"], "--rpm must be between 1 and 2147483647"),
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--expires-in-days", "100000000"],
         "--expires-in-days must be between 1 and 36500"),
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--expires-in-days", "0"],
         "--expires-in-days must be between 1 and 36500, got 0"),
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--log-prompts", "--prompt-ttl-days", "99999999999"],
         "--prompt-ttl-days must be between 1 and 36500"),
        # Storable, but the gateway adds the TTL to the time of each request: year 10000 is no datetime.
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--log-prompts", "--prompt-ttl-days", "3000000"],
         "--prompt-ttl-days must be between 1 and 36500"),
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--expires", "2999-01-01"],
         "is more than 36500 days (100 years) away"),
        (["create-key", "--tenant", "{tenant}", "--name", "n", "--expires", "9999-12-31T23:00-05:00"],
         "is outside the years 1 to 9999 in UTC"),
        (["audit", "--tenant", "{tenant}", "--since", "0001-01-01T00:00+14:00"], "is outside the years 1 to 9999"),
        (["audit", "--tenant", "{tenant}", "--since", "99999999d"], "--since 99999999d is longer than 36500 days"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_one_line_and_change_nothing(
    run: Runner, existing: tuple[str, str], args: list[str], message: str
) -> None:
    tenant, prefix = existing
    tidy_failure(run(*(arg.format(tenant=tenant, prefix=prefix) for arg in args)), message)
    (mine,) = [t for t in orjson.loads(run("list-tenants", "--json").stdout) if t["name"] == tenant]
    assert (mine["keys"], mine["rpm"], mine["tpm"], mine["daily_tokens"]) == (1, 5, None, None)


@pytest.mark.parametrize(
    "name",
    ["two\nlines", "\x1b[31mred", "right\u202eleft", "next\x85line", "tab\there", "zero\u200bwidth", "x" * 129],
)
def test_key_names_with_control_or_formatting_characters_are_refused(
    run: Runner, existing: tuple[str, str], name: str
) -> None:
    tidy_failure(run("create-key", "--tenant", existing[0], "--name", name), "is not a valid key name")


async def test_a_nul_never_reaches_the_database(admin: Admin) -> None:
    # argv cannot carry U+0000; other callers of the same functions can.
    with pytest.raises(tenants.AdminError, match="is not a valid tenant name"):
        await tenants.create_tenant(admin.pool, "nul\x00", Limits())
    with pytest.raises(tenants.AdminError, match="is not a valid key name"):
        await tenants.create_key(admin.pool, await admin.tenant(), "nul\x00")


# Written by another tool (psql, the console) or, for the audit's model, sent by a client.
FORGERY = "evil\nnz_forged01  forged  t  active\x1b[2J\u202e\x85\u2028\x7f\x9b"


def assert_plain(text: str) -> None:
    for char in "\x1b\u202e\x85\u2028\x7f\x9b":
        assert char not in text


async def test_names_stored_by_other_tools_cannot_forge_rows(run: Runner, admin: Admin) -> None:
    tenant = await admin.tenant()
    prefix = keys.generate().prefix
    await admin.pool.execute(
        "INSERT INTO api_keys (tenant_id, name, prefix, secret_hash, allowed_models) "
        "SELECT id, $2, $3, '$argon2id$not-a-real-hash', ARRAY[$2] FROM tenants WHERE name = $1",
        tenant, FORGERY, prefix,
    )  # fmt: skip
    await admin.pool.execute(
        "INSERT INTO usage_daily (key_id, day, model, tenant_id, requests) "
        "SELECT id, (now() AT TIME ZONE 'UTC')::date, $2, tenant_id, 1 FROM api_keys WHERE prefix = $1",
        prefix, FORGERY,
    )  # fmt: skip
    await admin.pool.execute(
        "INSERT INTO request_log (created_at, request_id, tenant_id, key_prefix, method, route, model, status, "
        "error_code, duration_ms) SELECT now(), $2, tenant_id, $1, 'POST', $2, $2, 200, $2, 1 FROM api_keys "
        "WHERE prefix = $1",
        prefix, FORGERY,
    )  # fmt: skip
    today = dt.datetime.now(dt.UTC).date().isoformat()
    for args, rows in [
        (["list-keys", "--tenant", tenant], 1),
        (["usage", "--tenant", tenant], 1),
        (["usage", "--tenant", tenant, "--from", today, "--by", "key"], 1),
        (["usage", "--tenant", tenant, "--from", today, "--by", "key", "--csv"], 1),
        (["usage", "--tenant", tenant, "--from", today, "--by", "model"], 1),
        (["usage", "--tenant", tenant, "--from", today, "--by", "model", "--csv"], 1),
        (["audit", "--tenant", tenant], 1),
        (["revoke-key", "--prefix", prefix], 0),
    ]:
        result = run(*args)
        assert result.returncode == 0, result
        assert len(result.stdout.splitlines()) == rows + 1, result.stdout  # splitlines() also splits at \x85, \u2028
        assert_plain(result.stdout)
        assert "evil\\nnz_forged01" in result.stdout
    for args, field in [
        (["list-keys", "--tenant", tenant, "--json"], "name"),
        (["usage", "--tenant", tenant, "--json"], "name"),
        (["usage", "--tenant", tenant, "--from", today, "--by", "key", "--json"], "key_name"),
        (["usage", "--tenant", tenant, "--from", today, "--by", "model", "--json"], "model"),
        (["audit", "--tenant", tenant, "--json"], "model"),
    ]:
        result = run(*args)
        assert_plain(result.stdout)
        assert orjson.loads(result.stdout)[0][field] == FORGERY  # escaped, yet the same string


async def test_usage_export_sums_the_ledger_per_tenant_day_key_and_model(run: Runner, admin: Admin) -> None:
    tenant = await admin.tenant()
    first = (await tenants.create_key(admin.pool, tenant, "first"))[0].prefix
    second = (await tenants.create_key(admin.pool, tenant, "second"))[0].prefix
    ledger = [  # key, day, model, requests, prompt tokens, completion tokens
        (first, "2026-10-31", "tiny:latest", 100, 1000, 1000),  # before the range
        (first, "2026-11-01", "tiny:latest", 1, 10, 20),
        (first, "2026-11-02", "tiny:latest", 2, 30, 40),
        (first, "2026-11-02", "qwen3:8b", 4, 400, 500),
        (second, "2026-11-02", "", 5, 50, 60),  # from before the ledger kept models
        (second, "2026-11-02", "qwen3:8b", 1, 1, 2),
        (second, "2026-11-30", "tiny:latest", 7, 70, 80),
        (second, "2026-12-01", "tiny:latest", 100, 1000, 1000),  # after it
    ]
    for prefix, day, model, requests, prompt, completion in ledger:
        await admin.pool.execute(
            "INSERT INTO usage_daily (key_id, day, model, tenant_id, requests, prompt_tokens, completion_tokens) "
            "SELECT id, $2, $3, tenant_id, $4, $5, $6 FROM api_keys WHERE prefix = $1",
            prefix, dt.date.fromisoformat(day), model, requests, prompt, completion,
        )  # fmt: skip
    header = "period_start,period_end,tenant,key_prefix,key_name,model,requests,prompt_tokens,completion_tokens,"
    header += "total_tokens\n"
    month = f"2026-11-01,2026-11-30,{tenant}"
    by_key = sorted([f"{month},{first},first,,7,440,560,1000\n", f"{month},{second},second,,13,121,142,263\n"])
    by_day_and_key = [f"2026-11-01,2026-11-01,{tenant},{first},first,,1,10,20,30\n",
                      *sorted([f"2026-11-02,2026-11-02,{tenant},{first},first,,6,430,540,970\n",
                               f"2026-11-02,2026-11-02,{tenant},{second},second,,6,51,62,113\n"]),
                      f"2026-11-30,2026-11-30,{tenant},{second},second,,7,70,80,150\n"]  # fmt: skip
    # Models sort as text, '' (no model known) first.
    by_model = f"{month},,,,5,50,60,110\n{month},,,qwen3:8b,5,401,502,903\n{month},,,tiny:latest,10,110,140,250\n"
    by_day_and_model = (
        f"2026-11-01,2026-11-01,{tenant},,,tiny:latest,1,10,20,30\n"
        f"2026-11-02,2026-11-02,{tenant},,,,5,50,60,110\n"
        f"2026-11-02,2026-11-02,{tenant},,,qwen3:8b,5,401,502,903\n"
        f"2026-11-02,2026-11-02,{tenant},,,tiny:latest,2,30,40,70\n"
        f"2026-11-30,2026-11-30,{tenant},,,tiny:latest,7,70,80,150\n"
    )
    by_key_and_model = sorted([
        f"{month},{first},first,qwen3:8b,4,400,500,900\n{month},{first},first,tiny:latest,3,40,60,100\n",
        f"{month},{second},second,,5,50,60,110\n{month},{second},second,qwen3:8b,1,1,2,3\n"
        f"{month},{second},second,tiny:latest,7,70,80,150\n",
    ])  # fmt: skip
    expected = {
        (): f"{month},,,,20,561,702,1263\n",
        ("--by", "day"): f"2026-11-01,2026-11-01,{tenant},,,,1,10,20,30\n"
        f"2026-11-02,2026-11-02,{tenant},,,,12,481,602,1083\n2026-11-30,2026-11-30,{tenant},,,,7,70,80,150\n",
        ("--by", "key"): "".join(by_key),
        ("--by", "day,key"): "".join(by_day_and_key),
        ("--by", "model"): by_model,
        ("--by", "model,day"): by_day_and_model,
        ("--by", "key,model"): "".join(by_key_and_model),
    }
    for grouping, rows in expected.items():
        result = run("usage", "--tenant", tenant, "--from", "2026-11-01", "--to", "2026-11-30", *grouping, "--csv")
        assert result.returncode == 0, result
        assert result.stdout == header + rows, grouping
    only_second = run("usage", "--prefix", second, "--from", "2026-11-02", "--to", "2026-11-02", "--json")
    assert orjson.loads(only_second.stdout) == [
        {"period_start": "2026-11-02", "period_end": "2026-11-02", "tenant": tenant, "key_prefix": None,
         "key_name": None, "model": None, "requests": 6, "prompt_tokens": 51, "completion_tokens": 62,
         "total_tokens": 113},
    ]  # fmt: skip
    per_model = run("usage", "--prefix", second, "--from", "2026-11-02", "--to", "2026-11-02", "--by", "day,key,model",
                    "--json")  # fmt: skip
    period = {"period_start": "2026-11-02", "period_end": "2026-11-02"}
    of_key = {"key_prefix": second, "key_name": "second"}
    assert orjson.loads(per_model.stdout) == [
        {**period, "tenant": tenant, **of_key, "model": "", "requests": 5, "prompt_tokens": 50, "completion_tokens": 60,
         "total_tokens": 110},
        {**period, "tenant": tenant, **of_key, "model": "qwen3:8b", "requests": 1, "prompt_tokens": 1,
         "completion_tokens": 2, "total_tokens": 3},
    ]  # fmt: skip
    nothing = run("usage", "--tenant", tenant, "--from", "2027-01-01", "--to", "2027-01-31", "--csv")
    assert nothing.stdout == header
    tidy_failure(run("usage", "--tenant", "no-such-tenant", "--from", "2026-11-01"), "There is no tenant named")


async def status_of(client: httpx.AsyncClient, gateway: GatewayProcess, key: str) -> int:
    return (await client.get(gateway.url + "/api/version", headers=auth(key))).status_code


async def test_a_rotated_key_works_until_its_grace_ends_and_its_successor_after(
    run: Runner, gateway: GatewayProcess, admin: Admin
) -> None:
    tenant = await admin.tenant()
    made = run("create-key", "--tenant", tenant, "--name", "ci", "--models", "llama3.2", "--rpm", "60000",
               "--tpm", "90000", "--log-prompts", "--prompt-ttl-days", "3", "--expires-in-days", "30")  # fmt: skip
    old = made.stdout.strip()
    async with httpx.AsyncClient() as client:
        assert await status_of(client, gateway, old) == 200  # cached by the gateway from now on
        rotated = run("rotate-key", "--prefix", old[:11], "--grace", "10s")
        assert rotated.returncode == 0, rotated
        new = rotated.stdout.strip()
        assert re.fullmatch(r"nz_[a-z0-9]{8}[A-Za-z0-9_-]{43}", new)  # alone on stdout, like create-key
        assert f"rotated key {old[:11]} (ci) of tenant {tenant}: the new key is {new[:11]}" in rotated.stderr
        assert "shown only this once" in rotated.stderr
        assert await status_of(client, gateway, new) == 200
        grace_ends = await admin.pool.fetchval("SELECT expires_at FROM api_keys WHERE prefix = $1", old[:11])

        # The old key works until the grace period ends and is refused within a second of its end,
        # cached or not.
        answers: list[tuple[dt.datetime, int]] = []
        while not answers or (answers[-1][1] == 200 and answers[-1][0] < grace_ends + dt.timedelta(seconds=5)):
            sent = dt.datetime.now(dt.UTC)
            answers.append((sent, await status_of(client, gateway, old)))
            await asyncio.sleep(0.05)
        assert answers[0][1] == 200, (answers[0], grace_ends)
        assert answers[-1][1] == 401, answers[-1]
        assert all(status == 200 for _, status in answers[:-1]), answers
        assert answers[-1][0] >= grace_ends - dt.timedelta(milliseconds=50), (answers[-1], grace_ends)
        assert answers[-2][0] < grace_ends + dt.timedelta(seconds=1), (answers[-2], grace_ends)
        assert await status_of(client, gateway, new) == 200

    listed = {k["prefix"]: k for k in orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)}
    before, after = listed[old[:11]], listed[new[:11]]
    assert before["status"] == "expired"
    assert (before["replaced_by"], before["replaces"]) == (new[:11], None)
    assert (after["replaced_by"], after["replaces"]) == (None, old[:11])
    same = ("name", "tenant", "allowed_models", "log_prompts", "prompt_ttl_days", "rpm", "tpm", "daily_tokens")
    assert {f: after[f] for f in same} == {f: before[f] for f in same}
    assert (after["status"], after["name"], after["rpm"], after["prompt_ttl_days"]) == ("active", "ci", 60000, 3)
    assert dt.datetime.fromisoformat(after["expires_at"]) - grace_ends > dt.timedelta(days=29)  # the old expiry
    table = run("list-keys", "--tenant", tenant).stdout
    assert f"replaced by {new[:11]}" in table
    assert f"replaces {old[:11]}" in table

    # Audit rows keep the prefix each request came with.
    audited: set[str] = set()
    deadline = asyncio.get_running_loop().time() + 10
    while audited != {old[:11], new[:11]} and asyncio.get_running_loop().time() < deadline:
        rows = await admin.pool.fetch("SELECT DISTINCT key_prefix FROM request_log WHERE key_prefix = ANY($1)",
                                      [old[:11], new[:11]])  # fmt: skip
        audited = {row["key_prefix"] for row in rows}
        await asyncio.sleep(0.1)
    assert audited == {old[:11], new[:11]}


async def test_what_cannot_be_rotated_is_refused_in_one_line(run: Runner, admin: Admin) -> None:
    tenant = await admin.tenant()
    key = await admin.key(tenant)
    assert run("rotate-key", "--prefix", key[:11], "--grace", "1h", "--expires-in-days", "2").returncode == 0
    tidy_failure(run("rotate-key", "--prefix", key[:11]), f"Key {key[:11]} was already rotated to nz_")
    revoked = await admin.key(tenant)
    await tenants.revoke_key(admin.pool, revoked[:11])
    tidy_failure(run("rotate-key", "--prefix", revoked[:11]), "is revoked, so there is nothing to rotate")
    tidy_failure(run("rotate-key", "--prefix", "nz_zzzzzzzz"), "There is no key with the prefix 'nz_zzzzzzzz'")
    tidy_failure(run("rotate-key", "--prefix", "sk-123"), "is not a key prefix")
    # The grace period never lengthens a key's life; --expires-in-days sets the successor's.
    listed = orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)
    (successor,) = [k for k in listed if k["replaces"] == key[:11]]
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert abs(dt.datetime.fromisoformat(successor["expires_at"]) - soon) < dt.timedelta(minutes=5)
    short = await admin.key(tenant, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert run("rotate-key", "--prefix", short[:11], "--grace", "7d").returncode == 0
    (before,) = [k for k in orjson.loads(run("list-keys", "--tenant", tenant, "--json").stdout)
                 if k["prefix"] == short[:11]]  # fmt: skip
    assert dt.datetime.fromisoformat(before["expires_at"]) - dt.datetime.now(dt.UTC) < dt.timedelta(hours=1)


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
