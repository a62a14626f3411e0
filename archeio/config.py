"""Settings: read once at start-up from the environment and flags, validated, frozen.

Every setting is one row of `SETTINGS`: its environment variable, its
`archeio serve` flag, its default and its meaning. The README's settings
table, the command line and the deploy tests are all made from that one
table, so they cannot drift apart. The five upstream variables keep the
names and defaults of the Go server; everything of ours is `ARCHEIO_*`.

A bad value stops start-up with a one-line `ConfigError` naming the
variable; the command line turns it into exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import argparse  # the command line's: a server started from the environment parses no flags

INFO_URL = "https://github.com/kubernetes/registry.k8s.io"
PRIVACY_URL = "https://www.linuxfoundation.org/privacy-policy/"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def _base_url(value: str) -> str:
    """An absolute http(s) URL with a host and nothing after the path."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry a query, fragment or user info")
    if not value.isascii() or any(c in value for c in " \t\r\n\\\"<>{}|^`"):
        raise ValueError("contains characters not allowed in a URL")
    parts.port  # noqa: B018 - raises ValueError for a bad port
    return value.rstrip("/")


def _optional_base_url(value: str) -> str:
    return _base_url(value) if value else ""


def _registry_path(value: str) -> str:
    segments = [s for s in value.strip("/").split("/") if s]
    for segment in segments:
        if segment in (".", "..") or not all(c.isalnum() or c in "._-" for c in segment):
            raise ValueError(f"bad path segment {segment!r}")
    return "/".join(segments)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return port


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1e9:
        raise ValueError("must be a number of seconds, 0 or more")
    return number


def _positive_seconds(value: str) -> float:
    """A duration that bounds a wait: 0 would mean "wait for ever" to aiohttp and asyncio."""
    number = float(value)
    if not 0 < number < 1e9:
        raise ValueError("must be a number of seconds greater than 0")
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1e9:
        raise ValueError("must be a number of requests a second, 0 (off) or more")
    return number


def _http_engine(value: str) -> str:
    from .http import ENGINES  # the one list of engines

    engine = value.strip().lower()
    if engine not in ENGINES:
        raise ValueError("must be " + " or ".join(ENGINES))
    return engine


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError("must be a number from 0 to 1")
    return number


def _providers(value: str) -> tuple[str, ...]:
    """Comma-separated provider names as the range data names them (any case), canonical."""
    from iprange.parse import FILE_NAMES  # the one list of providers

    known = {cloud.lower(): cloud for cloud in FILE_NAMES}
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise ValueError(f"unknown provider {unknown[0]!r}: must be " + ", ".join(FILE_NAMES))
    return tuple(dict.fromkeys(known[name.lower()] for name in names))


def _existing_dir(value: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{value}: no such directory")
    return path


def _existing_file(value: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{value}: no such file")
    return path


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    field: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    # How each HTTP engine honours it, where they differ ("" where both do alike).
    engines: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("port", "PORT", "8080", _port, "Public HTTP port (upstream's variable)."),
    Setting("host", "ARCHEIO_HOST", "0.0.0.0", str, "Address the public port binds to."),
    Setting(
        "http", "ARCHEIO_HTTP", "httptools", _http_engine,
        "HTTP engine of the public port: `httptools` (our lean protocol, the fastest) or `aiohttp` "
        "(aiohttp's server, battle-tested); the same answers, limits and metrics.",
    ),
    Setting(
        "upstream_registry_endpoint", "UPSTREAM_REGISTRY_ENDPOINT",
        "https://us-central1-docker.pkg.dev", _base_url,
        "Source registry that manifests, tags, referrers and fallback blobs go to.",
    ),
    Setting(
        "upstream_registry_path", "UPSTREAM_REGISTRY_PATH", "k8s-artifacts-prod/images",
        _registry_path, "Repository prefix on the source registry.",
    ),
    Setting(
        "signature_upstream_endpoint", "SIGNATURE_UPSTREAM_ENDPOINT", "", _optional_base_url,
        "Registry for cosign `.sig`/`.att` tags and the referrers API; empty: the source registry. "
        "When set to another registry, it is also where content by digest goes when the source registry "
        "lacks it (manifests by digest, and blobs no mirror serves, checked there first).",
    ),
    Setting(
        "default_aws_base_url", "DEFAULT_AWS_BASE_URL", "https://d1be1w964nk82h.cloudfront.net",
        _base_url, "Blob mirror for clients with no regional mirror (the CDN).",
    ),
    Setting(
        "ranges_dir", "ARCHEIO_RANGES_DIR", "", _existing_dir,
        "Directory of provider range files; empty: the embedded data.",
    ),
    Setting(
        "optional_providers", "ARCHEIO_OPTIONAL_PROVIDERS", "", _providers,
        "Providers whose ranges may be absent at start (comma-separated: AWS, GCP, Azure). Google "
        "Cloud's and those of every cloud of the mirror table are required otherwise: a start without "
        "them exits 2, and a reload never drops them.",
    ),
    Setting(
        "mirrors_file", "ARCHEIO_MIRRORS_FILE", "", _existing_file,
        "TOML table of blob mirrors by cloud and region; empty: upstream's built-in AWS table.",
    ),
    Setting(
        "trusted_hops", "ARCHEIO_TRUSTED_HOPS", "1", _non_negative_int,
        "X-Forwarded-For entries appended by trusted proxies after the client's own "
        "(1: Google's load balancer, `<client>,<lb>`; 0: the last entry is the client).",
    ),
    Setting(
        "use_forwarded", "ARCHEIO_USE_FORWARDED", "true", _bool,
        "Take the client address from X-Forwarded-For (false: always the peer address).",
    ),
    Setting(
        "rate_limit", "ARCHEIO_RATE_LIMIT", "0", _rate,
        "Requests a second each client address may send, per worker process (0: no limit); beyond it, "
        "429 with Retry-After. The address is the one blobs are routed by; the effective limit is this "
        "times workers times replicas (docs/operations.md).",
    ),
    Setting(
        "rate_burst", "ARCHEIO_RATE_BURST", "100", _positive_int,
        "Requests a client may send at once before ARCHEIO_RATE_LIMIT applies (its token bucket's size).",
    ),
    Setting(
        "rate_clients", "ARCHEIO_RATE_CLIENTS", "16384", _positive_int,
        "Clients whose rate-limit bucket is remembered, per worker (at most 180 bytes each, measured); "
        "when full, the buckets nearest to full are forgotten first.",
    ),
    Setting(
        "cache_hit_ttl", "ARCHEIO_CACHE_HIT_TTL", "3600", _positive_seconds,
        "Seconds a blob found in a mirror is remembered.",
    ),
    Setting(
        "cache_miss_ttl", "ARCHEIO_CACHE_MISS_TTL", "60", _positive_seconds,
        "Seconds a blob missing from a mirror is remembered (at most one HEAD per blob and mirror in that time).",
    ),
    Setting(
        "cache_error_ttl", "ARCHEIO_CACHE_ERROR_TTL", "5", _positive_seconds,
        "Seconds a failed or timed-out check is remembered as 'not there'.",
    ),
    Setting(
        "cache_size", "ARCHEIO_CACHE_SIZE", "200000", _positive_int,
        "Entries in each of the hit and miss caches (bounds memory: about 240 bytes a configured entry, "
        "measured; up to 570 with the signature fallback, whose entries hold the repository name); each "
        "forgets half of its entries at a time when full.",
    ),
    Setting(
        "head_timeout", "ARCHEIO_HEAD_TIMEOUT", "1.0", _positive_seconds,
        "Deadline in seconds for one existence HEAD to a mirror, or to the upstream for the signature "
        "fallback (upstream: 5).",
    ),
    Setting(
        "head_concurrency", "ARCHEIO_HEAD_CONCURRENCY", "256", _positive_int,
        "Existence HEADs in flight at most; requests beyond go straight upstream.",
    ),
    Setting(
        "breaker_failures", "ARCHEIO_BREAKER_FAILURES", "5", _positive_int,
        "Consecutive failed HEADs that open a mirror's (or the upstream's) circuit breaker.",
    ),
    Setting(
        "breaker_cooldown", "ARCHEIO_BREAKER_COOLDOWN", "10", _positive_seconds,
        "Seconds an open breaker sends that mirror's blobs upstream before probing it again.",
    ),
    Setting(
        "header_timeout", "ARCHEIO_HEADER_TIMEOUT", "2", _positive_seconds,
        "Seconds a client has to send a request's headers (upstream: read-header 2 s); "
        "the connection closes, and at the connection limit one past half of it may be closed.",
        "both: our tracker closes the connection, no answer",
    ),
    Setting(
        "keepalive_timeout", "ARCHEIO_KEEPALIVE_TIMEOUT", "620", _positive_seconds,
        "Seconds an idle keep-alive connection is kept (above Google's load balancer's 600 s).",
        "both (aiohttp's own keep-alive timeout too)",
    ),
    Setting(
        "max_connections", "ARCHEIO_MAX_CONNECTIONS", "20000", _positive_int,
        "Open client connections at most per worker. A new one beyond it closes the longest-idle "
        "connection, else one past half its header deadline, else the newcomer itself.",
        "both: our tracker",
    ),
    Setting(
        "linger_timeout", "ARCHEIO_LINGER_TIMEOUT", "2", _positive_seconds,
        "Seconds a connection we close keeps reading and discarding what the client still sends, after "
        "our last answer and our FIN, so that no reset destroys answers it has not read (RFC 9112 9.6); "
        "restarted while the client is still reading answers owed to it.",
        "both: our lingering close",
    ),
    Setting(
        "linger_bytes", "ARCHEIO_LINGER_BYTES", "65536", _positive_int,
        "Most bytes read and discarded while lingering; more closes the connection at once.",
        "both: our lingering close",
    ),
    Setting(
        "max_request_line", "ARCHEIO_MAX_REQUEST_LINE", "8192", _positive_int,
        "Longest request target in bytes (longer: 414).",
        "httptools: the target, 414; aiohttp: the target, 400",
    ),
    Setting(
        "max_header_bytes", "ARCHEIO_MAX_HEADER_BYTES", "16384", _positive_int,
        "Most bytes of request headers (more: 431).",
        "httptools: all headers together, 431; aiohttp: each header name and value, 400 (at most 128 headers)",
    ),
    Setting("log_level", "ARCHEIO_LOG_LEVEL", "info", _log_level, "debug, info, warning or error."),
    Setting(
        "access_log", "ARCHEIO_ACCESS_LOG", "0", _fraction,
        "Share of requests that get a JSON access log line (0: none, as upstream; 1: all).",
    ),
    Setting(
        "trace_project", "ARCHEIO_TRACE_PROJECT", "", str,
        "Google Cloud project id: access log lines then link X-Cloud-Trace-Context traces.",
    ),
    Setting(
        "admin_port", "ARCHEIO_ADMIN_PORT", "9090", _port,
        "Admin port: /metrics, /healthz, /readyz (0: off). Never the public port.",
    ),
    Setting("admin_host", "ARCHEIO_ADMIN_HOST", "0.0.0.0", str, "Address the admin port binds to."),
    Setting(
        "workers", "ARCHEIO_WORKERS", "1", _positive_int,
        "Worker processes sharing the public port (SO_REUSEPORT); use one per core.",
    ),
    Setting(
        "ranges_refresh", "ARCHEIO_RANGES_REFRESH", "0", _seconds,
        "Seconds between re-reads of ARCHEIO_RANGES_DIR (0: only on SIGHUP).",
    ),
    Setting(
        "ranges_max_loss", "ARCHEIO_RANGES_MAX_LOSS", "0.2", _fraction,
        "Largest share of a provider's prefixes a reload may drop; a file losing more is refused.",
    ),
    Setting(
        "drain_delay", "ARCHEIO_DRAIN_DELAY", "0", _seconds,
        "Seconds to keep serving after SIGTERM while /readyz fails, so load balancers stop sending.",
    ),
    Setting(
        "grace_period", "ARCHEIO_GRACE_PERIOD", "5", _positive_seconds,
        "Seconds in-flight requests get to finish once the port stops accepting (upstream: 5).",
        "both",
    ),
)


@dataclass(frozen=True)
class Mirrors:
    """Blob mirror base URLs by cloud and region."""

    by_cloud: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def mirror_url_for(self, cloud: str, region: str) -> str | None:
        return self.by_cloud.get(cloud, {}).get(region)

    def all_urls(self) -> set[str]:
        return {url for regions in self.by_cloud.values() for url in regions.values()}


def parse_mirrors(text: str) -> Mirrors:
    """Parse the `[mirrors.<Cloud>]` TOML format; every value must be a base URL.

    A cloud is named as the range data names it (AWS, GCP, Azure): a table
    under another name could never match a client, and its cloud's ranges
    are required at start (providers.py).
    """
    import tomllib  # only for a mirrors file: the built-in table is JSON (start-up cost)

    from iprange.parse import FILE_NAMES

    doc = tomllib.loads(text)
    tables = doc.get("mirrors", {})
    if not isinstance(tables, dict):
        raise ValueError("`mirrors` must be a table of clouds")
    by_cloud: dict[str, dict[str, str]] = {}
    for cloud, regions in tables.items():
        if cloud not in FILE_NAMES:
            raise ValueError(f"[mirrors.{cloud}]: unknown cloud, must be " + ", ".join(FILE_NAMES))
        if not isinstance(regions, dict):
            raise ValueError(f"[mirrors.{cloud}] must be a table of region = URL")
        parsed: dict[str, str] = {}
        for region, url in regions.items():
            if not isinstance(url, str):
                raise ValueError(f"mirrors.{cloud}.{region}: must be a URL string")
            try:
                parsed[region] = _base_url(url)
            except ValueError as exc:
                raise ValueError(f"mirrors.{cloud}.{region}: {exc}") from None
        by_cloud[cloud] = parsed
    return Mirrors(by_cloud)


def builtin_mirrors() -> Mirrors:
    """Upstream's built-in AWS region -> bucket table, shipped as data (archeio/data/aws-mirrors.json).

    JSON, and not checked URL by URL at each start: reading it as TOML and
    checking every URL was a twentieth of a start's work. A test checks the
    table as `parse_mirrors` would check a mirrors file.
    """
    import json

    doc = json.loads((Path(__file__).parent / "data" / "aws-mirrors.json").read_bytes())
    return Mirrors({cloud: dict(regions) for cloud, regions in doc["mirrors"].items()})


@dataclass(frozen=True)
class Settings:
    """Every setting of the server, validated."""

    port: int
    host: str
    http: str
    upstream_registry_endpoint: str
    upstream_registry_path: str
    signature_upstream_endpoint: str
    default_aws_base_url: str
    ranges_dir: Path | None
    optional_providers: tuple[str, ...]
    mirrors_file: Path | None
    trusted_hops: int
    use_forwarded: bool
    rate_limit: float
    rate_burst: int
    rate_clients: int
    cache_hit_ttl: float
    cache_miss_ttl: float
    cache_error_ttl: float
    cache_size: int
    head_timeout: float
    head_concurrency: int
    breaker_failures: int
    breaker_cooldown: float
    header_timeout: float
    keepalive_timeout: float
    max_connections: int
    linger_timeout: float
    linger_bytes: int
    max_request_line: int
    max_header_bytes: int
    log_level: str
    access_log: float
    trace_project: str
    admin_port: int
    admin_host: str
    workers: int
    ranges_refresh: float
    ranges_max_loss: float
    drain_delay: float
    grace_period: float
    mirrors: Mirrors = field(default_factory=Mirrors)
    info_url: str = INFO_URL
    privacy_url: str = PRIVACY_URL

    @property
    def signature_fallback(self) -> bool:
        """Content by digest that the source registry lacks goes to the signature upstream.

        Only when that is another registry: signatures pushed to the
        source registry itself need no fallback.
        """
        return bool(self.signature_upstream_endpoint) and (
            self.signature_upstream_endpoint != self.upstream_registry_endpoint
        )

    def summary(self) -> dict[str, object]:
        """The loaded configuration, for the start-up log line."""
        values = {s.env: getattr(self, s.field) for s in SETTINGS}
        values["mirrors"] = {c: len(r) for c, r in self.mirrors.by_cloud.items()}
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per setting; a flag given wins over its variable."""
    for s in SETTINGS:
        parser.add_argument(
            s.flag, dest=s.field, default=None, metavar="VALUE",
            help=f"{s.help} [${s.env}, default {s.default or 'empty'}]",
        )


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, str | None] | None = None
) -> Settings:
    """Build `Settings` from the environment and flag values; ConfigError if bad."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = overrides.get(s.field)
        source = s.flag if raw is not None else s.env
        if raw is None:
            raw = env.get(s.env, s.default)
        try:
            values[s.field] = s.parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None
    mirrors_file = values["mirrors_file"]
    if mirrors_file is None:
        values["mirrors"] = builtin_mirrors()
    else:
        try:
            values["mirrors"] = parse_mirrors(mirrors_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"ARCHEIO_MIRRORS_FILE={str(mirrors_file)!r}: {exc}") from None
    return Settings(**values)


def settings_table() -> str:
    """The README's Markdown table of every setting."""
    rows = [
        "| variable | flag | default | meaning | engines: how honoured |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        rows.append(f"| `{s.env}` | `{s.flag}` | `{s.default}` | {s.help} | {s.engines} |")
    return "\n".join(rows)
