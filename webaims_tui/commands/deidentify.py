"""``webaims-tui anonymize --dry-run FILE`` and ``webaims-tui reidentify PSEUDONYM``.

The dry run shows, element by element, what a rule set (the active one, a stored one by name, or
a TOML file) would do to a file: before, after and which rule decided. Nothing is written and
the linkage database is not touched. ``reidentify`` is for an admin: it prints what the
linkage database knows about a pseudonym.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydicom.errors import InvalidDicomError

from webaims_tui.config import Settings
from webaims_tui.engine.anonymize import DryRunReport
from webaims_tui.engine.rules import RuleSet, RuleSetInvalid, RuleSetNotFound, loads
from webaims_tui.engine.service import Engine

EXIT_FAILED = 1


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "anonymize", parents=parents, help="show what a rule set would do to a file"
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        required=True,
        help="only show the changes (required: files are anonymized by the autoloader)",
    )
    parser.add_argument(
        "--rules", metavar="NAME|FILE", help="a stored rule set or a TOML file (default: active)"
    )
    parser.add_argument("--all", action="store_true", help="also list elements kept unchanged")
    parser.set_defaults(handler=run_dry_run)

    reidentify = subparsers.add_parser(
        "reidentify", parents=parents, help="look up the original behind a pseudonym (admin)"
    )
    reidentify.add_argument("pseudonym", metavar="PSEUDONYM")
    reidentify.set_defaults(handler=run_reidentify)


def _fail(message: str) -> int:
    sys.stderr.write(f"webaims-tui: error: {message}\n")
    return EXIT_FAILED


def _rule_set(engine: Engine, choice: str | None) -> RuleSet | None:
    if choice is None:
        return None
    path = Path(choice)
    if path.suffix == ".toml" or path.is_file():
        return loads(path.read_text(encoding="utf-8"), source=str(path))
    rule_set, _stored = engine.rule_set(choice)
    return rule_set


def run_dry_run(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    try:
        rule_set = _rule_set(engine, args.rules)
        report = engine.dry_run(args.file, rule_set)
    except (RuleSetInvalid, RuleSetNotFound) as exc:
        return _fail(str(exc))
    except (OSError, InvalidDicomError) as exc:
        return _fail(f"{args.file}: cannot read as DICOM ({exc})")
    finally:
        engine.stop()
    print_report(report, show_all=args.all)
    return 0


def print_report(report: DryRunReport, *, show_all: bool) -> None:
    rows = [c for c in report.changes if show_all or c.changed]
    print(f"rule set: {report.rule_set}")
    width = max((len(c.path) for c in rows), default=10)
    width = min(width, 60)
    for change in rows:
        before = "-" if change.before is None else change.before
        after = "(removed)" if change.after is None else change.after
        print(f"{change.path:<{width}}  {change.action:<10}  {before!r} -> {after!r}")
        print(f"{'':<{width}}  {'':<10}  by {change.rule}")
    kept = sum(1 for c in report.changes if not c.changed)
    changed = len(report.changes) - kept
    print(f"{changed} elements changed, {kept} kept")
    if report.refused is not None:
        print(f"the autoloader would QUARANTINE this file: {report.refused}")


def run_reidentify(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    entries = engine.reidentify(args.pseudonym)
    if not entries:
        return _fail(f"{args.pseudonym!r} is not in the linkage database")
    for entry in entries:
        since = entry.created_at.isoformat(sep=" ")
        print(f"{entry.kind}: {entry.original}  (pseudonym {entry.pseudonym}, since {since})")
    return 0
