"""Query/Retrieve client: C-ECHO, C-FIND, C-MOVE and C-GET against remote nodes (a PACS).

Every query or retrieve association is preceded by a C-ECHO association; when the echo fails the
operation stops with a :class:`QRFailure` whose message a technician can act on (connection
refused, timeout, association rejected with its decoded reason, context not accepted).

Everything here blocks the calling thread: the UI runs it in a worker thread and cancels through a
:class:`CancelToken` (a C-CANCEL is sent at the next response, the association is aborted if the
peer ignores it). Progress is reported through the engine's ``sink(event)``. Results are typed
rows (:class:`PatientRow`, :class:`StudyRow`, :class:`SeriesRow`, :class:`InstanceRow`).

Nothing here logs patient names, IDs or birth dates: log lines carry UIDs, AE titles, addresses
and statuses.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast, get_args

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from webaims_tui.config import ae_title_problem
from webaims_tui.engine import db
from webaims_tui.engine.events import (
    EchoFinished,
    EventSink,
    InstanceReceived,
    QueryFinished,
    RetrieveFinished,
    RetrieveProgress,
    RetrieveStarted,
    StoreFailed,
)
from webaims_tui.engine.scp import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
    storage_sop_classes,
    write_to_incoming,
)
from webaims_tui.engine.store_checks import store_problem
from webaims_tui.engine.tls import TLSSetupError, client_ssl_context

log = logging.getLogger(__name__)

T = TypeVar("T")

QueryModel = Literal["patient", "study"]
QueryLevel = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
RetrieveMethod = Literal["c-move", "c-get"]
#: Why an association or an operation failed, as a short machine-readable word.
FailureKind = Literal[
    "refused",  # nothing listens on host:port
    "unreachable",  # no route, host down, name does not resolve
    "timeout",  # no answer within the configured timeout
    "rejected",  # the peer rejected the association (reason decoded in the message)
    "aborted",  # the peer aborted or closed the connection
    "context-not-accepted",  # associated, but the service we need was refused
    "tls",  # the TLS handshake failed
    "failed",  # the operation itself answered a failure status
]

QUERY_MODELS: tuple[str, ...] = get_args(QueryModel)
QUERY_LEVELS: tuple[str, ...] = get_args(QueryLevel)
RETRIEVE_METHODS: tuple[str, ...] = get_args(RetrieveMethod)

DEFAULT_MAX_PDU = 65536

# PS3.4 C.6: the Query/Retrieve information model SOP classes.
_FIND_MODELS = {"patient": "1.2.840.10008.5.1.4.1.2.1.1", "study": "1.2.840.10008.5.1.4.1.2.2.1"}
_MOVE_MODELS = {"patient": "1.2.840.10008.5.1.4.1.2.1.2", "study": "1.2.840.10008.5.1.4.1.2.2.2"}
_GET_MODELS = {"patient": "1.2.840.10008.5.1.4.1.2.1.3", "study": "1.2.840.10008.5.1.4.1.2.2.3"}

_PENDING = (0xFF00, 0xFF01)
_CANCELLED = 0xFE00
#: After a C-CANCEL, how long to wait for the peer to stop before aborting the association.
CANCEL_GRACE_SECONDS = 10.0

#: Offered for C-GET storage sub-operations: uncompressed first (any SCP can send those, and
#: pynetdicom's acceptor side of the context picks what it supports), then common compressed ones
#: so a PACS holding JPEG need not transcode.
_GET_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
]
#: The storage classes most archives hold, offered for C-GET when we cannot learn the study's
#: SOP classes from an IMAGE-level C-FIND first.
_COMMON_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG for presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # US Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.12.2",  # RF
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
]
#: PS3.8 allows 128 presentation contexts per association; one is the C-GET model's.
_MAX_GET_STORAGE_CONTEXTS = 120


# --- errors and results --------------------------------------------------------------------


class QRFailure(Exception):
    """An association or operation failed; ``message`` says what to do about it."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message


class QueryError(ValueError):
    """A query or retrieve request is invalid; the message names the field."""


@dataclass(frozen=True)
class Peer:
    """Everything needed to reach a remote node (built from a ``db.RemoteNode`` or by hand)."""

    ae_title: str
    host: str
    port: int
    name: str = ""
    query_model: QueryModel = "study"
    retrieve_method: RetrieveMethod = "c-move"
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = DEFAULT_MAX_PDU
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @property
    def label(self) -> str:
        """How messages name the node: its name, or AET@host:port for an ad-hoc peer."""
        return self.name or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class LocalAE:
    """Who we are: our AE title and the port our Storage SCP listens on (the move target)."""

    ae_title: str
    port: int


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    peer: str
    elapsed: float
    problem: str = ""  # a FailureKind when not ok
    message: str = ""
    status: int | None = None


class CancelToken:
    """Set from any thread; the operation sends a C-CANCEL at its next response."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


# --- queries -------------------------------------------------------------------------------

_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _check_uid(field_name: str, value: str) -> None:
    for uid in value.split("\\"):
        if len(uid) > 64 or not _UID.match(uid):
            raise QueryError(f"{field_name} = {uid!r}: not a DICOM UID (digits and dots, <= 64)")


@dataclass(frozen=True)
class FindQuery:
    """A C-FIND request. Empty strings match anything; ``limit`` 0 means no limit.

    Dates are ``YYYYMMDD`` or ranges ``YYYYMMDD-YYYYMMDD`` (either side may be empty); the
    patient name takes the DICOM wildcards ``*`` and ``?``. ``modality`` matches Modalities in
    Study at STUDY level and Modality below it.
    """

    level: QueryLevel = "STUDY"
    model: QueryModel = "study"
    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    study_date: str = ""
    modality: str = ""
    accession_number: str = ""
    study_description: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    limit: int = 0

    def validate(self) -> None:
        """Raise QueryError naming the field when the query cannot be sent."""
        if self.level not in QUERY_LEVELS:
            raise QueryError(f"level = {self.level!r}: must be one of {', '.join(QUERY_LEVELS)}")
        if self.model not in QUERY_MODELS:
            raise QueryError(f"model = {self.model!r}: must be patient or study")
        if self.level == "PATIENT" and self.model == "study":
            raise QueryError(
                "level = PATIENT: the Study Root model has no PATIENT level; "
                "use the Patient Root model (--model patient)"
            )
        for name in ("birth_date", "study_date"):
            value = getattr(self, name)
            if value and (value == "-" or not _DATE_RANGE.match(value)):
                raise QueryError(
                    f"{name} = {value!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
                )
        for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            if getattr(self, name):
                _check_uid(name, getattr(self, name))
        if self.modality and not re.match(r"^[A-Z0-9]{1,16}(\\[A-Z0-9]{1,16})*$", self.modality):
            raise QueryError(f"modality = {self.modality!r}: expected codes such as CT or MR")
        if self.limit < 0:
            raise QueryError(f"limit = {self.limit}: must be 0 (no limit) or more")

    def identifier(self) -> Dataset:
        """The C-FIND identifier: our matching keys plus the return keys of the level."""
        self.validate()
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.birth_date
        if self.level == "PATIENT":
            ds.PatientSex = ""
            ds.NumberOfPatientRelatedStudies = None
            return ds
        ds.StudyInstanceUID = self.study_instance_uid
        ds.StudyDate = self.study_date
        if self.level == "STUDY":
            ds.StudyTime = ""
            ds.AccessionNumber = self.accession_number
            ds.StudyDescription = self.study_description
            ds.StudyID = ""
            ds.ModalitiesInStudy = self.modality
            ds.NumberOfStudyRelatedSeries = None
            ds.NumberOfStudyRelatedInstances = None
            return ds
        # Below STUDY, study-level keys other than the UID are not allowed as matching keys in a
        # hierarchical query; send them only when given (a relational PACS may use them).
        if self.accession_number:
            ds.AccessionNumber = self.accession_number
        if self.study_description:
            ds.StudyDescription = self.study_description
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.Modality = self.modality
        if self.level == "SERIES":
            ds.SeriesNumber = None
            ds.SeriesDescription = ""
            ds.NumberOfSeriesRelatedInstances = None
            return ds
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = ""
        ds.InstanceNumber = None
        return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class PatientRow:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    studies: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PatientRow:
        return cls(
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex"),
            studies=_number(ds, "NumberOfPatientRelatedStudies"),
        )


@dataclass(frozen=True)
class StudyRow:
    patient_id: str
    patient_name: str
    birth_date: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    description: str
    study_id: str
    modalities: tuple[str, ...]
    series: int | None
    instances: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyRow:
        modalities = _text(ds, "ModalitiesInStudy")
        return cls(
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            description=_text(ds, "StudyDescription"),
            study_id=_text(ds, "StudyID"),
            modalities=tuple(m for m in modalities.split("\\") if m),
            series=_number(ds, "NumberOfStudyRelatedSeries"),
            instances=_number(ds, "NumberOfStudyRelatedInstances"),
        )


@dataclass(frozen=True)
class SeriesRow:
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesRow:
        return cls(
            patient_id=_text(ds, "PatientID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality"),
            series_number=_number(ds, "SeriesNumber"),
            description=_text(ds, "SeriesDescription"),
            instances=_number(ds, "NumberOfSeriesRelatedInstances"),
        )


@dataclass(frozen=True)
class InstanceRow:
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceRow:
        return cls(
            patient_id=_text(ds, "PatientID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            instance_number=_number(ds, "InstanceNumber"),
        )


Row = PatientRow | StudyRow | SeriesRow | InstanceRow

_ROW_TYPES: dict[str, Callable[[Dataset], Row]] = {
    "PATIENT": PatientRow.from_dataset,
    "STUDY": StudyRow.from_dataset,
    "SERIES": SeriesRow.from_dataset,
    "IMAGE": InstanceRow.from_dataset,
}


def row_as_dict(row: Row) -> dict[str, Any]:
    """A row as plain JSON-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(row).items()}


@dataclass(frozen=True)
class FindResult:
    rows: list[Row]
    status: int | None
    cancelled: bool = False
    limited: bool = False
    elapsed: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        """Completed (or stopped by us at the limit or on request) without a failure status."""
        return self.status in (STATUS_SUCCESS, _CANCELLED)


# --- retrieves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieveTarget:
    """What one C-MOVE/C-GET request asks for. The level is implied by the deepest key given."""

    patient_id: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()

    @property
    def level(self) -> QueryLevel:
        if self.sop_instance_uids:
            return "IMAGE"
        if self.series_instance_uid:
            return "SERIES"
        if self.study_instance_uid:
            return "STUDY"
        return "PATIENT"

    def validate(self) -> None:
        if not (self.patient_id or self.study_instance_uid):
            raise QueryError("retrieve needs a patient ID or a study UID")
        if self.series_instance_uid and not self.study_instance_uid:
            raise QueryError("series_instance_uid given without study_instance_uid")
        if self.sop_instance_uids and not self.series_instance_uid:
            raise QueryError("sop_instance_uids given without series_instance_uid")
        for name in ("study_instance_uid", "series_instance_uid"):
            if getattr(self, name):
                _check_uid(name, getattr(self, name))
        for uid in self.sop_instance_uids:
            _check_uid("sop_instance_uids", uid)

    def model_for(self, peer: Peer) -> QueryModel:
        # PATIENT level exists only in Patient Root; below it Study Root needs no patient ID.
        if self.level == "PATIENT":
            return "patient"
        return "patient" if peer.query_model == "patient" and self.patient_id else "study"

    def identifier(self, model: QueryModel) -> Dataset:
        self.validate()
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        if model == "patient":
            ds.PatientID = self.patient_id
        if self.study_instance_uid:
            ds.StudyInstanceUID = self.study_instance_uid
        if self.series_instance_uid:
            ds.SeriesInstanceUID = self.series_instance_uid
        if self.sop_instance_uids:
            # A list of UIDs is allowed for the unique key of the retrieve level (PS3.4 C.4.2.2.1).
            ds.SOPInstanceUID = list(self.sop_instance_uids)
        return ds


@dataclass(frozen=True)
class RetrieveSummary:
    node: str
    method: RetrieveMethod
    destination: str
    status: int | None
    completed: int
    failed: int
    warning: int
    remaining: int = 0
    cancelled: bool = False
    failed_sop_instance_uids: tuple[str, ...] = ()
    received: tuple[str, ...] = ()  # SOP Instance UIDs written to incoming/ (C-GET only)
    elapsed: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.status == STATUS_SUCCESS
            and self.failed == 0
            and self.warning == 0
            and not self.cancelled
        )


_retrieve_ids = itertools.count(1)


# --- status texts ----------------------------------------------------------------------------


def status_text(code: int | None) -> str:
    """PS3.4 meaning of a C-FIND/C-MOVE/C-GET/C-ECHO status."""
    if code is None:
        return "no response"
    known = {
        0x0000: "success",
        0xFE00: "cancelled",
        0xFF00: "pending",
        0xFF01: "pending (optional keys not supported)",
        0xB000: "warning: sub-operations completed with one or more failures or warnings",
        0x0122: "refused: SOP class not supported",
        0x0124: "refused: not authorised",
        0xA700: "refused: out of resources",
        0xA701: "refused: out of resources, unable to calculate the number of matches",
        0xA702: "refused: out of resources, unable to perform the sub-operations",
        0xA801: "refused: move destination unknown",
        0xA900: "failed: identifier does not match SOP class",
        0xAA00: "failed: none of the frames requested were found",
        0x0211: "refused: unrecognised operation",
    }
    if code in known:
        return known[code]
    if 0xC000 <= code <= 0xCFFF:
        return "failed: unable to process"
    if 0xA000 <= code <= 0xAFFF:
        return "failed"
    return "unknown status"


#: PS3.8 9.3.4: (result source, diagnostic) -> words.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def explain_rejection(peer: Peer, our_ae: str, result: int, source: int, diagnostic: int) -> str:
    """A rejected association in words a technician can act on."""
    reason = _REJECT_REASONS.get((source, diagnostic), f"source {source}, reason {diagnostic}")
    permanence = "permanently" if result == 1 else "for now (transient)"
    advice = {
        (1, 3): f"the PACS does not know our AE title {our_ae!r}: add it to the PACS's list of "
        "allowed nodes (AE title, our address and port), or check the AE title we send",
        (1, 7): f"the PACS does not answer to {peer.ae_title!r}: check the node's called AE "
        "title (it is case-sensitive) against the PACS configuration",
        (3, 2): "the PACS has too many associations open: try again in a moment",
        (3, 1): "the PACS is busy: try again in a moment",
        (1, 2): "the PACS does not speak DICOM's application context: is this a DICOM port?",
    }.get((source, diagnostic), "ask the PACS administrator why it refuses our associations")
    return f"{peer.label} rejected the association {permanence}: {reason}. What to do: {advice}."


# --- the client -------------------------------------------------------------------------------


@dataclass
class _AssociationDiagnostics:
    """What the network told us while associating, to explain a failure precisely."""

    connected: bool = False
    #: The peer accepted the association but none of our contexts (pynetdicom then aborts).
    accepted: bool = False
    rejection: tuple[int, int, int] | None = None
    aborted_by_peer: tuple[int, int] | None = None
    started: float = field(default_factory=time.monotonic)


def _ignore(event: Any) -> None:
    pass


class QRClient:
    """Opens associations to remote nodes as our AE and runs echo/find/move/get on them.

    C-GET storage sub-operations pass the SCP's content checks (``max_instance_mb``) and are
    written to ``incoming`` through ``spool`` exactly as the Storage SCP writes them, refused
    below ``min_free_disk_mb`` of free space.
    """

    def __init__(
        self,
        local: LocalAE,
        *,
        incoming: Path,
        spool: Path,
        min_free_disk_mb: int = 0,
        max_instance_mb: int = 4096,
        fsync: bool = True,
        sink: EventSink = _ignore,
    ) -> None:
        self.local = local
        self.incoming = incoming
        self.spool = spool
        self.min_free_disk_mb = min_free_disk_mb
        self.max_instance_mb = max_instance_mb
        self.fsync = fsync
        self.sink = sink

    # --- associations -------------------------------------------------------------------------

    def _make_ae(self, peer: Peer) -> AE:
        ae = AE(ae_title=self.local.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = peer.acse_timeout
        ae.dimse_timeout = peer.dimse_timeout
        ae.network_timeout = peer.network_timeout
        # Without it a TCP connect to a host that drops packets waits for the OS (minutes).
        ae.connection_timeout = peer.acse_timeout
        ae.maximum_pdu_size = peer.max_pdu_size
        return ae

    def _tls_args(self, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
        """TLS 1.2+ verifying the node's certificate against its CA file (or the system store).

        No host name check: DICOM nodes are configured by IP and their certificates rarely
        name it (see engine/tls.py).
        """
        if not peer.tls:
            return None
        context = client_ssl_context(
            peer.tls_ca_file or None, peer.tls_cert_file or None, peer.tls_key_file or None
        )
        # The name only serves SNI here: check_hostname is off.
        return context, peer.host

    @contextmanager
    def _association(
        self,
        peer: Peer,
        contexts: Sequence[tuple[str, Sequence[str] | None]],
        required: Sequence[str],
        *,
        roles: Sequence[Any] = (),
        handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
    ) -> Iterator[Association]:
        """An established association proposing ``contexts``; QRFailure explains why not."""
        ae = self._make_ae(peer)
        for uid, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(uid)
            else:
                ae.add_requested_context(uid, list(syntaxes))
        diagnostics = _AssociationDiagnostics()

        def on_open(event: evt.Event) -> None:
            diagnostics.connected = True
            # Nagle holds our small PDUs until the peer's delayed ACK: measured on loopback
            # against Orthanc, a STUDY-level C-FIND took 91 ms with it and 40 ms without.
            raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
            if isinstance(raw, socket.socket):
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def on_accepted(event: evt.Event) -> None:
            diagnostics.accepted = True

        def on_acse(event: evt.Event) -> None:
            primitive = event.primitive  # type: ignore[attr-defined]
            if isinstance(primitive, A_ASSOCIATE) and primitive.result in (1, 2):
                diagnostics.rejection = (
                    int(primitive.result),
                    int(primitive.result_source or 0),
                    int(primitive.diagnostic or 0),
                )
            elif isinstance(primitive, A_ABORT):
                diagnostics.aborted_by_peer = (int(primitive.abort_source or 0), 0)
            elif isinstance(primitive, A_P_ABORT):
                diagnostics.aborted_by_peer = (2, int(primitive.provider_reason or 0))

        try:
            tls_args = self._tls_args(peer)
        except TLSSetupError as exc:
            raise QRFailure("tls", f"cannot set up TLS for {peer.label}: {exc}") from None
        all_handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, on_open),
            (evt.EVT_ACSE_RECV, on_acse),
            (evt.EVT_ACCEPTED, on_accepted),
            *handlers,
        ]
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            max_pdu=peer.max_pdu_size,
            ext_neg=list(roles) or None,
            evt_handlers=all_handlers,
            tls_args=tls_args,
        )
        if not assoc.is_established:
            tls = tls_args[0] if tls_args else None
            raise self._explain_association_failure(peer, diagnostics, required, tls)
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            for uid in required:
                if uid not in accepted:
                    raise self._context_not_accepted(peer, uid)
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _explain_association_failure(
        self,
        peer: Peer,
        diagnostics: _AssociationDiagnostics,
        required: Sequence[str],
        tls: ssl.SSLContext | None,
    ) -> QRFailure:
        elapsed = time.monotonic() - diagnostics.started
        if diagnostics.accepted:
            return self._context_not_accepted(peer, required[0] if required else "")
        if diagnostics.rejection is not None:
            result, source, diagnostic = diagnostics.rejection
            return QRFailure(
                "rejected",
                explain_rejection(peer, self.local.ae_title, result, source, diagnostic),
            )
        if diagnostics.aborted_by_peer is not None:
            return QRFailure(
                "aborted",
                f"{peer.label} aborted the association request: it may refuse our address or AE "
                f"title {self.local.ae_title!r}, or the port is not a DICOM port",
            )
        if diagnostics.connected:
            if elapsed >= peer.acse_timeout * 0.9:
                return QRFailure(
                    "timeout",
                    f"{peer.label} accepted the TCP connection but did not answer the association "
                    f"request within {peer.acse_timeout:g} s: the PACS is overloaded or hung, or "
                    "the port belongs to another service; raise the node's ACSE timeout or ask "
                    "the PACS administrator",
                )
            return QRFailure(
                "aborted",
                f"{peer.label} closed the connection without answering the association request: "
                "the port may not be a DICOM port, a TLS setting may be wrong, or the PACS "
                "refuses our address",
            )
        return _diagnose_connect(peer, tls)

    def _context_not_accepted(self, peer: Peer, uid: str) -> QRFailure:
        return QRFailure(
            "context-not-accepted",
            f"{peer.label} accepted the association but not the service "
            f"{_service_name(uid)} ({uid}): enable it on the PACS for our AE title "
            f"{self.local.ae_title!r}, or change the node's query model or retrieve method",
        )

    # --- C-ECHO -------------------------------------------------------------------------------

    def echo(self, peer: Peer) -> EchoResult:
        """Verify connectivity; never raises for network trouble, the result says what failed."""
        started = time.monotonic()
        try:
            with self._association(
                peer, [(VERIFICATION_SOP_CLASS, None)], [VERIFICATION_SOP_CLASS]
            ) as assoc:
                response = assoc.send_c_echo()
                status = int(response.Status) if "Status" in response else None
        except QRFailure as failure:
            result = EchoResult(
                ok=False,
                peer=peer.label,
                elapsed=time.monotonic() - started,
                problem=failure.kind,
                message=failure.message,
            )
        else:
            elapsed = time.monotonic() - started
            if status == STATUS_SUCCESS:
                result = EchoResult(
                    ok=True,
                    peer=peer.label,
                    elapsed=elapsed,
                    status=status,
                    message=f"{peer.label} answered C-ECHO in {elapsed * 1000:.0f} ms",
                )
            elif status is None:
                result = EchoResult(
                    ok=False,
                    peer=peer.label,
                    elapsed=elapsed,
                    problem="timeout",
                    message=f"{peer.label} accepted the association but did not answer the "
                    f"C-ECHO within {peer.dimse_timeout:g} s",
                )
            else:
                result = EchoResult(
                    ok=False,
                    peer=peer.label,
                    elapsed=elapsed,
                    problem="failed",
                    status=status,
                    message=f"{peer.label} answered C-ECHO with status 0x{status:04X} "
                    f"({status_text(status)})",
                )
        log.info("C-ECHO %s: %s", peer.label, "ok" if result.ok else result.message)
        self.sink(
            EchoFinished(
                node=peer.label,
                ok=result.ok,
                problem=result.problem,
                message=result.message,
                elapsed=result.elapsed,
            )
        )
        return result

    def require_echo(self, peer: Peer) -> EchoResult:
        """C-ECHO before a query or retrieve; a failure stops the operation (QRFailure)."""
        result = self.echo(peer)
        if not result.ok:
            kind = cast(FailureKind, result.problem or "failed")
            raise QRFailure(kind, f"C-ECHO failed, nothing was sent: {result.message}")
        return result

    # --- C-FIND -------------------------------------------------------------------------------

    def find(self, peer: Peer, query: FindQuery, cancel: CancelToken | None = None) -> FindResult:
        """Run a C-FIND (after a C-ECHO); rows are typed by the query level.

        When ``query.limit`` rows have arrived, or ``cancel`` is set, a C-CANCEL is sent and the
        rows received so far are returned.
        """
        identifier = query.identifier()
        self.require_echo(peer)
        model = str(_FIND_MODELS[query.model])
        make_row = _ROW_TYPES[query.level]
        rows: list[Row] = []
        status: int | None = None
        cancelled = limited = False
        started = time.monotonic()
        with self._association(peer, [(model, None)], [model]) as assoc:
            context_id = _context_id(assoc, model)
            cancel_sent_at: float | None = None
            for response, found in assoc.send_c_find(identifier, model, msg_id=1):
                if "Status" not in response:
                    raise QRFailure(
                        "timeout",
                        f"{peer.label} stopped answering the C-FIND (no response within "
                        f"{peer.dimse_timeout:g} s, or the association was aborted)",
                    )
                code = int(response.Status)
                if code not in _PENDING:
                    status = code
                    break
                if cancel_sent_at is not None:
                    # Responses already in flight when the PACS saw our C-CANCEL.
                    if time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS:
                        assoc.abort()
                        status = _CANCELLED
                        break
                    continue
                if found is not None:
                    rows.append(make_row(found))
                if cancel is not None and cancel.cancelled:
                    cancelled = True
                elif query.limit and len(rows) >= query.limit:
                    limited = True
                if cancelled or limited:
                    assoc.send_c_cancel(1, context_id)
                    cancel_sent_at = time.monotonic()
        elapsed = time.monotonic() - started
        if status is None:
            raise QRFailure("aborted", f"{peer.label} ended the C-FIND without a final status")
        if status in (STATUS_SUCCESS, _CANCELLED):
            message = f"{len(rows)} {query.level.lower()} rows in {elapsed:.2f} s"
            if limited:
                message += f" (stopped at the limit of {query.limit})"
            elif cancelled:
                message += " (cancelled)"
        else:
            message = (
                f"{peer.label} answered the C-FIND with 0x{status:04X} ({status_text(status)})"
            )
        log.info("C-FIND %s %s: %s", peer.label, query.level, message)
        self.sink(
            QueryFinished(
                node=peer.label,
                level=query.level,
                rows=len(rows),
                status=status,
                cancelled=cancelled,
                limited=limited,
                message=message,
            )
        )
        return FindResult(
            rows=rows,
            status=status,
            cancelled=cancelled,
            limited=limited,
            elapsed=elapsed,
            message=message,
        )

    # --- C-MOVE / C-GET -------------------------------------------------------------------------

    def retrieve(
        self,
        peer: Peer,
        targets: Sequence[RetrieveTarget],
        *,
        method: RetrieveMethod | None = None,
        destination: str | None = None,
        cancel: CancelToken | None = None,
        sop_classes: Sequence[str] = (),
    ) -> RetrieveSummary:
        """Retrieve ``targets`` (one C-MOVE or C-GET request each, on one association).

        C-MOVE sends to ``destination`` (our own AE title by default); C-GET receives on the
        association and writes to incoming/. ``sop_classes`` are the storage classes to offer
        for C-GET (learn them with an IMAGE-level find; common ones are offered otherwise).
        Progress is emitted as RetrieveProgress events; the summary is also emitted.
        """
        if not targets:
            raise QueryError("nothing to retrieve")
        for target in targets:
            target.validate()
        chosen = method or peer.retrieve_method
        if chosen not in RETRIEVE_METHODS:
            raise QueryError(f"retrieve method {chosen!r}: must be c-move or c-get")
        move_to = (destination or self.local.ae_title) if chosen == "c-move" else ""
        if move_to:
            problem = ae_title_problem(move_to)
            if problem:
                raise QueryError(f"destination {move_to!r}: {problem}")
        self.require_echo(peer)
        retrieve_id = next(_retrieve_ids)
        self.sink(
            RetrieveStarted(
                retrieve_id=retrieve_id,
                node=peer.label,
                method=chosen,
                level=targets[0].level,
                destination=move_to,
                requests=len(targets),
            )
        )
        run = _RetrieveRun(self, peer, retrieve_id, chosen, move_to, cancel)
        try:
            if chosen == "c-move":
                run.move(targets)
            else:
                run.get(targets, sop_classes)
        except QRFailure as failure:
            run.failure = failure
        summary = run.summary()
        log.info("%s %s: %s", chosen.upper(), peer.label, summary.message)
        self.sink(
            RetrieveFinished(
                retrieve_id=retrieve_id,
                node=peer.label,
                ok=summary.ok,
                cancelled=summary.cancelled,
                status=summary.status,
                completed=summary.completed,
                failed=summary.failed,
                warning=summary.warning,
                failed_sop_instance_uids=summary.failed_sop_instance_uids,
                message=summary.message,
            )
        )
        return summary


class _RetrieveRun:
    """The state of one retrieve: counts over its requests, cancellation, C-GET files."""

    def __init__(
        self,
        client: QRClient,
        peer: Peer,
        retrieve_id: int,
        method: RetrieveMethod,
        destination: str,
        cancel: CancelToken | None,
    ) -> None:
        self.client = client
        self.peer = peer
        self.retrieve_id = retrieve_id
        self.method = method
        self.destination = destination
        self.cancel = cancel
        self.started = time.monotonic()
        # Totals of the requests already finished; the current request's counts add to these.
        self.completed = self.failed = self.warning = 0
        self.remaining = 0
        self.status: int | None = None
        self.cancelled = False
        self.failed_uids: list[str] = []
        self.failure: QRFailure | None = None
        self.local_address = ""
        self.received: list[str] = []
        self.stored_log: list[dict[str, Any]] = []
        self.store_failures = 0
        self.bytes = 0
        self._lock = threading.Lock()

    # --- C-MOVE -------------------------------------------------------------------------------

    def move(self, targets: Sequence[RetrieveTarget]) -> None:
        models = {target.model_for(self.peer) for target in targets}
        uids = [str(_MOVE_MODELS[m]) for m in sorted(models)]
        with self.client._association(self.peer, [(u, None) for u in uids], uids) as assoc:
            self.local_address = _local_address(assoc)
            for message_id, target in enumerate(targets, start=1):
                model = target.model_for(self.peer)
                uid = str(_MOVE_MODELS[model])
                responses = assoc.send_c_move(
                    target.identifier(model), self.destination, uid, msg_id=message_id
                )
                if not self._follow(assoc, responses, message_id, _context_id(assoc, uid)):
                    break

    # --- C-GET --------------------------------------------------------------------------------

    def get(self, targets: Sequence[RetrieveTarget], sop_classes: Sequence[str]) -> None:
        models = {target.model_for(self.peer) for target in targets}
        uids = [str(_GET_MODELS[m]) for m in sorted(models)]
        classes = list(dict.fromkeys([*sop_classes, *_COMMON_STORAGE_CLASSES]))
        known = set(storage_sop_classes().values())
        classes = [c for c in classes if c in known or c in sop_classes]
        classes = classes[: _MAX_GET_STORAGE_CONTEXTS - len(uids)]
        contexts: list[tuple[str, Sequence[str] | None]] = [(u, None) for u in uids]
        contexts += [(c, _GET_TRANSFER_SYNTAXES) for c in classes]
        # We are the SCP of the storage sub-operations on our own association (PS3.4 C.4.3).
        roles = [build_role(c, scp_role=True) for c in classes]
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        with self.client._association(
            self.peer, contexts, uids, roles=roles, handlers=handlers
        ) as assoc:
            self.local_address = _local_address(assoc)
            for message_id, target in enumerate(targets, start=1):
                model = target.model_for(self.peer)
                uid = str(_GET_MODELS[model])
                responses = assoc.send_c_get(target.identifier(model), uid, msg_id=message_id)
                if not self._follow(assoc, responses, message_id, _context_id(assoc, uid)):
                    break
        self._record_get_association()

    def _on_store(self, event: evt.Event) -> int:
        """A C-GET storage sub-operation: write it like the SCP does, answer a real status."""
        request = cast(C_STORE, event.request)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        syntax = str(event.context.transfer_syntax)
        try:
            # The same content checks as the SCP: UIDs match the request, size under the limit.
            problem = store_problem(
                request.DataSet.getbuffer() if request.DataSet is not None else None,
                sop_class=sop_class,
                sop_instance=sop_instance,
                transfer_syntax=syntax,
                max_instance_bytes=self.client.max_instance_mb * 1024 * 1024,
            )
            if problem is not None:  # nothing is written
                (status, reason), size, name = problem, 0, ""
            else:
                status, size, name, reason = write_to_incoming(
                    request.DataSet,
                    sop_class=sop_class,
                    sop_instance=sop_instance,
                    transfer_syntax=syntax,
                    source_ae=self.peer.ae_title,
                    spool=self.client.spool,
                    incoming=self.client.incoming,
                    min_free_disk_mb=self.client.min_free_disk_mb,
                    fsync=self.client.fsync,
                )
        except Exception as exc:  # pynetdicom would turn this into a bare 0xC211
            log.exception("C-GET storage sub-operation failed")
            status, size, name, reason = STATUS_CANNOT_UNDERSTAND, 0, "", f"internal error: {exc}"
        with self._lock:
            self.stored_log.append(
                {
                    "sop_class_uid": sop_class[:64],
                    "sop_instance_uid": sop_instance[:64],
                    "transfer_syntax_uid": syntax[:64],
                    "size": size,
                    "status": status,
                    "received_at": datetime.now(),
                }
            )
            if status == STATUS_SUCCESS:
                self.received.append(sop_instance)
                self.bytes += size
            else:
                self.store_failures += 1
        if status == STATUS_SUCCESS:
            self.client.sink(
                InstanceReceived(
                    association_id=0,
                    calling_ae=self.peer.ae_title,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    transfer_syntax_uid=syntax,
                    size=size,
                    incoming_name=name,
                )
            )
        else:
            self.client.sink(
                StoreFailed(
                    association_id=0,
                    calling_ae=self.peer.ae_title,
                    sop_instance_uid=sop_instance,
                    status=status,
                    reason=reason,
                )
            )
        return status

    def _record_get_association(self) -> None:
        """Log the C-GET like an SCP association, so 'what we received' stays in one table."""
        if not self.stored_log:
            return
        try:
            with db.database.connection_context(), db.database.atomic():
                row = db.AssociationLog.create(
                    calling_ae=self.peer.ae_title[:16],
                    called_ae=self.client.local.ae_title[:16],
                    peer_address=self.peer.host[:64],
                    peer_port=self.peer.port,
                    ended_at=datetime.now(),
                    instances=len(self.received),
                    failures=self.store_failures,
                    bytes=self.bytes,
                    outcome="c-get",
                )
                for start in range(0, len(self.stored_log), 500):
                    batch = self.stored_log[start : start + 500]
                    db.ReceivedInstanceLog.insert_many(
                        [dict(item, association=row.id) for item in batch]
                    ).execute()
        except Exception:
            # The files are safe in incoming/; only the log rows are lost.
            log.exception("cannot record the C-GET association")

    # --- shared -------------------------------------------------------------------------------

    def _follow(self, assoc: Association, responses: Any, message_id: int, context_id: int) -> bool:
        """Read one request's responses; returns False when the retrieve must stop."""
        cancel_sent_at: float | None = None
        last: Dataset | None = None
        for response, identifier in responses:
            if "Status" not in response:
                self._add_final(last)
                raise QRFailure(
                    "timeout",
                    f"{self.peer.label} stopped answering (no response within "
                    f"{self.peer.dimse_timeout:g} s, or the association was aborted)",
                )
            code = int(response.Status)
            last = response
            if code in _PENDING:
                self._progress(response)
                if cancel_sent_at is None and self.cancel is not None and self.cancel.cancelled:
                    assoc.send_c_cancel(message_id, context_id)
                    cancel_sent_at = time.monotonic()
                    self.cancelled = True
                elif (
                    cancel_sent_at is not None
                    and time.monotonic() - cancel_sent_at > CANCEL_GRACE_SECONDS
                ):
                    # The PACS ignores the C-CANCEL: abort rather than receive everything.
                    assoc.abort()
                    self._add_final(response)
                    self.status = _CANCELLED
                    return False
                continue
            self.status = code
            if code == _CANCELLED:
                self.cancelled = True
            self._add_final(response)
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                failed = identifier.FailedSOPInstanceUIDList
                values = [failed] if isinstance(failed, str) else list(failed)
                self.failed_uids.extend(str(v) for v in values if v)
            # A refusal (unknown destination, out of resources...) would refuse the rest too.
            return not self.cancelled and code in (STATUS_SUCCESS, 0xB000)
        self._add_final(last)
        return False

    def _refused(self) -> list[str]:
        with self._lock:
            return [i["sop_instance_uid"] for i in self.stored_log if i["status"] != STATUS_SUCCESS]

    def _progress(self, response: Dataset) -> None:
        remaining = _number(response, "NumberOfRemainingSuboperations")
        self.client.sink(
            RetrieveProgress(
                retrieve_id=self.retrieve_id,
                node=self.peer.label,
                remaining=remaining,
                completed=self.completed
                + (_number(response, "NumberOfCompletedSuboperations") or 0),
                failed=self.failed + (_number(response, "NumberOfFailedSuboperations") or 0),
                warning=self.warning + (_number(response, "NumberOfWarningSuboperations") or 0),
            )
        )

    def _add_final(self, response: Dataset | None) -> None:
        if response is None:
            return
        self.completed += _number(response, "NumberOfCompletedSuboperations") or 0
        self.failed += _number(response, "NumberOfFailedSuboperations") or 0
        self.warning += _number(response, "NumberOfWarningSuboperations") or 0
        self.remaining = _number(response, "NumberOfRemainingSuboperations") or 0

    def summary(self) -> RetrieveSummary:
        elapsed = time.monotonic() - self.started
        summary = RetrieveSummary(
            node=self.peer.label,
            method=self.method,
            destination=self.destination,
            status=self.status,
            completed=self.completed,
            failed=self.failed,
            warning=self.warning,
            remaining=self.remaining,
            cancelled=self.cancelled,
            # The PACS's Failed SOP Instance UID List, plus (C-GET) the instances we refused.
            failed_sop_instance_uids=tuple(dict.fromkeys([*self.failed_uids, *self._refused()])),
            received=tuple(self.received),
            elapsed=elapsed,
        )
        return _with_message(summary, self._explain(summary))

    def _explain(self, s: RetrieveSummary) -> str:
        counts = f"{s.completed} completed, {s.failed} failed, {s.warning} with warnings"
        if self.failure is not None:
            return f"{self.failure.message} ({counts} before it stopped)"
        if s.cancelled:
            written = ""
            if self.method == "c-get" and len(s.received) != s.completed:
                # Measured with Orthanc: an instance in flight when the C-CANCEL arrives is
                # stored here but left out of the PACS's final count. It is kept, not lost.
                written = f" ({len(s.received)} written to incoming/)"
            return f"cancelled: {counts}{written}, {s.remaining} not sent"
        code = s.status
        if code is None:
            return f"{self.peer.label} ended the retrieve without a final status ({counts})"
        where = f"0x{code:04X} ({status_text(code)})"
        if code == STATUS_SUCCESS and s.failed == 0 and s.warning == 0:
            if s.completed == 0:
                return f"nothing matched on {self.peer.label}: 0 instances sent"
            return f"{s.completed} instances retrieved in {s.elapsed:.1f} s"
        if code == 0xA801:
            return (
                f"{self.peer.label} does not know the move destination {self.destination!r}. "
                f"{self._configure_hint()}"
            )
        if self.method == "c-move" and s.completed == 0 and s.failed == 0 and code >= 0xA000:
            # Orthanc (and others) answer an unknown destination with a generic failure.
            return (
                f"{self.peer.label} refused the C-MOVE with {where} and sent nothing. The usual "
                f"cause is that it does not know the destination {self.destination!r} or cannot "
                "connect to it; it may also have given up because the destination refused the "
                f"first instance (see the receive log). {self._configure_hint()}"
            )
        if self.method == "c-get" and self.store_failures:
            return (
                f"{where}: {counts}; {self.store_failures} storage sub-operations refused by us "
                "(see the receive log: disk space or write errors)"
            )
        if s.failed or s.warning:
            shown = ", ".join(s.failed_sop_instance_uids[:5])
            more = len(s.failed_sop_instance_uids) - 5
            listed = (
                f"; failed: {shown}" + (f" and {more} more" if more > 0 else "") if shown else ""
            )
            return f"{where}: {counts}{listed}"
        return f"{self.peer.label} answered {where}: {counts}"

    def _configure_hint(self) -> str:
        if self.destination != self.client.local.ae_title:
            return (
                f"Configure {self.destination!r} as a DICOM node on the PACS, or move to our own "
                f"AE title {self.client.local.ae_title!r}."
            )
        host = self.local_address or "this computer's address"
        return (
            f"Configure on the PACS a DICOM node with AE title {self.destination!r}, host "
            f"{host}, port {self.client.local.port}, and make sure webaims-tui is receiving; or "
            "switch this node to C-GET (nodes edit NAME --retrieve-method c-get)."
        )


def _with_message(summary: RetrieveSummary, message: str) -> RetrieveSummary:
    return replace(summary, message=message)


def _context_id(assoc: Association, abstract_syntax: str) -> int:
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) == abstract_syntax:
            return cast(int, cx.context_id)
    raise QRFailure("context-not-accepted", f"no accepted context for {abstract_syntax}")


def _local_address(assoc: Association) -> str:
    """Our address as the PACS sees it (for 'configure host X on the PACS' messages)."""
    try:
        return str(assoc.dul.socket.socket.getsockname()[0])  # type: ignore[union-attr]
    except (AttributeError, OSError, IndexError):
        return ""


def _service_name(uid: str) -> str:
    names = {
        VERIFICATION_SOP_CLASS: "Verification (C-ECHO)",
        **{str(v): f"{k.title()} Root C-FIND" for k, v in _FIND_MODELS.items()},
        **{str(v): f"{k.title()} Root C-MOVE" for k, v in _MOVE_MODELS.items()},
        **{str(v): f"{k.title()} Root C-GET" for k, v in _GET_MODELS.items()},
    }
    return names.get(uid, str(UID(uid).name))


def _diagnose_connect(peer: Peer, tls: ssl.SSLContext | None) -> QRFailure:
    """pynetdicom reports only 'could not connect': repeat the connect (and handshake) to learn
    why."""
    timeout = min(peer.acse_timeout, 10.0)
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout) as raw:
            if tls is not None:
                with tls.wrap_socket(raw, server_hostname=peer.host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        return QRFailure(
            "tls",
            f"the TLS certificate of {peer.host}:{peer.port} is not trusted "
            f"({exc.verify_message}): set the node's CA file (tls_ca_file) to the CA that "
            "issued the PACS certificate",
        )
    except ssl.SSLError as exc:
        return QRFailure(
            "tls",
            f"the TLS handshake with {peer.host}:{peer.port} failed ({exc.reason or exc}): does "
            "the port speak TLS, and does the PACS require a client certificate (tls_cert_file, "
            "tls_key_file) it trusts?",
        )
    except ConnectionRefusedError:
        return QRFailure(
            "refused",
            f"connection refused by {peer.host}:{peer.port}: nothing listens there. Is the PACS "
            "running, and are the host and port right?",
        )
    except TimeoutError:
        return QRFailure(
            "timeout",
            f"no answer from {peer.host}:{peer.port} within {timeout:g} s: the host is down, or "
            "a firewall drops the connection; check the address and the firewall",
        )
    except socket.gaierror:
        return QRFailure(
            "unreachable",
            f"the host name {peer.host!r} does not resolve: check its spelling or use an IP "
            "address",
        )
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return QRFailure(
                "unreachable",
                f"{peer.host} is unreachable from this computer (no route): check the network "
                "and the address",
            )
        return QRFailure(
            "unreachable", f"cannot connect to {peer.host}:{peer.port}: {exc.strerror or exc}"
        )
    # The port answers now: the first attempt failed for a reason that has since gone away.
    return QRFailure(
        "aborted",
        f"the connection to {peer.host}:{peer.port} failed, but the port answers now: try again",
    )


# --- verify and fetch missing ------------------------------------------------------------------

#: ``held(study_uid, candidates)``: which of the candidate *original* SOP Instance UIDs the archive
#: holds. The engine provides it (see ``Engine.archived_original_sop_uids``).
HeldLookup = Callable[[str, Collection[str]], set[str]]


@dataclass(frozen=True)
class VerifyReport:
    """Remote IMAGE-level C-FIND count versus what the archive holds, for a study or series."""

    node: str
    study_instance_uid: str
    series_instance_uid: str
    remote: int
    held: int
    missing: tuple[InstanceRow, ...]
    #: (series UID, remote instance count): lets a wholly missing series go in one request.
    remote_series: tuple[tuple[str, int], ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def message(self) -> str:
        scope = "series" if self.series_instance_uid else "study"
        if self.complete:
            return f"{scope} complete: all {self.remote} remote instances are in the archive"
        return (
            f"{scope} incomplete: {self.remote} instances on {self.node}, {self.held} in the "
            f"archive, {len(self.missing)} missing"
        )


@dataclass(frozen=True)
class FetchMissingReport:
    before: VerifyReport
    retrieve: RetrieveSummary | None
    after: VerifyReport | None

    @property
    def ok(self) -> bool:
        return (self.after or self.before).complete

    @property
    def message(self) -> str:
        if self.retrieve is None:
            return self.before.message + "; nothing to fetch"
        after = self.after.message if self.after else "not verified again"
        return f"fetched: {self.retrieve.message}; now {after}"


def verify(
    client: QRClient,
    peer: Peer,
    study_instance_uid: str,
    series_instance_uid: str = "",
    *,
    held: HeldLookup,
    cancel: CancelToken | None = None,
) -> VerifyReport:
    """Compare an IMAGE-level C-FIND of the study (or series) with what ``held`` reports."""
    query = FindQuery(
        level="IMAGE",
        model="study",
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    result = client.find(peer, query, cancel)
    if not result.ok:
        raise QRFailure("failed", f"cannot list the remote instances: {result.message}")
    rows = [r for r in result.rows if isinstance(r, InstanceRow) and r.sop_instance_uid]
    remote = {r.sop_instance_uid: r for r in rows}
    present = held(study_instance_uid, set(remote))
    missing = tuple(r for uid, r in remote.items() if uid not in present)
    series: dict[str, int] = {}
    for row in remote.values():
        series[row.series_instance_uid] = series.get(row.series_instance_uid, 0) + 1
    return VerifyReport(
        node=peer.label,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        remote=len(remote),
        held=len(remote) - len(missing),
        missing=missing,
        remote_series=tuple(series.items()),
    )


def missing_targets(
    study_instance_uid: str, missing: Sequence[InstanceRow], remote_counts: dict[str, int]
) -> list[RetrieveTarget]:
    """One request per series: the whole series when all of it is missing, else its instances."""
    by_series: dict[str, list[str]] = {}
    for row in missing:
        by_series.setdefault(row.series_instance_uid, []).append(row.sop_instance_uid)
    targets = []
    for series_uid, uids in by_series.items():
        if len(uids) == remote_counts.get(series_uid, -1):
            targets.append(
                RetrieveTarget(
                    study_instance_uid=study_instance_uid, series_instance_uid=series_uid
                )
            )
        else:
            targets.append(
                RetrieveTarget(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_uid,
                    sop_instance_uids=tuple(uids),
                )
            )
    return targets


def fetch_missing(
    client: QRClient,
    peer: Peer,
    study_instance_uid: str,
    series_instance_uid: str = "",
    *,
    held: HeldLookup,
    method: RetrieveMethod | None = None,
    destination: str | None = None,
    cancel: CancelToken | None = None,
    settle: Callable[[], None] = lambda: None,
) -> FetchMissingReport:
    """Verify, retrieve only what is missing, verify again (after ``settle``) and report."""
    before = verify(client, peer, study_instance_uid, series_instance_uid, held=held, cancel=cancel)
    if before.complete:
        return FetchMissingReport(before=before, retrieve=None, after=None)
    targets = missing_targets(study_instance_uid, before.missing, dict(before.remote_series))
    summary = client.retrieve(
        peer,
        targets,
        method=method,
        destination=destination,
        cancel=cancel,
        sop_classes=sorted({r.sop_class_uid for r in before.missing if r.sop_class_uid}),
    )
    if summary.cancelled:
        return FetchMissingReport(before=before, retrieve=summary, after=None)
    settle()
    after = verify(client, peer, study_instance_uid, series_instance_uid, held=held)
    return FetchMissingReport(before=before, retrieve=summary, after=after)


class BackgroundOperation(Generic[T]):
    """Runs ``work(cancel_token)`` in a thread; ``cancel()`` from any thread, ``wait()`` for it."""

    def __init__(self, work: Callable[[CancelToken], T], name: str = "qr") -> None:
        self.token = CancelToken()
        self.result: T | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[CancelToken], T]) -> None:
        try:
            self.result = work(self.token)
        except BaseException as exc:  # handed to whoever waits; a thread must not die silently
            self.error = exc

    def cancel(self) -> None:
        self.token.cancel()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> T | None:
        """The result (re-raising the operation's exception), or None while still running."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self.error is not None:
            raise self.error
        return self.result
