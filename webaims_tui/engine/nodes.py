"""Remote DICOM nodes (PACS): validation and create/read/update/delete on ``db.RemoteNode``.

Validation works like the settings': a :class:`NodeError` names the field, the value and what is
wrong, and nothing is written. The callers (CLI, TUI) pass plain values; :func:`peer_for` turns a
stored node into the :class:`~webaims_tui.engine.qr.Peer` the Query/Retrieve client uses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import peewee as pw

from webaims_tui.config import ae_title_problem
from webaims_tui.engine import db
from webaims_tui.engine.qr import (
    DEFAULT_MAX_PDU,
    QUERY_MODELS,
    RETRIEVE_METHODS,
    EchoResult,
    Peer,
    QueryModel,
    RetrieveMethod,
)


class NodeError(ValueError):
    """A node value is invalid, or the node does not exist / already exists."""


#: Every editable field and its default (``db.RemoteNode`` holds the same columns).
NODE_DEFAULTS: dict[str, Any] = {
    "ae_title": "",
    "host": "",
    "port": 104,
    "query_model": "study",
    "retrieve_method": "c-move",
    "tls": False,
    "tls_ca_file": "",
    "tls_cert_file": "",
    "tls_key_file": "",
    "acse_timeout": 30.0,
    "dimse_timeout": 60.0,
    "network_timeout": 60.0,
    "max_pdu_size": DEFAULT_MAX_PDU,
}
NODE_FIELDS = ("name", *NODE_DEFAULTS)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9._:\-\[\]%]{1,255}$")


def validate_node(values: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce and check node values; returns them cleaned, or raises NodeError naming the field."""
    unknown = set(values) - set(NODE_FIELDS)
    if unknown:
        raise NodeError(f"unknown node field(s): {', '.join(sorted(unknown))}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        clean[key] = _coerce(key, value)
    if "name" in clean and not _NAME.match(clean["name"]):
        raise NodeError(
            f"name = {clean['name']!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if "ae_title" in clean:
        problem = ae_title_problem(clean["ae_title"])
        if problem:
            raise NodeError(f"ae_title = {clean['ae_title']!r}: {problem}")
    if "host" in clean and not _HOST.match(clean["host"]):
        raise NodeError(f"host = {clean['host']!r}: not a host name or IP address")
    if "port" in clean and not 1 <= clean["port"] <= 65535:
        raise NodeError(f"port = {clean['port']}: must be between 1 and 65535")
    if "query_model" in clean and clean["query_model"] not in QUERY_MODELS:
        raise NodeError(f"query_model = {clean['query_model']!r}: must be patient or study")
    if "retrieve_method" in clean and clean["retrieve_method"] not in RETRIEVE_METHODS:
        raise NodeError(f"retrieve_method = {clean['retrieve_method']!r}: must be c-move or c-get")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        if key in clean and not clean[key] > 0:
            raise NodeError(f"{key} = {clean[key]}: must be a positive number of seconds")
    size = clean.get("max_pdu_size")
    if size is not None and size != 0 and not 4096 <= size <= 2**32 - 1:
        raise NodeError(f"max_pdu_size = {size}: must be 0 (unlimited) or 4096..2^32-1")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if clean.get(key) and not Path(clean[key]).expanduser().is_file():
            raise NodeError(f"{key} = {clean[key]!r}: file not found")
    return clean


def _coerce(key: str, value: Any) -> Any:
    expected = str if key == "name" else type(NODE_DEFAULTS[key])
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value.strip()
    raise NodeError(f"{key} = {value!r}: not a valid {expected.__name__}")


def list_nodes() -> list[db.RemoteNode]:
    with db.database.connection_context():
        return list(db.RemoteNode.select().order_by(db.RemoteNode.name))


def get_node(name: str) -> db.RemoteNode:
    with db.database.connection_context():
        node = db.RemoteNode.get_or_none(db.RemoteNode.name == name)
    if node is None:
        known = ", ".join(n.name for n in list_nodes()) or "none yet (nodes add)"
        raise NodeError(f"no remote node named {name!r}; known nodes: {known}")
    return node


def add_node(name: str, /, **values: Any) -> db.RemoteNode:
    """Create a node; ``ae_title``, ``host`` and ``port`` are required."""
    for required in ("ae_title", "host", "port"):
        if required not in values or values[required] in ("", None):
            raise NodeError(f"{required}: required for a new node")
    clean = validate_node({"name": name, **values})
    with db.database.connection_context(), db.database.atomic():
        if db.RemoteNode.get_or_none(db.RemoteNode.name == clean["name"]) is not None:
            raise NodeError(f"name = {name!r}: a node with this name exists (use nodes edit)")
        try:
            return db.RemoteNode.create(**{**NODE_DEFAULTS, **clean})
        except pw.IntegrityError as exc:
            raise NodeError(f"name = {name!r}: cannot store the node ({exc})") from None


def edit_node(name: str, /, **changes: Any) -> db.RemoteNode:
    """Change some fields of a node (``name`` among them renames it)."""
    clean = validate_node(changes)
    node = get_node(name)
    with db.database.connection_context(), db.database.atomic():
        if "name" in clean and clean["name"] != name:
            taken = db.RemoteNode.get_or_none(db.RemoteNode.name == clean["name"])
            if taken is not None:
                raise NodeError(f"name = {clean['name']!r}: another node has this name")
        for key, value in clean.items():
            setattr(node, key, value)
        node.save()
    return node


def remove_node(name: str) -> None:
    node = get_node(name)
    with db.database.connection_context():
        node.delete_instance()


def record_echo(name: str, result: EchoResult) -> None:
    """Remember the last C-ECHO outcome on a stored node (shown by nodes list)."""
    with db.database.connection_context():
        db.RemoteNode.update(
            last_echo_at=datetime.now(),
            last_echo_ok=result.ok,
            last_echo_detail=result.message[:2000],
        ).where(db.RemoteNode.name == name).execute()


def peer_for(node: db.RemoteNode) -> Peer:
    return Peer(
        name=node.name,
        ae_title=node.ae_title,
        host=node.host,
        port=int(node.port),
        query_model=cast(QueryModel, node.query_model),
        retrieve_method=cast(RetrieveMethod, node.retrieve_method),
        acse_timeout=float(node.acse_timeout),
        dimse_timeout=float(node.dimse_timeout),
        network_timeout=float(node.network_timeout),
        max_pdu_size=int(node.max_pdu_size),
        tls=bool(node.tls),
        tls_ca_file=node.tls_ca_file,
        tls_cert_file=node.tls_cert_file,
        tls_key_file=node.tls_key_file,
    )


def node_as_dict(node: db.RemoteNode) -> dict[str, Any]:
    """A stored node as plain values (for JSON output and the TUI)."""
    values = {key: getattr(node, key) for key in NODE_FIELDS}
    values["last_echo_at"] = node.last_echo_at.isoformat() if node.last_echo_at else None
    values["last_echo_ok"] = node.last_echo_ok
    values["last_echo_detail"] = node.last_echo_detail
    return values
