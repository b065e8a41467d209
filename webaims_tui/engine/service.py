"""Engine: the one facade the UI and the CLI call.

It owns the database binding, the Storage SCP and the autoloader, and reports through a single
thread-safe ``sink(event)``. Nothing here imports Textual.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import peewee as pw

from webaims_tui.config import Settings, ensure_folders
from webaims_tui.engine import browse, db
from webaims_tui.engine.events import EngineEvent, EventSink
from webaims_tui.engine.scp import StorageServer, sop_class_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveStats:
    patients: int
    studies: int
    series: int
    instances: int
    quarantined: int
    incoming: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _ignore(event: EngineEvent) -> None:
    pass


class Engine:
    """The archive: open it, start serving, ask it things, stop it."""

    def __init__(self, settings: Settings, sink: EventSink = _ignore) -> None:
        self.settings = settings
        self.sink = sink
        self.database: pw.Database | None = None
        self.server: StorageServer | None = None

    # --- lifetime -----------------------------------------------------------------------------

    def open(self) -> None:
        """Create folders and open (and migrate) the database. Safe to call twice."""
        if self.database is not None:
            return
        ensure_folders(self.settings)
        self._clean_spool()
        self.database = db.open_database(self.settings.paths.database_url)

    def start(self) -> None:
        """Open the archive and start the DICOM server."""
        self.open()
        paths = self.settings.paths
        self.server = StorageServer(self.settings.server, paths.incoming, paths.spool, self.sink)
        self.server.start()

    def stop(self) -> None:
        """Stop accepting associations, let running ones finish, close the database."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.database is not None:
            self.database.close()
            self.database = None

    def _clean_spool(self) -> None:
        """Partial writes left by a killed process are never acknowledged: drop them."""
        for leftover in self.settings.paths.spool.glob("*.part"):
            leftover.unlink(missing_ok=True)

    # --- queries ------------------------------------------------------------------------------

    def stats(self) -> ArchiveStats:
        """Counts of the archive's contents and of files waiting or quarantined."""
        paths = self.settings.paths
        with db.database.connection_context():
            return ArchiveStats(
                patients=db.Patient.select().count(),
                studies=db.Study.select().count(),
                series=db.Series.select().count(),
                instances=db.Instance.select().count(),
                quarantined=_count_files(paths.quarantine, exclude_suffix=".json"),
                incoming=_count_files(paths.incoming, exclude_suffix=".part"),
            )

    # --- browser (read-only queries and unit actions; see engine/browse.py) ----------------

    def browse_page(self, query: browse.BrowseQuery) -> browse.Page:
        """One page of patients, studies, series or instances, filtered and sorted."""
        return browse.list_page(query, sop_class_name)

    def unit_summary(self, level: browse.Level, unit_id: int) -> browse.UnitSummary:
        return browse.unit_summary(level, unit_id, sop_class_name)

    def instance_file(self, instance_id: int) -> browse.InstanceFile:
        return browse.instance_file(self.settings.paths.archive, instance_id)

    def tag_dump(self, instance_id: int) -> list[browse.TagNode]:
        """The archived file's elements as a tree (sequences have items)."""
        return browse.tag_dump(self.instance_file(instance_id).path)

    def delete_unit(self, level: browse.Level, unit_id: int) -> browse.DeleteResult:
        """Delete a patient/study/series/instance: rows and files together, or neither."""
        return browse.delete_unit(self.settings.paths.archive, level, unit_id)

    def export_unit(
        self, level: browse.Level, unit_id: int, destination: Path, *, as_zip: bool = False
    ) -> browse.ExportResult:
        """Copy a unit's archived files into a folder (or a zip file)."""
        return browse.export_unit(
            self.settings.paths.archive, level, unit_id, destination, as_zip=as_zip
        )


def _count_files(folder: Path, exclude_suffix: str) -> int:
    count = 0
    for _root, _dirs, files in os.walk(folder):
        count += sum(1 for name in files if not name.endswith(exclude_suffix))
    return count
