"""C-MOVE and C-GET from a real Orthanc into a running engine, fetch-missing, refusal, cancel.

Moved instances arrive through the engine's Storage SCP: the tests assert on InstanceReceived
events and on the ReceivedInstanceLog (the autoloader may already have moved the files on).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from tests.interop.conftest import Orthanc
from webaims_tui.engine import db
from webaims_tui.engine.anonymize import RuleAnonymizer
from webaims_tui.engine.events import (
    AssociationEnded,
    InstanceArchived,
    InstanceReceived,
    RetrieveFinished,
    RetrieveProgress,
    RetrieveStarted,
)
from webaims_tui.engine.qr import LocalAE, Peer, QRClient, RetrieveTarget
from webaims_tui.engine.service import Engine

pytestmark = pytest.mark.interop


def _received_uids(events: EventRecorder) -> set[str]:
    return {e.sop_instance_uid for e in events.of(InstanceReceived)}


def _logged_uids() -> set[str]:
    with db.database.connection_context():
        rows = db.ReceivedInstanceLog.select().where(db.ReceivedInstanceLog.status == 0)
        return {row.sop_instance_uid for row in rows}


def _wait_logged(events: EventRecorder, associations: int = 1) -> None:
    """The SCP writes its log rows when Orthanc's storage association closes."""
    events.wait_for(AssociationEnded, count=associations)


def test_move_study_into_the_engine(
    engine: Engine, orthanc_knows_engine: Orthanc, events: EventRecorder
) -> None:
    orthanc = orthanc_knows_engine
    study = orthanc.studies[0]
    summary = engine.retrieve(orthanc.peer(), [RetrieveTarget(study_instance_uid=study.uid)])
    assert summary.ok, summary.message
    assert (summary.completed, summary.failed, summary.warning) == (5, 0, 0)
    assert summary.destination == "WEBAIMS"
    assert _received_uids(events) == set(study.instances)
    _wait_logged(events)
    assert _logged_uids() == set(study.instances)
    # Progress came from Orthanc's pending responses, counting down to the end.
    progress = events.of(RetrieveProgress)
    assert progress, "no pending responses reported"
    assert [p.remaining for p in progress] == sorted(
        (p.remaining or 0 for p in progress), reverse=True
    )
    started, finished = events.of(RetrieveStarted)[-1], events.of(RetrieveFinished)[-1]
    assert started.retrieve_id == finished.retrieve_id and finished.ok
    assert finished.completed == 5


def test_move_patient_uses_patient_root(
    engine: Engine, orthanc_knows_engine: Orthanc, events: EventRecorder
) -> None:
    orthanc = orthanc_knows_engine
    beta = [s for s in orthanc.studies if s.patient_id == "QRP002"]
    summary = engine.retrieve(orthanc.peer(), [RetrieveTarget(patient_id="QRP002")])
    assert summary.ok, summary.message
    expected = {uid for s in beta for uid in s.instances}
    assert summary.completed == len(expected) == 5
    assert _received_uids(events) == expected


def test_move_series_and_single_instances(
    engine: Engine, orthanc_knows_engine: Orthanc, events: EventRecorder
) -> None:
    orthanc = orthanc_knows_engine
    study = orthanc.studies[1]  # one MR series of 4
    series = study.series[0]
    summary = engine.retrieve(
        orthanc.peer(),
        [RetrieveTarget(study_instance_uid=study.uid, series_instance_uid=series.uid)],
    )
    assert summary.ok and summary.completed == 4, summary.message
    other = orthanc.studies[0].series[0]
    two = other.instances[:2]
    summary = engine.retrieve(
        orthanc.peer(),
        [
            RetrieveTarget(
                study_instance_uid=orthanc.studies[0].uid,
                series_instance_uid=other.uid,
                sop_instance_uids=two,
            )
        ],
    )
    # A list of SOP Instance UIDs in one C-MOVE request (PS3.4 C.4.2.2.1).
    assert summary.ok and summary.completed == 2, summary.message
    assert _received_uids(events) == set(series.instances) | set(two)


def test_get_series_writes_the_files_into_incoming(
    engine: Engine, orthanc: Orthanc, events: EventRecorder, tmp_path: Path
) -> None:
    study = orthanc.studies[2]
    series = study.series[1]  # MR, 3 instances
    # A client of its own writes into a folder nothing else watches, so the files can be read.
    incoming, spool = tmp_path / "get-incoming", tmp_path / "get-spool"
    incoming.mkdir()
    spool.mkdir()
    client = QRClient(LocalAE("WEBAIMS", 0), incoming=incoming, spool=spool, sink=events)
    summary = client.retrieve(
        orthanc.peer(),
        [RetrieveTarget(study_instance_uid=study.uid, series_instance_uid=series.uid)],
        method="c-get",
        sop_classes=["1.2.840.10008.5.1.4.1.1.4"],
    )
    assert summary.ok, summary.message
    assert summary.completed == 3 and sorted(summary.received) == sorted(series.instances)
    files = sorted(incoming.iterdir())
    assert len(files) == 3 and not list(spool.iterdir())
    for path in files:
        ds = dcmread(path)
        assert ds.SOPInstanceUID in series.instances
        assert ds.file_meta.SourceApplicationEntityTitle == "ORTHANC"
        orthanc_id = orthanc.rest("POST", "/tools/lookup", ds.SOPInstanceUID.encode())[0]["ID"]
        original = dcmread(io.BytesIO(orthanc.rest_bytes(f"/instances/{orthanc_id}/file")))
        assert ds.PixelData == original.PixelData
    # Logged as received, like the SCP's associations: fetch-missing counts them.
    with db.database.connection_context():
        log_row = db.AssociationLog.get(db.AssociationLog.outcome == "c-get")
        assert log_row.instances == 3 and log_row.calling_ae == "ORTHANC"
    assert set(series.instances) <= _logged_uids()


def test_get_through_the_engine_learns_the_sop_classes(
    engine: Engine, orthanc: Orthanc, events: EventRecorder
) -> None:
    study = orthanc.studies[0]
    series = study.series[1]
    summary = engine.retrieve(
        orthanc.peer(retrieve_method="c-get"),
        [RetrieveTarget(study_instance_uid=study.uid, series_instance_uid=series.uid)],
    )
    assert summary.ok and summary.method == "c-get", summary.message
    assert _received_uids(events) == set(series.instances)


def test_fetch_missing_retrieves_only_what_the_archive_lacks(
    engine: Engine, orthanc_knows_engine: Orthanc, events: EventRecorder
) -> None:
    orthanc = orthanc_knows_engine
    study = orthanc.studies[0]  # two CT series: 3 + 2
    first = engine.fetch_missing(orthanc.peer(), study.uid)
    assert first.before.remote == 5 and first.before.held == 0
    assert first.retrieve is not None and first.retrieve.completed == 5
    assert first.after is not None and first.after.complete and first.ok
    _wait_logged(events)

    # The autoloader archives them anonymized, under UIDs derived from the originals.
    events.wait_for(InstanceArchived, count=5)
    # The archive alone counts as holding the study: the received log is no source.
    assert engine.verify(orthanc.peer(), study.uid).complete

    # Lose two instances of the first series locally: archive rows and files together.
    lost = set(study.series[0].instances[:2])
    anonymizer = engine.anonymizer
    assert isinstance(anonymizer, RuleAnonymizer)
    archived_uids = [anonymizer.replacement_uid(uid, "SOPInstanceUID") for uid in lost]
    with db.database.connection_context():
        ids = [
            row.id
            for row in db.Instance.select().where(db.Instance.sop_instance_uid.in_(archived_uids))
        ]
    assert len(ids) == 2
    for instance_id in ids:
        engine.delete_unit("instance", instance_id)
    verify = engine.verify(orthanc.peer(), study.uid)
    assert (verify.remote, verify.held) == (5, 3)
    assert {row.sop_instance_uid for row in verify.missing} == lost

    before = len(events.of(InstanceReceived))
    second = engine.fetch_missing(orthanc.peer(), study.uid)
    assert second.retrieve is not None and second.retrieve.completed == 2, second.message
    assert {e.sop_instance_uid for e in events.of(InstanceReceived)[before:]} == lost
    assert second.after is not None and second.after.complete, second.message

    third = engine.fetch_missing(orthanc.peer(), study.uid)
    assert third.retrieve is None and third.ok
    assert "nothing to fetch" in third.message


def test_move_refused_when_orthanc_does_not_know_our_ae(
    engine: Engine, orthanc: Orthanc, events: EventRecorder
) -> None:
    orthanc.forget()
    assert engine.server is not None
    summary = engine.retrieve(
        orthanc.peer(), [RetrieveTarget(study_instance_uid=orthanc.studies[1].uid)]
    )
    assert not summary.ok and summary.completed == 0
    # Orthanc answers a generic failure, not 0xA801: the explanation still names what to set up.
    assert summary.status is not None and summary.status >= 0xA000
    assert "does not know the destination 'WEBAIMS'" in summary.message
    assert f"AE title 'WEBAIMS', host 127.0.0.1, port {engine.server.port}" in summary.message
    assert not events.of(InstanceReceived)


def test_move_to_an_unknown_other_destination(
    engine: Engine, orthanc_knows_engine: Orthanc
) -> None:
    summary = engine.retrieve(
        orthanc_knows_engine.peer(),
        [RetrieveTarget(study_instance_uid=orthanc_knows_engine.studies[1].uid)],
        destination="NOBODY",
    )
    assert not summary.ok
    assert "Configure 'NOBODY' as a DICOM node on the PACS" in summary.message


def test_cancel_a_large_move(
    engine: Engine, orthanc_knows_engine: Orthanc, events: EventRecorder
) -> None:
    orthanc = orthanc_knows_engine
    large = orthanc.studies[3]  # one series of 200
    handle = engine.start_retrieve(orthanc.peer(), [RetrieveTarget(study_instance_uid=large.uid)])
    events.wait_for(RetrieveProgress, count=3)
    handle.cancel()
    summary = handle.wait(60)
    assert summary is not None and handle.done
    assert summary.cancelled and not summary.ok, summary.message
    assert summary.completed < 200
    assert summary.status == 0xFE00
    assert summary.message.startswith("cancelled:")
    finished = events.of(RetrieveFinished)[-1]
    assert finished.cancelled
    # Everything Orthanc reported as sent did arrive; at most the one in flight when the
    # C-CANCEL arrived came on top (kept: the SCP had acknowledged it).
    _wait_logged(events)
    assert summary.completed <= len(_received_uids(events)) <= summary.completed + 1


def test_get_lists_the_sub_operations_we_refused(
    engine: Engine, orthanc: Orthanc, events: EventRecorder, tmp_path: Path
) -> None:
    """A disk below the configured minimum: every storage sub-operation answers 0xA700."""
    study = orthanc.studies[0]
    client = QRClient(
        LocalAE("WEBAIMS", 0),
        incoming=tmp_path,
        spool=tmp_path,
        min_free_disk_mb=2**40,
        sink=events,
    )
    summary = client.retrieve(
        orthanc.peer(), [RetrieveTarget(study_instance_uid=study.uid)], method="c-get"
    )
    assert not summary.ok
    assert summary.failed == 5 and summary.completed == 0
    assert sorted(summary.failed_sop_instance_uids) == sorted(study.instances)
    assert "5 storage sub-operations refused by us" in summary.message
    assert events.of(RetrieveFinished)[-1].failed_sop_instance_uids == (
        summary.failed_sop_instance_uids
    )


@pytest.fixture
def move_scp_without_destinations() -> Iterator[int]:
    """A pynetdicom C-MOVE SCP that knows no destination (it answers 0xA801)."""

    def on_move(event: Any) -> Iterator[Any]:
        yield None, None  # pynetdicom: unknown destination -> 0xA801

    ae = AE(ae_title="MOVESCP")
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.2.2.2")
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, on_move)]
    )
    yield int(server.server_address[1])
    server.shutdown()


def test_move_destination_unknown_a801_says_what_to_configure(
    engine: Engine, move_scp_without_destinations: int
) -> None:
    peer = Peer(
        name="pacs", ae_title="MOVESCP", host="127.0.0.1", port=move_scp_without_destinations
    )
    summary = engine.retrieve(peer, [RetrieveTarget(study_instance_uid="1.2.3.4")])
    assert summary.status == 0xA801 and not summary.ok
    assert engine.server is not None
    assert summary.message == (
        "pacs does not know the move destination 'WEBAIMS'. Configure on the PACS a DICOM node "
        f"with AE title 'WEBAIMS', host 127.0.0.1, port {engine.server.port}, and make sure "
        "webaims-tui is receiving; or switch this node to C-GET (nodes edit NAME "
        "--retrieve-method c-get)."
    )


def test_verify_finds_anonymized_copies_in_the_archive(
    make_settings: SettingsFactory, orthanc: Orthanc, events: EventRecorder
) -> None:
    """With the rule anonymizer the archive holds new UIDs; verify maps originals onto them."""
    engine = Engine(make_settings(), sink=events)
    engine.open()
    engine.anonymizer = engine.make_anonymizer()
    engine.start()
    try:
        assert engine.server is not None
        orthanc.knows("WEBAIMS", engine.server.port)
        study = orthanc.studies[1]
        assert engine.retrieve(orthanc.peer(), [RetrieveTarget(study_instance_uid=study.uid)]).ok
        archived = events.wait_for(InstanceArchived, count=4)
        assert not {e.sop_instance_uid for e in archived} & set(study.instances)
        report = engine.verify(orthanc.peer(), study.uid)
        assert (report.remote, report.held) == (4, 4), report.message
    finally:
        orthanc.forget()
        engine.stop()


def test_cancel_a_large_get(engine: Engine, orthanc: Orthanc, events: EventRecorder) -> None:
    large = orthanc.studies[3]
    handle = engine.start_retrieve(
        orthanc.peer(), [RetrieveTarget(study_instance_uid=large.uid)], method="c-get"
    )
    events.wait_for(RetrieveProgress, count=3)
    handle.cancel()
    summary = handle.wait(60)
    assert summary is not None and summary.cancelled, summary
    assert summary.completed < 200 and summary.method == "c-get"
    # Every instance Orthanc counted as sent was written (C-GET writes on our association);
    # one in flight when the C-CANCEL arrived may be written too but left out of its count.
    assert summary.completed <= len(summary.received) <= summary.completed + 1
    assert set(summary.received) == _received_uids(events)
    if len(summary.received) != summary.completed:
        assert f"({len(summary.received)} written to incoming/)" in summary.message
