"""Benchmark `archeio mirror`: throughput between local servers, and memory against blob size.

Starts a real docker-registry and moto's S3 server on loopback, pushes
random (incompressible) blobs through the registry API, then runs the
mirror as a subprocess (`python -m archeio mirror`) for each workload into a
fresh bucket and reports, per run:

- MB/s: blob bytes copied / wall-clock seconds of the whole run (walk,
  checks, copies, markers);
- peak RSS of the mirror process (from wait4, the kernel's own figure);
- its CPU seconds (user + system).

Workloads: ~200 MB as 50 blobs of 4 MiB, and ~200 MB as 3 blobs of 64 MiB.
If memory held whole blobs, the second would peak ~60 MiB higher per blob
in flight; streamed in parts, both peak about the same. A `--dry-run` of
the first workload gives the baseline RSS (interpreter, aiohttp, boto3).

moto is a pure-Python S3 server and is the bottleneck here: the figures
bound the mirror from below, they are not what it does against real S3.

    .venv/bin/python benchmarks/mirror_throughput.py [--buckets 2] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration import services  # noqa: E402 - the suite's real-server helpers

MiB = 1024 * 1024
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class Workload:
    name: str
    images: int
    layers_per_image: int
    layer_size: int

    @property
    def blobs(self) -> int:
        return self.images * self.layers_per_image

    @property
    def bytes(self) -> int:
        return self.blobs * self.layer_size


WORKLOADS = (
    Workload("small-blobs", images=5, layers_per_image=10, layer_size=4 * MiB),
    Workload("large-blobs", images=3, layers_per_image=1, layer_size=64 * MiB),
)


def push_blob(registry: str, repository: str, data: bytes) -> dict[str, object]:
    """A monolithic blob upload (POST, then PUT with the digest); its descriptor."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"{registry}/v2/{repository}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(start, timeout=30) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = registry + location
    separator = "&" if "?" in location else "?"
    upload = urllib.request.Request(
        f"{location}{separator}digest={digest}", method="PUT", data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(upload, timeout=120) as response:
        assert response.status == 201, response.status
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len(data)}


def push_workload(registry: str, workload: Workload) -> str:
    """Push the workload's images under one repository; its name."""
    repository = f"bench/{workload.name}"
    for i in range(workload.images):
        layers = [
            push_blob(registry, repository,
                      hashlib.shake_256(f"{workload.name}/{i}/{n}".encode()).digest(workload.layer_size))
            for n in range(workload.layers_per_image)
        ]
        config = push_blob(registry, repository, json.dumps({"image": i, "workload": workload.name}).encode())
        config["mediaType"] = "application/vnd.oci.image.config.v1+json"
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers,
        }).encode()
        request = urllib.request.Request(
            f"{registry}/v2/{repository}/manifests/v{i}", method="PUT", data=manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201, response.status
    return repository


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    cpu_seconds: float
    summary: str


def run_mirror(registry: str, destinations: list[str], repository: str, extra: list[str]) -> Run:
    argv = [sys.executable, "-m", "archeio", "mirror", "--source", registry, "--progress", "log",
            *[a for url in destinations for a in ("--to", url)], *extra, repository]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHEIO_", "AWS_"))}
    env.update(AWS_ENV)
    with tempfile.TemporaryFile() as output:
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=output, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"mirror failed ({process.returncode}):\n{text[-3000:]}")
    summary = next((line for line in text.splitlines() if line.startswith("summary:")), "")
    # ru_maxrss is in KiB on Linux.
    return Run(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, default=1, help="destination buckets per run (default 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="the mirror's --concurrency (default 8)")
    parser.add_argument("--part-size", type=int, default=8, help="the mirror's --part-size in MiB (default 8)")
    args = parser.parse_args()
    extra = ["--concurrency", str(args.concurrency), "--part-size", str(args.part_size), "--rate", "1000"]

    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        workdir = Path(tmp)
        with services.docker_registry(workdir) as registry, services.s3_server(workdir) as s3:
            os.environ.update(AWS_ENV)  # for the set-up client below
            repositories = {}
            for workload in WORKLOADS:
                started = time.monotonic()
                repositories[workload.name] = push_workload(registry.url, workload)
                print(f"pushed {workload.name}: {workload.blobs} blobs of {workload.layer_size // MiB} MiB "
                      f"in {time.monotonic() - started:.1f} s", file=sys.stderr)

            def buckets() -> list[str]:
                return [s3.create_bucket(f"bench-{uuid.uuid4().hex[:12]}") for _ in range(args.buckets)]

            rows = []
            baseline = run_mirror(registry.url, buckets(), repositories["small-blobs"], [*extra, "--dry-run"])
            rows.append(("baseline (dry run)", 0, 0, baseline))
            for workload in WORKLOADS:
                run = run_mirror(registry.url, buckets(), repositories[workload.name], extra)
                rows.append((workload.name, workload.blobs, workload.bytes, run))
                print(run.summary, file=sys.stderr)

    print(f"\narcheio mirror: local docker-registry -> moto S3, {args.buckets} bucket(s), "
          f"--concurrency {args.concurrency}, --part-size {args.part_size} MiB, {os.cpu_count()} CPUs")
    print(f"{'workload':<20} {'blobs':>5} {'MB':>7} {'seconds':>8} {'MB/s':>7} {'peak RSS MiB':>13} {'CPU s':>6}")
    for name, blobs, size, run in rows:
        rate = f"{size / 1e6 / run.seconds:7.1f}" if size else "      -"
        print(f"{name:<20} {blobs:>5} {size / 1e6:>7.1f} {run.seconds:>8.2f} {rate} "
              f"{run.peak_rss_mib:>13.1f} {run.cpu_seconds:>6.2f}")
    small, large = rows[1][3], rows[2][3]
    print(f"\npeak RSS, 64 MiB blobs minus 4 MiB blobs: {large.peak_rss_mib - small.peak_rss_mib:+.1f} MiB "
          f"(a whole-blob buffer would add ~{(64 - 4) * min(args.concurrency, 3)} MiB)")


if __name__ == "__main__":
    main()
