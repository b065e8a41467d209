"""Two receiving nodes on one archive: two ``webaims-tui serve`` processes, each with its own data
dir (incoming/, spool/, logs) and DICOM port, sharing one archive folder, one quarantine folder,
one PostgreSQL database (and one PostgreSQL linkage database) and one site secret, as the
README's multi-node deployment describes: quarantine rows live in the shared database, so every
node must see the files they name.

DCMTK ``storescu`` sends the same study to both nodes at the same moment, plus a different study
of the same patient to each. Afterwards every instance must be indexed exactly once, with exactly
one archive file, nothing quarantined or left in incoming/, and the patient, study, series and
record counts right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import peewee as pw
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import SettingsFactory
from tests.postgres import PostgresServer
from webaims_tui.config import ensure_folders
from webaims_tui.engine import db
from webaims_tui.engine.archive import archive_path_for
from webaims_tui.engine.autoloader import Autoloader
from webaims_tui.locations import site_secret_file

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed"),
]

UID_PREFIX = "1.2.826.0.1.3680043.10.1234.8."
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_study(folder: Path, patient_id: str, label: str) -> list[Path]:
    """A generated CT study (from pydicom's CT_small) of ``patient_id``; returns its files."""
    folder.mkdir(parents=True)
    template = dcmread(get_testdata_file("CT_small.dcm"))
    study_uid = generate_uid(UID_PREFIX)
    files = []
    for s in range(SERIES_PER_STUDY):
        series_uid = generate_uid(UID_PREFIX)
        for i in range(INSTANCES_PER_SERIES):
            ds = template.copy()
            ds.file_meta = template.file_meta.copy()
            ds.PatientID = patient_id
            ds.PatientName = "Multi^Node"
            ds.StudyInstanceUID = study_uid
            ds.StudyDescription = label
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            ds.SOPInstanceUID = generate_uid(UID_PREFIX)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = folder / f"{s:02d}-{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


@dataclass
class Node:
    name: str
    data_dir: Path
    port: int
    process: subprocess.Popen[str] | None = None

    @property
    def incoming(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def quarantine(self) -> Path:
        # Shared by the nodes, as the README's deployment has it.
        return self.data_dir.parent / "shared-quarantine"


def start_node(node: Node, archive: Path, database_url: str, linkage_url: str) -> None:
    node.data_dir.mkdir(parents=True, exist_ok=True)
    config = node.data_dir / "config.toml"
    config.write_text(
        f'[server]\nae_title = "{node.name}"\nhost = "127.0.0.1"\nport = {node.port}\n'
        "min_free_disk_mb = 0\n"
        f'[paths]\narchive = "{archive}"\nquarantine = "{archive.parent / "shared-quarantine"}"\n'
        f'database_url = "{database_url}"\n'
        f'linkage_database_url = "{linkage_url}"\n'
        "[autoloader]\nsweep_interval = 0.5\n"
    )
    command = [sys.executable, "-m", "webaims_tui", "serve"]
    command += ["--config", str(config), "--data-dir", str(node.data_dir)]
    with (node.data_dir.parent / f"{node.name}.out").open("w") as log:
        node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for_port(node: Node, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert node.process is not None and node.process.poll() is None, f"{node.name} exited"
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{node.name} did not listen on {node.port} within {timeout}s")


def stop_node(node: Node) -> int | None:
    if node.process is None or node.process.poll() is not None:
        return node.process.returncode if node.process else None
    node.process.send_signal(signal.SIGTERM)
    try:
        return node.process.wait(60)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait(10)
        return None


def storescu(node: Node, files: list[Path]) -> subprocess.Popen[str]:
    environment = dict(os.environ, TCP_NODELAY="1")  # else DCMTK waits on delayed ACKs
    command = ["storescu", "-aet", "MODALITY", "-aec", node.name, "127.0.0.1", str(node.port)]
    return subprocess.Popen(
        [*command, *map(str, files)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def archive_files(archive: Path) -> list[str]:
    """Archived files, relative to the archive; dot folders and files are the autoloader's."""
    found = []
    for folder, dirs, files in os.walk(archive):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(folder, f), archive) for f in files if f[0] != "."]
    return sorted(found)


def waiting_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


def archive_state(database_url: str) -> dict[str, object]:
    database = db.connect(database_url)
    try:
        with database.bind_ctx(db.MODELS):
            return {
                "patients": db.Patient.select().count(),
                "studies": db.Study.select().count(),
                "series": db.Series.select().count(),
                "instances": db.Instance.select().count(),
                "distinct_uids": db.Instance.select(db.Instance.sop_instance_uid)
                .distinct()
                .count(),
                "paths": sorted(i.archive_path for i in db.Instance.select()),
                "records": sorted((r.key, r.instance_count) for r in db.Record.select()),
                "quarantine_rows": db.QuarantineEntry.select().count(),
                "instances_per_study": sorted(
                    count
                    for (count,) in db.Study.select(pw.fn.COUNT(db.Instance.id))
                    .join(db.Series)
                    .join(db.Instance)
                    .group_by(db.Study.id)
                    .tuples()
                ),
            }
    finally:
        db.close_database(database)


@pytest.fixture
def nodes(
    tmp_path: Path, postgres_server: PostgresServer
) -> Iterator[tuple[list[Node], Path, str]]:
    database_url = postgres_server.create_database("archive")
    linkage_url = postgres_server.create_database("linkage")
    archive = tmp_path / "shared-archive"
    pair = [
        Node("NODE1", tmp_path / "node1", free_port()),
        Node("NODE2", tmp_path / "node2", free_port()),
    ]
    # One site secret for both: pseudonyms (if anonymization runs) must agree across nodes.
    secret = secrets.token_bytes(32).hex() + "\n"
    for node in pair:
        secret_file = site_secret_file(node.data_dir)
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
    try:
        for node in pair:
            start_node(node, archive, database_url, linkage_url)
        for node in pair:
            wait_for_port(node)
        yield pair, archive, database_url
    finally:
        for node in pair:
            stop_node(node)


def wait_until_settled(
    pair: list[Node], database_url: str, expected: int, timeout: float = 120.0
) -> dict[str, object]:
    """The archive state once both incoming/ folders are empty and the index holds ``expected``
    instances (or whatever it holds when ``timeout`` runs out, for the assertions to show)."""
    deadline = time.monotonic() + timeout
    while True:
        state = archive_state(database_url)
        busy = [w for node in pair for w in waiting_files(node.incoming)]
        if (not busy and state["instances"] == expected) or time.monotonic() > deadline:
            return state
        for node in pair:
            assert node.process is not None and node.process.poll() is None, f"{node.name} died"
        time.sleep(0.5)


def test_two_nodes_receiving_the_same_study_at_once_index_each_instance_once(
    nodes: tuple[list[Node], Path, str], tmp_path: Path
) -> None:
    pair, archive, database_url = nodes
    shared = make_study(tmp_path / "send" / "shared", "MN-PATIENT", "shared study")
    only_1 = make_study(tmp_path / "send" / "only1", "MN-PATIENT", "node 1 study")
    only_2 = make_study(tmp_path / "send" / "only2", "MN-PATIENT", "node 2 study")
    expected = len(shared) + len(only_1) + len(only_2)

    # The same study to both nodes at the same moment, twice over, plus one study of the same
    # patient that only one node sees: collisions on the patient, the study, every series and
    # every instance, while each node also creates rows of its own.
    senders = [
        storescu(pair[0], shared),
        storescu(pair[1], shared),
        storescu(pair[0], only_1),
        storescu(pair[1], only_2),
        storescu(pair[1], shared[::-1]),
        storescu(pair[0], shared[::-1]),
    ]
    for sender in senders:
        output = sender.communicate(timeout=120)[0]
        assert sender.returncode == 0, output

    state = wait_until_settled(pair, database_url, expected)
    for node in pair:
        assert waiting_files(node.incoming) == [], f"{node.name} left files in incoming/"
        assert waiting_files(node.quarantine) == [], f"{node.name} quarantined files"
    assert state["quarantine_rows"] == 0
    assert state["instances"] == expected
    assert state["distinct_uids"] == expected
    assert state["patients"] == 1
    assert state["studies"] == 3
    assert state["series"] == 3 * SERIES_PER_STUDY
    assert state["instances_per_study"] == [len(shared), len(only_1), len(only_2)]
    # Exactly one archive file per instance: the index and the folder name the same files.
    assert archive_files(archive) == state["paths"]
    # Record counts (unit = study) agree with the instances indexed.
    assert sorted(count for _, count in state["records"]) == state["instances_per_study"]

    for node in pair:
        assert stop_node(node) == 0, (tmp_path / f"{node.name}.out").read_text()[-3000:]


def test_a_node_losing_the_race_for_an_instance_never_clobbers_the_winners_file(
    postgres_url: str, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Deterministic replay of the narrowest collision: node A has moved its file into the shared
    archive and inserted the instance row but not yet committed when node B, receiving the same
    SOP Instance UID with other content, decides, moves its file and inserts. With keep-first A's
    file must stay byte for byte and B's copy must end in quarantine, not over A's file."""
    settings = make_settings()
    settings = dataclasses.replace(
        settings, paths=dataclasses.replace(settings.paths, database_url=postgres_url)
    )
    ensure_folders(settings)
    database = db.open_database(postgres_url)
    try:
        incoming_file = make_study(tmp_path / "send", "RACE", "race")[0]
        dataset = dcmread(incoming_file)
        relative = archive_path_for(dataset, settings.autoloader.path_template).as_posix()
        winner_bytes = b"\0" * 128 + b"DICM" + b"node A's copy"
        received = settings.paths.incoming / "from-modality.dcm"
        shutil.copy(incoming_file, received)
        # An hour old: a file that did not come through our SCP is taken once it has settled.
        os.utime(received, (time.time() - 3600, time.time() - 3600))

        a_holds_row = threading.Event()
        a_may_commit = threading.Event()

        def node_a() -> None:
            with db.database.connection_context(), db.database.atomic():
                target = settings.paths.archive / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(winner_bytes)
                patient, _ = db.get_or_create_unique(db.Patient, db.Patient.patient_id, "RACE")
                study, _ = db.get_or_create_unique(
                    db.Study,
                    db.Study.study_instance_uid,
                    str(dataset.StudyInstanceUID),
                    {"patient": patient.id},
                )
                series, _ = db.get_or_create_unique(
                    db.Series,
                    db.Series.series_instance_uid,
                    str(dataset.SeriesInstanceUID),
                    {"study": study.id},
                )
                db.Instance.create(
                    sop_instance_uid=str(dataset.SOPInstanceUID),
                    series=series.id,
                    sop_class_uid=str(dataset.SOPClassUID),
                    archive_path=relative,
                    content_hash=hashlib.sha256(winner_bytes).hexdigest(),
                )
                a_holds_row.set()
                a_may_commit.wait(60)

        winner = threading.Thread(target=node_a)
        winner.start()
        assert a_holds_row.wait(30)
        loader = Autoloader(settings, sink=lambda event: None)
        loser = threading.Thread(target=loader.run_once)
        loser.start()
        try:
            # B either blocks on A's uncommitted row, or sees A's file and postpones its own.
            wait_for_lock_wait_or_end(database, loser)
        finally:
            a_may_commit.set()
            winner.join(30)
        loser.join(60)
        # B may have postponed the file after losing: let it look again until incoming/ is empty.
        for _ in range(20):
            if not waiting_files(settings.paths.incoming):
                break
            time.sleep(0.5)
            loader.run_once()

        rows = list(db.Instance.select())
        assert [row.archive_path for row in rows] == [relative]
        assert (settings.paths.archive / relative).read_bytes() == winner_bytes
        assert archive_files(settings.paths.archive) == [relative]
        assert waiting_files(settings.paths.incoming) == []
        # Nothing is lost: B's different copy waits in quarantine.
        assert len([f for f in waiting_files(settings.paths.quarantine) if f.endswith(".dcm")]) == 1
    finally:
        db.close_database(database)


def wait_for_lock_wait_or_end(
    database: pw.Database, thread: threading.Thread, timeout: float = 30.0
) -> None:
    """Until ``thread`` ends or a session of this database waits on a row lock (B's INSERT)."""
    deadline = time.monotonic() + timeout
    with database.connection_context():
        while time.monotonic() < deadline and thread.is_alive():
            waiting = database.execute_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return
            time.sleep(0.05)
    assert not thread.is_alive(), "node B neither waited on node A's row nor finished"
