"""The guarded transport under the Storage SCP: bounded PDUs, bounded connections, lazy TLS.

pynetdicom 3.0.4 trusts its peer more than a hospital network allows. This module closes the gaps
at the one place every byte passes, the association socket, without patching pynetdicom:

- A PDU whose header declares more than the negotiated maximum is refused before its body is
  read: pynetdicom would buffer it whole (a 200 MB PDU grows the process by 200 MB). We send an
  A-ABORT, close the connection and report it.
- The data set of one DIMSE message is counted fragment by fragment; past the per-instance limit
  its fragments are dropped (the message still completes), so the C-STORE handler sees a data set
  one byte over the limit and answers a failure status: memory stays bounded, the sender gets a
  clear answer and the association goes on.
- Accepted sockets get the network timeout (pynetdicom leaves them blocking, so a peer that sends
  half a PDU header and stalls would hold two threads forever).
- Connections that have not yet sent their first PDU are capped; the oldest is closed to make
  room, so a few hundred idle sockets cannot exhaust threads. They do not count against the
  association limit either (pynetdicom counts every association thread, see
  GuardedApplicationEntity), so idle sockets cannot lock out a real modality.
- With TLS, the handshake runs in the connection's own thread, under the network timeout, not in
  the accept loop where one silent client would stop the server from accepting anyone.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

PDU_HEADER = struct.Struct(">BBL")
P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

#: Largest non-P-DATA PDU accepted. An A-ASSOCIATE-RQ with all 128 presentation contexts and
#: dozens of transfer syntaxes each is a few hundred KB; anything bigger is not a real request.
CONTROL_PDU_LIMIT = 1024 * 1024

#: Seconds between socket polls of a connection that has not sent its first PDU yet.
PENDING_POLL_INTERVAL = 0.01

#: Seconds between two log lines about closing silent connections.
EVICTION_LOG_INTERVAL = 10.0

#: Slack over the negotiated maximum: some senders count the 6-byte PDU header in it.
PDU_LENGTH_SLACK = 6

#: Thread-name prefix pynetdicom counts as an association (``ae.active_associations``).
_ACTIVE_PREFIX = "AcceptorThread"
_PENDING_PREFIX = "PendingAcceptor"

#: A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value).
_ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x06])

ViolationReporter = Callable[[str, str], None]


@dataclass(frozen=True)
class TransportLimits:
    """The bounds the guarded transport enforces."""

    #: Maximum P-DATA-TF length we advertise in the association (0: unlimited).
    max_pdu_size: int
    #: Largest data set of one message kept in memory (bytes); more is dropped.
    max_instance_bytes: int
    #: Connections allowed to wait for their first PDU at once.
    max_pending_connections: int
    #: Seconds a read may block (the AE's network timeout).
    network_timeout: float

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type != P_DATA_TF:
            return max(CONTROL_PDU_LIMIT, self.max_pdu_size)
        if self.max_pdu_size:
            return self.max_pdu_size + PDU_LENGTH_SLACK
        # Unlimited: the body is streamed item by item with the data set capped, never held whole.
        return 2**32 - 1


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper with a PDU reader that checks lengths before reading.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``. The
    header read is where the guard acts: it refuses an oversized length, and for P-DATA it reads
    the body at once, item by item, drops data-set bytes past the per-instance limit and hands
    back a rewritten header and body.
    """

    _guard_server: GuardedAssociationServer
    _limits: TransportLimits
    _next_body: bytearray | None
    _dataset_bytes: int
    _first_pdu_seen: bool
    peer: str
    active_poll_interval: float

    def _init_guard(self, server: GuardedAssociationServer, peer: str) -> None:
        self._guard_server = server
        self.peer = peer
        self._limits = server.limits
        self._next_body = None
        self._dataset_bytes = 0
        self._first_pdu_seen = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._next_body is not None:
            body, self._next_body = self._next_body, None
            return body
        try:
            header = super().recv(nr_bytes)
        except OSError:  # timeout, reset, failed TLS handshake: pynetdicom closes the connection
            self._release_waiting_association()
            raise
        if nr_bytes != PDU_HEADER.size:
            return header
        if len(header) != PDU_HEADER.size:  # end of stream
            self._release_waiting_association()
            return header
        if not self._first_pdu_seen:
            self._first_pdu_seen = True
            self._guard_server.connection_started(self)
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if pdu_type not in KNOWN_PDU_TYPES:
            return header  # pynetdicom answers an unknown PDU type with an A-ABORT itself
        limit = self._limits.pdu_limit(pdu_type)
        if length > limit:
            self._refuse(f"PDU type 0x{pdu_type:02X} declares {length} bytes, limit is {limit}")
            return bytearray()  # read as "connection closed": pynetdicom ends the association
        if pdu_type != P_DATA_TF:
            return header
        p_data = self._read_p_data(length)
        if p_data is None:  # refused, or the stream ended inside the PDU
            return bytearray()  # read as "connection closed"
        self._next_body = p_data
        return bytearray(PDU_HEADER.pack(P_DATA_TF, 0, len(p_data)))

    def _read_p_data(self, length: int) -> bytearray | None:
        """Read a P-DATA-TF body item by item, keeping at most the per-instance cap of data set.

        Data-set bytes past the cap are read and dropped; every fragment keeps its control byte,
        so the DIMSE message still completes and the handler sees an over-limit data set.
        """
        cap = self._limits.max_instance_bytes + 1
        body = bytearray()
        remaining = length
        while remaining:
            if remaining < 6:
                self._refuse("malformed P-DATA-TF: trailing bytes after the last item")
                return None
            item_header = self._recv_exactly(6)
            if item_header is None:
                return None
            remaining -= 6
            item_length = int.from_bytes(item_header[:4], "big")
            context_id, control = item_header[4], item_header[5]
            value_length = item_length - 2
            if item_length < 2 or value_length > remaining:
                self._refuse(f"malformed P-DATA-TF: item length {item_length}")
                return None
            remaining -= value_length
            if control & 0x01:  # command fragment (PS3.8 E.2): small in any real message
                if value_length > CONTROL_PDU_LIMIT:
                    self._refuse(f"command fragment of {value_length} bytes")
                    return None
                keep = value_length
            else:
                keep = max(0, min(value_length, cap - self._dataset_bytes))
            value = self._recv_exactly(keep)
            if value is None or not self._drain(value_length - keep):
                return None
            if not control & 0x01:
                self._dataset_bytes += keep
                if control & 0x02:  # last fragment: the next message starts from zero
                    self._dataset_bytes = 0
            body += (keep + 2).to_bytes(4, "big")
            body += bytes((context_id, control))
            body += value
        return body

    def _recv_exactly(self, count: int) -> bytearray | None:
        data = super().recv(count) if count else bytearray()
        return data if len(data) == count else None

    def _drain(self, count: int) -> bool:
        while count:
            chunk = super().recv(min(count, 65536))
            if not chunk:
                return False
            count -= len(chunk)
        return True

    def close(self) -> None:
        super().close()
        self._release_waiting_association()

    def _release_waiting_association(self) -> None:
        """Wake an acceptor still waiting for its A-ASSOCIATE-RQ on a connection that is gone.

        pynetdicom's association thread waits for the request for the whole ACSE timeout even
        when the connection closed (or sent garbage) long before, holding two threads. A None
        in its queue reads as "timed out": it stops at once and releases both.
        """
        assoc = self.assoc
        queue = assoc.dul.to_user_queue
        if assoc.requestor.primitive is None and not assoc.is_established and queue.empty():
            queue.put(None)

    def _refuse(self, reason: str) -> None:
        peer = self.peer
        log.warning("aborting association from %s: %s", peer, reason)
        raw = self.socket
        if raw is not None:
            # The peer may be gone already; closing is then all that is left.
            with contextlib.suppress(OSError):
                raw.sendall(_ABORT_INVALID_PARAMETER)
            _shutdown(raw)
        self._release_waiting_association()
        self._guard_server.report_violation(peer, reason)


class GuardedRequestHandler(RequestHandler):
    """Creates each association on a :class:`GuardedAssociationSocket`."""

    server: GuardedAssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        wrapper = assoc.dul.socket
        assert wrapper is not None
        # pynetdicom builds the socket wrapper itself; giving this one instance our subclass keeps
        # everything it set up (queued events, TLS state) and changes only the reader.
        wrapper.__class__ = GuardedAssociationSocket
        guarded = cast(GuardedAssociationSocket, wrapper)
        address = self.client_address
        guarded._init_guard(self.server, f"{address[0]}:{address[1]}")
        # Not an association until its first PDU arrives (see connection_started).
        assoc.name = assoc.name.replace(_ACTIVE_PREFIX, _PENDING_PREFIX, 1)
        # pynetdicom's reader polls its socket every millisecond: a few dozen silent connections
        # would take the GIL from everything else. A silent one is polled less often.
        guarded.active_poll_interval = assoc.dul._run_loop_delay
        assoc.dul._run_loop_delay = PENDING_POLL_INTERVAL
        self.server.connection_pending(guarded, self.request)
        _contain_upper_layer_errors(assoc, guarded)
        return assoc


def _contain_upper_layer_errors(assoc: Association, guarded: GuardedAssociationSocket) -> None:
    """Turn an exception in pynetdicom's state machine into an abort of this association only.

    pynetdicom's DUL thread runs the state machine outside its own try block: a command set
    without CommandField, an unknown command, or a release crossing a peer's garbage (Evt14 in
    Sta13) raise there, the thread dies with a traceback and the association is left to its
    timers (all found by tests/adversarial/test_fuzz_network.py). Here they end as pynetdicom
    ends the errors it does catch: A-ABORT, both threads stopped, the connection closed.
    """
    dul = assoc.dul
    machine = dul.state_machine
    act = machine.do_action

    def do_action(event: str) -> None:
        try:
            act(event)
        except Exception as exc:
            reason = f"upper layer failed on {event}: {type(exc).__name__}: {exc}"
            log.warning("aborting association from %s: %s", guarded.peer, reason)
            raw = guarded.socket
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.sendall(_ABORT_INVALID_PARAMETER)
                _shutdown(raw)
            assoc.is_aborted = True
            assoc.is_established = False
            assoc._kill = True
            dul._kill_thread = True
            guarded._release_waiting_association()
            # The state machine will not get to say so: tell the SCP's handlers ourselves.
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": guarded.peer})

    machine.do_action = do_action  # type: ignore[method-assign]


#: The DICOM application context name (PS3.7 A.2.1), the only one there is.
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

#: Bounds on a decoded A-ASSOCIATE-RQ. 128 presentation contexts is the standard's own limit
#: (odd IDs 1..255); the others are far above what any real modality proposes.
MAX_TRANSFER_SYNTAXES_PER_CONTEXT = 128
MAX_USER_INFORMATION_ITEMS = 64


def association_request_problem(request: A_ASSOCIATE) -> str | None:
    """Why a decoded A-ASSOCIATE-RQ must be rejected, or None.

    pynetdicom accepts requests without an application context or without any presentation
    context, and keeps decoding thousands of sub-items; such a request is not from a modality.
    """
    if str(request.application_context_name or "") != DICOM_APPLICATION_CONTEXT:
        return "application context name not supported"
    contexts = request.presentation_context_definition_list
    if not contexts:
        return "no presentation context proposed"
    if len(contexts) > 128:
        return f"{len(contexts)} presentation contexts proposed (at most 128)"
    ids = [cx.context_id for cx in contexts]
    if len(set(ids)) != len(ids) or any(cid is None or cid % 2 == 0 for cid in ids):
        return "presentation context IDs are not unique odd numbers"
    if any(len(cx.transfer_syntax) > MAX_TRANSFER_SYNTAXES_PER_CONTEXT for cx in contexts):
        return "a presentation context proposes too many transfer syntaxes"
    if len(request.user_information) > MAX_USER_INFORMATION_ITEMS:
        return f"{len(request.user_information)} user information items"
    return None


class GuardedApplicationEntity(ApplicationEntity):
    """An AE whose association limit counts associations, not connections still silent."""

    @property
    def active_associations(self) -> list[Association]:
        # pynetdicom compares this with maximum_associations when a request arrives; connections
        # that have not sent a PDU are bounded by the pending cap instead.
        return [
            assoc
            for assoc in super().active_associations
            if not assoc.name.startswith(_PENDING_PREFIX)
        ]


class SharedContexts(list[PresentationContext]):
    """The server's supported contexts, shared by every association instead of deep-copied.

    pynetdicom deep-copies them for each connection: with every storage SOP class and transfer
    syntax that is about 70 ms of CPU under the GIL per TCP connect, before a single byte is read,
    which lets a port scanner starve the server. Negotiation only reads them
    (presentation.negotiate_as_acceptor), so one copy is safe to share.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with socket timeouts, a pending-connection cap, lazy TLS."""

    #: Listen backlog: pynetdicom's 5 drops SYNs under a burst (clients then wait a second).
    request_queue_size = 128

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: TransportLimits,
        on_violation: ViolationReporter,
    ) -> None:
        self.limits = limits
        self._on_violation = on_violation
        self._pending_lock = threading.Lock()
        # socket -> (raw socket, peer) for connections that have not sent a PDU yet, oldest first
        self._pending: OrderedDict[GuardedAssociationSocket, socket.socket] = OrderedDict()
        self.evicted_connections = 0
        self._eviction_logged_at = -EVICTION_LOG_INTERVAL
        self.violations = 0
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )
        self.contexts = SharedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        # Accepted sockets are blocking in pynetdicom: without a timeout a half-sent PDU header
        # blocks the reader thread forever and the idle timers never get a chance to run.
        client_socket.settimeout(self.limits.network_timeout)
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            # The handshake happens on first read, in the association's thread under the
            # timeout; pynetdicom would do it here and stall the accept loop on a silent client.
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def connection_pending(self, guarded: GuardedAssociationSocket, raw: socket.socket) -> None:
        evicted: list[socket.socket] = []
        with self._pending_lock:
            for other, other_raw in list(self._pending.items()):
                if other_raw.fileno() < 0:  # closed by its own timeout meanwhile
                    del self._pending[other]
            while len(self._pending) >= self.limits.max_pending_connections:
                _, oldest_raw = self._pending.popitem(last=False)
                evicted.append(oldest_raw)
            self._pending[guarded] = raw
            self.evicted_connections += len(evicted)
        for oldest_raw in evicted:
            # Its reader sees end-of-stream and ends the connection in its own thread (calling
            # abort() from here could crash that thread, see FIELD-NOTES).
            _shutdown(oldest_raw)
        now = time.monotonic()
        if evicted and now - self._eviction_logged_at >= EVICTION_LOG_INTERVAL:
            # A flood would otherwise write one line per connection.
            self._eviction_logged_at = now
            log.warning(
                "%d connections without an association request: closed the oldest "
                "(%d closed so far)",
                self.limits.max_pending_connections,
                self.evicted_connections,
            )

    def connection_started(self, guarded: GuardedAssociationSocket) -> None:
        with self._pending_lock:
            self._pending.pop(guarded, None)
        assoc = guarded.assoc
        # From now on pynetdicom counts it against maximum_associations.
        assoc.name = assoc.name.replace(_PENDING_PREFIX, _ACTIVE_PREFIX, 1)
        assoc.dul._run_loop_delay = guarded.active_poll_interval

    @property
    def pending_connections(self) -> int:
        with self._pending_lock:
            return sum(1 for raw in self._pending.values() if raw.fileno() >= 0)

    def close_pending(self) -> None:
        """Close every connection still waiting for its first PDU (at server stop)."""
        with self._pending_lock:
            raws = list(self._pending.values())
            self._pending.clear()
        for raw in raws:
            _shutdown(raw)

    def report_violation(self, peer: str, reason: str) -> None:
        with self._pending_lock:
            self.violations += 1
        self._on_violation(peer, reason)


def _shutdown(raw: socket.socket) -> None:
    """Shut a socket down under its reader without touching TLS state from this thread."""
    # socket.socket.shutdown, not SSLSocket.shutdown: that one would drop the TLS object the
    # reader thread may be using at this very moment. OSError: already closed.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(raw, socket.SHUT_RDWR)
