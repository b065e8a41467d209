"""Engine: the one facade the UI and the CLI call.

It owns the database binding, the Storage SCP and the autoloader, and reports through a single
thread-safe ``sink(event)``. Nothing here imports Textual.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

import peewee as pw
from pydicom.filereader import read_file_meta_info

from webaims_tui.config import (
    RECORD_UNITS,
    ConfigError,
    Settings,
    ae_title_problem,
    ensure_folders,
)
from webaims_tui.engine import anonymize as anonymization
from webaims_tui.engine import browse, db, qr
from webaims_tui.engine import nodes as remote_nodes
from webaims_tui.engine import quarantine as quarantined
from webaims_tui.engine import rules as anonymization_rules
from webaims_tui.engine.anonymize import Anonymizer
from webaims_tui.engine.autoloader import (
    Autoloader,
    AutoloaderBusy,
    Counters,
    ImportSummary,
    ProgressCallback,
    import_into_incoming,
    incoming_files,
)
from webaims_tui.engine.events import EchoFinished, EngineError, EngineEvent, EventSink
from webaims_tui.engine.reanonymize import ReanonymizeResult, reanonymize_unit
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
        self.autoloader: Autoloader | None = None
        #: The anonymizer the autoloader applies; None until first needed, then the active
        #: rule set (tests and tools may set another, e.g. PassThrough, before start()).
        self.anonymizer: Anonymizer | None = None

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
        self._start_autoloader()

    def _start_autoloader(self) -> None:
        autoloader = Autoloader(self.settings, self.sink, self._active_anonymizer())
        try:
            autoloader.start()
        except AutoloaderBusy as exc:
            # Another process (a second TUI, `serve`) already processes incoming/; receiving
            # here is still safe: files land in incoming/ and that process archives them.
            log.warning("%s", exc)
            self.sink(EngineError(where="autoloader", message=str(exc)))
            return
        self.autoloader = autoloader

    def _active_anonymizer(self) -> Anonymizer:
        """The anonymizer the autoloader applies: the active rule set unless one was set.

        Research data leaves this archive, so nothing is archived un-anonymized by default: on
        a new archive this stores and activates the built-in PS3.15 basic profile.
        """
        if self.anonymizer is None:
            self.anonymizer = self.make_anonymizer()
        return self.anonymizer

    def stop(self) -> None:
        """Stop accepting associations, let running ones finish, close the database."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.autoloader is not None:
            self.autoloader.stop()
            self.autoloader = None
        if self.database is not None:
            # A PostgreSQL pool also holds connections that other threads returned: close all.
            db.close_database(self.database)
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

    # --- settings that change without a restart (the TUI's Settings screen) --------------

    #: Keys :meth:`change_live_settings` accepts; every other setting needs a restart.
    LIVE_SETTINGS = ("server.allowed_calling_aes", "autoloader.record_unit")

    def change_live_settings(
        self,
        *,
        allowed_calling_aes: tuple[str, ...] | None = None,
        record_unit: str | None = None,
    ) -> Settings:
        """Apply new allowed calling AEs / record unit to the running server and autoloader.

        Valid until the engine stops (the config file is not rewritten); ``settings.sources``
        marks the key ``live``. ConfigError names the key when a value is invalid.
        """
        settings = self.settings
        sources = dict(settings.sources)
        if allowed_calling_aes is not None:
            titles = tuple(t.strip() for t in allowed_calling_aes if t.strip())
            for title in titles:
                problem = ae_title_problem(title)
                if problem:
                    raise ConfigError(f"server.allowed_calling_aes = {title!r}: {problem}")
            server = replace(settings.server, allowed_calling_aes=titles)
            settings = replace(settings, server=server)
            sources["server.allowed_calling_aes"] = "live"
            if self.server is not None:
                # pynetdicom reads the list at each association request: new ones see it.
                self.server.settings = server
                self.server._ae.require_calling_aet = list(titles)
        if record_unit is not None:
            if record_unit not in RECORD_UNITS:
                raise ConfigError(
                    f"autoloader.record_unit = {record_unit!r}: must be one of "
                    f"{', '.join(RECORD_UNITS)}"
                )
            options = replace(settings.autoloader, record_unit=record_unit)  # type: ignore[arg-type]
            settings = replace(settings, autoloader=options)
            sources["autoloader.record_unit"] = "live"
            if self.autoloader is not None:
                self.autoloader.options = options  # read per batch, in the autoloader's thread
        self.settings = replace(settings, sources=sources)
        return self.settings

    # --- anonymization (see engine/anonymize.py, rules.py, profile.py, linkage.py) ----------

    def make_anonymizer(self) -> anonymization.RuleAnonymizer:
        """The active rule set compiled for the autoloader (the default set on a new archive).

        Pass it as ``Autoloader(settings, sink, anonymizer)``; build a new one after
        :meth:`activate_rule_set`. It records pseudonyms in the linkage database.
        """
        self.open()
        return anonymization.active_anonymizer(self.settings)

    def rule_sets(self) -> list[anonymization_rules.StoredRuleSet]:
        """Every stored rule set version, by name and version."""
        self.open()
        return anonymization_rules.stored_rule_sets()

    def save_rule_set(
        self, rule_set: anonymization_rules.RuleSet | str, comment: str = ""
    ) -> anonymization_rules.StoredRuleSet:
        """Validate and store a rule set (or its TOML text) as the next version of its name.

        Raises :class:`rules.RuleSetInvalid` naming each rule and reason; nothing is stored then.
        """
        self.open()
        if isinstance(rule_set, str):
            rule_set = anonymization_rules.loads(rule_set)
        return anonymization_rules.save_rule_set(rule_set, comment)

    def rule_set(
        self, name: str, version: int | None = None
    ) -> tuple[anonymization_rules.RuleSet, anonymization_rules.StoredRuleSet]:
        """A stored rule set (latest version unless ``version``) and its row."""
        self.open()
        return anonymization_rules.load_stored_rule_set(name, version)

    def rule_set_text(self, name: str, version: int | None = None) -> str:
        """A stored rule set as the TOML text it was saved as."""
        self.open()
        return anonymization_rules.stored_rule_set_text(name, version)

    def activate_rule_set(
        self, name: str, version: int | None = None
    ) -> anonymization_rules.StoredRuleSet:
        """Make a stored version active (validated again first)."""
        self.open()
        return anonymization_rules.activate_rule_set(name, version)

    def apply_active_rule_set(self) -> None:
        """Use the active rule set from now on: rebuild the anonymizer and, when an autoloader
        runs, restart it with the new one (it finishes its batch first; files wait in
        incoming/ meanwhile, so nothing is lost)."""
        self.anonymizer = self.make_anonymizer()
        if self.autoloader is not None:
            self.autoloader.stop()
            self.autoloader = None
            self._start_autoloader()

    def residual_phi_leaks(self) -> dict[int, int]:
        """How many quarantined files each rule set version leaked, by StoredRuleSet.id.

        A leak is a file the residual-PHI check caught: the version left an identifying value
        in it. Versions without one are absent; a file released for a retry no longer counts.
        """
        self.open()
        entry = db.QuarantineEntry
        with db.database.connection_context():
            query = (
                entry.select(entry.ruleset_version, pw.fn.COUNT(entry.id))
                .where(
                    entry.reason == anonymization.RESIDUAL_PHI,
                    entry.ruleset_version.is_null(False),
                )
                .group_by(entry.ruleset_version)
                .tuples()
            )
            rows = cast("Iterable[tuple[int, int]]", query)
            return {int(version): int(count) for version, count in rows}

    def dry_run(
        self, path: Path, rule_set: anonymization_rules.RuleSet | None = None
    ) -> anonymization.DryRunReport:
        """Element by element what ``rule_set`` (default: the active one) would do to a file."""
        self.open()
        if rule_set is None:
            default = anonymization.default_rule_set()
            rule_set, _stored = anonymization_rules.active_rule_set(default)
        return anonymization.dry_run_file(self.settings, path, rule_set)

    def reidentify(self, pseudonym: str) -> list[anonymization.LinkEntry]:
        """The originals behind a pseudonym, from the separate linkage database."""
        return anonymization.reidentify(self.settings, pseudonym)

    def check_rule_set(
        self, rule_set: anonymization_rules.RuleSet | str
    ) -> list[anonymization_rules.RuleError]:
        """Every problem of a rule set (or its TOML text), each naming the rule and the reason.

        An empty list means it can be saved and activated: the rule editor calls this as the
        admin types.
        """
        if isinstance(rule_set, str):
            try:
                rule_set = anonymization_rules.loads(rule_set)
            except anonymization_rules.RuleSetInvalid as exc:
                return exc.errors
        return anonymization_rules.validate(rule_set)

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

    def reanonymize_unit(self, level: browse.Level, unit_id: int) -> ReanonymizeResult:
        """Send a unit's kept originals through the autoloader again, with the active rules.

        Raises :class:`ReanonymizeRefused` (saying why) when originals are not kept.
        """
        self.open()
        result = reanonymize_unit(self.settings.paths, level, unit_id)
        if self.autoloader is not None:
            self.autoloader.wake()
        return result

    def export_unit(
        self, level: browse.Level, unit_id: int, destination: Path, *, as_zip: bool = False
    ) -> browse.ExportResult:
        """Copy a unit's archived files into a folder (or a zip file)."""
        return browse.export_unit(
            self.settings.paths.archive, level, unit_id, destination, as_zip=as_zip
        )

    # --- autoloader, import and quarantine (see engine/autoloader.py, engine/quarantine.py) ---

    def process_incoming(self) -> Counters | None:
        """Archive what waits in incoming/ now, in this thread, when no autoloader runs.

        Returns the counts, or None when an autoloader (this engine's or another process's)
        owns incoming/: it will process the files itself.
        """
        if self.autoloader is not None:
            self.autoloader.wake()
            return None
        self.open()
        try:
            return Autoloader(self.settings, self.sink, self._active_anonymizer()).run_once()
        except AutoloaderBusy:
            return None

    def import_paths(
        self, paths: list[Path], progress: ProgressCallback | None = None
    ) -> ImportSummary:
        """Copy DICOM files, folders (recursive) and DICOMDIR media into incoming/."""
        self.open()
        summary = import_into_incoming(
            paths, self.settings.paths.incoming, self.settings.paths.spool, progress
        )
        if self.autoloader is not None:
            self.autoloader.wake()
        return summary

    def quarantine_entries(self, reason: str | None = None) -> list[quarantined.QuarantinedFile]:
        """Every file in quarantine with why, when and from whom, oldest first."""
        self.open()
        with db.database.connection_context():
            return quarantined.entries(reason)

    def retry_quarantined(self, ids: list[int] | None) -> list[int]:
        """Move quarantined files (all when ``ids`` is None) back into incoming/."""
        self.open()
        paths = self.settings.paths
        with db.database.connection_context():
            released = quarantined.release(paths.quarantine, paths.incoming, ids)
        if self.autoloader is not None:
            self.autoloader.wake()
        return released

    # --- query/retrieve (remote nodes; see engine/qr.py and engine/nodes.py) ----------------

    def nodes(self) -> list[db.RemoteNode]:
        return remote_nodes.list_nodes()

    def node(self, name: str) -> db.RemoteNode:
        """The stored node, or NodeError listing the known names."""
        return remote_nodes.get_node(name)

    def add_node(self, name: str, /, **values: object) -> db.RemoteNode:
        return remote_nodes.add_node(name, **values)

    def edit_node(self, name: str, /, **changes: object) -> db.RemoteNode:
        """Change fields of a node; ``name=`` among the changes renames it."""
        return remote_nodes.edit_node(name, **changes)

    def remove_node(self, name: str) -> None:
        remote_nodes.remove_node(name)

    def qr_client(self) -> qr.QRClient:
        """A client calling as our AE title; C-MOVE sends to the port the SCP listens on."""
        server = self.settings.server
        listening = self.server is not None and self.server.listening
        port = self.server.port if self.server is not None and listening else server.port
        return qr.QRClient(
            qr.LocalAE(ae_title=server.ae_title, port=port),
            incoming=self.settings.paths.incoming,
            spool=self.settings.paths.spool,
            min_free_disk_mb=server.min_free_disk_mb,
            max_instance_mb=server.max_instance_mb,
            fsync=server.fsync,
            sink=self.sink,
        )

    def _peer(self, node: str | qr.Peer) -> qr.Peer:
        return node if isinstance(node, qr.Peer) else remote_nodes.peer_for(self.node(node))

    def _client_for(self, node: str | qr.Peer) -> qr.QRClient:
        """A client whose C-ECHOs (alone or before each operation) update a stored node."""
        client = self.qr_client()
        if not isinstance(node, str):
            return client
        name = node

        def remember_echo(event: EngineEvent) -> None:
            if isinstance(event, EchoFinished):
                try:
                    remote_nodes.record_echo(
                        name,
                        qr.EchoResult(
                            ok=event.ok,
                            peer=event.node,
                            elapsed=event.elapsed,
                            problem=event.problem,
                            message=event.message,
                        ),
                    )
                except Exception:  # the echo's outcome is reported anyway; only the memo is lost
                    log.exception("cannot record the C-ECHO outcome of node %s", name)
            self.sink(event)

        client.sink = remember_echo
        return client

    def echo(self, node: str | qr.Peer) -> qr.EchoResult:
        """C-ECHO a stored node (by name) or an ad-hoc peer; never raises for network trouble."""
        return self._client_for(node).echo(self._peer(node))

    def find(
        self, node: str | qr.Peer, query: qr.FindQuery, cancel: qr.CancelToken | None = None
    ) -> qr.FindResult:
        """C-FIND (after a C-ECHO); raises QRFailure with an explanation when it cannot run."""
        return self._client_for(node).find(self._peer(node), query, cancel)

    def retrieve(
        self,
        node: str | qr.Peer,
        targets: list[qr.RetrieveTarget],
        *,
        method: qr.RetrieveMethod | None = None,
        destination: str | None = None,
        cancel: qr.CancelToken | None = None,
    ) -> qr.RetrieveSummary:
        """C-MOVE (to us, or ``destination``) or C-GET, as the node says unless ``method``."""
        peer = self._peer(node)
        client = self._client_for(node)
        classes: list[str] = []
        if (method or peer.retrieve_method) == "c-get":
            classes = self._remote_sop_classes(client, peer, targets, cancel)
        return client.retrieve(
            peer,
            targets,
            method=method,
            destination=destination,
            cancel=cancel,
            sop_classes=classes,
        )

    def start_retrieve(
        self,
        node: str | qr.Peer,
        targets: list[qr.RetrieveTarget],
        *,
        method: qr.RetrieveMethod | None = None,
        destination: str | None = None,
    ) -> qr.BackgroundOperation[qr.RetrieveSummary]:
        """The retrieve in a thread: ``handle.cancel()`` sends a C-CANCEL, ``wait()`` returns."""
        return qr.BackgroundOperation(
            lambda token: self.retrieve(
                node, targets, method=method, destination=destination, cancel=token
            ),
            name="retrieve",
        )

    def _remote_sop_classes(
        self,
        client: qr.QRClient,
        peer: qr.Peer,
        targets: list[qr.RetrieveTarget],
        cancel: qr.CancelToken | None,
    ) -> list[str]:
        """C-GET must offer each storage class the PACS will send: ask it which ones."""
        classes: set[str] = set()
        for target in targets:
            if not target.study_instance_uid:
                return []  # patient level: the common classes are offered
            query = qr.FindQuery(
                level="IMAGE",
                study_instance_uid=target.study_instance_uid,
                series_instance_uid=target.series_instance_uid,
            )
            try:
                rows = client.find(peer, query, cancel).rows
            except qr.QRFailure:
                return []
            classes |= {r.sop_class_uid for r in rows if isinstance(r, qr.InstanceRow)}
        return sorted(c for c in classes if c)

    def archived_original_sop_uids(
        self, study_instance_uid: str, candidates: Collection[str]
    ) -> set[str]:
        """Which of these *original* SOP Instance UIDs the archive holds or is about to hold.

        Held means indexed in the archive (each original UID mapped to the UID the autoloader's
        anonymizer writes, ``replacement_uid``, or kept as is by the pass-through), quarantined
        (kept as received), or waiting in incoming/. The log of received instances is no
        source: an instance received, archived and then deleted in the browser is missing,
        and "fetch missing" must bring it back. ``study_instance_uid`` is for a future
        linkage-database lookup scoped to the study.
        """
        wanted = list(dict.fromkeys(candidates))
        found = self._waiting_sop_uids() & set(wanted)
        with db.database.connection_context():
            for start in range(0, len(wanted), 500):
                batch = [uid for uid in wanted[start : start + 500] if uid not in found]
                mapped = self._archive_uids(batch, "SOPInstanceUID")
                if mapped:
                    archived = db.Instance.select(db.Instance.sop_instance_uid).where(
                        db.Instance.sop_instance_uid.in_(list(mapped))
                    )
                    found.update(mapped[row.sop_instance_uid] for row in archived)
                # A conflict is quarantined after anonymizing, anything else as received.
                either = {**{uid: uid for uid in batch}, **mapped}
                quarantine = db.QuarantineEntry
                held = quarantine.select(quarantine.sop_instance_uid).where(
                    quarantine.sop_instance_uid.in_(list(either))
                )
                found.update(either[row.sop_instance_uid] for row in held)
        return found

    def _waiting_sop_uids(self) -> set[str]:
        """SOP Instance UIDs of the files waiting in incoming/, from their file meta."""
        found: set[str] = set()
        for path in incoming_files(self.settings.paths.incoming):
            try:
                meta = read_file_meta_info(path)
                found.add(str(meta.MediaStorageSOPInstanceUID))
            except Exception:  # gone meanwhile, or not DICOM: the autoloader will say
                continue
        return found

    def _archive_uids(self, originals: Iterable[str], keyword: str) -> dict[str, str]:
        """{UID the archive stores it under: original UID in ``keyword``}, for the originals
        whose archived UID is known (the anonymizer's ``replacement_uid``, or kept as is by
        the pass-through); the others are left out."""
        replacement = getattr(self.anonymizer, "replacement_uid", None)
        mapped: dict[str, str] = {}
        for original in originals:
            archived = replacement(original, keyword) if callable(replacement) else original
            if archived is not None:
                mapped[cast(str, archived)] = original
        return mapped

    def archived_study_sizes(self, study_instance_uids: Collection[str]) -> dict[str, int]:
        """How many instances the archive holds of each study, by *original* Study Instance UID.

        No association: the archive's own rows, found through the UID the anonymizer writes for
        each original (``replacement_uid``, as :meth:`archived_original_sop_uids` does for
        instances). Compared with a C-FIND's NumberOfStudyRelatedInstances this marks a result
        list without an IMAGE-level query per study. A study the archive lacks counts 0; a UID
        the rule set does not derive from the original (removed or set) is left out, since only
        the remote instance list (:meth:`verify`) can tell then. Files still waiting in
        incoming/ or quarantined are not counted.
        """
        originals = self._archive_uids(dict.fromkeys(study_instance_uids), "StudyInstanceUID")
        sizes = dict.fromkeys(originals.values(), 0)
        archived_uids = list(originals)
        with db.database.connection_context():
            for start in range(0, len(archived_uids), 500):
                query = (
                    db.Study.select(db.Study.study_instance_uid, pw.fn.COUNT(db.Instance.id))
                    .join(db.Series)
                    .join(db.Instance)
                    .where(db.Study.study_instance_uid.in_(archived_uids[start : start + 500]))
                    .group_by(db.Study.study_instance_uid)
                    .tuples()
                )
                for archived_uid, held in cast("Iterable[tuple[str, int]]", query):
                    sizes[originals[archived_uid]] = int(held)
        return sizes

    def verify(
        self, node: str | qr.Peer, study_instance_uid: str, series_instance_uid: str = ""
    ) -> qr.VerifyReport:
        """Remote IMAGE-level count versus what the archive holds, with the missing instances."""
        return qr.verify(
            self._client_for(node),
            self._peer(node),
            study_instance_uid,
            series_instance_uid,
            held=self.archived_original_sop_uids,
        )

    def fetch_missing(
        self,
        node: str | qr.Peer,
        study_instance_uid: str,
        series_instance_uid: str = "",
        *,
        method: qr.RetrieveMethod | None = None,
        cancel: qr.CancelToken | None = None,
    ) -> qr.FetchMissingReport:
        """Verify, retrieve only the missing instances, verify again and report the difference."""
        return qr.fetch_missing(
            self._client_for(node),
            self._peer(node),
            study_instance_uid,
            series_instance_uid,
            held=self.archived_original_sop_uids,
            method=method,
            cancel=cancel,
            settle=self._wait_for_receptions,
        )

    def _wait_for_receptions(self, timeout: float = 15.0) -> None:
        """The SCP logs received instances when the sender's association closes: wait for it."""
        deadline = time.monotonic() + timeout
        while (
            self.server is not None
            and self.server.active_associations
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)


def _count_files(folder: Path, exclude_suffix: str) -> int:
    count = 0
    for _root, _dirs, files in os.walk(folder):
        count += sum(1 for name in files if not name.endswith(exclude_suffix))
    return count
