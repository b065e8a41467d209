"""The ``webaims-tui`` command: parse arguments, build settings, run the TUI or a subcommand.

Errors a user can fix (an unknown option, a bad port, an unreadable or invalid config, a data
folder that cannot be created, a database of a newer schema version) are one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from webaims_tui import __version__
from webaims_tui.commands import (
    database,
    deidentify,
    importer,
    nodes,
    qr,
    quarantine,
    rules,
    serve,
    stats,
)
from webaims_tui.config import (
    ConfigError,
    Overrides,
    Settings,
    check_path_template,
    load_settings,
)
from webaims_tui.engine.db import DatabaseVersionError
from webaims_tui.engine.service import Engine

EXIT_USAGE = 2

COMMAND_MODULES = (serve, stats, database, nodes, qr, importer, quarantine, rules, deidentify)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (scripts grep it) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: must be between 1 and 65535")
    return port


def global_options(*, suppress_defaults: bool) -> argparse.ArgumentParser:
    """Options every subcommand accepts (before or after the subcommand name)."""
    default = argparse.SUPPRESS if suppress_defaults else None
    parser = _Parser(add_help=False)
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="config file (env WEBAIMS_CONFIG)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="folder for incoming/, archive/, quarantine/, database, logs (env WEBAIMS_DATA_DIR)",
    )
    group.add_argument("--ae-title", default=default, metavar="AET", help="our AE title")
    group.add_argument("--port", type=_port, default=default, metavar="N", help="DICOM port")
    group.add_argument("--host", default=default, metavar="ADDR", help="address to listen on")
    group.add_argument(
        "--database-url",
        default=default,
        metavar="URL",
        help="sqlite:///path or postgresql://... (env WEBAIMS_DATABASE_URL)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="webaims-tui",
        description="A DICOM research-image archive in the terminal. "
        "Without a subcommand it opens the TUI with the DICOM server and autoloader running.",
        parents=[global_options(suppress_defaults=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(handler=None)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    parents = [global_options(suppress_defaults=True)]
    for module in COMMAND_MODULES:
        module.register(subparsers, parents)
    return parser


def overrides_from(args: argparse.Namespace) -> Overrides:
    return Overrides(
        config_file=args.config,
        data_dir=args.data_dir,
        ae_title=args.ae_title,
        port=args.port,
        host=args.host,
        database_url=args.database_url,
    )


def check_before_starting(settings: Settings) -> None:
    """Fail now, as ConfigError or DatabaseVersionError, on what would stop the engine later.

    The TUI opens the engine in a worker thread, where such an error is only a notification in
    an app that keeps running, and ``serve`` starts its log file in a folder nobody has checked
    yet: both run this first, before logging, the screen or the server start.
    """
    check_path_template(settings)
    engine = Engine(settings)
    try:
        engine.open()  # creates and checks the folders; migrates or refuses the database
    finally:
        engine.stop()


def run_tui(settings: Settings) -> int:
    # Imported here so that headless commands never pay for (or need) Textual.
    from webaims_tui.app import make_app

    make_app(settings).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(overrides_from(args))
        # The TUI and `serve` run the engine in threads (the TUI behind a screen): check first.
        # The other commands open the engine in this thread, so its errors reach the except.
        if args.handler in (None, serve.run):
            check_before_starting(settings)
        if args.handler is None:
            return run_tui(settings)
        return int(args.handler(args, settings))
    except (ConfigError, DatabaseVersionError) as exc:
        sys.stderr.write(f"webaims-tui: error: {exc}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
