"""Pilot tests of the Settings screen: sources shown, live changes take effect without restart."""

from __future__ import annotations

import asyncio

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from tests.conftest import SettingsFactory
from tests.ui.conftest import SIZE, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.screens.settings import EditSettingScreen, SettingsScreen

pytestmark = pytest.mark.slow


def _echo_accepted(port: int, calling_ae: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
    accepted = bool(assoc.is_established)
    if accepted:
        assoc.release()
    return accepted


def _row(table: DataTable[object], key: str) -> list[str]:
    return [str(cell) for cell in table.get_row(key)]


async def _edit(pilot: Pilot[None], app: WebaimsApp, table: DataTable[object], key: str) -> None:
    table.move_cursor(row=table.get_row_index(key))
    await pilot.press("e")
    await wait_until(pilot, lambda: isinstance(app.screen, EditSettingScreen), "the editor")


async def test_sources_and_live_changes(make_settings: SettingsFactory) -> None:
    settings = make_settings('[autoloader]\nduplicate_policy = "overwrite"\n')
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await pilot.press("6")
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        table: DataTable[object] = screen.query_one("#settings-table", DataTable)
        assert _row(table, "autoloader.duplicate_policy")[1:] == [
            "file",
            "restart needed",
            "overwrite",
        ]
        assert _row(table, "server.allowed_calling_aes")[1:] == ["default", "live (enter)", "(any)"]
        assert await asyncio.to_thread(_echo_accepted, app.port, "ANYONE")

        # Allowed callers: in effect for the next association, no restart.
        await _edit(pilot, app, table, "server.allowed_calling_aes")
        app.screen.query_one(Input).value = "GOODSCU, OTHER"
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: _row(table, "server.allowed_calling_aes")[1:4:2] == ["live", "GOODSCU, OTHER"],
            "the new value",
        )
        assert not await asyncio.to_thread(_echo_accepted, app.port, "ANYONE")
        assert await asyncio.to_thread(_echo_accepted, app.port, "GOODSCU")

        # An invalid record unit is refused with the key named; a valid one applies.
        await _edit(pilot, app, table, "autoloader.record_unit")
        app.screen.query_one(Input).value = "visit"
        await pilot.press("enter")
        message = screen.query_one("#settings-message", Static)
        assert "autoloader.record_unit" in str(message.render())
        assert message.has_class("-error")
        assert app.engine.settings.autoloader.record_unit == "study"
        await _edit(pilot, app, table, "autoloader.record_unit")
        app.screen.query_one(Input).value = "series"
        await pilot.press("enter")
        assert app.engine.settings.autoloader.record_unit == "series"
        assert app.engine.autoloader is not None
        assert app.engine.autoloader.options.record_unit == "series"

        # A setting that needs a restart says so instead of opening an editor.
        table.move_cursor(row=table.get_row_index("server.port"))
        await pilot.press("e")
        assert app.screen is screen
        assert "restart" in str(message.render())
