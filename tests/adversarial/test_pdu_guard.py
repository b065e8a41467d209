"""A PDU declaring more than the negotiated maximum is refused before its body is read."""

from __future__ import annotations

import struct

from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import (
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    association_request,
    closed_by_peer,
    echo_succeeds,
    make_instance,
    raw_connection,
    read_pdu,
    rss_mb,
)
from tests.helpers import EventRecorder
from webaims_tui.engine.events import ProtocolViolation

BODY_SENT_MB = 64


def _send_oversized(sock: object, declared: int, pdu_type: int = 0x04) -> int:
    """Send a header declaring ``declared`` bytes, then stream up to 64 MB; bytes sent."""
    sock.sendall(struct.pack(">BBL", pdu_type, 0, declared))  # type: ignore[attr-defined]
    chunk = b"\x00" * (1024 * 1024)
    sent = 0
    try:
        for _ in range(BODY_SENT_MB):
            sock.sendall(chunk)  # type: ignore[attr-defined]
            sent += len(chunk)
    except OSError:
        pass  # the server closed the connection under us: what we want
    return sent


def test_oversized_p_data_is_aborted_without_buffering(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine(max_pdu_size=16384)
    port = port_of(engine)
    before = rss_mb()
    with raw_connection(port) as sock:
        sock.sendall(association_request())
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == PDU_ASSOCIATE_AC
        _send_oversized(sock, declared=200 * 1024 * 1024)
        # The server answers with an A-ABORT and closes, whatever we still try to send.
        abort = read_pdu(sock)
        assert abort is not None and abort[0] == PDU_ABORT
        assert closed_by_peer(sock)
    growth = rss_mb() - before
    # Unguarded, pynetdicom buffers every byte sent (64 MB here) while waiting for 200 MB.
    assert growth < BODY_SENT_MB / 4, f"RSS grew {growth:.1f} MB"
    print(f"200 MB P-DATA declared, 64 MB sent: RSS grew {growth:.1f} MB (bound 16)")
    violation = events.wait_for(ProtocolViolation)[0]
    assert "declares 209715200 bytes" in violation.reason
    assert echo_succeeds(port)


def test_oversized_association_request_is_aborted(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine()
    port = port_of(engine)
    with raw_connection(port) as sock:
        _send_oversized(sock, declared=50 * 1024 * 1024, pdu_type=0x01)
        abort = read_pdu(sock)
        assert abort is not None and abort[0] == PDU_ABORT
        assert closed_by_peer(sock)
    events.wait_for(ProtocolViolation)
    assert echo_succeeds(port)


def test_p_data_at_the_negotiated_maximum_is_accepted(start_engine: EngineFactory) -> None:
    """The guard does not refuse what the standard allows: full-size PDUs go through."""
    engine = start_engine(max_pdu_size=16384)
    ae = AE(ae_title="FULLPDU")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title="WEBAIMS")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    status = assoc.send_c_store(make_instance(200_000))
    assoc.release()
    assert status.Status == 0x0000
