"""``webaims-tui serve``: the engine without a UI, for systemd or a bare console."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from webaims_tui.config import Settings
from webaims_tui.engine.events import EngineEvent, ServerFailed
from webaims_tui.engine.service import Engine
from webaims_tui.logs import configure_logging

log = logging.getLogger("webaims_tui.serve")


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "serve", parents=parents, help="run the DICOM server and autoloader without a UI"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.paths.logs, to_stdout=True)
    stop = threading.Event()
    failed: list[str] = []

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, ServerFailed):
            failed.append(event.reason)
            stop.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = Engine(settings, sink=on_event)
    engine.start()
    try:
        # A bounded wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(1.0):
            pass
    finally:
        engine.stop()
    if failed:
        log.error("not serving: %s", failed[0])
        return 1
    log.info("stopped cleanly")
    return 0
