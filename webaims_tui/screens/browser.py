"""The archive browser: Patient -> Study -> Series -> Instance, one page at a time.

Each level is a table of one page (``browse.PAGE_SIZE`` rows) loaded by a thread worker, so the
screen costs the same with a hundred instances or a million. Enter drills down, Backspace goes up;
the detail pane follows the cursor; an instance opens its tag dump and image preview.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from webaims_tui.engine import browse
from webaims_tui.engine.browse import BrowseQuery, Level, Page, UnitSummary
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.screens.dialogs import ConfirmScreen, ExportChoice, ExportScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    pass

LEVEL_TITLES: dict[Level, str] = {
    "patient": "Patients",
    "study": "Studies",
    "series": "Series",
    "instance": "Instances",
}


@dataclass(frozen=True)
class Crumb:
    """A level the user drilled through: which row, its label, where the cursor was."""

    level: Level
    id: int
    label: str
    cursor_row: int
    offset: int


def parse_search(text: str) -> dict[str, str]:
    """``date:FROM-TO mod:CT desc:word other words`` -> BrowseQuery filter fields.

    Free words search patient ID and name. Dates are YYYYMMDD (dashes inside a date such as
    2024-01-31 are accepted), or a prefix meaning the whole year or month; either end of a range
    may be empty.
    """
    fields = {"patient": "", "date_from": "", "date_to": "", "modality": "", "description": ""}
    words: list[str] = []
    descriptions: list[str] = []
    for token in text.split():
        key, _, value = token.partition(":")
        key = key.lower()
        if not _ or not value:
            words.append(token)
        elif key == "date":
            first, sep, second = _split_range(value)
            if not sep:
                second = first
            # A partial date is a period: date:2022 is all of 2022, -202203 up to March's end.
            fields["date_from"] = first.ljust(8, "0") if first else ""
            fields["date_to"] = second.ljust(8, "9") if second else ""
        elif key in ("mod", "modality"):
            fields["modality"] = value.upper()
        elif key in ("desc", "description"):
            descriptions.append(value)
        else:
            words.append(token)
    fields["patient"] = " ".join(words)
    fields["description"] = " ".join(descriptions)
    return fields


def _split_range(value: str) -> tuple[str, str, str]:
    # 2024-01-01..2024-12-31, 20240101-20241231, 20240101- and -20241231 are all ranges.
    if ".." in value:
        first, _, second = value.partition("..")
        return _compact_date(first), "..", _compact_date(second)
    digits = value.replace("-", "")
    if len(digits) == 8 and value.count("-") in (0, 2):
        return digits, "", ""
    first, sep, second = value.partition("-")
    return _compact_date(first), sep, _compact_date(second)


def _compact_date(value: str) -> str:
    return value.replace("-", "").strip()


class BrowserScreen(WebaimsScreen):
    """Mode ``browser``."""

    TITLE = "Browse"
    HELP = """\
[b]Browser[/b]
Enter opens the selected patient, study or series (and, for an instance, its tag dump and
image preview); Backspace goes back up. Pages hold 100 rows: [b][[/b] and [b]][/b] turn them.
[b]s[/b] sorts by the next column, [b]S[/b] reverses; clicking a header sorts by it.
Search ([b]/[/b]): free words match patient ID or name;
[b]date:20240101-20241231 mod:CT desc:head[/b] filter studies (and series by modality).
[b]d[/b] deletes the selected unit (rows and files), [b]e[/b] exports it to a folder or zip,
[b]a[/b] re-runs anonymization on it with the active rule set. Each asks first."""

    BINDINGS = [
        Binding("slash", "search", "Search"),
        Binding("backspace", "up", "Up", show=False),
        Binding("escape", "escape", "Back", show=False),
        Binding("right_square_bracket", "page(1)", "Next page"),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False),
        Binding("s", "sort(False)", "Sort"),
        Binding("S", "sort(True)", "Reverse", show=False),
        Binding("d", "delete", "Delete"),
        Binding("e", "export", "Export"),
        Binding("a", "reanonymize", "Re-anonymize", show=False),
        Binding("r", "reload", "Reload", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.query_state = BrowseQuery()
        self.crumbs: list[Crumb] = []
        self.page: Page | None = None
        self._restore_row = 0
        self.summary: UnitSummary | None = None

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield Input(
            placeholder="/ search: patient text  date:YYYYMMDD-YYYYMMDD  mod:CT  desc:word",
            id="search",
        )
        yield Static("", id="breadcrumb")
        with Horizontal(id="browser-body"):
            table: DataTable[str] = DataTable(id="units", cursor_type="row", zebra_stripes=True)
            yield table
            with VerticalScroll(id="detail-pane"):
                yield Static("", id="detail")
        yield Static("", id="page-state")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.is_headless:
            self.query_one("#search", Input).cursor_blink = False
        self.query_one("#units", DataTable).focus()
        if self.webaims.engine_ready:
            self.reload()
        else:
            self.query_one("#page-state", Static).update("opening the archive…")

    def engine_ready(self) -> None:
        """Called by the app once the database is open."""
        self.reload()

    # --- loading ------------------------------------------------------------------------------

    def reload(self, query: BrowseQuery | None = None, restore_row: int = 0) -> None:
        if query is not None:
            self.query_state = query
        self._restore_row = restore_row
        self.query_one("#page-state", Static).update("loading…")
        self.load_page(self.query_state)

    @work(thread=True, group="browse", exclusive=True, exit_on_error=False, name="browse")
    def load_page(self, query: BrowseQuery) -> None:
        page = self.webaims.engine.browse_page(query)
        self.app.call_from_thread(self.show_page, page)

    def show_page(self, page: Page) -> None:
        if page.query != self.query_state:
            return  # a newer request is on its way; this answer is stale
        if page.total and not page.rows and page.query.offset > 0:
            # The rows under the cursor were deleted: step back to the last page that exists.
            last = max((page.total - 1) // page.query.limit * page.query.limit, 0)
            self.reload(replace(page.query, offset=last))
            return
        self.page = page
        table = self.query_one("#units", DataTable)
        table.clear(columns=True)
        sort_key = page.query.sort or browse.DEFAULT_SORT[page.query.level]
        for column in page.columns:
            title = column.title
            if column.key == sort_key:
                title += " ▼" if page.query.descending else " ▲"
            table.add_column(title, key=column.key)
        for row in page.rows:
            table.add_row(*row.cells, key=str(row.id))
        if page.rows:
            table.move_cursor(row=min(self._restore_row, len(page.rows) - 1), animate=False)
        self._show_breadcrumb()
        self._show_page_state()
        if not page.rows:
            self.summary = None
            self.query_one("#detail", Static).update(self._empty_text())

    def _empty_text(self) -> str:
        if any(parse_search(self.query_one("#search", Input).value).values()):
            return "Nothing matches the search."
        return "Nothing here yet: images sent to this archive appear here."

    def _show_breadcrumb(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("Patients", style="bold" if not self.crumbs else "")
        for crumb in self.crumbs:
            text.append(" > ")
            text.append(crumb.label)
        self.query_one("#breadcrumb", Static).update(text)

    def _show_page_state(self) -> None:
        page = self.page
        if page is None:
            return
        level = LEVEL_TITLES[page.query.level].lower()
        if page.total:
            state = f"{level} {page.first:,}-{page.last:,} of {page.total:,}"
        else:
            state = f"no {level}"
        if page.total > page.query.limit:
            state += "  ·  [ ] pages"
        search = self.query_one("#search", Input).value.strip()
        if search:
            state += f"  ·  search: {search}"
        self.query_one("#page-state", Static).update(state)

    @property
    def selected_id(self) -> int | None:
        table = self.query_one("#units", DataTable)
        if self.page is None or not self.page.rows or table.row_count == 0:
            return None
        row = table.cursor_row
        if 0 <= row < len(self.page.rows):
            return self.page.rows[row].id
        return None

    # --- detail pane --------------------------------------------------------------------------

    @on(DataTable.RowHighlighted, "#units")
    def follow_cursor(self, event: DataTable.RowHighlighted) -> None:
        unit_id = self.selected_id
        if unit_id is not None:
            self.load_detail(self.query_state.level, unit_id)

    @work(thread=True, group="detail", exclusive=True, exit_on_error=False, name="details")
    def load_detail(self, level: Level, unit_id: int) -> None:
        summary = self.webaims.engine.unit_summary(level, unit_id)
        self.app.call_from_thread(self.show_detail, summary)

    def show_detail(self, summary: UnitSummary) -> None:
        if summary.level != self.query_state.level or summary.id != self.selected_id:
            return
        self.summary = summary
        text = Text()
        text.append(summary.title + "\n", style="bold")
        for label, value in summary.fields:
            text.append(f"{label}: ", style="dim")
            text.append(f"{value}\n")
        if summary.level == "instance":
            text.append("\nEnter: tag dump and image preview", style="italic")
        self.query_one("#detail", Static).update(text)

    # --- navigation ---------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#units")
    def open_row(self, event: DataTable.RowSelected) -> None:
        unit_id = self.selected_id
        if unit_id is None or self.page is None:
            return
        level = self.query_state.level
        child = browse.child_level(level)
        if child is None:
            from webaims_tui.screens.instance import InstanceScreen

            self.app.push_screen(InstanceScreen(unit_id))
            return
        row = self.page.rows[event.cursor_row]
        self.crumbs.append(
            Crumb(
                level, unit_id, _label(level, row.cells), event.cursor_row, self.query_state.offset
            )
        )
        self.reload(replace(self.query_state, level=child, parent_id=unit_id, offset=0, sort=""))

    def action_up(self) -> None:
        if not self.crumbs:
            return
        crumb = self.crumbs.pop()
        parent = self.crumbs[-1].id if self.crumbs else None
        query = replace(
            self.query_state, level=crumb.level, parent_id=parent, offset=crumb.offset, sort=""
        )
        self.reload(query, restore_row=crumb.cursor_row)

    def action_escape(self) -> None:
        search = self.query_one("#search", Input)
        if search.has_focus:
            self.query_one("#units", DataTable).focus()
        else:
            self.action_up()

    def action_page(self, direction: int) -> None:
        page = self.page
        if page is None:
            return
        offset = page.query.offset + direction * page.query.limit
        if offset < 0 or offset >= page.total:
            self.app.bell()
            return
        self.reload(replace(self.query_state, offset=offset))

    def action_sort(self, reverse: bool) -> None:
        columns = [c for c in browse.COLUMNS[self.query_state.level] if c.sortable]
        current = self.query_state.sort or browse.DEFAULT_SORT[self.query_state.level]
        if reverse:
            query = replace(
                self.query_state, sort=current, descending=not self.query_state.descending
            )
        else:
            keys = [c.key for c in columns]
            following = keys[(keys.index(current) + 1) % len(keys)] if current in keys else keys[0]
            query = replace(self.query_state, sort=following, descending=False)
        self.reload(replace(query, offset=0))

    @on(DataTable.HeaderSelected, "#units")
    def sort_by_header(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        column = next((c for c in browse.COLUMNS[self.query_state.level] if c.key == key), None)
        if column is None or not column.sortable:
            self.notify(f"Cannot sort by {event.label}: it is counted per row.", timeout=4)
            return
        descending = self.query_state.sort == key and not self.query_state.descending
        self.reload(replace(self.query_state, sort=key, descending=descending, offset=0))

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    @on(Input.Submitted, "#search")
    def apply_search(self, event: Input.Submitted) -> None:
        fields = parse_search(event.value)
        query = replace(
            self.query_state,
            offset=0,
            patient=fields["patient"],
            date_from=fields["date_from"],
            date_to=fields["date_to"],
            modality=fields["modality"],
            description=fields["description"],
        )
        self.reload(query)
        self.query_one("#units", DataTable).focus()

    def action_reload(self) -> None:
        self.reload(restore_row=self.query_one("#units", DataTable).cursor_row)

    # --- actions on the selected unit ---------------------------------------------------------

    def _selection(self) -> tuple[Level, int, str] | None:
        unit_id = self.selected_id
        if unit_id is None or self.page is None:
            self.notify("Select a row first.", timeout=3)
            return None
        level = self.query_state.level
        row = self.page.rows[self.query_one("#units", DataTable).cursor_row]
        return level, unit_id, f"{level} {_label(level, row.cells)}"

    def action_delete(self) -> None:
        selection = self._selection()
        if selection is None:
            return
        level, unit_id, what = selection
        count = self.summary.instances if self.summary and self.summary.id == unit_id else None
        files = f" and its {count:,} archived files" if count is not None else " and its files"
        question = f"Delete {what}{files}?\nThis cannot be undone."

        def confirmed(answer: bool | None) -> None:
            if answer:
                self.delete_unit(level, unit_id, what)

        self.app.push_screen(ConfirmScreen(question, yes="Delete", danger=True), confirmed)

    @work(thread=True, group="actions", exit_on_error=False, name="delete")
    def delete_unit(self, level: Level, unit_id: int, what: str) -> None:
        result = self.webaims.engine.delete_unit(level, unit_id)
        message = f"Deleted {what}: {result.instances:,} instances"
        if result.missing_files:
            message += f" ({result.missing_files} files were already missing)"
        self.app.call_from_thread(self._after_action, message)

    def action_export(self) -> None:
        selection = self._selection()
        if selection is None:
            return
        level, unit_id, what = selection
        default = self.webaims.settings.paths.data_dir / "exports" / f"{level}-{unit_id}"

        def chosen(choice: ExportChoice | None) -> None:
            if choice is not None:
                self.export_unit(level, unit_id, what, choice)

        self.app.push_screen(ExportScreen(what, default), chosen)

    @work(thread=True, group="actions", exit_on_error=False, name="export")
    def export_unit(self, level: Level, unit_id: int, what: str, choice: ExportChoice) -> None:
        result = self.webaims.engine.export_unit(
            level, unit_id, choice.destination, as_zip=choice.as_zip
        )
        message = f"Exported {result.instances:,} instances of {what} to {result.destination}"
        if result.missing_files:
            message += f" ({result.missing_files} files missing from the archive)"
        self.app.call_from_thread(self.notify, message, title="Export", timeout=8)

    def action_reanonymize(self) -> None:
        selection = self._selection()
        if selection is None:
            return
        level, unit_id, what = selection
        question = (
            f"Re-run anonymization on {what} with the active rule set? Its archived files are "
            "replaced by its kept originals anonymized again."
        )

        def confirmed(answer: bool | None) -> None:
            if answer:
                self.reanonymize_unit(level, unit_id, what)

        self.app.push_screen(ConfirmScreen(question, yes="Re-anonymize"), confirmed)

    @work(thread=True, group="actions", exit_on_error=False, name="re-anonymize")
    def reanonymize_unit(self, level: Level, unit_id: int, what: str) -> None:
        result = self.webaims.engine.reanonymize_unit(level, unit_id)
        self.app.call_from_thread(self._after_action, f"Re-anonymized {what}: {result}")

    def _after_action(self, message: str) -> None:
        self.notify(message, timeout=6)
        self.reload(restore_row=self.query_one("#units", DataTable).cursor_row)


def _label(level: Level, cells: tuple[str, ...]) -> str:
    """A short name for a row, for the breadcrumb and the dialogs."""
    if level == "patient":
        return cells[0]
    if level == "study":
        return " ".join(part for part in (cells[0], cells[1]) if part) or "(no date)"
    if level == "series":
        return " ".join(
            part for part in (f"#{cells[0]}" if cells[0] else "", cells[1], cells[2]) if part
        )
    return f"#{cells[0]}" if cells[0] else "instance"
