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
