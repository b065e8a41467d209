"""Snapshot tests of the query/retrieve, rules, nodes and settings screens at 80x24 and 120x40,
and of their dialogs (node form, live setting, rule set path, activation, help).

Deterministic by construction: no server and no network (query results and retrieve jobs are
put on the screen the way the workers would), a fixed clock, port 11112, nodes with fixed echo
times, a fixed site secret (pseudonyms, date shifts and UIDs in the preview derive from it), and
fixed paths on the Settings screen (the real ones live under a per-run temporary folder).
Regenerate with ``pytest tests/snapshots --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
from textual.containers import VerticalScroll
from textual.pilot import Pilot
from textual.widgets import DataTable, Select

from tests.conftest import SettingsFactory
from tests.ui.archive import fill_archive
from tests.ui.conftest import wait_until
from webaims_tui import locations
from webaims_tui.app import WebaimsApp
from webaims_tui.config import PathSettings
from webaims_tui.engine import db, qr
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.engine.rules import Rule, RuleSet
from webaims_tui.screens.dialogs import ConfirmScreen, HelpScreen
from webaims_tui.screens.node_form import NodeFormScreen
from webaims_tui.screens.query import QueryScreen, RetrieveJob, RetrieveRow
from webaims_tui.screens.rule_form import RuleFormScreen
from webaims_tui.screens.rules import PathScreen, PreviewScreen, RulesScreen
from webaims_tui.screens.settings import EditSettingScreen, SettingsScreen

NOW = datetime(2026, 12, 1, 10, 0, 30)
ECHOED = datetime(2026, 12, 1, 9, 58, 0)
SnapCompare = Callable[..., bool]
Before = Callable[[Pilot[None]], Awaitable[None]]


def _fill(database_url: str) -> None:
    database = db.open_database(database_url)
    try:
        db.RemoteNode.create(
            name="pacs-main",
            ae_title="PACS01",
            host="10.0.0.5",
            port=104,
            last_echo_at=ECHOED,
            last_echo_ok=True,
            last_echo_detail="echo ok in 12 ms",
        )
        db.RemoteNode.create(
            name="research-get",
            ae_title="RESEARCH",
            host="pacs.example.org",
            port=11112,
            query_model="patient",
            retrieve_method="c-get",
            tls=True,
            last_echo_at=ECHOED,
            last_echo_ok=False,
            last_echo_detail="connection refused: nothing listens on pacs.example.org:11112",
        )
        db.RemoteNode.create(name="old-pacs", ae_title="OLD", host="10.0.0.9", port=4242)
    finally:
        database.close()


@pytest.fixture
def make_app(make_settings: SettingsFactory) -> Callable[[], WebaimsApp]:
    def factory() -> WebaimsApp:
        settings = make_settings(port=11112)
        fill_archive(settings)
        _fill(settings.paths.database_url)
        secret = locations.site_secret_file(settings.paths.data_dir)
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("11" * 32 + "\n")
        return WebaimsApp(
            settings,
            clock=lambda: NOW,
            disk_free=lambda _path: 50 * 1024**3,
            start_server=False,
        )

    return factory


async def _ready(pilot: Pilot[None], key: str) -> WebaimsApp:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    await pilot.press(key)
    return app


async def _tables_measured(pilot: Pilot[None]) -> None:
    """Wait until every filled table has measured its rows: DataTable sizes its columns on idle,
    and a busy machine could otherwise take the screenshot with label-wide columns."""

    def measured() -> bool:
        for table in pilot.app.screen.query(DataTable):
            if table.row_count and all(
                column.content_width <= column.label.cell_len for column in table.columns.values()
            ):
                return False
        return True

    await wait_until(pilot, measured, "the tables to size their columns")
    await pilot.pause(0.2)


STUDIES: list[qr.StudyRow] = [
    qr.StudyRow(
        patient_id="QRP001",
        patient_name="QR^ALPHA",
        birth_date="19600101",
        study_instance_uid="1.2.826.0.1.3680043.10.1234.1",
        study_date="20240115",
        study_time="101500",
        accession_number="ACC001",
        description="CHEST CT",
        study_id="001",
        modalities=("CT",),
        series=2,
        instances=5,
    ),
    qr.StudyRow(
        patient_id="QRP001",
        patient_name="QR^ALPHA",
        birth_date="19600101",
        study_instance_uid="1.2.826.0.1.3680043.10.1234.2",
        study_date="20240620",
        study_time="101500",
        accession_number="ACC002",
        description="BRAIN MR",
        study_id="002",
        modalities=("MR",),
        series=1,
        instances=4,
    ),
    qr.StudyRow(
        patient_id="QRP002",
        patient_name="QR^BETA",
        birth_date="19751231",
        study_instance_uid="1.2.826.0.1.3680043.10.1234.3",
        study_date="20230301",
        study_time="101500",
        accession_number="ACC003",
        description="ABDOMEN",
        study_id="003",
        modalities=("CT", "MR"),
        series=2,
        instances=300,
    ),
]
SERIES = [
    qr.SeriesRow("QRP002", STUDIES[2].study_instance_uid, "1.2.3.1", "CT", 1, "AXIAL", 120),
    qr.SeriesRow("QRP002", STUDIES[2].study_instance_uid, "1.2.3.2", "MR", 2, "T2 COR", 180),
]


async def _query(pilot: Pilot[None]) -> None:
    app = await _ready(pilot, "3")
    screen = app.screen
    assert isinstance(screen, QueryScreen)
    await wait_until(pilot, lambda: screen.node_name is not None, "the nodes")
    screen.query_one("#qr-node", Select).value = "pacs-main"
    rows: list[qr.Row] = [*STUDIES]
    screen.show_results(
        "pacs-main", "STUDY", qr.FindResult(rows, 0, elapsed=0.4), check_archive=False
    )
    screen.set_archive_state(STUDIES[0].study_instance_uid, 5, 5)
    screen.set_archive_state(STUDIES[1].study_instance_uid, 0, 4)
    screen.set_archive_state(STUDIES[2].study_instance_uid, 120, 300)
    abdomen = next(e for e in screen.entries if e.row is STUDIES[2])
    screen._show_series(abdomen, qr.FindResult(list(SERIES), 0))
    screen.entries[0].selected = True
    screen.render_table()
    queue = screen.query_one("#qr-queue", VerticalScroll)
    queue.display = True
    jobs = [
        RetrieveJob(1, "pacs-main", "study 20240115 CHEST CT", [], [], state="done", completed=5),
        RetrieveJob(
            2,
            "pacs-main",
            "missing of study 20230301 ABDOMEN",
            [],
            [],
            state="running",
            completed=60,
            remaining=120,
        ),
        RetrieveJob(3, "pacs-main", "study 20240620 BRAIN MR", [], []),
    ]
    for job in jobs:
        screen.jobs.append(job)
        await queue.mount(RetrieveRow(job, id=f"job-{job.number}"))
    screen.say("3 studies from pacs-main in 0.4 s")
    await _tables_measured(pilot)


async def _query_failure(pilot: Pilot[None]) -> None:
    app = await _ready(pilot, "3")
    screen = app.screen
    assert isinstance(screen, QueryScreen)
    await wait_until(pilot, lambda: screen.node_name is not None, "the nodes")
    screen.query_one("#qr-node", Select).value = "pacs-main"
    screen.explain(
        "rejected",
        "PACS01@10.0.0.5:104 rejected the association: calling AE title not recognised "
        "(it does not know WEBAIMS)",
    )
    await _tables_measured(pilot)


async def _rules(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    stored = app.engine.save_rule_set(default_rule_set(), comment="built-in default")
    app.engine.activate_rule_set(stored.name, stored.version)
    study = dataclasses.replace(
        default_rule_set(),
        name="study-x",
        rules=(
            *default_rule_set().rules,
            Rule(match="PatientBirthDate", action="year-only", comment="age matters"),
            Rule(match="StudyDescription", action="keep"),
        ),
    )
    leaking = app.engine.save_rule_set(study)
    app.engine.save_rule_set(study)
    # Version 1 ran: StudyDescription, which it keeps, named the patient in three files, and
    # the residual-PHI check quarantined them (the rules screen marks the version).
    for number in range(3):
        db.QuarantineEntry.create(
            path=f"residual-phi/leak-{number}.dcm",
            reason="residual-phi",
            detail="StudyDescription still holds the PatientName value after rule set 'study-x'",
            ruleset_version=leaking.id,
        )
    await pilot.press("4")
    screen = app.screen
    assert isinstance(screen, RulesScreen)
    await wait_until(pilot, lambda: screen.loaded is not None, "the active rule set")
    # An unsaved edit that the editor flags: a rule whose value does not fit the VR.
    bad = Rule(match="PatientSex", action="set", value="female")
    screen.change(dataclasses.replace(screen.draft, rules=(*screen.draft.rules, bad)))
    await _tables_measured(pilot)


async def _rule_form(pilot: Pilot[None]) -> None:
    app = await _ready(pilot, "4")
    screen = app.screen
    assert isinstance(screen, RulesScreen)
    await pilot.press("a")
    await wait_until(pilot, lambda: isinstance(app.screen, RuleFormScreen), "the form")
    await pilot.press(*"StudyDa")
    await _tables_measured(pilot)


async def _preview(pilot: Pilot[None]) -> None:
    app = await _ready(pilot, "4")
    await pilot.press("p")
    await wait_until(pilot, lambda: isinstance(app.screen, PreviewScreen), "the preview")
    preview = app.screen
    assert isinstance(preview, PreviewScreen)
    await wait_until(pilot, lambda: preview.report is not None, "the dry run")

    def settled() -> bool:
        # A draft loaded underneath the preview re-runs it: wait until none is due or running.
        pending = preview.rerun is not None
        running = any(w.group == "rules-preview" and not w.is_finished for w in app.workers)
        return not pending and not running

    await wait_until(pilot, settled, "the preview to settle")
    await _tables_measured(pilot)


async def _nodes(pilot: Pilot[None]) -> None:
    app = await _ready(pilot, "5")

    table = app.screen.query_one("#nodes-table", DataTable)
    await wait_until(pilot, lambda: table.row_count == 3, "the nodes")
    await pilot.press("down")
    await _tables_measured(pilot)


async def _settings(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    # The real paths are under a per-run temporary folder: show fixed ones.
    root = Path("/srv/webaims")
    fixed = PathSettings(
        data_dir=root,
        incoming=root / "incoming",
        archive=root / "archive",
        quarantine=root / "quarantine",
        originals=root / "originals",
        spool=root / "spool",
        logs=root / "logs",
        database_url="sqlite:////srv/webaims/archive.db",
        linkage_database_url="sqlite:////srv/webaims/linkage.db",
    )
    app.engine.settings = dataclasses.replace(
        app.engine.settings, paths=fixed, config_file=Path("/etc/webaims/config.toml")
    )
    app.engine.change_live_settings(allowed_calling_aes=("CT_SCANNER_01", "MR_3T"))
    await pilot.press("6")
    screen = app.screen
    assert isinstance(screen, SettingsScreen)
    table = screen.query_one("#settings-table", DataTable)
    await wait_until(
        pilot,
        lambda: "…" not in str(table.get_row("anonymization.active_rule_set")),
        "the active rule set",
    )
    await _tables_measured(pilot)


async def _node_form_errors(pilot: Pilot[None]) -> None:
    await _nodes(pilot)
    app = pilot.app
    await pilot.press("a")
    await wait_until(pilot, lambda: isinstance(app.screen, NodeFormScreen), "the form")
    form = app.screen
    assert isinstance(form, NodeFormScreen)
    # Typed as a user would: a good name, an AE title over 16 characters, a port out of range.
    await pilot.press(*"pacs-new", "tab", *"RADIOLOGYARCHIVE02", "tab", *"10.0.0.7", "tab")
    await pilot.press(*"99999")
    await wait_until(pilot, lambda: set(form.errors) == {"ae_title", "port"}, "the two errors")
    await pilot.pause(0.2)


async def _edit_setting(pilot: Pilot[None]) -> None:
    await _settings(pilot)
    app = pilot.app
    table = app.screen.query_one("#settings-table", DataTable)
    table.move_cursor(row=table.get_row_index("server.allowed_calling_aes"))
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, EditSettingScreen), "the dialog")
    await pilot.pause(0.2)


async def _rules_loaded(pilot: Pilot[None], *others: RuleSet) -> RulesScreen:
    """The rules screen on the active built-in default (what a first start stores), with
    ``others`` stored as well."""
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    stored = app.engine.save_rule_set(default_rule_set(), comment="built-in default")
    app.engine.activate_rule_set(stored.name, stored.version)
    for other in others:
        app.engine.save_rule_set(other)
    await pilot.press("4")
    screen = app.screen
    assert isinstance(screen, RulesScreen)
    await wait_until(pilot, lambda: screen.loaded is not None, "the active rule set")
    await _tables_measured(pilot)
    return screen


async def _rules_import(pilot: Pilot[None]) -> None:
    await _rules_loaded(pilot)
    app = pilot.app
    await pilot.press("i")
    await wait_until(pilot, lambda: isinstance(app.screen, PathScreen), "the path dialog")
    await pilot.press(*"/srv/webaims/rules/study-x.toml")
    await pilot.pause(0.2)


async def _rules_activate(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    # Files waiting in incoming/ (no autoloader runs here): the question counts them.
    incoming = app.engine.settings.paths.incoming
    for number in range(3):
        (incoming / f"waiting-{number}.dcm").write_bytes(b"")
    study = dataclasses.replace(
        default_rule_set(),
        name="study-x",
        rules=(*default_rule_set().rules, Rule(match="StudyDescription", action="keep")),
    )
    screen = await _rules_loaded(pilot, study)
    # study-x v1 is the newest, so the first row of the stored versions: open it, activate it.
    screen.query_one("#rule-sets", DataTable).focus()
    await pilot.press("home", "enter")
    await wait_until(
        pilot, lambda: screen.loaded is not None and screen.loaded.name == "study-x", "study-x"
    )
    await pilot.press("A")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
    await pilot.pause(0.2)


async def _rules_help(pilot: Pilot[None]) -> None:
    await _rules_loaded(pilot)
    app = pilot.app
    await pilot.press("question_mark")
    await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize(
    "run_before",
    [
        _query,
        _query_failure,
        _rules,
        _rule_form,
        _preview,
        _nodes,
        _settings,
        _node_form_errors,
        _edit_setting,
        _rules_import,
        _rules_activate,
        _rules_help,
    ],
    ids=[
        "query",
        "query-failure",
        "rules",
        "rule-form",
        "preview",
        "nodes",
        "settings",
        "node-form-errors",
        "edit-setting",
        "rules-import",
        "rules-activate",
        "rules-help",
    ],
)
def test_part2_screen(
    snap_compare: SnapCompare,
    make_app: Callable[[], WebaimsApp],
    run_before: Before,
    size: tuple[int, int],
) -> None:
    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)
