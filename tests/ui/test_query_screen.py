"""Pilot tests of the Query/Retrieve screen against a real Orthanc and the running engine.

The Orthanc fixture (started once per test worker, filled with generated studies) is the one
the Query/Retrieve engine's interop tests use; importing it here registers it for this module.
The archive-state marks are also checked against a small pynetdicom Find SCP that counts the
associations and queries it gets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, ProgressBar, Select, Static

from tests.interop.conftest import ORTHANC_AE, Orthanc, orthanc  # noqa: F401
from tests.ui.conftest import CT_FILES, SIZE, send_files, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings
from webaims_tui.engine import db, qr
from webaims_tui.engine.anonymize import RuleAnonymizer
from webaims_tui.screens.query import QueryScreen, RetrieveRow


@pytest.fixture
def pacs(orthanc: Orthanc) -> Iterator[Orthanc]:  # noqa: F811
    yield orthanc
    orthanc.forget()


async def poll(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _text(screen: QueryScreen, widget_id: str) -> str:
    return str(screen.query_one(widget_id, Static).render())


def _archive_cell(table: DataTable[object], entry_key: str) -> str:
    cell = table.get_cell(entry_key, "Archive")
    return cell.plain if isinstance(cell, Text) else str(cell)


def _notifications(app: WebaimsApp) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


async def _open_query(app: WebaimsApp, pilot: Pilot[None], node: str) -> QueryScreen:
    await pilot.press("3")
    screen = app.screen
    assert isinstance(screen, QueryScreen)
    await wait_until(pilot, lambda: screen.node_name == node, "the node list")
    return screen


async def _query(pilot: Pilot[None], screen: QueryScreen, **fields: str) -> DataTable[object]:
    for widget_id, value in fields.items():
        screen.query_one(f"#qr-{widget_id}", Input).value = value
    await pilot.press("ctrl+f")
    table: DataTable[object] = screen.query_one("#qr-results", DataTable)
    await wait_until(
        pilot,
        lambda: "results" in _text(screen, "#qr-counts") and not screen.has_class("-querying"),
        "the query to answer",
    )
    return table


@pytest.mark.slow
async def test_query_expand_retrieve_with_progress_and_archive_state(
    settings: Settings, pacs: Orthanc
) -> None:
    study = next(s for s in pacs.studies if s.patient_id == "QRP002")  # 2 series, 5 images
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        pacs.knows(settings.server.ae_title, app.port)
        app.engine.add_node("orthanc", ae_title=ORTHANC_AE, host="127.0.0.1", port=pacs.dicom_port)
        screen = await _open_query(app, pilot, "orthanc")
        assert "never echoed" in _text(screen, "#qr-echo")

        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: "echo ok" in _text(screen, "#qr-echo"), "the echo")

        table = await _query(pilot, screen, id="QRP002")
        assert table.row_count == 1
        assert "1 results" in _text(screen, "#qr-counts")
        entry = screen.entries[0]
        await wait_until(pilot, lambda: entry.archive == "missing", "the archive state")

        # Enter expands the study into its two series (a SERIES-level C-FIND).
        table.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: table.row_count == 3, "the series rows")
        assert len(entry.children) == 2

        # Space selects the study, r retrieves it; progress comes from the engine's events.
        table.move_cursor(row=0)
        await pilot.press("space", "r")
        job = screen.jobs[0]
        await wait_until(pilot, lambda: job.state in ("done", "failed"), "the retrieve", 60)
        assert job.state == "done", job.message
        assert job.retrieve_ids, "no RetrieveStarted event reached the screen"
        assert job.completed == 5 and job.failed == 0
        bar = screen.query_one(RetrieveRow).query_one(ProgressBar)
        assert bar.total == 5 and bar.progress == 5
        assert "5 instances retrieved" in _text(screen, "#qr-message")
        await wait_until(pilot, lambda: entry.archive == "in archive", "the new archive state")
        await wait_until(
            pilot, lambda: app.engine.stats().instances == 5, "the autoloader to archive them"
        )
        assert study.uid == entry.row.study_instance_uid  # type: ignore[union-attr]

        # Fetch missing: the archive holds everything, so nothing is moved.
        await pilot.press("m")
        second = screen.jobs[1]
        await wait_until(pilot, lambda: second.state != "queued" and second.state != "running", "")
        assert "nothing to fetch" in second.message

        # Lose one instance of each series locally (archive rows and files together), as in
        # the engine's fetch-missing interop test.
        lost = {series.instances[0] for series in study.series}
        anonymizer = app.engine.anonymizer
        assert isinstance(anonymizer, RuleAnonymizer)
        archived_uids = [anonymizer.replacement_uid(uid, "SOPInstanceUID") for uid in lost]
        with db.database.connection_context():
            rows = db.Instance.select().where(db.Instance.sop_instance_uid.in_(archived_uids))
            ids = [row.id for row in rows]
        assert len(ids) == 2
        for instance_id in ids:
            app.engine.delete_unit("instance", instance_id)

        # A new query marks the study from the archive's own count.
        table = await _query(pilot, screen, id="QRP002")
        entry = screen.entries[0]
        await wait_until(pilot, lambda: entry.archive == "partial: 3/5", "the partial state")
        assert _archive_cell(table, entry.key) == "partial: 3/5"
        assert "partial 1" in _text(screen, "#qr-counts")

        # m fetches just the two lost instances back.
        await pilot.press("m")
        third = screen.jobs[2]
        await wait_until(pilot, lambda: third.state in ("done", "failed"), "the fetch", 60)
        assert third.state == "done", third.message
        assert third.completed == 2 and third.failed == 0, third.message
        await wait_until(pilot, lambda: entry.archive == "in archive", "the archive state")
        assert _archive_cell(table, entry.key) == "in archive"
        await wait_until(
            pilot, lambda: app.engine.stats().instances == 5, "the autoloader to archive them"
        )
        restored = [anonymizer.replacement_uid(uid, "SOPInstanceUID") for uid in lost]
        with db.database.connection_context():
            query = db.Instance.select().where(db.Instance.sop_instance_uid.in_(restored))
            assert query.count() == 2


@pytest.mark.slow
async def test_cancel_a_large_retrieve(settings: Settings, pacs: Orthanc) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        pacs.knows(settings.server.ae_title, app.port)
        app.engine.add_node("orthanc", ae_title=ORTHANC_AE, host="127.0.0.1", port=pacs.dicom_port)
        screen = await _open_query(app, pilot, "orthanc")
        table = await _query(pilot, screen, id="QRP003")  # one study of 200 images
        assert table.row_count == 1
        table.focus()
        # Keys are posted, not pressed through Pilot: Pilot waits for the app to be idle after
        # each key, which it is not while 200 images arrive, and the cancel would come too late.
        app.simulate_key("r")
        app.simulate_key("r")  # a second retrieve queues behind the first
        await poll(lambda: len(screen.jobs) == 2, "two queued retrieves")
        first, second = screen.jobs
        # While it runs the bar shows partial progress (from Orthanc's pending responses).
        bar = screen.query_one("#job-1", RetrieveRow).query_one(ProgressBar)
        await poll(
            lambda: first.state == "running" and bar.total is not None and 0 < bar.progress < 200,
            "progress strictly between 0 and the total",
        )
        assert bar.total == 200 and first.total == 200
        assert 0 < first.completed < 200
        # Cancelled then: the C-CANCEL goes out with the next pending response, long before
        # 200 images are through.
        app.simulate_key("x")
        await poll(lambda: first.state != "running", "the cancel")
        assert first.state == "cancelled", first.message
        assert first.completed < 200 and first.message.startswith("cancelled"), first.message
        # The queued one then runs to the end.
        await wait_until(pilot, lambda: second.state in ("done", "failed"), "the second", 90)
        assert second.state == "done", second.message


@pytest.mark.slow
async def test_unreachable_node_and_unknown_move_destination_are_explained(
    settings: Settings, pacs: Orthanc
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        app.engine.add_node("gone", ae_title="GONE", host="127.0.0.1", port=closed_port)
        app.engine.add_node("orthanc", ae_title=ORTHANC_AE, host="127.0.0.1", port=pacs.dicom_port)
        screen = await _open_query(app, pilot, "gone")
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: screen.query_one("#qr-message").has_class("-error"), "")
        message = _text(screen, "#qr-message")
        assert "refused" in message.lower() and "Check that the PACS runs" in message

        # Orthanc answers only to its own AE title: a wrong called AE title is rejected, and
        # the screen says which title to check.
        app.engine.add_node(
            "wrongae", ae_title="NOTORTHANC", host="127.0.0.1", port=pacs.dicom_port
        )
        screen.load_nodes()
        await wait_until(pilot, lambda: len(screen.nodes) == 3, "the new node")
        screen.query_one("#qr-node", Select).value = "wrongae"
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: "rejected" in _text(screen, "#qr-message"), "rejection")
        assert "'NOTORTHANC'" in _text(screen, "#qr-message")
        assert "What to do" in _text(screen, "#qr-message")

        # Orthanc does not know our AE (no pacs.knows): the C-MOVE is refused and explained.
        screen.query_one("#qr-node", Select).value = "orthanc"
        table = await _query(pilot, screen, id="QRP002")
        assert table.row_count == 1
        table.focus()
        await pilot.press("r")
        job = screen.jobs[0]
        await wait_until(pilot, lambda: job.state in ("done", "failed"), "the retrieve", 60)
        assert job.state == "failed"
        assert "does not know the destination" in job.message
        assert "failed" in _text(screen, "#qr-message")


async def test_form_quick_dates_validation_and_sort(settings: Settings) -> None:
    app = WebaimsApp(settings, clock=lambda: datetime(2026, 12, 3, 10, 0), start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the engine")
        app.engine.add_node("pacs", ae_title="PACS", host="127.0.0.1", port=104)
        screen = await _open_query(app, pilot, "pacs")
        date_field = screen.query_one("#qr-date", Input)
        await pilot.press("f2")
        assert date_field.value == "20261203"
        await pilot.press("f3")
        assert date_field.value == "20261127-20261203"
        await pilot.press("f6")
        assert date_field.value == ""

        # A bad key never reaches the network: the message names the field.
        date_field.value = "2026-12-01"
        await pilot.press("ctrl+f")
        message = _text(screen, "#qr-message")
        assert "study_date" in message and "YYYYMMDD" in message
        assert screen.query_one("#qr-message").has_class("-error")

        # Patient Root offers the PATIENT level; Study Root does not.
        model = screen.query_one("#qr-model", Select)
        model.value = "patient"
        await pilot.pause()
        level = screen.query_one("#qr-level", Select)
        level.value = "PATIENT"
        model.value = "study"
        await pilot.pause()
        assert level.value == "STUDY"

        # Results sort by date (newest first), then s cycles: date ascending, then patient.
        rows: list[qr.Row] = [
            qr.StudyRow("P1", "B^B", "", f"1.2.3.{n}", date, "", "", "", "", ("CT",), 1, 1)
            for n, date in enumerate(["20240101", "20250101", "20230101"])
        ]
        screen.show_results("pacs", "STUDY", qr.FindResult(rows, 0), check_archive=False)
        assert [e.row.study_date for e in screen.entries] == [  # type: ignore[union-attr]
            "20250101",
            "20240101",
            "20230101",
        ]
        await pilot.press("s")
        assert screen.entries[0].row.study_date == "20230101"  # type: ignore[union-attr]
        assert "sort date↑" in _text(screen, "#qr-counts")
        await pilot.press("space")
        assert "1 selected" in _text(screen, "#qr-counts")


async def test_a_node_removed_behind_the_screen_is_explained_and_the_screen_recovers(
    settings: Settings,
) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the engine")
        app.engine.add_node("pacs", ae_title="PACS", host="127.0.0.1", port=104)
        screen = await _open_query(app, pilot, "pacs")
        # As `webaims-tui nodes remove pacs` from another terminal would: the screen's node
        # list still offers it.
        app.engine.remove_node("pacs")
        await pilot.press("ctrl+f")
        await wait_until(pilot, lambda: "no remote node" in _text(screen, "#qr-message"), "")
        assert not screen.has_class("-querying")
        message = _text(screen, "#qr-message")
        assert "query failed: no remote node named 'pacs'" in message
        assert "add it again on the Nodes screen (5)" in message
        assert screen.query_one("#qr-message").has_class("-error")
        assert any("query failed" in n and "'pacs'" in n for n in _notifications(app))
        # The node list was reloaded: the screen now says there is no node to query.
        await wait_until(pilot, lambda: screen.node_name is None, "the node list")
        await pilot.press("ctrl+f")
        assert "No node to query" in _text(screen, "#qr-message")

        # A retrieve queued for a node that is gone fails, and the queue keeps running.
        app.engine.add_node("pacs", ae_title="PACS", host="127.0.0.1", port=104)
        screen.load_nodes()
        await wait_until(pilot, lambda: screen.node_name == "pacs", "the node again")
        row = qr.StudyRow("P1", "B^B", "", "1.2.3.4", "20240101", "", "", "", "", ("CT",), 1, 1)
        screen.show_results("pacs", "STUDY", qr.FindResult([row], 0), check_archive=False)
        app.engine.remove_node("pacs")
        await pilot.press("r")
        first = screen.jobs[0]
        await wait_until(pilot, lambda: first.state == "failed", "the first retrieve to fail")
        assert "no remote node named 'pacs'" in first.message
        await wait_until(pilot, lambda: not screen._runner_active, "the runner to stop")
        await pilot.press("r")
        second = screen.jobs[1]
        await wait_until(pilot, lambda: second.state == "failed", "the second retrieve to run")
        assert "add it again on the Nodes screen (5)" in _text(screen, "#qr-message")
        # The app still runs: another mode opens, and the query screen comes back as it was.
        # Ending in the query mode matters: at exit Textual empties the first mode's stack
        # first, and WebaimsApp.tick then fails on app.screen if that mode is current.
        await pilot.press("1")
        assert app.current_mode != "query" and app.return_code is None
        await pilot.press("3")
        assert app.screen is screen and len(screen.jobs) == 2


class CountingPacs:
    """A Study Root Find SCP that records every association and every C-FIND it answers.

    STUDY-level queries get ``studies``; IMAGE-level ones get ``instances`` of the study asked.
    """

    def __init__(self, studies: list[Dataset], instances: dict[str, list[Dataset]]) -> None:
        self.studies = studies
        self.instances = instances
        self.associations = 0
        self.finds: list[tuple[str, str]] = []  # (level, StudyInstanceUID asked)
        self._lock = threading.Lock()
        ae = AE(ae_title="COUNTING")
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        ae.add_supported_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root C-FIND
        handlers: list[Any] = [(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_FIND, self._find)]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset]]:
        identifier = event.identifier
        level = str(identifier.QueryRetrieveLevel)
        study_uid = str(identifier.get("StudyInstanceUID", ""))
        with self._lock:
            self.finds.append((level, study_uid))
        answers = self.studies if level == "STUDY" else self.instances.get(study_uid, [])
        for answer in answers:
            yield 0xFF00, answer  # pending: one more match

    def stop(self) -> None:
        self.server.shutdown()


def _study(uid: str, instances: int | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "P1"
    ds.PatientName = "COUNT^ME"
    ds.StudyInstanceUID = uid
    ds.StudyDate = "20240101"
    ds.NumberOfStudyRelatedInstances = instances  # None: the PACS leaves the count empty
    return ds


def _instance(study_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.1"
    ds.SOPInstanceUID = f"{study_uid}.1.{number}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return ds


@pytest.fixture
def counting_pacs_studies() -> dict[str, Any]:
    ct_study, mr_study = (
        str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in CT_FILES
    )
    return {
        "held whole": (ct_study, 1),  # we hold its 1 instance
        "held partly": (mr_study, 3),  # we hold 1 of 3
        "not held": ("1.2.826.0.1.3680043.10.99.1", 2),
        "no count": ("1.2.826.0.1.3680043.10.99.2", None),
    }


@pytest.mark.slow
async def test_archive_marks_need_no_image_query_when_the_pacs_gives_counts(
    settings: Settings, counting_pacs_studies: dict[str, Any]
) -> None:
    no_count_uid = counting_pacs_studies["no count"][0]
    pacs = CountingPacs(
        [_study(uid, count) for uid, count in counting_pacs_studies.values()],
        {no_count_uid: [_instance(no_count_uid, 1), _instance(no_count_uid, 2)]},
    )
    app = WebaimsApp(settings)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await started(pilot)
            # The archive holds the CT study and one MR image, anonymized by the default rules.
            statuses = await asyncio.to_thread(send_files, app.port, CT_FILES)
            assert statuses == [0, 0]
            await wait_until(pilot, lambda: app.engine.stats().instances == 2, "the autoloader")
            app.engine.add_node("counting", ae_title="COUNTING", host="127.0.0.1", port=pacs.port)
            screen = await _open_query(app, pilot, "counting")
            table = await _query(pilot, screen)
            assert table.row_count == 4
            marks = {uid: "" for uid, _count in counting_pacs_studies.values()}

            def marked() -> bool:
                for entry in screen.entries:
                    marks[entry.row.study_instance_uid] = entry.archive  # type: ignore[union-attr]
                return all(marks.values())

            await wait_until(pilot, marked, "the archive marks")
            by_name = {name: marks[uid] for name, (uid, _count) in counting_pacs_studies.items()}
            assert by_name == {
                "held whole": "in archive",
                "held partly": "partial: 1/3",
                "not held": "missing",
                "no count": "missing",  # listed at IMAGE level: 2 instances, none held
            }
            # One STUDY-level C-FIND, and one IMAGE-level C-FIND only for the study without a
            # count; each came after its own C-ECHO association.
            assert pacs.finds == [("STUDY", ""), ("IMAGE", no_count_uid)]
            assert pacs.associations == 4
    finally:
        pacs.stop()
