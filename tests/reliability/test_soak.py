"""Scenario 6: the soak, in its short CI form (loadtests/soak.py --duration 60).

The full run is `python loadtests/soak.py --duration 600` (10 minutes at ~70% of capacity).
Here the same script runs for 60 s and its JSON verdict is checked: no failed request,
worker RSS within 5% of its value after the warm-up, no descriptor growth, no worker replaced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from traffic import Report

SOAK = Path(__file__).parents[2] / "loadtests" / "soak.py"


@pytest.mark.slow
def test_soak_60s_is_flat_and_error_free(model_repo: Path, tmp_path: Path, report: Report) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--duration",
            "60",
            "--model-repository",
            str(model_repo),
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    measured = result["measured"]
    report(
        "soak_60s",
        capacity_rps=result["capacity_rps"],
        target_rps=result["target_rps"],
        sent=measured["sent"] + result["warmup"]["sent"],
        failed=measured["failed"] + result["warmup"]["failed"],
        shed=measured["shed_503"],
        p99_ms=measured["p99_ms"],
        workers=result["workers"],
        problems=result["problems"],
    )
    assert run.returncode == 0 and result["passed"], result["problems"]
    assert measured["failed"] == 0 and result["warmup"]["failed"] == 0
    assert measured["ok"] > 0.9 * result["target_rps"] * (result["duration_s"] - result["warmup_s"])
    for pid, worker in result["workers"].items():
        assert worker["rss_growth_pct"] < 5.0, (pid, worker)
        assert worker["fds_end"] <= worker["fds_after_warmup"], (pid, worker)
