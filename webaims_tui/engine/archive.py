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
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element, write_file_meta_info
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
) -> None:
    """Write ``dataset`` as a Part 10 file, copying untouched deferred values from ``source``.

    ``deferred`` is what :func:`deferred_elements` returned right after reading ``source``; an
    element still present in the dataset as that very object was not touched by the anonymizer,
    so its bytes are copied from the source file unchanged. Anything else (a changed transfer
    syntax or character set, a deflated syntax) falls back to pydicom's full writer.
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
        return
    encoding = dataset.get("SpecificCharacterSet", "iso8859")
    endian = "<" if syntax.is_little_endian else ">"
    with open(destination, "xb") as handle, open(source, "rb") as source_handle:
        out = DicomFileLike(handle)
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        out.is_implicit_VR = syntax.is_implicit_VR
        out.is_little_endian = syntax.is_little_endian
        for tag in sorted(dataset.keys()):
            if tag.element == 0 and tag.group > 6:
                continue  # retired group lengths: pydicom's writer drops them too
            element = dataset.get_item(tag, keep_deferred=True)
            if deferred.get(int(tag)) is element:
                assert isinstance(element, RawDataElement)
                handle.write(_element_header(element, syntax.is_implicit_VR, endian))
                _copy_range(source_handle, handle, element.value_tell, element.length)
            else:
                write_data_element(out, dataset.get_item(tag), encoding)


def _element_header(element: RawDataElement, implicit: bool, endian: str) -> bytes:
    tag = int(element.tag)
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(f"{endian}HHL", group, number, element.length)
    vr = str(cast(Any, element).VR)
    if vr in EXPLICIT_VR_LENGTH_32:
        return struct.pack(f"{endian}HH2sHL", group, number, vr.encode(), 0, element.length)
    return struct.pack(f"{endian}HH2sH", group, number, vr.encode(), element.length)


def _copy_range(source: BinaryIO, destination: BinaryIO, offset: int, length: int) -> None:
    # pread leaves the source position alone; writes go through the buffered destination so
    # that its idea of the position stays right.
    src_fd = source.fileno()
    remaining = length
    position = offset
    while remaining:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, remaining), position)
        if not chunk:
            raise EOFError(f"source ended {remaining} bytes before the end of a value")
        destination.write(chunk)
        position += len(chunk)
        remaining -= len(chunk)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (archived files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
