"""deploy/: Grafana and Prometheus files parse and query only metrics the code defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "creditgate.json"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "creditgate.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

METRIC_RE = re.compile(r"\bcreditgate_[a-z0-9_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metric_names_in_code() -> set[str]:
    """Every creditgate_* string literal in the packages, without Prometheus suffixes."""
    names: set[str] = set()
    literal = re.compile(r"[\"'](creditgate_[a-z0-9_]+)[\"']")
    for package in ("gateway_plugin", "admission", "creditservice"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(base_name(m) for m in literal.findall(path.read_text(encoding="utf-8")))
    return names


def exprs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(exprs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(exprs(item))
    return found


def test_dashboard_has_stable_uid_and_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] == "creditgate-overview"
    assert "__inputs" not in dash
    assert "${DS_" not in DASHBOARD.read_text(encoding="utf-8")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_metric_exists_in_the_code() -> None:
    known = metric_names_in_code()
    used = {
        base_name(m) for e in exprs(json.loads(DASHBOARD.read_text())) for m in METRIC_RE.findall(e)
    }
    assert used, "the dashboard queries no creditgate metric"
    assert used - known == set(), f"queried but defined nowhere: {sorted(used - known)}"


def test_dashboard_covers_the_observability_topics() -> None:
    used = {
        base_name(m) for e in exprs(json.loads(DASHBOARD.read_text())) for m in METRIC_RE.findall(e)
    }
    for required in (
        "creditgate_decisions",
        "creditgate_admission_duration_seconds",
        "creditgate_outbox_length",
        "creditgate_outbox_pending",
        "creditgate_outbox_oldest_pending_age_seconds",
        "creditgate_settle_batch_size",
        "creditgate_settle_events",
        "creditgate_settle_errors",
        "creditgate_cache_fills",
        "creditgate_lease_waits",
        "creditgate_lease_sync_rounds",
        "creditgate_lease_sync_duration_seconds",
    ):
        assert required in used, required


def test_grafana_provider_file() -> None:
    provider = yaml.safe_load(PROVIDER.read_text(encoding="utf-8"))
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"]


def test_prometheus_config_parses_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["creditgate-gateway"]["metrics_path"] == "/metrics"
    assert jobs["creditgate-gateway"]["static_configs"][0]["targets"]


def test_alert_rules_parse_and_cover_the_failure_modes() -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    known = metric_names_in_code()
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        used = {base_name(m) for m in METRIC_RE.findall(rule["expr"])}
        assert used and used <= known, (rule["alert"], used - known)
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    by_metric = {base_name(m) for r in alerts.values() for m in METRIC_RE.findall(r["expr"])}
    assert "creditgate_outbox_oldest_pending_age_seconds" in by_metric  # outbox lag
    assert "creditgate_settle_errors" in by_metric  # settle errors
    assert "creditgate_admission_duration_seconds" in by_metric  # admission latency
    assert "creditgate_decisions" in by_metric  # denials
    assert "creditgate_lease_sync_errors" in by_metric  # lease syncs failing
