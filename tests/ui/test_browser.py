"""Pilot tests of the browser, with the real engine running: on a pre-filled archive, and end to
end on files a pynetdicom SCU sent and the autoloader archived.
"""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, MRImageStorage
from textual.widgets import DataTable, Tree

from tests.ui.archive import FIXED_TIME, FilledArchive
from tests.ui.conftest import SIZE, send_files, started, wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings
from webaims_tui.engine import db
from webaims_tui.screens.browser import BrowserScreen, parse_search
from webaims_tui.screens.dialogs import ConfirmScreen, ExportScreen
from webaims_tui.screens.instance import InstanceScreen


async def _browser(pilot: object) -> BrowserScreen:
    from textual.pilot import Pilot

    assert isinstance(pilot, Pilot)
    await started(pilot)
    await pilot.press("2")
    screen = pilot.app.screen
    assert isinstance(screen, BrowserScreen)
    await wait_until(pilot, lambda: screen.page is not None, "the first page")
    return screen


def _column(screen: BrowserScreen, index: int = 0) -> list[str]:
    table = screen.query_one("#units", DataTable)
    return [str(table.get_row_at(row)[index]) for row in range(table.row_count)]


async def _loaded(pilot: object, screen: BrowserScreen, level: str, count: int) -> None:
    from textual.pilot import Pilot

    assert isinstance(pilot, Pilot)
    await wait_until(
        pilot,
        lambda: (
            screen.page is not None
            and screen.page.query.level == level
            and screen.query_one("#units", DataTable).row_count == count
        ),
        f"{count} {level} rows",
    )


def _notifications(app: WebaimsApp) -> list[str]:
    return [n.message for n in app._notifications]


async def test_drill_down_to_an_instance_tag_dump_and_preview(
    settings: Settings, filled: FilledArchive
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        assert _column(screen) == ["ANON0001", "ANON0002", "ANON0003"]
        await pilot.press("enter")
        await _loaded(pilot, screen, "study", 1)
        assert _column(screen)[:2] == ["2024-01-15"]
        await pilot.press("enter")
        await _loaded(pilot, screen, "series", 2)
        await pilot.press("enter")
        await _loaded(pilot, screen, "instance", 1)
        assert "ANON0001" in str(screen.query_one("#breadcrumb").render())
        await wait_until(
            pilot,
            lambda: "Archive path" in str(screen.query_one("#detail").render()),
            "the detail pane",
        )
        await pilot.press("enter")
        assert isinstance(app.screen, InstanceScreen)
        instance = app.screen
        tree = instance.query_one("#tags", Tree)
        await wait_until(pilot, lambda: len(tree.root.children) > 10, "the tag dump")
        labels = [str(node.label) for node in tree.root.children]
        assert "(0008,0060) Modality CS CT" in labels
        assert any(label.startswith("(7FE0,0010) PixelData") for label in labels)
        await wait_until(pilot, lambda: instance.frame is not None, "the preview")
        state = str(instance.query_one("#preview-state").render())
        assert state.startswith("frame 1/1")
        window = instance.frame.window if instance.frame else 0
        await pilot.press("W")
        await wait_until(
            pilot,
            lambda: instance.frame is not None and instance.frame.window > window,
            "a wider window",
        )
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("backspace", "backspace", "backspace")
        await _loaded(pilot, screen, "patient", 3)


def _testdata_file(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(found)


def _patient_of_the_ct_instance() -> db.Patient:
    with db.database.connection_context():
        instance = db.Instance.get(db.Instance.sop_class_uid == CTImageStorage)
        return instance.series.study.patient


@pytest.mark.slow
async def test_received_files_are_browsed_anonymized_exported_and_deleted(
    settings: Settings,
) -> None:
    ct_file, mr_file = _testdata_file("CT_small.dcm"), _testdata_file("MR_small.dcm")
    original_name = str(dcmread(ct_file).PatientName)
    original_ids = {str(dcmread(path).PatientID) for path in (ct_file, mr_file)}
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        statuses = await asyncio.to_thread(send_files, app.port, [ct_file, mr_file])
        assert statuses == [0, 0]
        await wait_until(pilot, lambda: app.activity.archived == 2, "both files archived")
        patient = _patient_of_the_ct_instance()
        assert patient.patient_name and patient.patient_name != original_name

        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 2)
        patients = _column(screen)
        assert not original_ids & set(patients)
        await pilot.press(*["down"] * patients.index(patient.patient_id), "enter")
        await _loaded(pilot, screen, "study", 1)
        await pilot.press("enter")
        await _loaded(pilot, screen, "series", 1)
        await pilot.press("enter")
        await _loaded(pilot, screen, "instance", 1)
        await pilot.press("enter")
        instance = app.screen
        assert isinstance(instance, InstanceScreen)
        tree = instance.query_one("#tags", Tree)
        await wait_until(pilot, lambda: len(tree.root.children) > 10, "the tag dump")
        labels = [str(node.label) for node in tree.root.children]
        assert f"(0010,0010) PatientName PN {patient.patient_name}" in labels
        assert not [label for label in labels if original_name in label]

        await pilot.press("escape", "backspace", "backspace")
        await _loaded(pilot, screen, "study", 1)
        with db.database.connection_context():
            study = db.Study.get(db.Study.patient == patient.id)
            rows = list(db.Instance.select().join(db.Series).where(db.Series.study == study))
        archived = [settings.paths.archive / row.archive_path for row in rows]
        await pilot.press("e")
        assert isinstance(app.screen, ExportScreen)
        await pilot.press("enter")
        folder = settings.paths.data_dir / "exports" / f"study-{study.id}"
        exported = [folder / row.archive_path for row in rows]
        await wait_until(
            pilot,
            lambda: any("Exported 1 " in m for m in _notifications(app)),
            "the export notification",
        )
        assert [path.read_bytes() for path in exported] == [path.read_bytes() for path in archived]
        copy = dcmread(exported[0])
        assert copy.SOPInstanceUID == rows[0].sop_instance_uid
        assert str(copy.PatientName) == patient.patient_name

        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await _loaded(pilot, screen, "study", 0)
        assert not [path for path in archived if path.exists()]
        with db.database.connection_context():
            assert db.Study.get_or_none(db.Study.id == study.id) is None
            assert db.Instance.select().where(db.Instance.id.in_([r.id for r in rows])).count() == 0
            # The MR study, sent on the same association, is untouched.
            (kept,) = db.Instance.select()
        assert kept.sop_class_uid == MRImageStorage
        assert (settings.paths.archive / kept.archive_path).exists()


@pytest.mark.slow
async def test_sequences_expand_and_frames_step(settings: Settings, filled: FilledArchive) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        await pilot.press("down", "down", "enter")
        await _loaded(pilot, screen, "study", 1)
        await pilot.press("enter")
        await _loaded(pilot, screen, "series", 2)
        # Series 1 is the multi-frame RT dose.
        await pilot.press("enter")
        await _loaded(pilot, screen, "instance", 1)
        await pilot.press("enter")
        instance = app.screen
        assert isinstance(instance, InstanceScreen)
        await wait_until(pilot, lambda: instance.frame is not None, "the first frame")
        assert instance.frame is not None and instance.frame.count > 1
        await pilot.press("full_stop")
        await wait_until(
            pilot,
            lambda: instance.frame is not None and instance.frame.index == 1,
            "the second frame",
        )
        # A sequence: the cursor walks to it and Enter expands it.
        tree = instance.query_one("#tags", Tree)
        for _ in range(200):
            node = tree.cursor_node
            if node is not None and " SQ (" in str(node.label):
                break
            await pilot.press("down")
        node = tree.cursor_node
        assert node is not None and " SQ (" in str(node.label)
        assert not node.is_expanded
        await pilot.press("enter")
        assert node.is_expanded
        assert str(node.children[0].label) == "Item 1"


@pytest.mark.slow
async def test_search_by_modality_and_date_and_sort(
    settings: Settings, filled: FilledArchive
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        await pilot.press("slash", *"mod:MR", "enter")
        await _loaded(pilot, screen, "patient", 1)
        assert _column(screen) == ["ANON0002"]
        await pilot.press("slash", "ctrl+u", *"date:-2022", "enter")
        # An open-ended range: up to the end of 2022.
        await _loaded(pilot, screen, "patient", 1)
        assert _column(screen) == ["ANON0003"]
        await pilot.press("slash", "ctrl+u", "enter")
        await _loaded(pilot, screen, "patient", 3)
        await pilot.press("s")  # sort by the next column: name
        await wait_until(pilot, lambda: screen.query_state.sort == "patient_name", "the sort")
        await pilot.press("S")
        await wait_until(pilot, lambda: _column(screen, 1)[0] == "ANON^CHARLIE", "reversed")
        assert _column(screen, 1) == ["ANON^CHARLIE", "ANON^BRAVO", "ANON^ALPHA"]


def test_search_syntax() -> None:
    assert parse_search("smith date:20240101-20241231 mod:ct desc:head") == {
        "patient": "smith",
        "date_from": "20240101",
        "date_to": "20241231",
        "modality": "CT",
        "description": "head",
    }
    assert parse_search("date:2024-01-31")["date_to"] == "20240131"
    assert parse_search("date:2024-01-01..2024-02-01")["date_to"] == "20240201"
    assert parse_search("date:-2022")["date_from"] == ""
    assert parse_search("date:-2022")["date_to"] == "20229999"
    assert parse_search("date:202203")["date_from"] == "20220300"


async def test_export_a_patient_to_a_folder_and_to_a_zip(
    settings: Settings, filled: FilledArchive
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        patient = filled.patients["ANON0001"]
        await pilot.press("e")
        assert isinstance(app.screen, ExportScreen)
        await pilot.press("enter")
        folder = settings.paths.data_dir / "exports" / f"patient-{patient}"
        relative = filled.files["CT_small.dcm"].relative_to(settings.paths.archive)
        await wait_until(pilot, lambda: (folder / relative).exists(), "the exported files")
        assert (folder / relative).read_bytes() == filled.files["CT_small.dcm"].read_bytes()
        await wait_until(
            pilot,
            lambda: any("Exported 2" in m for m in _notifications(app)),
            "the export notification",
        )

        await pilot.press("e", "tab", "space", "tab", "enter")  # tick "as one zip file", Export
        bundle = folder.with_suffix(".zip")
        await wait_until(pilot, bundle.exists, "the zip file")
        with zipfile.ZipFile(bundle) as opened:
            assert sorted(opened.namelist()) == sorted(
                str(filled.files[name].relative_to(settings.paths.archive))
                for name in ("CT_small.dcm", "liver_1frame.dcm")
            )


@pytest.mark.slow
async def test_delete_asks_and_cancel_keeps_everything(
    settings: Settings, filled: FilledArchive
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        await pilot.press("down", "d")
        assert isinstance(app.screen, ConfirmScreen)
        assert "ANON0002" in app.screen.question
        await pilot.press("n")
        assert app.screen is screen
        await pilot.press("enter")  # Enter after a cancel: Cancel had the focus, nothing deleted
        await _loaded(pilot, screen, "study", 1)
        await pilot.press("backspace")
        await _loaded(pilot, screen, "patient", 3)
        assert filled.files["MR_small.dcm"].exists()

        # Back up, the cursor is on ANON0002 again.
        await pilot.press("d", "y")
        await _loaded(pilot, screen, "patient", 2)
        assert _column(screen) == ["ANON0001", "ANON0003"]
        assert not filled.files["MR_small.dcm"].exists()
        assert filled.files["CT_small.dcm"].exists()
        with db.database.connection_context():
            assert db.Patient.get_or_none(db.Patient.patient_id == "ANON0002") is None
            assert db.Instance.select().count() == 4
        await wait_until(
            pilot,
            lambda: any("Deleted patient ANON0002" in m for m in _notifications(app)),
            "the notification",
        )


async def test_a_failing_action_is_a_notification_not_a_crash(
    settings: Settings, filled: FilledArchive
) -> None:
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        # Someone else deletes the study rows behind the browser's back.
        with db.database.connection_context():
            db.Patient.delete().where(db.Patient.id == filled.patients["ANON0001"]).execute()
        await pilot.press("d", "y")
        await wait_until(
            pilot,
            lambda: any("no longer in the archive" in m for m in _notifications(app)),
            "the error",
        )
        assert app.is_running
        await pilot.press("r")
        await _loaded(pilot, screen, "patient", 2)


async def test_reanonymize_asks_first_and_explains_a_refusal(
    settings: Settings, filled: FilledArchive
) -> None:
    # The pre-filled archive keeps no originals: re-anonymizing must refuse, not anonymize twice.
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 3)
        await pilot.press("a")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("a", "y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("originals are not kept" in m for m in _notifications(app))
        await _loaded(pilot, screen, "patient", 3)


@pytest.mark.slow
async def test_pages_turn_with_brackets(settings: Settings) -> None:
    from webaims_tui.config import ensure_folders

    ensure_folders(settings)
    database = db.open_database(settings.paths.database_url)
    with database.atomic():
        db.Patient.insert_many(
            [
                {
                    "patient_id": f"P{number:04d}",
                    "patient_name": f"N{number}",
                    "created_at": FIXED_TIME,
                }
                for number in range(250)
            ]
        ).execute()
    database.close()
    app = WebaimsApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _browser(pilot)
        await _loaded(pilot, screen, "patient", 100)
        assert "1-100 of 250" in str(screen.query_one("#page-state").render())
        await pilot.press("right_square_bracket", "right_square_bracket")
        await _loaded(pilot, screen, "patient", 50)
        assert _column(screen)[0] == "P0200"
        await pilot.press("left_square_bracket")
        await _loaded(pilot, screen, "patient", 100)
        assert _column(screen)[0] == "P0100"
