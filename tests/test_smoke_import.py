"""The packages import and the command lines answer --help."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def test_access_lines_survive_a_warning_log_level() -> None:
    import logging

    from archeio.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("WARNING", access_log=True)
        assert logging.getLogger("archeio.access").isEnabledFor(logging.INFO)
        assert not logging.getLogger("archeio").isEnabledFor(logging.INFO)
        setup_logging("WARNING", access_log=False)
        assert not logging.getLogger("archeio.access").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip install .` (the README's first command) builds."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("archeio-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_every_package_and_the_mirror_table(wheel: zipfile.ZipFile) -> None:
    """It must carry all of it, not just an editable view."""
    names = set(wheel.namelist())
    sources = [*ROOT.glob("archeio/**/*.py"), *ROOT.glob("iprange/**/*.py"), ROOT / "archeio/data/aws-mirrors.json"]
    for source in sources:
        assert str(source.relative_to(ROOT)) in names


def test_wheel_declares_its_license_as_an_spdx_expression(wheel: zipfile.ZipFile) -> None:
    # The `license = {text = ...}` table is deprecated (setuptools warns at
    # every build); the SPDX string becomes Metadata 2.4's License-Expression.
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    headers = wheel.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert not any(line.startswith("License: ") for line in headers)


def test_wheel_requires_boto3_only_for_the_mirror_extra(wheel: zipfile.ZipFile) -> None:
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    requires = [line for line in wheel.read(metadata).decode().splitlines() if line.startswith("Requires-Dist: boto")]
    assert requires and all(line.endswith('; extra == "mirror"') for line in requires), requires
