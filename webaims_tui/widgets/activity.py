"""The live activity model (a ring buffer fed by engine events) and the view that draws it.

Engine events arrive on the app's message queue at whatever rate the network delivers them (a
1,000-image study is 3,000 events in a few seconds). :class:`ActivityModel` absorbs each one in
O(1) and bumps a revision number; :class:`ActivityView` redraws from the model on a timer, and only
the lines on screen are ever formatted (the Line API), so the cost of a burst does not depend on
its size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from webaims_tui.engine.browse import human_size
from webaims_tui.engine.events import (
    ArchivingResumed,
    AssociationEnded,
    AssociationRejected,
    AssociationStarted,
    EngineError,
    EngineEvent,
    InstanceArchived,
    InstanceDuplicate,
    InstanceQuarantined,
    InstanceReceived,
    QueueDepth,
    ServerFailed,
    StoreFailed,
)
from webaims_tui.engine.scp import sop_class_name

#: Rows kept in the view's ring buffer; older ones fall off (the database keeps everything).
MAX_ENTRIES = 5_000
#: Instances remembered per association for its expanded view.
MAX_INSTANCES_PER_ASSOCIATION = 2_000
#: Seconds of throughput history behind the sparkline.
HISTORY_SECONDS = 300
#: Seconds over which images/s and MB/s are averaged.
RATE_WINDOW = 5

TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "Implicit LE",
    "1.2.840.10008.1.2.1": "Explicit LE",
    "1.2.840.10008.1.2.2": "Explicit BE",
    "1.2.840.10008.1.2.1.99": "Deflated LE",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}


def transfer_syntax_name(uid: str) -> str:
    return TRANSFER_SYNTAX_NAMES.get(uid, uid)


@dataclass
class InstanceLine:
    """One C-STORE of an association, shown when the association is expanded."""

    at: datetime
    sop_class: str
    transfer_syntax: str
    size: int
    status: str
    modality: str = ""


@dataclass(eq=False)
class AssociationEntry:
    association_id: int
    at: datetime
    calling_ae: str
    peer_address: str
    rejected_contexts: tuple[str, ...] = ()
    instances: int = 0
    failures: int = 0
    bytes: int = 0
    duration: float | None = None
    outcome: str = "receiving"
    expanded: bool = False
    received: deque[InstanceLine] = field(
        default_factory=lambda: deque(maxlen=MAX_INSTANCES_PER_ASSOCIATION)
    )

    @property
    def kind(self) -> str:
        return "association"

    def search_text(self) -> str:
        return " ".join(
            (self.calling_ae, self.peer_address, self.outcome, *self.rejected_contexts)
        ).lower()


@dataclass(eq=False)
class OutcomeEntry:
    """An autoloader outcome, a rejected association or an error: one line."""

    kind: str  # "archived", "duplicate", "quarantined", "rejected", "failed", "error", "resumed"
    at: datetime
    text: str
    calling_ae: str = ""
    #: Consecutive archives into the same record share one line (calm under a 1,000-image study).
    count: int = 1
    group: str = ""

    @property
    def outcome(self) -> str:
        return self.kind

    def search_text(self) -> str:
        return f"{self.kind} {self.calling_ae} {self.text}".lower()


Entry = AssociationEntry | OutcomeEntry


@dataclass(frozen=True)
class LogFilter:
    """``ae:NAME``, ``outcome:WORD`` and free words, all of which must match."""

    calling_ae: str = ""
    outcome: str = ""
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LogFilter:
        ae = outcome = ""
        words: list[str] = []
        for token in text.split():
            lowered = token.lower()
            if lowered.startswith("ae:"):
                ae = lowered[3:]
            elif lowered.startswith("outcome:"):
                outcome = lowered[8:]
            else:
                words.append(lowered)
        return cls(ae, outcome, tuple(words))

    @property
    def active(self) -> bool:
        return bool(self.calling_ae or self.outcome or self.words)

    def matches(self, entry: Entry) -> bool:
        if self.calling_ae and self.calling_ae not in entry.calling_ae.lower():
            return False
        if self.outcome and self.outcome not in entry.outcome.lower():
            return False
        text = entry.search_text()
        return all(word in text for word in self.words)


@dataclass
class Throughput:
    """Images and bytes per second over the last minutes, bucketed by whole second."""

    buckets: deque[tuple[int, int, int]] = field(
        default_factory=lambda: deque(maxlen=HISTORY_SECONDS)
    )

    def add(self, at: datetime, size: int) -> None:
        second = int(at.timestamp())
        if self.buckets and self.buckets[-1][0] == second:
            _, images, total = self.buckets[-1]
            self.buckets[-1] = (second, images + 1, total + size)
        else:
            self.buckets.append((second, 1, size))

    def rates(self, now: datetime) -> tuple[float, float]:
        """(images/s, bytes/s) averaged over the last RATE_WINDOW seconds."""
        end = int(now.timestamp())
        images = total = 0
        for second, count, size in reversed(self.buckets):
            if second <= end - RATE_WINDOW:
                break
            if second <= end:
                images += count
                total += size
        return images / RATE_WINDOW, total / RATE_WINDOW

    def history(self, now: datetime, seconds: int = 120) -> list[float]:
        """Images per second for each of the last ``seconds`` seconds (zeros included)."""
        end = int(now.timestamp())
        per_second = {second: count for second, count, _ in self.buckets}
        return [float(per_second.get(second, 0)) for second in range(end - seconds + 1, end + 1)]


class ActivityModel:
    """Everything the receive log shows, updated in O(1) per engine event."""

    def __init__(self, *, show_patient_data: bool = False) -> None:
        self.show_patient_data = show_patient_data
        self.entries: deque[Entry] = deque(maxlen=MAX_ENTRIES)
        self._open: dict[int, AssociationEntry] = {}
        #: SOP instance UID -> its line, so the autoloader's modality can be filled in later.
        self._pending: dict[str, InstanceLine] = {}
        self.throughput = Throughput()
        self.revision = 0
        self.received = 0
        self.received_bytes = 0
        self.archived = 0
        self.duplicates = 0
        self.quarantined = 0
        self.failures = 0
        self.rejected = 0
        self.queue_depth = 0

    @property
    def active_associations(self) -> int:
        return len(self._open)

    def add(self, event: EngineEvent) -> None:
        """Absorb one engine event (called on the UI thread, for every event)."""
        handler = self._HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)
            self.revision += 1

    def clear_view(self) -> None:
        """Forget the rows shown (the database keeps its log); counters stay."""
        self.entries.clear()
        self.revision += 1

    def _append(self, entry: Entry) -> None:
        self.entries.append(entry)

    def _started(self, event: AssociationStarted) -> None:
        entry = AssociationEntry(
            association_id=event.association_id,
            at=event.at,
            calling_ae=event.calling_ae,
            peer_address=event.peer_address,
            rejected_contexts=event.rejected_contexts,
        )
        self._open[event.association_id] = entry
        self._append(entry)

    def _entry_for(self, association_id: int, calling_ae: str, at: datetime) -> AssociationEntry:
        entry = self._open.get(association_id)
        if entry is None:
            # Events can arrive for an association started before the app was watching.
            entry = AssociationEntry(association_id, at, calling_ae, "")
            self._open[association_id] = entry
            self._append(entry)
        return entry

    def _received(self, event: InstanceReceived) -> None:
        entry = self._entry_for(event.association_id, event.calling_ae, event.at)
        entry.instances += 1
        entry.bytes += event.size
        line = InstanceLine(
            at=event.at,
            sop_class=sop_class_name(event.sop_class_uid),
            transfer_syntax=transfer_syntax_name(event.transfer_syntax_uid),
            size=event.size,
            status="received",
        )
        entry.received.append(line)
        if len(self._pending) > MAX_INSTANCES_PER_ASSOCIATION * 4:
            self._pending.clear()  # bounded: a late modality is a nicety, memory is not
        self._pending[event.sop_instance_uid] = line
        self.received += 1
        self.received_bytes += event.size
        self.throughput.add(event.at, event.size)

    def _store_failed(self, event: StoreFailed) -> None:
        entry = self._entry_for(event.association_id, event.calling_ae, event.at)
        entry.failures += 1
        entry.received.append(
            InstanceLine(event.at, "", "", 0, f"failed 0x{event.status:04X}: {event.reason}")
        )
        self.failures += 1

    def _ended(self, event: AssociationEnded) -> None:
        entry = self._open.pop(event.association_id, None)
        if entry is None:
            entry = AssociationEntry(
                event.association_id, event.at, event.calling_ae, event.peer_address
            )
            self._append(entry)
        entry.instances = event.instances
        entry.failures = event.failures
        entry.bytes = event.bytes
        entry.duration = event.duration
        entry.outcome = event.outcome
        entry.peer_address = entry.peer_address or event.peer_address

    def _rejected(self, event: AssociationRejected) -> None:
        self.rejected += 1
        self._append(
            OutcomeEntry(
                "rejected",
                event.at,
                f"association from {event.peer_address} to {event.called_ae}: {event.reason}",
                calling_ae=event.calling_ae,
            )
        )

    def _archived(self, event: InstanceArchived) -> None:
        self.archived += 1
        line = self._pending.pop(event.sop_instance_uid, None)
        if line is not None:
            line.modality = event.modality
            line.status = "archived"
        group = f"archived {event.record_key}"
        last = self.entries[-1] if self.entries else None
        if isinstance(last, OutcomeEntry) and last.group == group:
            last.count += 1
            last.at = event.at
            last.text = self._archived_text(event, last.count, last.text.endswith("(new)"))
            return
        text = self._archived_text(event, 1, event.record_created)
        self._append(OutcomeEntry("archived", event.at, text, group=group))

    def _archived_text(self, event: InstanceArchived, count: int, created: bool) -> str:
        noun = "instance" if count == 1 else "instances"
        who = ""
        if self.show_patient_data and (event.patient_id or event.patient_name):
            who = f" patient {event.patient_id} {event.patient_name}".rstrip()
        modality = f" {event.modality}" if event.modality else ""
        new = " (new)" if created else ""
        return f"{count} {noun}{modality} into record {event.record_key}{who}{new}"

    def _duplicate(self, event: InstanceDuplicate) -> None:
        self.duplicates += 1
        line = self._pending.pop(event.sop_instance_uid, None)
        if line is not None:
            line.status = f"duplicate: {event.action}"
        self._append(
            OutcomeEntry("duplicate", event.at, f"{event.sop_instance_uid}: {event.action}")
        )

    def _quarantined(self, event: InstanceQuarantined) -> None:
        self.quarantined += 1
        detail = f" ({event.detail})" if event.detail else ""
        self._append(
            OutcomeEntry("quarantined", event.at, f"{event.file_name}: {event.reason}{detail}")
        )

    def _queue(self, event: QueueDepth) -> None:
        self.queue_depth = event.waiting

    def _error(self, event: EngineError) -> None:
        self._append(OutcomeEntry("error", event.at, f"{event.where}: {event.message}"))

    def _server_failed(self, event: ServerFailed) -> None:
        # The header says NOT LISTENING; the log keeps the reason with its time.
        self._append(OutcomeEntry("error", event.at, f"server: {event.reason}"))

    def _resumed(self, event: ArchivingResumed) -> None:
        self._append(OutcomeEntry("resumed", event.at, f"{event.where}: {event.message}"))

    _HANDLERS: dict[type, Callable[[ActivityModel, EngineEvent], None]] = {
        AssociationStarted: _started,  # type: ignore[dict-item]
        InstanceReceived: _received,  # type: ignore[dict-item]
        StoreFailed: _store_failed,  # type: ignore[dict-item]
        AssociationEnded: _ended,  # type: ignore[dict-item]
        AssociationRejected: _rejected,  # type: ignore[dict-item]
        InstanceArchived: _archived,  # type: ignore[dict-item]
        InstanceDuplicate: _duplicate,  # type: ignore[dict-item]
        InstanceQuarantined: _quarantined,  # type: ignore[dict-item]
        QueueDepth: _queue,  # type: ignore[dict-item]
        EngineError: _error,  # type: ignore[dict-item]
        ArchivingResumed: _resumed,  # type: ignore[dict-item]
        ServerFailed: _server_failed,  # type: ignore[dict-item]
    }


# --- the view -----------------------------------------------------------------------------------

OUTCOME_STYLE = {
    "released": "activity--ok",
    "archived": "activity--ok",
    "receiving": "activity--busy",
    "duplicate": "activity--warning",
    "aborted": "activity--error",
    "connection closed": "activity--warning",
    "quarantined": "activity--error",
    "rejected": "activity--error",
    "failed": "activity--error",
    "error": "activity--error",
    "resumed": "activity--ok",
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def association_cells(entry: AssociationEntry) -> list[tuple[str, str]]:
    """(text, component class) pieces of an association line, in column order."""
    marker = "▾" if entry.expanded else "▸"
    rejected = f" rejected: {', '.join(entry.rejected_contexts)}" if entry.rejected_contexts else ""
    failures = f" {entry.failures} failed" if entry.failures else ""
    return [
        (f"{marker} {entry.at:%H:%M:%S} ", "activity--dim"),
        (f"{entry.calling_ae:<16} ", "activity--ae"),
        (f"{entry.peer_address:<15} ", ""),
        (f"{entry.instances:>6} img ", ""),
        (f"{human_size(entry.bytes):>9} ", ""),
        (f"{_duration(entry.duration):>6} ", "activity--dim"),
        (entry.outcome, OUTCOME_STYLE.get(entry.outcome, "")),
        (failures, "activity--error"),
        (rejected, "activity--warning"),
    ]


def outcome_cells(entry: OutcomeEntry) -> list[tuple[str, str]]:
    return [
        (f"  {entry.at:%H:%M:%S} ", "activity--dim"),
        (f"{entry.kind:<12}", OUTCOME_STYLE.get(entry.kind, "")),
        (f"{entry.calling_ae} " if entry.calling_ae else "", "activity--ae"),
        (entry.text, ""),
    ]


def instance_cells(line: InstanceLine) -> list[tuple[str, str]]:
    status_style = "activity--error" if line.status.startswith("failed") else "activity--dim"
    return [
        (f"      {line.at:%H:%M:%S} ", "activity--dim"),
        (f"{line.sop_class[:34]:<34} ", ""),
        (f"{line.modality:<3} ", "activity--ae"),
        (f"{line.transfer_syntax[:18]:<18} ", "activity--dim"),
        (f"{human_size(line.size):>9} " if line.size else " " * 10, ""),
        (line.status, status_style),
    ]


class ActivityView(ScrollView, can_focus=True):
    """Draws the model's entries; follows the tail unless the cursor was moved up."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(0)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
        Binding("enter,space", "expand", "Expand"),
    ]

    COMPONENT_CLASSES = {
        "activity--cursor",
        "activity--dim",
        "activity--ae",
        "activity--ok",
        "activity--busy",
        "activity--warning",
        "activity--error",
    }

    class Toggled(Message):
        """An association was expanded or collapsed."""

        def __init__(self, entry: AssociationEntry) -> None:
            super().__init__()
            self.entry = entry

    def __init__(self, model: ActivityModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.filter = LogFilter()
        #: (entry, index of an instance line or -1 for the entry's own line)
        self._lines: list[tuple[Entry, int]] = []
        self._seen_revision = -1
        self.cursor = 0
        self.following = True

    # --- rebuilding ---------------------------------------------------------------------------

    def sync(self, *, force: bool = False) -> None:
        """Rebuild the line index if the model changed (called on the log's timer)."""
        if not force and self.model.revision == self._seen_revision:
            return
        self._seen_revision = self.model.revision
        # Following: the cursor was on the last line and the wheel has not scrolled the view up.
        was_following = self.following and self.cursor >= len(self._lines) - 1
        self._lines = list(self._build(self.model.entries))
        # No horizontal scrolling (overflow-x is hidden): a long line is cut at the edge.
        self.virtual_size = Size(self.scrollable_content_region.width, len(self._lines))
        if was_following:
            self.cursor = max(len(self._lines) - 1, 0)
            # force: the scrollbar only appears at the next layout, and until then Textual
            # refuses to scroll a widget that does not show one.
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)
        else:
            self.cursor = min(self.cursor, max(len(self._lines) - 1, 0))
        self.refresh()

    def _build(self, entries: Iterable[Entry]) -> Iterable[tuple[Entry, int]]:
        check = self.filter.matches if self.filter.active else None
        for entry in entries:
            if check is not None and not check(entry):
                continue
            yield entry, -1
            if isinstance(entry, AssociationEntry) and entry.expanded:
                for index in range(len(entry.received)):
                    yield entry, index

    def set_filter(self, text: str) -> None:
        self.filter = LogFilter.parse(text)
        self.following = True
        self.sync(force=True)

    @property
    def line_count(self) -> int:
        return len(self._lines)

    @property
    def current(self) -> Entry | None:
        if 0 <= self.cursor < len(self._lines):
            return self._lines[self.cursor][0]
        return None

    def line_text(self, index: int) -> str:
        """The plain text of line ``index`` of the current view (what a test or a copy needs)."""
        entry, sub = self._lines[index]
        if sub >= 0 and isinstance(entry, AssociationEntry):
            cells = instance_cells(entry.received[sub])
        elif isinstance(entry, AssociationEntry):
            cells = association_cells(entry)
        else:
            cells = outcome_cells(entry)
        return "".join(piece for piece, _ in cells)

    # --- drawing ------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        base = self.rich_style
        if index >= len(self._lines):
            return Strip.blank(width, base)
        entry, sub = self._lines[index]
        if sub >= 0 and isinstance(entry, AssociationEntry):
            try:
                cells = instance_cells(entry.received[sub])
            except IndexError:  # the deque rotated since the index was built
                cells = [("", "")]
        elif isinstance(entry, AssociationEntry):
            cells = association_cells(entry)
        else:
            cells = outcome_cells(entry)
        text = Text(no_wrap=True, overflow="ellipsis")
        for piece, component in cells:
            style = self.get_component_rich_style(component, partial=True) if component else None
            text.append(piece, style or Style())
        if index == self.cursor and self.has_focus:
            text.stylize(self.get_component_rich_style("activity--cursor", partial=True))
        strip = Strip(list(text.render(self.app.console))).apply_style(base)
        strip = strip.extend_cell_length(scroll_x + width, base)
        return strip.crop(scroll_x, scroll_x + width)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # --- keys ---------------------------------------------------------------------------------

    def _move_to(self, index: int) -> None:
        last = max(len(self._lines) - 1, 0)
        self.cursor = max(0, min(index, last))
        self.following = self.cursor >= last
        if self.cursor < self.scroll_y:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= self.scroll_y + self.size.height:
            self.scroll_to(y=self.cursor - self.size.height + 1, animate=False, immediate=True)
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        self._move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move_to(self.cursor + direction * max(self.size.height - 1, 1))

    def action_edge(self, end: int) -> None:
        self._move_to(len(self._lines) if end else 0)

    def action_expand(self) -> None:
        entry = self.current
        if not isinstance(entry, AssociationEntry):
            return
        entry.expanded = not entry.expanded
        # Keep the cursor on the association's own line.
        while self.cursor > 0 and self._lines[self.cursor][1] >= 0:
            self.cursor -= 1
        self.following = False
        self.sync(force=True)
        self.post_message(self.Toggled(entry))

    def on_mouse_scroll_up(self) -> None:
        self.following = False  # the user looks back: stop jumping to new lines

    def on_mouse_scroll_down(self) -> None:
        if self.scroll_y >= self.max_scroll_y - 1:
            self._move_to(len(self._lines))  # back at the bottom: follow again

    def on_click(self, event: object) -> None:
        offset = getattr(event, "y", None)
        if isinstance(offset, int):
            self._move_to(self.scroll_offset.y + offset)
