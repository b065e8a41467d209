"""Pilot tests of the rule editor: validation blocks saving, preview, save, activate."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import Button, DataTable, Input, Label, Select, Static

from tests.ui.archive import TEST_FILES
from tests.ui.conftest import SIZE, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings, ensure_folders
from webaims_tui.engine import rules
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.engine.service import Engine
from webaims_tui.screens.dialogs import ConfirmScreen
from webaims_tui.screens.rule_form import RuleFormScreen
from webaims_tui.screens.rules import PathScreen, PreviewScreen, RuleSetTable, RulesScreen

# Each drives a whole running app (engine, threads, dialogs): several seconds on 2 cores.
pytestmark = pytest.mark.slow


def _render(widget: Static | Label) -> str:
    return str(widget.render())


async def test_edit_invalid_then_valid_preview_save_activate(settings: Settings) -> None:
    ensure_folders(settings)
    # Two originals wait in incoming/ (no server, no autoloader): the activation applies to them.
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(TEST_FILES / name, settings.paths.incoming / name)
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the engine")
        await pilot.press("4")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        assert len(screen.draft.rules) == 2  # the built-in default, not stored yet

        # Add a rule: the keyword picker completes "PatientBir" to PatientBirthDate.
        await pilot.press("a")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        await pilot.press(*"PatientBir", "right")
        assert form.query_one("#rule-match", Input).value == "PatientBirthDate"
        assert "(0010,0030)" in _render(form.query_one("#rule-element", Label))
        form.query_one("#rule-action", Select).value = "set"
        form.query_one("#rule-value", Input).value = "1990"
        await pilot.pause()
        problems = _render(form.query_one("#rule-problems", Label))
        assert "not a DICOM date" in problems
        assert form.query_one("#save", Button).disabled
        await pilot.press("ctrl+s")
        assert app.screen is form  # blocked
        form.query_one("#rule-value", Input).value = "19000101"
        await pilot.pause()
        assert not form.query_one("#save", Button).disabled
        await pilot.press("ctrl+s")
        assert app.screen is screen
        # Inserted after the rule under the cursor (the first one).
        assert [r.match for r in screen.draft.rules][1] == "PatientBirthDate"
        assert screen.dirty and not screen.errors

        # An invalid draft (no name) shows the error and blocks saving.
        screen.query_one("#rules-name", Input).value = ""
        await pilot.pause()
        assert "name: must not be empty" in _render(screen.query_one("#rules-errors", Static))
        screen.query_one("#rules-table", DataTable).focus()
        await pilot.press("ctrl+s")
        assert "Not saved" in _render(screen.query_one("#rules-message", Static))
        assert app.engine.rule_sets() == []
        screen.query_one("#rules-name", Input).value = "study-x"
        await pilot.pause()
        assert not screen.errors

        # Preview on a file waiting in incoming/: the new rule (2) writes the birth date.
        screen.query_one("#rules-table", DataTable).focus()
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, PreviewScreen), "the preview")
        preview = app.screen
        assert isinstance(preview, PreviewScreen)
        await wait_until(pilot, lambda: preview.report is not None, "the dry run")
        assert preview.report is not None
        birth = next(c for c in preview.report.changes if c.keyword == "PatientBirthDate")
        assert birth.after == "19000101" and birth.rule.startswith("rule 2 ")
        verdict = _render(preview.query_one("#preview-verdict", Static))
        assert "Residual-PHI check: clean" in verdict or "QUARANTINE" in verdict
        assert "by the rule set's own rules" in verdict
        await pilot.press("escape")
        assert app.screen is screen

        # Nothing was written so far; save makes version 1 (not active).
        assert app.engine.rule_sets() == []
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: screen.loaded is not None, "the save")
        assert screen.loaded is not None
        assert (screen.loaded.name, screen.loaded.version) == ("study-x", 1)
        assert not any(s.active for s in app.engine.rule_sets())

        # Activate asks first and says what it applies to.
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        assert "2 file(s) waiting in incoming/" in confirm.question
        await pilot.press("y")
        await wait_until(
            pilot,
            lambda: any(s.active and s.name == "study-x" for s in app.engine.rule_sets()),
            "the activation",
        )
        await wait_until(
            pilot,
            lambda: "is active" in _render(screen.query_one("#rules-message", Static)),
            "the message",
        )
        assert app.engine.anonymizer is not None
        sets = screen.query_one("#rule-sets", DataTable)
        await wait_until(pilot, lambda: sets.row_count == 1, "the stored list")
        assert "●" in str(sets.get_cell_at(Coordinate(0, 0)))


async def test_export_and_import_toml(settings: Settings, tmp_path: Path) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the engine")
        await pilot.press("4")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        message = screen.query_one("#rules-message", Static)
        target = tmp_path / "exported.toml"

        await pilot.press("x")
        assert isinstance(app.screen, PathScreen)
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_until(pilot, lambda: target.exists(), "the export")
        assert rules.loads(target.read_text()) == screen.draft

        # No file is overwritten.
        await pilot.press("x")
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_until(pilot, lambda: "exists" in _render(message), "the refusal")

        # An edited file comes back into the draft, unsaved; an invalid one is refused.
        target.write_text(target.read_text().replace('name = "default"', 'name = "imported"'))
        await pilot.press("i")
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.draft.name == "imported", "the import")
        assert screen.dirty and screen.loaded is None
        broken = tmp_path / "broken.toml"
        broken.write_text('name = "x"\n[[rules]]\nmatch = "NoSuchKeyword"\naction = "remove"\n')
        await pilot.press("i")
        app.screen.query_one(Input).value = str(broken)
        await pilot.press("enter")
        await wait_until(pilot, lambda: "Not imported" in _render(message), "the refusal")
        assert "NoSuchKeyword" in _render(message)
        assert screen.draft.name == "imported"


def _leaking_file(folder: Path) -> Path:
    """CT_small.dcm (a new instance UID each time) with the patient's name in free text."""
    dataset = dcmread(TEST_FILES / "CT_small.dcm")
    dataset.StudyDescription = f"Follow-up of {dataset.PatientName}"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path)
    return path


def _quarantine_a_leak(engine: Engine, folder: Path) -> None:
    """One file through the autoloader with the active rule set; it must be quarantined."""
    engine.import_paths([_leaking_file(folder)])
    counters = engine.process_incoming()
    assert counters is not None and counters.quarantined == 1


async def test_the_version_that_leaked_phi_is_marked(settings: Settings, tmp_path: Path) -> None:
    # "leaking" v1 keeps StudyDescription, which names the patient: the residual-PHI check
    # quarantines the file. "clean" v1 never ran on anything.
    engine = Engine(settings)
    engine.open()
    try:
        engine.save_rule_set(dataclasses.replace(default_rule_set(), name="clean"))
        keep = rules.Rule(match="StudyDescription", action="keep")
        leaking = dataclasses.replace(
            default_rule_set(), name="leaking", rules=(*default_rule_set().rules, keep)
        )
        stored = engine.save_rule_set(leaking)
        leaked = engine.activate_rule_set(stored.name, stored.version)
        _quarantine_a_leak(engine, tmp_path)
    finally:
        engine.stop()

    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.engine_ready, "the engine")
        await pilot.press("4")
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        table = screen.query_one("#rule-sets", RuleSetTable)
        await wait_until(pilot, lambda: table.row_count == 2, "the stored list")
        clean = next(s for s in screen.stored if s.name == "clean")
        assert table.get_cell(str(clean.id), "leaks") == ""
        mark = table.get_cell(str(leaked.id), "leaks")
        assert isinstance(mark, Text) and mark.plain == "⚠ 1"
        # Its look comes from the stylesheet's rule for the component class.
        style = table.get_component_rich_style("rule-set-table--leaks", partial=True)
        assert mark.style == style and style.bold and style.color is not None

        # A leak while another screen is shown is counted when the rules screen comes back.
        await pilot.press("1")
        await asyncio.to_thread(_quarantine_a_leak, app.engine, tmp_path)
        await pilot.press("4")
        await wait_until(
            pilot,
            lambda: str(table.get_cell(str(leaked.id), "leaks")) == "⚠ 2",
            "the new count",
        )
