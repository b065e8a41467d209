"""Pilot tests of the Nodes screen: the form's validation, adding a node, echoing it."""

from __future__ import annotations

import socket

import pytest
from textual.widgets import Button, DataTable, Input, Label, Static

from tests.ui.conftest import SIZE, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings
from webaims_tui.screens.node_form import NodeFormScreen
from webaims_tui.screens.nodes import NodesScreen

# Each drives a whole running app (engine, threads, dialogs): several seconds on 2 cores.
pytestmark = pytest.mark.slow


def _cell(table: DataTable[object], row: int, column: str) -> str:
    return str(table.get_cell_at((row, list(table.columns).index(column))))  # type: ignore[arg-type]


async def test_add_a_node_with_validation_then_echo_it(settings: Settings) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await pilot.press("5")
        screen = app.screen
        assert isinstance(screen, NodesScreen)

        await pilot.press("a")
        form = app.screen
        assert isinstance(form, NodeFormScreen)
        # Our own SCP stands in for the PACS: a real C-ECHO over loopback.
        await pilot.press(*"self")
        form.query_one("#field-ae_title", Input).value = "WEBAIMS"
        form.query_one("#field-host", Input).value = "127.0.0.1"
        form.query_one("#field-port", Input).value = "99999"
        await pilot.pause()
        error = form.query_one("#error-port", Label)
        assert error.display and "port" in str(error.render())
        assert form.query_one("#save", Button).disabled
        await pilot.press("ctrl+s")
        assert app.screen is form  # blocked: nothing stored
        assert not app.engine.nodes()

        form.query_one("#field-ae_title", Input).value = "THIS AE TITLE IS TOO LONG"
        await pilot.pause()
        assert "ae_title" in str(form.query_one("#error-ae_title", Label).render())
        form.query_one("#field-ae_title", Input).value = "WEBAIMS"
        form.query_one("#field-port", Input).value = str(app.port)
        await pilot.pause()
        assert not form.query_one("#save", Button).disabled
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is screen, "the form to close")

        table = screen.query_one("#nodes-table", DataTable)
        await wait_until(pilot, lambda: table.row_count == 1, "the node to be listed")
        assert _cell(table, 0, "Host:port") == f"127.0.0.1:{app.port}"
        assert _cell(table, 0, "Last echo") == "never"

        await pilot.press("c")
        await wait_until(
            pilot, lambda: _cell(table, 0, "Last echo").startswith("ok"), "the echo result"
        )
        assert "ok in" in str(screen.query_one("#nodes-message", Static).render())
        stored = app.engine.node("self")
        assert stored.last_echo_ok is True

        # A second node with the same name is refused by the engine; the form says why.
        await pilot.press("a")
        form = app.screen
        assert isinstance(form, NodeFormScreen)
        for key, value in (("name", "self"), ("ae_title", "X"), ("host", "h"), ("port", "1")):
            form.query_one(f"#field-{key}", Input).value = value
        await pilot.press("ctrl+s")
        error_label = form.query_one("#form-error", Label)
        await wait_until(pilot, lambda: "exists" in str(error_label.render()), "the refusal")
        await pilot.press("escape")
        assert len(app.engine.nodes()) == 1


async def test_echo_of_an_unreachable_node_is_explained(settings: Settings) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        # A port nobody listens on (bound then closed, so it is free).
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        app.engine.add_node("gone", ae_title="GONE", host="127.0.0.1", port=closed_port)
        await pilot.press("5")
        screen = app.screen
        assert isinstance(screen, NodesScreen)
        table = screen.query_one("#nodes-table", DataTable)
        await wait_until(pilot, lambda: table.row_count == 1, "the node to be listed")
        await pilot.press("c")
        await wait_until(
            pilot, lambda: _cell(table, 0, "Last echo").startswith("FAILED"), "the echo result"
        )
        message = str(screen.query_one("#nodes-message", Static).render())
        assert "refused" in message
