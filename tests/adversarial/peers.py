"""Hostile peers for the adversarial suite: raw sockets speaking (almost) DICOM, and probes.

Real encoded PDUs come from pynetdicom's own PDU classes, so mutations start from what a real
modality would send. Probes measure this process (the SCP runs in it): thread count and RSS.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, Verification

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_ABORT = 0x07


def association_request(
    called_ae: str = "WEBAIMS",
    calling_ae: str = "HOSTILE",
    abstract_syntaxes: tuple[str, ...] = (str(Verification), str(CTImageStorage)),
    max_pdu: int = 16384,
    transfer_syntaxes: tuple[str, ...] | None = None,
) -> bytes:
    """A real encoded A-ASSOCIATE-RQ, as pynetdicom would send it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    contexts = []
    for index, uid in enumerate(abstract_syntaxes):
        context = build_context(uid, list(transfer_syntaxes) if transfer_syntaxes else None)
        context.context_id = 2 * index + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def p_data(context_id: int, control: int, value: bytes) -> bytes:
    """A real encoded P-DATA-TF with one PDV item."""
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = []
    item = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    pdu.decode(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    return bytes(pdu.encode())


@contextlib.contextmanager
def raw_connection(port: int, timeout: float = 30.0) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield sock
    finally:
        sock.close()


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the peer closed the connection."""
    header = _read_exactly(sock, 6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, length)
    return (pdu_type, body) if body is not None else None


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def closed_by_peer(sock: socket.socket) -> bool:
    """Drain what the server sends until it closes (True) or the socket times out (False)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def echo_succeeds(port: int, timeout: float = 20.0) -> bool:
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def rss_mb() -> float:
    """Resident set size of this process (the SCP runs in it), in MB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_count() -> int:
    return threading.active_count()


def wait_until(condition: object, timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll ``condition()`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def make_instance(pixel_bytes: int, sop_instance_uid: str | None = None) -> Dataset:
    """A Secondary Capture instance with ``pixel_bytes`` of 8-bit pixel data, ready to send."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.PatientID = "ADVERSARIAL"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    columns = max(1000, -(-pixel_bytes // 65535))  # Rows is a US
    ds.Rows, ds.Columns = max(1, pixel_bytes // columns), columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01" * (ds.Rows * columns)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


ASSOCIATE_RQ_FIXED = 68  # protocol version, reserved, called AE, calling AE, reserved (PS3.8 9.3.2)


def split_association_request(pdu: bytes) -> tuple[bytes, list[bytes]]:
    """(fixed fields, [variable items as encoded]) of an encoded A-ASSOCIATE-RQ."""
    body = pdu[6:]
    fixed, rest = body[:ASSOCIATE_RQ_FIXED], body[ASSOCIATE_RQ_FIXED:]
    items = []
    while rest:
        length = struct.unpack(">H", rest[2:4])[0]
        items.append(rest[: 4 + length])
        rest = rest[4 + length :]
    return fixed, items


def join_association_request(fixed: bytes, items: list[bytes]) -> bytes:
    body = fixed + b"".join(items)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def item(item_type: int, value: bytes, declared: int | None = None) -> bytes:
    """A variable item (type, reserved, 2-byte length); ``declared`` lies about the length."""
    length = len(value) if declared is None else declared
    return struct.pack(">BBH", item_type, 0, length & 0xFFFF) + value


def server_reply(sock: socket.socket) -> str:
    """What the server did: "accepted", "rejected", "aborted", "closed" or "other 0xNN"."""
    reply = read_pdu(sock)
    if reply is None:
        return "closed"
    names = {PDU_ASSOCIATE_AC: "accepted", PDU_ASSOCIATE_RJ: "rejected", PDU_ABORT: "aborted"}
    return names.get(reply[0], f"other 0x{reply[0]:02X}")
