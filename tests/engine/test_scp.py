"""The Storage SCP against a real pynetdicom SCU over loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import Verification

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder, scp_port, scu, store_interrupted
from webaims_tui.engine import db
from webaims_tui.engine.events import (
    AssociationEnded,
    AssociationRejected,
    InstanceReceived,
    StoreFailed,
)
from webaims_tui.engine.scp import IMPLEMENTATION_CLASS_UID
from webaims_tui.engine.service import Engine


def test_echo_succeeds(receiver: Engine) -> None:
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_every_storage_file_of_the_corpus_is_stored_as_sent(
    receiver: Engine, events: EventRecorder, corpus: list[Path]
) -> None:
    incoming = receiver.settings.paths.incoming
    ae = scu()
    # One context per (SOP class, transfer syntax) pair: each file goes in its own syntax, as a
    # modality would send it.
    for sop_class, syntax in sorted({_context_of(path) for path in corpus}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    assert assoc.is_established
    for path in corpus:
        # Sending the path makes pynetdicom send the file's bytes without re-encoding them.
        status = assoc.send_c_store(path)
        assert status.Status == 0x0000, f"{path.name}: 0x{status.Status:04X}"
    assoc.release()

    received = events.wait_for(InstanceReceived, count=len(corpus))
    assert len(list(incoming.iterdir())) == len(corpus)
    by_uid = {event.sop_instance_uid: event for event in received}
    for path in corpus:
        sent = dcmread(path)
        event = by_uid[str(sent.SOPInstanceUID)]
        stored = dcmread(incoming / event.incoming_name)
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
        for element in sent:
            if element.tag.element == 0:
                continue  # group lengths (retired): pynetdicom drops them when it re-encodes
            assert stored[element.tag].value == element.value, f"{path.name} {element.tag}"
    assert not list(receiver.settings.paths.spool.iterdir())

    events.wait_for(AssociationEnded)
    with db.database.connection_context():
        assert db.AssociationLog.get().instances == len(corpus)
        assert db.ReceivedInstanceLog.select().where(
            db.ReceivedInstanceLog.status == 0
        ).count() == len(corpus)


def test_unknown_calling_ae_is_rejected_when_the_allow_list_is_on(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = Engine(make_settings(allowed_calling_aes=("MODALITY1",)), sink=events)
    engine.start()
    try:
        ae = scu("STRANGER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp_port(engine), ae_title="WEBAIMS")
        assert assoc.is_rejected
        rejection = events.wait_for(AssociationRejected)[0]
        assert rejection.reason == "calling AE title not recognised"
        assert rejection.calling_ae == "STRANGER"

        allowed = scu("MODALITY1")
        allowed.add_requested_context(Verification)
        assoc = allowed.associate("127.0.0.1", scp_port(engine), ae_title="WEBAIMS")
        assert assoc.is_established
        assoc.release()
        with db.database.connection_context():
            row = db.AssociationLog.get(db.AssociationLog.outcome == "rejected")
            assert row.calling_ae == "STRANGER"
    finally:
        engine.stop()


def test_low_disk_space_answers_out_of_resources_and_writes_nothing(
    make_settings: SettingsFactory, events: EventRecorder, corpus: list[Path]
) -> None:
    # A minimum larger than any disk: the SCP must refuse, not write.
    engine = Engine(make_settings(min_free_disk_mb=10**12), sink=events)
    engine.start()
    try:
        sent = dcmread(corpus[0])
        ae = scu()
        ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", scp_port(engine), ae_title="WEBAIMS")
        status = assoc.send_c_store(sent)
        assoc.release()
        assert status.Status == 0xA700
        failure = events.wait_for(StoreFailed)[0]
        assert failure.status == 0xA700 and "free" in failure.reason
        assert not list(engine.settings.paths.incoming.iterdir())
        assert not list(engine.settings.paths.spool.iterdir())
    finally:
        engine.stop()


def test_unwritable_incoming_answers_out_of_resources(
    receiver: Engine, events: EventRecorder, corpus: list[Path]
) -> None:
    incoming = receiver.settings.paths.incoming
    incoming.rmdir()
    incoming.write_text("not a folder")  # the rename into incoming/ now fails
    sent = dcmread(corpus[0])
    ae = scu()
    ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    status = assoc.send_c_store(sent)
    assoc.release()
    assert status.Status == 0xA700
    assert "cannot write" in events.wait_for(StoreFailed)[0].reason
    assert not list(receiver.settings.paths.spool.iterdir())


def test_connection_dropped_mid_transfer_leaves_no_file(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    # A small PDU size on our side forces the sender to split the data set into many PDUs.
    engine = Engine(make_settings(max_pdu_size=4096), sink=events)
    engine.start()
    try:
        store_interrupted(engine, lambda sock: sock.shutdown(socket.SHUT_RDWR))
        ended = events.wait_for(AssociationEnded)[0]
        assert ended.instances == 0 and ended.outcome != "released"
        assert not list(engine.settings.paths.incoming.iterdir())
        assert not list(engine.settings.paths.spool.iterdir())
    finally:
        engine.stop()


def _context_of(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("calling_ae", ["A" * 16])
def test_sixteen_character_calling_ae_is_recorded(
    receiver: Engine, events: EventRecorder, calling_ae: str
) -> None:
    ae = scu(calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    assoc.release()
    assert events.wait_for(AssociationEnded)[0].calling_ae == calling_ae
