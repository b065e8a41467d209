"""The app in a real terminal: tmux runs ``python -m webaims_tui``, keys go in, the screen out.

This is the only test that exercises the real driver (terminal modes, key parsing, textual-image's
terminal query at import, a clean exit that restores the shell). It uses a private tmux server
socket so that it never touches a tmux the developer is using.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Terminal:
    def __init__(self, socket_name: str, session: str) -> None:
        self.socket_name = socket_name
        self.session = session

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket_name, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def wait_for(self, text: str | Callable[[str], bool], timeout: float = 30.0) -> str:
        check = text if callable(text) else (lambda screen: text in screen)
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {text!r}; the screen:\n{screen}")
            time.sleep(0.2)


def test_the_app_renders_answers_keys_and_quits_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "config.toml"
    config.write_text("")
    marker = "WEBAIMS-TUI-EXITED"
    command = (
        f"{sys.executable} -m webaims_tui --config {config} --data-dir {tmp_path / 'data'} "
        f"--host 127.0.0.1 --port {port}; echo {marker}:$?; sleep 60"
    )
    terminal = Terminal(f"webaims-test-{uuid.uuid4().hex[:8]}", "app")
    # Textual takes COLUMNS/LINES over the real terminal size, and pytest may have set them.
    inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    environment = {
        **inherited,
        "TERM": "xterm-256color",
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
    }
    subprocess.run(
        ["tmux", "-L", terminal.socket_name, "-f", "/dev/null", "new-session", "-d", "-s",
         "app", "-x", "100", "-y", "30", command],
        env=environment, cwd=Path(__file__).resolve().parents[2], check=True, timeout=10,
    )  # fmt: skip
    try:
        screen = terminal.wait_for("listening")
        assert f"127.0.0.1:{port}" in screen
        assert "Receive log" in screen
        terminal.keys("2")
        terminal.wait_for("Patient ID")
        terminal.keys("?")
        terminal.wait_for("Backspace goes back up")
        terminal.keys("Escape")
        terminal.wait_for(lambda s: "Backspace goes back up" not in s and "Patient ID" in s)
        terminal.keys("1")
        terminal.wait_for("following")
        terminal.keys("q")
        screen = terminal.wait_for(marker)
        assert f"{marker}:0" in screen
        # The terminal is given back: no traceback, the alternate screen is gone.
        assert "Traceback" not in screen
        assert "following" not in screen
    finally:
        terminal.tmux("kill-server")
