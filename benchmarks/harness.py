"""What every benchmark script needs: ports, processes, CPU accounting, the machine.

The benchmarks use the server only through its public faces: they start the
real `archeio serve` command as a subprocess with settings in its
environment, talk HTTP to it on loopback, and read its CPU time from
/proc. Every process started here is stopped by its own PID (its process
group, which it leads), also when the benchmark fails.

Only loopback addresses are ever used: servers bind 127.0.0.1 and every
URL built here points there.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
LOOPBACK = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The range data of every benchmark: the embedded data, the same on every
# machine (set explicitly: servers otherwise inherit the caller's environment).
EMBEDDED_RANGES = {"ARCHEIO_RANGES_DIR": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def pinned(cpus: str | None, command: Sequence[str]) -> list[str]:
    """`command` run on the given CPU list (taskset syntax), when asked and possible."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return list(command)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def can_pin() -> bool:
    """Pinning the server and the load generator apart needs two CPUs and taskset."""
    return cpu_count() >= 2 and shutil.which("taskset") is not None


class Process:
    """A child process in its own process group, stopped by its PID."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None,
                 log: Path | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.command = list(command)
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.command, env=dict(env) if env is not None else None, cwd=cwd,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group this process leads, then SIGKILL after `timeout`."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_status(port: int, path: str = "/v2/", timeout: float = 1.0) -> int | None:
    """One GET on loopback; the status, or None if nothing answers yet."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_until_serving(process: Process, port: int, path: str = "/v2/", timeout: float = 30.0) -> None:
    """Poll until `port` answers HTTP; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode} before serving")
        if http_status(port, path) is not None:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not serve on port {port} within {timeout} s")


# Where servers run: not the repository, whose `archeio/` package would come
# first on the path of anything started with `python -m` (worker processes)
# and could differ from the installed one being measured.
SERVER_CWD = Path(tempfile.gettempdir())


def archeio_command(tree: Path | None = None) -> list[str]:
    """The real `archeio serve` console script of this interpreter's environment.

    With `tree` (another checkout, such as the code before a change), the
    same interpreter and dependencies run that checkout's code instead:
    `python -m archeio serve` with `tree_env(tree)` in its environment.
    """
    if tree is not None:
        return [sys.executable, "-m", "archeio", "serve"]
    script = Path(sys.executable).parent / "archeio"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "archeio", "serve"]


def add_tree_argument(parser: argparse.ArgumentParser) -> None:
    """`--tree PATH`: the benchmark serves that checkout's code (`archeio_command`)."""
    parser.add_argument("--tree", type=Path, metavar="PATH",
                        help="serve this checkout's archeio instead of the installed one (e.g. the code "
                        "before a change), with this environment's interpreter and dependencies")


def tree_env(tree: Path | None) -> dict[str, str]:
    """The environment that makes `archeio_command(tree)` import `tree`'s archeio (and iprange)."""
    return {"PYTHONPATH": str(tree.resolve())} if tree is not None else {}


def start_serving(name: str, command: Sequence[str], port: int, env: Mapping[str, str] | None = None,
                  log: Path | None = None, ready_path: str = "/v2/", cwd: Path | None = None,
                  timeout: float = 30.0) -> Process:
    """Start `command` and return once `port` answers HTTP; stopped again if it never does."""
    process = Process(name, command, env, log=log, cwd=cwd)
    try:
        wait_until_serving(process, port, ready_path, timeout)
    except BaseException:
        process.stop()
        raise
    return process


# -- HTTP engines -------------------------------------------------------------

DEFAULT_ENGINE = "default"  # whatever `archeio serve` picks when not told


@functools.cache
def serve_help(tree: Path | None = None) -> str:
    done = subprocess.run([*archeio_command(tree), "--help"], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **tree_env(tree)}, cwd=SERVER_CWD)
    return done.stdout


def engine_problem(engines: Sequence[str], tree: Path | None = None) -> str | None:
    """Why these engines cannot be measured with this `archeio serve` (or `tree`'s), or None."""
    named = [e for e in engines if e != DEFAULT_ENGINE]
    if named and "--http" not in serve_help(tree):
        return (f"this archeio serve has no --http flag (ARCHEIO_HTTP): cannot select {', '.join(named)}; "
                f"measure '{DEFAULT_ENGINE}' only")
    return None


def engine_settings(engine: str) -> dict[str, str]:
    """The settings that select `engine` (none for the default)."""
    return {} if engine == DEFAULT_ENGINE else {"ARCHEIO_HTTP": engine}


# -- wrk2 ------------------------------------------------------------------------

WRK2_WHERE = (
    "wrk2 (github.com/giltene/wrk2, Apache-2.0) is not in Debian or PyPI: build it (benchmarks/README.md, "
    "'Getting wrk2') and put it on PATH as wrk2, or name it with --wrk2 or WRK2=/path/to/wrk2"
)


def find_executable(explicit: str | None, variable: str, on_path: str | None = None) -> str | None:
    """A tool the user builds: `explicit` (a flag), else $`variable`, else `on_path` on PATH.

    None when none of them names an executable file.
    """
    for candidate in (explicit, os.environ.get(variable), shutil.which(on_path) if on_path else None):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(Path(candidate).resolve())
    return None


def find_wrk2(explicit: str | None = None) -> str | None:
    """wrk2 from --wrk2, else $WRK2, else `wrk2` on PATH; None when none is executable."""
    return find_executable(explicit, "WRK2", "wrk2")


def start_archeio(env: Mapping[str, str], port: int, cpus: str | None = None,
                  log: Path | None = None, name: str = "archeio", tree: Path | None = None,
                  wrapper: Sequence[str] = (), timeout: float = 30.0) -> Process:
    """`archeio serve` on 127.0.0.1:`port` with `env` added to ours, once it serves.

    The admin port is off unless `env` sets one: several servers run side by
    side, and its default port would clash. `tree` serves another
    checkout's code (`archeio_command`); `wrapper` runs the server under a
    tool (valgrind), which may need a longer start-up `timeout`.
    """
    full_env = {**os.environ, "ARCHEIO_ADMIN_PORT": "0", **env, **tree_env(tree), "PORT": str(port),
                "ARCHEIO_HOST": LOOPBACK}
    command = pinned(cpus, [*wrapper, *archeio_command(tree)])
    return start_serving(name, command, port, full_env, log, cwd=SERVER_CWD, timeout=timeout)


def start_bucket(port: int, *args: str, cpus: str | None = None, log: Path | None = None) -> Process:
    """The stand-in bucket (standin_bucket.py) on 127.0.0.1:`port`."""
    command = [sys.executable, str(BENCHMARKS / "standin_bucket.py"), "--port", str(port), *args]
    return start_serving("stand-in bucket", pinned(cpus, command), port, log=log, ready_path="/")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # Keep connections open like archeio does: nginx's default closes one
    # every 1,000 requests, and the reconnects would slow the baseline.
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        location / {{ return 307 {location}; }}
    }}
}}
"""


def start_nginx(tmp: Path, port: int, location: str, cpus: str | None) -> Process:
    """A minimal nginx: one worker, every request a fixed 307; its own config, pid and logs."""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=LOOPBACK, port=port, location=location))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [nginx, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)]
    return start_serving("nginx", pinned(cpus, command), port, log=tmp / "nginx.out")


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a server's workers, nginx's worker)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants, from /proc/<pid>/stat."""
    total = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: split after its ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLOCK_TICKS


def machine(tree: Path | None = None) -> dict[str, object]:
    """What the figures were measured on (the code: this checkout's, or `tree`'s)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "archeio_commit": _commit(tree or REPO),
    }


def _commit(tree: Path) -> str:
    """The code measured: commit of the work tree, "-dirty" with uncommitted changes.

    Changes to the result files do not count: one benchmark of `make bench`
    writes them before the next one asks.
    """
    try:
        described = subprocess.run(["git", "describe", "--always"], cwd=tree, capture_output=True,
                                   text=True, timeout=10, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  f":!{RESULTS.relative_to(REPO)}"], cwd=tree, capture_output=True, text=True,
                                 timeout=10, check=True)
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return described.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")


def machine_line(info: Mapping[str, object]) -> str:
    return (f"{info['date']}, {info['cpu_model']}, {info['cores']} cores, "
            f"Python {info['python']}, Linux {info['kernel']}, load average at start "
            f"{', '.join(str(x) for x in info['load_average_at_start'])}, "  # type: ignore[attr-defined]
            f"code {info.get('archeio_commit', 'unknown')}")


def met_text(floor: Mapping[str, Any]) -> str:
    """yes, NO, or why it could not be judged (`met` None, with a `note`)."""
    if floor["met"] is None:
        return f"not judged: {floor.get('note', 'no figure')}"
    return "yes" if floor["met"] else "NO"


def floors_table(floors: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: each floor, its measured figure, met or not."""
    return ["| floor | measured | met |", "| --- | ---: | --- |"] + [
        f"| {f['floor']} | {f['measured']} | {met_text(f)} |" for f in floors
    ]


def write_mirrors_file(path: Path, mirrors: Mapping[str, Mapping[str, str]]) -> Path:
    """An ARCHEIO_MIRRORS_FILE: `[mirrors.<Cloud>]` tables of region = base URL."""
    lines: list[str] = []
    for cloud, regions in mirrors.items():
        lines.append(f"[mirrors.{cloud}]")
        lines += [f'"{region}" = "{url}"' for region, url in regions.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# -- the realistic rig: stand-in bucket, mirrors, Locust -------------------

# Azure regions given a mirror in the realistic rig (a sponsor added by
# configuration alone); the others fall back to the default like unknown clients.
AZURE_MIRROR_REGIONS = ("westeurope", "eastus", "westus2")


def local_mirrors_env(tmp: Path, bucket_port: int) -> dict[str, str]:
    """Settings that point every mirror, and the default, at the stand-in bucket.

    The AWS regions are upstream's built-in table, each with its own path on
    the bucket (so each is its own mirror to the server's cache); nothing
    leaves loopback.
    """
    from archeio.config import builtin_mirrors

    base = f"http://{LOOPBACK}:{bucket_port}"
    mirrors = {
        "AWS": {region: f"{base}/aws-{region}" for region in builtin_mirrors().by_cloud["AWS"]},
        "Azure": {region: f"{base}/azure-{region}" for region in AZURE_MIRROR_REGIONS},
    }
    return {
        "ARCHEIO_MIRRORS_FILE": str(write_mirrors_file(tmp / "mirrors.toml", mirrors)),
        "DEFAULT_AWS_BASE_URL": f"{base}/cdn",
    }


def bucket_counts(port: int) -> dict[str, int]:
    """HEADs (and GETs) the stand-in bucket has answered, by status."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", "/")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def run_locust(port: int, env: Mapping[str, str], users: int, seconds: float, out: Path,
               cpus: str | None = None, timeout: float | None = None,
               processes: int = 1) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One headless Locust run of benchmarks/locustfile.py against 127.0.0.1:`port`.

    `env` carries the server's settings and the BENCH_* knobs. With
    `processes` > 1, Locust runs a master and that many worker processes
    (`--processes`); the master merges the workers' samples. Returns
    Locust's exit status (non-zero when any request failed), the
    locustfile's own summary (exact percentiles over the window after
    BENCH_WARMUP) and Locust's aggregated statistics row.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "summary.json"
    summary_file.unlink(missing_ok=True)
    command = pinned(cpus, [
        str(Path(sys.executable).parent / "locust"), "-f", str(BENCHMARKS / "locustfile.py"),
        "--headless", "--only-summary", "--users", str(users), "--spawn-rate", str(users),
        "--run-time", f"{seconds:g}s", "--stop-timeout", "5", "--host", f"http://{LOOPBACK}:{port}",
        "--csv", str(out / "locust"), "--loglevel", "WARNING",
        *(["--processes", str(processes)] if processes > 1 else []),
    ])
    full_env = {**os.environ, **env, "BENCH_SUMMARY_FILE": str(summary_file)}
    with open(out / "locust.log", "wb") as log:
        done = subprocess.run(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout or seconds + 120, check=False)
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    aggregated: dict[str, str] = {}
    stats = out / "locust_stats.csv"
    if stats.exists():
        with open(stats, newline="") as rows:
            aggregated = next((row for row in csv.DictReader(rows) if row["Name"] == "Aggregated"), {})
    return done.returncode, summary, aggregated


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (not idle, not waiting for I/O), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU time of this process's finished, waited-for children (a Locust run, a wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def append_history(path: Path, row: Mapping[str, object]) -> None:
    """One line per run in a CSV beside the results: how much figures move from run to run.

    Every run is kept. When a benchmark's figures change (a column added
    or dropped), the file is rewritten with the union of the columns, the
    older runs' cells left empty where they had no such figure.
    """
    rows: list[dict[str, object]] = []
    columns: list[str] = []
    if path.exists():
        with open(path, newline="") as old:
            reader = csv.DictReader(old)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    added = [name for name in row if name not in columns]
    if columns and not added:
        with open(path, "a", newline="") as out:
            csv.DictWriter(out, fieldnames=columns).writerow(row)
        return
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns + added)
        writer.writeheader()
        writer.writerows([*rows, row])


def read_history(path: Path) -> list[dict[str, str]]:
    """Every run recorded in a history CSV (none if the file is absent)."""
    if not path.exists():
        return []
    with open(path, newline="") as rows:
        return list(csv.DictReader(rows))
