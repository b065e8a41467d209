"""What every main screen shares: typed access to the app, and worker failures made visible."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on
from textual.screen import Screen
from textual.worker import Worker

if TYPE_CHECKING:
    from webaims_tui.app import WebaimsApp


class WebaimsScreen(Screen[None]):
    """Base of the app's screens."""

    @property
    def webaims(self) -> WebaimsApp:
        from webaims_tui.app import WebaimsApp

        assert isinstance(self.app, WebaimsApp)
        return self.app

    @on(Worker.StateChanged)
    def hand_worker_state_to_app(self, event: Worker.StateChanged) -> None:
        # Worker.StateChanged does not bubble: hand it to the app's one error handler.
        self.webaims.report_worker_failure(event)
