"""The Helm chart: lint, render a matrix of value sets, validate every object strictly."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_support import (
    CHART,
    VALUE_SETS,
    Obj,
    helm_template,
    ident,
    k8s_versions,
    run,
    schema_errors,
)


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {[ident(o) for o in objs]}"
    return found[0]


def server_container(objs: list[Obj]) -> Obj:
    deploy = one(objs, "Deployment", "podserve")
    return next(
        c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
    )


def env_map(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container["env"]}


def test_helm_is_v3(helm: str) -> None:
    out = run([helm, "version", "--short"]).stdout
    assert out.startswith("v3."), out


def test_validation_covers_129_to_newest() -> None:
    versions = k8s_versions()
    assert versions[0].startswith("v1.29."), versions
    assert len(versions) >= 2, versions


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(helm: str, name: str) -> None:
    values = VALUE_SETS[name]
    cmd = [helm, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_validate_strictly(helm: str, name: str) -> None:
    objs = helm_template(helm, VALUE_SETS[name])
    assert objs
    errors = [err for obj in objs for err in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_misspelled_fields(helm: str) -> None:
    """The validator must catch typos, or the check above proves nothing."""
    deploy = one(helm_template(helm), "Deployment", "podserve")
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert any("readinessProbes" in e for e in schema_errors(bad))
    bad = copy.deepcopy(deploy)
    bad["spec"]["replicas"] = "two"
    assert schema_errors(bad)


def test_crd_schemas_reject_bad_objects(helm: str) -> None:
    keda = helm_template(helm, VALUE_SETS["keda"])
    scaled = one(keda, "ScaledObject", "podserve")
    bad = copy.deepcopy(scaled)
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 32  # KEDA wants strings
    assert schema_errors(bad)
    bad = copy.deepcopy(scaled)
    bad["spec"]["minReplicas"] = 1  # HPA spelling, not KEDA's
    assert schema_errors(bad)
    monitor = one(
        helm_template(helm, VALUE_SETS["custom-metric-hpa"]), "ServiceMonitor", "podserve"
    )
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    assert schema_errors(bad)
    rule = one(helm_template(helm, VALUE_SETS["custom-metric-hpa"]), "PrometheusRule", "podserve")
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["for"] = 300  # a duration string, not seconds
    assert schema_errors(bad)
    bad = copy.deepcopy(rule)
    del bad["spec"]["groups"][0]["rules"][0]["alert"]  # neither alert nor record
    assert schema_errors(bad)


def test_defaults_render_core_objects(helm: str) -> None:
    objs = helm_template(helm)
    kinds = {o["kind"] for o in objs}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    sa = one(objs, "ServiceAccount", "podserve")
    assert sa["automountServiceAccountToken"] is False
    hpa = one(objs, "HorizontalPodAutoscaler", "podserve")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    deploy = one(objs, "Deployment", "podserve")
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    keys = {
        c["topologyKey"] for c in deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    }
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    env = env_map(server_container(objs))
    assert env["PODSERVE_HOST"]["value"] == "0.0.0.0"
    assert env["PODSERVE_WORKERS"]["value"] == "2"
    assert (
        env["PROMETHEUS_MULTIPROC_DIR"]["value"]
        == env["PODSERVE_PROMETHEUS_MULTIPROC_DIR"]["value"]
    )
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "PODSERVE_DATABASE_URL" not in env


def test_recycling_settings_reach_the_pod(helm: str) -> None:
    """The drain grace is passed on; the accept-queue sysctl is set only when asked for."""
    objs = helm_template(helm)
    config = one(objs, "ConfigMap", "podserve")["data"]
    assert config["PODSERVE_DRAIN_IDLE_GRACE_S"] == "0.5"
    assert config["PODSERVE_MAX_REQUESTS"] == "0"
    assert config["PODSERVE_RECYCLE_MAX_WAIT_S"] == "120"
    pod = one(objs, "Deployment", "podserve")["spec"]["template"]["spec"]
    assert "sysctls" not in pod["securityContext"]  # an unsafe sysctl: the kubelet must allow it
    objs = helm_template(helm, VALUE_SETS["recycling"])
    config = one(objs, "ConfigMap", "podserve")["data"]
    recycling = ["PODSERVE_MAX_REQUESTS", "PODSERVE_DRAIN_IDLE_GRACE_S"]
    recycling.append("PODSERVE_RECYCLE_MAX_WAIT_S")
    assert [config[name] for name in recycling] == ["20000", "1", "300"]
    pod = one(objs, "Deployment", "podserve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.tcp_migrate_req", "value": "1"}]
    assert pod["securityContext"]["runAsNonRoot"] is True  # the rest of it unchanged


def test_probes_use_health_endpoints(helm: str) -> None:
    server = server_container(helm_template(helm))
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, (
        "too short for model warm-up"
    )


def test_writable_paths_are_mounted(helm: str) -> None:
    server = server_container(helm_template(helm))
    env = env_map(server)
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    for name in ("PODSERVE_SPOOL_DIR", "PODSERVE_PROMETHEUS_MULTIPROC_DIR"):
        assert env[name]["value"] in mounts, name
    assert "/tmp" in mounts


@pytest.mark.parametrize(
    ("cpu", "workers", "memory"),
    [("500m", "1", "512Mi"), ("1500m", "2", "832Mi"), ("3", "3", "1152Mi"), ("2.5", "3", "1152Mi")],
)
def test_workers_and_memory_follow_cpu_limit(
    helm: str, cpu: str, workers: str, memory: str
) -> None:
    objs = helm_template(
        helm, sets=(f"resources.limits.cpu={cpu}", f"resources.requests.cpu={cpu}")
    )
    server = server_container(objs)
    assert env_map(server)["PODSERVE_WORKERS"]["value"] == workers
    assert server["resources"]["limits"]["memory"] == memory  # 192Mi + workers x 320Mi


def test_custom_metric_hpa(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["custom-metric-hpa"])
    hpa = one(objs, "HorizontalPodAutoscaler", "podserve")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "podserve_inflight_requests"},
            "target": {"type": "AverageValue", "averageValue": "6"},
        }
    ]
    assert {"scaleUp", "scaleDown"} <= set(hpa["spec"]["behavior"])
    monitor = one(objs, "ServiceMonitor", "podserve")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_keda_replaces_hpa(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["keda"])
    assert not by_kind(objs, "HorizontalPodAutoscaler")
    scaled = one(objs, "ScaledObject", "podserve")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(podserve_queue_rows{")
    assert trigger["metadata"]["threshold"] == "32"
    assert "behavior" in scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert env_map(server_container(objs))["PODSERVE_WORKERS"]["value"] == "2"  # ceil(1500m)


def test_tracing_goes_through_collector_to_jaeger(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["tracing"])
    env = env_map(server_container(objs))
    assert env["PODSERVE_TRACING_ENABLED"]["value"] == "true"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://podserve-otel-collector:4318"
    for name in (
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    ):
        assert env[name]["value"], name
    attrs = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert "k8s.pod.name=$(POD_NAME)" in attrs and "deployment.environment=dev" in attrs
    names = list(env)
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(VAR) needs order"
    config = yaml.safe_load(
        one(objs, "ConfigMap", "podserve-otel-collector")["data"]["config.yaml"]
    )
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "podserve-jaeger:4317"
    ports = {p["port"] for p in one(objs, "Service", "podserve-jaeger")["spec"]["ports"]}
    assert {16686, 4317, 4318} <= ports


def test_model_configs_mounted_per_model(helm: str) -> None:
    from podserve.model_config import ModelConfig  # the server's own parser

    objs = helm_template(helm, VALUE_SETS["tracing"])
    data = one(objs, "ConfigMap", "podserve-models")["data"]
    assert set(data) == {"tabular.yaml"}
    config = ModelConfig.model_validate(yaml.safe_load(data["tabular.yaml"]))
    assert config.max_batch_size == 64
    mount = next(m for m in server_container(objs)["volumeMounts"] if m["name"] == "model-configs")
    assert mount == {
        "name": "model-configs",
        "mountPath": "/models/tabular/config.yaml",
        "subPath": "tabular.yaml",
        "readOnly": True,
    }


def test_database_and_migration_hook(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["database"])
    url = env_map(server_container(objs))["PODSERVE_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "podserve-db", "key": "url"}
    job = one(objs, "Job", "podserve-migrate")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert hooks == ["pre-install", "pre-upgrade"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["podserve", "db", "migrate"]
    assert env_map(container)["PODSERVE_DATABASE_URL"] == url
    server = server_container(objs)
    assert env_map(server)["PODSERVE_API_KEYS_FILE"]["value"] == "/etc/podserve/auth/api-keys"
    models = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True and models["mountPath"] == "/models"


def test_ingress_and_network_policy(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["ingress-netpol"])
    ingress = one(objs, "Ingress", "podserve")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "podserve", "port": {"name": "http"}}
    policy = one(objs, "NetworkPolicy", "podserve")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 5432, 4318} <= egress_ports
    deploy = one(objs, "Deployment", "podserve")
    assert deploy["spec"]["replicas"] == 3
    assert env_map(server_container(objs))["PODSERVE_WORKERS"]["value"] == "4"


def test_locust_targets_service(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["locust"])
    master = one(objs, "Deployment", "podserve-locust-master")
    worker = one(objs, "Deployment", "podserve-locust-worker")
    args = master["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--host=http://podserve:8000" in args and "--master" in args
    worker_args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--master-host=podserve-locust-master" in worker_args
    assert worker["spec"]["replicas"] == 3
    locustfile = one(objs, "ConfigMap", "podserve-locustfile")["data"]["locustfile.py"]
    assert locustfile == (CHART / "files" / "locustfile.py").read_text()
    compile(locustfile, "locustfile.py", "exec")


def test_helm_test_pod_runs_inference(helm: str) -> None:
    pod = one(helm_template(helm), "Pod", "podserve-test-inference")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    script = container["args"][0]
    compile(script, "helm-test", "exec")
    assert "/v2/health/ready" in script and "/infer" in script
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TARGET"] == "http://podserve:8000" and env["MODEL"] == "tabular"


def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (install needs a cluster, template skips NOTES):
    a copy of the chart wraps the notes into a ConfigMap that `helm template` renders."""
    chart = tmp_path / "podserve"
    shutil.copytree(CHART, chart)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | quote }}\n'
    )
    proc = run(
        [
            helm,
            "template",
            "podserve",
            str(chart),
            "--namespace",
            "podserve",
            "--show-only",
            "templates/zz-notes.yaml",
            *args,
        ]
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_render(helm: str, tmp_path: Path) -> None:
    notes = render_notes(
        helm, tmp_path, "-f", str(VALUE_SETS["tracing"]), "--set", "locust.enabled=true"
    )
    assert "port-forward svc/podserve 8000:8000" in notes
    assert "svc/podserve-jaeger 16686:16686" in notes
    assert "svc/podserve-locust-master 8089:8089" in notes
    assert "Gunicorn workers per pod: 2" in notes


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("database.enabled=true",), "database.existingSecret"),
        (("autoscaling.cpu.enabled=false",), "autoscaling.cpu.enabled or"),
        (("autoscaling.minReplicas=5", "autoscaling.maxReplicas=3"), "must not exceed"),
        (("server.gracefulTimeoutSeconds=6", "server.drainIdleGraceSeconds=4"), "shorter than"),
        (("server.gracefulTimeoutSeconds=2", "server.drainIdleGraceSeconds=1"), "shorter than"),
    ],
)
def test_cross_field_checks(helm: str, sets: tuple[str, ...], message: str) -> None:
    cmd = [helm, "template", "podserve", str(CHART)]
    for item in sets:
        cmd += ["--set", item]
    proc = run(cmd)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


BAD_VALUES = sorted((Path(__file__).parent / "bad_values").glob("*.yaml"))


def test_bad_values_exist() -> None:
    assert len(BAD_VALUES) >= 5


@pytest.mark.parametrize("path", BAD_VALUES, ids=lambda p: p.stem)
def test_schema_rejects_bad_values(helm: str, path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    proc = run([helm, "template", "podserve", str(CHART), "-f", str(path)])
    assert proc.returncode != 0, f"{path.name} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert expected in proc.stderr, proc.stderr


# --- documentation -------------------------------------------------------------------------------


def values_leaves(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield path, value
            yield from values_leaves(value, path)
        else:
            yield path, value


def readme_values() -> dict[str, str]:
    """`key` -> `default` cells of the README's values table."""
    section = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `(.*?)` \| .+ \|$", section, re.MULTILINE)
    return dict(rows)


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = dict(values_leaves(values))
    documented = readme_values()
    assert documented, "no values table in README.md"
    stale = sorted(set(documented) - set(paths))
    assert not stale, f"README documents keys that do not exist: {stale}"
    missing = []
    for path, value in paths.items():
        if isinstance(value, dict) and value:
            continue  # documented through its leaves, or as a block
        ancestors = [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 2)]
        if not any(a in documented for a in ancestors):
            missing.append(path)
    assert not missing, f"values missing from README.md: {missing}"
    for key, default in documented.items():
        assert json.loads(default) == paths[key], f"README default of {key} is stale"
