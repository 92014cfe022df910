"""The Helm chart: lint, render a matrix of value sets, validate every object strictly."""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import sys
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
    helm_template_text,
    ident,
    k8s_versions,
    parse_cpu,
    parse_memory,
    pod_spec,
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


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    """A -f values file: its numbers reach the templates as float64, unlike --set's int64."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm_fails(helm: str, sets: tuple[str, ...]) -> str:
    """stderr of a `helm template` that must fail."""
    cmd = [helm, "template", "podserve", str(CHART)]
    for item in sets:
        cmd += ["--set", item]
    proc = run(cmd)
    assert proc.returncode != 0, f"{sets} rendered"
    return proc.stderr


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


def test_large_integers_from_a_values_file_stay_decimal(
    helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A values file's 1000000 is a float64 that templates print as "1e+06": the server's
    settings (and Kubernetes' integer fields) reject it, so every pod would crash-loop."""
    from podserve.settings import Settings  # the server's own parser

    uid = 1000680000  # an OpenShift namespace's UID range
    path = values_file(
        tmp_path,
        {
            "replicaCount": 1000000,
            "autoscaling": {"enabled": False},
            "server": {"maxRequests": 1000000, "workerTimeoutSeconds": 1000000},
            "inference": {
                "maxQueueRows": 1048576,
                "maxRowsPerRequest": 2000000,
                "maxBodyBytes": 104857600,
                "requestTimeoutMs": 1500000,
                "maxBatchDelayMs": 2.5,
            },
            "podSecurity": {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid},
            "database": {"enabled": True, "existingSecret": "db"},
            "migrations": {"activeDeadlineSeconds": 1000000},
            "locust": {"enabled": True, "users": 1000000},
        },
    )
    text = helm_template_text(helm, (str(path),), ())
    assert "e+" not in text, [line for line in text.splitlines() if "e+" in line]
    objs = helm_template(helm, path)
    config = one(objs, "ConfigMap", "podserve")["data"]
    assert config["PODSERVE_MAX_REQUESTS"] == "1000000"
    assert config["PODSERVE_MAX_QUEUE_ROWS"] == "1048576"
    assert config["PODSERVE_MAX_ROWS_PER_REQUEST"] == "2000000"
    assert config["PODSERVE_MAX_BODY_BYTES"] == "104857600"
    assert config["PODSERVE_REQUEST_TIMEOUT_MS"] == "1500000"
    assert config["PODSERVE_WORKER_TIMEOUT_S"] == "1000000"
    assert config["PODSERVE_MAX_BATCH_DELAY_MS"] == "2.5"  # fractions stay as they are
    server_env = {k: v["value"] for k, v in env_map(server_container(objs)).items() if "value" in v}
    for name, value in {**config, **server_env}.items():
        if name.startswith("PODSERVE_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.max_requests, settings.max_queue_rows) == (1000000, 1048576)
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            ids = {k: spec["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")}
            assert ids == {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}, ident(obj)
    assert one(objs, "Deployment", "podserve")["spec"]["replicas"] == 1000000
    assert one(objs, "Job", "podserve-migrate")["spec"]["activeDeadlineSeconds"] == 1000000
    master = one(objs, "Deployment", "podserve-locust-master")
    assert "--users=1000000" in master["spec"]["template"]["spec"]["containers"][0]["args"]
    errors = [err for obj in objs for err in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_numeric_image_tag_keeps_its_digits(helm: str, tmp_path: Path) -> None:
    """An unquoted tag of digits is a number (float64 from a file, int64 from --set)."""
    for objs in (
        helm_template(helm, values_file(tmp_path, {"image": {"tag": 20240501}})),
        helm_template(helm, sets=("image.tag=20240501",)),
    ):
        assert server_container(objs)["image"] == "podserve:20240501"


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


@pytest.mark.parametrize(
    ("sets", "requests", "limits"),
    [
        # An empty CPU request is the limit; memorySizing's 512Mi for one worker.
        (("resources.limits.cpu=1",), ("1", "512Mi"), ("1", "512Mi")),
        (("resources.limits.cpu=500m",), ("500m", "512Mi"), ("500m", "512Mi")),
        # The computed request (832Mi) is capped at a smaller limit, in any unit.
        (("resources.limits.memory=512Mi",), ("2", "512Mi"), ("2", "512Mi")),
        (("resources.limits.memory=0.5Gi",), ("2", "0.5Gi"), ("2", "0.5Gi")),
        (("resources.limits.memory=800M",), ("2", "800M"), ("2", "800M")),
        (("resources.limits.memory=1G",), ("2", "832Mi"), ("2", "1G")),  # 1G > 832Mi
        # The computed limit is raised to a larger request.
        (("resources.requests.memory=2Gi",), ("2", "2Gi"), ("2", "2Gi")),
        (("resources.requests.memory=512Mi",), ("2", "512Mi"), ("2", "832Mi")),
        # Requests the user set, equal to or below the limits, are kept as written.
        (
            ("resources.requests.cpu=250m", "resources.limits.cpu=1"),
            ("250m", "512Mi"),
            ("1", "512Mi"),
        ),
        (
            ("resources.requests.cpu=1.5", "resources.limits.cpu=1500m"),
            ("1.5", "832Mi"),
            ("1500m", "832Mi"),
        ),
        (
            ("resources.requests.memory=1G", "resources.limits.memory=1Gi"),
            ("2", "1G"),
            ("2", "1Gi"),
        ),
    ],
)
def test_requests_never_exceed_limits(
    helm: str, sets: tuple[str, ...], requests: tuple[str, str], limits: tuple[str, str]
) -> None:
    """The API server rejects a request above its limit ("must be less than or equal to")."""
    res = server_container(helm_template(helm, sets=sets))["resources"]
    assert (res["requests"]["cpu"], res["requests"]["memory"]) == requests
    assert (res["limits"]["cpu"], res["limits"]["memory"]) == limits
    assert parse_cpu(res["requests"]["cpu"]) <= parse_cpu(res["limits"]["cpu"])
    assert parse_memory(res["requests"]["memory"]) <= parse_memory(res["limits"]["memory"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("resources.limits.cpu=1", "resources.requests.cpu=2"), "resources.requests.cpu (2)"),
        (("resources.limits.cpu=1500m", "resources.requests.cpu=1.6"), "(1.6) must not exceed"),
        (("resources.limits.cpu=1.5", "resources.requests.cpu=1501m"), "(1501m) must not exceed"),
        (
            ("resources.limits.memory=1000Mi", "resources.requests.memory=1Gi"),
            "resources.requests.memory (1Gi) must not exceed resources.limits.memory (1000Mi)",
        ),
        (
            ("resources.limits.memory=1G", "resources.requests.memory=1.5G"),
            "resources.requests.memory (1.5G) must not exceed",
        ),
    ],
)
def test_request_set_above_its_limit_fails(helm: str, sets: tuple[str, ...], message: str) -> None:
    assert message in helm_fails(helm, sets)


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


KEDA_CUSTOM = ("autoscaling.engine=keda", "autoscaling.customMetric.enabled=true")


@pytest.mark.parametrize(
    ("target", "threshold"),
    [("500m", "0.5"), ("1500m", "1.5"), ("2.5m", "0.0025"), ("8", "8"), ("2.5", "2.5")],
)
def test_keda_threshold_is_a_plain_number(helm: str, target: str, threshold: str) -> None:
    """KEDA's Prometheus scaler parses the threshold as a float: "500m" fails there."""
    sets = (*KEDA_CUSTOM, f"autoscaling.customMetric.inflightTarget={target}")
    scaled = one(helm_template(helm, sets=sets), "ScaledObject", "podserve")
    (trigger,) = scaled["spec"]["triggers"][1:]
    assert trigger["metadata"]["threshold"] == threshold
    # The HPA's averageValue is a quantity: the millivalue stays.
    hpa_sets = ("autoscaling.customMetric.enabled=true", sets[-1])
    hpa = one(helm_template(helm, sets=hpa_sets), "HorizontalPodAutoscaler", "podserve")
    assert hpa["spec"]["metrics"][1]["pods"]["target"]["averageValue"] == target


def k8s_pod_name(deployment: str, template_hash: str, suffix: str = "x7k2q") -> str:
    """A Deployment's pod name as Kubernetes makes it: its ReplicaSet <deployment>-<hash>, plus
    "-", cut to 58 characters by the API server's name generator, plus 5 random characters."""
    return f"{deployment}-{template_hash}-"[:58] + suffix


@pytest.mark.parametrize("fullname", ["podserve", "p" * 47, "p" * 52, "p" * 57, "p" * 63])
def test_keda_query_sums_only_this_deployments_pods(helm: str, fullname: str) -> None:
    sets = KEDA_CUSTOM + (() if fullname == "podserve" else (f"fullnameOverride={fullname}",))
    scaled = one(helm_template(helm, sets=sets), "ScaledObject", fullname)
    query = scaled["spec"]["triggers"][1]["metadata"]["query"]
    assert query.startswith('sum(podserve_inflight_requests{namespace="podserve",pod=~"'), query
    quoted = re.search(r'pod=~("(?:[^"\\]|\\.)*")', query)
    assert quoted, query
    pattern = re.compile(json.loads(quoted[1]))  # PromQL anchors the regex: fullmatch
    # pod-template-hash: 1 to 10 characters of Kubernetes' vowel-free alphabet.
    hashes = ["6b7c9d5f48", "5d8f9c7b4", "b"]
    for template_hash in hashes:
        name = k8s_pod_name(fullname, template_hash)
        assert pattern.fullmatch(name), (name, pattern.pattern)
    others = [f"{fullname}-canary", f"{fullname}-v2", f"{fullname}-locust-master"]
    if len(fullname) < 57:  # else all are cut to "<fullname>-": no name tells them apart
        for deployment in others:
            for template_hash in hashes:
                name = k8s_pod_name(deployment, template_hash)
                assert not pattern.fullmatch(name), (name, pattern.pattern)


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
    assert config.labels == {"probabilities": "labels.txt"}  # the schema once refused labels
    mount = next(m for m in server_container(objs)["volumeMounts"] if m["name"] == "model-configs")
    assert mount == {
        "name": "model-configs",
        "mountPath": "/models/tabular/config.yaml",
        "subPath": "tabular.yaml",
        "readOnly": True,
    }


def test_the_schemas_model_config_keys_are_the_servers() -> None:
    """The chart's schema lists the keys of a model's config.yaml by hand (extra keys are
    refused there as in the server): a key the server gained but the schema lacks makes
    `modelConfigs` refuse a valid config (it once refused labels)."""
    from podserve.model_config import ModelConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["definitions"]["modelConfig"]["properties"]) == set(ModelConfig.model_fields)


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


def test_the_migration_job_has_its_own_network_policy(helm: str) -> None:
    """A hook like the Job, created before it: the server's policy selects only the server
    pods, and hooks run before the chart's other objects exist (default-deny namespaces)."""
    sets = ("networkPolicy.enabled=true", "database.port=6432")
    objs = helm_template(helm, VALUE_SETS["database"], sets=sets)
    policy = one(objs, "NetworkPolicy", "podserve-migrate")
    job = one(objs, "Job", "podserve-migrate")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    server = one(objs, "Deployment", "podserve")["spec"]["template"]["metadata"]["labels"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= server.items()
    egress = {(p["port"], p["protocol"]) for r in policy["spec"]["egress"] for p in r["ports"]}
    assert egress == {(53, "UDP"), (53, "TCP"), (6432, "TCP")}
    assert "ingress" not in policy["spec"]  # nothing may connect to the Job
    hook, job_hook = policy["metadata"]["annotations"], job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == job_hook["helm.sh/hook"]
    assert int(hook["helm.sh/hook-weight"]) < int(job_hook["helm.sh/hook-weight"])
    assert "hook-succeeded" in hook["helm.sh/hook-delete-policy"]
    # No database, no migration Job, no policy for it.
    plain = helm_template(helm, sets=("networkPolicy.enabled=true",))
    assert [o for o in plain if o["metadata"]["name"] == "podserve-migrate"] == []


@pytest.mark.parametrize(
    ("sets", "ports"),
    [
        (("tracing.endpoint=https://otlp.example.com",), {443}),
        (("tracing.endpoint=http://collector.observability",), {80}),
        (("tracing.endpoint=https://otlp.example.com:4443/otlp",), {4443}),
        (("tracing.endpoint=http://otel-collector.observability:4318",), {4318}),
        (("otelCollector.enabled=true",), {4318}),  # the bundled collector
        # No endpoint: the SDK's default, localhost:4318, which no NetworkPolicy filters.
        ((), set()),
    ],
)
def test_network_policy_opens_the_otlp_endpoint_port(
    helm: str, sets: tuple[str, ...], ports: set[int]
) -> None:
    sets = ("networkPolicy.enabled=true", "tracing.enabled=true", *sets)
    policy = one(helm_template(helm, sets=sets), "NetworkPolicy", "podserve")
    egress = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} - {53}
    assert egress == ports


def test_locust_targets_service(helm: str) -> None:
    objs = helm_template(helm, VALUE_SETS["locust"])
    master = one(objs, "Deployment", "podserve-locust-master")
    worker = one(objs, "Deployment", "podserve-locust-worker")
    args = master["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--host=http://podserve:8000" in args and "--master" in args
    worker_args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--master-host=podserve-locust-master" in worker_args
    assert worker["spec"]["replicas"] == 3
    for deployment in (master, worker):  # the master shares users out by the same weights
        env = env_map(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["LOCUST_WEIGHTS"]["value"] == "tabular=4,text=2,v1=1,entity=1,jobs=0"
    locustfile = one(objs, "ConfigMap", "podserve-locustfile")["data"]["locustfile.py"]
    assert locustfile == (CHART / "files" / "locustfile.py").read_text()
    # The project's scenarios, kept as a copy (Helm packages no file outside the chart).
    assert locustfile == (CHART.parent.parent / "loadtests" / "locustfile.py").read_text()
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
        (("storage.spoolExistingClaim=spool",), "must be a ReadWriteMany volume"),
        (
            ("storage.spoolExistingClaim=spool", "autoscaling.enabled=false", "replicaCount=2"),
            "(up to 2)",
        ),
    ],
)
def test_cross_field_checks(helm: str, sets: tuple[str, ...], message: str) -> None:
    cmd = [helm, "template", "podserve", str(CHART)]
    for item in sets:
        cmd += ["--set", item]
    proc = run(cmd)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "sets",
    [
        ("storage.spoolClaimShared=true",),  # ReadWriteMany: any number of pods
        ("autoscaling.enabled=false", "replicaCount=1"),  # one pod: ReadWriteOnce will do
    ],
)
def test_a_spool_claim_every_pod_can_mount(helm: str, sets: tuple[str, ...]) -> None:
    objs = helm_template(helm, sets=("storage.spoolExistingClaim=spool", *sets))
    volumes = one(objs, "Deployment", "podserve")["spec"]["template"]["spec"]["volumes"]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]
    assert claims == ["spool"]


def test_listening_address_is_a_value(helm: str) -> None:
    """0.0.0.0 by default; "::" for IPv6-only clusters, where the kubelet probes over IPv6."""
    for sets, host in (((), "0.0.0.0"), (("server.host=::",), "::")):
        pod = one(helm_template(helm, sets=sets), "Deployment", "podserve")["spec"]["template"]
        assert env_map(pod["spec"]["containers"][0])["PODSERVE_HOST"]["value"] == host


@pytest.mark.parametrize(
    "host", ["0.0.0.0:8080", "http://0.0.0.0", "[::1]", "10.0.0.256", "pod local", "fe80::1%eth0"]
)
def test_listening_address_without_port_or_scheme(helm: str, host: str) -> None:
    """The server refuses these (PODSERVE_HOST): the chart rendered them, and pods crash-looped."""
    assert "server.host" in helm_fails(helm, (f"server.host={host}",))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "fd00::a:1", "10.1.2.3", "pod-1.local"])
def test_listening_addresses_the_server_takes_render(helm: str, host: str) -> None:
    pod = one(helm_template(helm, sets=(f"server.host={host}",)), "Deployment", "podserve")
    assert (
        env_map(pod["spec"]["template"]["spec"]["containers"][0])["PODSERVE_HOST"]["value"] == host
    )


@pytest.mark.parametrize("delay", ["60001", "60000.5", "100000"])
def test_batch_delay_above_the_servers_bound_fails(helm: str, delay: str) -> None:
    """The server exits on a PODSERVE_MAX_BATCH_DELAY_MS above 60000: the chart rendered it."""
    assert "maxBatchDelayMs" in helm_fails(helm, (f"inference.maxBatchDelayMs={delay}",))


@pytest.mark.parametrize("delay", ["60000", "60000.0", "59999.5", "0"])
def test_batch_delay_up_to_the_servers_bound_renders(helm: str, delay: str) -> None:
    config = one(
        helm_template(helm, sets=(f"inference.maxBatchDelayMs={delay}",)), "ConfigMap", "podserve"
    )
    assert config["data"]["PODSERVE_MAX_BATCH_DELAY_MS"] == delay


def test_set_passes_fractions_through(helm: str) -> None:
    """`--set x=1.5` reaches the chart as the string "1.5"; the schema took only numbers."""
    sets = (
        "server.gracefulTimeoutSeconds=30.5",
        "server.drainIdleGraceSeconds=2.5",
        "inference.maxBatchDelayMs=0.5",
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.shedRatio=0.02",
        "locust.enabled=true",
        "locust.spawnRate=0.5",
    )
    objs = helm_template(helm, sets=sets)
    config = one(objs, "ConfigMap", "podserve")["data"]
    assert config["PODSERVE_MAX_BATCH_DELAY_MS"] == "0.5"
    assert config["PODSERVE_DRAIN_IDLE_GRACE_S"] == "2.5"
    pod = one(objs, "Deployment", "podserve")["spec"]["template"]["spec"]
    env = env_map(pod["containers"][0])
    assert env["PODSERVE_GRACEFUL_TIMEOUT_S"]["value"] == "30.5"
    assert pod["terminationGracePeriodSeconds"] == 5 + 31 + 10  # preStop + ceil(30.5) + margin
    rules = one(objs, "PrometheusRule", "podserve")["spec"]["groups"][0]["rules"]
    (shedding,) = [rule for rule in rules if rule["alert"] == "PodserveShedding"]
    assert shedding["expr"].rstrip().endswith("> 0.02")
    master = one(objs, "Deployment", "podserve-locust-master")
    assert "--spawn-rate=0.5" in master["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("server.drainIdleGraceSeconds=10.5", "at least 0 and at most 10, got 10.5"),
        ("server.gracefulTimeoutSeconds=1.0", "gracefulTimeoutSeconds must be above 1"),
        ("server.keepaliveSeconds=0.0", "keepaliveSeconds must be above 0"),
        ("metrics.prometheusRule.shedRatio=1.5", "shedRatio must be above 0 and at most 1"),
        ("locust.spawnRate=0.0", "spawnRate must be above 0"),
        ("server.keepaliveSeconds=1.5s", "keepaliveSeconds"),  # the schema: not a number
        ("inference.maxBatchDelayMs=-0.5", "maxBatchDelayMs"),
    ],
)
def test_set_fractions_keep_their_bounds(helm: str, item: str, message: str) -> None:
    assert message in helm_fails(helm, (item,))


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


def locust_master_args(objs: list[Obj]) -> list[str]:
    master = one(objs, "Deployment", "podserve-locust-master")
    return master["spec"]["template"]["spec"]["containers"][0]["args"]


def test_locust_autostart_waits_for_every_worker(helm: str) -> None:
    """With autostart the master starts once all `workers` are connected (else the first
    worker gets every user and later ones none) and rebalances when one reconnects."""
    args = locust_master_args(helm_template(helm, VALUE_SETS["locust"]))  # autostart, 3 workers
    assert {"--autostart", "--expect-workers=3", "--enable-rebalancing"} <= set(args), args
    # The flags exist in Locust (this venv's; the chart's image, 2.32.4, has them as well:
    # --expect-workers since 1.x, --enable-rebalancing since 2.0).
    usage = run([sys.executable, "-m", "locust", "--help"]).stdout
    for flag in (arg.split("=")[0] for arg in args):
        assert re.search(rf"\s{re.escape(flag)}\b", usage), flag
    manual = locust_master_args(
        helm_template(helm, VALUE_SETS["locust"], sets=("locust.autostart=false",))
    )
    assert not {"--autostart", "--expect-workers=3", "--enable-rebalancing"} & set(manual)


def locustfile_default_weights() -> dict[str, int]:
    tree = ast.parse((CHART / "files" / "locustfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "DEFAULT_WEIGHTS":
            return ast.literal_eval(node.value)
    raise AssertionError("no DEFAULT_WEIGHTS in the locustfile")


@pytest.mark.parametrize(
    "weights", ["bogus=1", "tabular=4\\,Text=2", "tabular=-1", "tabular=1.5", "tabular"]
)
def test_locust_weights_schema_knows_the_class_names(helm: str, weights: str) -> None:
    stderr = helm_fails(helm, ("locust.enabled=true", f"locust.weights={weights}"))
    assert "locust.weights: Does not match pattern" in stderr, stderr


def test_locust_weights_all_zero_are_refused(helm: str) -> None:
    """Unset classes keep the locustfile's defaults: zero only those and nothing runs."""
    defaults = locustfile_default_weights()  # read, not imported: locust patches with gevent
    zeroed = "\\,".join(f"{name}=0" for name, weight in defaults.items() if weight)
    stderr = helm_fails(helm, ("locust.enabled=true", f"locust.weights={zeroed}"))
    assert "leaves every user class at weight 0" in stderr, stderr
    # One class left at its default weight is enough to run.
    kept = zeroed.split("\\,", 1)[1]
    objs = helm_template(helm, sets=("locust.enabled=true", f"locust.weights={kept}"))
    one(objs, "Deployment", "podserve-locust-master")


def test_locust_weights_set_with_escaped_commas(helm: str) -> None:
    sets = ("locust.enabled=true", "locust.weights=tabular=4\\,text=2\\,jobs=0\\,entity=1")
    objs = helm_template(helm, sets=sets)
    for name in ("podserve-locust-master", "podserve-locust-worker"):
        container = one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert env_map(container)["LOCUST_WEIGHTS"]["value"] == "tabular=4,text=2,jobs=0,entity=1"
