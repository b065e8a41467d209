"""Pilot tests of the Query/Retrieve screen against a real Orthanc and the running engine.

The Orthanc fixture (started once per test worker, filled with generated studies) is the one
the Query/Retrieve engine's interop tests use; importing it here registers it for this module.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, ProgressBar, Select, Static

from tests.interop.conftest import ORTHANC_AE, Orthanc, orthanc  # noqa: F401
from tests.ui.conftest import SIZE, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings
from webaims_tui.engine import qr
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
        # Cancelled as soon as the engine says the move started: the C-CANCEL goes out with
        # the next pending response, long before 200 images are through.
        await poll(lambda: bool(first.retrieve_ids), "the retrieve to start")
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
