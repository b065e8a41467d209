"""The Storage and Verification SCP.

A C-STORE handler does the least it can: check free space, write the received bytes (file meta
group + the data set exactly as encoded on the wire, never decoded) to a temporary name in
``spool/``, rename it into ``incoming/``, emit an event and answer. Parsing, anonymizing and
indexing belong to the autoloader. Because only complete files are renamed into ``incoming/`` and
Success is answered only after the rename, an aborted association leaves nothing behind and an
acknowledged instance is never lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import _STORAGE_CLASSES

from webaims_tui import __version__
from webaims_tui.config import ServerSettings
from webaims_tui.engine import db
from webaims_tui.engine.archive import sync_folder
from webaims_tui.engine.events import (
    AssociationEnded,
    AssociationRejected,
    AssociationStarted,
    EngineError,
    EventSink,
    InstanceReceived,
    ProtocolViolation,
    ServerFailed,
    ServerStarted,
    ServerStopped,
    StoreFailed,
)
from webaims_tui.engine.store_checks import store_problem
from webaims_tui.engine.tls import TLSSetupError, server_ssl_context
from webaims_tui.engine.transport import (
    GuardedApplicationEntity,
    GuardedAssociationServer,
    TransportLimits,
    association_request_problem,
)

log = logging.getLogger(__name__)

#: Our Implementation Class UID (PS3.7 D.3.3.2), a UUID-derived UID under 2.25.
IMPLEMENTATION_CLASS_UID = "2.25.340270987410019266887043201440133738542"
IMPLEMENTATION_VERSION_NAME = f"WEBAIMS_{__version__}"[:16]

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Connections that may wait for their first PDU at once (transport.GuardedAssociationServer).
PENDING_CONNECTIONS_PER_ASSOCIATION = 4
MIN_PENDING_CONNECTIONS = 16

#: Retired SOP classes that older modalities still send (pynetdicom only lists current ones).
RETIRED_STORAGE_CLASSES = {
    "NuclearMedicineImageStorageRetired": "1.2.840.10008.5.1.4.1.1.5",
    "UltrasoundMultiFrameImageStorageRetired": "1.2.840.10008.5.1.4.1.1.3",
    "UltrasoundImageStorageRetired": "1.2.840.10008.5.1.4.1.1.6",
}

#: Every transfer syntax pydicom knows. pynetdicom picks, for each proposed context, the first
#: syntax of THIS list that the requestor also proposed, so the order is a policy: uncompressed
#: first (Explicit VR Little Endian keeps the VRs of private data), so that a sender holding
#: uncompressed data is never asked to compress it lossily; compressed syntaxes are accepted
#: when proposed alone, and stored as received, never decoded here.
TRANSFER_SYNTAXES = [
    str(ExplicitVRLittleEndian),
    *(str(uid) for uid in AllTransferSyntaxes if uid != ExplicitVRLittleEndian),
]


def storage_sop_classes() -> dict[str, str]:
    """Every standard storage SOP class pynetdicom knows, plus the retired ones we accept."""
    classes = {name: str(uid) for name, uid in _STORAGE_CLASSES.items()}
    classes.update(RETIRED_STORAGE_CLASSES)
    return classes


def sop_class_name(uid: str) -> str:
    """A readable name for a SOP class UID (the UID itself when unknown)."""
    for name, known in storage_sop_classes().items():
        if known == uid:
            return name
    return uid


@dataclass
class _AssociationState:
    association_id: int
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    accepted_contexts: int
    rejected_contexts: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=datetime.now)
    instances: int = 0
    failures: int = 0
    bytes: int = 0
    outcome: str = "connection closed"
    received: list[dict[str, Any]] = field(default_factory=list)


class StorageServer:
    """A pynetdicom Storage/Verification SCP writing into ``incoming/`` through ``spool/``."""

    def __init__(
        self, settings: ServerSettings, incoming: Path, spool: Path, sink: EventSink
    ) -> None:
        self.settings = settings
        self.incoming = incoming
        self.spool = spool
        self._sink = sink
        self._server: Any = None
        self._lock = threading.Lock()
        self._associations: dict[int, _AssociationState] = {}
        self._next_id = 1
        self.listening = False
        self.failure: str | None = None
        self.port = settings.port
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = GuardedApplicationEntity(ae_title=s.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_calling_aet = list(s.allowed_calling_aes)
        ae.require_called_aet = s.require_called_ae
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in storage_sop_classes().values():
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        return ae

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def start(self) -> bool:
        """Listen on the configured address; returns False (and emits ServerFailed) on error."""
        s = self.settings
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        try:
            self._server = self._listen(handlers)
        except (OSError, TLSSetupError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            self.failure = f"cannot listen on {s.host}:{s.port}: {reason}"
            self._sink(ServerFailed(host=s.host, port=s.port, reason=self.failure))
            log.error("%s", self.failure)
            return False
        self.port = self._server.server_address[1]
        self.listening = True
        self._sink(ServerStarted(ae_title=s.ae_title, host=s.host, port=self.port))
        log.info("listening as %s on %s:%d", s.ae_title, s.host, self.port)
        return True

    def _listen(self, handlers: list[Any]) -> GuardedAssociationServer:
        """What ``AE.start_server(block=False)`` does, on our guarded server class."""
        s = self.settings
        limits = TransportLimits(
            max_pdu_size=s.max_pdu_size,
            max_instance_bytes=s.max_instance_mb * 1024 * 1024,
            max_pending_connections=max(
                MIN_PENDING_CONNECTIONS, PENDING_CONNECTIONS_PER_ASSOCIATION * s.max_associations
            ),
            network_timeout=s.network_timeout,
        )
        server = self._ae.make_server(
            (s.host, s.port),
            ssl_context=server_ssl_context(s),
            evt_handlers=handlers,
            server_class=GuardedAssociationServer,
            limits=limits,
            on_violation=self._on_protocol_violation,
        )
        server = cast(GuardedAssociationServer, server)
        thread = threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{s.port}", daemon=True
        )
        thread.start()
        self._ae._servers.append(server)
        return server

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, give running associations ``grace`` seconds, then close."""
        if self._server is None:
            return
        # socketserver's shutdown stops accepting but leaves association threads running.
        self._server.shutdown()
        self._server.close_pending()
        deadline = time.monotonic() + grace
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._server.active_associations:
            # Past the grace period: the sender gets no Success for what it had in flight and
            # will resend it; nothing partial is in incoming/.
            assoc.abort()
        self._server = None
        self.listening = False
        self._sink(ServerStopped())
        log.info("server stopped")

    # --- handlers (run in pynetdicom association threads) ---------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_protocol_violation(self, peer: str, reason: str) -> None:
        # Called from the offending connection's reader thread; the sink is thread-safe.
        self._sink(ProtocolViolation(peer=peer, reason=reason))

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        accepted = [cx for cx in assoc.accepted_contexts]
        rejected = tuple(
            sorted({sop_class_name(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
        )
        with self._lock:
            state = _AssociationState(
                association_id=self._next_id,
                calling_ae=assoc.requestor.ae_title,
                called_ae=assoc.acceptor.ae_title,
                peer_address=assoc.requestor.address,
                peer_port=assoc.requestor.port,
                accepted_contexts=len(accepted),
                rejected_contexts=rejected,
            )
            self._next_id += 1
            self._associations[id(assoc)] = state
        self._sink(
            AssociationStarted(
                association_id=state.association_id,
                calling_ae=state.calling_ae,
                called_ae=state.called_ae,
                peer_address=state.peer_address,
                peer_port=state.peer_port,
                accepted_contexts=state.accepted_contexts,
                rejected_contexts=rejected,
            )
        )

    def _on_requested(self, event: evt.Event) -> None:
        """Reject a decoded request pynetdicom would accept but no modality sends."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        problem = association_request_problem(request) if request is not None else None
        if problem is None:
            return
        calling, address = assoc.requestor.ae_title, assoc.requestor.address
        log.warning("rejected association from %s (%s): %s", calling, address, problem)
        # rejected-permanent, service user, no reason given (application context not supported
        # when that is the problem): what pynetdicom's own negotiation sends, then stops.
        diagnostic = 0x02 if problem.startswith("application context") else 0x01
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        # As pynetdicom after its own rejections: wait until the reject is sent and the
        # connection closed (or the ACSE timeout), so it is not cut off before it goes out.
        assoc.kill()
        self._sink(
            AssociationRejected(
                calling_ae=calling,
                called_ae=assoc.acceptor.ae_title,
                peer_address=address,
                reason=problem,
            )
        )
        self._record_rejection(
            calling, assoc.acceptor.ae_title, address, assoc.requestor.port, problem
        )

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        called = assoc.acceptor.ae_title
        s = self.settings
        if s.allowed_calling_aes and calling.strip() not in s.allowed_calling_aes:
            reason = "calling AE title not recognised"
        elif s.require_called_ae and called.strip() != s.ae_title:
            reason = "called AE title not recognised"
        else:
            reason = "local limit exceeded (too many simultaneous associations)"
        log.warning(
            "rejected association from %s (%s): %s", calling, assoc.requestor.address, reason
        )
        self._sink(
            AssociationRejected(
                calling_ae=calling,
                called_ae=called,
                peer_address=assoc.requestor.address,
                reason=reason,
            )
        )
        self._record_rejection(
            calling, called, assoc.requestor.address, assoc.requestor.port, reason
        )

    def _on_released(self, event: evt.Event) -> None:
        self._set_outcome(event, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._set_outcome(event, "aborted")

    def _set_outcome(self, event: evt.Event, outcome: str) -> None:
        with self._lock:
            state = self._associations.get(id(event.assoc))
            if state is not None:
                state.outcome = outcome

    def _on_connection_closed(self, event: evt.Event) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is None:
            return  # rejected, or closed before association
        if state.outcome == "connection closed" and event.assoc.acse.is_aborted("a-abort"):
            # The peer's A-ABORT closes the connection in the DUL thread, which can get here
            # before the association thread has seen the abort and fired EVT_ABORTED.
            state.outcome = "aborted"
        duration = time.monotonic() - state.started
        log.info(
            "association %d from %s (%s) %s: %d instances, %d failures, %d bytes in %.2fs",
            state.association_id,
            state.calling_ae,
            state.peer_address,
            state.outcome,
            state.instances,
            state.failures,
            state.bytes,
            duration,
        )
        self._record_association(state)
        self._sink(
            AssociationEnded(
                association_id=state.association_id,
                calling_ae=state.calling_ae,
                peer_address=state.peer_address,
                instances=state.instances,
                failures=state.failures,
                bytes=state.bytes,
                duration=duration,
                outcome=state.outcome,
            )
        )

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            state = self._associations.get(id(event.assoc))
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            problem = store_problem(
                request.DataSet.getbuffer() if request.DataSet is not None else None,
                sop_class=sop_class,
                sop_instance=sop_instance,
                transfer_syntax=transfer_syntax,
                max_instance_bytes=self.settings.max_instance_mb * 1024 * 1024,
            )
            if problem is not None:  # nothing is written
                (status, reason), size, name = problem, 0, ""
            else:
                status, size, name, reason = self._write_instance(
                    event, sop_class, sop_instance, state
                )
        except Exception as exc:  # pynetdicom would turn this into a bare 0xC211
            log.exception("C-STORE handler failed")
            status, size, name, reason = STATUS_CANNOT_UNDERSTAND, 0, "", f"internal error: {exc}"
        if state is not None:
            with self._lock:
                state.received.append(
                    {
                        "sop_class_uid": sop_class[:64],
                        "sop_instance_uid": sop_instance[:64],
                        "transfer_syntax_uid": transfer_syntax[:64],
                        "size": size,
                        "status": status,
                        "received_at": datetime.now(),
                    }
                )
                if status == STATUS_SUCCESS:
                    state.instances += 1
                    state.bytes += size
                else:
                    state.failures += 1
        association_id = state.association_id if state else 0
        calling_ae = state.calling_ae if state else ""
        if status == STATUS_SUCCESS:
            self._sink(
                InstanceReceived(
                    association_id=association_id,
                    calling_ae=calling_ae,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    transfer_syntax_uid=transfer_syntax,
                    size=size,
                    incoming_name=name,
                )
            )
        else:
            log.error("C-STORE from %s refused with 0x%04X: %s", calling_ae, status, reason)
            self._sink(
                StoreFailed(
                    association_id=association_id,
                    calling_ae=calling_ae,
                    sop_instance_uid=sop_instance,
                    status=status,
                    reason=reason,
                )
            )
        return status

    def _write_instance(
        self,
        event: evt.Event,
        sop_class: str,
        sop_instance: str,
        state: _AssociationState | None,
    ) -> tuple[int, int, str, str]:
        """Write spool/ -> incoming/; returns (status, size, incoming name, failure reason)."""
        return write_to_incoming(
            cast(C_STORE, event.request).DataSet,
            sop_class=sop_class,
            sop_instance=sop_instance,
            transfer_syntax=event.context.transfer_syntax,
            source_ae=state.calling_ae if state is not None else None,
            spool=self.spool,
            incoming=self.incoming,
            min_free_disk_mb=self.settings.min_free_disk_mb,
            fsync=self.settings.fsync,
        )

    # --- database log -------------------------------------------------------------------------

    def _record_association(self, state: _AssociationState) -> None:
        try:
            with db.database.connection_context(), db.database.atomic():
                row = db.AssociationLog.create(
                    calling_ae=state.calling_ae,
                    called_ae=state.called_ae,
                    peer_address=state.peer_address,
                    peer_port=state.peer_port,
                    started_at=state.started_at,
                    ended_at=datetime.now(),
                    accepted_contexts=state.accepted_contexts,
                    rejected_contexts="\n".join(state.rejected_contexts),
                    instances=state.instances,
                    failures=state.failures,
                    bytes=state.bytes,
                    outcome=state.outcome,
                )
                for batch in _batches(state.received, 500):
                    db.ReceivedInstanceLog.insert_many(
                        [dict(item, association=row.id) for item in batch]
                    ).execute()
        except Exception as exc:
            # The files are safe in incoming/; only the log row is lost. Say so, keep serving.
            log.exception("cannot record association %d", state.association_id)
            self._sink(EngineError(where="association log", message=str(exc)))

    def _record_rejection(
        self, calling: str, called: str, address: str, port: int, reason: str
    ) -> None:
        try:
            with db.database.connection_context():
                db.AssociationLog.create(
                    calling_ae=calling,
                    called_ae=called,
                    peer_address=address,
                    peer_port=port,
                    ended_at=datetime.now(),
                    outcome="rejected",
                    detail=reason,
                )
        except Exception as exc:
            log.exception("cannot record rejected association")
            self._sink(EngineError(where="association log", message=str(exc)))


def write_to_incoming(
    received: BytesIO | None,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    source_ae: str | None,
    spool: Path,
    incoming: Path,
    min_free_disk_mb: int,
    fsync: bool = True,
) -> tuple[int, int, str, str]:
    """Write one received data set as a Part 10 file: spool/ first, then an atomic rename.

    Shared by the Storage SCP and the C-GET client (whose storage sub-operations arrive on the
    association we opened), so both put files into incoming/ the same way. ``received`` is the
    C-STORE request's encoded data set, written exactly as it came off the wire. Returns
    (status, size, incoming name, failure reason).
    """
    free_mb = shutil.disk_usage(spool).free // (1024 * 1024)
    if free_mb < min_free_disk_mb:
        # out of resources: free space is below the configured minimum
        return STATUS_OUT_OF_RESOURCES, 0, "", f"only {free_mb} MB free on disk"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae is not None:
        # Lets the autoloader say who sent a file without a database lookup.
        meta.SourceApplicationEntityTitle = source_ae
    if received is None:
        return STATUS_CANNOT_UNDERSTAND, 0, "", "the C-STORE request carries no data set"
    dataset = received.getbuffer()
    header = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta)))
    # Names never come from UIDs: a hostile UID must not choose a path.
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}.dcm"
    temporary = spool / (name + ".part")
    try:
        with open(temporary, "xb") as handle:
            handle.write(header)
            handle.write(dataset)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, incoming / name)
        if fsync:
            sync_folder(incoming)  # the rename itself must survive a power cut too
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        # out of resources: the write or the rename failed (disk full, quota, permissions)
        return STATUS_OUT_OF_RESOURCES, 0, "", f"cannot write the file: {exc.strerror or exc}"
    return STATUS_SUCCESS, len(header) + len(dataset), name, ""


def _batches(items: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
