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


def test_wheel_ships_every_package_and_the_mirror_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pip install .` (the README's first command) must carry all of it, not just an editable view."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root),
         "-w", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("archeio-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [*root.glob("archeio/**/*.py"), *root.glob("iprange/**/*.py"), root / "archeio/data/aws-mirrors.toml"]
    for source in sources:
        assert str(source.relative_to(root)) in names
