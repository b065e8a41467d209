"""Copy an archive database into another one: moving an SQLite archive onto PostgreSQL.

Every table of :data:`db.MODELS` is copied in foreign-key order, in batches read by primary key
(keyset pagination, so memory stays flat at a million instances), keeping the primary keys so
that every reference stays valid. The whole copy is one transaction on the target: it either
lands complete, verified by per-table counts, or leaves the target as it was. PostgreSQL
sequences are then moved past the copied keys so the next insert does not collide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw

from webaims_tui.engine import db

#: SQLite refuses statements with more bound parameters than this (32,766 since 3.32).
_MAX_PARAMETERS = 30_000

#: (table, rows copied so far, rows in the source table)
CopyProgress = Callable[[str, int, int], None]


class DatabaseCopyError(Exception):
    """The copy cannot start or did not verify; the target was left unchanged."""


@dataclass(frozen=True)
class TableCopy:
    """What one table's copy did: the per-table check the CLI prints."""

    table: str
    source_rows: int
    target_rows: int

    @property
    def verified(self) -> bool:
        return self.source_rows == self.target_rows


def copy_order() -> list[type[db.BaseModel]]:
    """The models, each after every model it references (MODELS order otherwise)."""
    ordered: list[type[db.BaseModel]] = []

    def visit(model: type[db.BaseModel]) -> None:
        if model in ordered:
            return
        for field in model._meta.refs:
            if field.rel_model is not model:
                visit(field.rel_model)
        ordered.append(model)

    for model in db.MODELS:
        visit(model)
    return ordered


def target_row_counts(target: pw.Database) -> dict[str, int]:
    """Rows per table in ``target`` (which must be at the current schema)."""
    return {m._meta.table_name: int(m.select().count(target)) for m in copy_order()}


def copy_database(
    source: pw.Database,
    target: pw.Database,
    *,
    force: bool = False,
    batch_size: int = 1000,
    progress: CopyProgress | None = None,
) -> list[TableCopy]:
    """Copy every table of ``source`` into ``target``; returns the per-table counts.

    ``source`` must be a webaims-tui database at the current schema version (run ``db migrate``
    first); it is only read. ``target`` is created or migrated to the current schema. A target
    that already holds archive rows is refused unless ``force``, which replaces its contents.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    models = copy_order()
    source_version = _schema_version_of(source)
    if source_version != db.SCHEMA_VERSION:
        raise DatabaseCopyError(
            f"the source database is at schema version {source_version}, this program writes "
            f"{db.SCHEMA_VERSION}: run `webaims-tui db migrate` on it first"
        )
    unknown = sorted(set(source.get_tables()) - {m._meta.table_name for m in models})
    if unknown:
        # A table this program does not know would be silently left behind.
        raise DatabaseCopyError(
            "the source database has tables this program does not know: " + ", ".join(unknown)
        )
    with target.bind_ctx(models):
        db.migrate(target)

    report: list[TableCopy] = []
    with target.atomic():
        occupied = {
            table: rows
            for table, rows in target_row_counts(target).items()
            # migrate() writes the schema version row into a fresh database.
            if rows and table != db.SchemaInfo._meta.table_name
        }
        if occupied and not force:
            listing = ", ".join(f"{table} ({rows} rows)" for table, rows in occupied.items())
            raise DatabaseCopyError(
                f"the target database is not empty: {listing}; use --force to replace its contents"
            )
        for model in reversed(models):
            model.delete().execute(target)
        for model in models:
            report.append(_copy_table(model, source, target, batch_size, progress))
        if db.is_postgresql(target):
            for model in models:
                _reset_sequence(model, target)
        failed = [entry for entry in report if not entry.verified]
        if failed:
            # Raising inside atomic() rolls the whole copy back.
            details = ", ".join(
                f"{e.table}: {e.source_rows} in source, {e.target_rows} in target" for e in failed
            )
            raise DatabaseCopyError(f"counts differ after the copy ({details}); nothing was kept")
    return report


def _schema_version_of(database: pw.Database) -> int:
    if not database.table_exists(db.SchemaInfo._meta.table_name):
        raise DatabaseCopyError("the source is not a webaims-tui database (no schema_info table)")
    info = (
        db.SchemaInfo.select(db.SchemaInfo.version)
        .order_by(db.SchemaInfo.id.desc())
        .limit(1)
        .dicts()
        .execute(database)
    )
    rows = list(info)
    return int(rows[0]["version"]) if rows else 0


def _copy_table(
    model: type[db.BaseModel],
    source: pw.Database,
    target: pw.Database,
    batch_size: int,
    progress: CopyProgress | None,
) -> TableCopy:
    table = model._meta.table_name
    key: pw.Field = model.id
    fields = list(model._meta.sorted_fields)
    key_index = fields.index(key)
    batch = max(1, min(batch_size, _MAX_PARAMETERS // len(fields)))
    total = int(model.select().count(source))
    copied = 0
    last_key: object = None
    while True:
        query = model.select(*fields).order_by(key).limit(batch)
        if last_key is not None:
            query = query.where(key > last_key)
        # tuples() gives Python values (datetimes, booleans); db_value turns them into what the
        # target stores. Foreign keys come as plain ids, so every reference is kept as is.
        rows = [
            tuple(field.db_value(value) for field, value in zip(fields, row, strict=True))
            for row in query.tuples().execute(source)
        ]
        if not rows:
            break
        try:
            with _exception_wrapper:
                _insert_rows(target, table, [f.column_name for f in fields], rows)
        except (pw.DataError, pw.IntegrityError) as exc:
            # SQLite does not enforce VARCHAR lengths, PostgreSQL does. Only the first line of
            # the server's message: its DETAIL line may quote a (pseudonymized) key value.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseCopyError(
                f"{table}: rows after id {last_key or 0} do not fit the target ({reason}); "
                "nothing was kept"
            ) from None
        copied += len(rows)
        last_key = rows[-1][key_index]
        if progress is not None:
            progress(table, copied, total)
    if progress is not None and total == 0:
        progress(table, 0, 0)
    return TableCopy(table, total, int(model.select().count(target)))


#: Turns driver exceptions (psycopg2, sqlite3) into peewee's, as peewee's own execute does.
_exception_wrapper = getattr(pw, "__exception_wrapper__")  # noqa: B009


def _insert_rows(
    target: pw.Database, table: str, columns: list[str], rows: list[tuple[object, ...]]
) -> None:
    """One batch through the driver: peewee builds an INSERT of 1,000 rows slower than the
    server runs it (measured: 100,000 instances took 44 s through insert_many)."""
    names = ", ".join(f'"{column}"' for column in columns)
    cursor = target.cursor()
    if db.is_postgresql(target):
        # One statement per batch instead of one round trip per row.
        from psycopg2.extras import execute_values  # type: ignore[import-untyped]

        execute_values(
            cursor, f'INSERT INTO "{table}" ({names}) VALUES %s', rows, page_size=len(rows)
        )
    else:
        marks = ", ".join([target.param] * len(columns))
        cursor.executemany(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', rows)


def _reset_sequence(model: type[db.BaseModel], target: pw.Database) -> None:
    """Move the table's id sequence past the copied keys (explicit ids do not advance it)."""
    table = model._meta.table_name
    column = model.id.column_name
    target.execute_sql(
        f"SELECT setval(pg_get_serial_sequence(%s, %s), "
        f'COALESCE(MAX("{column}"), 0) + 1, false) FROM "{table}"',
        (f'"{table}"', column),
    )


#: The linkage table's columns (engine/linkage.py keeps it outside the peewee models).
_LINKAGE_COLUMNS = ("kind", "original", "pseudonym", "created_at")


def copy_linkage(
    source_url: str, target_url: str, *, force: bool = False, batch_size: int = 1000
) -> TableCopy:
    """Copy the pseudonym linkage (original -> pseudonym pairs) into another database.

    The target table is created by :class:`~webaims_tui.engine.linkage.Linkage` itself. A target
    that already holds pairs is refused unless ``force``, which merges: a pair already there is
    kept (with one site secret both sides hold the same pseudonym anyway). One transaction.
    """
    from webaims_tui.engine.linkage import Linkage

    source = db.connect(source_url)
    target_linkage = Linkage(target_url)
    try:
        if not source.table_exists("linkage"):
            raise DatabaseCopyError("the source has no linkage table: nothing to copy")
        before = target_linkage.count()  # creates the table as the linkage does
        if before and not force:
            raise DatabaseCopyError(
                f"the target linkage already holds {before} pairs; use --force to merge into it"
            )
        target = target_linkage.database
        names = ", ".join(_LINKAGE_COLUMNS)
        marks = ", ".join([target.param] * len(_LINKAGE_COLUMNS))
        insert = (
            f"INSERT INTO linkage ({names}) VALUES ({marks}) "
            "ON CONFLICT (kind, original) DO NOTHING"
        )
        with target.atomic():
            total = int(source.execute_sql("SELECT COUNT(*) FROM linkage").fetchone()[0])
            cursor = source.execute_sql(f"SELECT {names} FROM linkage ORDER BY kind, original")
            while rows := cursor.fetchmany(batch_size):
                with _exception_wrapper:
                    target.cursor().executemany(insert, rows)
            after = int(target.execute_sql("SELECT COUNT(*) FROM linkage").fetchone()[0])
            if after < total:
                raise DatabaseCopyError(
                    f"linkage: {total} pairs in the source but {after} in the target; "
                    "nothing was kept"
                )
        return TableCopy("linkage", total, after)
    finally:
        db.close_database(source)
        target_linkage.close()
