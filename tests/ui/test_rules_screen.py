"""Pilot tests of the rule editor: edits, validation, the live preview, save, activate."""

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
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, Label, Select, SelectionList, Static

from tests.ui.archive import TEST_FILES, FilledArchive
from tests.ui.conftest import SIZE, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings, ensure_folders
from webaims_tui.engine import anonymize, rules
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


async def _open_rules(pilot: Pilot[None]) -> RulesScreen:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the engine")
    await pilot.press("4")
    screen = app.screen
    assert isinstance(screen, RulesScreen)
    # The first load (nothing stored: the built-in default stays the draft) has ended.
    await wait_until(
        pilot,
        lambda: not any(w.node is screen and w.group == "rules" for w in screen.workers),
        "the stored list",
    )
    return screen


async def _choose_action(pilot: Pilot[None], form: RuleFormScreen, action: str) -> None:
    """From the match field: tab to the action menu, open it, type the action, take it."""
    await pilot.press("tab")
    menu = form.query_one("#rule-action", Select)
    assert menu.has_focus
    await pilot.press("enter", *action, "enter")
    assert menu.value == action


def _column(screen: RulesScreen, column: str) -> list[str]:
    table = screen.query_one("#rules-table", DataTable)
    return [
        str(table.get_cell_at(Coordinate(row, table.get_column_index(column))))
        for row in range(table.row_count)
    ]


async def test_edit_and_delete_a_rule(settings: Settings) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_rules(pilot)
        assert _column(screen, "Match") == ["PatientID", "PatientName"]
        assert _column(screen, "Action") == ["pseudonym", "pseudonym"]

        # Enter on rule 2 opens it in the form; its action becomes "remove".
        await pilot.press("down", "enter")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert _render(form.query_one(".dialog-question", Static)) == "Edit rule"
        assert form.query_one("#rule-match", Input).value == "PatientName"
        await _choose_action(pilot, form, "remove")
        await pilot.press("ctrl+s")
        assert app.screen is screen
        assert _column(screen, "Action") == ["pseudonym", "remove"]
        assert screen.draft.rules[1] == rules.Rule(match="PatientName", action="remove")
        assert screen.dirty

        # e on rule 1, then escape: nothing changes.
        await pilot.press("up", "e")
        assert isinstance(app.screen, RuleFormScreen)
        await pilot.press("escape")
        assert app.screen is screen
        assert _column(screen, "Action") == ["pseudonym", "remove"]

        # d deletes the rule under the cursor (rule 1) from the draft only.
        await pilot.press("d")
        assert _column(screen, "Match") == ["PatientName"]
        assert [r.match for r in screen.draft.rules] == ["PatientName"]
        assert "deleted from the draft" in _render(screen.query_one("#rules-message", Static))
        assert app.engine.rule_sets() == []


async def test_moved_rules_and_switches_are_saved_as_shown(settings: Settings) -> None:
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_rules(pilot)
        table = screen.query_one("#rules-table", DataTable)

        # K moves rule 2 up and the cursor goes with it; J moves it back down.
        await pilot.press("down", "K")
        assert _column(screen, "Match") == ["PatientName", "PatientID"]
        assert table.cursor_row == 0
        await pilot.press("J")
        assert _column(screen, "Match") == ["PatientID", "PatientName"]
        assert table.cursor_row == 1
        await pilot.press("K")
        assert _column(screen, "Match") == ["PatientName", "PatientID"]

        # The switches sit just before the rules; space flips "Remove private tags" off.
        assert screen.draft.profile.remove_private
        await pilot.press("shift+tab")
        switches = screen.query_one("#profile-options", SelectionList)
        assert switches.has_focus
        await pilot.press("down")
        assert switches.highlighted == 0
        await pilot.press("space")
        assert not screen.draft.profile.remove_private
        assert "remove_private" not in switches.selected

        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: screen.loaded is not None, "the save")
        saved, stored = app.engine.rule_set("default")
        assert stored.version == 1
        assert [r.match for r in saved.rules] == ["PatientName", "PatientID"]
        assert not saved.profile.remove_private
        text = app.engine.rule_set_text("default")
        assert text.index('"PatientName"') < text.index('"PatientID"')
        assert saved == screen.draft and not screen.dirty


def _name_in_study_description(path: Path) -> str:
    """Rewrites an archived file so its StudyDescription names the patient; returns the name."""
    dataset = dcmread(path)
    dataset.StudyDescription = f"Follow-up of {dataset.PatientName}"
    dataset.save_as(path)
    return str(dataset.PatientName)


def _change(preview: PreviewScreen, keyword: str) -> anonymize.ElementChange:
    assert preview.report is not None
    return next(c for c in preview.report.changes if c.keyword == keyword)


async def test_preview_of_an_archived_instance_follows_the_draft(
    settings: Settings, filled: FilledArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = _name_in_study_description(filled.files["CT_small.dcm"])
    source = f"#{filled.instances['CT_small.dcm']}"
    # A file waiting in incoming/ is what the first preview opens on, not the instance.
    shutil.copyfile(TEST_FILES / "MR_small.dcm", settings.paths.incoming / "MR_small.dcm")
    app = WebaimsApp(settings, start_server=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_rules(pilot)
        # A keep rule on the free text that carries the patient's name, added as rule 3.
        await pilot.press("down", "a")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        await pilot.press(*"StudyDescription")
        await _choose_action(pilot, form, "keep")
        await pilot.press("ctrl+s")
        assert [r.action for r in screen.draft.rules] == ["pseudonym", "pseudonym", "keep"]

        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, PreviewScreen), "the preview")
        preview = app.screen
        assert isinstance(preview, PreviewScreen)
        field = preview.query_one("#preview-source", Input)
        assert field.value.endswith("MR_small.dcm")
        await pilot.press("slash")
        assert field.has_focus
        await pilot.press("ctrl+u", *source, "enter")
        await wait_until(
            pilot,
            lambda: preview.report is not None and preview.source == source,
            "the dry run of the archived instance",
        )
        verdict = preview.query_one("#preview-verdict", Static)
        assert _render(verdict).startswith("QUARANTINE: residual-phi")
        assert "StudyDescription" in _render(verdict) and verdict.has_class("-refused")
        kept = _change(preview, "StudyDescription")
        assert kept.after == f"Follow-up of {patient}" and kept.rule.startswith("rule 3 ")
        # Kept means unchanged: only "all" shows it, marked as rule 3's doing.
        table = preview.query_one("#preview-table", DataTable)
        await pilot.press("a")
        row = next(i for i, c in enumerate(preview.shown) if c.keyword == "StudyDescription")
        assert str(table.get_cell_at(Coordinate(row, table.get_column_index("By")))) == "rule 3"

        # e on that row edits rule 3 over the preview; the preview runs again by itself.
        table.move_cursor(row=row)
        await pilot.press("e")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert form.query_one("#rule-match", Input).value == "StudyDescription"
        await _choose_action(pilot, form, "remove")
        await pilot.press("ctrl+s")
        assert preview.is_current
        assert screen.draft.rules[2].action == "remove"
        await wait_until(
            pilot, lambda: _change(preview, "StudyDescription").after is None, "the rerun"
        )
        assert _render(verdict).startswith("Residual-PHI check: clean")
        row = next(i for i, c in enumerate(preview.shown) if c.keyword == "StudyDescription")
        assert table.cursor_row == row  # still on the element just edited
        assert str(table.get_cell_at(Coordinate(row, table.get_column_index("After")))) == "—"

        # e on an element the profile decided adds a rule for it, last; the preview follows.
        decided = next(c for c in preview.shown if c.changed and not c.rule.startswith("rule "))
        table.move_cursor(row=preview.shown.index(decided))
        await pilot.press("e")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert _render(form.query_one(".dialog-question", Static)) == "Add a rule"
        assert form.query_one("#rule-match", Input).value == decided.keyword
        await _choose_action(pilot, form, "keep")
        await pilot.press("ctrl+s")
        assert screen.draft.rules[3] == rules.Rule(match=decided.keyword, action="keep")
        await wait_until(
            pilot, lambda: _change(preview, decided.keyword).rule.startswith("rule 4 "), "the rerun"
        )
        assert _change(preview, decided.keyword).after == decided.before

        # Changes in a burst under the preview, a keystroke's time apart (an import finishing
        # makes one too), are one dry run, of the last draft.
        runs: list[rules.RuleSet] = []
        dry_run = app.engine.dry_run

        def counted(path: Path, rule_set: rules.RuleSet | None = None) -> anonymize.DryRunReport:
            assert rule_set is not None
            runs.append(rule_set)
            return dry_run(path, rule_set)

        monkeypatch.setattr(app.engine, "dry_run", counted)
        # Gaps far shorter than the delay, so that a slow, shared machine cannot split it.
        monkeypatch.setattr(preview, "RERUN_DELAY", 1.0)
        for action in ("empty", "dummy", "keep"):
            rule = rules.Rule(match="StudyDescription", action=action)
            screen.change(dataclasses.replace(screen.draft, rules=(*screen.draft.rules[:2], rule)))
            await pilot.pause(0.1)
        await wait_until(pilot, lambda: "QUARANTINE" in _render(verdict), "the rerun")
        await pilot.pause(0.5)
        assert runs == [screen.draft]

        # Back in the editor and p again: the preview opens on the instance chosen before.
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, PreviewScreen), "the preview")
        assert app.screen is not preview and isinstance(app.screen, PreviewScreen)
        assert app.screen.source == source
        assert app.screen.query_one("#preview-source", Input).value == source
