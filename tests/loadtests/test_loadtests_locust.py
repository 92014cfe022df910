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


def test_retry_after_parses_seconds_and_dates_and_is_capped() -> None:
    code = (
        "import loadtests.locustfile as l; from email.utils import formatdate; "
        "print(l.retry_after_s('2'), l.retry_after_s(' 0 '), l.retry_after_s(None), "
        "l.retry_after_s('soon'), l.retry_after_s('-3'), l.retry_after_s('999'), "
        "round(l.retry_after_s(formatdate(1000.0 + 7, usegmt=True), now=1000.0)), "
        "l.retry_after_s(formatdate(1000.0 - 7, usegmt=True), now=1000.0))"
    )
    done = _in_subprocess(code, {"LOCUST_RETRY_AFTER_MAX_S": "30"})
    assert done.stdout.split() == ["2.0", "0.0", "None", "None", "None", "30.0", "7", "0.0"], (
        done.stderr[-2000:]
    )


def _run_locust(url: str, tmp_path: Path, env: dict[str, str], users: int = 4,
                seconds: int = 3) -> dict[str, dict[str, str]]:  # fmt: skip
    """A headless run; its per-request rows from the stats CSV."""
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
           "--headless", "--host", url, "--users", str(users), "--spawn-rate", str(users),
           "--run-time", f"{seconds}s", "--stop-timeout", "2", "--csv", str(tmp_path / "run"),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_users_back_off_as_retry_after_says(shedding_server, tmp_path: Path) -> None:
    """Every entity request is answered 503 + Retry-After: 1. Honouring it, a user sends at
    most one request per second; ignoring it (opt-out), users retry at once and send many
    times that, which is what the bound below must tell apart."""
    users, seconds = 4, 3
    bound = users * (seconds + 1)  # one request per user per second, plus the first one
    weights = {"LOCUST_WEIGHTS": "tabular=0,v1=0,text=0,entity=1,jobs=0"}
    url = shedding_server.url
    polite = _run_locust(url, tmp_path, weights, users, seconds)
    rude = _run_locust(url, tmp_path, {**weights, "LOCUST_HONOR_RETRY_AFTER": "0"}, users, seconds)
    name = "v2 infer by entity id"
    for rows in (polite, rude):  # every answer was the 503 (a failure in Locust's terms)
        assert rows[name]["Failure Count"] == rows[name]["Request Count"], rows[name]
    assert 0 < int(polite[name]["Request Count"]) <= bound, polite[name]
    assert int(rude[name]["Request Count"]) > 4 * bound, rude[name]


def test_headless_run_against_podserve(server, tmp_path: Path) -> None:
    env = {
        "LOCUST_WEIGHTS": "tabular=2,v1=1,text=1,entity=0,jobs=0",
        "LOCUST_TEXT_MODEL": "text",
        "LOCUST_PHASES_FILE": str(tmp_path / "phases.json"),
    }
    rows = _run_locust(server.url, tmp_path, env)
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
