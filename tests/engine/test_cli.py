"""The command line: usage and start-up errors are one line and exit 2; stats; serve stops
cleanly on SIGTERM or SIGINT in the middle of a transfer; the log files carry no patient data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import SettingsFactory
from tests.engine.test_autoloader import UID_ROOT, make_instance
from tests.engine.test_crash_safety import (
    _free_port,
    _RowCounter,
    _Sender,
    _serve,
    assert_archived_exactly_once,
)
from webaims_tui.engine import db

CLI = [sys.executable, "-m", "webaims_tui"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["stats", "--port", "99999"], "invalid port 99999"),
        (["stats", "--port", "abc"], "invalid port 'abc'"),
        (["stats", "--config", "/nonexistent/c.toml"], "config file not found"),
        (["stats", "--ae-title", "X" * 17], "longer than 16 characters"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _run(*args, "--data-dir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_stats_json_on_an_empty_archive(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "waiting.dcm").write_bytes(b"x")
    result = _run("stats", "--json", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["instances"] == 0 and counts["patients"] == 0
    assert counts["incoming"] == 1


def test_global_options_work_before_the_subcommand_and_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "WEBAIMS_DATA_DIR": str(tmp_path / "from-env")}
    assert _run("stats", env=env).returncode == 0
    assert (tmp_path / "from-env" / "incoming").is_dir()
    assert _run("--data-dir", str(tmp_path / "flag"), "stats", env=env).returncode == 0
    assert (tmp_path / "flag" / "incoming").is_dir()


# A short sweep: files that arrive while the watcher is busy are not left waiting for long.
SHORT_SWEEP = "[autoloader]\nsweep_interval = 0.5\n"


def _a_newer_database(config: Path, data: Path) -> None:
    assert _run("--config", str(config), "--data-dir", str(data), "stats").returncode == 0
    with sqlite3.connect(data / "webaims.sqlite3") as connection:
        connection.execute(
            "INSERT INTO schema_info (version, migrated_at) VALUES (?, ?)",
            (db.SCHEMA_VERSION + 1, "2030-01-01 00:00:00"),
        )


@pytest.mark.parametrize("command", [[], ["serve"]], ids=["tui", "serve"])
@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("logs-under-a-file", "paths.logs"),
        ("bad-path-template", "{Nonsense} is not a DICOM attribute keyword"),
        ("newer-database", "newer than this program"),
    ],
)
def test_start_up_errors_are_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path, command: list[str], problem: str, message: str
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "config.toml"
    config.write_text("")
    if problem == "logs-under-a-file":
        # Below a regular file no folder can be created, not even by root.
        (tmp_path / "a-file").write_text("")
        config.write_text(f'[paths]\nlogs = "{tmp_path / "a-file" / "logs"}"\n')
    elif problem == "bad-path-template":
        config.write_text('[autoloader]\npath_template = "{Nonsense}/{SOPInstanceUID}.dcm"\n')
    else:
        _a_newer_database(config, data)
    # Were the check missed, the TUI or the server would start and the run would time out.
    result = subprocess.run(
        [*CLI, "--config", str(config), "--data-dir", str(data), *command],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (data / "logs" / "webaims-tui.log").exists()


SENT = 500


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serve_stops_on_a_signal_mid_transfer_with_exit_0_and_keeps_every_acknowledged_instance(
    tmp_path: Path, make_settings: SettingsFactory, signum: signal.Signals
) -> None:
    sop_uids = [f"{UID_ROOT}3.{n + 10_000}" for n in range(SENT)]
    (sent := tmp_path / "sent").mkdir()
    files = [
        make_instance(
            sent,
            patient_id=f"SIGNAL{n % 2}",
            study_uid=f"{UID_ROOT}1.{n % 4}",
            series_uid=f"{UID_ROOT}2.{n % 8}",
            sop_uid=sop_uid,
            name=f"{n:04d}.dcm",
        )
        for n, sop_uid in enumerate(sop_uids)
    ]
    settings = make_settings(SHORT_SWEEP)
    output = tmp_path / "serve.log"
    server = _serve(settings, port := _free_port(), output)
    try:
        sender = _Sender(files, port, tmp_path / "storescu.log")
        deadline = time.monotonic() + 60
        while not sender.acknowledged():
            assert time.monotonic() < deadline, "the SCP acknowledged nothing"
            time.sleep(0.01)
        assert sender.is_alive(), "everything was sent before the signal"
        server.send_signal(signum)
        assert server.wait(timeout=60) == 0, output.read_text()[-2000:]
        sender.wait()
    finally:
        if server.poll() is None:
            server.kill()
    log = output.read_text()
    assert f"received {signum.name}, shutting down" in log and "stopped cleanly" in log
    assert [p.name for p in settings.paths.spool.rglob("*") if p.is_file()] == []

    uid_of = dict(zip(map(str, files), sop_uids, strict=True))
    acknowledged = {uid_of[path] for path in sender.acknowledged()}
    assert_archived_exactly_once(settings, acknowledged, sop_uids, take_waiting=True)


PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "ZEBEDEE^QUENTIN", "PHI7734521", "19450312"


def _patient_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = make_instance(folder, patient_id=PATIENT_ID, name=name)
    dataset = dcmread(path)
    dataset.PatientName = PATIENT_NAME
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_logs_carry_no_patient_name_id_or_birth_date(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    sent = tmp_path / "sent"
    # File names are a patient's data as often as not: an import keeps them in incoming/.
    file_name = f"{PATIENT_NAME} {PATIENT_ID} {BIRTH_DATE}.dcm"
    stored = _patient_file(sent, "stored.dcm")
    imported = _patient_file(sent / "imported", file_name)
    truncated = _patient_file(sent / "truncated", file_name)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    settings = make_settings(SHORT_SWEEP)
    output = tmp_path / "serve.log"
    server = _serve(settings, port := _free_port(), output)
    indexed_rows = _RowCounter(settings.paths.database_url)
    try:
        ae = AE(ae_title="PHISCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
        assert association.is_established
        assert association.send_c_store(stored).Status == 0x0000
        association.release()
        for path in (imported, truncated):
            result = _run(
                *("--config", str(settings.config_file)),
                *("--data-dir", str(settings.paths.data_dir)),
                *("--database-url", settings.paths.database_url),
                *("import", str(path)),
            )
            assert result.returncode == 0, result.stderr
        quarantine = settings.paths.quarantine
        deadline = time.monotonic() + 60
        while indexed_rows() < 2 or not [
            p for p in quarantine.rglob("*") if p.is_file() and p.suffix != ".json"
        ]:
            assert time.monotonic() < deadline, "serve did not archive and quarantine the files"
            time.sleep(0.1)
    finally:
        indexed_rows.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, output.read_text()[-2000:]
    logs = [settings.paths.logs / "webaims-tui.log", output]
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    assert "quarantined" in text  # the quarantine was logged, only without the name
    for value in (PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID, BIRTH_DATE):
        assert value not in text, f"{value!r} is in the log"
