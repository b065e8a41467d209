"""The live receive log: associations as they happen, autoloader outcomes, throughput."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Input, Sparkline, Static

from webaims_tui.engine.browse import human_size
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.widgets.activity import ActivityView
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    pass


class ReceiveLogScreen(WebaimsScreen):
    """Mode ``log``: one line per association (expandable), one per autoloader outcome."""

    TITLE = "Receive log"
    HELP = """\
[b]Receive log[/b]
One line per association: time, calling AE, peer, instances, bytes, duration, outcome and any
rejected presentation contexts. Enter expands an association to its instances. Archived,
duplicate and quarantined files get their own lines (consecutive archives into one record
share a line). The view follows new lines unless you move the cursor up.
Filter syntax: [b]ae:NAME outcome:WORD text[/b] (all must match).
Patient data is hidden unless [b]display.show_patient_data[/b] is set."""

    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("slash", "filter", "Filter"),
        Binding("c", "clear", "Clear view"),
        Binding("escape", "unfilter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        with Horizontal(id="throughput-bar"):
            yield Static("", id="throughput")
            yield Sparkline([], id="sparkline")
        yield Input(
            placeholder="filter: ae:NAME outcome:WORD text  (enter applies, esc clears)",
            id="log-filter",
        )
        yield ActivityView(self.webaims.activity, id="activity")
        yield Static("", id="log-state")
        yield Footer()

    def on_mount(self) -> None:
        log_filter = self.query_one("#log-filter", Input)
        log_filter.display = False
        if self.app.is_headless:
            log_filter.cursor_blink = False
        self.query_one(ActivityView).focus()
        self.tick()

    # --- refresh (driven by the app's timer) --------------------------------------------------

    def tick(self) -> None:
        app = self.webaims
        view = self.query_one(ActivityView)
        if not self.paused:
            view.sync()
        now = app.clock()
        images, rate = app.activity.throughput.rates(now)
        throughput = Text(no_wrap=True, overflow="ellipsis")
        throughput.append(f"{images:6.1f} img/s {rate / 1e6:6.2f} MB/s", style="bold")
        throughput.append(f" │ queue {app.activity.queue_depth:,}")
        quarantined = app.quarantine_count
        throughput.append(" │ ")
        throughput.append(f"quarantine {quarantined:,}", style="bold red" if quarantined else "")
        throughput.append(" │ ")
        free = app.free_disk_bytes
        if free is None:
            throughput.append("disk …")
        else:
            low = free < app.settings.display.free_disk_warning_mb * 1024 * 1024
            throughput.append(f"{human_size(free)} free", style="bold red reverse" if low else "")
        self.query_one("#throughput", Static).update(throughput)
        self.set_class(app.disk_low, "-disk-low")
        sparkline = self.query_one("#sparkline", Sparkline)
        history = app.activity.throughput.history(now, seconds=120)
        if list(sparkline.data or []) != history:
            sparkline.data = history
        state = []
        if self.paused:
            state.append("PAUSED (p resumes)")
        elif view.following:
            state.append("following")
        else:
            state.append("scrolled (end follows)")
        if view.filter.active:
            state.append(f"filter: {self.query_one('#log-filter', Input).value}")
        state.append(f"{view.line_count:,} lines")
        self.query_one("#log-state", Static).update(" · ".join(state))

    # --- actions ------------------------------------------------------------------------------

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.set_class(self.paused, "-paused")
        if not self.paused:
            self.query_one(ActivityView).sync(force=True)
        self.tick()

    def action_filter(self) -> None:
        box = self.query_one("#log-filter", Input)
        box.display = True
        box.focus()

    @on(Input.Submitted, "#log-filter")
    def apply_filter(self, event: Input.Submitted) -> None:
        view = self.query_one(ActivityView)
        view.set_filter(event.value)
        if not event.value.strip():
            event.input.display = False
        view.focus()
        self.tick()

    def action_unfilter(self) -> None:
        box = self.query_one("#log-filter", Input)
        box.value = ""
        box.display = False
        view = self.query_one(ActivityView)
        view.set_filter("")
        view.focus()
        self.tick()

    def action_clear(self) -> None:
        self.webaims.activity.clear_view()
        self.query_one(ActivityView).sync(force=True)
        self.tick()
