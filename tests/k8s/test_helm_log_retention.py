"""The chart's prediction-log retention: database.predictionLogRetentionSeconds reaches the pod
as PODSERVE_PREDICTION_LOG_RETENTION_S, off (0) by default, and a negative one is refused."""

from __future__ import annotations

from pathlib import Path

import yaml
from k8s_support import CHART, helm_template, run

from podserve.settings import Settings

SETTING = "PODSERVE_PREDICTION_LOG_RETENTION_S"


def _config(objs: list[dict]) -> dict[str, str]:
    (config,) = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "podserve"
    ]
    return config["data"]


def test_retention_is_off_by_default_and_reaches_the_pod(helm: str, tmp_path: Path) -> None:
    assert _config(helm_template(helm))[SETTING] == "0"
    week = "database.predictionLogRetentionSeconds=604800"
    assert _config(helm_template(helm, sets=(week,)))[SETTING] == "604800"
    # From a values file numbers arrive as float64: still printed as an integer.
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"database": {"predictionLogRetentionSeconds": 2592000}}))
    rendered = _config(helm_template(helm, values=values))[SETTING]
    assert rendered == "2592000"
    assert Settings.model_validate({"prediction_log_retention_s": rendered})


def test_a_negative_retention_is_refused(helm: str) -> None:
    proc = run(
        [
            helm,
            "template",
            "podserve",
            str(CHART),
            "--set",
            "database.predictionLogRetentionSeconds=-1",
        ]
    )
    assert proc.returncode != 0
    assert "predictionLogRetentionSeconds" in proc.stderr, proc.stderr
