"""App-wide Textual messages."""

from __future__ import annotations

from textual.message import Message

from webaims_tui.engine.events import EngineEvent


class EngineEventPosted(Message):
    """An engine event, carried from an engine thread onto the app's message queue."""

    def __init__(self, event: EngineEvent) -> None:
        super().__init__()
        self.event = event


class EngineEventsWaiting(Message):
    """Engine events are waiting in the app's inbox; one of these stands for a whole burst."""


class EngineReady(Message):
    """The engine opened its database (and started its server): screens may query it now."""

    def __init__(self, *, quarantined: int, incoming: int) -> None:
        super().__init__()
        self.quarantined = quarantined
        self.incoming = incoming
