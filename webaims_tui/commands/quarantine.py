"""``webaims-tui quarantine list|retry``: the files the autoloader could not archive.

``list`` shows each entry's id, when, reason, sender and detail; ``retry ID...`` or
``retry --all`` moves the files back into incoming/ (after a rule fix, a policy change...) and,
unless another webaims-tui is running on the data folder, processes them at once.
"""

from __future__ import annotations

import argparse
import json
import sys

from webaims_tui.config import Settings
from webaims_tui.engine.service import Engine


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "quarantine", parents=parents, help="list or retry files the autoloader could not archive"
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action")
    actions.required = True
    listing = actions.add_parser("list", parents=parents, help="list quarantined files")
    listing.add_argument("--reason", help="only this reason (e.g. truncated)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=run_list)
    retry = actions.add_parser(
        "retry", parents=parents, help="move quarantined files back into incoming/"
    )
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--all", action="store_true", help="every quarantined file")
    retry.add_argument(
        "--no-process", action="store_true", help="leave processing to a running webaims-tui"
    )
    retry.set_defaults(handler=run_retry)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    try:
        entries = engine.quarantine_entries(args.reason)
    finally:
        engine.stop()
    if args.json:
        for entry in entries:
            print(
                json.dumps(
                    {
                        "id": entry.id,
                        "when": entry.created_at.isoformat(timespec="seconds"),
                        "reason": entry.reason,
                        "source": entry.source,
                        "path": entry.path,
                        "sop_instance_uid": entry.sop_instance_uid,
                        "detail": entry.detail,
                    }
                )
            )
        return 0
    if not entries:
        print("quarantine is empty")
        return 0
    for entry in entries:
        when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S")
        source = entry.source or "-"
        print(f"{entry.id:>6}  {when}  {entry.reason:<22} {source:<16} {entry.path}")
        print(f"{'':>8}{entry.detail}")
    return 0


def run_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.ids) == bool(args.all):
        sys.stderr.write("webaims-tui: error: give quarantine IDs or --all (not both)\n")
        return 2
    engine = Engine(settings)
    try:
        known = {entry.id for entry in engine.quarantine_entries()}
        unknown = [i for i in args.ids if i not in known]
        if unknown:
            listed = ", ".join(str(i) for i in unknown)
            sys.stderr.write(f"webaims-tui: error: no quarantine entry {listed}\n")
            return 2
        released = engine.retry_quarantined(None if args.all else list(args.ids))
        print(f"moved back to incoming/: {len(released)}")
        if released and not args.no_process:
            counters = engine.process_incoming()
            if counters is None:
                print("another webaims-tui is running on this data folder; it processes them")
            else:
                print(f"archived: {counters.archived}")
                print(f"quarantined again: {counters.quarantined}")
                print(f"duplicates: {counters.duplicates}")
    finally:
        engine.stop()
    return 0
