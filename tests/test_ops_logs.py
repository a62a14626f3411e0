"""Structured logs: every stderr line is a JSON object Cloud Logging understands.

A real `archeio serve` with access logs on answers a few kinds of request;
its stderr lines are parsed as JSON and the access lines must carry
Cloud Logging's `severity` and `httpRequest` fields, our decision fields,
and the trace id from X-Cloud-Trace-Context.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import AWS_EU_WEST_3, GOOGLE_CLOUD
from .ops_support import (
    BLOB,
    LOAD_BALANCER,
    ArcheioProcess,
    ThreadedBucket,
    blob_url,
    http_get,
    wait_for,
    write_mirrors,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

TRACE_ID = "105445aa7843bc8bf206b12000100000"
PROJECT = "demo-project"


@pytest.fixture(scope="module")
def access_entries(engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The access log lines of one request of each kind, in request order."""
    tmp = tmp_path_factory.mktemp("logs")
    with ThreadedBucket() as bucket:
        env = {
            "ARCHEIO_ACCESS_LOG": "1",
            "ARCHEIO_TRACE_PROJECT": PROJECT,
            "ARCHEIO_MIRRORS_FILE": str(write_mirrors(tmp / "mirrors.toml", {"eu-west-3": bucket.base("p")})),
        }
        with ArcheioProcess(tmp / "stderr.log", **env) as server:
            traced = {**xff(AWS_EU_WEST_3), "X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1"}
            requests = [
                (blob_url(server), traced, 307),  # needs a HEAD first
                (blob_url(server), traced, 307),  # answered from the cache
                (f"{server.url}/v2/pause/manifests/3.10?ns=x", xff(GOOGLE_CLOUD), 307),
                (f"{server.url}/v2/", {}, 200),
                (blob_url(server), {"X-Forwarded-For": "not-an-address"}, 400),
            ]
            for url, headers, status in requests:
                assert http_get(url, headers)[0] == status

            def access_lines() -> list[dict[str, Any]]:
                return [e for e in server.log_entries() if e["logger"] == "archeio.access"]

            wait_for(lambda: len(access_lines()) == len(requests), what="one access line per request")
            yield access_lines()


def test_every_access_line_has_the_cloud_logging_request_fields(access_entries: list[dict[str, Any]]) -> None:
    for entry in access_entries:
        assert entry["severity"] == "INFO"
        request = entry["httpRequest"]
        assert request["requestMethod"] == "GET"
        assert request["requestUrl"].startswith("/v2/")
        assert isinstance(request["status"], int)
        assert re.fullmatch(r"\d+\.\d{6}s", request["latency"]), request["latency"]
        assert request["remoteIp"]


def test_blob_line_carries_decision_client_and_trace(access_entries: list[dict[str, Any]]) -> None:
    first, cached = access_entries[0], access_entries[1]
    for entry in (first, cached):
        assert entry["httpRequest"]["status"] == 307
        assert entry["httpRequest"]["remoteIp"] == AWS_EU_WEST_3
        assert (entry["cloud"], entry["region"], entry["backend"]) == ("AWS", "eu-west-3", "mirror")
        assert entry["location"].endswith(f"/p/containers/images/{BLOB}")
        assert entry["trace"] == TRACE_ID
        assert entry["logging.googleapis.com/trace"] == f"projects/{PROJECT}/traces/{TRACE_ID}"


def test_manifest_line_keeps_the_query_and_has_no_trace(access_entries: list[dict[str, Any]]) -> None:
    entry = access_entries[2]
    assert entry["httpRequest"]["requestUrl"] == "/v2/pause/manifests/3.10?ns=x"
    assert (entry["kind"], entry["backend"]) == ("manifest", "upstream")
    assert entry["httpRequest"]["remoteIp"] == GOOGLE_CLOUD
    assert "trace" not in entry


def test_local_answers_are_logged_with_their_status(access_entries: list[dict[str, Any]]) -> None:
    root, refused = access_entries[3], access_entries[4]
    assert (root["httpRequest"]["status"], root["backend"]) == (200, "local")
    assert root["httpRequest"]["remoteIp"] == LOAD_BALANCER  # no X-Forwarded-For: the peer
    assert (refused["httpRequest"]["status"], refused["kind"]) == (400, "blob")


def test_event_lines_are_json_too(tmp_path: Path) -> None:
    # Start-up and shutdown lines of a plain server: JSON objects with a severity.
    server = ArcheioProcess(tmp_path / "stderr.log")
    with server:
        pass
    entries = server.log_entries()
    messages = [e["message"] for e in entries]
    assert any(m.startswith("serving on") for m in messages) and "stopped" in messages
    assert all({"severity", "time", "message"} <= set(e) for e in entries)
