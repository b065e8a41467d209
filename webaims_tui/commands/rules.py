"""``webaims-tui rules``: list, export, import and activate anonymization rule sets.

``rules export NAME > f.toml`` writes the readable TOML form; ``rules import f.toml`` validates
it and stores it as the next version of its name (an invalid file is refused, each error naming
the rule and the reason); ``rules activate NAME`` makes the autoloader use it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from webaims_tui.config import Settings
from webaims_tui.engine.rules import RuleSetInvalid, RuleSetNotFound, loads
from webaims_tui.engine.service import Engine

EXIT_INVALID = 1


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "rules", parents=parents, help="list, export, import and activate anonymization rule sets"
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=parents, help="every rule set version")
    listing.set_defaults(handler=run_list)

    export = actions.add_parser("export", parents=parents, help="print a rule set as TOML")
    export.add_argument("name", metavar="NAME")
    export.add_argument("--version", dest="rule_version", type=int, metavar="N")
    export.set_defaults(handler=run_export)

    importing = actions.add_parser(
        "import", parents=parents, help="validate a TOML file and store it as a new version"
    )
    importing.add_argument("file", type=Path, metavar="FILE")
    importing.add_argument("--comment", default="", help="why this version was made")
    importing.add_argument("--activate", action="store_true", help="make it the active set")
    importing.set_defaults(handler=run_import)

    activate = actions.add_parser("activate", parents=parents, help="make a rule set active")
    activate.add_argument("name", metavar="NAME")
    activate.add_argument("--version", dest="rule_version", type=int, metavar="N")
    activate.set_defaults(handler=run_activate)


def _fail(message: str) -> int:
    sys.stderr.write(f"webaims-tui: error: {message}\n")
    return EXIT_INVALID


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    try:
        stored = engine.rule_sets()
        if not stored:
            # A new archive: show the default set the autoloader would start with.
            engine.make_anonymizer()
            stored = engine.rule_sets()
    finally:
        engine.stop()
    print(f"{'':1} {'NAME':<24} {'VERSION':>7}  {'SAVED':<19}  COMMENT")
    for entry in stored:
        mark = "*" if entry.active else " "
        saved = entry.created_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{mark} {entry.name:<24} {entry.version:>7}  {saved:<19}  {entry.comment}")
    return 0


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    try:
        if not engine.rule_sets():
            engine.make_anonymizer()  # stores the default set on a new archive
        text = engine.rule_set_text(args.name, args.rule_version)
    except RuleSetNotFound as exc:
        return _fail(str(exc))
    finally:
        engine.stop()
    sys.stdout.write(text)
    return 0


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"{path}: cannot read ({exc})")
    try:
        rule_set = loads(text, source=str(path))
    except RuleSetInvalid as exc:
        return _fail(f"{path}: {exc}")
    engine = Engine(settings)
    try:
        stored = engine.save_rule_set(rule_set, args.comment)
        if args.activate:
            stored = engine.activate_rule_set(stored.name, stored.version)
    finally:
        engine.stop()
    state = " (active)" if stored.active else ""
    print(f"stored rule set {stored.name!r} version {stored.version}{state}")
    return 0


def run_activate(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    try:
        stored = engine.activate_rule_set(args.name, args.rule_version)
    except (RuleSetNotFound, RuleSetInvalid) as exc:
        return _fail(str(exc))
    finally:
        engine.stop()
    print(f"active rule set: {stored.name!r} version {stored.version}")
    return 0
