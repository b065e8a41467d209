"""Checks a received C-STORE data set must pass before it is written to incoming/.

They run in the association thread, so they stay cheap: the size is known, and the two UIDs are
read from the first bytes of the encoded data set (group 0008 comes before anything large), never
decoding pixel data. Shared by the Storage SCP and any C-GET receiver.
"""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

STATUS_DATA_SET_MISMATCH = 0xA900  # Error: data set does not match SOP class (PS3.4 B.2.3)
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand

#: Bytes of the data set examined for the UIDs. Only group 0008 elements up to (0008,0018)
#: precede them; a legitimate data set never has a megabyte there.
HEADER_PREFIX = 1024 * 1024

_SOP_INSTANCE_UID = 0x00080018


def data_set_uids(data: bytes | memoryview, transfer_syntax: str) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of an encoded data set; "" for a missing one.

    Raises ValueError when the start of the data set cannot be parsed.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        # Inflate only as much as the prefix needs: a deflate bomb stays a megabyte.
        prefix = zlib.decompressobj(-zlib.MAX_WBITS).decompress(
            bytes(data[:HEADER_PREFIX]), HEADER_PREFIX
        )
    else:
        prefix = bytes(data[:HEADER_PREFIX])

    def past_instance_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag > _SOP_INSTANCE_UID

    try:
        header = read_dataset(
            BytesIO(prefix),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            stop_when=past_instance_uid,
        )
        values = [header.get(keyword) for keyword in ("SOPClassUID", "SOPInstanceUID")]
    except Exception as exc:  # pydicom raises many types on garbage; all mean "undecodable"
        raise ValueError(f"the data set header cannot be parsed ({type(exc).__name__})") from None
    uids: list[str] = []
    for value in values:
        if value is not None and not isinstance(value, str):
            raise ValueError("a SOP UID is not a single string")
        uids.append(str(value or "").strip("\x00 "))
    return uids[0], uids[1]


def store_problem(
    data: bytes | memoryview | None,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    max_instance_bytes: int,
) -> tuple[int, str] | None:
    """Why a received data set must not be stored, as (status, reason), or None if it may."""
    if data is None:
        return STATUS_CANNOT_UNDERSTAND, "the C-STORE request carries no data set"
    if len(data) > max_instance_bytes:
        # out of resources: larger than the per-instance limit (the transport kept only the first
        # max_instance_bytes + 1 bytes of it, see transport.GuardedAssociationSocket)
        limit_mb = max_instance_bytes // (1024 * 1024)
        return STATUS_OUT_OF_RESOURCES, f"the instance is larger than the {limit_mb} MB limit"
    if not sop_class or not sop_instance:
        return STATUS_CANNOT_UNDERSTAND, "the C-STORE request has no SOP class or instance UID"
    try:
        found_class, found_instance = data_set_uids(data, transfer_syntax)
    except ValueError as exc:
        return STATUS_CANNOT_UNDERSTAND, str(exc)
    if not found_class or not found_instance:
        missing = "SOP Class UID" if not found_class else "SOP Instance UID"
        return STATUS_CANNOT_UNDERSTAND, f"the data set has no {missing}"
    if found_class != sop_class.strip("\x00 "):
        return STATUS_DATA_SET_MISMATCH, "the data set's SOP Class UID differs from the request's"
    if found_instance != sop_instance.strip("\x00 "):
        return (
            STATUS_DATA_SET_MISMATCH,
            "the data set's SOP Instance UID differs from the request's",
        )
    return None
