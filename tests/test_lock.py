"""The dependency lock: uv.lock still satisfies pyproject.toml, and the image installs from it.

`uv lock --locked --offline` checks the lock against pyproject.toml without
reading any index (an empty uv cache proves it): a release published since
the lock was made cannot fail it; only a change to the requirements can,
and then `scripts/lock` is the fix. deploy/requirements*.txt, what the image
installs with `pip --require-hashes`, must be what the lock exports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What each exported file holds: `uv export` arguments (as scripts/lock runs them).
EXPORTS = {
    "deploy/requirements.txt": ["--no-default-groups"],
    "deploy/requirements-build.txt": ["--only-group", "build"],
}


def uv(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"}
    return subprocess.run([str(UV), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def pins(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a hashed requirements file."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for entry in re.split(r"\n(?=\S)", re.sub(r"^#.*\n", "", text, flags=re.M)):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry)
        if match:
            found[match.group(1).lower()] = (match.group(2), frozenset(re.findall(r"--hash=(\S+)", entry)))
    return found


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The files `uv lock` reads, in a scratch directory."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO / name, copy / name)
    return copy


def test_lock_satisfies_pyproject_without_reading_an_index(tmp_path: Path) -> None:
    result = uv("lock", "--locked", cwd=REPO, cache=tmp_path / "empty-cache")
    assert result.returncode == 0, f"uv.lock is out of date: run scripts/lock\n{result.stderr}"


def test_lock_check_fails_once_pyproject_asks_for_more(project_copy: Path, tmp_path: Path) -> None:
    pyproject = project_copy / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('    "msgpack>=1.0",\n', '    "msgpack>=1.0",\n    "attrs>=1",\n', 1))
    assert pyproject.read_text() != text
    assert uv("lock", "--locked", cwd=project_copy, cache=tmp_path / "empty-cache").returncode != 0


@pytest.mark.parametrize("path", sorted(EXPORTS))
def test_image_requirements_are_what_the_lock_exports(path: str, tmp_path: Path) -> None:
    exported = uv("export", "--frozen", "--no-emit-project", "--format", "requirements-txt", *EXPORTS[path],
                  cwd=REPO, cache=tmp_path / "empty-cache")
    assert exported.returncode == 0, exported.stderr
    committed = pins((REPO / path).read_text())
    assert committed and committed == pins(exported.stdout), f"{path} differs from uv.lock: run scripts/lock"


def test_server_requirements_leave_out_the_mirror_extra() -> None:
    server = pins((REPO / "deploy/requirements.txt").read_text())
    assert "aiohttp" in server and "pytricia" in server
    assert not {"boto3", "botocore"} & set(server)


def test_lock_covers_the_mirror_extra(tmp_path: Path) -> None:
    exported = uv("export", "--frozen", "--no-emit-project", "--extra", "mirror", "--format", "requirements-txt",
                  cwd=REPO, cache=tmp_path / "empty-cache")
    assert {"boto3", "botocore"} <= set(pins(exported.stdout)), exported.stderr


def test_image_builds_with_the_setuptools_the_build_system_asks_for() -> None:
    assert PYPROJECT["dependency-groups"]["build"] == PYPROJECT["build-system"]["requires"]


def test_test_extra_pulls_in_the_mirror_extra() -> None:
    assert "archeio[mirror]" in PYPROJECT["project"]["optional-dependencies"]["test"]
    assert not any(re.match(r"boto", dep) for dep in PYPROJECT["project"]["dependencies"])
