"""Every setting is documented: the README's table names each PODSERVE_* variable."""

from __future__ import annotations

import re
from pathlib import Path

from podserve.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    rows = set(re.findall(r"^\| `(PODSERVE_[A-Z0-9_]+)` \|", README.read_text(), re.M))
    expected = {f"PODSERVE_{name.upper()}" for name in Settings.model_fields}
    assert expected - rows == set(), "settings missing from the README's table"
    assert rows - expected == set(), "README rows for settings that do not exist"
