"""``webaims-tui stats``: counts of what the archive holds."""

from __future__ import annotations

import argparse
import json

from webaims_tui.config import Settings
from webaims_tui.engine.service import Engine


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser("stats", parents=parents, help="print archive counts and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    engine.open()
    try:
        stats = engine.stats().as_dict()
    finally:
        engine.stop()
    if args.json:
        print(json.dumps(stats))
    else:
        width = max(len(key) for key in stats)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0
