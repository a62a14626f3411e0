"""The `archeio` command line: `serve`, `settings`, `mirror`, `explain`, `hosts`.

Only argument handling lives here; `server` runs things. A configuration
error prints one line naming the variable and exits with status 2.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING

# Nothing slower is imported before `main` holds a serving process's
# signals: until then a SIGHUP or SIGTERM still kills it, so the window is
# the interpreter's start-up and these imports (docs/operations.md gives the
# figure). The settings module alone takes tens of milliseconds: it is
# imported where it is used.
from . import signals

if TYPE_CHECKING:
    import argparse

COMMANDS = ("serve", "settings", "mirror", "explain", "hosts")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; only `command`'s own arguments are defined when it is known.

    Each command's arguments come from its own module: importing only the
    one asked for keeps `archeio serve`'s start-up (and the memory of a
    supervisor of workers) free of the mirror tool and of `explain`.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="archeio", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the registry redirect API",
        description="Serve the OCI distribution API as redirects. Every flag "
        "also reads the environment variable named in its help.",
    )
    if command in (None, "serve"):
        from .config import add_arguments

        add_arguments(serve)
    if command == "serve":
        return parser  # the other commands' parsers are a start's needless work
    commands.add_parser("settings", help="print the table of every setting (Markdown)")
    mirror = commands.add_parser("mirror", help="copy blobs from a registry into S3 buckets")
    if command in (None, "mirror"):
        from .mirror.cli import add_arguments as add_mirror_arguments

        add_mirror_arguments(mirror)
    explain = commands.add_parser(
        "explain", help="say where a request would be sent, and why",
        usage="archeio explain [--client IP] [--forwarded 'A, B'] [--no-check] [--json] [settings] TARGET",
        description="Explain this deployment's answer to one request: its kind and grammar, the client "
        "address taken, the range entry, the mirror and why, the live existence check of a blob, and "
        "the final status and Location. Reads the same settings as `serve`.",
    )
    if command in (None, "explain"):
        from .explain import add_arguments as add_explain_arguments

        add_explain_arguments(explain)
    hosts = commands.add_parser(
        "hosts", help="list every host a pull may be redirected to (for allow-lists)",
        description="Every host this deployment's answers may send a pull to: the source and signature "
        "registries, each blob mirror and the default one, and with --regions the hosts of a table of "
        "deployments in other regions. Reads the same settings as `serve`.",
    )
    if command in (None, "hosts"):
        from .hosts import add_arguments as add_hosts_arguments

        add_hosts_arguments(hosts)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # Before anything slow: a SIGHUP or SIGTERM during start-up is held
        # until the server can act on it, never fatal (signals.py).
        signals.hold()
        # Start-up makes many objects and little garbage: the collector
        # waits until the server serves (server.py), or the supervisor starts.
        gc.disable()
    # A reader that leaves (`archeio settings | head`) ends the command
    # quietly. (`serve` imports iprange anyway, the supervisor included.)
    from iprange.pipes import run_quietly

    return run_quietly(_main, argv)


def _main(argv: list[str]) -> int:
    from .config import ConfigError, load_settings, settings_table

    if argv == ["serve"]:
        # The usual production start, settings from the environment alone:
        # no flag to parse, so no parser is built (a few percent of a start).
        command, overrides = "serve", {}
    else:
        args = _parser(argv[0] if argv[:1] and argv[0] in COMMANDS else None).parse_args(argv)
        command, overrides = args.command, vars(args)

    if command == "settings":
        print(settings_table())
        return 0
    if command == "mirror":
        from .mirror.cli import run as run_mirror

        return run_mirror(args)
    if command == "explain":
        from .explain import run as run_explain

        return run_explain(args)
    if command == "hosts":
        from .hosts import run as run_hosts

        return run_hosts(args)
    from .logs import setup_logging

    try:
        settings = load_settings(overrides=overrides)
    except ConfigError as exc:
        print(f"archeio: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.access_log > 0)
    if settings.workers > 1:
        # This process is the supervisor: it serves only the plain-HTTP
        # admin port and has no use for TLS, whose library asyncio would
        # otherwise load (4 MB of its memory). The workers are new processes.
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from iprange import RangeFileError

    if settings.workers == 1:
        from .server import run as serve  # everything in this process: no supervisor to import
    else:
        from .workers import serve

        gc.enable()

    try:
        serve(settings)  # --workers N: N processes on the port, see workers.py
    except RangeFileError as exc:  # the range data cannot be served (with workers: the files missing)
        print(f"archeio: configuration error: ARCHEIO_RANGES_DIR: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"archeio: cannot serve on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    return 0
