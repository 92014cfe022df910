"""The chart's alerting rules (templates/prometheusrule.yaml), checked with a real promtool.

promtool checks the rendered rules as Prometheus would load them and runs the unit tests in
prometheus/alerts_test.yaml over synthetic series: each alert fires when it should, after
its `for`, with the labels and annotations shown, and stays quiet on healthy traffic and on
another release's series. Mutated rules must fail those unit tests, so they can fail.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from k8s_support import ROOT, VALUE_SETS, Obj, helm_template, require_tool, run, schema_errors

HERE = Path(__file__).resolve().parent
UNIT_TESTS = HERE / "prometheus" / "alerts_test.yaml"
ENABLED = ("metrics.prometheusRule.enabled=true",)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Installed by `make tools` (helm/tools/install-promtool); its absence fails."""
    return require_tool("promtool", ROOT / ".tools" / "bin" / "promtool")


def rule_object(helm: str, *sets: str, values: Path | None = None) -> Obj:
    objs = helm_template(helm, values, sets=(*ENABLED, *sets))
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert len(rules) == 1, rules
    return rules[0]


def alerts(rule: Obj) -> dict[str, Obj]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def promtool_unit_tests(promtool: str, rule: Obj, where: Path) -> tuple[int, str]:
    """Write the rules as a Prometheus rule file next to a copy of the unit tests; run them."""
    (where / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    shutil.copy(UNIT_TESTS, where / UNIT_TESTS.name)
    proc = run([promtool, "test", "rules", str(where / UNIT_TESTS.name)])
    return proc.returncode, proc.stdout + proc.stderr


def test_no_rules_unless_asked(helm: str) -> None:
    kinds = {o["kind"] for o in helm_template(helm)}
    assert "PrometheusRule" not in kinds
    no_metrics = helm_template(helm, sets=(*ENABLED, "metrics.enabled=false"))
    assert "PrometheusRule" not in {o["kind"] for o in no_metrics}


def test_rules_load_in_prometheus_and_pass_their_unit_tests(
    helm: str, promtool: str, tmp_path: Path
) -> None:
    rule = rule_object(helm)
    assert not schema_errors(rule)
    (tmp_path / "check.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    check = run([promtool, "check", "rules", str(tmp_path / "check.yaml")])
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alerts(rule))} rules found" in check.stdout
    rc, output = promtool_unit_tests(promtool, rule, tmp_path)
    assert rc == 0, output


def _drop_service_matcher(expr: str) -> str:
    return expr.replace(', service="podserve"', "").replace('service="podserve", ', "")


MUTATIONS: dict[str, Callable[[str], str]] = {
    "selector leaks to other releases": _drop_service_matcher,
    "sheds and deadlines count as server errors": lambda e: e.replace(', status!~"503|504"', ""),
    "body-budget refusals are not shedding": lambda e: e.replace("shed|body_budget", "shed"),
    "every status counts as slow inference": lambda e: e.replace(', status="200"', ""),
    "every route counts as inference": lambda e: e.replace(', route=~".*/infer|.*:predict"', ""),
    "the worker count is off by one": lambda e: re.sub(r"< (\d+)$", lambda m: f"< {m[1]}1", e),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_unit_tests_catch_broken_rules(
    helm: str, promtool: str, tmp_path: Path, mutation: str
) -> None:
    rule = copy.deepcopy(rule_object(helm))
    changed = 0
    for entry in alerts(rule).values():
        mutated = MUTATIONS[mutation](entry["expr"])
        changed += mutated != entry["expr"]
        entry["expr"] = mutated
    assert changed, f"the mutation '{mutation}' no longer applies: update it with the rules"
    rc, output = promtool_unit_tests(promtool, rule, tmp_path)
    assert rc != 0 and "FAILED" in output, output


def _exported_sample_names() -> set[str]:
    """Sample names podserve's registry exports, from its own metric definitions."""
    from podserve.metrics import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def test_every_series_the_rules_read_is_exported(helm: str) -> None:
    exported = _exported_sample_names()
    read = {
        name
        for entry in alerts(rule_object(helm)).values()
        for name in re.findall(r"\b(podserve_[a-z0-9_]+)\{", entry["expr"])
    }
    assert len(read) >= 7, read
    assert read <= exported, f"rules read series podserve does not export: {read - exported}"


def test_thresholds_labels_and_selector_come_from_values(helm: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"  # numbers from a file: `--set` would pass strings
    values.write_text(
        "metrics:\n  prometheusRule:\n    serverErrorRatio: 0.2\n    latencyP99Seconds: 2.5\n"
    )
    rule = rule_object(
        helm,
        "metrics.prometheusRule.spoolingFor=30m",
        'metrics.prometheusRule.selector=job="serving"',
        "metrics.prometheusRule.alertLabels.team=ml",
        "resources.limits.cpu=4",
        "resources.requests.cpu=4",
        values=values,
    )
    by_name = alerts(rule)
    assert by_name["PodserveServerErrors"]["expr"].endswith("> 0.2")
    assert by_name["PodserveSlowInference"]["expr"].endswith("> 2.5")
    assert by_name["PodservePredictionLogSpooling"]["for"] == "30m"
    assert by_name["PodserveWorkersMissing"]["expr"] == 'podserve_workers{job="serving"} < 4'
    for name, entry in by_name.items():
        assert entry["labels"]["team"] == "ml", name
        assert entry["labels"]["severity"] in {"critical", "warning"}, name
        assert 'job="serving"' in entry["expr"] and "namespace=" not in entry["expr"], name
    monitored = helm_template(helm, VALUE_SETS["custom-metric-hpa"])  # the chart's CI values
    rule = next(o for o in monitored if o["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
