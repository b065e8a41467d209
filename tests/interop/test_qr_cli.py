"""The echo/find/move/get commands against a real Orthanc, as a technician would type them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.conftest import Orthanc, free_port
from webaims_tui.__main__ import main
from webaims_tui.engine import db

pytestmark = pytest.mark.interop


@pytest.fixture
def cli(tmp_path: Path, orthanc: Orthanc) -> list[str]:
    """Global options for a private data dir, with Orthanc stored as the node 'pacs'."""
    options = ["--data-dir", str(tmp_path / "data")]
    address = f"127.0.0.1:{orthanc.dicom_port}"
    assert main([*options, "nodes", "add", "pacs", address, "--called-ae", "ORTHANC"]) == 0
    return options


def test_echo_by_name_and_by_address(
    cli: list[str], orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main([*cli, "echo", "pacs"]) == 0
    assert "pacs answered C-ECHO" in capsys.readouterr().out
    assert main([*cli, "nodes", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_echo_ok"] is True

    address = f"127.0.0.1:{orthanc.dicom_port}"
    assert main([*cli, "echo", address, "--called-ae", "WRONG"]) == 1
    err = capsys.readouterr().err
    assert "C-ECHO failed (rejected)" in err and "called AE title not recognised" in err

    assert main([*cli, "echo", f"127.0.0.1:{free_port()}", "--called-ae", "X"]) == 1
    assert "connection refused" in capsys.readouterr().err
    assert main([*cli, "echo", "nosuchnode"]) == 2
    assert "no remote node named 'nosuchnode'" in capsys.readouterr().err


def test_find_prints_a_table_or_json_lines(
    cli: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    query = ["find", "pacs", "--level", "study", "--patient-name", "QR*"]
    query += ["--study-date", "20240101-20241231"]
    assert main([*cli, *query, "--json"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["accession_number"] for r in rows) == ["ACC001", "ACC002"]
    assert "2 study rows" in err

    assert main([*cli, *query, "--model", "patient"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["DATE", "PATIENT", "ID"]
    assert len(table) == 3 and any("CHEST CT" in line for line in table)

    assert main([*cli, "find", "pacs", "--level", "patient"]) == 2
    assert "use the Patient Root model" in capsys.readouterr().err
    assert main([*cli, "find", "pacs", "--study-date", "yesterday"]) == 2
    assert "study_date = 'yesterday'" in capsys.readouterr().err


def test_move_receives_with_its_own_scp_and_reports(
    cli: list[str], orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    orthanc.knows("WEBAIMS", port)
    study = orthanc.studies[2]
    try:
        capsys.readouterr()
        assert main([*cli, "--port", str(port), "move", "pacs", "--study", study.uid]) == 0
        out, err = capsys.readouterr()
        assert "5 instances retrieved" in out
        assert "5/5" in err  # the progress line reached the end
        with db.database.connection_context():
            logged = {r.sop_instance_uid for r in db.ReceivedInstanceLog.select()}
        assert logged == set(study.instances)

        # Nothing missing any more: fetch-missing retrieves nothing and succeeds.
        command = ["--port", str(port), "move", "pacs", "--study", study.uid, "--missing"]
        assert main([*cli, *command]) == 0
        assert "nothing to fetch" in capsys.readouterr().out
    finally:
        orthanc.forget()

    # Orthanc does not know this destination: exit code 1 and what to configure.
    assert main([*cli, "move", "pacs", "--study", study.uid, "--dest", "NOBODY"]) == 1
    assert "Configure 'NOBODY' as a DICOM node on the PACS" in capsys.readouterr().out


def test_get_missing_series(
    cli: list[str], orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    study = orthanc.studies[1]
    series = study.series[0]
    command = ["get", "pacs", "--study", study.uid, "--series", series.uid, "--missing"]
    assert main([*cli, *command]) == 0
    out = capsys.readouterr().out
    assert "series complete: all 4 remote instances are in the archive" in out
    assert main([*cli, "get", "pacs"]) == 2
    assert "give --patient ID or --study UID" in capsys.readouterr().err


def test_the_automatic_echo_is_remembered_on_the_node(
    cli: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"127.0.0.1:{free_port()}"
    assert main([*cli, "nodes", "add", "down", down, "--called-ae", "DOWN"]) == 0
    assert main([*cli, "find", "pacs", "--limit", "1"]) == 0
    assert main([*cli, "find", "down"]) == 1
    assert "C-ECHO failed, nothing was sent: connection refused" in capsys.readouterr().err
    assert main([*cli, "nodes", "list", "--json"]) == 0
    nodes = {n["name"]: n for n in map(json.loads, capsys.readouterr().out.splitlines())}
    assert nodes["pacs"]["last_echo_ok"] is True
    assert nodes["down"]["last_echo_ok"] is False
    assert "connection refused" in nodes["down"]["last_echo_detail"]
