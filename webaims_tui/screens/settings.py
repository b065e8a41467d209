"""Mode ``settings``: the effective settings, where each came from, and the live-changeable ones.

Values come from ``Engine.settings`` (what runs now) and their origin from
``Settings.source_of(key)``: default, file, environment, flag, or ``live`` after a change here.
Allowed calling AEs and the record unit change without a restart (``Engine.change_live_settings``);
the active rule set is changed on the Rules screen; everything else says "restart needed".
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Input, Static

from webaims_tui.config import ConfigError, Settings
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    pass

#: Keys edited elsewhere but live: shown with where to change them.
ELSEWHERE = {"anonymization.active_rule_set": "Rules screen (4)"}
LIVE = ("server.allowed_calling_aes", "autoloader.record_unit")


def setting_rows(settings: Settings, active_rules: str) -> list[tuple[str, str, str, str]]:
    """(key, value, source, how it changes) for every setting, in section order."""
    rows: list[tuple[str, str, str, str]] = []
    for section in ("server", "paths", "autoloader", "anonymization", "display"):
        values = getattr(settings, section)
        for item in dataclasses.fields(values):
            key = f"{section}.{item.name}"
            value = getattr(values, item.name)
            if isinstance(value, tuple):
                text = ", ".join(str(v) for v in value) or "(any)"
            else:
                text = str(value)
            how = "live (enter)" if key in LIVE else "restart needed"
            rows.append((key, text, settings.source_of(key), how))
    rows.append(("anonymization.active_rule_set", active_rules, "database", "live: Rules (4)"))
    rows.append(("config_file", str(settings.config_file), "", "restart needed"))
    return rows


class EditSettingScreen(ModalScreen[str | None]):
    """Asks for a new value of one live setting; the engine validates it."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, key: str, value: str, hint: str) -> None:
        super().__init__(classes="dialog")
        self.key = key
        self.value = value
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-body"):
            yield Static(f"[b]{self.key}[/b]\n{self.hint}", classes="dialog-question")
            yield Input(self.value, id="setting-value")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply (enter)", id="apply", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        field = self.query_one(Input)
        if self.app.is_headless:
            field.cursor_blink = False
        field.focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#apply")
    def apply(self) -> None:
        self.dismiss(self.query_one(Input).value)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class SettingsScreen(WebaimsScreen):
    """Mode ``settings``: one row per setting with its source."""

    TITLE = "Settings"
    HELP = """\
[b]Settings[/b]
The settings the archive runs with and where each came from (default, file, environment,
flag, or live when changed here). Enter on a "live" row changes it at once, without a restart
and without rewriting the config file (put it there to keep it). Change the active rule set on
the Rules screen (4). Other settings need the config file edited and a restart."""

    BINDINGS = [Binding("e", "edit", "Edit live setting")]

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        table: DataTable[str | Text] = DataTable(id="settings-table", cursor_type="row")
        yield table
        yield Static("", id="settings-message")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#settings-table", DataTable)
        # The value last: it is the long one (paths), and source and change must show at 80.
        for column in ("Setting", "Source", "Change", "Value"):
            table.add_column(column, key=column)
        table.focus()
        self.show(self.webaims.engine.settings, "…")
        if self.webaims.engine_ready:
            self.engine_ready()

    def engine_ready(self) -> None:
        self.load()

    def on_screen_resume(self) -> None:
        if self.webaims.engine_ready:
            self.load()

    @work(thread=True, group="settings", exclusive=True, exit_on_error=False, name="settings")
    def load(self) -> None:
        active = "(none stored yet: the built-in default)"
        for stored in self.webaims.engine.rule_sets():
            if stored.active:
                active = f"{stored.name} v{stored.version}"
        self.app.call_from_thread(self.show, self.webaims.engine.settings, active)

    def show(self, settings: Settings, active_rules: str) -> None:
        table = self.query_one("#settings-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for key, value, source, how in setting_rows(settings, active_rules):
            style = "green" if how.startswith("live") else "dim"
            table.add_row(key, source, Text(how, style=style), value, key=key)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    def say(self, text: str, *, error: bool = False) -> None:
        message = self.query_one("#settings-message", Static)
        message.update(text)
        message.set_class(error, "-error")

    @on(DataTable.RowSelected)
    def action_edit(self) -> None:
        table = self.query_one("#settings-table", DataTable)
        if not table.row_count:
            return
        key = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        settings = self.webaims.engine.settings
        if key == "server.allowed_calling_aes":
            value = ", ".join(settings.server.allowed_calling_aes)
            hint = "AE titles allowed to send to us, separated by commas (empty: anyone)."
        elif key == "autoloader.record_unit":
            value = settings.autoloader.record_unit
            hint = "Research record per: patient, study or series (applies to new records)."
        elif key in ELSEWHERE:
            self.say(f"{key} is changed on the {ELSEWHERE[key]}.")
            return
        else:
            self.say(f"{key} needs the config file edited and a restart.", error=True)
            return

        def apply(new_value: str | None) -> None:
            if new_value is not None:
                self.apply(key, new_value)

        self.app.push_screen(EditSettingScreen(key, value, hint), apply)

    def apply(self, key: str, value: str) -> None:
        engine = self.webaims.engine
        try:
            if key == "server.allowed_calling_aes":
                titles = tuple(part.strip() for part in value.split(",") if part.strip())
                engine.change_live_settings(allowed_calling_aes=titles)
            else:
                engine.change_live_settings(record_unit=value.strip())
        except ConfigError as exc:
            self.say(f"Not changed: {exc}", error=True)
            return
        self.say(f"{key} changed; in effect now (not written to the config file).")
        self.load()
