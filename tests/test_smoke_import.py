"""The packages import and the command lines answer --help."""

import subprocess
import sys


def test_archeio_settings_command_prints_every_variable() -> None:
    from archeio.config import SETTINGS

    out = subprocess.run(
        [sys.executable, "-m", "archeio", "settings"], check=True, capture_output=True, text=True
    ).stdout
    for setting in SETTINGS:
        assert f"`{setting.env}`" in out


def test_readme_settings_table_matches_the_code() -> None:
    from pathlib import Path

    from archeio.config import settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert settings_table() in readme, "run scripts/readme-settings"
