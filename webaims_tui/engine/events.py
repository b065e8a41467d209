"""Frozen dataclasses the engine emits through its ``sink(event)`` callable.

The sink is called from pynetdicom association threads and from the autoloader thread; it must be
thread-safe and must not block (the app posts a Textual message, ``serve`` logs a line). Events
carry no patient names, IDs or birth dates unless a field says so: the live log may be watched
over a shoulder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class EngineEvent:
    """Base of every engine event."""

    at: datetime = field(default_factory=datetime.now, kw_only=True)


EventSink = Callable[[EngineEvent], None]


# --- server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerStarted(EngineEvent):
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class ServerFailed(EngineEvent):
    """The SCP could not listen (port in use, permission denied...)."""

    host: str
    port: int
    reason: str


@dataclass(frozen=True)
class ServerStopped(EngineEvent):
    pass


@dataclass(frozen=True)
class AssociationStarted(EngineEvent):
    association_id: int
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    accepted_contexts: int
    rejected_contexts: tuple[str, ...]


@dataclass(frozen=True)
class AssociationRejected(EngineEvent):
    calling_ae: str
    called_ae: str
    peer_address: str
    reason: str


@dataclass(frozen=True)
class AssociationEnded(EngineEvent):
    association_id: int
    calling_ae: str
    peer_address: str
    instances: int
    failures: int
    bytes: int
    duration: float
    outcome: str  # "released", "aborted" or "connection closed"


@dataclass(frozen=True)
class InstanceReceived(EngineEvent):
    association_id: int
    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int
    incoming_name: str


@dataclass(frozen=True)
class StoreFailed(EngineEvent):
    association_id: int
    calling_ae: str
    sop_instance_uid: str
    status: int
    reason: str


# --- autoloader ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceArchived(EngineEvent):
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    record_key: str
    record_created: bool
    archive_path: str
    size: int
    patient_id: str = ""  # the anonymized ID; shown only when the display setting allows
    patient_name: str = ""


@dataclass(frozen=True)
class InstanceDuplicate(EngineEvent):
    sop_instance_uid: str
    action: str  # "dropped identical copy", "overwritten", "quarantined"


@dataclass(frozen=True)
class InstanceQuarantined(EngineEvent):
    file_name: str
    reason: str
    detail: str


@dataclass(frozen=True)
class QueueDepth(EngineEvent):
    waiting: int


@dataclass(frozen=True)
class EngineError(EngineEvent):
    """Something failed that a person should see (the engine keeps running)."""

    where: str
    message: str


@dataclass(frozen=True)
class ArchivingResumed(EngineEvent):
    """Archiving works again after a pause an :class:`EngineError` announced (a full disk)."""

    where: str
    message: str


# --- query/retrieve -------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoFinished(EngineEvent):
    """A C-ECHO to a remote node ended (alone, or before a query or retrieve)."""

    node: str
    ok: bool
    problem: str  # "" when ok, else a FailureKind from engine.qr ("refused", "timeout", ...)
    message: str
    elapsed: float


@dataclass(frozen=True)
class QueryFinished(EngineEvent):
    node: str
    level: str
    rows: int
    status: int | None
    cancelled: bool
    limited: bool
    message: str


@dataclass(frozen=True)
class RetrieveStarted(EngineEvent):
    retrieve_id: int
    node: str
    method: str  # "c-move" or "c-get"
    level: str
    destination: str  # the move destination AE title ("" for C-GET)
    requests: int  # C-MOVE/C-GET requests this retrieve will send


@dataclass(frozen=True)
class RetrieveProgress(EngineEvent):
    """From a pending C-MOVE/C-GET response; counts add up over the retrieve's requests."""

    retrieve_id: int
    node: str
    remaining: int | None
    completed: int
    failed: int
    warning: int


@dataclass(frozen=True)
class RetrieveFinished(EngineEvent):
    retrieve_id: int
    node: str
    ok: bool
    cancelled: bool
    status: int | None
    completed: int
    failed: int
    warning: int
    failed_sop_instance_uids: tuple[str, ...]
    message: str


# --- hardening ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolViolation(EngineEvent):
    """A peer broke the protocol (e.g. a PDU beyond the negotiated maximum): it was aborted."""

    peer: str
    reason: str


@dataclass(frozen=True)
class RecordCreated(EngineEvent):
    """The first instance of a new research record (patient, study or series) was archived."""

    unit: str
    key: str  # the anonymized Patient ID or Study/Series Instance UID
    instance_count: int
    series_count: int
    modalities: str


@dataclass(frozen=True)
class RecordUpdated(EngineEvent):
    """A batch added instances to an existing record; counts are the new totals."""

    unit: str
    key: str
    instance_count: int
    series_count: int
    modalities: str


@dataclass(frozen=True)
class Throughput(EngineEvent):
    """Instances archived per second over the last few seconds of work."""

    instances_per_second: float
    archived_total: int
