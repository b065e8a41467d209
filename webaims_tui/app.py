"""WebaimsApp: owns the engine's lifetime and turns engine events into Textual messages.

The engine runs in-process. Its ``sink`` is called from pynetdicom and autoloader threads, so the
app implements it as ``post_message`` (the one thread-safe Textual call). Each event is absorbed
by :class:`~webaims_tui.widgets.activity.ActivityModel` in O(1); the screens redraw from that
model on a timer (:data:`TICK_HZ`), never once per event, which keeps a 1,000-image burst from
flooding the event loop.

Main screens are app modes, one key each (:data:`MODES_TABLE`); issue 7's query/retrieve,
rules and nodes screens slot in by adding rows there.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing.resource_tracker
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from textual import on, work
from textual.app import App, ScreenStackError, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from webaims_tui import locations
from webaims_tui.config import Settings
from webaims_tui.engine.events import (
    ArchivingResumed,
    EchoFinished,
    EngineError,
    EngineEvent,
    RetrieveFinished,
    RetrieveProgress,
    RetrieveStarted,
    ServerFailed,
    ServerStarted,
    ServerStopped,
)
from webaims_tui.engine.service import Engine
from webaims_tui.messages import EngineEventPosted, EngineEventsWaiting, EngineReady
from webaims_tui.screens.browser import BrowserScreen
from webaims_tui.screens.dialogs import ConfirmScreen, HelpScreen
from webaims_tui.screens.nodes import NodesScreen
from webaims_tui.screens.query import QueryScreen
from webaims_tui.screens.receive_log import ReceiveLogScreen
from webaims_tui.screens.rules import RulesScreen
from webaims_tui.screens.settings import SettingsScreen
from webaims_tui.widgets.activity import ActivityModel
from webaims_tui.widgets.status_header import ServerStatus, StatusHeader

#: Redraws per second of the log and header: often enough to feel live, rare enough to be cheap.
TICK_HZ = 8
#: Events absorbed between yields to the event loop while draining a burst.
DRAIN_SLICE = 200
#: Seconds between free-disk checks (a statvfs call, in a thread).
DISK_CHECK_SECONDS = 5.0
#: Engine events forwarded to screens with an ``engine_event(event)`` method.
QR_EVENTS = (RetrieveStarted, RetrieveProgress, RetrieveFinished, EchoFinished)


@dataclass(frozen=True)
class ModeEntry:
    name: str
    keys: str
    title: str
    description: str
    screen: Callable[[], Screen[None]]


#: The app's main screens. Issue 7 adds query ("3"), rules ("4") and nodes/settings ("5") here.
MODES_TABLE: tuple[ModeEntry, ...] = (
    ModeEntry(
        "log",
        "1,l",
        "Log",
        "Live receive log: associations and autoloader outcomes",
        ReceiveLogScreen,
    ),
    ModeEntry(
        "browser", "2,b", "Browse", "Browse patients, studies, series and instances", BrowserScreen
    ),
    ModeEntry(
        "query",
        "3",
        "Query",
        "Query a remote PACS and retrieve studies into the archive",
        QueryScreen,
    ),
    ModeEntry("rules", "4", "Rules", "Edit, preview and activate anonymization rules", RulesScreen),
    ModeEntry("nodes", "5", "Nodes", "Remote nodes (PACS): add, edit, remove, echo", NodesScreen),
    ModeEntry(
        "settings",
        "6",
        "Settings",
        "Effective settings, their sources, live changes",
        SettingsScreen,
    ),
)


class WebaimsApp(App[None]):
    """The terminal UI around a running engine."""

    CSS_PATH = str(locations.stylesheet_path())
    TITLE = "webaims-tui"
    MODES = {entry.name: entry.screen for entry in MODES_TABLE}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        *(
            # Not in the footer (it keeps the screen's own keys); ? and the palette list them.
            Binding(entry.keys, f"switch_mode('{entry.name}')", entry.title, show=False)
            for entry in MODES_TABLE
        ),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        *,
        clock: Callable[[], datetime] = datetime.now,
        disk_free: Callable[[Path], int] | None = None,
        start_server: bool = True,
    ) -> None:
        """``clock``, ``disk_free`` and ``start_server=False`` make snapshots deterministic."""
        super().__init__()
        # The autoloader's process pool spawns workers through multiprocessing's resource
        # tracker, which hands the child sys.stderr's descriptor. While Textual runs, stderr is
        # its capture object (no real descriptor) and the spawn fails: start the tracker now.
        multiprocessing.resource_tracker.ensure_running()
        self.settings = settings
        self.engine = engine or Engine(settings, sink=self.engine_sink)
        if engine is not None:
            engine.sink = self.engine_sink
        self.clock = clock
        self._disk_free = disk_free or _disk_free
        self.start_server = start_server
        self.activity = ActivityModel(show_patient_data=settings.display.show_patient_data)
        self.engine_ready = False
        self.listening = False
        self.server_error = ""
        self.port = settings.server.port
        self.free_disk_bytes: int | None = None
        self._quarantine_at_start = 0
        self._stopped = False
        self._inbox: deque[EngineEvent] = deque()
        self._wakeup_posted = False

    # --- engine -------------------------------------------------------------------------------

    def engine_sink(self, event: EngineEvent) -> None:
        """Called from pynetdicom and autoloader threads; never blocks.

        deque.append is atomic, and post_message is the thread-safe path into the app. Only
        the first event of a burst posts a message: the handler then drains everything that
        arrived meanwhile, so 3,000 events cost a handful of messages, not 3,000.
        """
        self._inbox.append(event)
        if not self._wakeup_posted:
            self._wakeup_posted = True
            self.post_message(EngineEventsWaiting())

    def on_mount(self) -> None:
        self.switch_mode("log")
        self.set_interval(1 / TICK_HZ, self.tick, name="redraw")
        self.set_interval(DISK_CHECK_SECONDS, self.check_disk, name="disk")
        self.check_disk()
        self.start_engine()

    @work(thread=True, group="engine", exit_on_error=False, name="engine start")
    def start_engine(self) -> None:
        if self.start_server:
            self.engine.start()
        else:
            self.engine.open()
        stats = self.engine.stats()
        self.post_message(EngineReady(quarantined=stats.quarantined, incoming=stats.incoming))

    @on(EngineReady)
    def engine_is_ready(self, message: EngineReady) -> None:
        self.engine_ready = True
        # Everything alive now (Textual, pydicom's dictionaries, pynetdicom, the engine) lives
        # as long as the app: keep it out of full collections, which otherwise scan it all and
        # stall the event loop (measured: 180 ms per gen-2 collection during a burst).
        gc.freeze()
        self._quarantine_at_start = message.quarantined
        self.activity.queue_depth = max(self.activity.queue_depth, message.incoming)
        for screen in self._mode_screens():
            refresh = getattr(screen, "engine_ready", None)
            if callable(refresh):
                refresh()

    @on(EngineEventsWaiting)
    async def drain_engine_events(self) -> None:
        # Cleared before draining: an event appended meanwhile posts a new wake-up (at worst a
        # spare one), never none.
        self._wakeup_posted = False
        inbox = self._inbox
        handled = 0
        while inbox:
            self.absorb_engine_event(inbox.popleft())
            handled += 1
            if handled % DRAIN_SLICE == 0:
                await asyncio.sleep(0)  # let input and timers run inside a long burst

    @on(EngineEventPosted)
    def absorb_posted_event(self, message: EngineEventPosted) -> None:
        self.absorb_engine_event(message.event)

    def absorb_engine_event(self, event: EngineEvent) -> None:
        """One engine event into the models (O(1)); the timer redraws."""
        self.activity.add(event)
        if isinstance(event, ServerStarted):
            self.listening = True
            self.server_error = ""
            self.port = event.port
        elif isinstance(event, ServerFailed):
            self.listening = False
            self.server_error = event.reason
            self.notify(event.reason, title="DICOM server", severity="error", timeout=15)
        elif isinstance(event, ServerStopped):
            self.listening = False
        elif isinstance(event, EngineError):
            self.notify(event.message, title=event.where, severity="error")
        elif isinstance(event, ArchivingResumed):
            self.notify(event.message, title=event.where, severity="information")
        if isinstance(event, QR_EVENTS):
            # Retrieve progress and echo results belong to the screens that started them.
            for screen in self._mode_screens():
                forward = getattr(screen, "engine_event", None)
                if callable(forward):
                    forward(event)

    def check_disk(self) -> None:
        self.run_worker(
            self._measure_disk, thread=True, group="disk", exit_on_error=False, name="free disk"
        )

    def _measure_disk(self) -> None:
        free = self._disk_free(self.settings.paths.archive)
        self.call_from_thread(setattr, self, "free_disk_bytes", free)

    @property
    def disk_low(self) -> bool:
        threshold = self.settings.display.free_disk_warning_mb * 1024 * 1024
        return self.free_disk_bytes is not None and self.free_disk_bytes < threshold

    @property
    def quarantine_count(self) -> int:
        return self._quarantine_at_start + self.activity.quarantined

    # --- redraw -------------------------------------------------------------------------------

    def status(self) -> ServerStatus:
        s = self.settings.server
        return ServerStatus(
            ae_title=s.ae_title,
            host=s.host,
            port=self.port,
            listening=self.listening,
            error=self.server_error,
            active_associations=self.activity.active_associations,
            received=self.activity.received,
            archived=self.activity.archived,
            quarantined=self.quarantine_count,
            failures=self.activity.failures,
            screen_title=str(getattr(self.screen, "TITLE", "") or ""),
        )

    def tick(self) -> None:
        """Redraw what the current screen shows from the models (the timer's callback)."""
        try:
            screen = self.screen
        except ScreenStackError:
            return  # shutting down: Textual empties the stack before the timer stops
        status = self.status()
        for header in screen.query(StatusHeader):
            header.show(status)
        refresh = getattr(screen, "tick", None)
        if callable(refresh):
            refresh()

    def _mode_screens(self) -> Iterable[Screen[object]]:
        for stack in self._screen_stacks.values():
            yield from stack

    # --- errors -------------------------------------------------------------------------------

    @on(Worker.StateChanged)
    def report_worker_failure(self, event: Worker.StateChanged) -> None:
        """The one place worker errors become visible: a notification, never a crash."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        what = event.worker.name or event.worker.group
        self.notify(f"{error}", title=f"{what} failed", severity="error", timeout=10)

    # --- commands -----------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        for entry in MODES_TABLE:
            keys = entry.keys.split(",")[0]
            yield SystemCommand(
                f"{entry.title} ({keys})",
                entry.description,
                lambda name=entry.name: self.switch_mode(name),
            )
        yield SystemCommand("Help (?)", "Keys and help for this screen", self.action_help)
        yield from super().get_system_commands(screen)

    def action_help(self) -> None:
        screen = self.screen
        if isinstance(screen, HelpScreen):
            return
        text = getattr(screen, "HELP", None) or "No help for this screen."
        self.push_screen(HelpScreen(screen, text))

    async def action_quit(self) -> None:
        engine_server = self.engine.server
        busy = engine_server.active_associations if engine_server is not None else 0
        if busy:
            noun = "association is" if busy == 1 else "associations are"
            question = (
                f"{busy} {noun} still receiving.\n"
                "Quit anyway? The server stops accepting, waits up to 10 s for them to finish, "
                "then aborts them (senders will resend what was not acknowledged)."
            )
            self.push_screen(ConfirmScreen(question, yes="Quit", danger=True), self._quit_if)
            return
        await self.shut_down()

    async def _quit_if(self, confirmed: bool | None) -> None:
        if confirmed:
            await self.shut_down()

    async def shut_down(self) -> None:
        """Stop the engine (in a thread: it waits for associations) and exit."""
        if not self._stopped:
            self._stopped = True
            self.notify("Stopping the DICOM server…", timeout=30)
            await asyncio.to_thread(self.engine.stop)
        self.exit()

    async def on_unmount(self) -> None:
        # Whatever ended the app (an exception, ctrl+c), the server must not outlive it.
        if not self._stopped:
            self._stopped = True
            await asyncio.to_thread(self.engine.stop)


def _disk_free(path: Path) -> int:
    # Before the engine has made the folders (first start), the nearest existing one is on the
    # same file system as far as anyone can know.
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def make_app(settings: Settings) -> WebaimsApp:
    """The app as ``webaims-tui`` runs it: engine started, log records to a rotating file."""
    from webaims_tui.logs import configure_logging

    # No stream handler while the TUI owns the terminal: records go to the log file only.
    configure_logging(settings.paths.logs, to_stdout=False)
    return WebaimsApp(settings)
