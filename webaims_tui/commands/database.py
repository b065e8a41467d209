"""``webaims-tui db migrate`` and ``webaims-tui db copy --to URL``: look after the database.

``migrate`` brings the configured database (``paths.database_url``) to this program's schema.
``copy`` moves an archive database into another one, typically an SQLite archive onto the
PostgreSQL server that several nodes will share; it checks every table's row count and refuses
a target that already holds data unless ``--force``. Passwords in URLs are never printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import peewee as pw

from webaims_tui.config import Settings
from webaims_tui.engine import db
from webaims_tui.engine.database_copy import DatabaseCopyError, copy_database, copy_linkage

EXIT_FAILED = 1


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "db", parents=parents, help="migrate the database or copy it to another (PostgreSQL)"
    )
    parser.set_defaults(handler=lambda args, settings: _usage(parser))
    actions = parser.add_subparsers(title="actions", metavar="ACTION")
    migrate = actions.add_parser(
        "migrate", parents=parents, help="bring the configured database to the current schema"
    )
    migrate.set_defaults(handler=run_migrate)
    copy = actions.add_parser(
        "copy",
        parents=parents,
        help="copy every table of the configured database into another database",
        description="Copy every table of the configured database (--database-url, "
        "WEBAIMS_DATABASE_URL or paths.database_url) into the --to database, keeping primary "
        "keys, in one transaction, verified by per-table row counts.",
    )
    copy.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="the target database: postgresql://user@host:5432/name or sqlite:///path",
    )
    copy.add_argument(
        "--force",
        action="store_true",
        help="replace the contents of a target that already holds data",
    )
    copy.add_argument(
        "--batch-size",
        type=_positive,
        default=1000,
        metavar="N",
        help="rows read and written per statement (default 1000)",
    )
    copy.add_argument(
        "--linkage",
        action="store_true",
        help="copy the pseudonym linkage (paths.linkage_database_url) instead of the archive",
    )
    copy.set_defaults(handler=run_copy)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid number {value}: must be at least 1")
    return number


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _connect(url: str) -> pw.Database:
    try:
        database = db.connect(url)
        database.connect(reuse_if_open=True)
    except (pw.OperationalError, pw.ImproperlyConfigured, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseCopyError(f"cannot open {redact(url)}: {first_line}") from None
    return database


def run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.paths.database_url
    try:
        database = _connect(url)
    except DatabaseCopyError as exc:
        sys.stderr.write(f"webaims-tui: error: {exc}\n")
        return EXIT_FAILED
    try:
        with database.bind_ctx(db.MODELS):
            before = db.migrate(database)
    finally:
        db.close_database(database)
    if before == db.SCHEMA_VERSION:
        print(f"{redact(url)}: already at schema version {db.SCHEMA_VERSION}")
    elif before == 0:
        print(f"{redact(url)}: created at schema version {db.SCHEMA_VERSION}")
    else:
        print(f"{redact(url)}: migrated from schema version {before} to {db.SCHEMA_VERSION}")
    return 0


def run_copy(args: argparse.Namespace, settings: Settings) -> int:
    if args.linkage:
        return run_copy_linkage(args, settings)
    source_url, target_url = settings.paths.database_url, args.to
    if not target_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        sys.stderr.write(
            f"webaims-tui: error: --to {redact(target_url)}: must start with sqlite:/// or "
            "postgresql://\n"
        )
        return 2
    if target_url == source_url:
        sys.stderr.write("webaims-tui: error: --to names the configured database itself\n")
        return 2
    started = time.monotonic()
    opened: list[pw.Database] = []
    try:
        source = _connect(source_url)
        opened.append(source)
        target = _connect(target_url)
        opened.append(target)
        print(f"copying {redact(source_url)} -> {redact(target_url)}")
        report = copy_database(source, target, force=args.force, batch_size=args.batch_size)
    except DatabaseCopyError as exc:
        sys.stderr.write(f"webaims-tui: error: {exc}\n")
        return EXIT_FAILED
    finally:
        for database in opened:
            db.close_database(database)
    width = max(len(entry.table) for entry in report)
    for entry in report:
        print(f"{entry.table:<{width}}  {entry.source_rows:>10} -> {entry.target_rows:>10}  ok")
    total = sum(entry.target_rows for entry in report)
    print(f"copied {total} rows in {len(report)} tables in {time.monotonic() - started:.1f} s")
    return 0


def run_copy_linkage(args: argparse.Namespace, settings: Settings) -> int:
    source_url, target_url = settings.paths.linkage_database_url, args.to
    if target_url == source_url or target_url == settings.paths.database_url:
        sys.stderr.write("webaims-tui: error: --to must be a database of its own for the linkage\n")
        return 2
    print(f"copying the linkage {redact(source_url)} -> {redact(target_url)}")
    try:
        entry = copy_linkage(source_url, target_url, force=args.force, batch_size=args.batch_size)
    except DatabaseCopyError as exc:
        sys.stderr.write(f"webaims-tui: error: {exc}\n")
        return EXIT_FAILED
    except (pw.OperationalError, pw.ImproperlyConfigured, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"webaims-tui: error: cannot copy the linkage: {first_line}\n")
        return EXIT_FAILED
    print(f"linkage  {entry.source_rows:>10} -> {entry.target_rows:>10}  ok")
    return 0
