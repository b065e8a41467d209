"""The command line: usage errors are one line and exit 2; stats; serve stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.helpers import storage_corpus

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("serve did not start listening")


@pytest.mark.slow
def test_serve_stops_on_sigterm_with_exit_0_and_keeps_every_acknowledged_instance(
    tmp_path: Path,
) -> None:
    port = _free_port()
    data = tmp_path / "data"
    process = subprocess.Popen(
        [*CLI, "serve", "--data-dir", str(data), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_listening(port, process)
        files = storage_corpus()[:40]
        ae = AE(ae_title="SENDER")
        for sop_class, syntax in {_context(p) for p in files}:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
        acknowledged = [
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in files
            if assoc.send_c_store(p).Status == 0x0000
        ]
        assoc.release()
        assert len(acknowledged) == len(files)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopped cleanly" in output

    # Every acknowledged instance is in the archive or still waiting in incoming/.
    found = set()
    for path in [*data.joinpath("incoming").iterdir(), *data.joinpath("archive").rglob("*.dcm")]:
        found.add(str(dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID))
    result = _run("stats", "--json", "--data-dir", str(data))
    counts = json.loads(result.stdout)
    assert counts["instances"] + counts["incoming"] + counts["quarantined"] >= len(acknowledged)
    assert len(found) + counts["quarantined"] >= len(acknowledged)


def _context(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
