"""``webaims-tui echo|find|move|get``: query and retrieve from remote nodes (PACS).

``echo NODE`` or ``echo HOST:PORT --called-ae AET`` checks connectivity. ``find`` prints a table
(or JSON lines). ``move``/``get`` show progress on stderr and a summary; ``--missing`` verifies
the study (or series) against the archive and retrieves only what is missing. The exit code is
0 when everything succeeded, 1 when anything failed or was cancelled, 2 for bad input.

``move`` receives through our Storage SCP: if no webaims-tui is serving on our port, the
command starts the SCP itself for the duration of the move.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType
from typing import Any, cast

from webaims_tui.commands.nodes import split_address
from webaims_tui.config import Settings
from webaims_tui.engine import qr
from webaims_tui.engine.events import (
    EngineEvent,
    RetrieveFinished,
    RetrieveProgress,
    ServerFailed,
)
from webaims_tui.engine.nodes import NodeError
from webaims_tui.engine.service import Engine

EXIT_FAILED = 1
EXIT_USAGE = 2


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    echo = subparsers.add_parser(
        "echo", parents=parents, help="C-ECHO a node (NAME, or HOST:PORT --called-ae AET)"
    )
    echo.add_argument("node", metavar="NODE|HOST:PORT")
    echo.add_argument("--called-ae", metavar="AET", help="the AE title at HOST:PORT")
    echo.add_argument("--timeout", type=float, default=10.0, metavar="S")
    echo.set_defaults(handler=run_echo)

    find = subparsers.add_parser("find", parents=parents, help="C-FIND on a node")
    find.add_argument("node", metavar="NODE")
    find.add_argument(
        "--level",
        type=str.upper,
        default="STUDY",
        choices=qr.QUERY_LEVELS,
        metavar="LEVEL",
        help="patient, study (default), series or image",
    )
    find.add_argument("--model", choices=qr.QUERY_MODELS, help="query model (default: node's)")
    find.add_argument("--patient-name", default="", metavar="NAME", help="wildcards * and ?")
    find.add_argument("--patient-id", default="", metavar="ID")
    find.add_argument("--birth-date", default="", metavar="DATE[-DATE]")
    find.add_argument("--study-date", default="", metavar="DATE[-DATE]")
    find.add_argument("--modality", default="", metavar="CODE")
    find.add_argument("--accession", default="", metavar="NUMBER")
    find.add_argument("--study-description", default="", metavar="TEXT")
    find.add_argument("--study", default="", metavar="UID", help="Study Instance UID")
    find.add_argument("--series", default="", metavar="UID", help="Series Instance UID")
    find.add_argument("--limit", type=int, default=0, metavar="N", help="stop after N rows")
    find.add_argument("--json", action="store_true", help="print one JSON object per row")
    find.set_defaults(handler=run_find)

    for name, summary in (
        ("move", "C-MOVE from a node into the archive (or to --dest)"),
        ("get", "C-GET from a node into the archive"),
    ):
        parser = subparsers.add_parser(name, parents=parents, help=summary)
        parser.add_argument("node", metavar="NODE")
        parser.add_argument("--patient", default="", metavar="ID", help="a whole patient")
        parser.add_argument("--study", default="", metavar="UID")
        parser.add_argument("--series", default="", metavar="UID")
        parser.add_argument("--instance", action="append", default=[], metavar="UID")
        parser.add_argument(
            "--missing",
            action="store_true",
            help="verify against the archive and retrieve only the missing instances",
        )
        if name == "move":
            parser.add_argument("--dest", metavar="AET", help="destination (default: our AE)")
        parser.set_defaults(handler=run_retrieve, method=f"c-{name}")


def _open(settings: Settings) -> Engine:
    engine = Engine(settings)
    engine.open()
    return engine


def _peer(engine: Engine, node: str, called_ae: str | None, timeout: float) -> qr.Peer | str:
    if called_ae is None:
        return node
    host, port = split_address(node)
    return qr.Peer(
        ae_title=called_ae,
        host=host,
        port=port,
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
    )


def run_echo(args: argparse.Namespace, settings: Settings) -> int:
    engine = _open(settings)
    try:
        try:
            peer = _peer(engine, args.node, args.called_ae, args.timeout)
        except argparse.ArgumentTypeError as exc:
            sys.stderr.write(f"webaims-tui echo: {exc} (or give a node name)\n")
            return EXIT_USAGE
        result = engine.echo(peer)
    except NodeError as exc:
        sys.stderr.write(f"webaims-tui echo: {exc}\n")
        return EXIT_USAGE
    finally:
        engine.stop()
    if result.ok:
        print(result.message)
        return 0
    sys.stderr.write(f"C-ECHO failed ({result.problem}): {result.message}\n")
    return EXIT_FAILED


_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "PATIENT": [
        ("patient_id", "PATIENT ID"),
        ("patient_name", "NAME"),
        ("birth_date", "BIRTH"),
        ("sex", "SEX"),
        ("studies", "STUDIES"),
    ],
    "STUDY": [
        ("study_date", "DATE"),
        ("patient_id", "PATIENT ID"),
        ("patient_name", "NAME"),
        ("modalities", "MOD"),
        ("accession_number", "ACCESSION"),
        ("description", "DESCRIPTION"),
        ("series", "SER"),
        ("instances", "IMG"),
        ("study_instance_uid", "STUDY UID"),
    ],
    "SERIES": [
        ("series_number", "#"),
        ("modality", "MOD"),
        ("description", "DESCRIPTION"),
        ("instances", "IMG"),
        ("series_instance_uid", "SERIES UID"),
    ],
    "IMAGE": [
        ("instance_number", "#"),
        ("sop_class_uid", "SOP CLASS"),
        ("sop_instance_uid", "SOP INSTANCE UID"),
    ],
}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def run_find(args: argparse.Namespace, settings: Settings) -> int:
    engine = _open(settings)
    cancel = qr.CancelToken()
    try:
        node = engine.node(args.node)
        query = qr.FindQuery(
            level=args.level,
            model=cast(qr.QueryModel, args.model or node.query_model),
            patient_name=args.patient_name,
            patient_id=args.patient_id,
            birth_date=args.birth_date,
            study_date=args.study_date,
            modality=args.modality.upper(),
            accession_number=args.accession,
            study_description=args.study_description,
            study_instance_uid=args.study,
            series_instance_uid=args.series,
            limit=args.limit,
        )
        query.validate()
        with _cancel_on_interrupt(cancel):
            result = engine.find(args.node, query, cancel)
    except (NodeError, qr.QueryError) as exc:
        sys.stderr.write(f"webaims-tui find: {exc}\n")
        return EXIT_USAGE
    except qr.QRFailure as failure:
        sys.stderr.write(f"webaims-tui find: {failure.message}\n")
        return EXIT_FAILED
    finally:
        engine.stop()
    rows = [qr.row_as_dict(row) for row in result.rows]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        columns = _COLUMNS[args.level]
        table = [[title for _key, title in columns]]
        table += [[_cell(row[key]) for key, _title in columns] for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        for line in table:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    sys.stderr.write(result.message + "\n")
    return 0 if result.ok else EXIT_FAILED


class _Progress:
    """A one-line progress bar on stderr, fed from RetrieveProgress events (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tty = sys.stderr.isatty()

    def __call__(self, event: EngineEvent) -> None:
        # Pending responses stop one short of the end; the final response completes the bar.
        if not isinstance(event, RetrieveProgress | RetrieveFinished):
            return
        done = event.completed + event.failed + event.warning
        remaining = event.remaining if isinstance(event, RetrieveProgress) else 0
        if isinstance(event, RetrieveFinished) and event.cancelled:
            return  # what was not sent is in the summary
        total = done + (remaining or 0)
        width = 30
        filled = width * done // total if total else 0
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total or '?'} "
            f"({event.completed} ok, {event.failed} failed, {event.warning} warnings)"
        )
        with self._lock:
            if self.tty:
                sys.stderr.write("\r" + line)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class _cancel_on_interrupt:
    """Ctrl-C sends a C-CANCEL instead of killing the command mid-association."""

    def __init__(self, token: qr.CancelToken) -> None:
        self.token = token
        self.previous: Any = None

    def __enter__(self) -> None:
        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            sys.stderr.write("\ncancelling...\n")
            self.token.cancel()

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, on_interrupt)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_retrieve(args: argparse.Namespace, settings: Settings) -> int:
    method = cast(qr.RetrieveMethod, args.method)
    name = method.removeprefix("c-")
    if not (args.patient or args.study):
        sys.stderr.write(f"webaims-tui {name}: give --patient ID or --study UID\n")
        return EXIT_USAGE
    if args.missing and not args.study:
        sys.stderr.write(f"webaims-tui {name}: --missing needs --study (and maybe --series)\n")
        return EXIT_USAGE
    progress = _Progress()
    server_failure: list[str] = []

    def sink(event: EngineEvent) -> None:
        if isinstance(event, ServerFailed):
            server_failure.append(event.reason)
        progress(event)

    engine = Engine(settings, sink=sink)
    destination = getattr(args, "dest", None)
    if method == "c-move" and not destination:
        # Moved instances arrive at our SCP. If a webaims-tui already serves on our port it
        # receives them; otherwise this command serves while it moves.
        engine.start()
        if server_failure:
            sys.stderr.write(
                f"note: {server_failure[0]}; assuming a running webaims-tui receives\n"
            )
    else:
        engine.open()
    cancel = qr.CancelToken()
    try:
        with _cancel_on_interrupt(cancel):
            if args.missing:
                report = engine.fetch_missing(
                    args.node, args.study, args.series, method=method, cancel=cancel
                )
                progress.end()
                print(report.message)
                if report.retrieve is not None:
                    _print_failed(report.retrieve)
                return 0 if report.ok and (report.retrieve is None or report.retrieve.ok) else 1
            target = qr.RetrieveTarget(
                patient_id=args.patient,
                study_instance_uid=args.study,
                series_instance_uid=args.series,
                sop_instance_uids=tuple(args.instance),
            )
            summary = engine.retrieve(
                args.node, [target], method=method, destination=destination, cancel=cancel
            )
            progress.end()
            print(summary.message)
            _print_failed(summary)
            return 0 if summary.ok else EXIT_FAILED
    except (NodeError, qr.QueryError) as exc:
        sys.stderr.write(f"webaims-tui {name}: {exc}\n")
        return EXIT_USAGE
    except qr.QRFailure as failure:
        sys.stderr.write(f"webaims-tui {name}: {failure.message}\n")
        return EXIT_FAILED
    finally:
        engine.stop()


def _print_failed(summary: qr.RetrieveSummary) -> None:
    for uid in summary.failed_sop_instance_uids:
        print(f"failed: {uid}")
