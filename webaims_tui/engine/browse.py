"""Read-only queries behind the browser, plus the unit actions (delete, export).

Every listing is one page of one level (patient, study, series, instance) under an optional
parent, filtered and sorted in SQL, so a page costs the same at 100 rows or 1,000,000. Counts
shown beside a row (studies of a patient, instances of a study) are correlated sub-queries over the
foreign-key indexes, evaluated for the rows of the page only.

Nothing here imports Textual: the UI calls these through :class:`~webaims_tui.engine.service.Engine`
from worker threads.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import peewee as pw
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from webaims_tui.engine import db

Level = Literal["patient", "study", "series", "instance"]
LEVELS: tuple[Level, ...] = ("patient", "study", "series", "instance")

#: Rows per page: enough to fill a tall terminal, small enough to render at once.
PAGE_SIZE = 100

#: Values longer than this are cut in the tag dump (pixel data, long private blobs).
MAX_VALUE_CHARS = 120


class BrowseError(Exception):
    """A browse request that cannot be served (unknown row, unreadable file...)."""


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    #: Columns computed per row (counts) are not sortable: sorting them would scan every row.
    sortable: bool = True


@dataclass(frozen=True)
class BrowseQuery:
    """What to list: one level under an optional parent, filtered, sorted, one page."""

    level: Level = "patient"
    parent_id: int | None = None
    #: Matches patient ID or name (a substring, case-insensitive).
    patient: str = ""
    #: Study date range, inclusive, as YYYYMMDD (either end may be empty).
    date_from: str = ""
    date_to: str = ""
    modality: str = ""
    #: Matches study or series description (a substring, case-insensitive).
    description: str = ""
    sort: str = ""
    descending: bool = False
    offset: int = 0
    limit: int = PAGE_SIZE


@dataclass(frozen=True)
class Row:
    id: int
    cells: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    query: BrowseQuery
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    total: int

    @property
    def first(self) -> int:
        return self.query.offset + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return self.query.offset + len(self.rows)


@dataclass(frozen=True)
class UnitSummary:
    """What the detail pane shows for a patient, study, series or instance."""

    level: Level
    id: int
    title: str
    fields: tuple[tuple[str, str], ...]
    instances: int
    size: int


@dataclass
class TagNode:
    """One element of a tag dump; sequences have items, items have elements."""

    label: str
    children: list[TagNode] = field(default_factory=list)


@dataclass(frozen=True)
class InstanceFile:
    """An archived instance: its row and where the file is."""

    id: int
    path: Path
    relative_path: str
    transfer_syntax_uid: str
    ruleset_version: int | None
    number_of_frames: int
    sop_instance_uid: str


@dataclass(frozen=True)
class DeleteResult:
    instances: int
    files: int
    missing_files: int


@dataclass(frozen=True)
class ExportResult:
    instances: int
    destination: Path
    missing_files: int


COLUMNS: dict[Level, tuple[Column, ...]] = {
    "patient": (
        Column("patient_id", "Patient ID"),
        Column("patient_name", "Name"),
        Column("sex", "Sex"),
        Column("birth_date", "Birth date"),
        Column("studies", "Studies", sortable=False),
    ),
    "study": (
        Column("study_date", "Date"),
        Column("description", "Description"),
        Column("accession_number", "Accession"),
        Column("modalities", "Modalities"),
        Column("series", "Series", sortable=False),
        Column("instances", "Instances", sortable=False),
        Column("record", "Record", sortable=False),
    ),
    "series": (
        Column("series_number", "No."),
        Column("modality", "Mod."),
        Column("description", "Description"),
        Column("instances", "Instances", sortable=False),
        Column("record", "Record", sortable=False),
    ),
    "instance": (
        Column("instance_number", "No."),
        Column("sop_class_uid", "SOP class"),
        Column("transfer_syntax_uid", "Transfer syntax"),
        Column("number_of_frames", "Frames"),
        Column("size", "Size"),
        Column("received_at", "Received"),
    ),
}

DEFAULT_SORT: dict[Level, str] = {
    "patient": "patient_id",
    "study": "study_date",
    "series": "series_number",
    "instance": "instance_number",
}

MODELS: dict[Level, Any] = {
    "patient": db.Patient,
    "study": db.Study,
    "series": db.Series,
    "instance": db.Instance,
}


def child_level(level: Level) -> Level | None:
    index = LEVELS.index(level)
    return LEVELS[index + 1] if index + 1 < len(LEVELS) else None


def parent_level(level: Level) -> Level | None:
    index = LEVELS.index(level)
    return LEVELS[index - 1] if index > 0 else None


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # unreachable; keeps mypy sure of a return


# --- listing ----------------------------------------------------------------------------------


def list_page(query: BrowseQuery, sop_class_name: Callable[[str], str] = str) -> Page:
    """One page of ``query.level`` rows; ``total`` counts every row matching the filters."""
    with db.database.connection_context():
        select = _filtered(query)
        total = select.count()
        select = _sorted(select, query).offset(max(query.offset, 0)).limit(query.limit)
        rows = tuple(_rows(query.level, select, sop_class_name))
    return Page(query=query, columns=COLUMNS[query.level], rows=rows, total=total)


def _like(text: str) -> str:
    # Substring match; the user's own % and _ are literal enough for a search box.
    return f"%{text.strip()}%"


def _study_filters(query: BrowseQuery) -> list[Any]:
    conditions: list[Any] = []
    if query.date_from.strip():
        conditions.append(db.Study.study_date >= query.date_from.strip())
    if query.date_to.strip():
        conditions.append(db.Study.study_date <= query.date_to.strip())
    if query.modality.strip():
        conditions.append(db.Study.modalities.contains(query.modality.strip().upper()))
    if query.description.strip():
        conditions.append(db.Study.description ** _like(query.description))
    return conditions


def _patient_filter(query: BrowseQuery) -> Any:
    text = _like(query.patient)
    return (db.Patient.patient_id**text) | (db.Patient.patient_name**text)


def _filtered(query: BrowseQuery) -> Any:
    level = query.level
    if level == "patient":
        select: Any
        select = db.Patient.select()
        if query.patient.strip():
            select = select.where(_patient_filter(query))
        study_conditions = _study_filters(query)
        if study_conditions:
            matching = db.Study.select(db.Study.patient).where(*study_conditions)
            select = select.where(db.Patient.id.in_(matching))
        return select
    if level == "study":
        select = db.Study.select()
        if query.parent_id is not None:
            select = select.where(db.Study.patient == query.parent_id)
        elif query.patient.strip():
            patients = db.Patient.select(db.Patient.id).where(_patient_filter(query))
            select = select.where(db.Study.patient.in_(patients))
        conditions = _study_filters(query)
        return select.where(*conditions) if conditions else select
    if level == "series":
        select = db.Series.select()
        if query.parent_id is not None:
            select = select.where(db.Series.study == query.parent_id)
        if query.modality.strip():
            select = select.where(db.Series.modality == query.modality.strip().upper())
        return select
    select = db.Instance.select()
    if query.parent_id is not None:
        select = select.where(db.Instance.series == query.parent_id)
    return select


def _sorted(select: Any, query: BrowseQuery) -> Any:
    model = MODELS[query.level]
    sortable = {c.key for c in COLUMNS[query.level] if c.sortable}
    key = query.sort if query.sort in sortable else DEFAULT_SORT[query.level]
    column = getattr(model, key)
    order = column.desc() if query.descending else column.asc()
    # The id breaks ties so that pages never overlap or skip rows.
    tie = model.id.desc() if query.descending else model.id.asc()
    return select.order_by(order, tie)


def _rows(level: Level, select: Any, sop_class_name: Callable[[str], str]) -> Iterator[Row]:
    items = list(select)
    ids = [item.id for item in items]
    if level == "patient":
        studies = _counts(
            db.Study.select(db.Study.patient, pw.fn.COUNT(db.Study.id)), db.Study.patient, ids
        )
        for p in items:
            yield Row(
                p.id, (p.patient_id, p.patient_name, p.sex, p.birth_date, str(studies.get(p.id, 0)))
            )
    elif level == "study":
        series = _counts(
            db.Series.select(db.Series.study, pw.fn.COUNT(db.Series.id)), db.Series.study, ids
        )
        instances = _counts(
            db.Series.select(db.Series.study, pw.fn.COUNT(db.Instance.id)).join(db.Instance),
            db.Series.study,
            ids,
        )
        records = _record_keys(s.record_id for s in items)
        for s in items:
            yield Row(
                s.id,
                (
                    _date(s.study_date),
                    s.description,
                    s.accession_number,
                    s.modalities,
                    str(series.get(s.id, 0)),
                    str(instances.get(s.id, 0)),
                    records.get(s.record_id, ""),
                ),
            )
    elif level == "series":
        instances = _counts(
            db.Instance.select(db.Instance.series, pw.fn.COUNT(db.Instance.id)),
            db.Instance.series,
            ids,
        )
        records = _record_keys(s.record_id for s in items)
        for s in items:
            number = "" if s.series_number is None else str(s.series_number)
            yield Row(
                s.id,
                (
                    number,
                    s.modality,
                    s.description,
                    str(instances.get(s.id, 0)),
                    records.get(s.record_id, ""),
                ),
            )
    else:
        for i in items:
            number = "" if i.instance_number is None else str(i.instance_number)
            received = (
                i.received_at.strftime("%Y-%m-%d %H:%M")
                if isinstance(i.received_at, datetime)
                else str(i.received_at)
            )
            yield Row(
                i.id,
                (
                    number,
                    sop_class_name(i.sop_class_uid),
                    i.transfer_syntax_uid,
                    str(i.number_of_frames),
                    human_size(i.size),
                    received,
                ),
            )


def _counts(select: Any, key: Any, ids: Sequence[int]) -> dict[int, int]:
    """COUNTs grouped by ``key`` for the given parent ids: one query per page, not per row."""
    if not ids:
        return {}
    query = select.where(key.in_(list(ids))).group_by(key).tuples()
    return {int(parent): int(count) for parent, count in query}


def _record_keys(ids: Iterator[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    query = db.Record.select(db.Record.id, db.Record.key).where(db.Record.id.in_(list(wanted)))
    return {r.id: r.key for r in query}


def _date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD (what people read); anything else unchanged."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


# --- detail -----------------------------------------------------------------------------------


def unit_summary(
    level: Level, unit_id: int, sop_class_name: Callable[[str], str] = str
) -> UnitSummary:
    """The fields the detail pane shows for one row, with its instance count and size."""
    with db.database.connection_context():
        model = MODELS[level]
        item = model.get_or_none(model.id == unit_id)
        if item is None:
            raise BrowseError(f"{level} {unit_id} is no longer in the archive")
        instances = _instances_of(level, unit_id)
        count, size = instances.select(
            pw.fn.COUNT(db.Instance.id), pw.fn.SUM(db.Instance.size)
        ).scalar(as_tuple=True)
        fields: list[tuple[str, str]]
        if level == "patient":
            title = f"Patient {item.patient_id}"
            fields = [
                ("Patient ID", item.patient_id),
                ("Name", item.patient_name),
                ("Sex", item.sex),
                ("Birth date", _date(item.birth_date)),
            ]
        elif level == "study":
            title = f"Study {_date(item.study_date)} {item.description}".strip()
            fields = [
                ("Study UID", item.study_instance_uid),
                ("Date", f"{_date(item.study_date)} {item.study_time}".strip()),
                ("Description", item.description),
                ("Accession", item.accession_number),
                ("Study ID", item.study_id),
                ("Modalities", item.modalities),
            ]
        elif level == "series":
            title = f"Series {item.series_number or ''} {item.modality} {item.description}".strip()
            fields = [
                ("Series UID", item.series_instance_uid),
                ("Number", "" if item.series_number is None else str(item.series_number)),
                ("Modality", item.modality),
                ("Description", item.description),
                ("Body part", item.body_part),
            ]
        else:
            title = f"Instance {item.instance_number or ''}".strip()
            fields = [
                ("SOP instance UID", item.sop_instance_uid),
                ("SOP class", sop_class_name(item.sop_class_uid)),
                ("Transfer syntax", item.transfer_syntax_uid),
                ("Frames", str(item.number_of_frames)),
                ("Archive path", item.archive_path),
                ("Rule set version", _ruleset_label(item.ruleset_version)),
                ("Received from", item.calling_ae),
            ]
        record = getattr(item, "record", None) if level != "patient" else None
        if record is not None:
            fields += [
                ("Record", f"{record.unit} {record.key}"),
                ("Record instances", str(record.instance_count)),
                ("Record last received", _stamp(record.last_received)),
            ]
        fields += [("Instances", str(count or 0)), ("Size", human_size(size or 0))]
        return UnitSummary(level, unit_id, title, tuple(fields), int(count or 0), int(size or 0))


def _ruleset_label(version: int | None) -> str:
    if version is None:
        return "none (stored unchanged)"
    ruleset = db.RuleSet.get_or_none(db.RuleSet.id == version)
    if ruleset is None:
        return f"#{version}"
    return f"{ruleset.name} v{ruleset.version}"


def _stamp(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value)


def _instances_of(level: Level, unit_id: int) -> Any:
    select = db.Instance.select()
    if level == "instance":
        return select.where(db.Instance.id == unit_id)
    if level == "series":
        return select.where(db.Instance.series == unit_id)
    series = db.Series.select(db.Series.id)
    if level == "study":
        return select.where(db.Instance.series.in_(series.where(db.Series.study == unit_id)))
    studies = db.Study.select(db.Study.id).where(db.Study.patient == unit_id)
    return select.where(db.Instance.series.in_(series.where(db.Series.study.in_(studies))))


def instance_file(archive: Path, instance_id: int) -> InstanceFile:
    with db.database.connection_context():
        item = db.Instance.get_or_none(db.Instance.id == instance_id)
        if item is None:
            raise BrowseError(f"instance {instance_id} is no longer in the archive")
        return InstanceFile(
            id=item.id,
            path=_inside(archive, item.archive_path),
            relative_path=item.archive_path,
            transfer_syntax_uid=item.transfer_syntax_uid,
            ruleset_version=item.ruleset_version,
            number_of_frames=item.number_of_frames,
            sop_instance_uid=item.sop_instance_uid,
        )


def _inside(archive: Path, relative: str) -> Path:
    """The file for an archive_path; a path escaping the archive is refused, not followed."""
    root = archive.resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise BrowseError(f"archive path {relative!r} points outside the archive")
    return path


def tag_dump(path: Path) -> list[TagNode]:
    """Every element of the file (meta group first) as a tree; pixel data is not loaded."""
    try:
        dataset = dcmread(path, defer_size=1024)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise BrowseError(f"cannot read {path.name}: {exc}") from None
    nodes: list[TagNode] = []
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        nodes.extend(_element_nodes(meta))
    nodes.extend(_element_nodes(dataset))
    return nodes


def _element_nodes(dataset: Dataset) -> Iterator[TagNode]:
    for element in dataset:
        yield _element_node(element)


def _element_node(element: DataElement) -> TagNode:
    tag = f"({element.tag.group:04X},{element.tag.element:04X})"
    name = element.keyword or element.name
    if element.VR == "SQ" and isinstance(element.value, DicomSequence):
        items = element.value
        node = TagNode(f"{tag} {name} SQ ({len(items)} item{'s' if len(items) != 1 else ''})")
        for number, item in enumerate(items, start=1):
            node.children.append(TagNode(f"Item {number}", list(_element_nodes(item))))
        return node
    return TagNode(f"{tag} {name} {element.VR} {_value_text(element)}")


def _value_text(element: DataElement) -> str:
    if element.tag == 0x7FE00010 or element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        # Never read a binary value here: with defer_size it stays on disk until asked for.
        return f"<{element.VR} binary>"
    try:
        text = element.repval if element.VM > 1 else str(element.value)
    except Exception:
        text = "<unreadable>"
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


# --- actions ----------------------------------------------------------------------------------


def unit_files(archive: Path, level: Level, unit_id: int) -> list[tuple[int, Path, str]]:
    """(instance id, file, archive path) of every instance of a unit."""
    with db.database.connection_context():
        select = _instances_of(level, unit_id).select(db.Instance.id, db.Instance.archive_path)
        return [(i.id, _inside(archive, i.archive_path), i.archive_path) for i in select]


def delete_unit(archive: Path, level: Level, unit_id: int) -> DeleteResult:
    """Delete a unit's rows and files together: either both go or neither does.

    The files are first renamed into a trash folder next to the archive (same file system, so
    renames are atomic), then the rows are deleted in one transaction. If the transaction fails the
    files are moved back; only after the commit is the trash emptied.
    """
    files = unit_files(archive, level, unit_id)
    trash = archive / f".trash-{uuid.uuid4().hex[:12]}"
    moved: list[tuple[Path, Path]] = []
    missing = 0
    try:
        for _instance_id, path, _relative in files:
            if not path.exists():
                missing += 1
                continue
            trash.mkdir(exist_ok=True)
            target = trash / f"{len(moved)}.dcm"
            os.replace(path, target)
            moved.append((path, target))
        with db.database.connection_context(), db.database.atomic():
            _delete_rows(level, unit_id)
    except BaseException:
        for original, target in moved:
            original.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, original)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    for original, _target in moved:
        _prune_empty_folders(original.parent, archive)
    return DeleteResult(instances=len(files), files=len(moved), missing_files=missing)


def _delete_rows(level: Level, unit_id: int) -> None:
    model = MODELS[level]
    if model.get_or_none(model.id == unit_id) is None:
        raise BrowseError(f"{level} {unit_id} is no longer in the archive")
    instances = _instances_of(level, unit_id)
    records = {i.record_id for i in instances.select(db.Instance.record) if i.record_id is not None}
    # Explicit deletes, children first: correct whether or not the database enforces cascades.
    instance_ids = [i.id for i in instances.select(db.Instance.id)]
    for start in range(0, len(instance_ids), 500):
        db.Instance.delete().where(db.Instance.id.in_(instance_ids[start : start + 500])).execute()
    if level == "patient":
        studies = db.Study.select(db.Study.id).where(db.Study.patient == unit_id)
        db.Series.delete().where(db.Series.study.in_(studies)).execute()
        db.Study.delete().where(db.Study.patient == unit_id).execute()
    elif level == "study":
        db.Series.delete().where(db.Series.study == unit_id).execute()
    model.delete().where(model.id == unit_id).execute()
    _refresh_records(records)


def _refresh_records(record_ids: set[int]) -> None:
    """Keep a record's counts true after its instances went; an emptied record goes too."""
    for record_id in record_ids:
        count = db.Instance.select().where(db.Instance.record == record_id).count()
        if count == 0:
            db.Record.delete().where(db.Record.id == record_id).execute()
            continue
        series = (
            db.Instance.select(db.Instance.series)
            .where(db.Instance.record == record_id)
            .distinct()
            .count()
        )
        db.Record.update(
            instance_count=count, series_count=series, last_modified=datetime.now()
        ).where(db.Record.id == record_id).execute()


def _prune_empty_folders(folder: Path, archive: Path) -> None:
    root = archive.resolve()
    current = folder.resolve()
    while current != root and root in current.parents:
        try:
            current.rmdir()
        except OSError:
            return  # not empty (or gone): stop climbing
        current = current.parent


def export_unit(
    archive: Path, level: Level, unit_id: int, destination: Path, *, as_zip: bool = False
) -> ExportResult:
    """Copy a unit's files, with their archive layout, into a folder or a new zip file.

    ``destination`` is a folder (created if needed) or, with ``as_zip``, the zip file to write
    (``.zip`` is appended when missing). An existing zip is never overwritten.
    """
    files = unit_files(archive, level, unit_id)
    if not files:
        raise BrowseError(f"{level} {unit_id} has no instances to export")
    missing = 0
    if as_zip:
        target = destination if destination.suffix == ".zip" else destination.with_suffix(".zip")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        # DICOM pixel data barely compresses: store, do not deflate (much faster).
        with zipfile.ZipFile(partial, "x", compression=zipfile.ZIP_STORED) as bundle:
            for _id, path, relative in files:
                if not path.exists():
                    missing += 1
                    continue
                bundle.write(path, arcname=relative)
        if target.exists():
            partial.unlink()
            raise BrowseError(f"{target} already exists: choose another name")
        os.replace(partial, target)
        return ExportResult(
            instances=len(files) - missing, destination=target, missing_files=missing
        )
    destination.mkdir(parents=True, exist_ok=True)
    for _id, path, relative in files:
        if not path.exists():
            missing += 1
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return ExportResult(
        instances=len(files) - missing, destination=destination, missing_files=missing
    )
