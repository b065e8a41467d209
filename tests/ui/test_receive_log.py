"""Pilot tests of the shell and the live receive log, against a real engine and a real SCU."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from datetime import datetime

import pytest
from pynetdicom.sop_class import Verification
from textual import events
from textual.widget import Widget

from tests.conftest import SettingsFactory
from tests.ui.conftest import CT_FILES, SIZE, scu, send_files, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings
from webaims_tui.engine.events import (
    AssociationEnded,
    AssociationStarted,
    EngineError,
    InstanceArchived,
    InstanceReceived,
    QueueDepth,
)
from webaims_tui.screens.browser import BrowserScreen
from webaims_tui.screens.dialogs import ConfirmScreen, HelpScreen
from webaims_tui.screens.receive_log import ReceiveLogScreen
from webaims_tui.widgets.activity import ActivityModel, ActivityView
from webaims_tui.widgets.status_header import StatusHeader


def _lines(view: ActivityView) -> list[str]:
    return [view.line_text(index) for index in range(view.line_count)]


@pytest.mark.slow
async def test_log_shows_an_association_expands_filters_pauses_and_clears(
    settings: Settings,
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        assert isinstance(app.screen, ReceiveLogScreen)
        statuses = await asyncio.to_thread(send_files, app.port, CT_FILES, "CTSCANNER")
        assert statuses == [0, 0]
        await wait_until(
            pilot,
            lambda: app.activity.received == 2 and app.activity.active_associations == 0,
            "the association to end",
        )
        view = app.screen.query_one(ActivityView)
        await wait_until(pilot, lambda: view.line_count >= 1, "the log to redraw")
        first = view.line_text(0)
        for expected in ("CTSCANNER", "127.0.0.1", "2 img", "released"):
            assert expected in first

        # Filtered to the sender's AE (autoloader lines, still arriving, drop out), Enter on the
        # association expands it to its two instances.
        await pilot.press("slash", *"ae:CTS", "enter")
        assert view.line_count == 1
        await pilot.press("home", "enter")
        lines = _lines(view)
        assert len(lines) == 3
        assert any("CTImageStorage" in line for line in lines)
        assert any("MRImageStorage" in line for line in lines)

        # Escape clears the filter; a filter nothing matches shows nothing.
        await pilot.press("escape")
        assert view.line_count >= 3
        await pilot.press("slash", *"ae:NO", "enter")
        assert view.line_count == 0
        await pilot.press("escape")
        await pilot.press("slash", *"outcome:rel", "enter")
        assert view.line_count == 3
        assert "CTSCANNER" in view.line_text(0)
        await pilot.press("escape")

        # Paused: new data is counted but the view stands still until resumed.
        await pilot.press("p")
        assert app.screen.has_class("-paused")
        before = view.line_count
        await asyncio.to_thread(send_files, app.port, CT_FILES[:1], "SECONDAE")
        await wait_until(pilot, lambda: app.activity.received == 3, "the third instance")
        await pilot.pause(0.3)
        assert view.line_count == before
        await pilot.press("p")
        assert any("SECONDAE" in line for line in _lines(view))

        # Clear empties the view, not the counters.
        await pilot.press("c")
        assert view.line_count == 0
        assert app.activity.received == 3

        # Modes: 2 is the browser, 1 the log again.
        await pilot.press("2")
        assert isinstance(app.screen, BrowserScreen)
        await pilot.press("1")
        assert isinstance(app.screen, ReceiveLogScreen)
        await pilot.press("q")


async def test_header_shows_listening_address_and_counters(settings: Settings) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await asyncio.to_thread(send_files, app.port, CT_FILES[:1])
        await wait_until(pilot, lambda: app.activity.received == 1, "one instance")
        await pilot.pause(0.3)
        header = app.screen.query_one(StatusHeader)
        text = str(header.render())
        assert f"127.0.0.1:{app.port}" in text
        assert "listening" in text
        assert "1 recv" in text


async def test_port_in_use_is_shown_and_the_app_keeps_running(
    make_settings: SettingsFactory,
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        app = WebaimsApp(make_settings(port=port))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: bool(app.server_error), "the bind error")
            await pilot.pause(0.3)
            text = str(app.screen.query_one(StatusHeader).render())
            assert "NOT LISTENING" in text
            assert str(port) in text
            # The receive log keeps the reason too, as an error line.
            errors = [e for e in app.activity.entries if getattr(e, "kind", "") == "error"]
            assert any(str(port) in e.text and "server" in e.text for e in errors)
            await pilot.press("2")
            assert isinstance(app.screen, BrowserScreen)


async def test_help_lists_the_keys_of_the_current_screen(settings: Settings) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        keys = str(app.screen.query_one(".help-keys").render())
        assert "Pause" in keys and "Filter" in keys and "Clear view" in keys
        await pilot.press("escape")
        await pilot.press("2", "question_mark")
        keys = str(app.screen.query_one(".help-keys").render())
        assert "Delete" in keys and "Export" in keys
        await pilot.press("escape")
        assert isinstance(app.screen, BrowserScreen)


@pytest.mark.slow
async def test_quit_asks_first_while_an_association_is_open(settings: Settings) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        ae = scu("HOLDOPEN")
        ae.add_requested_context(Verification)
        assoc = await asyncio.to_thread(ae.associate, "127.0.0.1", app.port, ae_title="WEBAIMS")
        assert assoc.is_established
        server = app.engine.server
        assert server is not None
        await wait_until(pilot, lambda: server.active_associations == 1, "the open association")
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        assert app.engine.server is not None and app.engine.server.listening
        await asyncio.to_thread(assoc.release)
        await wait_until(pilot, lambda: server.active_associations == 0, "the release")
        await pilot.press("q")
        await wait_until(pilot, lambda: app.engine.server is None, "the engine to stop")


def test_patient_data_stays_off_the_log_unless_the_setting_allows() -> None:
    event = InstanceArchived(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        record_key="REC-1",
        record_created=True,
        archive_path="a/b.dcm",
        size=10,
        patient_id="ANON-SECRET-ID",
        patient_name="ANON^SECRET",
    )
    hidden = ActivityModel(show_patient_data=False)
    hidden.add(event)
    shown = ActivityModel(show_patient_data=True)
    shown.add(event)
    assert "SECRET" not in hidden.entries[0].search_text().upper()
    assert "ANON-SECRET-ID" in shown.entries[0].search_text().upper()


def _burst(app: WebaimsApp, instances: int) -> None:
    """What the SCP and autoloader emit for one association of ``instances`` images."""
    now = datetime(2026, 12, 1, 10, 0, 0)
    sink = app.engine_sink
    sink(AssociationStarted(7, "BURST", "WEBAIMS", "127.0.0.1", 40000, 1, (), at=now))
    for number in range(instances):
        uid = f"1.2.826.0.1.3680043.10.9.{number}"
        sink(
            InstanceReceived(
                7,
                "BURST",
                "1.2.840.10008.5.1.4.1.1.2",
                uid,
                "1.2.840.10008.1.2.1",
                524_288,
                f"{number}.dcm",
                at=now,
            )
        )
        sink(QueueDepth(instances - number, at=now))
        sink(
            InstanceArchived(
                uid,
                "1.2.840.10008.5.1.4.1.1.2",
                "CT",
                "REC-BURST",
                number == 0,
                f"x/{number}.dcm",
                524_288,
                at=now,
            )
        )
    sink(
        AssociationEnded(
            7, "BURST", "127.0.0.1", instances, 0, instances * 524_288, 3.0, "released", at=now
        )
    )


async def test_a_burst_of_1000_instances_is_absorbed_and_coalesced(
    settings: Settings, record_property: pytest.RecordProperty
) -> None:
    """Reports the worst event-loop lag under a 1,000-instance burst (no timing assertion)."""
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the database")
        worst = 0.0
        running = True

        async def probe() -> None:
            nonlocal worst
            loop = asyncio.get_running_loop()
            while running:
                before = loop.time()
                await asyncio.sleep(0.01)
                worst = max(worst, loop.time() - before - 0.01)

        prober = asyncio.create_task(probe())
        sender = threading.Thread(target=_burst, args=(app, 1000))
        started_at = time.perf_counter()
        sender.start()
        await wait_until(
            pilot,
            lambda: app.activity.received == 1000 and app.activity.archived == 1000,
            "the burst",
        )
        elapsed = time.perf_counter() - started_at
        await pilot.pause(0.3)
        running = False
        await prober
        sender.join()
        view = app.screen.query_one(ActivityView)
        # One association line and one coalesced "archived" line, not 1,000 rows.
        assert view.line_count == 2
        assert "1000 instances CT into record REC-BURST (new)" in view.line_text(1)
        record_property("worst_event_loop_lag_ms", round(worst * 1000, 1))
        print(
            f"\n1,000-instance burst: absorbed in {elapsed:.2f}s, "
            f"worst event-loop lag {worst * 1000:.1f} ms"
        )


async def test_low_free_disk_space_turns_the_throughput_line_to_a_warning(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings("[display]\nfree_disk_warning_mb = 1024\n")
    app = WebaimsApp(settings, start_server=False, disk_free=lambda _path: 100 * 1024 * 1024)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.free_disk_bytes is not None, "the disk check")
        await pilot.pause(0.3)
        assert app.disk_low
        assert app.screen.has_class("-disk-low")
        assert "100.0 MB free" in str(app.screen.query_one("#throughput").render())


async def test_an_engine_error_is_a_visible_notification_and_the_app_keeps_running(
    settings: Settings,
) -> None:
    app = WebaimsApp(settings, start_server=False)
    # notifications=True: run_test leaves toasts out of the screens unless asked.
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the database")
        error = EngineError(where="autoloader", message="archive disk full: 3 files wait")
        # From a thread of its own, as the autoloader reports it.
        reporter = threading.Thread(target=app.engine_sink, args=(error,))
        reporter.start()
        reporter.join()

        def shown() -> list[Widget]:
            # By type name: textual.widgets does not export Toast, the widget of a notify().
            toasts = app.screen.query("Toast")
            return [toast for toast in toasts if error.message in str(toast.render())]

        await wait_until(pilot, lambda: bool(shown()), "the notification")
        (toast,) = shown()
        assert toast.has_class("-error")
        assert str(toast.render()).startswith("autoloader\n")  # titled with where it happened
        assert app.is_running
        await pilot.press("2")
        assert isinstance(app.screen, BrowserScreen)


async def test_the_command_palette_lists_the_screens(settings: Settings) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the database")
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert "Log (1)" in titles and "Browse (2)" in titles
        browse = next(c for c in app.get_system_commands(app.screen) if c.title == "Browse (2)")
        browse.callback()
        await pilot.pause(0.1)
        assert isinstance(app.screen, BrowserScreen)


async def test_the_view_follows_the_tail_unless_scrolled_up(settings: Settings) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the database")
        view = app.screen.query_one(ActivityView)

        def associations(first: int, count: int) -> None:
            for number in range(first, first + count):
                app.engine_sink(AssociationStarted(number, "AE", "WEBAIMS", "10.0.0.1", 1, 1, ()))

        associations(1, 100)
        await wait_until(pilot, lambda: view.line_count == 100, "100 lines")
        await pilot.pause(0.2)
        assert view.following and view.scroll_y == view.max_scroll_y > 0
        await pilot.pause(0.2)
        for _ in range(3):  # the mouse wheel, as the driver delivers it
            view.post_message(events.MouseScrollUp(view, 2, 2, 0, -1, 0, False, False, False))
            await pilot.pause(0.05)
        assert not view.following
        scrolled = view.scroll_y
        assert scrolled < view.max_scroll_y
        associations(101, 10)
        await wait_until(pilot, lambda: view.line_count == 110, "110 lines")
        await pilot.pause(0.2)
        assert view.scroll_y == scrolled
        await pilot.press("end")
        associations(111, 10)
        await wait_until(pilot, lambda: view.line_count == 120, "120 lines")
        await pilot.pause(0.2)
        assert view.scroll_y == view.max_scroll_y
        assert view.cursor == 119
