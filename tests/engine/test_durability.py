"""Durable writes: what is acknowledged or archived is on disk, not only in the page cache.

A power cut (unlike a kill) loses what the kernel has not written yet. With ``fsync`` on (the
default, as Orthanc's SyncStorageArea), the SCP syncs each received file and the incoming/
folder entry before answering Success, and the autoloader syncs each archive file and its
folder before the index commit and before the original in incoming/ is deleted. The test
watches the real ``os.fsync`` calls (which file or folder each descriptor names) around a real
store and a real autoloader pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.engine.anonymize import PassThrough
from webaims_tui.engine.autoloader import Autoloader
from webaims_tui.engine.scp import StorageServer
from webaims_tui.engine.service import Engine

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync is called on, in order (the real fsync still runs)."""
    calls: list[Path] = []
    real_fsync: Callable[[int], None] = os.fsync

    def fsync(descriptor: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _store(settings_factory: SettingsFactory, events: EventRecorder, **server: object) -> Engine:
    """An engine whose SCP alone runs, after one CT_small was stored (answered Success)."""
    settings = settings_factory(**server)
    engine = Engine(settings, sink=events)
    engine.open()
    paths = settings.paths
    engine.server = StorageServer(settings.server, paths.incoming, paths.spool, events)
    engine.server.start()
    ae = AE(ae_title="MODALITY")
    dataset = dcmread(CT_SMALL)
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", engine.server.port, ae_title="WEBAIMS")
    assert assoc.is_established
    assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    return engine


def test_the_scp_syncs_the_file_and_the_folder_entry_before_success(
    make_settings: SettingsFactory, events: EventRecorder, synced: list[Path]
) -> None:
    engine = _store(make_settings, events)
    try:
        paths = engine.settings.paths
        [received] = list(paths.incoming.iterdir())
        # The data while it was still the spool file, then incoming/ holding the renamed entry.
        assert paths.spool / f"{received.name}.part" in synced
        assert paths.incoming in synced
        assert synced.index(paths.spool / f"{received.name}.part") < synced.index(paths.incoming)
    finally:
        engine.stop()


def test_without_fsync_the_scp_syncs_nothing(
    make_settings: SettingsFactory, events: EventRecorder, synced: list[Path]
) -> None:
    engine = _store(make_settings, events, fsync=False)
    try:
        assert len(list(engine.settings.paths.incoming.iterdir())) == 1
        assert synced == []
    finally:
        engine.stop()


@pytest.mark.parametrize("fsync", [True, False])
def test_the_autoloader_syncs_archive_files_and_folders_before_the_original_goes(
    make_settings: SettingsFactory, events: EventRecorder, synced: list[Path], fsync: bool
) -> None:
    engine = _store(make_settings, events, fsync=False)  # only the autoloader's calls count
    try:
        config = "[autoloader]\nfsync = false\n" if not fsync else ""
        settings = make_settings(config)
        autoloader = Autoloader(settings, events, PassThrough(), processes=0)
        synced.clear()
        assert autoloader.run_once().archived == 1
        [archived] = [p for p in settings.paths.archive.rglob("*.dcm") if ".tmp" not in p.parts]
        if not fsync:
            assert synced == []
            return
        # The temporary archive file (linked to its place afterwards) and the folder it went to.
        temp_files = [p for p in synced if ".tmp" in p.parts]
        assert len(temp_files) == 1
        assert archived.parent in synced
        assert synced.index(temp_files[0]) < synced.index(archived.parent)
        assert not list(settings.paths.incoming.iterdir())  # the original went after that
    finally:
        engine.stop()
