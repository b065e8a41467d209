"""The one-line header every screen shows: who we are, whether we listen, live counters."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of what the header shows; the app builds a new one on each tick."""

    ae_title: str
    host: str
    port: int
    listening: bool = False
    error: str = ""
    active_associations: int = 0
    received: int = 0
    archived: int = 0
    quarantined: int = 0
    failures: int = 0
    screen_title: str = ""


class StatusHeader(Static):
    """Shows a :class:`ServerStatus`; toggles ``-listening``/``-failed`` for the stylesheet."""

    DEFAULT_CSS = """
    StatusHeader {
        dock: top;
        height: 1;
        background: $panel;
        color: $foreground;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    StatusHeader.-failed {
        background: $error 40%;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._shown: ServerStatus | None = None

    def show(self, status: ServerStatus) -> None:
        if status == self._shown:
            return  # called on every tick: redraw only when something changed
        self._shown = status
        self.set_class(status.listening, "-listening")
        self.set_class(bool(status.error), "-failed")
        self.update(self.render_status(status))

    @staticmethod
    def render_status(status: ServerStatus) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {status.ae_title} ", style="bold")
        text.append(f"{status.host}:{status.port} ")
        if status.error:
            text.append(f"NOT LISTENING: {status.error}", style="bold")
        elif status.listening:
            text.append("● listening", style="bold green")
        else:
            text.append("○ starting", style="yellow")
        if not status.error:
            text.append(f" │ {status.active_associations} assoc", style="")
            text.append(f" │ {status.received:,} recv")
            text.append(f" │ {status.archived:,} arch")
            quarantine_style = "bold red" if status.quarantined else ""
            text.append(" │ ")
            text.append(f"{status.quarantined:,} quar", style=quarantine_style)
            if status.failures:
                text.append(" │ ")
                text.append(f"{status.failures:,} failed", style="bold red")
        if status.screen_title:
            text.append(f" │ {status.screen_title}", style="italic")
        return text
