"""`archeio explain`: every decision branch, and agreement with a running server.

The mirrors are a stand-in bucket (tests/bucket.py): `eu` is AWS
eu-west-3's mirror, `cdn` the default one, so the live existence check is
a real HEAD on loopback. Ranges are the small files in the providers'
formats of tests/data/ranges (AWS, Google Cloud and Azure), so the
answers name the file each placement came from.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archeio.cli import main
from archeio.config import SETTINGS, Settings
from archeio.explain import explain, request_for
from iprange import CloudIndex, load_index

from .conftest import AWS_EU_WEST_3, AZURE_CANADACENTRAL, GOOGLE_CLOUD, NOBODY, RANGES_FIXTURES, make_settings

LB = "130.211.0.1"  # the load balancer's own entry
AWS_US_WEST_2 = "54.148.0.1"  # a region our test mirrors file has no entry for
HELD = "sha256:" + "1" * 64
MISSING = "sha256:" + "2" * 64
UP = "http://upstream.example/v2/k8s-artifacts-prod/images/"


def lb(client: str) -> str:
    return f"{client}, {LB}"


@pytest.fixture
def settings(bucket: Any, tmp_path: Path) -> Settings:
    bucket.add("eu", HELD)
    bucket.add("cdn", HELD)
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text(f'[mirrors.AWS]\n"eu-west-3" = "{bucket.base("eu")}"\n')
    return make_settings(
        PORT="0", ARCHEIO_HOST="127.0.0.1", UPSTREAM_REGISTRY_ENDPOINT="http://upstream.example",
        DEFAULT_AWS_BASE_URL=bucket.base("cdn"), ARCHEIO_MIRRORS_FILE=str(mirrors),
        ARCHEIO_RANGES_DIR=str(RANGES_FIXTURES),
    )


@pytest.fixture
def index(settings: Settings) -> CloudIndex:
    return load_index(settings.ranges_dir)


async def test_aws_region_with_a_mirror_that_holds_the_blob(settings: Settings, index: CloudIndex,
                                                             bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(AWS_EU_WEST_3))
    assert result.client is not None and result.client.address == AWS_EU_WEST_3
    assert "entry 1 of 2" in result.client.source
    assert result.placement is not None
    assert (result.placement.cloud, result.placement.region, result.placement.prefix) == ("AWS", "eu-west-3",
                                                                                           "35.180.0.0/16")
    assert result.placement.data_source.endswith("aws-ip-ranges.json")
    assert result.mirror is not None and result.mirror.url == bucket.base("eu")
    assert '[mirrors.AWS] "eu-west-3"' in result.mirror.reason
    assert result.check is not None and result.check.outcome == "hit"
    assert (result.status, result.location) == (307, f"{bucket.base('eu')}/containers/images/{HELD}")


async def test_aws_region_without_a_mirror_gets_the_default_and_its_miss(settings: Settings, index: CloudIndex,
                                                                        bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{MISSING}", forwarded=lb(AWS_US_WEST_2))
    assert result.placement is not None and result.placement.region == "us-west-2"
    assert result.mirror is not None and result.mirror.url == bucket.base("cdn")
    assert "no entry for AWS us-west-2" in result.mirror.reason
    assert result.check is not None and result.check.outcome == "miss"
    assert (result.status, result.location) == (307, UP + f"pause/blobs/{MISSING}")


async def test_azure_client_gets_the_default_mirror(settings: Settings, index: CloudIndex, bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(AZURE_CANADACENTRAL))
    assert result.placement is not None
    assert (result.placement.cloud, result.placement.region, result.placement.prefix) == (
        "Azure", "canadacentral", "20.43.0.0/19")
    assert result.placement.data_date == "changeNumber 336"
    assert result.mirror is not None and "no entry for Azure canadacentral" in result.mirror.reason
    assert result.location == f"{bucket.base('cdn')}/containers/images/{HELD}"


async def test_google_cloud_client_goes_upstream_without_a_check(settings: Settings, index: CloudIndex,
                                                                 bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(GOOGLE_CLOUD))
    assert result.placement is not None and result.placement.cloud == "GCP"
    assert result.mirror is not None and result.mirror.url is None
    assert result.check is None and sum(bucket.heads.values()) == 0
    assert (result.status, result.location) == (307, UP + f"pause/blobs/{HELD}")


async def test_unknown_client_gets_the_default_mirror(settings: Settings, index: CloudIndex, bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(NOBODY))
    assert result.placement is None
    assert result.mirror is not None and "in no known cloud" in result.mirror.reason
    assert result.location == f"{bucket.base('cdn')}/containers/images/{HELD}"
    assert "in no cloud's published ranges" in result.render()


async def test_ipv4_mapped_peer_is_placed_as_ipv4(settings: Settings, index: CloudIndex) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", peer="::ffff:" + AWS_EU_WEST_3)
    assert result.client is not None and "peer" in result.client.source
    assert result.placement is not None and result.placement.prefix == "35.180.0.0/16"
    assert any("IPv4-mapped" in note for note in result.notes)


@pytest.mark.parametrize(
    ("forwarded", "reason"),
    [(AWS_EU_WEST_3, "no entry before the 1 of trusted proxies"), (lb("not-an-ip"), "not an IP address")],
)
async def test_bad_forwarded_header_is_a_400_with_its_reason(settings: Settings, index: CloudIndex, bucket: Any,
                                                             forwarded: str, reason: str) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=forwarded)
    assert (result.status, result.location, result.code) == (400, None, "UNSUPPORTED")
    assert reason in result.render()
    assert sum(bucket.heads.values()) == 0


async def test_malformed_digest_is_refused_before_any_client_lookup(settings: Settings, index: CloudIndex,
                                                                    bucket: Any) -> None:
    result = await explain(settings, index, "/v2/pause/blobs/sha256:totallywrong", forwarded=lb(AWS_EU_WEST_3))
    assert (result.status, result.code, result.client) == (400, "DIGEST_INVALID", None)
    assert "64" in result.verdict and sum(bucket.heads.values()) == 0


async def test_no_check_gives_both_possible_answers(settings: Settings, index: CloudIndex, bucket: Any) -> None:
    result = await explain(settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(AWS_EU_WEST_3), check=False)
    assert result.check is None and sum(bucket.heads.values()) == 0
    assert result.if_in_mirror == f"{bucket.base('eu')}/containers/images/{HELD}"
    assert result.if_not_in_mirror == UP + f"pause/blobs/{HELD}"


def test_no_check_json_says_the_answer_is_unknown_beside_both_candidates(
    settings: Settings, bucket: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ARCHEIO_RANGES_DIR", str(settings.ranges_dir))
    monkeypatch.setenv("ARCHEIO_MIRRORS_FILE", str(settings.mirrors_file))
    monkeypatch.setenv("UPSTREAM_REGISTRY_ENDPOINT", "http://upstream.example")
    args = ["explain", "--json", "--no-check", "--forwarded", lb(AWS_EU_WEST_3), f"/v2/pause/blobs/{HELD}"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    # Without the check nobody knows the answer: it is null, not one of the two guessed.
    assert (printed["status"], printed["location"], printed["backend"]) == (None, None, None)
    assert printed["if_in_mirror"] == f"{bucket.base('eu')}/containers/images/{HELD}"
    assert printed["if_not_in_mirror"] == UP + f"pause/blobs/{HELD}"
    assert sum(bucket.heads.values()) == 0


def test_no_check_human_output_names_both_candidates_and_no_answer(
    settings: Settings, bucket: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ARCHEIO_RANGES_DIR", str(settings.ranges_dir))
    monkeypatch.setenv("ARCHEIO_MIRRORS_FILE", str(settings.mirrors_file))
    assert main(["explain", "--no-check", "--forwarded", lb(AWS_EU_WEST_3), f"/v2/pause/blobs/{HELD}"]) == 0
    labels = [line.split("  ", 1)[0] for line in capsys.readouterr().out.splitlines()]
    assert "if in mirror" in labels and "if not in mirror" in labels
    assert "answer" not in labels


@pytest.mark.parametrize(
    "target", ["docker.io/library/nginx:latest", "gcr.io/x/y:1", "localhost:5000/a:b", "quay.io/pause@" + HELD],
)
def test_reference_to_another_registry_is_refused_in_one_line(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and target in lines[0] and "registry.k8s.io" in lines[0], captured.err


def test_reference_to_this_registry_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--json", "registry.k8s.io/pause:3.9"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "/v2/pause/manifests/3.9"


async def test_manifest_does_not_depend_on_the_client(settings: Settings, index: CloudIndex) -> None:
    result = await explain(settings, index, "pause:3.9", forwarded="garbage")
    assert (result.kind, result.status, result.location) == ("manifest", 307, UP + "pause/manifests/3.9")
    assert result.client is None


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("pause:3.9", "/v2/pause/manifests/3.9"),
        ("pause", "/v2/pause/manifests/latest"),
        ("kubernetes/pause@" + HELD, "/v2/kubernetes/pause/manifests/" + HELD),
        ("registry.k8s.io/pause:3.9", "/v2/pause/manifests/3.9"),
        ("REGISTRY.K8S.IO/pause@" + HELD, "/v2/pause/manifests/" + HELD),
        ("/v2/pause/tags/list?n=2", "/v2/pause/tags/list"),
    ],
)
def test_target_is_a_path_or_an_image_reference(target: str, path: str) -> None:
    assert request_for(target)[0] == path


def test_command_prints_json_for_scripts(settings: Settings, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHEIO_RANGES_DIR", str(settings.ranges_dir))
    monkeypatch.setenv("UPSTREAM_REGISTRY_ENDPOINT", "http://upstream.example")
    assert main(["explain", "--json", "--forwarded", lb(GOOGLE_CLOUD), f"/v2/pause/blobs/{HELD}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["status"], printed["location"]) == (307, UP + f"pause/blobs/{HELD}")
    assert printed["placement"]["cloud"] == "GCP"


def test_readme_example_is_what_the_command_prints(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh shell: no setting in the environment, the embedded range data.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```text\n\$ (archeio explain [^\n]+)\n(.*?)```", readme, re.S)
    assert example is not None, "README.md has no `$ archeio explain` example"
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    assert main(shlex.split(example[1])[1:]) == 0
    assert capsys.readouterr().out == example[2]


def test_command_reads_the_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--upstream-registry-path", "other/path", "pause:3.9"]) == 0
    assert "/v2/other/path/pause/manifests/3.9" in capsys.readouterr().out


def test_command_refuses_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--upstream-registry-endpoint", "ftp://x", "pause:3.9"]) == 2
    assert "configuration error: --upstream-registry-endpoint='ftp://x'" in capsys.readouterr().err


CONSISTENCY_CASES = [
    (f"/v2/pause/blobs/{HELD}", lb(AWS_EU_WEST_3)),
    (f"/v2/pause/blobs/{MISSING}", lb(AWS_EU_WEST_3)),
    (f"/v2/pause/blobs/{HELD}", lb(AWS_US_WEST_2)),
    (f"/v2/pause/blobs/{HELD}", lb(AZURE_CANADACENTRAL)),
    (f"/v2/pause/blobs/{HELD}", lb(GOOGLE_CLOUD)),
    (f"/v2/pause/blobs/{HELD}", lb(NOBODY)),
    (f"/v2/pause/blobs/{HELD}", lb("::ffff:" + AWS_EU_WEST_3)),
    (f"/v2/pause/blobs/{HELD}", lb(f"{AWS_EU_WEST_3}:443")),
    (f"/v2/pause/blobs/{HELD}", AWS_EU_WEST_3),
    (f"/v2/pause/blobs/{HELD}", lb("not-an-ip")),
    ("/v2/pause/blobs/sha256:totallywrong", lb(AWS_EU_WEST_3)),
    ("/v2/pause/blobs/blake3:abc", lb(AWS_EU_WEST_3)),
    ("/v2/pause/manifests/3.9", None),
    ("/v2/pause/manifests/.INVALID_MANIFEST_NAME", None),
    ("/v2/k8s-artifacts-prod/images/pause/tags/list?n=2&last=3.9", None),
    ("/v2/Pause/manifests/1", None),
    ("/v2/", None),
]


async def assert_explain_agrees_with_the_server(
    settings: Settings, index: CloudIndex, start_server: Any, cases: list[tuple[str, str | None]],
) -> None:
    server = await start_server(settings)
    async with aiohttp.ClientSession() as session:
        for target, forwarded in cases:
            headers = {"X-Forwarded-For": forwarded} if forwarded else {}
            async with session.get(server.url + target, headers=headers, allow_redirects=False) as response:
                served = (response.status, response.headers.get("Location"))
            result = await explain(settings, index, target, forwarded=forwarded)
            assert (result.status, result.location) == served, (target, forwarded)


async def test_explain_answers_what_the_running_server_answers(
    settings: Settings, index: CloudIndex, start_server: Any,
) -> None:
    await assert_explain_agrees_with_the_server(settings, index, start_server, CONSISTENCY_CASES)


# -- the signature fallback: the upstream's check and its outcomes ---------------------------

SIGNATURES = "http://signatures.example"


@pytest.fixture
def fallback_settings(settings: Settings, bucket: Any) -> Settings:
    """`settings` with a signature upstream of its own; the regional upstream is the bucket's root."""
    bucket.add_to_registry("k8s-artifacts-prod/images/pause", HELD)
    return replace(settings, upstream_registry_endpoint=bucket.url, signature_upstream_endpoint=SIGNATURES)


def regional(bucket: Any, rest: str) -> str:
    return f"{bucket.url}/v2/k8s-artifacts-prod/images/{rest}"


def signatures(rest: str) -> str:
    return f"{SIGNATURES}/v2/k8s-artifacts-prod/images/{rest}"


async def test_manifest_by_digest_shows_the_upstreams_check(fallback_settings: Settings, index: CloudIndex,
                                                             bucket: Any) -> None:
    result = await explain(fallback_settings, index, f"pause@{HELD}")
    assert result.kind == "manifest" and "signature fallback" in result.verdict
    assert result.upstream_check is not None and result.upstream_check.outcome == "hit"
    assert result.upstream_check.url == regional(bucket, f"pause/manifests/{HELD}")
    assert (result.location, result.backend) == (regional(bucket, f"pause/manifests/{HELD}"), "upstream")


async def test_manifest_the_upstream_lacks_shows_the_fallback(fallback_settings: Settings, index: CloudIndex) -> None:
    result = await explain(fallback_settings, index, f"pause@{MISSING}")
    assert result.upstream_check is not None and result.upstream_check.outcome == "miss"
    assert (result.location, result.backend) == (signatures(f"pause/manifests/{MISSING}"), "signature_fallback")
    rendered = result.render()
    assert "upstream check  HEAD " in rendered and "404, 401 or 403" in rendered
    assert any("signature upstream serves it" in note for note in result.notes)


async def test_aws_blob_shows_both_checks_in_order(fallback_settings: Settings, index: CloudIndex,
                                                   bucket: Any) -> None:
    result = await explain(fallback_settings, index, f"/v2/pause/blobs/{MISSING}", forwarded=lb(AWS_EU_WEST_3))
    assert result.check is not None and result.check.outcome == "miss"
    assert result.check.url == f"{bucket.base('eu')}/containers/images/{MISSING}"
    assert result.upstream_check is not None and result.upstream_check.outcome == "miss"
    assert result.location == signatures(f"pause/blobs/{MISSING}")
    lines = [line.split()[0] + " " + line.split()[1] for line in result.render().splitlines()]
    assert lines.index("check HEAD") < lines.index("upstream check")


async def test_blob_in_the_mirror_shows_no_upstream_check(fallback_settings: Settings, index: CloudIndex) -> None:
    result = await explain(fallback_settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(AWS_EU_WEST_3))
    assert result.check is not None and result.check.outcome == "hit" and result.upstream_check is None


async def test_no_check_gives_every_answer_of_the_fallback(fallback_settings: Settings, index: CloudIndex,
                                                           bucket: Any) -> None:
    result = await explain(fallback_settings, index, f"/v2/pause/blobs/{HELD}", forwarded=lb(AWS_EU_WEST_3),
                           check=False)
    assert sum(bucket.heads.values()) == 0 and result.check is None and result.upstream_check is None
    assert result.if_in_mirror == f"{bucket.base('eu')}/containers/images/{HELD}"
    assert result.if_at_upstream == regional(bucket, f"pause/blobs/{HELD}")
    assert result.if_not_at_upstream == signatures(f"pause/blobs/{HELD}")
    assert (result.status, result.location, result.backend, result.if_not_in_mirror) == (None, None, None, None)
    labels = [line.split("  ")[0].strip() for line in result.render().splitlines()]
    assert labels[-4:-1] == ["if in mirror", "if at upstream", "if not at upstream"]
    assert "answer" not in labels


async def test_no_check_of_a_manifest_by_digest_gives_its_two_answers(fallback_settings: Settings,
                                                                      index: CloudIndex, bucket: Any) -> None:
    result = await explain(fallback_settings, index, f"pause@{HELD}", check=False)
    assert result.if_in_mirror is None
    assert result.if_at_upstream == regional(bucket, f"pause/manifests/{HELD}")
    assert result.if_not_at_upstream == signatures(f"pause/manifests/{HELD}")
    assert result.location is None
    assert json.loads(json.dumps(result.as_dict()))["if_at_upstream"] == result.if_at_upstream


FALLBACK_CONSISTENCY_CASES = [
    (f"/v2/pause/manifests/{HELD}", None),
    (f"/v2/pause/manifests/{MISSING}", None),
    (f"/v2/pause/blobs/{HELD}", lb(AWS_EU_WEST_3)),
    (f"/v2/pause/blobs/{MISSING}", lb(AWS_EU_WEST_3)),
    (f"/v2/pause/blobs/{HELD}", lb(GOOGLE_CLOUD)),
    (f"/v2/pause/blobs/{MISSING}", lb(GOOGLE_CLOUD)),
    (f"/v2/pause/blobs/{MISSING}", lb(NOBODY)),
    ("/v2/pause/manifests/3.9", None),
]


async def test_explain_answers_what_the_running_server_answers_with_the_fallback(
    fallback_settings: Settings, index: CloudIndex, start_server: Any,
) -> None:
    await assert_explain_agrees_with_the_server(fallback_settings, index, start_server, FALLBACK_CONSISTENCY_CASES)
