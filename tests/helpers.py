"""Helpers for tests: the pydicom storage corpus, an event recorder, a pynetdicom SCU."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pydicom.data
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode

from webaims_tui.engine.events import EngineEvent
from webaims_tui.engine.scp import storage_sop_classes
from webaims_tui.engine.service import Engine

E = TypeVar("E", bound=EngineEvent)


def storage_corpus(*, encodable: bool = True) -> list[Path]:
    """pydicom's bundled test files that are storage objects with the UIDs a store needs.

    Files are excluded only for reasons a real sender would share: not Part 10, no SOP class
    or instance UID, a SOP class that is not a storage class, a transfer syntax no sender
    could negotiate, or (with ``encodable``) a data set pydicom cannot re-encode, which a
    pynetdicom SCU therefore cannot send.
    """
    storage_uids = set(storage_sop_classes().values())
    chosen: list[Path] = []
    seen: set[str] = set()
    # Only the files installed with pydicom: get_testdata_files() would try to download more.
    root = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError):
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", ""))
        sop_instance = str(ds.get("SOPInstanceUID", ""))
        syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta else ""
        if not (sop_class in storage_uids and sop_instance and syntax):
            continue
        if not UID(syntax).is_transfer_syntax or sop_instance in seen:
            continue
        if encodable and not _encodes(path, UID(syntax)):
            continue
        seen.add(sop_instance)
        chosen.append(path)
    return chosen


def _encodes(path: Path, syntax: UID) -> bool:
    try:
        encoded = encode(
            dcmread(path), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
        )
    except Exception:
        return False
    return encoded is not None


class EventRecorder:
    """A thread-safe engine sink that keeps every event, with a wait helper."""

    def __init__(self) -> None:
        self._events: list[EngineEvent] = []
        self._condition = threading.Condition()

    def __call__(self, event: EngineEvent) -> None:
        with self._condition:
            self._events.append(event)
            self._condition.notify_all()

    def of(self, kind: type[E]) -> list[E]:
        with self._condition:
            return [e for e in self._events if isinstance(e, kind)]

    def wait_for(
        self,
        kind: type[E],
        count: int = 1,
        timeout: float = 30.0,
        where: Callable[[E], bool] | None = None,
    ) -> list[E]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                found = [
                    e for e in self._events if isinstance(e, kind) and (where is None or where(e))
                ]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"waited {timeout}s for {count} {kind.__name__}, got {len(found)}"
                    )
                self._condition.wait(remaining)


def scu(calling_ae: str = "TESTSCU") -> AE:
    """A pynetdicom SCU with short timeouts: a test fails in seconds, not minutes."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def scp_port(engine: Engine) -> int:
    """The port the engine's Storage SCP listens on (it must be listening)."""
    assert engine.server is not None and engine.server.listening
    return engine.server.port


def store_interrupted(engine: Engine, interrupt: Callable[[socket.socket], None]) -> None:
    """Send CT_small to the engine's SCP and call ``interrupt`` on the sender's socket between
    two P-DATA PDUs of the data set (the engine's ``max_pdu_size`` must split it, e.g. 4096).

    The sender's own association dies of it; that is the point, so its error is swallowed.
    """
    dataset = dcmread(str(pydicom.data.get_testdata_file("CT_small.dcm")))
    sent_pdus: list[evt.Event] = []

    def after_a_few(event: evt.Event) -> None:
        sent_pdus.append(event)
        if len(sent_pdus) == 8:
            interrupt(event.assoc.dul.socket.socket)

    ae = scu()
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(
        "127.0.0.1",
        scp_port(engine),
        ae_title="WEBAIMS",
        evt_handlers=[(evt.EVT_PDU_SENT, after_a_few)],
    )
    assert assoc.is_established
    with contextlib.suppress(Exception):
        assoc.send_c_store(dataset)
