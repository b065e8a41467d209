"""The archive database: peewee models behind a DatabaseProxy, plus schema migrations.

The proxy is initialised by :func:`open_database`, never at import, so tests and the CLI can
point it at any URL. SQLite runs in WAL mode with ``synchronous=normal`` (one writer, the
autoloader; readers in threads); nothing here uses SQLite-only SQL so that PostgreSQL works too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import peewee as pw
from playhouse import db_url
from playhouse.migrate import SchemaMigrator
from playhouse.pool import PooledDatabase, PooledPostgresqlDatabase

database = pw.DatabaseProxy()

#: Bump this and append to MIGRATIONS whenever a model changes.
SCHEMA_VERSION = 2

#: Per process; every node on a shared PostgreSQL server needs this many backends at most.
POOL_MAX_CONNECTIONS = 16

#: Any constant: nodes starting at once serialise their migrations on this advisory lock.
_MIGRATION_LOCK_KEY = 0x5745_4241_494D_53


class DatabaseVersionError(Exception):
    """The database was written by a newer webaims-tui than this one."""


class BaseModel(pw.Model):
    id = pw.AutoField()

    class Meta:
        database = database
        legacy_table_names = False


ModelT = TypeVar("ModelT", bound=BaseModel)


class SchemaInfo(BaseModel):
    """A single row holding the schema version the database is at."""

    version = pw.IntegerField()
    migrated_at = pw.DateTimeField(default=datetime.now)


class Record(BaseModel):
    """A research record: the unit (patient, study or series) the autoloader groups data by."""

    unit = pw.CharField(max_length=16)
    key = pw.CharField(max_length=128, unique=True)
    instance_count = pw.IntegerField(default=0)
    series_count = pw.IntegerField(default=0)
    modalities = pw.CharField(max_length=128, default="")
    first_received = pw.DateTimeField(default=datetime.now)
    last_received = pw.DateTimeField(default=datetime.now)
    last_modified = pw.DateTimeField(default=datetime.now)


class Patient(BaseModel):
    """Anonymized patient identity (the values in the archived files)."""

    patient_id = pw.CharField(max_length=128, unique=True)
    patient_name = pw.CharField(max_length=256, default="")
    sex = pw.CharField(max_length=16, default="")
    birth_date = pw.CharField(max_length=16, default="")
    created_at = pw.DateTimeField(default=datetime.now)


class Study(BaseModel):
    study_instance_uid = pw.CharField(max_length=64, unique=True)
    patient = pw.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    record = pw.ForeignKeyField(Record, backref="studies", null=True, on_delete="SET NULL")
    study_date = pw.CharField(max_length=16, default="", index=True)
    study_time = pw.CharField(max_length=16, default="")
    description = pw.CharField(max_length=256, default="")
    accession_number = pw.CharField(max_length=64, default="")
    study_id = pw.CharField(max_length=64, default="")
    modalities = pw.CharField(max_length=128, default="")
    created_at = pw.DateTimeField(default=datetime.now)


class Series(BaseModel):
    series_instance_uid = pw.CharField(max_length=64, unique=True)
    study = pw.ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    record = pw.ForeignKeyField(Record, backref="series", null=True, on_delete="SET NULL")
    modality = pw.CharField(max_length=16, default="")
    series_number = pw.IntegerField(null=True)
    description = pw.CharField(max_length=256, default="")
    body_part = pw.CharField(max_length=64, default="")
    created_at = pw.DateTimeField(default=datetime.now)


class Instance(BaseModel):
    sop_instance_uid = pw.CharField(max_length=64, unique=True)
    series = pw.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    record = pw.ForeignKeyField(Record, backref="instances", null=True, on_delete="SET NULL")
    sop_class_uid = pw.CharField(max_length=64)
    instance_number = pw.IntegerField(null=True)
    transfer_syntax_uid = pw.CharField(max_length=64, default="")
    number_of_frames = pw.IntegerField(default=1)
    size = pw.BigIntegerField(default=0)
    received_at = pw.DateTimeField(default=datetime.now)
    calling_ae = pw.CharField(max_length=16, default="")
    #: The media reference: the file in the archive, relative to the archive folder.
    archive_path = pw.CharField(max_length=1024)
    #: Which rule set version anonymized this instance (null when it came in unchanged).
    ruleset_version = pw.IntegerField(null=True)
    content_hash = pw.CharField(max_length=64, default="")


class AssociationLog(BaseModel):
    """One row per association the SCP accepted or rejected."""

    calling_ae = pw.CharField(max_length=16)
    called_ae = pw.CharField(max_length=16)
    peer_address = pw.CharField(max_length=64)
    peer_port = pw.IntegerField(default=0)
    started_at = pw.DateTimeField(default=datetime.now)
    ended_at = pw.DateTimeField(null=True)
    accepted_contexts = pw.IntegerField(default=0)
    rejected_contexts = pw.TextField(default="")
    instances = pw.IntegerField(default=0)
    failures = pw.IntegerField(default=0)
    bytes = pw.BigIntegerField(default=0)
    outcome = pw.CharField(max_length=32, default="")
    detail = pw.TextField(default="")


class ReceivedInstanceLog(BaseModel):
    """One row per C-STORE request, whatever its status."""

    association = pw.ForeignKeyField(AssociationLog, backref="received", on_delete="CASCADE")
    sop_class_uid = pw.CharField(max_length=64)
    sop_instance_uid = pw.CharField(max_length=64, index=True)
    transfer_syntax_uid = pw.CharField(max_length=64)
    size = pw.BigIntegerField(default=0)
    status = pw.IntegerField(default=0)
    received_at = pw.DateTimeField(default=datetime.now)


class QuarantineEntry(BaseModel):
    """A file the autoloader could not archive; the file and a JSON sidecar sit in quarantine/."""

    path = pw.CharField(max_length=1024, unique=True)
    reason = pw.CharField(max_length=64, index=True)
    detail = pw.TextField(default="")
    source = pw.CharField(max_length=64, default="")
    sop_instance_uid = pw.CharField(max_length=64, default="")
    created_at = pw.DateTimeField(default=datetime.now)
    #: The rule set version (RuleSet row id) that anonymized the file or refused to: a
    #: residual-PHI entry names the version that leaked. Null when no rule set was involved.
    ruleset_version = pw.IntegerField(null=True)


class RuleSet(BaseModel):
    """One version of a named anonymization rule set, stored as its TOML text."""

    name = pw.CharField(max_length=64)
    version = pw.IntegerField()
    toml = pw.TextField()
    active = pw.BooleanField(default=False)
    comment = pw.TextField(default="")
    created_at = pw.DateTimeField(default=datetime.now)

    class Meta:
        indexes = ((("name", "version"), True),)


class RemoteNode(BaseModel):
    """A remote DICOM node (PACS) to query and retrieve from."""

    name = pw.CharField(max_length=64, unique=True)
    ae_title = pw.CharField(max_length=16)
    host = pw.CharField(max_length=255)
    port = pw.IntegerField()
    query_model = pw.CharField(max_length=16, default="study")
    retrieve_method = pw.CharField(max_length=16, default="c-move")
    tls = pw.BooleanField(default=False)
    tls_ca_file = pw.CharField(max_length=1024, default="")
    tls_cert_file = pw.CharField(max_length=1024, default="")
    tls_key_file = pw.CharField(max_length=1024, default="")
    acse_timeout = pw.FloatField(default=30.0)
    dimse_timeout = pw.FloatField(default=60.0)
    network_timeout = pw.FloatField(default=60.0)
    max_pdu_size = pw.IntegerField(default=65536)
    last_echo_at = pw.DateTimeField(null=True)
    last_echo_ok = pw.BooleanField(null=True)
    last_echo_detail = pw.TextField(default="")


MODELS: tuple[type[BaseModel], ...] = (
    SchemaInfo,
    Record,
    Patient,
    Study,
    Series,
    Instance,
    AssociationLog,
    ReceivedInstanceLog,
    QuarantineEntry,
    RuleSet,
    RemoteNode,
)


def _add_quarantine_ruleset_version(migrator: SchemaMigrator) -> None:
    """Version 2: a quarantine entry names the rule set version that refused the file."""
    # The field is spelt out, not taken from QuarantineEntry: a migration must keep doing what
    # it did when it was written, whatever the model becomes later.
    migrator.add_column("quarantine_entry", "ruleset_version", pw.IntegerField(null=True)).run()


#: MIGRATIONS[n] takes a database from schema version n to n + 1.
MIGRATIONS: dict[int, Callable[[SchemaMigrator], None]] = {
    1: _add_quarantine_ruleset_version,
}


def connect(url: str) -> pw.Database:
    """A peewee database for ``url`` (``sqlite:///path`` or ``postgresql://...``), not yet bound."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return pw.SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": "normal",
                # Readers in UI threads and the writer meet here: wait rather than fail.
                "busy_timeout": 10_000,
            },
            check_same_thread=False,
        )
    scheme, separator, _ = url.partition("://")
    if separator and scheme in ("postgresql", "postgres"):
        # peewee opens one connection per thread; the pool lets association threads, the
        # autoloader and UI readers reuse them instead of paying a PostgreSQL backend start each
        # time. Query parameters in the URL (sslmode=..., max_connections=...) override these.
        parameters = {**db_url.parse(url), **_pool_defaults(url)}
        name = parameters.pop("database")
        if not name:
            raise ValueError(f"{scheme}://...: no database name after the host (host/name)")
        return ThreadAwarePool(name, **parameters)
    return db_url.connect(url)


class ThreadAwarePool(PooledPostgresqlDatabase):
    """A connection pool that takes back connections whose thread has ended.

    peewee opens a connection for any thread that queries, and only ``close()`` (or
    ``connection_context()``) returns it to the pool. A worker thread that queried and ended
    without closing would hold its connection for good: measured, 15 such threads exhausted the
    default pool and every later query waited for the pool timeout and failed.
    """

    def __init__(self, database: str, **kwargs: object) -> None:
        self._owners: dict[int, threading.Thread] = {}
        super().__init__(database, **kwargs)

    def _connect(self) -> object:
        with self._pool_lock:
            self._reclaim_from_ended_threads()
            connection = super()._connect()
            self._owners[self.conn_key(connection)] = threading.current_thread()
            return connection

    def _reclaim_from_ended_threads(self) -> None:
        for key, thread in list(self._owners.items()):
            if key not in self._in_use:
                del self._owners[key]  # returned to the pool or closed
            elif not thread.is_alive():
                del self._owners[key]
                # Its transaction state is unknown: close it rather than hand it on.
                self._close_raw(self._in_use.pop(key).connection)


def open_database(url: str) -> pw.Database:
    """Bind the proxy to ``url``, creating or migrating the schema. Returns the database."""
    db = connect(url)
    database.initialize(db)
    db.connect(reuse_if_open=True)
    migrate(db)
    return db


def _pool_defaults(url: str) -> dict[str, object]:
    given = db_url.parse(url)
    defaults: dict[str, object] = {
        "max_connections": POOL_MAX_CONNECTIONS,
        # Connections idle this long are closed on check-out: survives server restarts.
        "stale_timeout": 300,
        # A full pool waits this long for a connection before failing.
        "timeout": 30,
    }
    return {key: value for key, value in defaults.items() if key not in given}


def is_postgresql(db: pw.Database) -> bool:
    """Whether ``db`` (or the database behind a proxy) is PostgreSQL."""
    target = db.obj if isinstance(db, pw.DatabaseProxy) else db
    return isinstance(target, pw.PostgresqlDatabase)


def close_database(db: pw.Database) -> None:
    """Close ``db``: for a pool every connection, including ones other threads left open."""
    if isinstance(db, PooledDatabase):
        db.close_all()
    else:
        db.close()


def get_or_create_unique(
    model: type[ModelT],
    key_field: pw.Field,
    key: object,
    defaults: Mapping[str, object] | None = None,
) -> tuple[ModelT, bool]:
    """The row of ``model`` whose unique ``key_field`` is ``key``, inserted with ``defaults`` if
    missing. Returns ``(row, created)``.

    Safe when several threads or processes (several nodes on one PostgreSQL database) race for the
    same key: ``INSERT ... ON CONFLICT (key) DO NOTHING`` never raises on the duplicate and, on
    PostgreSQL, waits for a competing uncommitted insert to commit or roll back; the SELECT after
    it then sees the winner's row. Check-then-insert (peewee's ``get_or_create``) would raise
    IntegrityError in the loser and, inside a PostgreSQL transaction, abort the whole transaction.
    """
    values: dict[str, object] = dict(defaults or {})
    values[key_field.name] = key
    with model._meta.database.atomic():
        inserted = (
            model.insert(**values)
            .on_conflict(conflict_target=[key_field], action="NOTHING")
            .as_rowcount()
            .execute()
        )
        row = model.get_or_none(key_field == key)
    if row is None:
        # Only possible if another process deleted the row between the two statements.
        raise pw.IntegrityError(f"{model.__name__}: {key_field.name} row vanished after insert")
    return row, bool(inserted)


def insert_missing(
    model: type[BaseModel], rows: Sequence[Mapping[str, object]], key_field: pw.Field
) -> int:
    """Insert ``rows``, skipping any whose unique ``key_field`` is already taken (by anyone).

    One statement, race-safe across processes like :func:`get_or_create_unique`. Returns how
    many rows were new. Keep ``rows`` to a few hundred: SQLite caps bound parameters.
    """
    if not rows:
        return 0
    inserted = (
        model.insert_many(list(rows))
        .on_conflict(conflict_target=[key_field], action="NOTHING")
        .as_rowcount()
        .execute()
    )
    return int(inserted)


@contextlib.contextmanager
def schema_lock(db: pw.Database) -> Iterator[None]:
    """A transaction in which creating tables is serialised across processes.

    Two nodes starting together on an empty PostgreSQL database would both create the tables,
    and even ``CREATE TABLE IF NOT EXISTS`` then fails in one of them (a unique violation in
    pg_type/pg_class). PostgreSQL DDL is transactional, so an advisory lock held until commit
    serialises them; SQLite needs nothing: its first write takes the database lock.
    """
    with db.atomic():
        if is_postgresql(db):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        yield


def migrate(db: pw.Database) -> int:
    """Bring ``db`` to SCHEMA_VERSION; returns the version it was at before."""
    with schema_lock(db):
        if not db.table_exists(SchemaInfo._meta.table_name):
            if db.get_tables():
                raise DatabaseVersionError(
                    "the database has tables but no schema version: not a webaims-tui database"
                )
            db.create_tables(MODELS)
            SchemaInfo.create(version=SCHEMA_VERSION)
            return 0
        info = SchemaInfo.select().order_by(SchemaInfo.id.desc()).first()
        current = info.version if info else 0
        if current > SCHEMA_VERSION:
            raise DatabaseVersionError(
                f"the database is at schema version {current}, newer than this program's "
                f"{SCHEMA_VERSION}: upgrade webaims-tui"
            )
        migrator = SchemaMigrator.from_database(db)
        for version in range(current, SCHEMA_VERSION):
            MIGRATIONS[version](migrator)
        if current != SCHEMA_VERSION:
            # Tables added by later versions are created here; existing ones are left alone.
            db.create_tables(MODELS, safe=True)
            SchemaInfo.create(version=SCHEMA_VERSION)
        return current


def schema_version(db: pw.Database) -> int:
    info = SchemaInfo.select().order_by(SchemaInfo.id.desc()).first()
    return int(info.version) if info else 0
