"""Plain manifests (kustomize base + overlays): valid, and equivalent to the chart's defaults."""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType
from typing import Any

import pytest
from k8s_support import ROOT, Obj, env_of, helm_template, ident, kustomize, pod_spec, schema_errors

K8S = ROOT / "k8s"
DIRS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}


def load_generator() -> ModuleType:
    path = ROOT / "helm" / "tools" / "render_k8s_base.py"
    spec = importlib.util.spec_from_file_location("render_k8s_base", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", DIRS)
def test_kustomize_output_validates_strictly(name: str) -> None:
    objs = kustomize(DIRS[name])
    errors = [err for obj in objs for err in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_base_is_in_sync_with_chart(helm: str) -> None:
    generator = load_generator()
    for name, text in generator.render(helm).items():
        current = (K8S / "base" / name).read_text()
        assert current == text, f"k8s/base/{name} is stale: run `make k8s-sync`"


def unhashed(obj: Obj) -> str:
    """A generated ConfigMap's name without the hash of its data kustomize appends."""
    name = obj["metadata"]["name"]
    return re.sub(r"-[a-z0-9]{10}$", "", name) if obj["kind"] == "ConfigMap" else name


def config_map_ref(objs: list[Obj]) -> str:
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    (source,) = deploy["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    return source["configMapRef"]["name"]


def workload_view(obj: Obj) -> dict[str, Any]:
    """What must agree between the chart and the base for one object."""
    view: dict[str, Any] = {"kind": obj["kind"], "name": unhashed(obj)}
    if obj["kind"] == "ConfigMap":
        view["data"] = obj["data"]
    spec = pod_spec(obj)
    if spec is None:
        return view
    view["podSecurityContext"] = spec.get("securityContext")
    view["grace"] = spec.get("terminationGracePeriodSeconds")
    view["containers"] = [
        {
            "name": c["name"],
            "image": c["image"],
            "probes": [c.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe")],
            "resources": c.get("resources"),
            "securityContext": c.get("securityContext"),
            "env": env_of(c),
        }
        for c in spec["containers"]
    ]
    return view


def test_base_matches_helm_defaults(helm: str) -> None:
    """Independent of the generator: same kinds, names, images, probes, resources, security."""
    chart = sorted(
        (
            workload_view(o)
            for o in helm_template(helm)
            if "helm.sh/hook" not in o["metadata"].get("annotations", {})
        ),
        key=lambda v: (v["kind"], v["name"]),
    )
    base = sorted(
        (workload_view(o) for o in kustomize(DIRS["base"])), key=lambda v: (v["kind"], v["name"])
    )
    assert base == chart


def test_base_has_no_helm_leftovers() -> None:
    for obj in kustomize(DIRS["base"]):
        labels = obj["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels, ident(obj)
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", ident(obj)


@pytest.mark.parametrize(
    ("name", "namespace", "workers", "min_replicas"),
    [("dev", "podserve-dev", "1", 1), ("prod", "podserve", "4", 3)],
)
def test_overlays(name: str, namespace: str, workers: str, min_replicas: int) -> None:
    objs = kustomize(DIRS[name])
    assert {o["metadata"].get("namespace") for o in objs} == {namespace}
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    server = deploy["spec"]["template"]["spec"]["containers"][0]
    assert env_of(server)["PODSERVE_WORKERS"] == workers
    hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == min_replicas
    # Overlays must not change what selects the pods (immutable on a live Deployment).
    base_deploy = next(o for o in kustomize(DIRS["base"]) if o["kind"] == "Deployment")
    assert deploy["spec"]["selector"] == base_deploy["spec"]["selector"]


def test_an_overlay_setting_rolls_the_pods() -> None:
    """kubectl apply -k changes the pod template only if something in it changes: the
    settings' ConfigMap is generated with a hash of its data in its name, so a setting an
    overlay merges in renames it, and the Deployment's reference with it."""
    base, dev = kustomize(DIRS["base"]), kustomize(DIRS["dev"])
    names = {}
    for label, objs in (("base", base), ("dev", dev)):
        (config,) = [o for o in objs if o["kind"] == "ConfigMap" and unhashed(o) == "podserve"]
        assert config_map_ref(objs) == config["metadata"]["name"] != "podserve", label
        names[label] = config["metadata"]["name"]
        if label == "dev":  # merged into the base's settings, not replacing them
            assert config["data"]["PODSERVE_LOG_LEVEL"] == "debug"
            assert config["data"]["PODSERVE_MAX_QUEUE_ROWS"] == "256"
    assert names["base"] != names["dev"]
