"""The autoloader: incoming/ -> parse -> anonymize -> index -> archive/ or quarantine/.

Threads: a watchfiles thread only *wakes* the loop; the loop thread lists incoming/ (on a wake,
every ``sweep_interval`` seconds, and at start-up) and is the database's one writer. The CPU work
(read, anonymize, write the archived file) runs in the loop thread or, for a backlog, in a small
process pool so that the SCP's association threads keep the GIL in the main process.

Crash safety: the order of steps for each batch is

1. prepare: read the incoming file, anonymize, write the result to ``archive/.tmp/<uuid>.part``;
2. write the batch journal (the incoming names it holds);
3. rename each temporary file to its final archive path (atomic, same file system);
4. one database transaction for the whole batch (rows for patient .. instance, records);
5. delete each incoming file (or move it to originals/), then the journal.

A SIGKILL before 4 leaves the incoming file, which is processed again on restart (the rename
in 3 simply happens again onto the same path). A kill after 4 leaves an incoming file whose
SOP Instance UID is indexed with identical content: the journal names it, so it is removed
without a duplicate warning. Start-up removes stale temporary files and, after an unclean stop,
reconciles the archive with the index (rows whose file is gone, files with no row).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

import peewee as pw
import watchfiles
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, MPEGTransferSyntaxes

from webaims_tui.config import AutoloaderSettings, ConfigError, Settings
from webaims_tui.engine import db
from webaims_tui.engine.anonymize import AnonymizationRefused, Anonymizer, PassThrough
from webaims_tui.engine.archive import (
    DEFER_SIZE,
    TEMP_FOLDER,
    PathTemplateError,
    archive_path_for,
    deferred_elements,
    file_sha256,
    inside,
    sync_file,
    sync_folder,
    template_keywords,
    write_part10,
)
from webaims_tui.engine.events import (
    ArchivingResumed,
    EngineError,
    EventSink,
    InstanceArchived,
    InstanceDuplicate,
    InstanceQuarantined,
    QueueDepth,
    RecordCreated,
    RecordUpdated,
    Throughput,
)
from webaims_tui.engine.quarantine import (
    incoming_name,
    original_name_of,
    quarantine_file,
    reconcile_quarantine,
)
from webaims_tui.engine.scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
MAX_UID_LENGTH = 64
#: Names the SCP and the importer give to files they complete elsewhere and rename in.
_GENERATED_PREFIX = r"\d+-[0-9a-f]{12}"
_ATOMIC_NAME = re.compile(rf"^{_GENERATED_PREFIX}(--.+|\.dcm)$")
#: Any other file (a copy from CD into incoming/) must be unchanged this long before it is read,
#: or a half-copied file would be quarantined as truncated.
SETTLE_SECONDS = 2.0
#: A file that failed for a reason that may pass (disk full) is retried after this long.
RETRY_AFTER_SECONDS = 30.0
#: Errors that say the file system is full (of data or of inodes) or the quota is used up.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: Below this many waiting files the pool is not worth its start-up time.
POOL_THRESHOLD = 32
#: Archive files without an index row are adopted only once they are this old.
ORPHAN_MIN_AGE_SECONDS = 600.0
JOURNAL_NAME = ".autoloader-journal"
CLEAN_MARKER_NAME = ".autoloader-clean"
LOCK_NAME = ".autoloader.lock"
THROUGHPUT_INTERVAL = 2.0
#: While files keep arriving, a pass waits this long for more before taking a short batch.
GATHER_SECONDS = 0.25
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: a file has one of them at most.
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
#: No frame is bigger uncompressed: native pixel data must fit one 32-bit value length, so a
#: bigger frame could never be decompressed into a DICOM file.
MAX_FRAME_BYTES = 0xFFFFFFFE
#: No instance of compressed data may claim to decode to more, all frames together (video
#: aside, see _compressed_pixel_problem). Generous for real data: a whole-slide image's
#: full-resolution level, tens of thousands of small tiles, decodes to tens of GB (a large
#: section at 40x to a few hundred), a big CT volume as one enhanced multi-frame to 1-2 GB.
MAX_DECODED_INSTANCE_BYTES = 1 << 40
UNDEFINED_LENGTH = 0xFFFFFFFF
#: A deflated data set is inflated whole into memory by pydicom: beyond this size it is
#: quarantined unread. Deflate reaches about 1000:1, so a few megabytes received can claim
#: gigabytes; real deflated objects (structured reports, small images) are far below this.
MAX_INFLATED_BYTES = 1024 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024


class AutoloaderBusy(Exception):
    """Another process holds the autoloader lock on this data folder."""


# --- the per-file step (runs in the loop thread or in a pool process) -------------------------


@dataclass(frozen=True)
class Job:
    incoming: str
    name: str
    temp_folder: str
    template: str
    # A job made without settings (a tool, a test) gets the default bound.
    max_decoded_frame_bytes: int = AutoloaderSettings().max_decoded_frame_bytes
    fsync: bool = True


@dataclass(frozen=True)
class Prepared:
    """A file anonymized and written to a temporary name, with the values to index."""

    name: str  # relative to incoming/; "" when adopting a file already in the archive
    temp: str  # "" when the file is already at archive_path
    archive_path: str
    size: int
    content_hash: str
    calling_ae: str
    received_at: datetime
    ruleset_version: int | None
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    number_of_frames: int
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """A file that goes to quarantine/<reason>/."""

    name: str
    reason: str
    detail: str
    calling_ae: str
    sop_instance_uid: str = ""
    #: The RuleSet row id of the rule set that refused it (None: no rule set was involved).
    ruleset_version: int | None = None


@dataclass(frozen=True)
class Postponed:
    """A file that failed for a reason that may pass (disk full): left in incoming/."""

    name: str
    detail: str
    #: The OSError's errno: whether the disk is full is decided on it, never on the text
    #: (strerror is translated by the locale).
    errno: int


Outcome = Prepared | Refused | Postponed | None

_worker_anonymizer: Anonymizer | None = None


def _init_worker(anonymizer: Anonymizer) -> None:
    global _worker_anonymizer
    _worker_anonymizer = anonymizer
    # Receiving comes first: a modality waits for each answer, while a backlog in incoming/
    # only waits for spare CPU (the SCP's thread shares the cores with these workers).
    os.nice(10)


def _prepare_in_worker(job: Job) -> Outcome:
    assert _worker_anonymizer is not None
    return prepare(job, _worker_anonymizer)


def prepare(job: Job, anonymizer: Anonymizer) -> Outcome:
    """Read, check and anonymize one incoming file and write it to a temporary archive name.

    Never raises for bad input: the reason comes back as :class:`Refused`. Returns None when the
    file vanished (processed already by an earlier pass).
    """
    try:
        return _prepare(job, anonymizer)
    except Exception as exc:
        # pydicom decodes lazily: a malformed element can raise from anywhere (an unknown VR
        # in the file meta...). Whatever it is, the file goes to quarantine with the reason.
        return Refused(
            job.name, "not-dicom", f"cannot decode: {type(exc).__name__}: {_short(exc)}", ""
        )


def _prepare(job: Job, anonymizer: Anonymizer) -> Outcome:
    path = Path(job.incoming) / job.name
    try:
        stat = path.stat()
        # Before any read: pydicom inflates a deflated data set whole, even to defer values.
        bomb = deflate_bomb_problem(path)
        if bomb:
            return Refused(job.name, "decompression-bomb", bomb, "")
        dataset = dcmread(path, defer_size=DEFER_SIZE)
        if _is_deflated(dataset):
            # Offsets in a deflated file are offsets in the inflated stream: no deferring.
            dataset = dcmread(path)
    except FileNotFoundError:
        return None
    except InvalidDicomError as exc:
        return Refused(job.name, "not-dicom", _short(exc), "")
    except EOFError as exc:
        return Refused(job.name, "truncated", _short(exc), "")
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (EIO, EACCES...): may pass, try again later
            return Postponed(job.name, f"cannot read: {exc.strerror or exc}", exc.errno)
        # pydicom raises plain OSError for malformed data ("No tag to read at offset ...").
        return Refused(job.name, "not-dicom", _short(exc), "")
    except Exception as exc:
        return Refused(job.name, "not-dicom", f"{type(exc).__name__}: {_short(exc)}", "")
    calling_ae = _calling_ae(dataset)
    deferred = deferred_elements(dataset)
    problem = truncation_problem(dataset, deferred, stat.st_size, job.max_decoded_frame_bytes)
    if problem:
        return Refused(job.name, "truncated", problem, calling_ae, _uid(dataset))
    missing = _missing_uids(dataset)
    if missing:
        return Refused(job.name, "missing-uid", missing, calling_ae, _uid(dataset))
    try:
        result = anonymizer.anonymize(dataset)
    except AnonymizationRefused as refused:
        return Refused(
            job.name,
            refused.reason,
            refused.detail,
            calling_ae,
            _uid(dataset),
            refused.ruleset_version,
        )
    except Exception as exc:
        detail = f"{type(exc).__name__}: {_short(exc)}"
        return Refused(job.name, "anonymization-failed", detail, calling_ae, _uid(dataset))
    anonymized = result.dataset
    missing = _missing_uids(anonymized)
    if missing:
        detail = f"after anonymization: {missing}"
        return Refused(job.name, "anonymization-failed", detail, calling_ae, _uid(dataset))
    temp = Path(job.temp_folder) / f"{uuid.uuid4().hex}.part"
    try:
        _prepare_file_meta(anonymized)
        relative = archive_path_for(anonymized, job.template)
        content_hash = write_part10(anonymized, temp, path, deferred)
        if job.fsync:
            sync_file(temp)
        size = temp.stat().st_size
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, EOFError):
            return Refused(job.name, "truncated", _short(exc), calling_ae, _uid(dataset))
        if exc.errno is not None:  # disk full, permissions: the file is fine, try again later
            detail = f"cannot write the archive file: {exc.strerror or exc}"
            return Postponed(job.name, detail, exc.errno)
        detail = f"cannot encode the anonymized file: {_short(exc)}"
        return Refused(job.name, "unwritable", detail, calling_ae, _uid(dataset))
    except Exception as exc:
        temp.unlink(missing_ok=True)
        detail = f"cannot encode the anonymized file: {type(exc).__name__}: {_short(exc)}"
        return Refused(job.name, "unwritable", detail, calling_ae, _uid(dataset))
    return _prepared(
        anonymized,
        name=job.name,
        temp=str(temp),
        archive_path=relative.as_posix(),
        size=size,
        content_hash=content_hash,
        calling_ae=calling_ae,
        received_at=datetime.fromtimestamp(stat.st_mtime),
        ruleset_version=result.ruleset_version,
    )


def truncation_problem(
    dataset: Dataset,
    deferred: dict[int, RawDataElement],
    file_size: int,
    max_decoded_frame_bytes: int,
) -> str | None:
    """Why the file looks cut short (or its pixel data too large to decode), or None.

    Compares declared lengths with what is there; see :func:`pixel_data_problem` for the
    pixel data and ``max_decoded_frame_bytes``.
    """
    for tag, element in deferred.items():
        end = element.value_tell + element.length
        if end > file_size:
            return (
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {element.length} bytes; "
                f"the file ends {end - file_size} bytes early"
            )
    for tag in list(dataset.keys()):
        raw: Any = dataset.get_item(tag, keep_deferred=True)
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != 0xFFFFFFFF
            and len(raw.value) < raw.length
        ):
            return (
                f"element ({tag.group:04X},{tag.element:04X}) declares {raw.length} bytes; "
                f"only {len(raw.value)} are in the file"
            )
    has_pixels = any(
        keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    )
    if "Rows" in dataset and "Columns" in dataset and not has_pixels:
        return "image attributes are present but the pixel data is missing: the file was cut"
    return pixel_data_problem(dataset, file_size, max_decoded_frame_bytes)


@dataclass(frozen=True)
class PixelClaim:
    """What an image header says its pixel data holds, absent values taken at their smallest."""

    rows: int
    columns: int
    samples: int
    bits: int
    frames: int

    def __str__(self) -> str:
        return (
            f"Rows {self.rows} x Columns {self.columns} x {self.samples} samples x "
            f"{self.bits} bits allocated x {self.frames} frames"
        )

    @property
    def decoded_frame_bytes(self) -> int:
        """One frame as a decoder hands it out: whole bytes per sample (1-bit data comes out
        a byte a pixel) and every sample of every pixel (YBR_FULL_422 comes out full)."""
        return self.rows * self.columns * self.samples * -(-self.bits // 8)


def pixel_claim(dataset: Dataset) -> PixelClaim | None:
    """The header's claim, or None when it claims no size (no usable Rows or Columns).

    Absent values count at their smallest, so that only what the header says can fail a check;
    a NumberOfFrames of 0 or garbage (pydicom's badVR.dcm has "1A") counts as 1, as in pydicom.
    """
    rows, columns = _header_integer(dataset, "Rows"), _header_integer(dataset, "Columns")
    if rows is None or columns is None:
        return None
    samples = _header_integer(dataset, "SamplesPerPixel")
    bits = _header_integer(dataset, "BitsAllocated")
    return PixelClaim(
        rows=rows,
        columns=columns,
        samples=1 if samples is None else samples,
        bits=1 if bits is None else bits,
        frames=_header_integer(dataset, "NumberOfFrames") or 1,
    )


def pixel_data_problem(
    dataset: Dataset, file_size: int, max_decoded_frame_bytes: int
) -> str | None:
    """Why the image header claims pixel data the file does not hold or no one should decode.

    None when there is no such problem. Works from header values and the pixel data element's
    declared length only: the value is never read, let alone decoded. A header that claims
    more than is there is a cut file or a decompression bomb; pydicom's decoders allocate what
    Rows x Columns x ... say, so whatever decoded it later (a viewer, an export) would try to
    allocate gigabytes. Compressed data says nothing of its decoded size: a frame that would
    decode to more than ``max_decoded_frame_bytes`` is refused.
    """
    tag = next((tag for tag in PIXEL_DATA_TAGS if tag in dataset), None)
    claim = pixel_claim(dataset)
    if tag is None or claim is None:
        return None  # no pixel data, or no size claimed: nothing to compare
    if min(claim.rows, claim.columns, claim.samples, claim.bits, claim.frames) < 1:
        return f"pixel data mismatch: the file has pixel data but its header says {claim}"
    frame_bytes = _expected_pixel_bytes(claim.rows, claim.columns, claim.samples, claim.bits, 1, "")
    if frame_bytes > MAX_FRAME_BYTES:
        return (
            f"pixel data mismatch: {claim} makes {frame_bytes} bytes per frame, more than any "
            "frame can hold uncompressed"
        )
    element: Any = dataset.get_item(tag, keep_deferred=True)
    length = int(element.length) if isinstance(element, RawDataElement) else UNDEFINED_LENGTH
    if length == UNDEFINED_LENGTH or not _native_syntax(dataset):
        # Compressed (or a syntax we do not know). Uncompressed data is what the header
        # claims once its length is checked below: a big frame there is a big image, no bomb.
        return _compressed_pixel_problem(dataset, claim, file_size, max_decoded_frame_bytes)
    photometric = str(_header_value(dataset, "PhotometricInterpretation") or "").strip()
    expected = _expected_pixel_bytes(
        claim.rows, claim.columns, claim.samples, claim.bits, claim.frames, photometric
    )
    # PS3.5 8.1.1: the value length is the expected length, padded to even; more is tolerated.
    if expected > length:
        return (
            f"pixel data mismatch: the header claims {expected} bytes ({claim}); the pixel data "
            f"element holds {length}"
        )
    return None


def _compressed_pixel_problem(
    dataset: Dataset, claim: PixelClaim, file_size: int, max_decoded_frame_bytes: int
) -> str | None:
    """:func:`pixel_data_problem` for compressed data, whose stored size says little about
    the decoded one."""
    # Every frame takes at least one byte of the file, though.
    if claim.frames > file_size:
        return f"pixel data mismatch: {claim.frames} frames claimed in a file of {file_size} bytes"
    frame_bytes = claim.decoded_frame_bytes
    if frame_bytes > max_decoded_frame_bytes:
        return (
            f"pixel data too large: {claim} makes {frame_bytes} bytes per decoded frame, more "
            f"than autoloader.max_decoded_frame_mb allows ({max_decoded_frame_bytes >> 20} MB)"
        )
    # Video is decoded as a stream, a frame at a time, and an hour of HD video makes ~670 GB:
    # its frames are bounded, its length is not.
    total = frame_bytes * claim.frames
    if total > MAX_DECODED_INSTANCE_BYTES and _transfer_syntax(dataset) not in MPEGTransferSyntaxes:
        return (
            f"pixel data too large: {claim} makes {total} bytes decoded, more than any "
            f"instance may decode to ({MAX_DECODED_INSTANCE_BYTES >> 30} GB)"
        )
    return None


def _expected_pixel_bytes(
    rows: int, columns: int, samples: int, bits: int, frames: int, photometric: str
) -> int:
    """The uncompressed pixel data length, without the odd-length padding byte.

    The rules of pydicom's ``pixels.utils.get_expected_length`` (PS3.5 8.1.1; PS3.3
    C.7.6.3.1.2 for YBR_FULL_422), applied to values already checked: that function reads them
    from a dataset again and warns on a NumberOfFrames of 0, which real files have.
    """
    length = rows * columns * samples * frames
    length = -(-length // 8) if bits == 1 else length * (bits // 8)
    if photometric == "YBR_FULL_422":
        length = length // 3 * 2
    return length


def _header_integer(dataset: Dataset, keyword: str) -> int | None:
    """An integer header value; None when absent, empty, multi-valued or not a number."""
    value = _header_value(dataset, keyword)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _header_value(dataset: Dataset, keyword: str) -> Any:
    try:
        return dataset.get(keyword)
    except Exception:  # a value pydicom cannot convert (bad VR, bad length)
        return None


def _transfer_syntax(dataset: Dataset) -> str:
    """The file meta's transfer syntax UID ("" when absent)."""
    meta = getattr(dataset, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _native_syntax(dataset: Dataset) -> bool:
    """Whether the pixel data is stored uncompressed, so that the header fixes its length.

    With no transfer syntax in the file meta pydicom guessed an uncompressed one (it cannot
    read anything else without being told); an unknown syntax UID may be compressed.
    """
    syntax = _transfer_syntax(dataset)
    if not syntax:
        return True
    try:
        return not UID(syntax).is_compressed
    except ValueError:  # not a transfer syntax pydicom knows
        return False


def _calling_ae(dataset: Dataset) -> str:
    """The sender's AE title the SCP put in the file meta ("" when absent or undecodable)."""
    try:
        meta = getattr(dataset, "file_meta", None)
        return str(meta.get("SourceApplicationEntityTitle", "") if meta else "").strip()[:16]
    except Exception:
        return ""


def incoming_files(root: Path) -> Iterator[str]:
    """Paths of the files in incoming/ that are the autoloader's to process.

    Hidden files and folders are its own (journal, lock) or another tool's, and ``.part``
    files are still being written.
    """
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if not file.startswith(".") and not file.endswith(".part"):
                yield os.path.join(folder, file)


def deflate_bomb_problem(path: Path, limit: int = MAX_INFLATED_BYTES) -> str | None:
    """Why a deflated file must not be read (it inflates beyond ``limit``), or None.

    Inflates in a stream, keeping nothing: the only cost is CPU, paid again by the real read.
    Files in any other transfer syntax, and files whose header cannot be read (the real read
    says why), are None.
    """
    try:
        with open(path, "rb") as handle:
            if handle.read(132)[128:] != b"DICM":
                return None
            meta = read_dataset(
                handle, False, True, stop_when=lambda tag, vr, length: tag.group != 2
            )
            if not UID(str(meta.get("TransferSyntaxUID", ""))).is_deflated:
                return None
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            while chunk := handle.read(_INFLATE_CHUNK):
                while chunk:
                    total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                    if total > limit:
                        return (
                            "decompression bomb: the deflated data set inflates to more than "
                            f"{limit:,} bytes"
                        )
                    chunk = inflater.unconsumed_tail
    except Exception:  # unreadable or malformed: the real read reports it
        return None
    return None


def _is_deflated(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return bool(syntax) and UID(syntax).is_deflated


def _missing_uids(dataset: Dataset) -> str:
    try:
        missing = [k for k in REQUIRED_UIDS if not str(dataset.get(k, "") or "").strip()]
        too_long = [k for k in REQUIRED_UIDS if len(str(dataset.get(k, "") or "")) > 64]
    except Exception as exc:
        return f"cannot read the UIDs: {type(exc).__name__}"
    if missing:
        return "missing " + ", ".join(missing)
    if too_long:
        return "longer than 64 characters: " + ", ".join(too_long)
    return ""


def _uid(dataset: Dataset) -> str:
    try:
        return str(dataset.get("SOPInstanceUID", "") or "")[:MAX_UID_LENGTH]
    except Exception:
        return ""


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _prepare_file_meta(dataset: Dataset) -> None:
    """Meta that matches the anonymized data set; the sender's AE title is not archived."""
    meta = dataset.file_meta
    meta.MediaStorageSOPClassUID = UID(str(dataset.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(dataset.SOPInstanceUID))
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if "SourceApplicationEntityTitle" in meta:
        del meta.SourceApplicationEntityTitle
    if "TransferSyntaxUID" not in meta:
        implicit, little = dataset.original_encoding
        meta.TransferSyntaxUID = UID(
            "1.2.840.10008.1.2" if implicit or implicit is None else "1.2.840.10008.1.2.1"
        )
        if little is False:
            meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.2")


def _text(dataset: Dataset, keyword: str, limit: int) -> str:
    try:
        value = dataset.get(keyword, "")
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    # PostgreSQL refuses NUL in text, SQLite stores it: drop it so both index the same value.
    return str(value).replace("\0", "").strip()[:limit]


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _prepared(dataset: Dataset, **fields: Any) -> Prepared:
    frames = _integer(dataset, "NumberOfFrames") or 1
    return Prepared(
        sop_instance_uid=_text(dataset, "SOPInstanceUID", 64),
        sop_class_uid=_text(dataset, "SOPClassUID", 64),
        transfer_syntax_uid=str(dataset.file_meta.get("TransferSyntaxUID", ""))[:64],
        instance_number=_integer(dataset, "InstanceNumber"),
        number_of_frames=frames,
        patient={
            "patient_id": _text(dataset, "PatientID", 128),
            "patient_name": _text(dataset, "PatientName", 256),
            "sex": _text(dataset, "PatientSex", 16),
            "birth_date": _text(dataset, "PatientBirthDate", 16),
        },
        study={
            "study_instance_uid": _text(dataset, "StudyInstanceUID", 64),
            "study_date": _text(dataset, "StudyDate", 16),
            "study_time": _text(dataset, "StudyTime", 16),
            "description": _text(dataset, "StudyDescription", 256),
            "accession_number": _text(dataset, "AccessionNumber", 64),
            "study_id": _text(dataset, "StudyID", 64),
        },
        series={
            "series_instance_uid": _text(dataset, "SeriesInstanceUID", 64),
            "modality": _text(dataset, "Modality", 16),
            "series_number": _integer(dataset, "SeriesNumber"),
            "description": _text(dataset, "SeriesDescription", 256),
            "body_part": _text(dataset, "BodyPartExamined", 64),
        },
        **fields,
    )


# --- what the loop decides for each prepared file ---------------------------------------------


@dataclass
class _Place:
    item: Prepared
    replaces: db.Instance | None = None
    archive_path: str = ""


@dataclass
class _Drop:
    item: Prepared
    action: str | None  # None: crash recovery, nothing to tell


@dataclass
class _Conflict:
    item: Prepared
    reason: str
    detail: str


def _relational_conflict(
    item: Prepared, earlier: _Place | None, row: db.Instance | None
) -> _Conflict | None:
    """A conflict when ``item``'s SOP Instance UID belongs to another study or series.

    That instance is the one placed earlier in this batch, else the indexed one (``row``, its
    series and study joined). The detail names what differs, never a value: UIDs can be traced
    back to a patient.
    """
    if earlier is not None:
        study = earlier.item.study["study_instance_uid"]
        series = earlier.item.series["series_instance_uid"]
        where = "arrived earlier in this batch"
    elif row is not None:
        archived: Any = row.series
        study, series = archived.study.study_instance_uid, archived.series_instance_uid
        where = "is archived"
    else:
        return None
    differs = [
        name
        for name, ours, theirs in (
            ("Study", item.study["study_instance_uid"], study),
            ("Series", item.series["series_instance_uid"], series),
        )
        if ours != theirs
    ]
    if not differs:
        return None
    which = (
        "the Study and Series Instance UIDs differ"
        if len(differs) == 2
        else f"the {differs[0]} Instance UID differs"
    )
    level = "study" if "Study" in differs else "series"
    return _Conflict(
        item,
        "relational-conflict",
        f"an instance with this SOP Instance UID {where} in another {level} ({which}); "
        "it is kept, whatever duplicate_policy says",
    )


@dataclass
class Counters:
    archived: int = 0
    quarantined: int = 0
    duplicates: int = 0
    postponed: int = 0


@dataclass
class ReconcileReport:
    missing_files: int = 0
    adopted: int = 0
    orphans_quarantined: int = 0
    orphans_removed: int = 0
    quarantine_repairs: int = 0
    temp_removed: int = 0
    details: list[str] = field(default_factory=list)


class Autoloader:
    """Owns incoming/ -> archive/; one per data folder (a lock file makes sure)."""

    def __init__(
        self,
        settings: Settings,
        sink: EventSink,
        anonymizer: Anonymizer | None = None,
        *,
        processes: int | None = None,
    ) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.options = settings.autoloader
        try:
            template_keywords(self.options.path_template)  # fails here, not once per file
        except PathTemplateError as exc:
            raise ConfigError(
                f"{settings.config_file}: autoloader.path_template = "
                f"{self.options.path_template!r}: {exc}"
            ) from None
        self.sink = sink
        self.anonymizer: Anonymizer = anonymizer if anonymizer is not None else PassThrough()
        self.processes = _default_processes(self.anonymizer) if processes is None else processes
        self.counters = Counters()
        # Several nodes may share one archive folder (each with its own data dir): temporary
        # files, the journal and the clean-stop marker are per node.
        node = hashlib.sha256(str(self.paths.data_dir.resolve()).encode()).hexdigest()[:12]
        self.temp_folder = self.paths.archive / TEMP_FOLDER / node
        self.journal = self.paths.data_dir / JOURNAL_NAME
        self.clean_marker = self.paths.data_dir / CLEAN_MARKER_NAME
        self._lock_handle: IO[str] | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._recovering: set[str] = set()
        self._retry_after: dict[str, float] = {}
        #: How long a file waits after a failure that may pass (disk full).
        self.retry_after_seconds = RETRY_AFTER_SECONDS
        #: The archive's file system is full: said once, until a batch fits again.
        self._disk_full = False
        self._disk_full_in_batch = False
        self._needs_reconcile = False
        self._next_wait: float | None = None
        self._made_folders: set[Path] = set()
        self._batch_new_records: set[int] = set()
        self._batch_touched_records: set[int] = set()
        self._batch_studies: set[int] = set()
        self._index_attempts: dict[str, int] = {}
        self._window_start = time.monotonic()
        self._window_count = 0
        self._last_depth = -1
        self._seen = 0
        self.running = False

    # --- lifetime -----------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lock, then watch and process incoming/ in background threads."""
        self._begin()
        self.running = True
        loop = threading.Thread(target=self._run, name="autoloader", daemon=True)
        watcher = threading.Thread(target=self._watch, name="autoloader-watch", daemon=True)
        self._threads = [loop, watcher]
        loop.start()
        watcher.start()

    def stop(self) -> None:
        """Finish the batch in hand and stop; what is still waiting stays in incoming/."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads = []
        self._end()
        self.running = False

    def run_once(self) -> Counters:
        """Process everything in incoming/ now, in this thread (for the CLI); then release."""
        self._begin()
        try:
            with db.database.connection_context():
                self._startup_pass()
        finally:
            self._end()
        return self.counters

    def wake(self) -> None:
        """Look at incoming/ now rather than at the next sweep."""
        self._wake.set()

    def _begin(self) -> None:
        self._take_lock()
        self._stopping.clear()
        self.temp_folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        # We hold the lock: every temporary file left here belongs to a dead process.
        for leftover in self.temp_folder.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        self._needs_reconcile = not self.clean_marker.exists()
        self.clean_marker.unlink(missing_ok=True)
        if self.journal.exists():
            self._recovering = set(self.journal.read_text(encoding="utf-8").splitlines())
        if removed:
            log.info("removed %d temporary files left by an earlier run", removed)

    def _end(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._lock_handle is not None:
            if not self._needs_reconcile:
                with contextlib.suppress(OSError):
                    self.clean_marker.write_text("", encoding="utf-8")
            self._release_lock()

    def _take_lock(self) -> None:
        self.paths.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.paths.data_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise AutoloaderBusy(
                "another webaims-tui process is already processing incoming/ in "
                f"{self.paths.data_dir}"
            ) from None
        self._lock_handle = handle

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # --- threads ------------------------------------------------------------------------------

    def _watch(self) -> None:
        # watchfiles logs every batch of changes at INFO: thousands of lines per study.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        try:
            for _changes in watchfiles.watch(
                self.paths.incoming,
                stop_event=self._stopping,
                debounce=200,
                step=20,
                yield_on_timeout=False,
                ignore_permission_denied=True,
            ):
                self._wake.set()
        except Exception as exc:
            # The periodic sweep still finds every file; only the reaction time suffers.
            log.warning("watching incoming/ failed (%s); relying on the sweep", exc)
            self.sink(EngineError(where="autoloader watch", message=str(exc)))

    def _run(self) -> None:
        with db.database.connection_context():
            first = True
            while not self._stopping.is_set():
                try:
                    if first:
                        self._startup_pass()
                        first = False
                    else:
                        self._drain()
                except Exception as exc:
                    log.exception("autoloader pass failed")
                    self.sink(EngineError(where="autoloader", message=f"{type(exc).__name__}"))
                    self._stopping.wait(1.0)
                wait = self.options.sweep_interval
                if self._next_wait is not None:
                    wait = min(wait, self._next_wait)
                    self._next_wait = None
                self._wake.wait(wait)
                self._wake.clear()

    def _startup_pass(self) -> None:
        self._drain()
        if self._needs_reconcile and not self._stopping.is_set():
            report = self.reconcile()
            self._needs_reconcile = False
            if report.details:
                for detail in report.details:
                    log.warning("reconcile: %s", detail)
                    self.sink(EngineError(where="reconcile", message=detail))
        self._drain()

    # --- one pass over incoming/ --------------------------------------------------------------

    def waiting_files(self) -> list[str]:
        """Names (relative to incoming/) ready to be processed, oldest first."""
        now = time.time()
        root = self.paths.incoming
        names: list[str] = []
        for full in incoming_files(root):
            name = os.path.relpath(full, root).replace(os.sep, "/")
            if self._retry_after.get(name, 0.0) > now:
                continue
            if not _ATOMIC_NAME.match(os.path.basename(full)):
                try:
                    age = now - os.stat(full).st_mtime
                except FileNotFoundError:
                    continue
                if age < SETTLE_SECONDS:
                    self._next_wait = SETTLE_SECONDS
                    continue
            names.append(name)
        names.sort()
        return names

    def _drain(self) -> None:
        streaming = False
        while not self._stopping.is_set():
            names = self.waiting_files()
            if streaming and 0 < len(names) < self.options.batch_size:
                # Files arrived while the last batch was processed: an SCP is receiving. Every
                # batch costs a transaction and a recount of its records, so a few files per
                # batch would spend more time on that than on the files; a moment's wait fills
                # the batch. The first file of a quiet spell is still taken at once.
                self._stopping.wait(GATHER_SECONDS)
                names = self.waiting_files()
            if not names:
                self._report_depth(0)
                return
            streaming = True
            done = 0
            for outcomes in self._prepared_batches(names):
                self._commit(outcomes)
                done += len(outcomes)
                self._report_depth(len(names) - done)
                if self._stopping.is_set():
                    return

    def _jobs(self, names: Sequence[str]) -> list[Job]:
        return [
            Job(
                incoming=str(self.paths.incoming),
                name=name,
                temp_folder=str(self.temp_folder),
                template=self.options.path_template,
                max_decoded_frame_bytes=self.options.max_decoded_frame_bytes,
                fsync=self.options.fsync,
            )
            for name in names
        ]

    def _prepared_batches(self, names: list[str]) -> Iterator[list[Outcome]]:
        size = self.options.batch_size
        batches = [names[i : i + size] for i in range(0, len(names), size)]
        # A backlog, or a steady stream (an SCP receiving a study arrives a few files per pass,
        # never a backlog, while its thread needs this process's GIL): worth the pool.
        self._seen += len(names)
        busy = len(names) >= POOL_THRESHOLD or self._seen >= POOL_THRESHOLD
        pool = self._get_pool() if busy else self._pool
        if pool is None:
            for batch in batches:
                yield [prepare(job, self.anonymizer) for job in self._jobs(batch)]
                if self._stopping.is_set():
                    return
            return
        # Two batches in flight: the pool prepares the next while this thread commits one.
        in_flight: deque[list[concurrent.futures.Future[Outcome]]] = deque()
        try:
            for batch in batches:
                in_flight.append(
                    [pool.submit(_prepare_in_worker, job) for job in self._jobs(batch)]
                )
                if len(in_flight) >= 2:
                    yield self._results(in_flight.popleft())
                if self._stopping.is_set():
                    return
            while in_flight:
                yield self._results(in_flight.popleft())
        finally:
            for futures in in_flight:
                for future in futures:
                    future.cancel()

    def _results(self, futures: list[concurrent.futures.Future[Outcome]]) -> list[Outcome]:
        results: list[Outcome] = []
        for future in futures:
            try:
                results.append(future.result())
            except concurrent.futures.process.BrokenProcessPool:
                # A worker died (out of memory?): the file stays in incoming/ for the next pass.
                self._pool = None
                self.processes = 0
                self.sink(EngineError(where="autoloader", message="a worker process died"))
                results.append(None)
            except concurrent.futures.CancelledError:
                results.append(None)
        return results

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self._pool is None and self.processes > 0:
            # spawn, not fork: this process has threads (pynetdicom, watchfiles, peewee).
            context = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self.anonymizer,),
            )
        return self._pool

    def _report_depth(self, waiting: int) -> None:
        if waiting != self._last_depth:
            self._last_depth = waiting
            self.sink(QueueDepth(waiting=waiting))

    # --- commit a batch -----------------------------------------------------------------------

    def _commit(self, outcomes: list[Outcome]) -> None:
        prepared = [o for o in outcomes if isinstance(o, Prepared)]
        self._disk_full_in_batch = False
        for outcome in outcomes:
            if isinstance(outcome, Postponed):
                self._postpone(outcome)
        decisions = self._decide(prepared) if prepared else []
        places = [d for d in decisions if isinstance(d, _Place)]
        if prepared:
            self._write_journal([p.name for p in prepared if p.name])
        self._assign_paths(places)
        # A place whose path holds another node's different, not yet indexed file waits.
        places = [place for place in places if self._move_into_archive(place)]
        if self.options.fsync:
            # Before the index commit and the deletion of the originals in incoming/.
            self._sync_archive_folders(places)
        created: dict[str, bool] = {}
        self._batch_new_records.clear()
        self._batch_touched_records.clear()
        self._batch_studies.clear()
        if places:
            try:
                with _write_transaction():
                    created = self._index(places)
            except pw.PeeweeException as exc:
                log.warning("batch index failed (%s); indexing one by one", type(exc).__name__)
                created = self._index_one_by_one(places)
            self._refresh_aggregates()
        for decision in decisions:
            if isinstance(decision, _Place) and decision.item.sop_instance_uid in created:
                self._finish_incoming(decision.item, decision.archive_path)
                if decision.replaces is not None and decision.item.name:
                    self.counters.duplicates += 1
                    self.sink(
                        InstanceDuplicate(
                            sop_instance_uid=decision.item.sop_instance_uid, action="overwritten"
                        )
                    )
                if decision.replaces is not None and decision.replaces.archive_path not in (
                    decision.archive_path,
                    "",
                ):
                    with contextlib.suppress(OSError):
                        (self.paths.archive / decision.replaces.archive_path).unlink()
            elif isinstance(decision, _Drop):
                _unlink(decision.item.temp)
                self._finish_incoming(decision.item, decision.item.archive_path)
                if decision.action:
                    self.counters.duplicates += 1
                    self.sink(
                        InstanceDuplicate(
                            sop_instance_uid=decision.item.sop_instance_uid,
                            action=decision.action,
                        )
                    )
            elif isinstance(decision, _Conflict):
                _unlink(decision.item.temp)
                self.counters.duplicates += 1
                self._quarantine(
                    Refused(
                        decision.item.name,
                        decision.reason,
                        decision.detail,
                        decision.item.calling_ae,
                        decision.item.sop_instance_uid,
                    )
                )
                self.sink(
                    InstanceDuplicate(
                        sop_instance_uid=decision.item.sop_instance_uid, action="quarantined"
                    )
                )
        for outcome in outcomes:
            if isinstance(outcome, Refused):
                self._quarantine(outcome)
        if prepared:
            self.journal.unlink(missing_ok=True)
            self._recovering.difference_update(p.name for p in prepared)
        self._emit_archived(places, created)
        self._report_disk_full(bool(created))

    def _postpone(self, outcome: Postponed) -> None:
        """Leave the file in incoming/ and try it again after ``retry_after_seconds``."""
        self.counters.postponed += 1
        self._retry_after[outcome.name] = time.time() + self.retry_after_seconds
        self._next_wait = self.retry_after_seconds
        if outcome.errno in NO_SPACE:
            self._disk_full_in_batch = True  # one alert for the episode: _report_disk_full
        else:
            self.sink(EngineError(where="autoloader", message=outcome.detail))

    def _report_disk_full(self, archived: bool) -> None:
        """Alert once when the archive disk fills up, and say so when archiving resumes.

        A full disk postpones every file of every pass until there is room: one alert per file
        and retry would bury the activity log (and the operator) in identical errors.
        """
        if self._disk_full_in_batch and not self._disk_full:
            self._disk_full = True
            message = (
                f"archive disk full: {self._files_in_incoming()} files wait in incoming/; "
                f"retrying every {self.retry_after_seconds:g} s"
            )
            log.warning("%s", message)
            self.sink(EngineError(where="archive", message=message))
        elif self._disk_full and archived and not self._disk_full_in_batch:
            self._disk_full = False
            message = "the archive disk has room again: archiving resumed"
            log.info("%s", message)
            self.sink(ArchivingResumed(where="archive", message=message))

    def _files_in_incoming(self) -> int:
        return sum(1 for _ in incoming_files(self.paths.incoming))

    def _decide(self, prepared: list[Prepared]) -> list[_Place | _Drop | _Conflict]:
        uids = list({p.sop_instance_uid for p in prepared})
        # The series and study come in the same query: row.series.study needs no query of its own.
        existing = {
            row.sop_instance_uid: row
            for row in db.Instance.select(
                db.Instance, db.Series.series_instance_uid, db.Study.study_instance_uid
            )
            .join(db.Series)
            .join(db.Study)
            .where(db.Instance.sop_instance_uid.in_(uids))
        }
        placed: dict[str, _Place] = {}
        decisions: list[_Place | _Drop | _Conflict] = []
        policy = self.options.duplicate_policy
        for item in prepared:
            uid = item.sop_instance_uid
            earlier = placed.get(uid)
            row = existing.get(uid)
            if earlier is None and row is None:
                placed[uid] = _Place(item)
                decisions.append(placed[uid])
                continue
            conflict = _relational_conflict(item, earlier, row)
            if conflict is not None:
                # One SOP Instance UID in two studies or series: no policy may choose, and
                # overwriting would move an archived instance silently.
                decisions.append(conflict)
                continue
            if earlier is None and row is not None and not self._archived_file_exists(row):
                # The index points at a file that is gone: this copy restores it.
                placed[uid] = _Place(item, replaces=row)
                decisions.append(placed[uid])
                continue
            current_hash = earlier.item.content_hash if earlier else self._hash_of(row)
            identical = current_hash == item.content_hash
            if identical and item.name in self._recovering:
                decisions.append(_Drop(item, None))
            elif policy == "reject":
                decisions.append(
                    _Conflict(
                        item,
                        "duplicate-rejected",
                        "an instance with this SOP Instance UID is already archived "
                        f"({'identical' if identical else 'different'} content); "
                        "duplicate_policy is reject",
                    )
                )
            elif identical:
                decisions.append(_Drop(item, "dropped identical copy"))
            elif policy == "keep-first":
                decisions.append(
                    _Conflict(
                        item,
                        "duplicate-conflict",
                        "an instance with this SOP Instance UID but different content is "
                        "already archived; duplicate_policy is keep-first",
                    )
                )
            else:  # overwrite
                if earlier is not None:
                    decisions[decisions.index(earlier)] = _Drop(earlier.item, "overwritten")
                placed[uid] = _Place(item, replaces=row)
                decisions.append(placed[uid])
        return decisions

    def _archived_file_exists(self, row: db.Instance) -> bool:
        return bool(row.archive_path) and (self.paths.archive / row.archive_path).is_file()

    def _hash_of(self, row: db.Instance | None) -> str:
        if row is None:
            return ""
        if row.content_hash:
            return str(row.content_hash)
        try:
            return file_sha256(self.paths.archive / row.archive_path)
        except OSError:
            return ""

    def _assign_paths(self, places: list[_Place]) -> None:
        """Final paths; two different UIDs never share one (sanitizing can merge values)."""
        used: dict[str, str] = {}
        for place in places:
            item = place.item
            wanted = item.archive_path
            if place.replaces is not None and not item.temp:
                wanted = place.replaces.archive_path
            path = wanted
            if self._path_taken(path, item.sop_instance_uid, used):
                digest = _uid_digest(item.sop_instance_uid)
                pure = PurePosixPath(wanted)
                path = str(pure.with_name(f"{pure.stem}-{digest}{pure.suffix}"))
            used[path] = item.sop_instance_uid
            place.archive_path = path

    def _path_taken(self, path: str, uid: str, used: dict[str, str]) -> bool:
        if path in used:
            return used[path] != uid
        if not (self.paths.archive / path).exists():
            return False
        owner = (
            db.Instance.select(db.Instance.sop_instance_uid)
            .where(db.Instance.archive_path == path)
            .scalar()
        )
        # No owner: a file our own killed run renamed there before its commit; take it over.
        return owner is not None and owner != uid

    def _move_into_archive(self, place: _Place) -> bool:
        """Move the prepared file to its archive path; False when it must wait (see below)."""
        if not place.item.temp:
            return True  # adopting a file that is already in the archive
        try:
            return self._rename_into_archive(place)
        except OSError as exc:
            if exc.errno is None:
                raise
            # A full file system can refuse a new folder or directory entry even when the
            # file's data fitted: nothing is indexed, the file stays in incoming/.
            _unlink(place.item.temp)
            detail = f"cannot move into the archive: {exc.strerror or exc}"
            self._postpone(Postponed(place.item.name, detail, exc.errno))
            return False

    def _sync_archive_folders(self, places: list[_Place]) -> None:
        """fsync the folders the batch's files were linked into, each once."""
        folders = {
            inside(self.paths.archive, PurePosixPath(p.archive_path)).parent
            for p in places
            if p.item.temp  # adopted files were in place already
        }
        for folder in folders:
            sync_folder(folder)

    def _rename_into_archive(self, place: _Place) -> bool:
        target = inside(self.paths.archive, PurePosixPath(place.archive_path))
        folder = target.parent
        if folder not in self._made_folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._made_folders.add(folder)
            if len(self._made_folders) > 10_000:
                self._made_folders.clear()
        if place.replaces is None:
            return self._link_into_archive(place, target)
        try:
            os.replace(place.item.temp, target)
        except FileNotFoundError:
            # The folder was removed under us (a unit deleted in the browser): make it again.
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(place.item.temp, target)
        return True

    def _link_into_archive(self, place: _Place, target: Path) -> bool:
        """A new instance never replaces a file: on a shared archive the file there may be
        another node's, moved in but not yet committed (its row is invisible to us), and
        os.replace would swap its content under its row."""
        temp = Path(place.item.temp)
        try:
            _link_without_replacing(temp, target)
        except FileExistsError:
            try:
                identical = file_sha256(target) == place.item.content_hash
            except OSError:
                identical = False
            if not identical:
                # Try again once the other node's row is committed: _decide then applies the
                # duplicate policy, and nothing here has touched the other node's file.
                temp.unlink(missing_ok=True)
                self._retry_after[place.item.name] = time.time() + 1.0
                self._next_wait = 1.0
                return False
            # The same bytes are there already (another node's copy or our killed run's):
            # index them; a row another node commits first makes ours a duplicate.
        temp.unlink(missing_ok=True)
        return True

    def _index(self, places: list[_Place]) -> dict[str, bool]:
        """Rows for a batch, inside the caller's transaction; returns {uid: record created}."""
        now = datetime.now()
        unit = self.options.record_unit
        keys = {self._record_key(p.item) for p in places}
        records = {r.key: r for r in db.Record.select().where(db.Record.key.in_(list(keys)))}
        new_records = keys - records.keys()
        if new_records:
            # insert_missing: another node on a shared PostgreSQL database may race us.
            db.insert_missing(
                db.Record,
                [
                    {
                        "unit": unit,
                        "key": key,
                        "first_received": now,
                        "last_received": now,
                        "last_modified": now,
                    }
                    for key in sorted(new_records)
                ],
                db.Record.key,
            )
            records.update(
                (r.key, r) for r in db.Record.select().where(db.Record.key.in_(sorted(new_records)))
            )

        patients = self._ensure(
            db.Patient,
            db.Patient.patient_id,
            {p.item.patient["patient_id"]: p for p in places},
            lambda p: dict(p.item.patient),
        )
        studies = self._ensure(
            db.Study,
            db.Study.study_instance_uid,
            {p.item.study["study_instance_uid"]: p for p in places},
            lambda p: dict(
                p.item.study,
                patient=patients[p.item.patient["patient_id"]],
                record=records[self._record_key(p.item)].id if unit != "series" else None,
            ),
        )
        series = self._ensure(
            db.Series,
            db.Series.series_instance_uid,
            {p.item.series["series_instance_uid"]: p for p in places},
            lambda p: dict(
                p.item.series,
                study=studies[p.item.study["study_instance_uid"]],
                record=records[self._record_key(p.item)].id,
            ),
        )
        touched_records = {records[self._record_key(p.item)].id for p in places}
        rows = []
        for place in places:
            item = place.item
            values = {
                "sop_instance_uid": item.sop_instance_uid,
                "series": series[item.series["series_instance_uid"]],
                "record": records[self._record_key(item)].id,
                "sop_class_uid": item.sop_class_uid,
                "instance_number": item.instance_number,
                "transfer_syntax_uid": item.transfer_syntax_uid,
                "number_of_frames": item.number_of_frames,
                "size": item.size,
                "received_at": item.received_at,
                "calling_ae": item.calling_ae[:16],
                "archive_path": place.archive_path,
                "ruleset_version": item.ruleset_version,
                "content_hash": item.content_hash,
            }
            if place.replaces is not None:
                if cast(Any, place.replaces).record_id is not None:
                    touched_records.add(cast(Any, place.replaces).record_id)
                db.Instance.update(values).where(db.Instance.id == place.replaces.id).execute()
            else:
                rows.append(values)
        for start in range(0, len(rows), 200):
            db.Instance.insert_many(rows[start : start + 200]).execute()
        self._batch_studies.update(studies[p.item.study["study_instance_uid"]] for p in places)
        # Counted here too, so that a kill right after this commit leaves the counts right; the
        # recount after the commit (_refresh_aggregates) corrects races between nodes.
        self._update_study_modalities(self._batch_studies)
        self._update_records(touched_records, now)
        created: dict[str, bool] = {}
        first_of: set[str] = set()
        for place in places:
            key = self._record_key(place.item)
            is_first = key in new_records and key not in first_of
            first_of.add(key)
            created[place.item.sop_instance_uid] = is_first
        self._batch_new_records.update(records[k].id for k in new_records)
        self._batch_touched_records.update(touched_records)
        return created

    def _ensure(
        self,
        model: type[db.BaseModel],
        column: pw.Field,
        wanted: dict[str, _Place],
        values: Any,
    ) -> dict[str, int]:
        """Ids of the rows keyed by ``column``, creating the missing ones (first values win)."""
        query = model.select(column, model.id).where(column.in_(list(wanted)))
        found: dict[str, int] = dict(_tuples(query))
        missing = [key for key in wanted if key not in found]
        for start in range(0, len(missing), 200):
            chunk = missing[start : start + 200]
            db.insert_missing(model, [values(wanted[key]) for key in chunk], column)
            query = model.select(column, model.id).where(column.in_(chunk))
            found.update(_tuples(query))
        return found

    def _refresh_aggregates(self) -> None:
        """Study modalities and record counts, recounted after the batch committed.

        Counting in a transaction of its own, after the commit, sees every committed row: when
        two nodes fill one record at once, whichever recounts last is right.
        """
        try:
            with _write_transaction():
                self._update_study_modalities(self._batch_studies)
                self._update_records(self._batch_touched_records, datetime.now())
        except pw.PeeweeException as exc:
            log.warning("cannot refresh record counts (%s)", type(exc).__name__)
            self.sink(EngineError(where="autoloader", message=f"record counts: {exc}"))

    def _update_study_modalities(self, study_ids: set[int]) -> None:
        for study_id in study_ids:
            modalities = sorted(
                {
                    m
                    for (m,) in _tuples(
                        db.Series.select(db.Series.modality)
                        .where(db.Series.study == study_id)
                        .distinct()
                    )
                    if m
                }
            )
            db.Study.update(modalities="\\".join(modalities)[:128]).where(
                db.Study.id == study_id
            ).execute()

    def _update_records(self, record_ids: set[int], now: datetime) -> None:
        for record_id in record_ids:
            instances = db.Instance.select().where(db.Instance.record == record_id).count()
            series_count = (
                db.Instance.select(pw.fn.COUNT(pw.fn.DISTINCT(db.Instance.series)))
                .where(db.Instance.record == record_id)
                .scalar()
            )
            modalities = sorted(
                {
                    m
                    for (m,) in _tuples(
                        db.Series.select(db.Series.modality)
                        .join(db.Instance, on=db.Instance.series == db.Series.id)
                        .where(db.Instance.record == record_id)
                        .distinct()
                    )
                    if m
                }
            )
            db.Record.update(
                instance_count=instances,
                series_count=series_count or 0,
                modalities="\\".join(modalities)[:128],
                last_received=now,
                last_modified=now,
            ).where(db.Record.id == record_id).execute()

    def _index_one_by_one(self, places: list[_Place]) -> dict[str, bool]:
        created: dict[str, bool] = {}
        for place in places:
            name = place.item.name
            try:
                with _write_transaction():
                    created.update(self._index([place]))
                continue
            except (pw.IntegrityError, pw.OperationalError):
                # Most likely another node indexed the same instance a moment ago (or the
                # database was busy): leave the file in incoming/; the next pass sees a
                # duplicate and decides by policy, or simply succeeds.
                attempts = self._index_attempts.get(name, 0) + 1
                self._index_attempts[name] = attempts
                if attempts < 5:
                    self._retry_after[name] = time.time() + attempts
                    self._next_wait = 1.0
                    continue
                detail = "the database refused the instance five times (constraint or lock)"
            except pw.PeeweeException as exc:
                detail = f"the database refused the instance: {type(exc).__name__}: {exc}"
            self._index_attempts.pop(name, None)
            if place.item.temp and place.replaces is None and not self._path_owned(place):
                # Our copy has no row: remove it; the original goes to quarantine.
                (self.paths.archive / place.archive_path).unlink(missing_ok=True)
            if name:
                self._quarantine(
                    Refused(
                        name,
                        "index-failed",
                        detail,
                        place.item.calling_ae,
                        place.item.sop_instance_uid,
                    )
                )
        return created

    def _path_owned(self, place: _Place) -> bool:
        return bool(
            db.Instance.select().where(db.Instance.archive_path == place.archive_path).exists()
        )

    def _record_key(self, item: Prepared) -> str:
        unit = self.options.record_unit
        if unit == "patient":
            return item.patient["patient_id"]
        if unit == "series":
            return str(item.series["series_instance_uid"])
        return item.study["study_instance_uid"]

    def _finish_incoming(self, item: Prepared, archive_path: str) -> None:
        if not item.name:
            return
        source = self.paths.incoming / item.name
        if self.options.keep_originals and archive_path:
            target = inside(self.paths.originals, PurePosixPath(archive_path))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, target)
            except FileNotFoundError:
                pass
            except OSError:
                shutil.move(str(source), str(target))
            return
        source.unlink(missing_ok=True)

    def _quarantine(self, refused: Refused) -> None:
        source = self.paths.incoming / refused.name
        if not source.exists():
            return
        source_ae = refused.calling_ae or ("import" if "--" in source.name else "")
        try:
            quarantine_file(
                self.paths.quarantine,
                source,
                reason=refused.reason,
                detail=refused.detail,
                source_ae=source_ae,
                sop_instance_uid=refused.sop_instance_uid,
                ruleset_version=refused.ruleset_version,
            )
        except OSError as exc:
            self._retry_after[refused.name] = time.time() + self.retry_after_seconds
            self.sink(EngineError(where="quarantine", message=f"cannot quarantine: {exc}"))
            return
        self.counters.quarantined += 1
        # Never the whole name: an imported file's name ends in its original file name, which
        # can be a patient's. The prefix incoming_name() and the SCP generate (time, random hex)
        # still finds the file in quarantine/; any other name (dropped in by hand) is hashed.
        generated = re.match(_GENERATED_PREFIX, refused.name)
        label = generated[0] if generated else hashlib.sha256(refused.name.encode()).hexdigest()
        log.info("quarantined %s: %s", label, refused.reason)
        self.sink(
            InstanceQuarantined(
                file_name=original_name_of(source.name),
                reason=refused.reason,
                detail=refused.detail,
            )
        )

    def _write_journal(self, names: list[str]) -> None:
        temporary = self.journal.with_name(self.journal.name + ".tmp")
        temporary.write_text("\n".join(names), encoding="utf-8")
        os.replace(temporary, self.journal)

    def _emit_archived(self, places: list[_Place], created: dict[str, bool]) -> None:
        if not created:
            return
        new_records = self._batch_new_records
        touched = self._batch_touched_records
        for place in places:
            item = place.item
            if item.sop_instance_uid not in created:
                continue
            self.counters.archived += 1
            self._window_count += 1
            self.sink(
                InstanceArchived(
                    sop_instance_uid=item.sop_instance_uid,
                    sop_class_uid=item.sop_class_uid,
                    modality=str(item.series["modality"]),
                    record_key=self._record_key(item),
                    record_created=created[item.sop_instance_uid],
                    archive_path=place.archive_path,
                    size=item.size,
                    patient_id=item.patient["patient_id"],
                    patient_name=item.patient["patient_name"],
                )
            )
        for record in db.Record.select().where(db.Record.id.in_(list(touched))):
            kind = RecordCreated if record.id in new_records else RecordUpdated
            self.sink(
                kind(
                    unit=record.unit,
                    key=record.key,
                    instance_count=record.instance_count,
                    series_count=record.series_count,
                    modalities=record.modalities,
                )
            )
        elapsed = time.monotonic() - self._window_start
        if elapsed >= THROUGHPUT_INTERVAL:
            self.sink(
                Throughput(
                    instances_per_second=self._window_count / elapsed,
                    archived_total=self.counters.archived,
                )
            )
            self._window_start = time.monotonic()
            self._window_count = 0

    # --- reconciliation -----------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Make the index and the archive folder agree (run by the loop thread, or under lock).

        Rows whose file is gone are removed (and said so); archive files with no row are indexed
        where they are (they are already anonymized output) or, when their UID is indexed
        elsewhere with other content, quarantined as ``orphaned``.
        """
        report = ReconcileReport()
        archive = self.paths.archive
        on_disk: set[str] = set()
        for folder, dirs, files in os.walk(archive):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in files:
                if file.startswith("."):
                    continue
                on_disk.add(
                    os.path.relpath(os.path.join(folder, file), archive).replace(os.sep, "/")
                )
        missing: list[tuple[int, int | None]] = []
        for row_id, path, record_id in _tuples(
            db.Instance.select(db.Instance.id, db.Instance.archive_path, db.Instance.record)
        ):
            if path in on_disk:
                on_disk.discard(path)
            else:
                missing.append((row_id, record_id))
        if missing:
            with _write_transaction():
                ids = [row_id for row_id, _ in missing]
                for start in range(0, len(ids), 500):
                    db.Instance.delete().where(
                        db.Instance.id.in_(ids[start : start + 500])
                    ).execute()
                self._update_records({r for _, r in missing if r is not None}, datetime.now())
            report.missing_files = len(missing)
            report.details.append(
                f"{len(missing)} indexed instances had no file in the archive; their index "
                "rows were removed"
            )
        # A young file without a row may be another node's, renamed a moment before its commit
        # (nodes can share the archive folder); our own crash leftovers were already re-done by
        # the start-up pass over incoming/.
        now = time.time()
        settled = []
        for relative in sorted(on_disk):
            with contextlib.suppress(OSError):
                if now - (archive / relative).stat().st_mtime >= ORPHAN_MIN_AGE_SECONDS:
                    settled.append(relative)
        if settled:
            self._adopt(settled, report)
        report.quarantine_repairs = reconcile_quarantine(self.paths.quarantine)
        if report.quarantine_repairs:
            report.details.append(f"{report.quarantine_repairs} quarantine entries repaired")
        return report

    def _adopt(self, paths: list[str], report: ReconcileReport) -> None:
        for start in range(0, len(paths), self.options.batch_size):
            batch = paths[start : start + self.options.batch_size]
            adopted: list[Prepared] = []
            for relative in batch:
                item = self._read_archived(relative)
                if item is None:
                    self._quarantine_orphan(relative, "the file cannot be read as DICOM")
                    report.orphans_quarantined += 1
                    continue
                adopted.append(item)
            uids = [item.sop_instance_uid for item in adopted]
            indexed = {
                row.sop_instance_uid: row
                for row in db.Instance.select().where(db.Instance.sop_instance_uid.in_(uids))
            }
            places: list[_Place] = []
            seen: dict[str, Prepared] = {}
            for item in adopted:
                uid = item.sop_instance_uid
                other_hash = (
                    seen[uid].content_hash if uid in seen else self._hash_of(indexed.get(uid))
                )
                if uid not in seen and uid not in indexed:
                    seen[uid] = item
                    places.append(_Place(item, archive_path=item.archive_path))
                elif other_hash == item.content_hash:
                    # Another copy of an instance that is indexed with identical content.
                    (self.paths.archive / item.archive_path).unlink(missing_ok=True)
                    report.orphans_removed += 1
                else:
                    self._quarantine_orphan(
                        item.archive_path,
                        "an instance with this SOP Instance UID and other content is indexed",
                    )
                    report.orphans_quarantined += 1
            if places:
                self._batch_new_records.clear()
                self._batch_touched_records.clear()
                self._batch_studies.clear()
                with _write_transaction():
                    self._index(places)
                self._refresh_aggregates()
                report.adopted += len(places)
        if report.adopted:
            report.details.append(
                f"{report.adopted} archive files had no index row; they were indexed in place"
            )
        if report.orphans_quarantined:
            report.details.append(
                f"{report.orphans_quarantined} archive files could not be indexed; "
                "moved to quarantine/orphaned"
            )

    def _read_archived(self, relative: str) -> Prepared | None:
        path = self.paths.archive / relative
        try:
            dataset = dcmread(path, defer_size=DEFER_SIZE)
            if _missing_uids(dataset):
                return None
            stat = path.stat()
            return _prepared(
                dataset,
                name="",
                temp="",
                archive_path=relative,
                size=stat.st_size,
                content_hash=file_sha256(path),
                calling_ae="",
                received_at=datetime.fromtimestamp(stat.st_mtime),
                ruleset_version=None,
            )
        except Exception:
            return None

    def _quarantine_orphan(self, relative: str, detail: str) -> None:
        source = self.paths.archive / relative
        if not source.exists():
            return
        quarantine_file(
            self.paths.quarantine,
            source,
            reason="orphaned",
            detail=f"{detail} (was archive/{relative})",
            source_ae="",
        )


def _link_without_replacing(source: Path, target: Path) -> None:
    """Give ``source`` the name ``target`` too; FileExistsError if ``target`` exists."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)  # the folder was removed under us
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: check-then-rename is the best there is.
        if target.exists():
            raise FileExistsError(str(target)) from None
        os.replace(source, target)


def _default_processes(anonymizer: Anonymizer) -> int:
    cpus = os.cpu_count() or 1
    if cpus < 2:
        return 0
    try:
        pickle.dumps(anonymizer)
    except Exception:
        return 0  # the anonymizer cannot travel to a worker process: work in the loop thread
    return min(4, cpus - 1)


def _write_transaction() -> Any:
    """A transaction that takes SQLite's write lock at BEGIN.

    A deferred transaction that reads first and then writes fails at once with "database is
    locked" (SQLITE_BUSY_SNAPSHOT, no busy wait) when another connection (the SCP's association
    log) committed in between; BEGIN IMMEDIATE waits for the lock instead.
    """
    target = db.database.obj if isinstance(db.database, pw.DatabaseProxy) else db.database
    if isinstance(target, pw.SqliteDatabase):
        return target.atomic("IMMEDIATE")
    return db.database.atomic()


def _tuples(query: Any) -> list[tuple[Any, ...]]:
    """A query's rows as plain tuples (peewee has no type information)."""
    return list(query.tuples())


def _uid_digest(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _unlink(path: str) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


# --- import: files, folders and DICOMDIR media into incoming/ ---------------------------------

#: (files done, files in total) after each file.
ProgressCallback = Callable[[int, int], None]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class ImportSummary:
    """What ``webaims-tui import`` did: counts, and the paths it skipped or failed on."""

    imported: int = 0
    skipped: list[str] = field(default_factory=list)  # not DICOM
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    dicomdirs: int = 0


def import_into_incoming(
    paths: Sequence[Path],
    incoming: Path,
    spool: Path,
    progress: ProgressCallback | None = None,
) -> ImportSummary:
    """Copy DICOM files from ``paths`` (files, folders, DICOMDIR files) into ``incoming/``.

    Each file is copied to ``spool/`` and renamed into incoming/, so the autoloader never sees a
    half-copied file. The source is never modified. A DICOMDIR named directly brings in the
    files it references; inside a folder it is skipped (the walk finds the same files).
    """
    summary = ImportSummary()
    candidates = _import_candidates(paths, summary)
    spool.mkdir(parents=True, exist_ok=True)
    for done, path in enumerate(candidates, start=1):
        kind = _dicom_kind(path)
        if kind == "dicomdir":
            summary.dicomdirs += 1
        elif kind == "other":
            summary.skipped.append(str(path))
        else:
            name = incoming_name(path.name)
            temporary = spool / (name + ".part")
            try:
                shutil.copyfile(path, temporary)
                os.replace(temporary, incoming / name)
                summary.imported += 1
            except OSError as exc:
                temporary.unlink(missing_ok=True)
                summary.failed.append((str(path), exc.strerror or str(exc)))
        if progress is not None:
            progress(done, len(candidates))
    return summary


def _import_candidates(paths: Sequence[Path], summary: ImportSummary) -> list[Path]:
    seen: set[Path] = set()
    found: list[Path] = []

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            found.append(path)

    for given in paths:
        if given.is_dir():
            for folder, dirs, files in os.walk(given):
                dirs.sort()
                for file in sorted(files):
                    add(Path(folder) / file)
        elif given.is_file():
            if _dicom_kind(given) == "dicomdir":
                summary.dicomdirs += 1
                for referenced in _dicomdir_files(given, summary):
                    add(referenced)
            else:
                add(given)
        else:
            summary.failed.append((str(given), "no such file or folder"))
    return found


def _dicom_kind(path: Path) -> str:
    """ "dicom", "dicomdir" or "other", from the Part 10 header only."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return "other"
    if len(head) < 132 or head[128:132] != b"DICM":
        return "other"
    try:
        meta = read_file_meta_info(path)
    except Exception:
        return "dicom"  # a damaged header: let the autoloader quarantine it with a reason
    if str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
        return "dicomdir"
    return "dicom"


def _dicomdir_files(dicomdir: Path, summary: ImportSummary) -> list[Path]:
    """The files a DICOMDIR references, resolved case-insensitively (CD file systems)."""
    try:
        index = dcmread(dicomdir)
    except Exception as exc:
        summary.failed.append((str(dicomdir), f"cannot read the DICOMDIR: {_short(exc)}"))
        return []
    root = dicomdir.parent
    files: list[Path] = []
    for record in index.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
        if any(part in ("", ".", "..") or "/" in part for part in parts):
            summary.failed.append((str(dicomdir), f"unsafe referenced file {parts!r}"))
            continue
        path = _find_case_insensitive(root, parts)
        if path is None:
            summary.failed.append((str(root.joinpath(*parts)), "referenced but not found"))
        else:
            files.append(path)
    return files


def _find_case_insensitive(root: Path, parts: list[str]) -> Path | None:
    current = root
    for part in parts:
        exact = current / part
        if exact.exists():
            current = exact
            continue
        try:
            matches = [c for c in current.iterdir() if c.name.lower() == part.lower()]
        except OSError:
            return None
        if not matches:
            return None
        current = matches[0]
    return current if current.is_file() else None
