"""The archive folder: path templates with sanitized components, and anonymized file writing.

Archive paths are built from *anonymized* attribute values, which may still be hostile (a crafted
UID ``../../etc``, a Patient ID with ``/`` or NUL). Every path component is therefore reduced to a
safe character set, never ``.``/``..``/empty, never hidden, and hashed when over-long, so that no
value can choose a location outside the archive folder.

Files are written without decoding or even loading their pixel data: the autoloader reads with
``defer_size``, so big values (pixel data) stay on disk as deferred elements; when the anonymizer
left such an element untouched, :func:`write_part10` copies its bytes straight from the source
file instead of reading them into memory and re-encoding them.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

#: Elements whose value is longer than this stay on disk when read (pixel data, big blobs).
DEFER_SIZE = 64 * 1024

#: Hidden folder inside the archive for files being written; same file system as the archive,
#: so the final rename is atomic.
TEMP_FOLDER = ".tmp"

MAX_COMPONENT_LENGTH = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_COPY_CHUNK = 1024 * 1024


class PathTemplateError(ValueError):
    """The path template names something that is not a DICOM keyword."""


def template_keywords(template: str) -> list[str]:
    """The DICOM keywords a template uses; raises PathTemplateError for anything else."""
    keywords: list[str] = []
    for _literal, field, _spec, _conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field or tag_for_keyword(field) is None:
            raise PathTemplateError(f"{{{field}}} is not a DICOM attribute keyword")
        keywords.append(field)
    return keywords


def sanitize_component(value: str) -> str:
    """One safe path component for ``value``: the same input always gives the same output.

    Characters outside ``A-Z a-z 0-9 . _ + = -`` become ``_`` (that covers ``/``, ``\\``, NUL and
    control characters); a component that would be empty, dot-only or hidden gets a ``_`` in
    front; one longer than MAX_COMPONENT_LENGTH is cut and suffixed with a hash of the whole value
    so that two long values never collide.
    """
    cleaned = _UNSAFE.sub("_", value)
    if not cleaned.strip("."):
        cleaned = "_" + cleaned
    elif cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if len(cleaned) > MAX_COMPONENT_LENGTH:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        cleaned = cleaned[: MAX_COMPONENT_LENGTH - 17] + "-" + digest
    return cleaned


def _attribute_text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def archive_path_for(dataset: Dataset, template: str) -> PurePosixPath:
    """The archive-relative path of ``dataset`` under ``template`` (components sanitized)."""
    values: Mapping[str, str] = {
        keyword: _attribute_text(dataset, keyword) for keyword in template_keywords(template)
    }
    components: list[str] = []
    for part in template.replace("\\", "/").split("/"):
        if not part:
            continue  # a leading or doubled slash must not make the path absolute
        text = "".join(
            literal + (values[field] if field else "")
            for literal, field, _spec, _conversion in string.Formatter().parse(part)
        )
        components.append(sanitize_component(text))
    if not components:
        components = [sanitize_component(str(dataset.get("SOPInstanceUID", "")))]
    return PurePosixPath(*components)


def inside(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative``, refusing anything that would resolve outside ``root``."""
    if relative.is_absolute() or any(part in ("", ".", "..") for part in relative.parts):
        raise ValueError(f"unsafe archive path {str(relative)!r}")
    return root.joinpath(*relative.parts)


def deferred_elements(dataset: Dataset) -> dict[int, RawDataElement]:
    """The top-level elements of a freshly read dataset whose value is still on disk."""
    found: dict[int, RawDataElement] = {}
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag, keep_deferred=True)
        # Undefined-length values (encapsulated pixel data) cannot be copied by length: pydicom
        # reads those itself when writing.
        if (
            isinstance(element, RawDataElement)
            and element.value is None
            and 0 < element.length < 0xFFFFFFFF
        ):
            found[int(tag)] = element
    return found


def write_part10(
    dataset: Dataset,
    destination: Path,
    source: Path,
    deferred: Mapping[int, RawDataElement],
) -> str:
    """Write ``dataset`` as a Part 10 file; return the file's SHA-256 (hex).

    ``deferred`` is what :func:`deferred_elements` returned right after reading ``source``; an
    element still present in the dataset as that very object was not touched by the anonymizer,
    so its bytes are copied from the source file unchanged, and so is every other element the
    anonymizer did not even look at (still raw). Anything else (a changed transfer syntax or
    character set, a deflated syntax) falls back to pydicom's full writer.
    """
    meta = dataset.file_meta
    syntax = UID(meta.TransferSyntaxUID)
    original = dataset.original_encoding
    streamable = (
        bool(deferred)
        and not syntax.is_deflated
        and original == (syntax.is_implicit_VR, syntax.is_little_endian)
        and dataset.original_character_set == dataset._character_set
    )
    if not streamable:
        dataset.save_as(destination, enforce_file_format=True)
        return file_sha256(destination)
    encoding = dataset.get("SpecificCharacterSet", "iso8859")
    implicit, endian = syntax.is_implicit_VR, "<" if syntax.is_little_endian else ">"
    digest = hashlib.sha256()
    with open(destination, "xb") as handle, open(source, "rb") as source_handle:
        # The file is hashed as it is written: reading it back would cost as much again.
        def emit(data: bytes) -> None:
            digest.update(data)
            handle.write(data)

        emit(b"\x00" * 128 + b"DICM" + _file_meta_bytes(meta))
        out = _buffer(syntax)
        for tag in sorted(dataset.keys()):
            if tag.element == 0 and tag.group > 6:
                continue  # retired group lengths: pydicom's writer drops them too
            element = dataset.get_item(tag, keep_deferred=True)
            if deferred.get(int(tag)) is element:
                assert isinstance(element, RawDataElement)
                emit(out.getvalue() + _element_header(element, implicit, endian))
                out = _buffer(syntax)
                for chunk in _chunks(source_handle, element.value_tell, element.length):
                    emit(chunk)
            elif _copyable(element, implicit):
                assert isinstance(element, RawDataElement)
                out.write(_element_header(element, implicit, endian))
                out.write(cast(bytes, element.value))
            else:
                out.write(_encoded(dataset[tag], syntax, encoding))
        emit(out.getvalue())
    return digest.hexdigest()


def _buffer(syntax: UID) -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax.is_implicit_VR
    buffer.is_little_endian = syntax.is_little_endian
    return buffer


def _copyable(element: Any, implicit: bool) -> bool:
    """An element read but never converted: its bytes can go out exactly as they came in."""
    return (
        isinstance(element, RawDataElement)
        and isinstance(element.value, bytes)
        and element.length == len(element.value)
        and element.length != 0xFFFFFFFF
        # Explicit VR needs a two-letter VR, and a 16-bit length for the short-length VRs.
        and (
            implicit
            or (
                isinstance(element.VR, str)
                and len(element.VR) == 2
                and element.VR.isascii()
                and (element.VR in EXPLICIT_VR_LENGTH_32 or element.length <= 0xFFFF)
            )
        )
    )


#: Encoded elements by value: the anonymizer writes the same replacement values (a dummy date,
#: the de-identification method and its code sequence...) into every file, and pydicom's
#: element writer is the slowest step of writing a header.
_ENCODED: dict[tuple[Any, ...], bytes] = {}
_ENCODED_LIMIT = 4096
_MAX_CACHED_VALUE = 1024
_META_SYNTAX = UID("1.2.840.10008.1.2.1")


def _encoded(element: DataElement, syntax: UID, encoding: Any) -> bytes:
    """``element`` as written by pydicom in ``syntax``, from the cache when seen before."""
    value_key = _value_key(element.value)
    key = (
        element.tag,
        element.VR,
        syntax,
        tuple(encoding) if isinstance(encoding, list | MultiValue) else encoding,
        value_key,
    )
    if value_key is not None and key in _ENCODED:
        return _ENCODED[key]
    buffer = _buffer(syntax)
    write_data_element(buffer, element, encoding)
    data = buffer.getvalue()
    if value_key is not None and len(data) <= _MAX_CACHED_VALUE:
        if len(_ENCODED) >= _ENCODED_LIMIT:
            _ENCODED.clear()
        _ENCODED[key] = data
    return data


def _value_key(value: Any) -> tuple[Any, ...] | None:
    """A hashable stand-in that determines how ``value`` is encoded, or None (not cached).

    The type is part of the key, and numbers are keyed by their text: pydicom keeps the
    original string of a DS or IS ("1.50" and 1.5 encode differently).
    """
    if value is None or isinstance(value, str | bytes):
        return (type(value), value)
    if isinstance(value, int | float):
        return (type(value), str(value), value)
    if isinstance(value, MultiValue | list | tuple):
        items = tuple(_value_key(item) for item in value)
        return None if None in items else (type(value), items)
    if isinstance(value, Sequence):
        keys: list[Any] = []
        for item in value:
            for element in item:  # a Dataset iterates over its (converted) elements
                inner = _value_key(element.value)
                if inner is None:
                    return None
                keys.append((element.tag, element.VR, inner))
            keys.append(None)  # item boundary
        return (Sequence, tuple(keys))
    return None  # person names and anything else: their encoding has more state


def _file_meta_bytes(meta: Dataset) -> bytes:
    """Group 2 in explicit VR little endian, its group length computed here.

    pydicom's ``write_file_meta_info`` does the same but re-validates and encodes the whole
    group twice; this is a third of the time of a small file's header.
    """
    body = DicomBytesIO()
    body.is_implicit_VR = False
    body.is_little_endian = True
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\x00\x01"
    for tag in sorted(meta.keys()):
        if tag != 0x00020000:
            body.write(_encoded(meta[tag], _META_SYNTAX, "iso8859"))
    value = body.getvalue()
    return struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(value)) + value


def _element_header(element: RawDataElement, implicit: bool, endian: str) -> bytes:
    tag = int(element.tag)
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(f"{endian}HHL", group, number, element.length)
    vr = str(cast(Any, element).VR)
    if vr in EXPLICIT_VR_LENGTH_32:
        return struct.pack(f"{endian}HH2sHL", group, number, vr.encode(), 0, element.length)
    return struct.pack(f"{endian}HH2sH", group, number, vr.encode(), element.length)


def _chunks(source: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    # pread leaves the source position alone.
    src_fd = source.fileno()
    remaining = length
    position = offset
    while remaining:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, remaining), position)
        if not chunk:
            raise EOFError(f"source ended {remaining} bytes before the end of a value")
        yield chunk
        position += len(chunk)
        remaining -= len(chunk)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (archived files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sync_file(path: Path) -> None:
    """fsync a file written and closed earlier: its data reaches the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_folder(folder: Path) -> None:
    """fsync a folder: the entries just renamed or linked into it reach the disk."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
