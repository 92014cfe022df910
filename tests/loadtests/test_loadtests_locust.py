"""The Locust scenarios run headless against a real podserve and report Server-Timing phases."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _in_subprocess(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Importing Locust monkey-patches the process (gevent): keep it out of pytest's."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_weights_parse_and_reject_unknown_classes() -> None:
    code = "import loadtests.locustfile as l; print(l.weights()['tabular'], l.JobUser.abstract)"
    done = _in_subprocess(code, {"LOCUST_WEIGHTS": "tabular=2,jobs=0"})
    assert done.stdout.split() == ["2", "True"], done.stderr[-2000:]
    done = _in_subprocess(code, {"LOCUST_WEIGHTS": "nonsense=1"})
    assert done.returncode != 0 and "unknown class" in done.stderr


def test_server_timing_parser_matches_podserve() -> None:
    header = "parse;dur=0.212, queue;dur=0.041, infer;dur=0.377"
    code = (
        "import loadtests.locustfile as l; from podserve.phases import parse_server_timing as p; "
        f"h = {header!r}; print(l.parse_server_timing(h) == p(h) == "
        "{'parse': 0.212, 'queue': 0.041, 'infer': 0.377})"
    )
    done = _in_subprocess(code)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_headless_run_against_podserve(server, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LOCUST_WEIGHTS": "tabular=2,v1=1,text=1,entity=0,jobs=0",
        "LOCUST_TEXT_MODEL": "text",
        "LOCUST_PHASES_FILE": str(tmp_path / "phases.json"),
    }
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
           "--headless", "--host", server.url, "--users", "4", "--spawn-rate", "4",
           "--run-time", "3s", "--stop-timeout", "2", "--csv", str(tmp_path / "run"),
           "--only-summary", "--loglevel", "WARNING"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in ("v2 infer tabular", "v1 predict tabular", "v2 infer text"):
        assert int(rows[name]["Request Count"]) > 0, rows.keys()
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
    doc = json.loads((tmp_path / "phases.json").read_text())
    phases = {(r["name"], r["phase"]): r["count"] for r in doc["phases"]}
    assert phases[("v2 infer text", "infer")] > 0 and ("v2 infer text", "preprocess") in phases
    final = {r["name"]: r for r in doc["requests"]}
    # Every answered request carried a Server-Timing header, and the listener saw all of them.
    assert final["v2 infer tabular"]["count"] == phases[("v2 infer tabular", "infer")]
    assert final["Aggregated"]["failures"] == 0
    for name in ("v2 infer tabular", "v1 predict tabular", "v2 infer text"):
        assert int(rows[name]["Request Count"]) <= final[name]["count"]  # the CSV may lag


def test_helm_chart_ships_the_same_locustfile() -> None:
    """The chart's distributed Locust mounts files/locustfile.py: it must be this one."""
    root = Path(__file__).resolve().parents[2]
    chart_copy = root / "helm" / "podserve" / "files" / "locustfile.py"
    assert chart_copy.read_text() == (root / "loadtests" / "locustfile.py").read_text(), (
        "run: cp loadtests/locustfile.py helm/podserve/files/locustfile.py"
    )
