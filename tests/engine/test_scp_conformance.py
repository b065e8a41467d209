"""What a modality sees of the Storage SCP: accepted classes and syntaxes, our identity, the
called-AE check, and what an A-ABORT or a really full disk leaves behind (nothing)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.adversarial.test_disk_full import mounted_tmpfs
from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder, scp_port, scu, store_interrupted
from webaims_tui.engine.events import AssociationEnded, AssociationRejected, StoreFailed
from webaims_tui.engine.scp import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    StorageServer,
)
from webaims_tui.engine.service import Engine

#: The seed list: CR, CT, MR, NM (current and retired), US and US multi-frame (current and
#: retired), SC, XA, RF, PET.
SEED_STORAGE_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "NM (retired)": "1.2.840.10008.5.1.4.1.1.5",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "US (retired)": "1.2.840.10008.5.1.4.1.1.6",
    "US multi-frame": "1.2.840.10008.5.1.4.1.1.3.1",
    "US multi-frame (retired)": "1.2.840.10008.5.1.4.1.1.3",
    "SC": "1.2.840.10008.5.1.4.1.1.7",
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "RF": "1.2.840.10008.5.1.4.1.1.12.2",
    "PET": "1.2.840.10008.5.1.4.1.1.128",
}
#: Implicit and explicit little endian, explicit big endian, deflated, JPEG baseline, extended
#: and lossless SV1, JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy, RLE.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]
#: A-ABORT from the service user (PS3.8 9.3.8): type 07, length 4, source 0, reason 0.
A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)


@pytest.mark.parametrize("modality", sorted(SEED_STORAGE_CLASSES))
def test_seed_storage_classes_are_accepted_in_every_common_syntax(
    receiver: Engine, modality: str
) -> None:
    """One context per syntax, as a modality proposes them: each one must be accepted."""
    sop_class = SEED_STORAGE_CLASSES[modality]
    ae = scu()
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    try:
        assert assoc.is_established
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        assert accepted == set(TRANSFER_SYNTAXES)
        assert not assoc.rejected_contexts
    finally:
        assoc.release()


def test_the_association_accept_names_our_implementation(receiver: Engine) -> None:
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port(receiver), ae_title="WEBAIMS")
    try:
        assert assoc.is_established
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    finally:
        assoc.release()


def test_a_wrong_called_ae_is_rejected_when_required(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    engine = Engine(make_settings(require_called_ae=True), sink=events)
    engine.start()
    try:
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp_port(engine), ae_title="SOMEONE_ELSE")
        assert assoc.is_rejected
        # PS3.8 7.1.1.9: rejected-permanent (1), by the service user (1), called AE title not
        # recognised (7).
        rejection = assoc.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 7)
        assert events.wait_for(AssociationRejected)
        ours = ae.associate("127.0.0.1", scp_port(engine), ae_title="WEBAIMS")
        assert ours.is_established
        assert ours.send_c_echo().Status == 0x0000
        ours.release()
    finally:
        engine.stop()


def test_an_a_abort_mid_transfer_leaves_no_file(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    # A small PDU size on our side makes the sender split the data set into many PDUs.
    engine = Engine(make_settings(max_pdu_size=4096), sink=events)
    engine.start()
    try:
        # The abort goes out on the wire between two P-DATA PDUs of one data set; pynetdicom's
        # own abort() cannot be called from the sender's network thread safely.
        store_interrupted(engine, lambda sock: sock.sendall(A_ABORT))
        ended = events.wait_for(AssociationEnded)[0]
        assert ended.outcome == "aborted"
        assert ended.instances == 0
        assert not list(engine.settings.paths.incoming.iterdir())
        assert not list(engine.settings.paths.spool.iterdir())
    finally:
        engine.stop()


def _image(rows: int, columns: int) -> Dataset:
    """A CT instance with ``rows`` x ``columns`` 16-bit pixels (new UIDs)."""
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = bytes(rows * columns * 2)
    return ds


def test_a_really_full_disk_answers_out_of_resources_and_keeps_serving(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    """spool/ and incoming/ on a 1 MB tmpfs: a 2 MB instance meets a real ENOSPC."""
    small = tmp_path / "small-disk"
    with mounted_tmpfs(small, "size=1m"):
        config = f'[paths]\nincoming = "{small / "incoming"}"\nspool = "{small / "spool"}"\n'
        # No free-space threshold: the write itself must fail and be answered.
        settings = make_settings(config, min_free_disk_mb=0)
        engine = Engine(settings, sink=events)
        engine.open()
        # The SCP alone: the autoloader would move the instance that fits out of incoming/.
        paths = settings.paths
        engine.server = StorageServer(settings.server, paths.incoming, paths.spool, events)
        engine.server.start()
        try:
            ae = scu()
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", scp_port(engine), ae_title="WEBAIMS")
            assert assoc.is_established
            assert assoc.send_c_store(_image(1024, 1024)).Status == 0xA700
            assert "cannot write" in events.wait_for(StoreFailed)[0].reason
            assert not list((small / "spool").iterdir())
            assert not list((small / "incoming").iterdir())
            # The same association goes on: a small instance still fits.
            assert assoc.send_c_store(_image(64, 64)).Status == 0x0000
            assoc.release()
            assert len(list((small / "incoming").iterdir())) == 1
        finally:
            engine.stop()
