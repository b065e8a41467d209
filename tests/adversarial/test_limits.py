"""Resource bounds: the association cap, idle and half-open sockets, the per-instance limit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import (
    PDU_ASSOCIATE_RJ,
    association_request,
    closed_by_peer,
    echo_succeeds,
    make_instance,
    raw_connection,
    read_pdu,
    rss_mb,
    thread_count,
    wait_until,
)
from tests.helpers import EventRecorder
from webaims_tui.engine.events import AssociationRejected, InstanceReceived, StoreFailed

MB = 1024 * 1024


def _store_association(port: int) -> object:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(SecondaryCaptureImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
    assert assoc.is_established
    return assoc


def test_association_cap_rejects_extras_as_transient_local_limit_and_running_ones_go_on(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine(max_associations=2)
    port = port_of(engine)
    running = [_store_association(port) for _ in range(2)]
    with raw_connection(port) as sock:
        sock.sendall(association_request())
        reply = read_pdu(sock)
    assert reply is not None and reply[0] == PDU_ASSOCIATE_RJ
    result, source, reason = reply[1][1], reply[1][2], reply[1][3]
    # PS3.8 9.3.4: rejected-transient (2), service-provider presentation (3), local limit (2)
    assert (result, source, reason) == (2, 3, 2)
    events.wait_for(AssociationRejected, where=lambda e: "local limit" in e.reason)
    # The two running associations are untouched: both still store.
    for assoc in running:
        status = assoc.send_c_store(make_instance(50_000))  # type: ignore[attr-defined]
        assert status.Status == 0x0000
        assoc.release()  # type: ignore[attr-defined]
    # And once they are gone, a new one is accepted.
    assert wait_until(lambda: echo_succeeds(port), timeout=30)


def test_hundreds_of_idle_sockets_do_not_lock_out_a_modality_and_threads_stay_bounded(
    start_engine: EngineFactory,
) -> None:
    idle_count = 300
    engine = start_engine(max_associations=4, acse_timeout=2.0, network_timeout=2.0)
    port = port_of(engine)
    server = engine.server
    assert server is not None and server._server is not None
    pending_cap = server._server.limits.max_pending_connections
    baseline = thread_count()
    # Each connection costs at most three threads (request handler, association, DUL reader),
    # for at most pending_cap silent connections plus max_associations associations.
    thread_bound = baseline + 3 * (pending_cap + 4) + 8
    peak = baseline
    sockets: list[socket.socket] = []
    try:
        for _ in range(idle_count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            peak = max(peak, thread_count())
        # A real modality gets through while 300 sockets sit idle.
        assert echo_succeeds(port)
        peak = max(peak, thread_count())
        assert peak <= thread_bound, f"{peak} threads, bound {thread_bound}"
        print(f"{idle_count} idle sockets: peak {peak} threads (bound {thread_bound})")
        # Every idle socket is closed by the server: evicted, or after the ACSE timeout.
        assert all(closed_by_peer(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    assert wait_until(lambda: thread_count() <= baseline + 2, timeout=30), thread_count()
    assert echo_succeeds(port)


def test_half_open_sockets_are_closed_by_the_network_timeout(start_engine: EngineFactory) -> None:
    engine = start_engine(acse_timeout=30.0, network_timeout=1.0)
    port = port_of(engine)
    baseline = thread_count()
    half_open = []
    for partial in (b"\x01\x00", b"\x01\x00\x00\x00\x10", association_request()[:40]):
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock.sendall(partial)  # then say nothing more
        half_open.append(sock)
    # pynetdicom alone would block a reader thread forever on each of these.
    assert all(closed_by_peer(sock) for sock in half_open)
    for sock in half_open:
        sock.close()
    assert wait_until(lambda: thread_count() <= baseline, timeout=30), thread_count()
    assert echo_succeeds(port)


def test_an_instance_over_the_size_limit_is_refused_and_the_association_goes_on(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine(max_instance_mb=1)
    incoming = engine.settings.paths.incoming
    assoc = _store_association(port_of(engine))
    too_big = make_instance(6 * MB)
    status = assoc.send_c_store(too_big)  # type: ignore[attr-defined]
    assert status.Status == 0xA700
    failed = events.wait_for(StoreFailed)[0]
    assert "1 MB limit" in failed.reason
    # The same association goes on: an instance under the limit is stored.
    fits = make_instance(900_000)
    assert assoc.send_c_store(fits).Status == 0x0000  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    received = events.wait_for(InstanceReceived)
    assert [e.sop_instance_uid for e in received] == [fits.SOPInstanceUID]
    assert str(too_big.SOPInstanceUID) not in {e.sop_instance_uid for e in received}
    assert len(list(incoming.glob("*.dcm"))) <= 1  # the autoloader may have taken it already
    assert not list(engine.settings.paths.spool.iterdir())


def test_the_limit_holds_for_a_single_fragment_p_data(start_engine: EngineFactory) -> None:
    """With max_pdu_size 0 (unlimited) a data set may come in one huge fragment: still capped."""
    engine = start_engine(max_instance_mb=1, max_pdu_size=0)
    assoc = _store_association(port_of(engine))
    status = assoc.send_c_store(make_instance(2 * MB))  # type: ignore[attr-defined]
    assert status.Status == 0xA700
    # The association goes on after the refusal.
    assert assoc.send_c_store(make_instance(1000)).Status == 0x0000  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        assoc.release()  # type: ignore[attr-defined]


@pytest.mark.interop
def test_a_huge_instance_is_refused_without_being_held_in_memory(
    start_engine: EngineFactory, events: EventRecorder, tmp_path: Path
) -> None:
    """A 64 MB instance from DCMTK (another process: only the server's memory is measured)."""
    engine = start_engine(max_instance_mb=1)
    huge = make_instance(64 * MB)
    path = tmp_path / "huge.dcm"
    huge.save_as(path, enforce_file_format=True)
    del huge
    before = rss_mb()
    sent = subprocess.run(
        ["storescu", "-aec", "WEBAIMS", "-to", "30", "-td", "30", "127.0.0.1",
         str(port_of(engine)), str(path)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    growth = rss_mb() - before
    failed = events.wait_for(StoreFailed)[0]
    assert failed.status == 0xA700, sent.stderr
    assert not list(engine.settings.paths.incoming.glob("*.dcm"))
    print(f"64 MB instance over a 1 MB limit: server RSS grew {growth:.1f} MB (bound 16)")
    # Unguarded, pynetdicom holds the whole data set (64 MB) before the handler runs.
    assert growth < 16
