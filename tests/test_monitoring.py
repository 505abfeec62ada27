"""The monitoring material of ops/: Prometheus's scrape config, Grafana's provisioning and the
dashboard, and the `monitoring` profile of docker-compose.yml.

The central check: every metric a dashboard panel queries exists, with the labels the query
uses, in the /metrics of a real gateway that has served traffic. The panels' PromQL is parsed
(promql-parser, Prometheus's grammar), so a renamed metric or label fails here, not on an
operator's empty graph.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest

from tests.emulator import Emulator
from tests.support import METRICS_TOKEN, ROOT, Admin, GatewayProcess, auth, metric
from tests.test_deployment import compose_config, default_services, load_yaml, mounts, operator_env, published

DASHBOARDS = ROOT / "ops" / "grafana" / "dashboards"
PROVISIONING = ROOT / "ops" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
MONITORING_ENV = {"GATEWAY_METRICS_TOKEN": "m" * 32, "GRAFANA_ADMIN_PASSWORD": "g" * 20}
# Grafana replaces these before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Labels Prometheus adds to every scraped series (the target's), absent from /metrics itself.
TARGET_LABELS = {"instance", "job"}
# Panel types that Grafana still ships (Angular panels such as graph, singlestat and table-old
# are gone in Grafana 11+).
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text"}


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    found = [(path, json.loads(path.read_text())) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert found, f"no dashboard in {DASHBOARDS}"
    return found


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row carries its panels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL as Prometheus receives it) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


# --- what a query needs, and what /metrics has ------------------------------------------------


def needs(expr: str) -> tuple[set[str], set[tuple[str, frozenset[str]]]]:
    """The metrics `expr` selects, and the labels it reads as (label, metrics one of which must
    carry it): a matcher's label from its own metric; a `by` label from one of the metrics
    aggregated (a `group_left` join keeps one side's labels only)."""
    metrics: set[str] = set()
    labels: set[tuple[str, frozenset[str]]] = set()

    def below(node: promql_parser.Expr) -> frozenset[str]:
        found: set[str] = set()
        promql_parser.walk(
            node, lambda n: found.add(str(n.name)) if isinstance(n, promql_parser.VectorSelector) else None
        )
        return frozenset(found)

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            metrics.add(node.name)
            labels.update((m.name, frozenset({node.name})) for m in node.matchers.matchers if m.name != "__name__")
        elif (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and node.modifier.type == promql_parser.AggModifierType.By
        ):
            labels.update((label, below(node.expr)) for label in node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return metrics, {(label, among) for label, among in labels if label not in TARGET_LABELS}


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')


def exposed(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names its series carry, from a Prometheus text exposition."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        series.setdefault(match[1], set()).update(LABEL.findall(match[2] or ""))
    return series


def missing(dashboard: dict[str, Any], exposition: str) -> list[str]:
    """What the dashboard's queries read that the exposition does not have, one line each."""
    have = exposed(exposition)
    problems: list[str] = []
    for title, expr in queries(dashboard):
        metrics, labels = needs(expr)
        problems += [f"{title!r}: no metric {name} in /metrics" for name in sorted(metrics - set(have))]
        for label, among in sorted(labels):
            if not any(label in have.get(name, ()) for name in among):
                problems.append(f"{title!r}: no label {label!r} on {', '.join(sorted(among))}")
    return problems


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": False}


async def budgeted_chat(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """A chat of a budgeted key, answered once the tenant's budget counters are ready (a
    gateway that has just started may rebuild them first: 503 meanwhile)."""
    deadline = time.monotonic() + 15
    while True:
        answer = await client.post("/api/chat", json=CHAT, headers=auth(key))
        if answer.status_code != 503 or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return answer
        await asyncio.sleep(0.2)


async def scrape_until(client: httpx.AsyncClient, done: Callable[[str], bool]) -> str:
    """/metrics once `done` holds for it: settlements reach Redis, and other workers' numbers
    the scrape, a moment after the answer."""
    deadline = time.monotonic() + 15
    while True:
        response = await client.get("/metrics", headers=auth(METRICS_TOKEN))
        assert response.status_code == 200, response.text
        if done(response.text) or time.monotonic() > deadline:
            return response.text
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def gateway_env(gateway_env: dict[str, str]) -> dict[str, str]:
    """This module's gateway has backend slots, so the fair queue's series are in its /metrics."""
    return {**gateway_env, "GATEWAY_BACKEND_SLOTS": "2"}


@pytest.fixture(scope="module")
async def scraped(gateway: GatewayProcess, admin: Admin, emulator: Emulator) -> str:
    """/metrics after the traffic every panel shows: answered requests with tokens (one of a
    tenant with a budget), through backend slots, a request refused by a limit, a refused key
    and a request for an unknown path."""
    key = await admin.key()
    limited = await admin.key(rpm=1)
    budgeted = await admin.key(await admin.tenant(daily_tokens=1_000_000))
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        assert (await client.post("/api/chat", json=CHAT, headers=auth(key))).status_code == 200
        assert (await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))).is_success
        assert (await client.post("/api/chat", json=CHAT, headers=auth(limited))).status_code == 200
        assert (await client.post("/api/chat", json=CHAT, headers=auth(limited))).status_code == 429
        assert (await client.post("/api/chat", json=CHAT, headers=auth("nz_unknown0" + "x" * 43))).status_code == 401
        assert (await client.get("/nowhere", headers=auth(key))).status_code == 404
        await budgeted_chat(client, budgeted)
        return await scrape_until(
            client,
            lambda text: all(
                f"{name}{{" in text
                for name in ("neuronetz_tenant_budget_used_tokens", "neuronetz_queue_waiting",
                             "neuronetz_backend_slots_in_use")
            ),
        )  # fmt: skip


async def test_tenant_series_show_each_tenants_tokens_and_its_budgets_against_their_limits(
    gateway: GatewayProcess, admin: Admin
) -> None:
    """Tokens by tenant (summed over the workers), and each budget of a tenant with the tokens
    Redis counts against it (one value per instance, however many workers)."""
    tenant = await admin.tenant(daily_tokens=5000, total_tokens=90_000)
    key = await admin.key(tenant)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        answers = [await budgeted_chat(client, key), await budgeted_chat(client, key)]
        prompt: int = sum(a.json()["prompt_eval_count"] for a in answers)
        completion: int = sum(a.json()["eval_count"] for a in answers)

        def settled(text: str) -> bool:
            used = metric(text, "neuronetz_tenant_budget_used_tokens", period="daily", tenant=tenant)
            counted = metric(text, "neuronetz_tenant_tokens_total", direction="completion", tenant=tenant)
            return used == prompt + completion and counted == completion

        text = await scrape_until(client, settled)
    assert metric(text, "neuronetz_tenant_tokens_total", direction="prompt", tenant=tenant) == prompt
    assert metric(text, "neuronetz_tenant_tokens_total", direction="completion", tenant=tenant) == completion
    for period, budget in (("daily", 5000), ("total", 90_000)):
        assert metric(text, "neuronetz_tenant_budget_tokens", period=period, tenant=tenant) == budget
        assert metric(text, "neuronetz_tenant_budget_used_tokens", period=period, tenant=tenant) == prompt + completion
    assert f'period="monthly",tenant="{tenant}"' not in text  # no monthly budget, no series


async def test_every_metric_and_label_a_panel_queries_is_in_the_gateways_metrics(scraped: str) -> None:
    for path, dashboard in dashboards():
        problems = missing(dashboard, scraped)
        assert not problems, f"{path.name}:\n" + "\n".join(problems)


async def test_a_renamed_metric_or_label_is_caught(scraped: str) -> None:
    """The check above can fail: the same dashboard against /metrics with one metric and one
    label renamed."""
    _, dashboard = dashboards()[0]
    renamed = scraped.replace("neuronetz_gateway_overhead_seconds", "neuronetz_overhead_seconds")
    assert any("neuronetz_gateway_overhead_seconds_bucket" in p for p in missing(dashboard, renamed))
    relabelled = scraped.replace('reason="', 'cause="')
    assert any("no label 'reason' on neuronetz_refusals_total" in p for p in missing(dashboard, relabelled))


def test_query_parser_reads_metrics_and_their_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{status=~"5.."}[1m])))'
        " / on (instance) group_left () sum by (instance) (b)"
    )
    assert needs(expr) == (
        {"a_bucket", "b"},
        {("le", frozenset({"a_bucket"})), ("route", frozenset({"a_bucket"})), ("status", frozenset({"a_bucket"}))},
    )


# --- the dashboard's structure ------------------------------------------------------------------


def datasource_uid() -> str:
    provisioned = load_yaml((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090", "the compose service and Prometheus's port"
    return str(source["uid"])


def test_dashboard_matches_grafana_schema_version_39() -> None:
    """What Grafana's DashboardMigrator (public/app/features/dashboard/state/DashboardMigrator.ts)
    expects of a dashboard that declares schemaVersion 39, so that it loads as written: panels
    on the 24-column grid (v16), unique panel ids (v3), a refId per query (v7), data sources as
    {type, uid} references (v33, v36), legend visibility as showLegend (v37), no table
    displayMode (v38)."""
    uid = datasource_uid()
    for path, dashboard in dashboards():
        assert dashboard["schemaVersion"] == 39, f"{path.name}: the checks below are those of version 39"
        assert "rows" not in dashboard, "pre-v16 row layout"
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"]), "a stable uid for links"
        assert dashboard["title"]
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        occupied: set[tuple[int, int]] = set()
        for panel in panels(dashboard):
            where = f"{path.name}: panel {panel['title']!r}"
            assert panel["type"] in PANEL_TYPES, f"{where}: type {panel['type']}"
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in "hwxy"), where
            assert grid["h"] > 0, where
            assert 0 < grid["w"] <= 24, where
            assert grid["x"] >= 0, where
            assert grid["x"] + grid["w"] <= 24, f"{where}: the grid has 24 columns"
            xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
            cells = {(x, y) for x in xs for y in ys}
            assert not cells & occupied, f"{where} overlaps another panel"
            occupied |= cells
            if panel["type"] == "row":
                continue
            assert panel.get("description"), f"{where}: the README and the panel's (i) say what it shows"
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            targets = panel["targets"]
            assert targets, f"{where}: no query"
            ref_ids = [target["refId"] for target in targets]
            assert all(ref_ids), where
            assert len(ref_ids) == len(set(ref_ids)), where
            for target in targets:
                assert target["datasource"] == panel["datasource"], where
                assert isinstance(target["expr"], str), where
                assert target["expr"].strip(), where
            legend = panel.get("options", {}).get("legend")
            if legend is not None:
                assert isinstance(legend["showLegend"], bool), f"{where}: v37 legend"
            assert "displayMode" not in panel["fieldConfig"]["defaults"].get("custom", {}), f"{where}: v38"
        for title, expr in queries(dashboard):
            try:
                promql_parser.parse(expr)
            except ValueError as exc:
                pytest.fail(f"{path.name}: panel {title!r}: invalid PromQL {expr!r}: {exc}")


def test_readme_describes_every_panel() -> None:
    readme = (ROOT / "README.md").read_text()
    for _, dashboard in dashboards():
        for panel in panels(dashboard):
            if panel["type"] != "row":
                assert f"**{panel['title']}**" in readme, f"README, Monitoring: describe {panel['title']!r}"


# --- Prometheus and the compose profile ---------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring() -> dict[str, Any]:
    result = compose_config("docker-compose.yml", operator_env(**MONITORING_ENV), "monitoring")
    assert result.returncode == 0, result.stderr
    return load_yaml(result.stdout)


def active(config: dict[str, Any], profile: str) -> dict[str, Any]:
    return {n: s for n, s in config["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def test_compose_validates_without_the_profile_and_starts_no_monitoring() -> None:
    result = compose_config("docker-compose.yml", operator_env())
    assert result.returncode == 0, result.stderr
    assert set(default_services(load_yaml(result.stdout))) == {"caddy", "gateway", "postgres", "redis", "ollama"}


def test_monitoring_profile_keeps_prometheus_internal_and_grafana_on_loopback(monitoring: dict[str, Any]) -> None:
    services = active(monitoring, "monitoring")
    networks: dict[str, Any] = monitoring["networks"]
    assert {"prometheus", "grafana"} <= set(services)
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert not published(prometheus)
    assert published(grafana) == [("127.0.0.1", 3000, "tcp")]
    assert all(networks[n].get("internal") is True for n in prometheus["networks"]), "Prometheus has no way out"
    # Prometheus reaches the gateway, and nothing the gateway guards (Postgres, Redis, Ollama).
    assert set(prometheus["networks"]) & set(services["gateway"]["networks"])
    for guarded in ("postgres", "redis", "ollama"):
        assert not set(prometheus["networks"]) & set(services[guarded]["networks"]), guarded
        assert not set(grafana["networks"]) & set(services[guarded]["networks"]), guarded
    assert not set(grafana["networks"]) & set(services["gateway"]["networks"]), "Grafana talks to Prometheus only"
    assert set(grafana["networks"]) & set(prometheus["networks"])
    # The gateway trusts X-Forwarded-For on Caddy's subnet only: Prometheus is not on it.
    assert not set(prometheus["networks"]) & set(services["caddy"]["networks"])
    for name in ("prometheus", "grafana"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_monitoring_profile_mounts_the_shipped_configuration(monitoring: dict[str, Any]) -> None:
    services = monitoring["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS)
    assert mounts(prometheus)["/prometheus"] in monitoring["volumes"]
    assert mounts(grafana)["/etc/grafana/provisioning"] == str(PROVISIONING)
    assert mounts(grafana)["/var/lib/grafana"] in monitoring["volumes"]
    provider = load_yaml((PROVISIONING / "dashboards" / "neuronetz.yml").read_text())["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts(grafana)[dashboards_dir] == str(DASHBOARDS), "the provider reads the mounted dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (DASHBOARDS / home.removeprefix(dashboards_dir + "/")).is_file()


def test_prometheus_scrapes_the_gateway_with_the_token_file_the_entrypoint_writes(monitoring: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    (targets,) = job["static_configs"]
    assert targets["targets"] == ["gateway:8080"], "the compose service and the container's GATEWAY_PORT"
    environment = monitoring["services"]["prometheus"]["environment"]
    assert job["authorization"]["credentials_file"] == environment["METRICS_TOKEN_FILE"]
    assert environment["GATEWAY_METRICS_TOKEN"] == MONITORING_ENV["GATEWAY_METRICS_TOKEN"]
    assert monitoring["services"]["prometheus"]["tmpfs"] == [str(Path(environment["METRICS_TOKEN_FILE"]).parent)]


def entrypoint(service: dict[str, Any], env: dict[str, str], then: list[str]) -> subprocess.CompletedProcess[str]:
    """The service's `sh -c` entrypoint, run here with `then` in place of the image's command."""
    shell, flag, script, name = service["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    # docker-compose 1.x prints `$$` (compose's escape for a literal `$`) as it is.
    script = script.replace("$$", "$")
    return subprocess.run(
        ["sh", "-c", script, name, *then], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True
    )


def test_prometheus_entrypoint_writes_the_token_privately_or_refuses_to_start(monitoring: dict[str, Any]) -> None:
    service = monitoring["services"]["prometheus"]
    with tempfile.TemporaryDirectory() as directory:
        token_file = Path(directory) / "metrics-token"
        refused = entrypoint(service, {"GATEWAY_METRICS_TOKEN": "", "METRICS_TOKEN_FILE": str(token_file)}, ["true"])
        assert refused.returncode == 1
        assert "set GATEWAY_METRICS_TOKEN in .env" in refused.stderr
        assert not token_file.exists()
        started = entrypoint(
            service, {"GATEWAY_METRICS_TOKEN": "tok3n", "METRICS_TOKEN_FILE": str(token_file)}, ["echo", "started"]
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout == "started\n", "then it becomes the image's command"
        assert token_file.read_text() == "tok3n", "no newline: Prometheus would send it"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_grafana_refuses_to_start_with_its_default_admin_password(monitoring: dict[str, Any]) -> None:
    service = monitoring["services"]["grafana"]
    assert service["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == MONITORING_ENV["GRAFANA_ADMIN_PASSWORD"]
    refused = entrypoint(service, {"GF_SECURITY_ADMIN_PASSWORD": ""}, ["true"])
    assert refused.returncode == 1
    assert "set GRAFANA_ADMIN_PASSWORD in .env" in refused.stderr
    started = entrypoint(service, {"GF_SECURITY_ADMIN_PASSWORD": "x"}, ["echo", "started"])
    assert started.stdout == "started\n"
