"""The archive file system fills up: files wait in incoming/, one alert, resumed when space returns.

The archive folder is a real tmpfs that the test mounts (root, or CAP_SYS_ADMIN; skipped
otherwise) and later grows with ``mount -o remount``: the autoloader meets a real ENOSPC, first
when writing an archive file (in the loop thread, and in worker processes whose outcomes travel
back pickled), then (inodes used up) when making the folders the file moves into. A full disk is
told from the error number, never from its text, which the locale translates.
Whatever fits is archived and indexed; the rest stays in incoming/ byte for byte, with no
temporary file, no index row without its file, and one alert for the whole episode rather than
one per file and retry; when there is room again everything is archived and the resumption is
said.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.adversarial.peers import wait_until
from tests.conftest import SettingsFactory
from tests.engine.test_autoloader import UID_ROOT, archive_files, make_instance
from tests.helpers import EventRecorder
from webaims_tui.config import Settings
from webaims_tui.engine import autoloader as autoloader_module
from webaims_tui.engine import db
from webaims_tui.engine.anonymize import PassThrough
from webaims_tui.engine.autoloader import POOL_THRESHOLD, Autoloader, Job, Postponed
from webaims_tui.engine.events import ArchivingResumed, EngineError, InstanceArchived
from webaims_tui.engine.service import Engine
from webaims_tui.widgets.activity import ActivityModel, OutcomeEntry

#: Short, so that the test sees several retries; production waits 30 s.
RETRY_SECONDS = 1.0
#: 512 x 512 x 16 bits: 512 KB of pixel data per instance.
IMAGE_SIZE = 512


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[None]:
    """A tmpfs on ``folder`` for the block; unmounted whatever happens inside."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "webaims-test-archive", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            # Still busy (a thread of a failed test holds a file): detach it all the same.
            subprocess.run(["umount", "--lazy", str(folder)], check=False)
        assert not os.path.ismount(folder)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


@contextlib.contextmanager
def autoloader_for(
    settings: Settings, events: EventRecorder, processes: int = 0
) -> Iterator[Autoloader]:
    """An autoloader (not started yet) on an opened engine, values passed through unchanged.

    By default with no worker pool: which files fit then depends on their order alone.
    """
    engine = Engine(settings, sink=events)
    engine.open()
    autoloader = Autoloader(settings, events, PassThrough(), processes=processes)
    autoloader.retry_after_seconds = RETRY_SECONDS
    try:
        yield autoloader
    finally:
        autoloader.stop()
        engine.stop()


def _instances(incoming: Path, count: int) -> dict[str, bytes]:
    """``count`` different 512 KB instances of one series in incoming/: {name: bytes}."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    paths = [
        make_instance(incoming, size=IMAGE_SIZE, fill=n, study_uid=study, series_uid=series)
        for n in range(count)
    ]
    return {path.name: path.read_bytes() for path in paths}


def _check_consistent(autoloader: Autoloader, settings: Settings, sent: dict[str, bytes]) -> int:
    """Nothing half-done; returns how many files are archived.

    Every file sent is either archived, complete, with its index row, or still in incoming/
    unchanged; no index row lacks its file, no archive file its row; no temporary file is left.
    """
    assert not list(autoloader.temp_folder.iterdir())  # first: the next retry writes there
    with db.database.connection_context():
        query = db.Instance.select(db.Instance.sop_instance_uid, db.Instance.archive_path)
        indexed: dict[str, str] = dict(query.tuples())
    archive = settings.paths.archive
    assert archive_files(archive) == sorted(indexed.values())
    waiting = {path.name: path.read_bytes() for path in settings.paths.incoming.iterdir()}
    for name, content in waiting.items():
        assert content == sent[name], name
    archived = [content for name, content in sent.items() if name not in waiting]
    assert len(archived) == len(indexed)
    for content in archived:
        original = dcmread(io.BytesIO(content))
        stored = dcmread(archive / indexed[str(original.SOPInstanceUID)])
        assert stored.PixelData == original.PixelData
    return len(archived)


def _check_alerts(events: EventRecorder, waiting: int) -> None:
    """One alert for the episode, one resumption, no patient data; the receive log shows both."""
    errors = events.of(EngineError)
    assert [(e.where, e.message) for e in errors] == [
        ("archive", f"archive disk full: {waiting} files wait in incoming/; retrying every 1 s")
    ]
    resumed = events.wait_for(ArchivingResumed, timeout=30)
    assert len(resumed) == 1 and resumed[0].where == "archive"
    for text in (errors[0].message, resumed[0].message):
        assert "PAT1" not in text and "Test" not in text
    model = ActivityModel(show_patient_data=True)
    for event in [*errors, *resumed]:
        model.add(event)
    lines = [(e.kind, e.text) for e in model.entries if isinstance(e, OutcomeEntry)]
    assert lines == [
        ("error", f"archive: {errors[0].message}"),
        ("resumed", f"archive: {resumed[0].message}"),
    ]


@pytest.mark.parametrize(
    ("processes", "count"),
    # About 4 MB, or enough files for the worker pool (one process: the files keep their order).
    [(0, 8), (1, POOL_THRESHOLD)],
    ids=["in the loop thread", "in a worker process"],
)
def test_files_wait_in_incoming_while_the_archive_disk_is_full(
    make_settings: SettingsFactory, events: EventRecorder, processes: int, count: int
) -> None:
    settings = make_settings()
    with (
        mounted_tmpfs(settings.paths.archive, "size=2m"),  # smaller than the files sent
        autoloader_for(settings, events, processes) as autoloader,
    ):
        sent = _instances(settings.paths.incoming, count)
        autoloader.start()  # all in one pass, in one batch
        events.wait_for(EngineError, timeout=30)
        archived = len(events.of(InstanceArchived))
        waiting = count - archived
        assert 0 < archived < count
        # Two retries more, each failing for every waiting file: still the one alert.
        assert wait_until(
            lambda: autoloader.counters.postponed >= 3 * waiting, timeout=30, interval=0.01
        )
        assert _check_consistent(autoloader, settings, sent) == archived
        assert len(events.of(EngineError)) == 1

        remount(settings.paths.archive, "size=64m")
        events.wait_for(InstanceArchived, count=count, timeout=30)
        assert wait_until(lambda: not list(settings.paths.incoming.iterdir()), timeout=30)
        _check_alerts(events, waiting)
        assert _check_consistent(autoloader, settings, sent) == count


def test_a_file_that_fits_but_whose_folders_do_not_waits_in_incoming(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    """The data fits but the folders the file moves into cannot be made (no inode left)."""
    settings = make_settings()
    count = 3
    archive = settings.paths.archive
    with (
        mounted_tmpfs(archive, "size=64m,nr_inodes=1000"),
        autoloader_for(settings, events) as autoloader,
    ):
        autoloader.temp_folder.mkdir(parents=True)
        stats = os.statvfs(archive)
        used = stats.f_files - stats.f_ffree  # the root and the temporary folders
        # Inodes for two temporary files: then not even the patient folder can be made, so two
        # files fail at the move into the archive (the third already when written).
        remount(archive, f"nr_inodes={used + 2}")
        sent = _instances(settings.paths.incoming, count)
        autoloader.start()
        events.wait_for(EngineError, timeout=30)
        assert wait_until(
            lambda: autoloader.counters.postponed >= 3 * count, timeout=30, interval=0.01
        )
        assert _check_consistent(autoloader, settings, sent) == 0
        assert not events.of(InstanceArchived)
        assert len(events.of(EngineError)) == 1

        remount(archive, "nr_inodes=1000")
        events.wait_for(InstanceArchived, count=count, timeout=30)
        assert wait_until(lambda: not list(settings.paths.incoming.iterdir()), timeout=30)
        _check_alerts(events, count)
        assert _check_consistent(autoloader, settings, sent) == count


@pytest.mark.parametrize(
    ("code", "text", "disk_full"),
    [
        (errno.ENOSPC, "Aucun espace disponible sur le périphérique", True),
        (errno.EDQUOT, "Disk quota exceeded", True),
        (errno.EIO, os.strerror(errno.ENOSPC), False),
    ],
    ids=["ENOSPC in French", "EDQUOT", "EIO whose text says no space"],
)
def test_a_full_disk_is_told_by_the_error_number_not_its_text(
    make_settings: SettingsFactory,
    events: EventRecorder,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    text: str,
    disk_full: bool,
) -> None:
    """Every file fails to be written with ``code`` and ``text`` (as a worker process would
    say it, pickled); a full disk is one alert for all, any other error one error per file."""
    settings = make_settings()
    count = 3

    def fails(job: Job, anonymizer: object) -> Postponed:
        outcome = Postponed(job.name, f"cannot write the archive file: {text}", code)
        return pickle.loads(pickle.dumps(outcome))  # what a worker process hands back

    monkeypatch.setattr(autoloader_module, "prepare", fails)
    with autoloader_for(settings, events) as autoloader:
        sent = _instances(settings.paths.incoming, count)
        counters = autoloader.run_once()
        assert counters.postponed == count and counters.archived == 0
        assert sorted(p.name for p in settings.paths.incoming.iterdir()) == sorted(sent)
    messages = [(e.where, e.message) for e in events.of(EngineError)]
    if disk_full:
        assert messages == [
            ("archive", f"archive disk full: {count} files wait in incoming/; retrying every 1 s")
        ]
    else:
        assert messages == [("autoloader", f"cannot write the archive file: {text}")] * count
