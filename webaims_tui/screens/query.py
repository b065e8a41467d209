"""Mode ``query``: find studies on a remote PACS and retrieve them into the archive.

Every network call runs in a thread worker; the screen never blocks. Retrieves queue and run one
at a time (a PACS serves one C-MOVE per association well, and one at a time keeps progress
events attributable to their job: the engine's ``RetrieveStarted`` carries no job of ours, so the
running job claims the next one). Progress arrives as engine events through the app's sink ->
message path and the app forwards query/retrieve events to :meth:`QueryScreen.engine_event`.

Workers catch the failures they expect (QRFailure: the network or the PACS said no); anything
else ends the worker, and :meth:`QueryScreen.recover_from_worker_failure` leaves the busy state
and says what to do next, so the screen stays usable whatever went wrong.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Literal, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Label, ProgressBar, Select, Static
from textual.worker import Worker, WorkerState

from webaims_tui.engine import qr
from webaims_tui.engine.events import (
    EchoFinished,
    EngineEvent,
    RetrieveFinished,
    RetrieveProgress,
    RetrieveStarted,
)
from webaims_tui.engine.nodes import NodeError
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from webaims_tui.engine import db

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]

#: What to do next, by failure kind: the message from the engine says what happened.
NEXT_STEP: dict[str, str] = {
    "refused": "Check that the PACS runs and the node's host and port (Nodes, 5).",
    "unreachable": "Check the host name / network route; then echo again (ctrl+e).",
    "timeout": "The PACS did not answer in time: retry, or raise the node's timeouts.",
    "rejected": "Ask the PACS admin to add our AE title, or fix the node's AE title.",
    "aborted": "The PACS closed the connection: check its log, then retry.",
    "context-not-accepted": "Switch the node's query model or retrieve method (Nodes, 5).",
    "tls": "Check the node's TLS certificate files and the PACS's TLS port.",
    "failed": "The PACS answered with a failure status; see its log.",
    "node": "The node was removed or renamed meanwhile (CLI or another window): pick one from "
    "the list, or add it again on the Nodes screen (5).",
    "unexpected": "An unexpected error (traceback in webaims-tui.log): retry; if it happens "
    "again, report it with the log.",
}

#: Quick date choices: label -> days back (None = any date).
DATE_CHOICES: dict[str, int | None] = {"today": 0, "7d": 6, "30d": 29, "any": None}
#: Studies listed at IMAGE level (a C-FIND and its C-ECHO each) to mark their archive state, at
#: most: after a query those the PACS gave no instance count for, after a retrieve its studies.
MAX_STATUS_CHECKS = 50
#: Sortable columns (key of ResultEntry.sort_value), in the order "s" cycles through them.
SORT_KEYS = ("date", "patient", "id", "modality", "description", "images")


@dataclass
class ResultEntry:
    """One table row: a remote study/patient/series/instance, with our selection and state."""

    row: qr.Row
    depth: int = 0  # 1 for series rows under an expanded study
    selected: bool = False
    expanded: bool = False
    archive: str = ""  # "in archive", "partial: 12/300", "missing" or "" (not checked)
    children: list[ResultEntry] = field(default_factory=list)

    @property
    def key(self) -> str:
        row = self.row
        if isinstance(row, qr.PatientRow):
            return f"patient:{row.patient_id}"
        if isinstance(row, qr.StudyRow):
            return f"study:{row.study_instance_uid}"
        if isinstance(row, qr.SeriesRow):
            return f"series:{row.series_instance_uid}"
        return f"image:{row.sop_instance_uid}"

    def sort_value(self, column: str) -> str | int:
        row = self.row
        if column == "images":
            return getattr(row, "instances", None) or 0
        values = {
            "date": getattr(row, "study_date", ""),
            "patient": getattr(row, "patient_name", ""),
            "id": row.patient_id,
            "modality": "\\".join(getattr(row, "modalities", ())) or getattr(row, "modality", ""),
            "description": getattr(row, "description", ""),
        }
        return str(values.get(column, ""))

    def target(self) -> qr.RetrieveTarget:
        row = self.row
        if isinstance(row, qr.PatientRow):
            return qr.RetrieveTarget(patient_id=row.patient_id)
        if isinstance(row, qr.StudyRow):
            return qr.RetrieveTarget(
                patient_id=row.patient_id, study_instance_uid=row.study_instance_uid
            )
        if isinstance(row, qr.SeriesRow):
            return qr.RetrieveTarget(
                patient_id=row.patient_id,
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
            )
        return qr.RetrieveTarget(
            patient_id=row.patient_id,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            sop_instance_uids=(row.sop_instance_uid,),
        )

    def label(self) -> str:
        """How the retrieve queue names the row (no patient name: the queue may be watched)."""
        row = self.row
        if isinstance(row, qr.StudyRow):
            return f"study {row.study_date or '?'} {row.description or row.accession_number}"
        if isinstance(row, qr.SeriesRow):
            return f"series {row.series_number or '?'} {row.modality} {row.description}"
        if isinstance(row, qr.PatientRow):
            return "patient (all studies)"
        return f"image {row.instance_number or '?'}"


@dataclass
class RetrieveJob:
    """One queued retrieve (or fetch-missing) and what its progress events said."""

    number: int
    node: str
    label: str
    targets: list[qr.RetrieveTarget]
    study_uids: list[str]
    fetch_missing: bool = False
    token: qr.CancelToken = field(default_factory=qr.CancelToken)
    state: JobState = "queued"
    retrieve_ids: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = None
    message: str = ""

    @property
    def total(self) -> int | None:
        if self.remaining is None:
            return None
        return self.completed + self.failed + self.warning + self.remaining


def echo_text(node: db.RemoteNode | None) -> Text:
    """The node's last C-ECHO outcome, as stored by the engine."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if node is None:
        text.append("no node: add one on the Nodes screen (5)", style="bold")
        return text
    text.append(f"{node.ae_title}@{node.host}:{node.port} ")
    text.append(f"{node.retrieve_method.upper()} ")
    if node.last_echo_at is None:
        text.append("never echoed (ctrl+e)", style="dim")
    elif node.last_echo_ok:
        text.append(f"echo ok {node.last_echo_at:%Y-%m-%d %H:%M}", style="green")
    else:
        text.append(f"echo FAILED {node.last_echo_at:%Y-%m-%d %H:%M}", style="bold red")
    return text


def classify_failure(error: BaseException | None, where: str) -> tuple[str, str]:
    """The kind (a key of NEXT_STEP) and message of a worker's failure.

    QRFailure keeps its own kind; a NodeError means the node went away under the screen. Any
    other error is logged with its traceback, since the screen shows only one line of it.
    """
    if isinstance(error, qr.QRFailure):
        return error.kind, error.message
    if isinstance(error, NodeError):
        return "node", str(error)
    log.error("%s failed unexpectedly", where, exc_info=error)
    return "unexpected", f"{type(error).__name__}: {error}"


def date_range(choice: str, today: date) -> str:
    """A DICOM date range for a quick choice, relative to ``today``."""
    days = DATE_CHOICES[choice]
    if days is None:
        return ""
    start = today - timedelta(days=days)
    if days == 0:
        return f"{today:%Y%m%d}"
    return f"{start:%Y%m%d}-{today:%Y%m%d}"


class QueryScreen(WebaimsScreen):
    """Mode ``query``: C-FIND form, results table, retrieve queue."""

    TITLE = "Query/Retrieve"
    HELP = """\
[b]Query/Retrieve[/b]
Pick a node (its last echo result is shown; ctrl+e echoes now), the model and level, and fill
any keys: patient name takes * and ? wildcards, dates are YYYYMMDD or YYYYMMDD-YYYYMMDD
(f2 today, f3 last 7 days, f4 last 30 days, f6 any date). / goes to the form, esc back to
the results; enter in any field (or ctrl+f anywhere) runs the query.
In the results: enter expands a study to its series, space selects, r retrieves the selected
rows (or the row under the cursor) by C-MOVE or C-GET as the node says, m fetches only what
the archive misses of the study under the cursor, x cancels the running retrieve (or drops
the last queued one), s changes the sort column. Archive column: "in archive", "partial: n/m"
(we hold n of the m instances the PACS has) or "missing". Retrieves queue and run in order."""

    BINDINGS = [
        Binding("ctrl+e", "echo", "Echo"),
        Binding("f2", "quick_date('today')", "Today", show=False),
        Binding("f3", "quick_date('7d')", "7 days", show=False),
        Binding("f4", "quick_date('30d')", "30 days", show=False),
        Binding("f6", "quick_date('any')", "Any date", show=False),
        Binding("ctrl+f", "run_query", "Query"),
        Binding("space", "toggle_select", "Select", show=False),
        Binding("r", "retrieve", "Retrieve"),
        Binding("m", "fetch_missing", "Fetch missing"),
        Binding("x", "cancel_retrieve", "Cancel"),
        Binding("s", "sort", "Sort"),
        Binding("slash", "focus_form", "Form"),
        Binding("escape", "focus_results", "Results", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[db.RemoteNode] = []
        self.entries: list[ResultEntry] = []
        self.result_node = ""
        self.sort_key = "date"
        self.sort_reverse = True
        self.jobs: list[RetrieveJob] = []
        self._job_numbers = 0
        self._runner_active = False
        self._current: RetrieveJob | None = None

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        with Horizontal(id="qr-node-bar", classes="qr-bar"):
            yield Select[str]([], prompt="node", id="qr-node", allow_blank=True)
            yield Static("", id="qr-echo")
        with Horizontal(id="qr-model-bar", classes="qr-bar"):
            yield Select[str](
                [("Study Root", "study"), ("Patient Root", "patient")],
                value="study",
                allow_blank=False,
                id="qr-model",
            )
            yield Select[str](
                [("STUDY", "STUDY"), ("SERIES", "SERIES")],
                value="STUDY",
                allow_blank=False,
                id="qr-level",
            )
            yield Input(placeholder="date YYYYMMDD[-YYYYMMDD]", id="qr-date")
            yield Input(placeholder="modality", id="qr-modality")
        with Horizontal(id="qr-keys-bar", classes="qr-bar"):
            yield Input(placeholder="patient name (* ?)", id="qr-name")
            yield Input(placeholder="patient ID", id="qr-id")
            yield Input(placeholder="accession", id="qr-accession")
            yield Input(placeholder="description", id="qr-description")
        table: DataTable[str | Text] = DataTable(id="qr-results", cursor_type="row")
        yield table
        yield Static("", id="qr-counts")
        yield Static("", id="qr-message")
        yield VerticalScroll(id="qr-queue")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.is_headless:
            for field_input in self.query(Input):
                field_input.cursor_blink = False
        self._set_columns("STUDY")
        self.query_one("#qr-queue").display = False
        # The table has focus at first so that the mode keys (1-6) work; / goes to the form.
        self.query_one("#qr-results", DataTable).focus()
        self.update_counts()
        if self.webaims.engine_ready:
            self.engine_ready()

    def engine_ready(self) -> None:
        """Called by the app once the database is open."""
        self.load_nodes()

    def on_screen_resume(self) -> None:
        # Nodes may have been added on the Nodes screen meanwhile.
        if self.webaims.engine_ready:
            self.load_nodes()

    # --- nodes and echo -----------------------------------------------------------------------

    @work(thread=True, group="qr-nodes", exclusive=True, exit_on_error=False, name="load nodes")
    def load_nodes(self) -> None:
        nodes = self.webaims.engine.nodes()
        self.app.call_from_thread(self._show_nodes, nodes)

    def _show_nodes(self, nodes: list[db.RemoteNode]) -> None:
        self.nodes = nodes
        select = cast("Select[str]", self.query_one("#qr-node", Select))
        current = select.value
        names = [n.name for n in nodes]
        select.set_options([(n.name, n.name) for n in nodes])
        if isinstance(current, str) and current in names:
            select.value = current
        elif names:
            select.value = names[0]
        self._show_echo()

    @property
    def node_name(self) -> str | None:
        value = self.query_one("#qr-node", Select).value
        return value if isinstance(value, str) else None

    @property
    def node(self) -> db.RemoteNode | None:
        name = self.node_name
        return next((n for n in self.nodes if n.name == name), None)

    def _show_echo(self) -> None:
        self.query_one("#qr-echo", Static).update(echo_text(self.node))

    @on(Select.Changed, "#qr-node")
    def node_changed(self) -> None:
        self._show_echo()

    def action_echo(self) -> None:
        name = self.node_name
        if name is None:
            self.say("Add a node on the Nodes screen (5) first.", error=True)
            return
        self.say(f"Echoing {name}…")
        self.echo_node(name)

    @work(thread=True, group="qr-echo", exclusive=True, exit_on_error=False, name="echo")
    def echo_node(self, name: str) -> None:
        result = self.webaims.engine.echo(name)
        nodes = self.webaims.engine.nodes()
        self.app.call_from_thread(self._echo_done, result, nodes)

    def _echo_done(self, result: qr.EchoResult, nodes: list[db.RemoteNode]) -> None:
        self._show_nodes(nodes)
        if result.ok:
            self.say(f"Echo {result.peer}: ok in {result.elapsed * 1000:.0f} ms")
        else:
            self.explain(result.problem, result.message)

    # --- the query form -----------------------------------------------------------------------

    @on(Select.Changed, "#qr-model")
    def model_changed(self, event: Select.Changed) -> None:
        levels = ["PATIENT", "STUDY", "SERIES"] if event.value == "patient" else ["STUDY", "SERIES"]
        level_select = cast("Select[str]", self.query_one("#qr-level", Select))
        current = level_select.value
        level_select.set_options([(level, level) for level in levels])
        level_select.value = current if current in levels else "STUDY"

    def action_quick_date(self, choice: str) -> None:
        self.query_one("#qr-date", Input).value = date_range(choice, self.webaims.clock().date())

    def action_focus_form(self) -> None:
        self.query_one("#qr-name", Input).focus()

    def action_focus_results(self) -> None:
        self.query_one("#qr-results", DataTable).focus()

    def build_query(self) -> qr.FindQuery:
        """The form as a FindQuery; QueryError names the field that is wrong."""

        def text(widget_id: str) -> str:
            return self.query_one(f"#{widget_id}", Input).value.strip()

        model = self.query_one("#qr-model", Select).value
        level = self.query_one("#qr-level", Select).value
        query = qr.FindQuery(
            level=cast(qr.QueryLevel, level),
            model=cast(qr.QueryModel, model),
            patient_name=text("qr-name"),
            patient_id=text("qr-id"),
            study_date=text("qr-date"),
            modality=text("qr-modality").upper(),
            accession_number=text("qr-accession"),
            study_description=text("qr-description"),
        )
        query.validate()
        return query

    @on(Input.Submitted)
    def action_run_query(self) -> None:
        name = self.node_name
        if name is None:
            self.say("No node to query: add one on the Nodes screen (5).", error=True)
            return
        try:
            query = self.build_query()
        except qr.QueryError as exc:
            self.say(f"Query not sent: {exc}", error=True)
            return
        self.say(f"Querying {name} at {query.level} level…")
        self.set_class(True, "-querying")
        self.run_find(name, query)

    @work(thread=True, group="qr-find", exclusive=True, exit_on_error=False, name="query")
    def run_find(self, name: str, query: qr.FindQuery) -> None:
        try:
            result = self.webaims.engine.find(name, query)
        except qr.QRFailure as exc:
            self.app.call_from_thread(self._find_failed, exc)
            return
        self.app.call_from_thread(self.show_results, name, query.level, result)

    def _find_failed(self, failure: qr.QRFailure) -> None:
        self.set_class(False, "-querying")
        self.explain(failure.kind, failure.message)

    def show_results(
        self, node: str, level: str, result: qr.FindResult, *, check_archive: bool = True
    ) -> None:
        """Replace the table with ``result``, then (unless told not to) look up each study's
        archive state with the PACS (snapshot tests pass fixed rows and no network)."""
        self.set_class(False, "-querying")
        self.result_node = node
        self.entries = [ResultEntry(row) for row in result.rows]
        self._set_columns(level)
        self._sort_entries()
        self.render_table()
        noun = level.lower() if len(result.rows) == 1 else f"{level.lower()} rows"
        if result.ok:
            extra = " (limit reached)" if result.limited else ""
            self.say(f"{len(result.rows)} {noun} from {node} in {result.elapsed:.1f} s{extra}")
        else:
            self.say(f"Query ended early: {result.message}", error=True)
        table = self.query_one("#qr-results", DataTable)
        if self.entries:
            table.focus()
        studies = [e.row for e in self.entries if isinstance(e.row, qr.StudyRow)]
        if studies and check_archive and self.webaims.engine_ready:
            self.check_archive(node, studies)

    # --- the results table --------------------------------------------------------------------

    def _set_columns(self, level: str) -> None:
        table = self.query_one("#qr-results", DataTable)
        table.clear(columns=True)
        if level == "PATIENT":
            columns = ["✓", "Patient", "Patient ID", "Birth", "Sex", "Studies", "Archive"]
        elif level == "STUDY":
            # Archive state early: it must show at 80 columns.
            columns = ["✓", "Archive", "Date", "Patient", "Patient ID", "Mod", "Description"]
            columns += ["Acc", "Ser", "Img"]
        else:
            columns = ["✓", "Archive", "Patient ID", "No", "Mod", "Description", "Img"]
        for column in columns:
            table.add_column(column, key=column)

    def _cells(self, entry: ResultEntry) -> list[str | Text]:
        mark = "●" if entry.selected else " "
        row = entry.row
        archive = _archive_text(entry.archive)

        def count(value: int | None) -> str:
            return "" if value is None else str(value)

        if isinstance(row, qr.PatientRow):
            return [mark, row.patient_name, row.patient_id, row.birth_date, row.sex]
        if isinstance(row, qr.StudyRow):
            expander = "▾" if entry.expanded else "▸"
            return [
                mark,
                archive,
                f"{expander}{row.study_date}",
                row.patient_name,
                row.patient_id,
                "\\".join(row.modalities),
                row.description,
                row.accession_number,
                count(row.series),
                count(row.instances),
            ]
        if isinstance(row, qr.SeriesRow):
            if entry.depth:
                # A series under an expanded study, in the study table's columns.
                return [
                    mark,
                    archive,
                    "  └",
                    "",
                    f"series {count(row.series_number)}",
                    row.modality,
                    row.description,
                    "",
                    "",
                    count(row.instances),
                ]
            return [
                mark,
                archive,
                row.patient_id,
                count(row.series_number),
                row.modality,
                row.description,
                count(row.instances),
            ]
        return [mark, archive, row.patient_id, count(row.instance_number), "", "", ""]

    def visible_entries(self) -> list[ResultEntry]:
        shown: list[ResultEntry] = []
        for entry in self.entries:
            shown.append(entry)
            if entry.expanded:
                shown.extend(entry.children)
        return shown

    def render_table(self) -> None:
        table = self.query_one("#qr-results", DataTable)
        cursor = table.cursor_row
        table.clear()
        width = len(table.columns)
        for entry in self.visible_entries():
            cells = self._cells(entry)
            if isinstance(entry.row, qr.PatientRow):
                cells = [*cells, str(entry.row.studies or ""), _archive_text(entry.archive)]
            table.add_row(*cells[:width], key=entry.key)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        self.update_counts()

    def update_counts(self) -> None:
        visible = self.visible_entries()
        selected = sum(1 for e in visible if e.selected)
        held = sum(1 for e in self.entries if e.archive == "in archive")
        partial = sum(1 for e in self.entries if e.archive.startswith("partial"))
        missing = sum(1 for e in self.entries if e.archive == "missing")
        arrow = "↓" if self.sort_reverse else "↑"
        text = (
            f"{len(self.entries)} results · {selected} selected · in archive {held} · "
            f"partial {partial} · missing {missing} · sort {self.sort_key}{arrow}"
        )
        self.query_one("#qr-counts", Static).update(text)

    def entry_under_cursor(self) -> ResultEntry | None:
        table = self.query_one("#qr-results", DataTable)
        if not table.row_count:
            return None
        visible = self.visible_entries()
        if 0 <= table.cursor_row < len(visible):
            return visible[table.cursor_row]
        return None

    def action_toggle_select(self) -> None:
        entry = self.entry_under_cursor()
        if entry is None:
            return
        entry.selected = not entry.selected
        table = self.query_one("#qr-results", DataTable)
        table.update_cell(entry.key, "✓", "●" if entry.selected else " ")
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)
        self.update_counts()

    def action_sort(self) -> None:
        index = SORT_KEYS.index(self.sort_key)
        if self.sort_reverse:
            self.sort_reverse = False
        else:
            self.sort_key = SORT_KEYS[(index + 1) % len(SORT_KEYS)]
            self.sort_reverse = True
        self._sort_entries()
        self.render_table()

    def _sort_entries(self) -> None:
        # Children stay under their study: only the top level is sorted.
        self.entries.sort(key=lambda e: e.sort_value(self.sort_key), reverse=self.sort_reverse)

    @on(DataTable.RowSelected, "#qr-results")
    def expand_study(self) -> None:
        entry = self.entry_under_cursor()
        if entry is None and not self.entries:
            self.action_run_query()  # enter on the empty table runs the form's query
            return
        if entry is None or not isinstance(entry.row, qr.StudyRow):
            return
        if entry.expanded:
            entry.expanded = False
            self.render_table()
            return
        if entry.children:
            entry.expanded = True
            self.render_table()
            return
        self.say("Listing the series of the study…")
        self.find_series(self.result_node, entry)

    @work(thread=True, group="qr-series", exit_on_error=False, name="series query")
    def find_series(self, node: str, entry: ResultEntry) -> None:
        row = cast(qr.StudyRow, entry.row)
        query = qr.FindQuery(
            level="SERIES",
            model="study",
            patient_id=row.patient_id,
            study_instance_uid=row.study_instance_uid,
        )
        try:
            result = self.webaims.engine.find(node, query)
        except qr.QRFailure as exc:
            self.app.call_from_thread(self.explain, exc.kind, exc.message)
            return
        self.app.call_from_thread(self._show_series, entry, result)

    def _show_series(self, entry: ResultEntry, result: qr.FindResult) -> None:
        entry.children = [
            ResultEntry(row, depth=1)
            for row in sorted(
                (r for r in result.rows if isinstance(r, qr.SeriesRow)),
                key=lambda r: r.series_number or 0,
            )
        ]
        entry.expanded = True
        self.render_table()
        self.say(f"{len(entry.children)} series in the study")

    # --- archive state ------------------------------------------------------------------------

    @work(
        thread=True, group="qr-archive", exclusive=True, exit_on_error=False, name="archive marks"
    )
    def check_archive(self, node: str, studies: list[qr.StudyRow]) -> None:
        """Mark each study: the archive's count of its instances against the PACS's count.

        The PACS's count came with the STUDY-level answer (NumberOfStudyRelatedInstances) and
        the archive counts its own rows, so this needs no association. Only a study the PACS
        gave no count for (or whose archived UID the rule set does not derive) is listed at
        IMAGE level, an association and its C-ECHO each, for at most MAX_STATUS_CHECKS studies.
        """
        engine = self.webaims.engine
        counted = [s.study_instance_uid for s in studies if s.instances is not None]
        sizes = engine.archived_study_sizes(counted)
        marks: list[tuple[str, int, int]] = []
        unknown: list[str] = []
        for study in studies:
            held = sizes.get(study.study_instance_uid)
            if study.instances is None or held is None:
                unknown.append(study.study_instance_uid)
            else:
                marks.append((study.study_instance_uid, held, study.instances))
        self.app.call_from_thread(self.set_archive_states, marks)
        for uid in unknown[:MAX_STATUS_CHECKS]:
            try:
                report = engine.verify(node, uid)
            except qr.QRFailure:
                continue  # the query itself worked; a missing state is not worth an error
            self.app.call_from_thread(self.set_archive_state, uid, report.held, report.remote)

    def set_archive_states(self, marks: list[tuple[str, int, int]]) -> None:
        """Several (study UID, held, remote) marks in one call from a worker thread."""
        for study_uid, held, remote in marks:
            self.set_archive_state(study_uid, held, remote)

    def set_archive_state(self, study_uid: str, held: int, remote: int) -> None:
        if held == 0:
            state = "missing"
        elif held >= remote:
            state = "in archive"
        else:
            state = f"partial: {held}/{remote}"
        for entry in self.entries:
            if isinstance(entry.row, qr.StudyRow) and entry.row.study_instance_uid == study_uid:
                entry.archive = state
                table = self.query_one("#qr-results", DataTable)
                if "Archive" in {str(k.value) for k in table.columns}:
                    table.update_cell(entry.key, "Archive", _archive_text(state))
        self.update_counts()

    # --- retrieve -----------------------------------------------------------------------------

    def action_retrieve(self) -> None:
        chosen = [e for e in self.visible_entries() if e.selected]
        if not chosen:
            entry = self.entry_under_cursor()
            chosen = [entry] if entry is not None else []
        if not chosen or not self.result_node:
            self.say("Nothing to retrieve: run a query and select rows (space).", error=True)
            return
        # A series whose study is also selected would be fetched twice.
        studies = {e.row.study_instance_uid for e in chosen if isinstance(e.row, qr.StudyRow)}
        chosen = [
            e
            for e in chosen
            if isinstance(e.row, qr.StudyRow | qr.PatientRow)
            or getattr(e.row, "study_instance_uid", "") not in studies
        ]
        label = chosen[0].label() if len(chosen) == 1 else f"{len(chosen)} items"
        self.enqueue(
            RetrieveJob(
                number=0,
                node=self.result_node,
                label=label,
                targets=[e.target() for e in chosen],
                study_uids=sorted(
                    {getattr(e.row, "study_instance_uid", "") for e in chosen} - {""}
                ),
            )
        )
        for entry in chosen:
            entry.selected = False
        self.render_table()

    def action_fetch_missing(self) -> None:
        entry = self.entry_under_cursor()
        if entry is None or not isinstance(entry.row, qr.StudyRow | qr.SeriesRow):
            self.say("Put the cursor on a study (or series) to fetch what is missing.", error=True)
            return
        row = entry.row
        series_uid = row.series_instance_uid if isinstance(row, qr.SeriesRow) else ""
        self.enqueue(
            RetrieveJob(
                number=0,
                node=self.result_node,
                label=f"missing of {entry.label()}",
                targets=[
                    qr.RetrieveTarget(
                        study_instance_uid=row.study_instance_uid,
                        series_instance_uid=series_uid,
                    )
                ],
                study_uids=[row.study_instance_uid],
                fetch_missing=True,
            )
        )

    def enqueue(self, job: RetrieveJob) -> None:
        self._job_numbers += 1
        job.number = self._job_numbers
        self.jobs.append(job)
        queue = self.query_one("#qr-queue", VerticalScroll)
        queue.display = True
        queue.mount(RetrieveRow(job, id=f"job-{job.number}"))
        self.say(f"Retrieve #{job.number} queued: {job.label}")
        if not self._runner_active:
            self._runner_active = True
            self.run_retrieves()

    def _next_job(self) -> RetrieveJob | None:
        job = next((j for j in self.jobs if j.state == "queued"), None)
        if job is None:
            self._runner_active = False
            self._current = None
            return None
        job.state = "running"
        self._current = job
        self.refresh_job(job)
        return job

    @work(thread=True, group="retrieve", exit_on_error=False, name="retrieve")
    def run_retrieves(self) -> None:
        """Runs queued jobs one after another until the queue is empty."""
        engine = self.webaims.engine
        while True:
            job = self.app.call_from_thread(self._next_job)
            if job is None:
                return
            summary: qr.RetrieveSummary | None = None
            message = ""
            failure = ""
            try:
                if job.fetch_missing:
                    target = job.targets[0]
                    report = engine.fetch_missing(
                        job.node,
                        target.study_instance_uid,
                        target.series_instance_uid,
                        cancel=job.token,
                    )
                    summary, message = report.retrieve, report.message
                else:
                    summary = engine.retrieve(job.node, job.targets, cancel=job.token)
                    message = summary.message
            except Exception as exc:  # the queue must go on; the row says what happened
                failure, message = classify_failure(exc, f"retrieve #{job.number}")
            self._settle(engine)
            self.app.call_from_thread(self._job_finished, job, summary, failure, message)
            # Not the archive's own count: right after a retrieve the files may still wait in
            # incoming/, which verify counts as held. One IMAGE-level C-FIND per study is small
            # beside the retrieve's own associations.
            for uid in job.study_uids[:MAX_STATUS_CHECKS]:
                try:
                    report_after = engine.verify(job.node, uid)
                except qr.QRFailure:
                    continue
                self.app.call_from_thread(
                    self.set_archive_state, uid, report_after.held, report_after.remote
                )

    @staticmethod
    def _settle(engine: object, timeout: float = 15.0) -> None:
        # The SCP records received instances when the PACS's store association closes, which
        # may be just after the C-MOVE's final response: wait for it before verifying.
        deadline = time.monotonic() + timeout
        server = getattr(engine, "server", None)
        while server is not None and server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)

    def _job_finished(
        self,
        job: RetrieveJob,
        summary: qr.RetrieveSummary | None,
        failure: str,
        message: str,
    ) -> None:
        if summary is not None:
            job.completed, job.failed, job.warning = (
                summary.completed,
                summary.failed,
                summary.warning,
            )
            job.remaining = 0 if not summary.cancelled else summary.remaining
        if job.token.cancelled or (summary is not None and summary.cancelled):
            job.state = "cancelled"
        elif failure or (summary is not None and not summary.ok):
            job.state = "failed"
        else:
            job.state = "done"
        job.message = message
        self.refresh_job(job)
        if failure:
            self.explain(failure, f"retrieve #{job.number}: {message}")
        elif job.state == "failed":
            self.say(f"Retrieve #{job.number} failed: {message}", error=True)
        else:
            self.say(f"Retrieve #{job.number} {job.state}: {message}")

    def action_cancel_retrieve(self) -> None:
        running = self._current
        if running is not None and running.state == "running":
            running.token.cancel()
            running.message = "cancelling (C-CANCEL sent at the next response)…"
            self.refresh_job(running)
            self.say(f"Cancelling retrieve #{running.number}…")
            return
        queued = [j for j in self.jobs if j.state == "queued"]
        if queued:
            queued[-1].state = "cancelled"
            queued[-1].message = "removed from the queue"
            self.refresh_job(queued[-1])
            return
        self.say("No retrieve is running or queued.")

    def refresh_job(self, job: RetrieveJob) -> None:
        for row in self.query(RetrieveRow):
            if row.job is job:
                row.refresh_from_job()

    def _restart_runner(self, message: str) -> None:
        """After the runner ended on an exception: fail its job, run what is still queued."""
        job = self._current
        if job is not None and job.state == "running":
            job.state = "failed"
            job.message = message
            self.refresh_job(job)
        self._runner_active = False
        self._current = None
        # Only a runner that had claimed a job is restarted: one that fails before claiming
        # any would fail again, forever.
        if job is not None and any(j.state == "queued" for j in self.jobs):
            self._runner_active = True
            self.run_retrieves()

    # --- worker failures ----------------------------------------------------------------------

    @on(Worker.StateChanged)
    def recover_from_worker_failure(self, event: Worker.StateChanged) -> None:
        """A worker ended on an exception: leave its busy state and say what to do next.

        The base class hands the same event to the app, which notifies; without this a query
        whose node was removed meanwhile would stay "Querying…" forever.
        """
        if event.state != WorkerState.ERROR:
            return
        worker = event.worker
        kind, message = classify_failure(worker.error, worker.name)
        if worker.group == "qr-find":
            self.set_class(False, "-querying")
        elif worker.group == "retrieve":
            self._restart_runner(message)
        self.explain(kind, f"{worker.name} failed: {message}")
        if kind == "node":
            self.load_nodes()  # the node list then shows which nodes are left

    # --- engine events (forwarded by the app) -------------------------------------------------

    def engine_event(self, event: EngineEvent) -> None:
        """Query/retrieve events from the engine: progress of the running job, echo results."""
        job = self._current
        if isinstance(event, RetrieveStarted):
            if job is not None and job.state == "running" and event.node == job.node:
                job.retrieve_ids.add(event.retrieve_id)
        elif isinstance(event, RetrieveProgress | RetrieveFinished):
            if job is None or event.retrieve_id not in job.retrieve_ids:
                return
            job.completed, job.failed, job.warning = event.completed, event.failed, event.warning
            if isinstance(event, RetrieveProgress):
                job.remaining = event.remaining
            self.refresh_job(job)
        elif isinstance(event, EchoFinished):
            pass  # the echo worker reloads the node with its stored result

    # --- messages -----------------------------------------------------------------------------

    def say(self, text: str, *, error: bool = False) -> None:
        message = self.query_one("#qr-message", Static)
        message.update(text)
        message.set_class(error, "-error")

    def explain(self, kind: str, message: str) -> None:
        """A failure with what happened (the engine's words) and the next step to take."""
        step = NEXT_STEP.get(kind, "")
        if "what to do" in message.lower():
            step = ""  # the engine's explanation already says what to do
        self.say(f"{message}  → {step}" if step else message, error=True)


def _archive_text(state: str) -> Text:
    style = {"in archive": "green", "missing": "red"}.get(state, "yellow")
    return Text(state, style=style if state else "")


class RetrieveRow(Horizontal):
    """One line of the retrieve queue: number, label, progress bar, counts / summary."""

    def __init__(self, job: RetrieveJob, *, id: str) -> None:
        super().__init__(id=id, classes="qr-job")
        self.job = job

    def compose(self) -> ComposeResult:
        yield Label("", classes="qr-job-label")
        yield ProgressBar(show_eta=False, show_percentage=False, classes="qr-job-bar")
        yield Label("", classes="qr-job-state")

    def on_mount(self) -> None:
        self.refresh_from_job()

    def refresh_from_job(self) -> None:
        job = self.job
        self.query_one(".qr-job-label", Label).update(f"#{job.number} {job.label}")
        bar = self.query_one(ProgressBar)
        total = job.total
        done = job.completed + job.failed + job.warning
        if job.state != "running" and total is None:
            # Only a running retrieve without counts yet pulses (indeterminate); a queued or
            # ended one shows a still bar.
            total = max(done, 1)
        bar.update(total=total, progress=done)
        counts = f"{job.completed} ok"
        if job.failed:
            counts += f" {job.failed} failed"
        if job.warning:
            counts += f" {job.warning} warn"
        if job.remaining:
            counts += f" {job.remaining} left"
        state = {"queued": "queued", "running": counts}.get(job.state, f"{job.state}: {counts}")
        self.query_one(".qr-job-state", Label).update(state)
        self.tooltip = job.message or None
        for name in ("queued", "running", "done", "failed", "cancelled"):
            self.set_class(job.state == name, f"-{name}")
