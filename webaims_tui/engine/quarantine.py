"""Quarantine: files the autoloader could not archive, kept with a sidecar that says why.

A quarantined file sits in ``quarantine/<reason>/<name>`` next to ``<name>.json`` (reason, detail,
when, source AE, original name, the rule set version that refused it) and has a
:class:`db.QuarantineEntry` row. Nothing here deletes a file: a retry moves it back into
``incoming/``.

Step order (crash safety): the sidecar is written first, then the file is moved out of incoming/,
then the row is inserted. :func:`reconcile_quarantine` repairs what a kill between those steps
leaves: a file with a sidecar but no row gets its row; a sidecar whose file never arrived is
removed (the file is still in incoming/ and will be processed again).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from webaims_tui.engine import db
from webaims_tui.engine.archive import sanitize_component

SIDECAR_SUFFIX = ".json"


@dataclass(frozen=True)
class QuarantinedFile:
    """What a quarantine entry says, for the CLI and the UI."""

    id: int
    path: str
    reason: str
    detail: str
    source: str
    sop_instance_uid: str
    created_at: datetime


def incoming_name(original: str = "") -> str:
    """A fresh, unique name for a file placed in incoming/ (never derived from its content)."""
    base = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}"
    if original:
        return f"{base}--{sanitize_component(original)[:60]}"
    return base + ".dcm"


def original_name_of(name: str) -> str:
    """The name a file had before import or retry (see :func:`incoming_name`)."""
    _, sep, original = name.partition("--")
    return original if sep else name


def quarantine_file(
    quarantine_root: Path,
    source: Path,
    *,
    reason: str,
    detail: str,
    source_ae: str,
    sop_instance_uid: str = "",
    ruleset_version: int | None = None,
) -> db.QuarantineEntry:
    """Move ``source`` into ``quarantine/<reason>/`` with its sidecar and row.

    ``ruleset_version`` is the RuleSet row id of the rule set that refused the file, if one did.
    """
    folder = quarantine_root / sanitize_component(reason)
    folder.mkdir(parents=True, exist_ok=True)
    destination = _free_name(folder, source.name)
    relative = destination.relative_to(quarantine_root).as_posix()
    now = datetime.now()
    sidecar = {
        "reason": reason,
        "detail": detail,
        "when": now.isoformat(timespec="seconds"),
        "source_ae": source_ae,
        "original_name": original_name_of(source.name),
        "incoming_name": source.name,
        "sop_instance_uid": sop_instance_uid,
        "size": source.stat().st_size if source.exists() else 0,
        "ruleset_version": ruleset_version,
    }
    _write_json(Path(str(destination) + SIDECAR_SUFFIX), sidecar)
    _move(source, destination)
    return db.QuarantineEntry.create(
        path=relative,
        reason=reason[:64],
        detail=detail,
        source=source_ae[:64],
        sop_instance_uid=sop_instance_uid[:64],
        created_at=now,
        ruleset_version=ruleset_version,
    )


def entries(reason: str | None = None) -> list[QuarantinedFile]:
    """Every quarantine entry, oldest first."""
    query = db.QuarantineEntry.select().order_by(db.QuarantineEntry.id)
    if reason:
        query = query.where(db.QuarantineEntry.reason == reason)
    return [
        QuarantinedFile(
            id=row.id,
            path=row.path,
            reason=row.reason,
            detail=row.detail,
            source=row.source,
            sop_instance_uid=row.sop_instance_uid,
            created_at=row.created_at,
        )
        for row in query
    ]


def release(quarantine_root: Path, incoming: Path, ids: Iterable[int] | None) -> list[int]:
    """Move quarantined files back into incoming/ (all when ``ids`` is None); returns the ids.

    The file moves first, then the sidecar and the row go: a kill in between leaves a row whose
    file is gone, which :func:`reconcile_quarantine` removes.
    """
    query = db.QuarantineEntry.select().order_by(db.QuarantineEntry.id)
    if ids is not None:
        wanted = list(ids)
        query = query.where(db.QuarantineEntry.id.in_(wanted))
    released: list[int] = []
    for row in query:
        file = quarantine_root / row.path
        if file.exists():
            # A fresh name: the autoloader treats it as new, and the name keeps the original.
            _move(file, incoming / incoming_name(original_name_of(file.name)))
        Path(str(file) + SIDECAR_SUFFIX).unlink(missing_ok=True)
        row.delete_instance()
        released.append(row.id)
    return released


def reconcile_quarantine(quarantine_root: Path) -> int:
    """Repair what a kill mid-quarantine left; returns the number of repairs."""
    repairs = 0
    known = {row.path: row for row in db.QuarantineEntry.select()}
    on_disk: set[str] = set()
    for folder, _dirs, files in os.walk(quarantine_root):
        for name in files:
            path = Path(folder) / name
            relative = path.relative_to(quarantine_root).as_posix()
            if name.endswith(SIDECAR_SUFFIX + ".tmp"):
                path.unlink(missing_ok=True)  # a sidecar write cut short
                repairs += 1
                continue
            if name.endswith(SIDECAR_SUFFIX):
                if not Path(str(path).removesuffix(SIDECAR_SUFFIX)).exists():
                    path.unlink(missing_ok=True)  # the move never happened: file still incoming
                    repairs += 1
                continue
            on_disk.add(relative)
            if relative in known:
                continue
            info = _read_json(Path(str(path) + SIDECAR_SUFFIX))
            version = info.get("ruleset_version")
            db.QuarantineEntry.create(
                path=relative,
                reason=str(info.get("reason") or Path(relative).parts[0])[:64],
                detail=str(info.get("detail", "found in quarantine without an index entry")),
                source=str(info.get("source_ae", ""))[:64],
                sop_instance_uid=str(info.get("sop_instance_uid", ""))[:64],
                ruleset_version=version if isinstance(version, int) else None,
            )
            repairs += 1
    for relative, row in known.items():
        if relative not in on_disk:
            row.delete_instance()
            repairs += 1
    return repairs


def _free_name(folder: Path, name: str) -> Path:
    if name.endswith((SIDECAR_SUFFIX, ".tmp")):
        name += ".bin"  # a data file must never look like a sidecar or a temporary file
    candidate = folder / name
    counter = 1
    while candidate.exists() or Path(str(candidate) + SIDECAR_SUFFIX).exists():
        candidate = folder / f"{name}.{counter}"
        counter += 1
    return candidate


def _move(source: Path, destination: Path) -> None:
    try:
        os.replace(source, destination)
    except OSError:
        # Another file system (a quarantine folder on another disk): copy, then remove.
        shutil.move(str(source), str(destination))


def _write_json(path: Path, data: dict[str, object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, object]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
