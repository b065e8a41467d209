"""Query/Retrieve failures a technician must be able to read, against a scripted remote PACS.

Orthanc cannot be made to answer these cases, so the remote PACS is a pynetdicom SCP on a free
loopback port whose handlers yield exactly the statuses a test needs: a partial C-MOVE (0xB000
with a Failed SOP Instance UID List), a C-ECHO that fails before a retrieve, a C-MOVE that stops
answering, an association rejected with "no reason given", and a PACS that lists more instances
than it delivers. The engine under test is the real one, called by node name as the UI does.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from tests.helpers import EventRecorder, scp_port
from tests.interop.conftest import UID_PREFIX, GeneratedSeries, GeneratedStudy, make_instance
from webaims_tui.engine import db
from webaims_tui.engine.events import (
    EchoFinished,
    RetrieveFinished,
    RetrieveProgress,
    RetrieveStarted,
)
from webaims_tui.engine.qr import QRFailure, RetrieveTarget
from webaims_tui.engine.service import Engine

pytestmark = pytest.mark.interop

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
C_MOVE_RSP = 0x8021
PENDING = (0xFF00, 0xFF01)

Handler = Callable[[Any], Any]


# --- the scripted PACS ------------------------------------------------------------------------


@dataclass
class FakePacs:
    """A running pynetdicom SCP and what reached it."""

    port: int
    #: The abstract syntaxes each association request proposed, in arrival order.
    proposed: list[set[str]] = field(default_factory=list)
    #: The C-MOVE requests its handler saw: (move destination, identifier).
    moves: list[tuple[str, Dataset]] = field(default_factory=list)
    #: The final C-MOVE responses it sent: (status, completed, failed, warning).
    final_move_responses: list[tuple[int, int, int, int]] = field(default_factory=list)


class PacsLauncher:
    """Starts scripted SCPs on 127.0.0.1 port 0; ``stop()`` releases hung handlers first."""

    def __init__(self) -> None:
        self.servers: list[ThreadedAssociationServer] = []
        #: Set in teardown: a handler that plays "never answers" waits on it.
        self.released = threading.Event()

    def start(
        self,
        *,
        contexts: Sequence[str] = (VERIFICATION, STUDY_ROOT_FIND, STUDY_ROOT_MOVE),
        on_move: Handler | None = None,
        on_find: Handler | None = None,
        echo_status: int = 0x0000,
        reject: tuple[int, int, int] | None = None,
    ) -> FakePacs:
        """A PACS answering ``contexts``; ``reject`` = (result, source, diagnostic) for all."""
        ae = AE(ae_title="PACS")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for uid in contexts:
            ae.add_supported_context(uid)
        # The C-MOVE storage sub-operations go out on an association of its own.
        ae.add_requested_context(CTImageStorage)
        pacs = FakePacs(port=0)

        def on_requested(event: Any) -> None:
            requested = event.assoc.requestor.requested_contexts
            pacs.proposed.append({str(cx.abstract_syntax) for cx in requested})
            if reject is not None:
                # pynetdicom lets an EVT_REQUESTED handler reject; kill() as its own ACSE does.
                event.assoc.acse.send_reject(*reject)
                event.assoc.kill()

        def on_echo(event: Any) -> int:
            return echo_status

        def on_sent(event: Any) -> None:
            command = event.message.command_set
            if command.CommandField == C_MOVE_RSP and command.Status not in PENDING:
                pacs.final_move_responses.append(
                    (
                        int(command.Status),
                        int(command.get("NumberOfCompletedSuboperations", 0) or 0),
                        int(command.get("NumberOfFailedSuboperations", 0) or 0),
                        int(command.get("NumberOfWarningSuboperations", 0) or 0),
                    )
                )

        def recorded_move(event: Any) -> Iterator[Any]:
            pacs.moves.append((str(event.move_destination), event.identifier))
            assert on_move is not None
            yield from on_move(event)

        handlers: list[Any] = [
            (evt.EVT_REQUESTED, on_requested),
            (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_DIMSE_SENT, on_sent),
        ]
        if on_move is not None:
            handlers.append((evt.EVT_C_MOVE, recorded_move))
        if on_find is not None:
            handlers.append((evt.EVT_C_FIND, on_find))
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None  # non-blocking: the running server
        self.servers.append(server)
        pacs.port = int(server.server_address[1])
        return pacs

    def start_storage(self, statuses: dict[str, int]) -> tuple[int, list[str]]:
        """A third-party Storage SCP answering ``statuses`` by SOP Instance UID (else success).

        Returns its port and the SOP Instance UIDs it was sent.
        """
        received: list[str] = []

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            received.append(uid)
            return statuses.get(uid, 0x0000)

        ae = AE(ae_title="OTHER")
        ae.add_supported_context(CTImageStorage)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        assert server is not None
        self.servers.append(server)
        return int(server.server_address[1]), received

    def stop(self) -> None:
        self.released.set()
        for server in self.servers:
            server.shutdown()


@pytest.fixture
def pacs_launcher(engine: Engine) -> Iterator[PacsLauncher]:
    """Scripted PACSs, stopped before the engine (they may hold an association to its SCP)."""
    launcher = PacsLauncher()
    yield launcher
    launcher.stop()


def _add_node(engine: Engine, pacs: FakePacs, **values: Any) -> str:
    """Store the PACS as node ``pacs`` (short timeouts unless ``values`` say otherwise)."""
    settings: dict[str, Any] = {
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": pacs.port,
        "acse_timeout": 5.0,
        "dimse_timeout": 10.0,
        "network_timeout": 10.0,
        **values,
    }
    engine.add_node("pacs", **settings)
    return "pacs"


# --- the study the PACS holds -------------------------------------------------------------------


def _study(name: str, count: int) -> GeneratedStudy:
    """A one-series CT study with ``count`` instances, UIDs derived from ``name``."""
    series = GeneratedSeries(
        uid=generate_uid(UID_PREFIX, [f"failures-{name}-series"]),
        modality="CT",
        instances=tuple(generate_uid(UID_PREFIX, [f"failures-{name}-{i}"]) for i in range(count)),
    )
    return GeneratedStudy(
        patient_id="QRF001",
        patient_name="FAIL^PATH",
        birth_date="19700101",
        uid=generate_uid(UID_PREFIX, [f"failures-{name}-study"]),
        date="20240301",
        accession="ACCF01",
        description="FAILURE PATHS",
        series=(series,),
    )


def _images(study: GeneratedStudy) -> list[Dataset]:
    series = study.series[0]
    return [
        dcmread(io.BytesIO(make_instance(study, series, number, uid)))
        for number, uid in enumerate(series.instances, start=1)
    ]


def _image_rows(study: GeneratedStudy) -> Handler:
    """A C-FIND handler listing every instance of ``study`` at IMAGE level."""

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        series = study.series[0]
        for number, uid in enumerate(series.instances, start=1):
            row = Dataset()
            row.QueryRetrieveLevel = "IMAGE"
            row.PatientID = study.patient_id
            row.StudyInstanceUID = study.uid
            row.SeriesInstanceUID = series.uid
            row.SOPInstanceUID = uid
            row.SOPClassUID = CTImageStorage
            row.InstanceNumber = number
            yield 0xFF00, row
        yield 0x0000, None

    return on_find


def _failed_list(uids: Sequence[str]) -> Dataset:
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = list(uids)
    return identifier


# --- 1. a partial C-MOVE: 0xB000 with a Failed SOP Instance UID List -----------------------------


def test_partial_move_lists_the_failed_instances_and_the_counts(
    engine: Engine, pacs_launcher: PacsLauncher, events: EventRecorder
) -> None:
    study = _study("partial", 5)
    images, uids = _images(study), list(study.instances)
    # The destination stores the first, accepts the second with a warning (coercion), refuses
    # the third (out of resources); the PACS then gives up on the last two.
    other_port, stored = pacs_launcher.start_storage({uids[1]: 0xB007, uids[2]: 0xA700})

    def on_move(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", other_port
        yield len(images)
        for image in images[:3]:
            yield 0xFF00, image
        yield 0xB000, _failed_list(uids[2:])  # warning: some sub-operations failed

    pacs = pacs_launcher.start(on_move=on_move)
    node = _add_node(engine, pacs)
    summary = engine.retrieve(
        node, [RetrieveTarget(study_instance_uid=study.uid)], destination="OTHER"
    )

    assert stored == uids[:3]
    # What the PACS said on the wire, and what the summary says: 1 completed, 3 failed, 1 warning.
    assert pacs.final_move_responses == [(0xB000, 1, 3, 1)]
    assert (summary.status, summary.completed, summary.failed, summary.warning) == (
        0xB000,
        1,
        3,
        1,
    )
    assert summary.failed_sop_instance_uids == tuple(uids[2:])
    assert not summary.ok
    assert summary.message == (
        "0xB000 (warning: sub-operations completed with one or more failures or warnings): "
        f"1 completed, 3 failed, 1 with warnings; failed: {uids[2]}, {uids[3]}, {uids[4]}"
    )
    # The pending responses were reported as progress, counting down.
    progress = events.of(RetrieveProgress)
    assert [(p.remaining, p.completed, p.failed, p.warning) for p in progress] == [
        (4, 1, 0, 0),
        (3, 1, 0, 1),
        (2, 1, 1, 1),
    ]
    finished = events.of(RetrieveFinished)[-1]
    assert not finished.ok and (finished.completed, finished.failed, finished.warning) == (1, 3, 1)
    assert finished.failed_sop_instance_uids == tuple(uids[2:])
    assert finished.message == summary.message


# --- 2. a failed automatic C-ECHO stops a retrieve before any C-MOVE association ---------------

#: case -> (PacsLauncher.start options, the failure kind, how the message begins)
_ECHO_FAILURES: dict[str, tuple[dict[str, Any], str, str]] = {
    # Accepts associations, but not the Verification context.
    "no-verification-context": (
        {"contexts": (STUDY_ROOT_MOVE,)},
        "context-not-accepted",
        "C-ECHO failed, nothing was sent: pacs accepted the association but not the service "
        f"Verification (C-ECHO) ({VERIFICATION}): enable it on the PACS for our AE title "
        "'WEBAIMS'",
    ),
    # Answers the C-ECHO with a refusal.
    "echo-not-authorised": (
        {"echo_status": 0x0124},
        "failed",
        "C-ECHO failed, nothing was sent: pacs answered C-ECHO with status 0x0124 "
        "(refused: not authorised)",
    ),
    # Rejects our calling AE title.
    "association-rejected": (
        {"reject": (1, 1, 3)},
        "rejected",
        "C-ECHO failed, nothing was sent: pacs rejected the association permanently: calling AE "
        "title not recognised. What to do: the PACS does not know our AE title 'WEBAIMS'",
    ),
}


@pytest.mark.parametrize("case", list(_ECHO_FAILURES))
def test_failed_echo_stops_a_retrieve_before_any_move_association(
    engine: Engine, pacs_launcher: PacsLauncher, events: EventRecorder, case: str
) -> None:
    options, kind, explanation = _ECHO_FAILURES[case]
    moved: list[str] = []

    def on_move(event: Any) -> Iterator[Any]:
        moved.append(str(event.move_destination))
        yield "127.0.0.1", scp_port(engine)
        yield 0

    pacs = pacs_launcher.start(on_move=on_move, **options)
    node = _add_node(engine, pacs)
    with pytest.raises(QRFailure) as caught:
        engine.retrieve(node, [RetrieveTarget(study_instance_uid="1.2.3.4")])

    assert caught.value.kind == kind
    assert caught.value.message.startswith(explanation), caught.value.message
    # One association, the echo's, proposing Verification only; no C-MOVE reached the PACS.
    assert pacs.proposed == [{VERIFICATION}]
    assert pacs.moves == [] and moved == []
    assert not events.of(RetrieveStarted) and not events.of(RetrieveFinished)
    echo = events.of(EchoFinished)[-1]
    assert not echo.ok and echo.problem == kind
    with db.database.connection_context():
        stored = db.RemoteNode.get(db.RemoteNode.name == node)
    assert stored.last_echo_ok is False
    assert stored.last_echo_detail == echo.message


# --- 3. a C-MOVE that stops answering: the node's DIMSE timeout ends it ------------------------


def test_move_that_stops_answering_times_out_within_the_dimse_timeout(
    engine: Engine, pacs_launcher: PacsLauncher, events: EventRecorder
) -> None:
    study = _study("hung", 4)
    images = _images(study)

    def on_move(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", scp_port(engine)
        yield len(images)
        for image in images[:2]:
            yield 0xFF00, image
        # Hangs after two sub-operations, far longer than the node's DIMSE timeout.
        pacs_launcher.released.wait(30)

    pacs = pacs_launcher.start(on_move=on_move)
    node = _add_node(engine, pacs, dimse_timeout=1.0)
    started = time.monotonic()
    summary = engine.retrieve(node, [RetrieveTarget(study_instance_uid=study.uid)])
    took = time.monotonic() - started

    assert 1.0 <= took < 5.0, f"the retrieve took {took:.1f} s with a 1 s DIMSE timeout"
    assert len(pacs.moves) == 1 and pacs.final_move_responses == []
    assert not summary.ok and summary.status is None
    assert (summary.completed, summary.failed, summary.warning) == (2, 0, 0)
    assert summary.message == (
        "pacs stopped answering (no response within 1 s, or the association was aborted) "
        "(2 completed, 0 failed, 0 with warnings before it stopped)"
    )
    finished = events.of(RetrieveFinished)[-1]
    assert not finished.ok and finished.message == summary.message


# --- 4. an association rejected with "no reason given" -----------------------------------------


@pytest.mark.parametrize(
    ("reject", "words"),
    [
        ((1, 1, 1), "permanently: no reason given"),
        ((2, 1, 1), "for now (transient): no reason given"),
        ((1, 2, 1), "permanently: no reason given (ACSE)"),
    ],
    ids=["user-permanent", "user-transient", "acse-provider"],
)
def test_rejection_without_a_reason_is_decoded_in_the_echo_message(
    engine: Engine, pacs_launcher: PacsLauncher, reject: tuple[int, int, int], words: str
) -> None:
    pacs = pacs_launcher.start(reject=reject)
    node = _add_node(engine, pacs)
    result = engine.echo(node)

    assert not result.ok and result.problem == "rejected"
    assert result.message == (
        f"pacs rejected the association {words}. What to do: ask the PACS administrator why "
        "it refuses our associations."
    )
    assert pacs.proposed == [{VERIFICATION}]
    with db.database.connection_context():
        stored = db.RemoteNode.get(db.RemoteNode.name == node)
    assert stored.last_echo_ok is False and stored.last_echo_detail == result.message


# --- 5. fetch missing when the PACS delivers less than it lists ---------------------------------


@pytest.mark.parametrize("reports_failures", [True, False], ids=["reported-failed", "silent"])
def test_fetch_missing_reports_what_still_differs_after_the_retrieve(
    engine: Engine, pacs_launcher: PacsLauncher, reports_failures: bool
) -> None:
    study = _study("short", 4)
    images, uids = _images(study), list(study.instances)

    def on_move(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", scp_port(engine)
        if reports_failures:
            yield len(images)
            for image in images[:2]:
                yield 0xFF00, image
            yield 0xB000, _failed_list(uids[2:])
        else:
            # Lists four, sends two and answers success: only verifying again can tell.
            yield 2
            for image in images[:2]:
                yield 0xFF00, image

    pacs = pacs_launcher.start(on_move=on_move, on_find=_image_rows(study))
    node = _add_node(engine, pacs)
    report = engine.fetch_missing(node, study.uid)

    assert (report.before.remote, report.before.held) == (4, 0)
    # Everything was missing: one request for the whole series, to us.
    assert [(d, i.QueryRetrieveLevel) for d, i in pacs.moves] == [("WEBAIMS", "SERIES")]
    assert report.retrieve is not None and report.retrieve.completed == 2
    if reports_failures:
        assert not report.retrieve.ok and report.retrieve.failed == 2
        assert report.retrieve.failed_sop_instance_uids == tuple(uids[2:])
    else:
        assert report.retrieve.ok, report.retrieve.message
    after = report.after
    assert after is not None and not after.complete and not report.ok
    assert (after.remote, after.held) == (4, 2)
    assert sorted(row.sop_instance_uid for row in after.missing) == sorted(uids[2:])
    assert after.message == "study incomplete: 4 instances on pacs, 2 in the archive, 2 missing"
    assert report.message == (
        f"fetched: {report.retrieve.message}; now study incomplete: 4 instances on pacs, "
        "2 in the archive, 2 missing"
    )
