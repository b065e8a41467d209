"""``webaims-tui nodes add|edit|remove|list``: the remote DICOM nodes (PACS) we query.

The remote AE title is ``--called-ae`` and the address a positional ``HOST:PORT`` (our own
``--ae-title``/``--host``/``--port`` are global options). A bad value is one line naming the
field, exit code 2, and nothing is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from webaims_tui.config import Settings
from webaims_tui.engine.nodes import NodeError, node_as_dict
from webaims_tui.engine.service import Engine

EXIT_USAGE = 2


def split_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:104``) -> (host, port); argparse-friendly errors."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT, e.g. pacs.local:104")
    number = int(port)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port must be between 1 and 65535")
    return host.strip("[]"), number


def _node_options(parser: argparse.ArgumentParser, *, editing: bool) -> None:
    group = parser.add_argument_group("node settings")
    group.add_argument(
        "--called-ae",
        dest="ae_title",
        metavar="AET",
        required=not editing,
        help="the node's AE title",
    )
    group.add_argument("--query-model", choices=("patient", "study"), help="default: study")
    group.add_argument(
        "--retrieve-method",
        choices=("c-move", "c-get"),
        help="c-move (default) or c-get for nodes that cannot connect back to us",
    )
    group.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--tls-ca-file", metavar="FILE")
    group.add_argument("--tls-cert-file", metavar="FILE")
    group.add_argument("--tls-key-file", metavar="FILE")
    group.add_argument("--acse-timeout", type=float, metavar="S", help="association timeout")
    group.add_argument("--dimse-timeout", type=float, metavar="S", help="per-message timeout")
    group.add_argument("--network-timeout", type=float, metavar="S")
    group.add_argument("--max-pdu-size", type=int, metavar="BYTES", help="default 65536")


def register(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]
) -> None:
    parser = subparsers.add_parser(
        "nodes", parents=parents, help="manage the remote DICOM nodes (PACS) to query"
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="nodes_action")
    parser.set_defaults(handler=run, nodes_action=None)

    add = actions.add_parser("add", parents=parents, help="add a node")
    add.add_argument("name")
    add.add_argument("address", type=split_address, metavar="HOST:PORT")
    _node_options(add, editing=False)

    edit = actions.add_parser("edit", parents=parents, help="change a node")
    edit.add_argument("name")
    edit.add_argument("--address", type=split_address, metavar="HOST:PORT")
    edit.add_argument("--rename", metavar="NEW_NAME")
    _node_options(edit, editing=True)

    remove = actions.add_parser("remove", parents=parents, help="remove a node")
    remove.add_argument("name")

    listing = actions.add_parser("list", parents=parents, help="list the nodes")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")


_OPTION_FIELDS = (
    "ae_title",
    "query_model",
    "retrieve_method",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "acse_timeout",
    "dimse_timeout",
    "network_timeout",
    "max_pdu_size",
)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: getattr(args, k) for k in _OPTION_FIELDS if getattr(args, k, None) is not None}
    address = getattr(args, "address", None)
    if address is not None:
        values["host"], values["port"] = address
    if getattr(args, "rename", None):
        values["name"] = args.rename
    return values


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.nodes_action is None:
        sys.stderr.write("webaims-tui nodes: choose an action: add, edit, remove or list\n")
        return EXIT_USAGE
    engine = Engine(settings)
    engine.open()
    try:
        if args.nodes_action == "list":
            return _list(engine, as_json=args.json)
        if args.nodes_action == "add":
            node = engine.add_node(args.name, **_values(args))
            print(f"added {node.name}: {node.ae_title}@{node.host}:{node.port}")
        elif args.nodes_action == "edit":
            values = _values(args)
            if not values:
                sys.stderr.write("webaims-tui nodes edit: nothing to change\n")
                return EXIT_USAGE
            node = engine.edit_node(args.name, **values)
            print(f"changed {node.name}: {node.ae_title}@{node.host}:{node.port}")
        elif args.nodes_action == "remove":
            engine.remove_node(args.name)
            print(f"removed {args.name}")
    except NodeError as exc:
        sys.stderr.write(f"webaims-tui nodes {args.nodes_action}: {exc}\n")
        return EXIT_USAGE
    finally:
        engine.stop()
    return 0


def _list(engine: Engine, *, as_json: bool) -> int:
    nodes = engine.nodes()
    if as_json:
        for node in nodes:
            print(json.dumps(node_as_dict(node)))
        return 0
    if not nodes:
        print("no remote nodes yet: webaims-tui nodes add NAME HOST:PORT --called-ae AET")
        return 0
    rows = [("NAME", "AE TITLE", "ADDRESS", "MODEL", "RETRIEVE", "LAST ECHO")]
    for node in nodes:
        if node.last_echo_at is None:
            echo = "never"
        else:
            echo = f"{'ok' if node.last_echo_ok else 'FAILED'} {node.last_echo_at:%Y-%m-%d %H:%M}"
        rows.append(
            (
                node.name,
                node.ae_title,
                f"{node.host}:{node.port}" + (" (TLS)" if node.tls else ""),
                node.query_model,
                node.retrieve_method,
                echo,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
