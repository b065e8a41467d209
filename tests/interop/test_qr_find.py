"""C-ECHO and C-FIND against a real Orthanc, and the failures a technician must understand.

Every C-FIND result is compared with what Orthanc says it holds through its REST API.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt

from tests.helpers import EventRecorder
from tests.interop.conftest import Orthanc, free_port
from webaims_tui.engine.events import EchoFinished, QueryFinished
from webaims_tui.engine.qr import (
    CancelToken,
    FindQuery,
    InstanceRow,
    LocalAE,
    PatientRow,
    Peer,
    QRClient,
    QRFailure,
    QueryError,
    SeriesRow,
    StudyRow,
)

pytestmark = pytest.mark.interop


@pytest.fixture
def client(tmp_path: Path, events: EventRecorder) -> QRClient:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "spool").mkdir()
    return QRClient(
        LocalAE(ae_title="WEBAIMS", port=11112),
        incoming=tmp_path / "incoming",
        spool=tmp_path / "spool",
        sink=events,
    )


def test_echo_succeeds_and_is_reported(
    client: QRClient, orthanc: Orthanc, events: EventRecorder
) -> None:
    result = client.echo(orthanc.peer())
    assert result.ok, result.message
    assert result.status == 0x0000
    assert events.of(EchoFinished)[-1].ok


# --- every level, both models, compared with Orthanc's own listing ---------------------------

_UNIQUE_KEY = {
    "PATIENT": ("patients", "PatientID", "patient_id"),
    "STUDY": ("studies", "StudyInstanceUID", "study_instance_uid"),
    "SERIES": ("series", "SeriesInstanceUID", "series_instance_uid"),
    "IMAGE": ("instances", "SOPInstanceUID", "sop_instance_uid"),
}


@pytest.mark.parametrize(
    ("model", "level"),
    [
        ("patient", "PATIENT"),
        ("patient", "STUDY"),
        ("patient", "SERIES"),
        ("patient", "IMAGE"),
        ("study", "STUDY"),
        ("study", "SERIES"),
        ("study", "IMAGE"),
    ],
)
def test_universal_find_returns_exactly_what_orthanc_holds(
    client: QRClient, orthanc: Orthanc, model: Any, level: Any
) -> None:
    result = client.find(orthanc.peer(), FindQuery(level=level, model=model))
    assert result.ok and result.status == 0x0000, result.message
    resource, tag, attribute = _UNIQUE_KEY[level]
    held = sorted(tags.get(tag, "") for tags in orthanc.main_tags(resource))
    found = sorted(getattr(row, attribute) for row in result.rows)
    assert found == held
    assert len(held) >= {"PATIENT": 4, "STUDY": 4, "SERIES": 6, "IMAGE": 219}[level]


def test_rows_are_typed_and_carry_the_generated_values(client: QRClient, orthanc: Orthanc) -> None:
    study = orthanc.studies[0]
    studies = client.find(orthanc.peer(), FindQuery(level="STUDY", accession_number="ACC001"))
    assert len(studies.rows) == 1
    row = studies.rows[0]
    assert isinstance(row, StudyRow)
    assert (row.patient_id, row.patient_name, row.birth_date) == ("QRP001", "QR^ALPHA", "19600101")
    assert (row.study_instance_uid, row.study_date, row.description) == (
        study.uid,
        "20240115",
        "CHEST CT",
    )
    assert (row.modalities, row.series, row.instances) == (("CT",), 2, 5)

    patients = client.find(
        orthanc.peer(), FindQuery(level="PATIENT", model="patient", patient_id="QRP001")
    )
    assert patients.rows == [
        PatientRow(
            patient_id="QRP001",
            patient_name="QR^ALPHA",
            birth_date="19600101",
            sex="O",
            studies=2,
        )
    ]

    series = client.find(orthanc.peer(), FindQuery(level="SERIES", study_instance_uid=study.uid))
    assert sorted(series.rows, key=lambda r: r.series_instance_uid) == sorted(
        (
            SeriesRow(
                patient_id="QRP001",
                study_instance_uid=study.uid,
                series_instance_uid=s.uid,
                modality="CT",
                series_number=number,
                description="",
                instances=len(s.instances),
            )
            for number, s in enumerate(study.series, start=1)
        ),
        key=lambda r: r.series_instance_uid,
    )

    images = client.find(
        orthanc.peer(),
        FindQuery(
            level="IMAGE", study_instance_uid=study.uid, series_instance_uid=study.series[1].uid
        ),
    )
    assert {r.sop_instance_uid for r in images.rows} == set(study.series[1].instances)
    assert all(
        isinstance(r, InstanceRow) and r.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
        for r in images.rows
    )
    assert sorted(r.instance_number for r in images.rows if isinstance(r, InstanceRow)) == [1, 2]


def _rest_find(orthanc: Orthanc, level: str, query: dict[str, str]) -> set[str]:
    ids = orthanc.rest("POST", "/tools/find", {"Level": level, "Query": query})
    key = {"Study": "StudyInstanceUID", "Series": "SeriesInstanceUID"}[level]
    plural = {"Study": "studies", "Series": "series"}[level]
    return {orthanc.get(f"/{plural}/{i}")["MainDicomTags"][key] for i in ids}


@pytest.mark.parametrize(
    ("keys", "rest_query", "expected_accessions"),
    [
        ({"patient_name": "QR*"}, {"PatientName": "QR*"}, {"ACC001", "ACC002", "ACC003"}),
        ({"patient_name": "QR^B?TA"}, {"PatientName": "QR^B?TA"}, {"ACC003"}),
        ({"patient_id": "QRP001"}, {"PatientID": "QRP001"}, {"ACC001", "ACC002"}),
        (
            {"birth_date": "19700101-19801231"},
            {"PatientBirthDate": "19700101-19801231"},
            {"ACC003"},
        ),
        (
            {"study_date": "20240101-20241231"},
            {"StudyDate": "20240101-20241231"},
            {"ACC001", "ACC002"},
        ),
        ({"study_date": "-20221231"}, {"StudyDate": "-20221231"}, {"ACC004"}),
        ({"study_date": "20230301"}, {"StudyDate": "20230301"}, {"ACC003"}),
        (
            {"modality": "MR", "patient_id": "QR*"},
            {"ModalitiesInStudy": "MR", "PatientID": "QR*"},
            {"ACC002", "ACC003"},
        ),
        ({"accession_number": "ACC004"}, {"AccessionNumber": "ACC004"}, {"ACC004"}),
        ({"study_description": "*MR*"}, {"StudyDescription": "*MR*"}, {"ACC002"}),
    ],
)
def test_study_matching_keys_agree_with_orthanc(
    client: QRClient,
    orthanc: Orthanc,
    keys: dict[str, str],
    rest_query: dict[str, str],
    expected_accessions: set[str],
) -> None:
    for model in ("patient", "study"):
        result = client.find(orthanc.peer(), FindQuery(level="STUDY", model=model, **keys))  # type: ignore[arg-type]
        found = {r.study_instance_uid for r in result.rows if isinstance(r, StudyRow)}
        assert found == _rest_find(orthanc, "Study", rest_query), model
        generated = {s.accession: s.uid for s in orthanc.studies}
        assert {a for a, uid in generated.items() if uid in found} == expected_accessions


def test_series_level_modality_and_uid_keys(client: QRClient, orthanc: Orthanc) -> None:
    study = orthanc.studies[2]  # ACC003: one CT series and one MR series
    result = client.find(
        orthanc.peer(), FindQuery(level="SERIES", study_instance_uid=study.uid, modality="MR")
    )
    assert [r.series_instance_uid for r in result.rows] == [study.series[1].uid]
    by_uid = client.find(
        orthanc.peer(),
        FindQuery(
            level="SERIES", study_instance_uid=study.uid, series_instance_uid=study.series[0].uid
        ),
    )
    assert [r.series_instance_uid for r in by_uid.rows] == [study.series[0].uid]


def test_invalid_queries_name_the_field(client: QRClient, orthanc: Orthanc) -> None:
    cases = [
        (FindQuery(level="PATIENT", model="study"), "Patient Root"),
        (FindQuery(study_date="2024-01-01"), "study_date"),
        (FindQuery(study_instance_uid="1.2.abc"), "study_instance_uid"),
        (FindQuery(limit=-1), "limit"),
    ]
    for query, named in cases:
        with pytest.raises(QueryError, match=named):
            client.find(orthanc.peer(), query)


# --- result limit and cancellation -------------------------------------------------------------


def test_result_limit_sends_c_cancel_and_keeps_the_first_rows(
    client: QRClient, orthanc: Orthanc, events: EventRecorder
) -> None:
    result = client.find(orthanc.peer(), FindQuery(level="IMAGE", limit=7))
    assert len(result.rows) == 7
    assert result.limited and not result.cancelled
    # 0xFE00 when Orthanc saw the C-CANCEL before its last response, success when it had sent
    # everything already (both happen over loopback); either way only the first rows are kept.
    assert result.status in (0xFE00, 0x0000)
    assert result.ok
    assert events.of(QueryFinished)[-1].limited


def test_cancelled_query_stops_at_the_next_response(client: QRClient, orthanc: Orthanc) -> None:
    token = CancelToken()
    token.cancel()
    result = client.find(orthanc.peer(), FindQuery(level="IMAGE"), token)
    assert result.cancelled
    assert len(result.rows) == 1
    assert result.status in (0xFE00, 0x0000)


# --- failures explained -----------------------------------------------------------------------


def test_node_down_is_connection_refused(client: QRClient) -> None:
    peer = Peer(name="down", ae_title="ANY", host="127.0.0.1", port=free_port(), acse_timeout=5)
    result = client.echo(peer)
    assert not result.ok and result.problem == "refused"
    assert "connection refused" in result.message and "nothing listens" in result.message
    with pytest.raises(QRFailure) as caught:
        client.find(peer, FindQuery())
    assert caught.value.kind == "refused"
    assert "C-ECHO failed, nothing was sent" in caught.value.message


def test_wrong_called_ae_is_rejected_with_the_decoded_reason(
    client: QRClient, orthanc: Orthanc
) -> None:
    result = client.echo(orthanc.peer(ae_title="NOTORTHANC"))
    assert not result.ok and result.problem == "rejected"
    assert "called AE title not recognised" in result.message
    assert "'NOTORTHANC'" in result.message


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A socket that listens (the kernel completes the TCP handshake) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


def test_node_that_never_answers_times_out(client: QRClient, silent_port: int) -> None:
    peer = Peer(name="hung", ae_title="HUNG", host="127.0.0.1", port=silent_port, acse_timeout=1)
    result = client.echo(peer)
    assert not result.ok and result.problem == "timeout"
    assert "did not answer the association request within 1 s" in result.message
    with pytest.raises(QRFailure) as caught:
        client.find(peer, FindQuery())
    assert caught.value.kind == "timeout"


@pytest.fixture
def picky_scp() -> Iterator[int]:
    """A pynetdicom SCP that knows only Verification and only the calling AE 'FRIEND'."""
    ae = AE(ae_title="PICKY")
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.require_calling_aet = ["FRIEND"]
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield int(server.server_address[1])
    server.shutdown()


def test_unknown_calling_ae_is_rejected_with_the_decoded_reason(
    client: QRClient, picky_scp: int
) -> None:
    result = client.echo(Peer(name="picky", ae_title="PICKY", host="127.0.0.1", port=picky_scp))
    assert result.problem == "rejected"
    assert "calling AE title not recognised" in result.message
    assert "'WEBAIMS'" in result.message  # says which title the PACS must learn


def test_query_service_not_offered_is_context_not_accepted(
    tmp_path: Path, events: EventRecorder, picky_scp: int
) -> None:
    friend = QRClient(
        LocalAE(ae_title="FRIEND", port=11112), incoming=tmp_path, spool=tmp_path, sink=events
    )
    peer = Peer(name="picky", ae_title="PICKY", host="127.0.0.1", port=picky_scp)
    assert friend.echo(peer).ok
    with pytest.raises(QRFailure) as caught:
        friend.find(peer, FindQuery())
    assert caught.value.kind == "context-not-accepted"
    assert "Study Root C-FIND" in caught.value.message


@pytest.fixture
def slow_find_scp() -> Iterator[tuple[int, list[int]]]:
    """A pynetdicom Study Root C-FIND SCP that never answers in time; records proposed PDUs."""
    proposed: list[int] = []
    release = threading.Event()

    def on_find(event: Any) -> Iterator[tuple[int, Any]]:
        release.wait(10)  # longer than the client's DIMSE timeout
        yield 0x0000, None

    def on_requested(event: Any) -> None:
        proposed.append(int(event.assoc.requestor.maximum_length))

    ae = AE(ae_title="SLOW")
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.2.2.1")
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_REQUESTED, on_requested)],
    )
    yield int(server.server_address[1]), proposed
    release.set()
    server.shutdown()


def test_query_without_answer_times_out_and_max_pdu_is_proposed(
    client: QRClient, slow_find_scp: tuple[int, list[int]]
) -> None:
    port, proposed = slow_find_scp
    peer = Peer(name="slow", ae_title="SLOW", host="127.0.0.1", port=port, dimse_timeout=1)
    with pytest.raises(QRFailure) as caught:
        client.find(peer, FindQuery())
    assert caught.value.kind == "timeout"
    assert "stopped answering the C-FIND" in caught.value.message
    assert proposed == [65536, 65536]  # the echo association, then the query association

    assert client.echo(Peer(ae_title="SLOW", host="127.0.0.1", port=port, max_pdu_size=32768)).ok
    assert proposed[-1] == 32768
