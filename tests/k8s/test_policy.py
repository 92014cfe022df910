"""Policy assertions over every rendered workload: chart value sets and kustomize overlays."""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from k8s_support import (
    CHART,
    ROOT,
    VALUE_SETS,
    Obj,
    containers,
    env_of,
    helm_template,
    ident,
    is_server,
    kustomize,
    parse_cpu,
    parse_memory,
    pod_spec,
    policy_violations,
)

OVERLAYS = {
    name: ROOT / "k8s" / path
    for name, path in {"base": "base", "dev": "overlays/dev", "prod": "overlays/prod"}.items()
}


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if pod_spec(o) is not None]


def server_containers(objs: list[Obj]) -> list[Obj]:
    return [c for o in workloads(objs) for c in containers(pod_spec(o)) if is_server(c)]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_workloads_meet_policy(helm: str, name: str) -> None:
    objs = helm_template(helm, VALUE_SETS[name])
    assert server_containers(objs), "no server container rendered"
    problems = [p for o in workloads(objs) for p in policy_violations(o)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", OVERLAYS)
def test_kustomize_workloads_meet_policy(name: str) -> None:
    objs = kustomize(OVERLAYS[name])
    assert server_containers(objs), "no server container rendered"
    problems = [p for o in workloads(objs) for p in policy_violations(o)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", [*VALUE_SETS, *OVERLAYS])
def test_memory_is_sized_from_workers(helm: str, name: str) -> None:
    """Memory = base + workers x per-worker (the chart's memorySizing), wherever it is set."""
    objs = (
        helm_template(helm, VALUE_SETS[name]) if name in VALUE_SETS else kustomize(OVERLAYS[name])
    )
    sizing = yaml.safe_load((CHART / "values.yaml").read_text())["memorySizing"]
    for server in server_containers(objs):
        workers = int(env_of(server)["PODSERVE_WORKERS"])
        expected = (sizing["baseMi"] + workers * sizing["perWorkerMi"]) * 2**20
        for kind in ("requests", "limits"):
            assert parse_memory(server["resources"][kind]["memory"]) == expected, kind


# --- the checker itself must be able to fail ---------------------------------------------------


@pytest.fixture(scope="module")
def good_deployment(helm: str) -> Obj:
    return next(o for o in helm_template(helm) if ident(o) == "Deployment/podserve")


def mutate(deploy: Obj, path: str, value: object) -> Obj:
    """Copy of deploy with the dotted path (list indices allowed) set; None deletes the key."""
    bad = copy.deepcopy(deploy)
    *parents, leaf = path.split(".")
    node = bad
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return bad


C0 = "spec.template.spec.containers.0"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (f"{C0}.securityContext.readOnlyRootFilesystem", False, "root filesystem is writable"),
        (f"{C0}.securityContext.allowPrivilegeEscalation", True, "privilege escalation"),
        (f"{C0}.securityContext.capabilities", None, "capabilities not dropped"),
        (f"{C0}.securityContext.runAsNonRoot", None, None),  # still set at pod level: allowed
        (f"{C0}.livenessProbe", None, "no livenessProbe"),
        (f"{C0}.startupProbe", None, "no startupProbe"),
        (f"{C0}.image", "podserve:latest", "latest tag"),
        (f"{C0}.image", "podserve", "no tag"),
        (f"{C0}.resources.limits", {"cpu": "2"}, "resources.limits.memory missing"),
        ("spec.template.spec.terminationGracePeriodSeconds", 30, "grace period 30s"),
        ("spec.template.spec.automountServiceAccountToken", None, "token is mounted"),
        ("spec.template.spec.securityContext.seccompProfile", {"type": "Unconfined"}, None),
    ],
)
def test_policy_checker_catches(
    good_deployment: Obj, path: str, value: object, expected: str | None
) -> None:
    problems = policy_violations(mutate(good_deployment, path, value))
    if expected is None:
        # The container-level setting still satisfies the policy.
        assert not problems, problems
    else:
        assert any(expected in p for p in problems), problems


def test_policy_checker_catches_worker_mismatch(good_deployment: Obj) -> None:
    bad = copy.deepcopy(good_deployment)
    server = bad["spec"]["template"]["spec"]["containers"][0]
    server["resources"]["limits"]["cpu"] = "3500m"
    problems = policy_violations(bad)
    assert any("PODSERVE_WORKERS=2 but ceil(cpu limit 3.5)" in p for p in problems), problems
    assert math.ceil(parse_cpu("3500m")) == 4


def test_policy_checker_catches_root(good_deployment: Obj) -> None:
    bad = mutate(good_deployment, "spec.template.spec.securityContext.runAsUser", 0)
    bad = mutate(bad, f"{C0}.securityContext.runAsNonRoot", None)
    bad = mutate(bad, "spec.template.spec.securityContext.runAsNonRoot", None)
    problems = policy_violations(bad)
    assert any("UID 0" in p for p in problems) and any("runAsNonRoot" in p for p in problems)
