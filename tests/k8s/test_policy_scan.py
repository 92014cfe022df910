"""Policy scanners: checkov over every rendered value set and the Dockerfile; hadolint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from k8s_support import (
    CHART,
    ROOT,
    VALUE_SETS,
    helm_template_text,
    kustomize_text,
    require_tool,
    run,
)

CHECKOV_CONFIG = ROOT / "helm" / "checkov.yaml"
README = CHART / "README.md"


def checkov_binary() -> str:
    return require_tool(
        "checkov",
        ROOT / ".tools" / "bin" / "checkov",
        ROOT / ".tools" / "checkov" / "bin" / "checkov",
    )


def hadolint_binary() -> str:
    return require_tool("hadolint", ROOT / ".venv" / "bin" / "hadolint")


@pytest.fixture(scope="module")
def scan_dir(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every value set and kustomize overlay rendered to its own file, plus the Dockerfile."""
    out = tmp_path_factory.mktemp("scan")
    for name, values in VALUE_SETS.items():
        text = helm_template_text(helm, (str(values),) if values else (), ())
        (out / f"chart-{name}.yaml").write_text(text)
    for name in ("base", "overlays/dev", "overlays/prod"):
        text = kustomize_text(str(ROOT / "k8s" / name))
        (out / f"kustomize-{name.replace('/', '-')}.yaml").write_text(text)
    (out / "Dockerfile").write_text((ROOT / "Dockerfile").read_text())
    return out


@pytest.fixture(scope="module")
def checkov_report(scan_dir: Path) -> list[dict]:
    proc = run(
        [checkov_binary(), "--config-file", str(CHECKOV_CONFIG), "-d", str(scan_dir), "-o", "json"]
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_scanned_everything(checkov_report: list[dict]) -> None:
    summaries = {r["check_type"]: r["summary"] for r in checkov_report}
    assert set(summaries) == {"kubernetes", "dockerfile"}
    assert summaries["kubernetes"]["resource_count"] >= 40, summaries
    assert all(s["parsing_errors"] == 0 for s in summaries.values()), summaries


def test_checkov_has_no_unjustified_findings(checkov_report: list[dict]) -> None:
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for r in checkov_report
        for c in r["results"].get("failed_checks", [])
    ]
    assert not failed, (
        "fix these, or skip them in helm/checkov.yaml and justify in the README:\n"
        + "\n".join(failed)
    )


def skipped_ids() -> set[str]:
    """Checks skipped in the config file and through checkov.io/skip annotations in templates."""
    ids = set(yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"])
    for template in (CHART / "templates").rglob("*.yaml"):
        ids |= set(re.findall(r"checkov\.io/skip\d+: (CKV2?_[A-Z0-9_]+)=", template.read_text()))
    return ids


def test_every_skipped_check_is_justified_in_readme() -> None:
    section = README.read_text().split("## Policy scan (checkov)", 1)
    assert len(section) == 2, "README needs a '## Policy scan (checkov)' section"
    body = section[1].split("\n## ", 1)[0]
    missing = sorted(i for i in skipped_ids() if f"`{i}`" not in body)
    assert skipped_ids() and not missing, f"skipped checks without a justification: {missing}"


def test_hadolint_clean() -> None:
    proc = run([hadolint_binary(), "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nUSER root\n")
    proc = run([hadolint_binary(), str(bad)])
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout
