"""The Grafana dashboard and the Collector config match what a running podserve exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from metrics_support import scrape
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "k8s" / "observability"
DASHBOARD = json.loads((ASSETS / "grafana-dashboard.json").read_text())
# Grafana's variables, replaced by what they stand for so that PromQL can parse the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": ".*", "$model": ".*"}
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*[a-zA-Z_]\w*\)$")


@pytest.fixture(scope="module")
def exported(model_repo: Path) -> Iterator[set[str]]:
    """Sample names of a real 2-worker server after traffic of every kind."""
    with ServerProcess(model_repo, workers=2, env={"PODSERVE_TRACING_ENABLED": "false"}) as proc:
        text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
        assert httpx.post(f"{proc.url}/v2/models/text/infer", json=text).status_code == 200
        deadline = {"x-podserve-timeout-ms": "0.001"}
        late = httpx.post(f"{proc.url}/v2/models/text/infer", json=text, headers=deadline)
        assert late.status_code == 504
        yield scrape(proc.url).names


def _expressions() -> Iterator[tuple[str, str]]:
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"unexpected variable query {query}"
            yield f"variable {variable['name']}", match[1]


def _metric_names(expr: str) -> set[str]:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_every_dashboard_query_uses_exported_metrics(exported: set[str]) -> None:
    used: set[str] = set()
    for title, expr in _expressions():
        names = _metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        missing = names - exported
        assert not missing, f"{title}: {sorted(missing)} not exported (query {expr})"
        used |= names
    # The views the issue asks for are there.
    for metric in ("podserve_requests_total", "podserve_request_duration_seconds_bucket",
                   "podserve_phase_duration_seconds_sum", "podserve_batch_size_bucket",
                   "podserve_queue_rows", "podserve_inflight_requests",
                   "podserve_rejections_total", "podserve_workers"):  # fmt: skip
        assert metric in used, metric


def test_a_misspelt_metric_or_broken_query_is_caught(exported: set[str]) -> None:
    """The check above can fail."""
    typo = 'sum(rate(podserve_request_total{namespace=~"$namespace"}[$__rate_interval]))'
    assert _metric_names(typo) - exported == {"podserve_request_total"}
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(podserve_requests_total[1m])")


def test_dashboard_layout_is_valid() -> None:
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for view in ("request rate", "errors", "p50 / p95 / p99", "per phase (stacked)",
                 "batch size", "queued rows", "in-flight", "shed", "replicas"):  # fmt: skip
        assert view in titles, view
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
    stacked = [p for p in panels if "stacked" in p["title"]]
    assert stacked[0]["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


def test_every_exported_metric_is_documented(exported: set[str]) -> None:
    readme = (ASSETS / "README.md").read_text()
    families = {re.sub(r"_(bucket|sum|count|created)$", "", name) for name in exported}
    podserve = {name for name in families if name.startswith("podserve_")}
    assert len(podserve) >= 19
    undocumented = {name for name in podserve if f"`{name}`" not in readme}
    assert not undocumented


def test_collector_pipelines_reference_defined_components() -> None:
    config = yaml.safe_load((ASSETS / "otel-collector-config.yaml").read_text())
    connectors = set(config.get("connectors", {}))
    pipelines = config["service"]["pipelines"]
    for name, pipeline in pipelines.items():
        assert set(pipeline["receivers"]) <= set(config["receivers"]) | connectors, name
        assert set(pipeline["exporters"]) <= set(config["exporters"]) | connectors, name
        assert set(pipeline.get("processors", [])) <= set(config["processors"]), name
        assert pipeline.get("processors", ["memory_limiter"])[0] == "memory_limiter", name
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    traces = pipelines["traces"]
    assert "otlp" in traces["receivers"]
    assert any(e.startswith("otlp") for e in traces["exporters"])  # Jaeger / Tempo
    assert any("prometheus" in p["exporters"] for p in pipelines.values())
    for connector in connectors:  # a connector joins two pipelines
        assert any(connector in p["exporters"] for p in pipelines.values())
        assert any(connector in p["receivers"] for p in pipelines.values())


def test_kustomization_renders_the_configmaps() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (see shared notes: it is preinstalled)"
    out = subprocess.run([kubectl, "kustomize", str(ASSETS)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out)}
    assert docs["podserve-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(docs["podserve-grafana-dashboard"]["data"]["podserve.json"]) == DASHBOARD
    collector = yaml.safe_load(docs["podserve-otel-collector"]["data"]["config.yaml"])
    assert "traces" in collector["service"]["pipelines"]
