"""``webaims-tui import PATH...``: copy DICOM files, folders and DICOMDIR media into incoming/.

The files are copied (never moved or changed) into incoming/ through spool/, so a running
autoloader never sees half a file. When no other webaims-tui process runs the autoloader on this
data folder, the command archives them itself before it exits; otherwise the running one does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from webaims_tui.config import Settings
from webaims_tui.engine.service import Engine


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "import",
        parents=parents,
        help="copy DICOM files, folders (recursive) or DICOMDIR media into the archive",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument(
        "--no-process",
        action="store_true",
        help="only copy into incoming/; leave archiving to a running webaims-tui",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * done // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = Engine(settings)
    show = not args.quiet and sys.stderr.isatty()
    try:
        summary = engine.import_paths(list(args.paths), _ProgressBar("copying", show))
        print(f"imported: {summary.imported}")
        print(f"skipped as non-DICOM: {len(summary.skipped)}")
        print(f"failed: {len(summary.failed)}")
        if summary.dicomdirs:
            print(f"DICOMDIR indexes read: {summary.dicomdirs}")
        for path, why in summary.failed:
            sys.stderr.write(f"webaims-tui: cannot import {path}: {why}\n")
        if summary.imported and not args.no_process:
            counters = engine.process_incoming()
            if counters is None:
                print("another webaims-tui is running on this data folder; it archives the files")
            else:
                print(f"archived: {counters.archived}")
                print(f"quarantined: {counters.quarantined} (see `webaims-tui quarantine list`)")
                print(f"duplicates: {counters.duplicates}")
    finally:
        engine.stop()
    return 1 if summary.failed else 0
