"""App-wide Textual messages."""

from __future__ import annotations

from textual.message import Message

from webaims_tui.engine.events import EngineEvent


class EngineEventPosted(Message):
    """An engine event, carried from an engine thread onto the app's message queue."""

    def __init__(self, event: EngineEvent) -> None:
        super().__init__()
        self.event = event
