"""Every setting is documented (the README's table names each PODSERVE_* variable), and a
PODSERVE_* variable that is no setting is reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from podserve.settings import Settings, unknown_settings
from server_process import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    rows = set(re.findall(r"^\| `(PODSERVE_[A-Z0-9_]+)` \|", README.read_text(), re.M))
    expected = {f"PODSERVE_{name.upper()}" for name in Settings.model_fields}
    assert expected - rows == set(), "settings missing from the README's table"
    assert rows - expected == set(), "README rows for settings that do not exist"


def test_unknown_names_are_reported_with_the_closest_setting() -> None:
    environ = {
        "PODSERVE_WORKER": "3",  # a typo of PODSERVE_WORKERS
        "PODSERVE_WORKERS": "2",
        "PODSERVE_TEST_DATABASE_URL": "x",  # the tests' own
        "PODSERVE_NOTHING_LIKE_IT_AT_ALL": "1",
        "HOME": "/root",
    }
    assert unknown_settings(environ) == [
        "PODSERVE_NOTHING_LIKE_IT_AT_ALL",
        "PODSERVE_WORKER (did you mean PODSERVE_WORKERS?)",
    ]


def test_names_are_matched_regardless_of_case_as_pydantic_settings_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PODSERVE_Max_Batch_Size is applied, so it is no unknown setting; podserve_worker is
    a typo like PODSERVE_WORKER."""
    environ = {
        "PODSERVE_Max_Batch_Size": "3",
        "podserve_worker": "3",
        "podserve_test_anything": "x",
    }
    assert unknown_settings(environ) == ["podserve_worker (did you mean PODSERVE_WORKERS?)"]
    monkeypatch.setenv("PODSERVE_Max_Batch_Size", "3")
    assert Settings().max_batch_size == 3


def test_the_server_warns_of_an_unknown_setting_at_start(affine_repo: Path) -> None:
    env = {"PODSERVE_GRACEFULL_TIMEOUT_S": "5"}
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        logs = server.logs()
    assert "unknown setting ignored: PODSERVE_GRACEFULL_TIMEOUT_S" in logs, logs[-2000:]
    assert "did you mean PODSERVE_GRACEFUL_TIMEOUT_S?" in logs


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_batch_delay_ms", "inf"),  # the config route answered 500 (int of inf)
        ("max_batch_delay_ms", "1e20"),  # microseconds past a JSON int64
        ("max_batch_delay_ms", "60001"),  # past the bound a model's config.yaml has
        ("request_timeout_ms", "nan"),
        ("body_read_timeout_s", "inf"),
        ("forwarded_allow_ips", "10.0.0.0/8,proxy.local"),
    ],
)
def test_infinite_and_out_of_bound_values_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"PODSERVE_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_the_longest_batch_delay_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODSERVE_MAX_BATCH_DELAY_MS", "60000")
    assert Settings().max_batch_delay_ms == 60000
