"""Helpers for the Kubernetes bundle tests: rendering, schema validation and policy checks."""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "podserve"
CI_VALUES = CHART / "ci"
HERE = Path(__file__).resolve().parent
RELEASE = "podserve"
MIN_K8S = (1, 29)

# Value sets the chart must render and validate with: name -> values file (None = defaults).
VALUE_SETS: dict[str, Path | None] = {
    "defaults": None,
    "custom-metric-hpa": CI_VALUES / "custom-metric-hpa-values.yaml",
    "keda": CI_VALUES / "keda-values.yaml",
    "tracing": CI_VALUES / "tracing-values.yaml",
    "database": CI_VALUES / "database-values.yaml",
    "recycling": CI_VALUES / "recycling-values.yaml",
    "ingress-netpol": CI_VALUES / "ingress-netpol-values.yaml",
    "locust": CI_VALUES / "locust-values.yaml",
}

Obj = dict[str, Any]


# --- tools ------------------------------------------------------------------------------------


def find_tool(name: str, *fallbacks: Path) -> str | None:
    """A tool from PATH, else from the project's .tools install locations."""
    found = shutil.which(name)
    if found:
        return found
    return next((str(p) for p in fallbacks if p.is_file()), None)


def require_tool(name: str, *fallbacks: Path) -> str:
    """Fail (never skip) when a tool the project installs itself is missing."""
    path = find_tool(name, *fallbacks)
    if path is None:
        pytest.fail(
            f"`{name}` not found on PATH or in .tools/: run `make tools` first", pytrace=False
        )
    return path


def helm_binary() -> str:
    return require_tool("helm", ROOT / ".tools" / "bin" / "helm")


# --- rendering --------------------------------------------------------------------------------


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def load_docs(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def helm_template_text(helm: str, values: tuple[str, ...], sets: tuple[str, ...]) -> str:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", "podserve"]
    for path in values:
        cmd += ["-f", path]
    for item in sets:
        cmd += ["--set", item]
    proc = run(cmd)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed: {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def helm_template(helm: str, values: Path | None = None, sets: tuple[str, ...] = ()) -> list[Obj]:
    """Rendered objects (a fresh copy each call: tests may mutate them)."""
    return load_docs(helm_template_text(helm, (str(values),) if values else (), sets))


@functools.cache
def kustomize_text(path: str) -> str:
    kubectl = require_tool("kubectl")
    proc = run([kubectl, "kustomize", path])
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return proc.stdout


def kustomize(path: Path) -> list[Obj]:
    return load_docs(kustomize_text(str(path)))


def ident(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --- schema validation ------------------------------------------------------------------------

_SCHEMAS = resources.files("kubernetes_validate") / "kubernetes-json-schema"


def k8s_versions() -> list[str]:
    """Every Kubernetes minor version bundled by kubernetes-validate from MIN_K8S on."""
    found = set()
    for entry in _SCHEMAS.iterdir():
        match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+-local-strict", entry.name)
        if match and (int(match[1]), int(match[2])) >= MIN_K8S:
            found.add((int(match[1]), int(match[2]), entry.name))
    return [name for *_, name in sorted(found)]


@functools.cache
def _definitions(version_dir: str) -> Resource[Any]:
    return Resource.from_contents(
        json.loads((_SCHEMAS / version_dir / "_definitions.json").read_text())
    )


@functools.cache
def _k8s_validator(version_dir: str, filename: str) -> jsonschema.Validator | None:
    path = _SCHEMAS / version_dir / filename
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    registry = _definitions(version_dir) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _schema_filename(obj: Obj) -> str:
    # kubernetes-validate's layout: <kind>-<group without domain>-<version>.json
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    return f"{obj['kind'].lower()}-{api}.json"


# CRDs have no schema in kubernetes-validate: they are checked against the (strict) schemas in
# schemas/, written from the CRD references, covering the fields the chart uses.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): HERE / "schemas" / "keda-scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "schemas" / "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): HERE / "schemas" / "prometheusrule.json",
}


@functools.cache
def _crd_validator(path: Path) -> jsonschema.Validator:
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(obj: Obj) -> list[str]:
    """Strict-schema errors of one object for every supported Kubernetes version."""
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        return [
            f"{ident(obj)} [CRD]: {e.json_path}: {e.message}"
            for e in _crd_validator(crd).iter_errors(obj)
        ]
    errors = []
    for version_dir in k8s_versions():
        validator = _k8s_validator(version_dir, _schema_filename(obj))
        if validator is None:
            errors.append(f"{ident(obj)}: no schema for {obj['apiVersion']} in {version_dir}")
            continue
        errors += [
            f"{ident(obj)} [{version_dir}]: {e.json_path}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    return errors


# --- policy -----------------------------------------------------------------------------------

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in POD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def parse_cpu(value: str | int | float) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


_MEM_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def parse_memory(value: str | int) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match, f"bad memory quantity {value!r}"
    return int(float(match[1]) * _MEM_UNITS.get(match[2], 1))


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def image_problems(image: str) -> list[str]:
    if "@sha256:" in image:
        return []
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return [f"image {image} has no tag"]
    if name.endswith(":latest"):
        return [f"image {image} uses the latest tag"]
    return []


def _container_security(where: str, spec: Obj, container: Obj) -> list[str]:
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    problems = []
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problems.append(f"{where}: runAsNonRoot not set")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        problems.append(f"{where}: runs as UID 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: root filesystem is writable")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: privilege escalation allowed")
    if sc.get("privileged"):
        problems.append(f"{where}: privileged")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities not dropped")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if seccomp != "RuntimeDefault":
        problems.append(f"{where}: seccomp profile is {seccomp}")
    return problems


def _container_resources(where: str, container: Obj) -> list[str]:
    res = container.get("resources", {})
    return [
        f"{where}: resources.{kind}.{name} missing"
        for kind in ("requests", "limits")
        for name in ("cpu", "memory")
        if not res.get(kind, {}).get(name)
    ]


def _server_problems(where: str, spec: Obj, container: Obj) -> list[str]:
    """The podserve server container: workers and grace period agree with limits and timeouts."""
    env = env_of(container)
    problems = []
    cpu_limit = parse_cpu(container["resources"]["limits"]["cpu"])
    workers = env.get("PODSERVE_WORKERS")
    if workers != str(max(1, math.ceil(cpu_limit))):
        problems.append(f"{where}: PODSERVE_WORKERS={workers} but ceil(cpu limit {cpu_limit})")
    graceful = float(env.get("PODSERVE_GRACEFUL_TIMEOUT_S", "25"))  # the server's default
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        problems.append(f"{where}: no preStop hook")
    sleep = _pre_stop_seconds(pre_stop or {})
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not grace > sleep + graceful:
        problems.append(
            f"{where}: grace period {grace}s <= preStop {sleep}s + graceful {graceful}s"
        )
    for name in ("POD_NAME", "POD_NAMESPACE"):
        refs = [
            e
            for e in container.get("env", [])
            if e["name"] == name and "fieldRef" in e.get("valueFrom", {})
        ]
        if not refs:
            problems.append(f"{where}: no Downward API env {name}")
    return problems


def _pre_stop_seconds(pre_stop: Obj) -> float:
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    return 0.0


def is_server(container: Obj) -> bool:
    return container["name"] == "server" and "PODSERVE_PORT" in env_of(container)


def policy_violations(obj: Obj) -> list[str]:
    """Every policy the chart and the plain manifests promise, for one object."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{ident(obj)}: service account token is mounted")
    for container in containers(spec):
        where = f"{ident(obj)}/{container['name']}"
        problems += image_problems(container["image"])
        problems += _container_security(where, spec, container)
        problems += _container_resources(where, container)
        if obj["kind"] in LONG_RUNNING:
            problems += [
                f"{where}: no {probe}"
                for probe in ("startupProbe", "readinessProbe", "livenessProbe")
                if probe not in container
            ]
        if is_server(container):
            problems += _server_problems(where, spec, container)
    return problems
