"""Re-anonymize a unit of the archive with the active rule set, from the kept originals.

Anonymizing an already anonymized file again would hash pseudonyms and UIDs a second time, so
re-anonymization starts from the originals (``autoloader.keep_originals = true``) and refuses
plainly when any of them is missing. The originals go back through ``incoming/`` so the
autoloader applies the rule set, the residual-PHI check and the duplicate policy exactly as for
new data. Order of steps, so that no file is ever lost: originals are renamed into a staging
folder in ``spool/``; the unit's rows and archive files are deleted together (or not at all, in
which case the originals go back); the staged originals are renamed into ``incoming/``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from webaims_tui.config import PathSettings
from webaims_tui.engine import browse, db
from webaims_tui.engine.quarantine import incoming_name


class ReanonymizeRefused(Exception):
    """The unit cannot be re-anonymized; the message says why and what to do."""


@dataclass(frozen=True)
class ReanonymizeResult:
    instances: int

    def __str__(self) -> str:
        return f"{self.instances:,} instances queued for the autoloader"


def reanonymize_unit(paths: PathSettings, level: browse.Level, unit_id: int) -> ReanonymizeResult:
    """Send a unit's originals through the autoloader again; its current archive copy goes."""
    with db.database.connection_context():
        files = browse.unit_files(paths.archive, level, unit_id)
    if not files:
        raise ReanonymizeRefused(f"{level} {unit_id} has no instances in the archive")
    originals = [paths.originals / relative for _id, _path, relative in files]
    missing = [o for o in originals if not o.is_file()]
    if missing:
        raise ReanonymizeRefused(
            f"{len(missing)} of {len(originals)} originals are not kept "
            "(autoloader.keep_originals is off, or they were removed): re-anonymizing anonymized "
            "data would anonymize it twice. Import the original files again instead."
        )
    staging = paths.spool / f"reanonymize-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for number, original in enumerate(originals):
            target = staging / f"{number}.dcm"
            os.replace(original, target)
            staged.append((original, target))
        with db.database.connection_context():
            browse.delete_unit(paths.archive, level, unit_id)
    except BaseException:
        for original, target in staged:
            os.replace(target, original)
        staging.rmdir()
        raise
    for original, target in staged:
        os.replace(target, paths.incoming / incoming_name(original.name))
    staging.rmdir()
    return ReanonymizeResult(instances=len(staged))
