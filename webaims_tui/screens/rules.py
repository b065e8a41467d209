"""Mode ``rules``: the anonymization rule editor, its live preview, save and activate.

The editor works on a draft :class:`~webaims_tui.engine.rules.RuleSet` held in memory: nothing is
written until "save" stores it as the next version of its name, and nothing changes how data is
anonymized until "activate" (after a confirmation that says what it applies to). Validation is
the engine's own (:func:`rules.validate`), run on every change; errors show beside the rule and
block saving. The preview runs the draft on an archived instance or a file (a dry run: nothing
is written, the linkage database is not touched), and again whenever the draft changes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, DataTable, Footer, Input, Select, SelectionList, Static
from textual.widgets.selection_list import Selection

from webaims_tui.engine import anonymize, rules
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.screens.dialogs import ConfirmScreen
from webaims_tui.screens.rule_form import RuleFormScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from webaims_tui.app import WebaimsApp

#: The profile's on/off options, as the editor's switches.
PROFILE_SWITCHES: tuple[tuple[str, str], ...] = (
    ("remove_private", "Remove private tags"),
    ("retain_safe_private", "Retain safe private"),
    ("retain_uids", "Retain UIDs"),
    ("retain_device_identity", "Retain device identity"),
    ("retain_institution_identity", "Retain institution identity"),
    ("retain_patient_characteristics", "Retain patient characteristics"),
    ("clean_descriptors", "Clean descriptors"),
)
PROFILE_LABELS = {"basic": "basic profile", "none": "rules only"}
_RULE_WHERE = re.compile(r"^rule (\d+) ")


def rule_argument(rule: rules.Rule) -> str:
    """The rule's argument as the table shows it."""
    parts = []
    if rule.value is not None:
        parts.append(repr(rule.value))
    if rule.table:
        parts.append(f"table {rule.table}")
    if rule.key:
        parts.append(f"key {rule.key}")
    if rule.prefix:
        parts.append(f"prefix {rule.prefix}")
    if rule.step is not None:
        parts.append(f"step {rule.step}")
    return ", ".join(parts)


def errors_by_rule(errors: list[rules.RuleError]) -> tuple[dict[int, list[str]], list[str]]:
    """Rule errors by rule index (0-based), and the others (name, profile, lookup)."""
    by_rule: dict[int, list[str]] = {}
    others: list[str] = []
    for error in errors:
        match = _RULE_WHERE.match(error.where)
        if match:
            by_rule.setdefault(int(match.group(1)) - 1, []).append(error.reason)
        else:
            others.append(str(error))
    return by_rule, others


class PathScreen(ModalScreen[Path | None]):
    """Asks for a file path (import or export of a rule set as TOML)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, default: str) -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-body"):
            yield Static(self.question, classes="dialog-question")
            yield Input(self.default, id="path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK (enter)", id="ok", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        field = self.query_one(Input)
        if self.app.is_headless:
            field.cursor_blink = False
        field.focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def accept(self) -> None:
        text = self.query_one(Input).value.strip()
        self.dismiss(Path(text).expanduser() if text else None)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class PreviewScreen(WebaimsScreen):
    """Side-by-side before/after of one instance under the editor's draft, and the verdict.

    The preview follows the draft: it watches the editor's ``draft`` and runs again whenever
    it changes, be it a rule edited from here (``e``) or an import or a load that the editor's
    workers finish meanwhile. It is a screen over the editor rather than a pane beside it
    because before and after side by side need the whole width at 80 columns.
    """

    TITLE = "Rule preview"
    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("e", "edit_rule", "Edit rule"),
        Binding("a", "toggle_all", "All/changed"),
        Binding("slash", "focus_source", "Source"),
    ]
    #: Changes can come in bursts (edits in quick succession, an import and a load finishing
    #: together): one dry run once they settle, not one thread per change.
    RERUN_DELAY = 0.2

    def __init__(self, editor: RulesScreen, source: str) -> None:
        super().__init__()
        self.editor = editor
        self.source = source
        self.report: anonymize.DryRunReport | None = None
        #: The report's elements as the table's rows, in order.
        self.shown: list[anonymize.ElementChange] = []
        self.show_all = False
        self.rerun: Timer | None = None

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield Input(
            self.source,
            placeholder="#instance-id (archive) or a file path; enter previews",
            id="preview-source",
        )
        table: DataTable[str | Text] = DataTable(id="preview-table", cursor_type="row")
        yield table
        yield Static("", id="preview-verdict")
        yield Footer()

    def on_mount(self) -> None:
        field = self.query_one("#preview-source", Input)
        if self.app.is_headless:
            field.cursor_blink = False
        table = self.query_one("#preview-table", DataTable)
        for column in PREVIEW_COLUMNS:
            table.add_column(column, key=column)
        table.focus()
        # The watch ends by itself when this screen is closed.
        self.watch(self.editor, "draft", self.draft_changed, init=False)
        self.preview()

    def draft_changed(self) -> None:
        if self.rerun is not None:
            self.rerun.stop()
        # Deferred also because the editor sets its draft before it validates it: by then
        # its errors belong to the new draft.
        self.rerun = self.set_timer(self.RERUN_DELAY, self.preview)

    def preview(self) -> None:
        """Dry-run the editor's draft on the source, unless the draft has errors."""
        self.rerun = None  # due now: none is pending any more
        if self.editor.errors:
            self.failed(
                f"The draft has {len(self.editor.errors)} error(s), shown in the editor: "
                "an invalid rule set cannot be applied."
            )
            return
        self.run_preview(self.source, self.editor.draft)

    @on(Input.Submitted, "#preview-source")
    def source_changed(self, event: Input.Submitted) -> None:
        self.source = event.value.strip()
        self.preview()
        self.query_one("#preview-table", DataTable).focus()

    def action_focus_source(self) -> None:
        self.query_one("#preview-source", Input).focus()

    def action_close(self) -> None:
        self.dismiss()

    def action_toggle_all(self) -> None:
        self.show_all = not self.show_all
        self.show_report()

    @on(DataTable.RowSelected, "#preview-table")
    def action_edit_rule(self) -> None:
        """Edit the rule that decided the highlighted element, or add one where none did."""
        table = self.query_one("#preview-table", DataTable)
        if not 0 <= table.cursor_row < len(self.shown):
            return
        change = self.shown[table.cursor_row]
        acted = _RULE_WHERE.match(change.rule)
        if acted:
            self.editor.edit_rule(int(acted.group(1)) - 1)
        else:
            # No rule matched the element (the profile decided it), so where the new rule
            # goes in the order does not matter to it: last.
            self.editor.add_rule(len(self.editor.draft.rules), change.keyword or change.tag)

    @work(thread=True, group="rules-preview", exclusive=True, exit_on_error=False, name="preview")
    def run_preview(self, source: str, draft: rules.RuleSet) -> None:
        engine = self.webaims.engine
        outcome: anonymize.DryRunReport | str
        try:
            if source.startswith("#"):
                path = engine.instance_file(int(source[1:])).path
            else:
                path = Path(source).expanduser()
            outcome = engine.dry_run(path, draft)
        except Exception as exc:  # an unreadable file must not end the editor
            outcome = f"Cannot preview {source!r}: {exc}"
        self.app.call_from_thread(self.ran, source, draft, outcome)

    def ran(self, source: str, draft: rules.RuleSet, outcome: anonymize.DryRunReport | str) -> None:
        # A thread cannot be interrupted: a run that a newer source or draft superseded still
        # ends, and must not replace what the newer run shows.
        if source != self.source or draft != self.editor.draft:
            return
        if isinstance(outcome, str):
            self.failed(outcome)
        elif outcome != self.report:
            # An unchanged result (a draft loaded again, a change undone) leaves the table be.
            self.report = outcome
            self.show_report()

    def failed(self, message: str) -> None:
        # The table would otherwise go on showing another instance or an older draft.
        self.report = None
        self.shown = []
        self.query_one("#preview-table", DataTable).clear()
        verdict = self.query_one("#preview-verdict", Static)
        verdict.update(message)
        verdict.set_class(True, "-refused")
        verdict.set_class(False, "-clean")

    def show_report(self) -> None:
        report = self.report
        if report is None:
            return
        table = self.query_one("#preview-table", DataTable)
        # A rerun keeps the cursor on the element it was on (the one just edited, usually).
        row = table.cursor_row
        highlighted = self.shown[row].path if 0 <= row < len(self.shown) else None
        changed = [c for c in report.changes if c.changed]
        by_rules = [c for c in changed if c.rule.startswith("rule ")]
        self.shown = report.changes if self.show_all else changed
        # Before and after side by side must fit 80 columns next to the tag and keyword.
        width = 18 if self.app.size.width < 110 else 26
        rows: list[tuple[str | Text, ...]] = []
        for change in self.shown:
            # The edited rules' own effects stand out from the profile's.
            style = "bold yellow" if change.rule.startswith("rule ") else ""
            if not change.changed:
                style = "dim"
            rows.append(
                (
                    change.tag,
                    _short(change.keyword or change.path, width),
                    Text(_short(change.before, width), style="red" if change.changed else ""),
                    Text(_short(change.after, width), style="green" if change.changed else ""),
                    Text(_acted_by(change.rule), style=style),
                    change.action,
                )
            )
        # Columns as wide as their content, measured here: DataTable measures on idle, and a
        # frame drawn before that is cached with label-wide columns (Textual 8.2.8 keeps it).
        table.clear(columns=True)
        for index, label in enumerate(PREVIEW_COLUMNS):
            widths = [cell_len(label)] + [_cell_width(row[index]) for row in rows]
            table.add_column(label, key=label, width=max(widths))
        table.add_rows(rows)
        paths = [c.path for c in self.shown]
        if highlighted in paths:
            table.move_cursor(row=paths.index(highlighted))
        verdict = self.query_one("#preview-verdict", Static)
        summary = (
            f"{len(changed)} of {len(report.changes)} elements changed, {len(by_rules)} by "
            f"the rule set's own rules (yellow), the rest by the profile"
        )
        if report.refused is not None:
            verdict.update(
                f"QUARANTINE: {report.refused.reason}: {report.refused.detail}\n{summary}"
            )
        else:
            verdict.update(f"Residual-PHI check: clean. {summary}")
        verdict.set_class(report.refused is not None, "-refused")
        verdict.set_class(report.refused is None, "-clean")


def _short(value: str | None, width: int = 32) -> str:
    if value is None:
        return "—"
    return value if len(value) <= width else value[: width - 1] + "…"


def _cell_width(cell: str | Text) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


#: The preview table's columns, in order.
PREVIEW_COLUMNS = ("Tag", "Keyword", "Before", "After", "By", "Action")


def _acted_by(label: str) -> str:
    """ "rule 2" for the rule set's own rules, "profile" for the PS3.15 profile's."""
    match = _RULE_WHERE.match(label)
    if match:
        return f"rule {match.group(1)}"
    return label.split(" ", 1)[0] if label else ""


class RuleSetTable(DataTable[str | Text]):
    """The stored rule set versions; one that left PHI in files is marked with their count.

    The mark takes the ``rule-set-table--leaks`` style from styles/app.tcss: a table cell
    cannot carry a CSS class itself, a component class is how the stylesheet reaches it.
    """

    COMPONENT_CLASSES = DataTable.COMPONENT_CLASSES | {"rule-set-table--leaks"}

    def leak_mark(self, leaks: int) -> Text | str:
        """The PHI column's cell for a version that leaked ``leaks`` files."""
        if not leaks:
            return ""
        return Text(
            f"⚠ {leaks}", self.get_component_rich_style("rule-set-table--leaks", partial=True)
        )


class RulesScreen(WebaimsScreen):
    """Mode ``rules``: stored rule sets on the left, the draft being edited on the right."""

    TITLE = "Anonymization rules"
    HELP = """\
[b]Anonymization rules[/b]
Left: every stored rule set version (● = active). Enter on one loads it into the editor.
PHI ⚠ n: that version left identifying values in n files, which the residual-PHI check sent
to quarantine/residual-phi/ instead of the archive.
Right: the draft. Its name (saving under a new name starts a new rule set), the profile
(basic: PS3.15 Basic Profile; none: only the rules), date handling, the option switches
(space toggles), the rules in order (the first rule matching an element decides;
the profile acts where no rule does). a adds a rule, e or enter edits, d deletes,
K/J (shift+up/down) move it. Errors show beside the rule and block saving.
p previews the draft on an archived instance (#id) or a file: before/after and the
residual-PHI verdict, run again on every change of the draft; e there edits the rule that
decided the highlighted element (or adds one for it). ctrl+s saves the draft as a new
version; A activates the version shown (after saying what it applies to). i imports a TOML
file into the draft, x exports the draft."""

    BINDINGS = [
        Binding("a", "add_rule", "Add"),
        Binding("e", "edit_rule", "Edit", show=False),
        Binding("d", "delete_rule", "Delete"),
        Binding("shift+up,K", "move(-1)", "Up", show=False),
        Binding("shift+down,J", "move(1)", "Down", show=False),
        Binding("p", "preview", "Preview"),
        Binding("ctrl+s", "save", "Save"),
        Binding("A", "activate", "Activate"),
        Binding("i", "import_toml", "Import", show=False),
        Binding("x", "export_toml", "Export", show=False),
        Binding("escape", "focus_rules", "Rules", show=False),
    ]

    #: Reactive so that the preview, a screen of its own over this one, can watch it.
    draft: var[rules.RuleSet] = var(default_rule_set, init=False)

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[rules.StoredRuleSet] = []
        self.loaded: rules.StoredRuleSet | None = None
        self.dirty = False
        self.errors: list[rules.RuleError] = []
        #: What the last preview showed: the next one opens on it.
        self.preview_source: str | None = None

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        with Horizontal(id="rules-body"):
            yield RuleSetTable(id="rule-sets", cursor_type="row")
            with Vertical(id="rules-editor"):
                with Horizontal(id="rules-name-bar"):
                    yield Input(self.draft.name, placeholder="rule set name", id="rules-name")
                    yield Select[str](
                        [(PROFILE_LABELS.get(p, p), p) for p in rules.PROFILES],
                        value=self.draft.profile.name,
                        allow_blank=False,
                        id="rules-profile",
                    )
                    yield Select[str](
                        [(f"dates: {c}", c) for c in rules.LONGITUDINAL_CHOICES],
                        value=self.draft.profile.retain_longitudinal,
                        allow_blank=False,
                        id="rules-longitudinal",
                    )
                yield Static("", id="rules-state")
                yield SelectionList[str](id="profile-options")
                table: DataTable[str | Text] = DataTable(id="rules-table", cursor_type="row")
                yield table
                yield Static("", id="rules-errors")
        yield Static("", id="rules-message")
        yield Footer()

    def on_mount(self) -> None:
        if self.app.is_headless:
            self.query_one("#rules-name", Input).cursor_blink = False
        sets = self.query_one("#rule-sets", DataTable)
        for column in ("", "Rule set", "v"):
            sets.add_column(column, key=column or "active")
        sets.add_column("PHI", key="leaks")
        table = self.query_one("#rules-table", DataTable)
        for column in ("#", "!", "Match", "Action", "Argument", "Comment"):
            table.add_column(column, key=column)
        self.show_draft()
        table.focus()
        if self.webaims.engine_ready:
            self.engine_ready()

    def engine_ready(self) -> None:
        self.load_stored(open_active=self.loaded is None and not self.dirty)

    def on_screen_resume(self) -> None:
        # Files quarantined while another screen was shown change the leak counts (until the
        # first load has listed anything, that load is still to come and fetches them). Its
        # own worker group: an exclusive "rules" load would cancel a save or an activation
        # just started by the dialog whose closing resumed this screen.
        if self.stored:
            self.load_leaks()

    # --- stored rule sets ---------------------------------------------------------------------

    @work(thread=True, group="rules", exclusive=True, exit_on_error=False, name="rule sets")
    def load_stored(self, open_active: bool = False) -> None:
        engine = self.webaims.engine
        stored = engine.rule_sets()
        leaks = engine.residual_phi_leaks()
        draft: tuple[rules.RuleSet, rules.StoredRuleSet] | None = None
        if open_active:
            active = next((s for s in stored if s.active), None)
            if active is not None:
                draft = engine.rule_set(active.name, active.version)
        self.app.call_from_thread(self.show_stored, stored, leaks, draft)

    def show_stored(
        self,
        stored: list[rules.StoredRuleSet],
        leaks: dict[int, int],
        draft: tuple[rules.RuleSet, rules.StoredRuleSet] | None = None,
    ) -> None:
        self.stored = stored
        table = self.query_one("#rule-sets", RuleSetTable)
        table.clear()
        for item in reversed(stored):  # newest first
            table.add_row(
                Text("●", style="green") if item.active else "",
                item.name,
                str(item.version),
                table.leak_mark(leaks.get(item.id, 0)),
                key=str(item.id),
            )
        if draft is not None:
            self.open(*draft)
        else:
            self.show_state()

    @work(thread=True, group="rule-leaks", exclusive=True, exit_on_error=False, name="leaks")
    def load_leaks(self) -> None:
        leaks = self.webaims.engine.residual_phi_leaks()
        self.app.call_from_thread(self.show_leaks, leaks)

    def show_leaks(self, leaks: dict[int, int]) -> None:
        table = self.query_one("#rule-sets", RuleSetTable)
        for item in self.stored:  # the table's rows: both are set together by show_stored
            mark = table.leak_mark(leaks.get(item.id, 0))
            table.update_cell(str(item.id), "leaks", mark, update_width=True)

    @on(DataTable.RowSelected, "#rule-sets")
    def open_selected(self, event: DataTable.RowSelected) -> None:
        chosen = next((s for s in self.stored if str(s.id) == event.row_key.value), None)
        if chosen is None:
            return
        if self.dirty:

            def answered(confirmed: bool | None) -> None:
                if confirmed:
                    self.fetch(chosen)

            question = "The draft has unsaved changes. Discard them and open the stored version?"
            self.app.push_screen(ConfirmScreen(question, yes="Discard"), answered)
            return
        self.fetch(chosen)

    @work(thread=True, group="rules", exit_on_error=False, name="open rule set")
    def fetch(self, chosen: rules.StoredRuleSet) -> None:
        try:
            rule_set, stored = self.webaims.engine.rule_set(chosen.name, chosen.version)
        except rules.RuleSetInvalid as exc:
            self.app.call_from_thread(self.say, str(exc), error=True)
            return
        self.app.call_from_thread(self.open, rule_set, stored)

    def open(self, rule_set: rules.RuleSet, stored: rules.StoredRuleSet | None) -> None:
        self.draft = rule_set
        self.loaded = stored
        self.dirty = False
        self.show_draft()

    # --- the draft ----------------------------------------------------------------------------

    def show_draft(self) -> None:
        """Everything the editor shows from ``self.draft`` (after a load or an import)."""
        self.query_one("#rules-name", Input).value = self.draft.name
        self.query_one("#rules-longitudinal", Select).value = self.draft.profile.retain_longitudinal
        self.query_one("#rules-profile", Select).value = self.draft.profile.name
        options = self.query_one("#profile-options", SelectionList)
        options.clear_options()
        options.add_options(
            [
                Selection(label, name, bool(getattr(self.draft.profile, name)))
                for name, label in PROFILE_SWITCHES
            ]
        )
        self.render_rules()

    def change(self, draft: rules.RuleSet) -> None:
        """Every edit goes through here: new draft, validation, redraw."""
        self.draft = draft
        self.dirty = True
        self.render_rules()

    def render_rules(self) -> None:
        # The engine's own validation (pure: no database), run on every change.
        self.errors = self.webaims.engine.check_rule_set(self.draft)
        by_rule, others = errors_by_rule(self.errors)
        table = self.query_one("#rules-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for index, rule in enumerate(self.draft.rules):
            problems = by_rule.get(index, [])
            table.add_row(
                str(index + 1),
                Text("✗", style="bold red") if problems else "",
                rule.match,
                rule.action,
                rule_argument(rule),
                rule.comment,
            )
        if table.row_count:
            table.move_cursor(row=min(max(cursor, 0), table.row_count - 1))
        # The reasons, numbered like the rows they belong to (marked ✗ in the table).
        lines = [
            f"✗ rule {index + 1}: {reason}"
            for index, reasons in sorted(by_rule.items())
            for reason in reasons
        ]
        lines += [f"✗ {e}" for e in others]
        if lines:
            lines.append("saving is blocked until these are fixed")
        self.query_one("#rules-errors", Static).update("\n".join(lines))
        self.show_state()

    def show_state(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        loaded = self.loaded
        if loaded is None:
            text.append("new draft (not stored)")
        else:
            text.append(f"{loaded.name} v{loaded.version} ")
            if any(s.id == loaded.id and s.active for s in self.stored) or loaded.active:
                text.append("● active", style="green")
        text.append(f" · {len(self.draft.rules)} rules")
        if self.dirty:
            text.append(" · unsaved changes", style="bold yellow")
        if self.errors:
            text.append(f" · {len(self.errors)} error(s)", style="bold red")
        self.query_one("#rules-state", Static).update(text)

    @on(Input.Changed, "#rules-name")
    def name_changed(self, event: Input.Changed) -> None:
        if event.value != self.draft.name:
            self.change(dataclasses.replace(self.draft, name=event.value.strip()))

    @on(Select.Changed, "#rules-longitudinal")
    def longitudinal_changed(self, event: Select.Changed) -> None:
        value = str(event.value)
        if value != self.draft.profile.retain_longitudinal:
            profile = dataclasses.replace(self.draft.profile, retain_longitudinal=value)
            self.change(dataclasses.replace(self.draft, profile=profile))

    @on(Select.Changed, "#rules-profile")
    def profile_changed(self, event: Select.Changed) -> None:
        value = str(event.value)
        if value != self.draft.profile.name:
            profile = dataclasses.replace(self.draft.profile, name=value)
            self.change(dataclasses.replace(self.draft, profile=profile))

    @on(SelectionList.SelectedChanged, "#profile-options")
    def switches_changed(self) -> None:
        selected = set(self.query_one("#profile-options", SelectionList).selected)
        values: dict[str, Any] = {name: name in selected for name, _label in PROFILE_SWITCHES}
        if all(getattr(self.draft.profile, k) == v for k, v in values.items()):
            return
        profile = dataclasses.replace(self.draft.profile, **values)
        self.change(dataclasses.replace(self.draft, profile=profile))

    def say(self, text: str, *, error: bool = False) -> None:
        message = self.query_one("#rules-message", Static)
        message.update(text)
        message.set_class(error, "-error")

    # --- rule actions -------------------------------------------------------------------------

    def _cursor(self) -> int | None:
        table = self.query_one("#rules-table", DataTable)
        if not self.draft.rules or not 0 <= table.cursor_row < len(self.draft.rules):
            return None
        return table.cursor_row

    def action_focus_rules(self) -> None:
        self.query_one("#rules-table", DataTable).focus()

    def action_add_rule(self) -> None:
        index = self._cursor()
        self.add_rule(len(self.draft.rules) if index is None else index + 1)

    def add_rule(self, at: int, match: str = "") -> None:
        """Ask for a new rule (its match filled in with ``match``) and insert it at ``at``."""

        def added(rule: rules.Rule | None) -> None:
            if rule is not None:
                new = (*self.draft.rules[:at], rule, *self.draft.rules[at:])
                self.change(dataclasses.replace(self.draft, rules=new))
                self.query_one("#rules-table", DataTable).move_cursor(row=at)

        self.app.push_screen(RuleFormScreen(self.draft, match=match), added)

    @on(DataTable.RowSelected, "#rules-table")
    def action_edit_rule(self) -> None:
        index = self._cursor()
        if index is not None:
            self.edit_rule(index)

    def edit_rule(self, index: int) -> None:
        """Ask for the rule at ``index`` (0-based) changed; the table's cursor goes to it."""
        if not 0 <= index < len(self.draft.rules):
            return
        # Edited from the preview, the rule is the one under the cursor on coming back.
        self.query_one("#rules-table", DataTable).move_cursor(row=index)

        def edited(rule: rules.Rule | None) -> None:
            if rule is not None:
                new = list(self.draft.rules)
                new[index] = rule
                self.change(dataclasses.replace(self.draft, rules=tuple(new)))

        self.app.push_screen(RuleFormScreen(self.draft, self.draft.rules[index]), edited)

    def action_delete_rule(self) -> None:
        index = self._cursor()
        if index is None:
            return
        new = self.draft.rules[:index] + self.draft.rules[index + 1 :]
        removed = self.draft.rules[index]
        self.change(dataclasses.replace(self.draft, rules=new))
        self.say(f"Rule {removed.match} → {removed.action} deleted from the draft (not saved).")

    def action_move(self, step: int) -> None:
        index = self._cursor()
        if index is None or not 0 <= index + step < len(self.draft.rules):
            return
        new = list(self.draft.rules)
        new[index], new[index + step] = new[index + step], new[index]
        self.change(dataclasses.replace(self.draft, rules=tuple(new)))
        self.query_one("#rules-table", DataTable).move_cursor(row=index + step)

    # --- preview, save, activate --------------------------------------------------------------

    def action_preview(self) -> None:
        if self.errors:
            self.say("Fix the errors first: an invalid rule set cannot be applied.", error=True)
            return
        if self.preview_source is None:
            self.pick_preview_source()
        else:
            self.open_preview(self.preview_source)

    @work(thread=True, group="rules-preview", exit_on_error=False, name="preview source")
    def pick_preview_source(self) -> None:
        source = default_preview_source(self.webaims)
        self.app.call_from_thread(self.open_preview, source)

    def open_preview(self, source: str) -> None:
        preview = PreviewScreen(self, source)

        def closed(_result: None) -> None:
            self.preview_source = preview.source

        self.app.push_screen(preview, closed)

    def action_save(self) -> None:
        if self.errors:
            self.say(f"Not saved: {len(self.errors)} error(s); see beside the rules.", error=True)
            self.app.bell()
            return
        if not self.dirty and self.loaded is not None:
            self.say(f"Nothing to save: {self.loaded.name} v{self.loaded.version} is unchanged.")
            return
        self.save(self.draft)

    @work(thread=True, group="rules", exit_on_error=False, name="save rule set")
    def save(self, draft: rules.RuleSet) -> None:
        engine = self.webaims.engine
        try:
            stored = engine.save_rule_set(draft, comment="edited in the TUI")
        except rules.RuleSetInvalid as exc:
            self.app.call_from_thread(self.say, f"Not saved: {exc}", error=True)
            return
        self.app.call_from_thread(self._saved, draft, stored)

    def _saved(self, draft: rules.RuleSet, stored: rules.StoredRuleSet) -> None:
        if draft == self.draft:
            self.dirty = False
        self.loaded = stored
        self.say(f"Saved as {stored.name} v{stored.version} (not active: A activates it).")
        self.load_stored()

    def action_activate(self) -> None:
        if self.dirty or self.loaded is None:
            self.say("Save the draft first (ctrl+s): only a stored version is activated.")
            return
        if self.loaded.active and any(s.id == self.loaded.id and s.active for s in self.stored):
            self.say(f"{self.loaded.name} v{self.loaded.version} is already active.")
            return
        self.ask_activation(self.loaded)

    @work(thread=True, group="rules", exit_on_error=False, name="activation")
    def ask_activation(self, stored: rules.StoredRuleSet) -> None:
        waiting = self.webaims.engine.stats().incoming
        question = (
            f"Activate {stored.name} v{stored.version}?\n\n"
            f"It will anonymize the {waiting:,} file(s) waiting in incoming/ and every instance "
            "received from now on. Instances already archived keep the version that "
            "anonymized them."
        )

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self.activate(stored)

        self.app.call_from_thread(
            self.app.push_screen, ConfirmScreen(question, yes="Activate"), answered
        )

    @work(thread=True, group="rules", exit_on_error=False, name="activate rule set")
    def activate(self, stored: rules.StoredRuleSet) -> None:
        engine = self.webaims.engine
        try:
            active = engine.activate_rule_set(stored.name, stored.version)
            engine.apply_active_rule_set()
        except rules.RuleSetInvalid as exc:
            self.app.call_from_thread(self.say, f"Not activated: {exc}", error=True)
            return
        self.app.call_from_thread(self._activated, active)

    def _activated(self, active: rules.StoredRuleSet) -> None:
        self.loaded = active
        self.say(f"{active.name} v{active.version} is active: new instances use it now.")
        self.load_stored()

    # --- TOML import / export -----------------------------------------------------------------

    def action_import_toml(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.import_toml(path)

        self.app.push_screen(PathScreen("Import a rule set from the TOML file:", ""), chosen)

    @work(thread=True, group="rules", exit_on_error=False, name="import rules")
    def import_toml(self, path: Path) -> None:
        try:
            rule_set = rules.loads(path.read_text(encoding="utf-8"), source=str(path))
        except (OSError, UnicodeDecodeError) as exc:
            self.app.call_from_thread(self.say, f"Cannot read {path}: {exc}", error=True)
            return
        except rules.RuleSetInvalid as exc:
            self.app.call_from_thread(self.say, f"Not imported: {exc}", error=True)
            return
        self.app.call_from_thread(self._imported, rule_set, path)

    def _imported(self, rule_set: rules.RuleSet, path: Path) -> None:
        self.open(rule_set, None)
        self.dirty = True
        self.show_state()
        self.say(f"Imported {path} into the draft: ctrl+s stores it as a new version.")

    def action_export_toml(self) -> None:
        default = str(Path.cwd() / f"{self.draft.name or 'rules'}.toml")

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.export_toml(path, rules.dumps(self.draft))

        self.app.push_screen(PathScreen("Export the draft as TOML to:", default), chosen)

    @work(thread=True, group="rules", exit_on_error=False, name="export rules")
    def export_toml(self, path: Path, text: str) -> None:
        if path.exists():
            self.app.call_from_thread(
                self.say, f"Not exported: {path} exists (no file is overwritten).", error=True
            )
            return
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.app.call_from_thread(self.say, f"Cannot write {path}: {exc}", error=True)
            return
        self.app.call_from_thread(self.say, f"Exported the draft to {path}.")


def default_preview_source(app: WebaimsApp) -> str:
    """A file waiting in incoming/ (original data: the interesting case), else instance #1."""
    incoming = app.engine.settings.paths.incoming
    for path in sorted(incoming.rglob("*")) if incoming.exists() else []:
        if path.is_file() and not path.name.endswith(".part"):
            return str(path)
    return "#1"
