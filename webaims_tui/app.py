"""WebaimsApp: owns the engine's lifetime and turns engine events into Textual messages."""

from __future__ import annotations

from textual import on, work
from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, RichLog

from webaims_tui import locations
from webaims_tui.config import Settings
from webaims_tui.engine.events import EngineEvent, ServerFailed, ServerStarted
from webaims_tui.engine.service import Engine
from webaims_tui.messages import EngineEventPosted


class WebaimsApp(App[None]):
    """The terminal UI around a running engine."""

    CSS_PATH = str(locations.stylesheet_path())
    TITLE = "webaims-tui"
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.engine = engine or Engine(settings, sink=self.engine_sink)

    def engine_sink(self, event: EngineEvent) -> None:
        # Called from pynetdicom and autoloader threads: post_message is the thread-safe path.
        self.post_message(EngineEventPosted(event))

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="receive-log", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        s = self.settings.server
        self.sub_title = f"{s.ae_title} @ {s.host}:{s.port}"
        self.start_engine()

    @work(thread=True, group="engine", exit_on_error=False)
    def start_engine(self) -> None:
        self.engine.start()

    @on(EngineEventPosted)
    def show_engine_event(self, message: EngineEventPosted) -> None:
        event = message.event
        if isinstance(event, ServerStarted):
            self.sub_title = f"{event.ae_title} @ {event.host}:{event.port} listening"
        elif isinstance(event, ServerFailed):
            self.sub_title = f"not listening: {event.reason}"
            self.notify(event.reason, title="DICOM server", severity="error")
        self.query_one("#receive-log", RichLog).write(type(event).__name__)

    async def action_quit(self) -> None:
        await self._stop_engine()
        self.exit()

    async def _stop_engine(self) -> None:
        import asyncio

        await asyncio.to_thread(self.engine.stop)


def make_app(settings: Settings) -> WebaimsApp:
    return WebaimsApp(settings)
