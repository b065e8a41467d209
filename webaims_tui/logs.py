"""Logging set-up: a rotating file in the logs folder, plus stdout for ``serve``.

While the TUI runs no StreamHandler is attached (it would scribble over the screen); the app adds
its own handler that posts records into the UI. Log lines never carry patient names, IDs or birth
dates: the engine logs UIDs, AE titles, addresses, sizes and statuses only.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(log_dir: Path, *, to_stdout: bool, level: int = logging.INFO) -> Path:
    """Send the program's log records to ``log_dir/webaims-tui.log`` (rotated) and maybe stdout."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "webaims-tui.log"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.handlers.RotatingFileHandler(
        log_file, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
    )
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(file_handler)
    if to_stdout:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(stream)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; its warnings are enough for an archive's log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return log_file
