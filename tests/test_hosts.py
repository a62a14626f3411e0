"""`archeio hosts`: the hosts a pull may be sent to, and that no answer of the flow leaves them.

The list is only worth quoting in an allow-list if every Location the
server can answer falls in it: the flow (app.py) answers manifests, tags,
referrers, signature tags and blobs (found in the mirror or not) for one
client address in every region of every cloud in the embedded range data,
and each Location's host must be listed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from archeio.app import PendingCheck, RequestFlow
from archeio.cli import main
from archeio.config import Settings
from archeio.hosts import hosts
from archeio.routing import Decision
from iprange import CloudIndex
from iprange.embedded import load_embedded

from .conftest import make_settings

DIGEST = "sha256:" + "c" * 64
LB = "130.211.0.1"


class KnownCache:
    """The existence cache's two faces, answering the same for every blob."""

    def __init__(self, found: bool) -> None:
        self.found = found

    def cached(self, mirror: str, digest: str) -> bool | None:
        return self.found

    async def check(self, mirror: str, digest: str) -> bool:
        return self.found


def one_address_per_region() -> Iterator[tuple[str, str, str]]:
    """(cloud, region, an address in it) for every region of the embedded data, IPv4 and IPv6."""
    seen: set[tuple[str, str, int]] = set()
    for provider in load_embedded():
        for prefix, region in provider.prefixes:
            network = ipaddress.ip_network(prefix)
            key = (provider.cloud, region, network.version)
            if key not in seen:
                seen.add(key)
                yield provider.cloud, region, str(network.network_address + 1)


REQUESTS = [
    f"/v2/pause/blobs/{DIGEST}",
    "/v2/pause/manifests/3.10",
    f"/v2/pause/manifests/{DIGEST}",
    "/v2/pause/tags/list",
    f"/v2/pause/referrers/{DIGEST}",
    "/v2/pause/manifests/sha256-" + "c" * 64 + ".sig",
]


@pytest.fixture(scope="module")
def production() -> Settings:
    """The defaults (registry.k8s.io's own settings), with a separate signature registry."""
    return make_settings(SIGNATURE_UPSTREAM_ENDPOINT="https://us-docker.pkg.dev")


def locations(settings: Settings, index: CloudIndex, forwarded: str) -> Iterator[str]:
    for found in (True, False):
        flow = RequestFlow(settings, index, KnownCache(found))  # type: ignore[arg-type]
        for path in REQUESTS:
            outcome = flow.respond("GET", path, "", forwarded, "127.0.0.1")
            if isinstance(outcome, PendingCheck):
                outcome = flow.decide_checked(outcome, found)
            assert isinstance(outcome, Decision), (path, forwarded, outcome)
            yield outcome.location


def test_every_location_the_flow_answers_is_on_the_list(production: Settings, cloud_index: CloudIndex) -> None:
    listed = {h.host for h in hosts(production)}
    clients = [address for _, _, address in one_address_per_region()] + ["192.168.0.1"]
    assert len(clients) > 100  # every region of three clouds
    answered = {host_of_location(location) for client in clients for location in locations(production, cloud_index,
                                                                                  f"{client}, {LB}")}
    assert answered <= listed, answered - listed
    # Every mirror of the table is some region's answer: the list holds nothing no pull reaches.
    assert answered == listed


def host_of_location(location: str) -> str:
    """The host of a Location, as the list names it."""
    return location.split("/", 3)[2]


def test_a_custom_deployment_lists_its_own_hosts(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors.toml"
    mirrors.write_text('[mirrors.AWS]\n"eu-west-3" = "http://127.0.0.1:9000/eu"\n"eu-west-1" = '
                       '"http://127.0.0.1:9000/eu"\n[mirrors.Azure]\n"westeurope" = "https://[2001:db8::1]/az"\n')
    settings = make_settings(UPSTREAM_REGISTRY_ENDPOINT="https://registry.example:8443",
                             DEFAULT_AWS_BASE_URL="https://cdn.example:443", ARCHEIO_MIRRORS_FILE=str(mirrors))
    found = {h.host: h for h in hosts(settings)}
    assert set(found) == {"registry.example:8443", "cdn.example", "127.0.0.1:9000", "[2001:db8::1]"}
    assert found["127.0.0.1:9000"].scheme == "http"
    assert found["127.0.0.1:9000"].reasons == (f"blobs for AWS eu-west-3, eu-west-1 ({mirrors})",)


def test_the_signature_registry_is_listed_only_when_set() -> None:
    assert "us-docker.pkg.dev" not in {h.host for h in hosts(make_settings())}
    assert "us-docker.pkg.dev" in {h.host for h in hosts(make_settings(
        SIGNATURE_UPSTREAM_ENDPOINT="https://us-docker.pkg.dev"))}


REGIONS = """\
# Cloud Run regions: whatever the layout, every http(s) URL counts.
[regions.europe-west1]
upstream = "https://europe-west1-docker.pkg.dev"
default_mirror = "https://d1be1w964nk82h.cloudfront.net"
note = "not a URL"

[regions.us-east4]
upstream = "https://us-east4-docker.pkg.dev"
default_mirror = "https://d1be1w964nk82h.cloudfront.net"

[[extra]]
urls = ["https://asia-east1-docker.pkg.dev", "ftp://ignored.example"]
"""


def test_every_url_of_a_regions_table_is_listed(tmp_path: Path) -> None:
    table = tmp_path / "regions.toml"
    table.write_text(REGIONS)
    base = {h.host for h in hosts(make_settings())}
    found = {h.host: h for h in hosts(make_settings(), table)}
    assert set(found) - base == {"europe-west1-docker.pkg.dev", "us-east4-docker.pkg.dev", "asia-east1-docker.pkg.dev"}
    assert found["europe-west1-docker.pkg.dev"].reasons == ("regions.toml: upstream of regions europe-west1",)
    assert found["asia-east1-docker.pkg.dev"].reasons == ("regions.toml: urls[0] of extra[0]",)
    assert "regions.toml: default_mirror of regions europe-west1, us-east4" in found[
        "d1be1w964nk82h.cloudfront.net"].reasons


@pytest.mark.parametrize("text, message", [
    ("[regions]\nname = 'no url here'\n", "no http(s) URL in it"),
    ("[regions\n", "Expected ']'"),
])
def test_a_regions_table_without_urls_or_not_toml_is_refused(
        tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "regions.toml"
    table.write_text(text)
    assert main(["hosts", "--regions", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"archeio hosts: --regions {table}: ") and message in err and err.count("\n") == 1


def test_a_missing_regions_table_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hosts", "--regions", str(tmp_path / "absent.toml")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_plain_output_is_one_host_a_line_and_json_carries_the_reasons(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARCHEIO_MIRRORS_FILE", raising=False)
    assert main(["hosts", "--plain"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main(["hosts", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert plain == [entry["host"] for entry in listed] == sorted(plain)
    assert all(entry["scheme"] == "https" and entry["reasons"] for entry in listed)
    assert main(["hosts"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table] == plain
