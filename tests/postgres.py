"""A throwaway PostgreSQL server for tests, from the Debian ``postgresql`` package.

:class:`PostgresServer` runs ``initdb`` into a temporary folder and ``pg_ctl start`` on a free
loopback port; the ``postgres_server`` fixture does that once per test session (per xdist
worker) and stops it at teardown. ``WEBAIMS_TEST_DATABASE=postgresql`` makes ``make_settings``
(tests/conftest.py) put every test on a fresh database of that server instead of SQLite.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user the
package creates, from a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

#: ``postgresql`` runs the engine suite on PostgreSQL; unset or ``sqlite`` on SQLite.
TEST_DATABASE_ENV = "WEBAIMS_TEST_DATABASE"


def engine_tests_use_postgresql() -> bool:
    value = os.environ.get(TEST_DATABASE_ENV, "sqlite").strip().lower()
    if value not in ("sqlite", "postgresql", "postgres"):
        raise pytest.UsageError(f"{TEST_DATABASE_ENV}={value!r}: use sqlite or postgresql")
    return value != "sqlite"


def find_postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (Debian keeps them off PATH), or None."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    # The highest installed major version wins.
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1 in a temporary folder, trust authentication."""

    user = "postgres"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        # Not under pytest's tmp_path: that is root-only (0700) and the server user must write.
        self.root = Path(tempfile.mkdtemp(prefix="webaims-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> None:
        if self._as_root:
            shutil.chown(self.root, user="postgres", group="postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                # A test server holds nothing worth a crash-safe commit: trade that for speed.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "webaims") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres"
        )
        try:
            # CREATE DATABASE cannot run inside a transaction block.
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for the whole session (one per xdist worker)."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI") or engine_tests_use_postgresql():
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
