"""deploy/prometheus and deploy/grafana: promtool checks, metric names, a real Prometheus.

promtool and prometheus come from Debian's ``prometheus`` package, which
``make`` installs (scripts/ensure-system-deps.sh).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from bridge.metrics import BridgeMetrics
from bridge.regions import RegionMetrics
from edge_agent.metrics import AgentMetrics
from fleet.stack import Stack, StackSettings
from pipeline.device_budget import throttled_counter
from pipeline.metrics import ApiMetrics, WorkerMetrics
from schemas.names import stream_key
from testrig.servers import ServerProcess, find_binary
from testrig.services import http_ok
from tests.helpers import wait_until_blocking

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "orders.json"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# Sample names each metric type exposes (prometheus-client's family name has no suffix).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
OUR_PREFIXES = ("bridge_", "pipeline_", "edge_")


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output is in the result for assertion messages."""
    return subprocess.run(
        [find_binary("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules(alerts: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in alerts["groups"] for rule in group["rules"] if "alert" in rule]


def exposed_sample_names() -> set[str]:
    """Every sample name our services' registries can expose, plus Prometheus's own ``up``."""
    geo = CollectorRegistry()
    RegionMetrics(geo)  # the bridge registers these in geo mode only
    budgets = CollectorRegistry()
    throttled_counter(budgets)  # the worker's health consumer and status-query responder
    registries = [
        budgets,
        BridgeMetrics().registry,
        geo,
        WorkerMetrics(CollectorRegistry()).registry,
        ApiMetrics(shards=1).registry,
        AgentMetrics().registry,
    ]
    names = {"up"}
    for registry in registries:
        assert registry is not None
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def referenced_metrics(expr: str) -> set[str]:
    """Our metric names (bridge_*, pipeline_*, edge_*) and ``up`` that a PromQL expression uses."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    identifiers = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_strings))
    return {name for name in identifiers if name.startswith(OUR_PREFIXES) or name == "up"}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


# --- promtool ---------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rule_file(tmp_path: Path) -> None:
    """`promtool check config` parses prometheus.yml and the alerts.yml it loads.

    promtool also opens the bearer-token file compose mounts at /run/secrets, so
    the check runs on a copy that points at a token file of its own.
    """
    secret = "/run/secrets/prometheus-read-token"
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert secret in config
    token = tmp_path / "prometheus-read-token"
    token.write_text("iotp_test\n")
    (tmp_path / "prometheus.yml").write_text(config.replace(secret, str(token)))
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    """`promtool check rules` parses every rule; the count is every alert we ship."""
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules(alerts))} rules found" in result.stdout


def test_every_alert_has_a_promtool_unit_test_that_passes() -> None:
    """alerts_test.yml expects each alert both silent and firing; `promtool test rules` agrees."""
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    cases = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for rule in alert_rules(alerts):
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']} never fires"
    silent = {check["alertname"] for check in checks if not check["exp_alerts"]}
    assert silent >= {"OrdersStreamLag", "BridgeNotReady", "BridgeRedisNotDurable"}
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The same unit tests fail against a lag rule whose threshold was raised tenfold."""
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    (lag,) = [rule for rule in alert_rules(alerts) if rule["alert"] == "OrdersStreamLag"]
    assert lag["expr"].endswith("> 1000")
    lag["expr"] = lag["expr"].replace("> 1000", "> 10000")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "OrdersStreamLag" in result.stdout + result.stderr


# --- metric names and the dashboard -----------------------------------------------------


def test_alerts_reference_only_metrics_our_code_exports() -> None:
    """Each alert expression names at least one metric, and each one exists in our registries."""
    known = exposed_sample_names()
    assert {"bridge_ready", "edge_outbox_oldest_pending_age_seconds", "pipeline_lag"} <= known
    for rule in alert_rules(load_yaml(PROMETHEUS_DIR / "alerts.yml")):
        used = referenced_metrics(rule["expr"])
        assert used, rule["alert"]
        assert used <= known, (rule["alert"], used - known)


def test_the_metric_name_check_notices_a_misspelt_metric() -> None:
    """The checker is not vacuous: a typo and a missing suffix are both unknown names."""
    known = exposed_sample_names()
    assert referenced_metrics('rate(bridge_acepted_total{job="bridge"}[1m])') - known
    assert referenced_metrics("rate(bridge_accepted[1m])") - known
    assert not referenced_metrics('rate(bridge_accepted_total{job="pipeline_x"}[1m])') - known


def test_dashboard_parses_and_queries_only_existing_metrics() -> None:
    """orders.json is a Grafana dashboard on the provisioned datasource, over our metrics."""
    dashboard = json.loads(DASHBOARD.read_text())
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert dashboard["uid"]
    assert dashboard["title"]
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    known = exposed_sample_names()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    for expr in exprs:
        used = referenced_metrics(expr)
        assert used, expr
        assert used <= known, (expr, used - known)
    covered = set().union(*(referenced_metrics(expr) for expr in exprs))
    assert {"pipeline_lag", "pipeline_dlq_size", "pipeline_dead_letters", "bridge_ready"} <= covered


# --- a real Prometheus against the `make stack` services -------------------------------


class PrometheusProcess(ServerProcess):
    """Debian's prometheus on a free loopback port, with its own TSDB directory."""

    name = "prometheus"

    def __init__(self, workdir: Path, config: Path) -> None:
        super().__init__(workdir)
        self.config = config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            find_binary("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def is_ready(self) -> bool:
        return http_ok(f"{self.url}/-/ready")

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]


def local_config(stack: Stack, workdir: Path, for_s: int) -> Path:
    """prometheus.yml with the stack's ports for its targets, 1 s intervals, and alerts.yml
    with every `for` shortened to ``for_s`` (expressions and thresholds stay as shipped)."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    alerts = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    shortened = copy.deepcopy(alerts)
    for rule in alert_rules(shortened):
        if "for" in rule:
            rule["for"] = f"{for_s}s"
    assert [{**r, "for": None} for r in alert_rules(shortened)] == [
        {**r, "for": None} for r in alert_rules(alerts)
    ]
    (workdir / "alerts.yml").write_text(yaml.safe_dump(shortened))
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    targets = {
        "bridge": [f"127.0.0.1:{bridge.port}" for bridge in stack.bridges],
        "pipeline": [f"127.0.0.1:{stack.pipeline.port}"],
    }
    jobs = config["scrape_configs"]
    assert {job["job_name"] for job in jobs} == set(targets)
    token = workdir / "prometheus-read-token"
    token.write_text("iotp_unused_on_a_loopback_api_without_tokens\n")
    for job in jobs:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        if "authorization" in job:  # compose's secret path; the stack's API runs without tokens
            job["authorization"]["credentials_file"] = str(token)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def proc_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (R running, S sleeping, T stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def firing(prometheus: PrometheusProcess, alertname: str) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = prometheus.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "stack", StackSettings(shards=2, bridges=2)) as running:
        yield running


def test_real_prometheus_fires_the_lag_alert_when_workers_stop(
    stack: Stack, tmp_path: Path
) -> None:
    """Prometheus scrapes both bridges and the pipeline; with the workers frozen and orders
    appended to shard 0, OrdersStreamLag fires for shard 0 (and only there), and clears
    once the workers resume."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    with PrometheusProcess(workdir, local_config(stack, workdir, for_s=2)) as prometheus:

        def all_targets_up() -> bool:
            targets = prometheus.api("targets")["activeTargets"]
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        wait_until_blocking(all_targets_up, 20, "every target up")
        # The group exists (the worker created it) and both bridges report ready.
        wait_until_blocking(
            lambda: len(prometheus.api("query?query=pipeline_lag")["result"]) == 2,
            15,
            "lag series for both shards",
        )
        ready = prometheus.api("query?query=bridge_ready")["result"]
        assert sorted(r["value"][1] for r in ready) == ["1", "1"]
        assert not firing(prometheus, "OrdersStreamLag")

        workers = stack.worker_pids()
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            # The fault really happened: each worker is stopped (state T).
            wait_until_blocking(
                lambda: all(proc_state(p) == "T" for p in workers), 5, "workers stopped"
            )
            with (
                redis.Redis.from_url(stack.redis_url) as client,
                client.pipeline(transaction=False) as pipe,
            ):
                for i in range(1500):
                    pipe.xadd(stream_key(0), {"order": f"lag-test-{i}"})
                pipe.execute()
            wait_until_blocking(
                lambda: bool(firing(prometheus, "OrdersStreamLag")), 30, "OrdersStreamLag firing"
            )
            (alert,) = firing(prometheus, "OrdersStreamLag")
            assert alert["labels"]["shard"] == "0"
            # A worker blocked in XREADGROUP before SIGSTOP is still handed the first entries
            # by Redis, so the lag is a little under 1500, still above the rule's 1000.
            assert 1000 < float(alert["value"]) <= 1500
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        wait_until_blocking(
            lambda: not firing(prometheus, "OrdersStreamLag"),
            30,
            "OrdersStreamLag resolved",
        )
