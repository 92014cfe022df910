"""skaffold.yaml: schema-checked, and every profile deploys a chart render that passes policy.

Skaffold's JSON schema is not shipped by any package on the registries this project can reach,
so schemas/skaffold-v4beta-subset.json restates, strictly, the parts of it this file uses.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_support import HERE, ROOT, Obj, helm_template, policy_violations, schema_errors

SKAFFOLD = ROOT / "skaffold.yaml"
# What skaffold would substitute for the image templates after a build.
IMAGE = {"IMAGE_REPO_podserve": "localhost:5001/podserve", "IMAGE_TAG_podserve": "3f2a9c1"}


def config() -> dict[str, Any]:
    return yaml.safe_load(SKAFFOLD.read_text())


def apply_patches(cfg: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON-patch `add`/`replace` as skaffold applies a profile's patches."""
    out = copy.deepcopy(cfg)
    for patch in patches:
        assert patch.get("op", "replace") in {"add", "replace"}, patch
        *parents, leaf = [
            p.replace("~1", "/").replace("~0", "~") for p in patch["path"].split("/")[1:]
        ]
        node: Any = out
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node.insert(len(node) if leaf == "-" else int(leaf), patch["value"])
        else:
            node[leaf] = patch["value"]
    return out


def profile(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The effective config with one profile on (patches applied, portForward replaced)."""
    prof = next(p for p in cfg["profiles"] if p["name"] == name)
    out = apply_patches(cfg, prof.get("patches", []))
    if "portForward" in prof:
        out["portForward"] = prof["portForward"]
    return out


def set_args(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def render(helm: str, cfg: dict[str, Any], image: dict[str, str] = IMAGE) -> list[Obj]:
    release = cfg["deploy"]["helm"]["releases"][0]
    sets = [f"{k}={set_args(v)}" for k, v in release.get("setValues", {}).items()]
    for key, template in release["setValueTemplates"].items():
        value = template
        for var, sub in image.items():
            value = value.replace("{{." + var + "}}", sub)
        assert "{{" not in value, f"unknown template in {template}"
        sets.append(f"{key}={value}")
    assert release["chartPath"] == "helm/podserve"
    return helm_template(helm, sets=tuple(sets))


def test_schema() -> None:
    schema = json.loads((HERE / "schemas" / "skaffold-v4beta-subset.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = [
        f"{e.json_path}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(config())
    ]
    assert not errors, errors


def test_schema_catches_typos() -> None:
    schema = json.loads((HERE / "schemas" / "skaffold-v4beta-subset.json").read_text())
    bad = config()
    bad["deploy"]["helm"]["releases"][0]["setValuesTemplates"] = {}
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


def test_build_uses_the_dockerfile() -> None:
    (artifact,) = config()["build"]["artifacts"]
    assert artifact["image"] == "podserve"
    assert (ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()
    assert config()["build"]["local"]["useBuildkit"] is True  # RUN --mount needs BuildKit


def test_image_set_through_value_templates(helm: str) -> None:
    release = config()["deploy"]["helm"]["releases"][0]
    assert release["setValueTemplates"] == {
        "image.repository": "{{.IMAGE_REPO_podserve}}",
        "image.tag": "{{.IMAGE_TAG_podserve}}",
    }
    deploy = next(o for o in render(helm, config()) if o["kind"] == "Deployment")
    assert (
        deploy["spec"]["template"]["spec"]["containers"][0]["image"]
        == "localhost:5001/podserve:3f2a9c1"
    )


def test_commit_hash_of_digits_is_a_valid_tag(helm: str) -> None:
    """A short hash made only of digits reaches `--set` as an integer: the schema must take it,
    and the image reference must keep every digit."""
    image = {**IMAGE, "IMAGE_TAG_podserve": "1234567"}
    deploy = next(o for o in render(helm, config(), image) if o["kind"] == "Deployment")
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    assert server["image"] == "localhost:5001/podserve:1234567"
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert "service.version=1234567" in env["OTEL_RESOURCE_ATTRIBUTES"]


@pytest.mark.parametrize("name", ["default", "dev", "loadtest"])
def test_profiles_render_valid_manifests_and_forward_real_services(helm: str, name: str) -> None:
    cfg = config() if name == "default" else profile(config(), name)
    objs = render(helm, cfg)
    problems = [p for o in objs for p in schema_errors(o) + policy_violations(o)]
    assert not problems, "\n".join(problems)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for fwd in cfg["portForward"]:
        assert fwd["resourceType"] == "service"
        ports = [p["port"] for p in services[fwd["resourceName"]]["spec"]["ports"]]
        assert fwd["port"] in ports, fwd


def test_dev_profile_one_replica_traces_to_jaeger(helm: str) -> None:
    objs = render(helm, profile(config(), "dev"))
    deploy = next(
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "podserve"
    )
    assert deploy["spec"]["replicas"] == 1
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://podserve-jaeger:4318"
    assert env["PODSERVE_WORKERS"] == "1"


def test_loadtest_profile_runs_locust(helm: str) -> None:
    names = {o["metadata"]["name"] for o in render(helm, profile(config(), "loadtest"))}
    assert {"podserve-locust-master", "podserve-locust-worker"} <= names


def test_profiles_exist() -> None:
    assert [p["name"] for p in config()["profiles"]] == ["dev", "loadtest"]
