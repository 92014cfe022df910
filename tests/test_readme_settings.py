"""Every setting is documented (the README's table names each PODSERVE_* variable), and a
PODSERVE_* variable that is no setting is reported."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_the_server_warns_of_an_unknown_setting_at_start(affine_repo: Path) -> None:
    env = {"PODSERVE_GRACEFULL_TIMEOUT_S": "5"}
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        logs = server.logs()
    assert "unknown setting ignored: PODSERVE_GRACEFULL_TIMEOUT_S" in logs, logs[-2000:]
    assert "did you mean PODSERVE_GRACEFUL_TIMEOUT_S?" in logs
