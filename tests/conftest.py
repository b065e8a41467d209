"""Fixtures shared by every test layer: settings on a temporary data dir, a running engine."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EventRecorder, storage_corpus
from tests.postgres import (  # noqa: F401  (fixtures, found by pytest through this import)
    PostgresServer,
    engine_tests_use_postgresql,
    postgres_server,
    postgres_url,
)
from webaims_tui.config import Overrides, Settings, load_settings
from webaims_tui.engine.scp import StorageServer
from webaims_tui.engine.service import Engine


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read or write the real user's config or data, whatever the test does."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    for name in ("WEBAIMS_CONFIG", "WEBAIMS_DATA_DIR", "WEBAIMS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> SettingsFactory:
    """Settings on ``tmp_path/data``, listening on a free loopback port unless told otherwise.

    With WEBAIMS_TEST_DATABASE=postgresql the archive database is a fresh PostgreSQL database
    per test (the same one for every call within a test) unless the config text names one; it is
    also put in WEBAIMS_DATABASE_URL, so CLI runs and subprocesses of the test use it too. The
    linkage database is another fresh PostgreSQL database per test unless the config text names
    one; it is written into the config file, which is how CLI runs and subprocesses find it.
    """
    postgres: PostgresServer | None = None
    if engine_tests_use_postgresql():
        postgres = request.getfixturevalue("postgres_server")
    postgres_urls: list[str] = []
    linkage_urls: list[str] = []

    def factory(config_text: str = "", **server: object) -> Settings:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        overrides = Overrides(config_file=config, data_dir=tmp_path / "data")
        settings = load_settings(overrides)
        linkage_source = settings.source_of("paths.linkage_database_url")
        if postgres is not None and linkage_source == "default":
            if not linkage_urls:
                linkage_urls.append(postgres.create_database("linkage"))
            # The linkage URL has no flag or environment variable: only the config file reaches
            # the CLI runs and subprocesses of the test.
            config.write_text(
                _with_path_setting(config_text, "linkage_database_url", linkage_urls[0])
            )
            settings = load_settings(overrides)
        # Any: the values are of several ServerSettings field types; replace() rejects unknown keys.
        server_values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, **server}
        settings = dataclasses.replace(
            settings, server=dataclasses.replace(settings.server, **server_values)
        )
        database_source = settings.source_of("paths.database_url")
        if postgres is not None and database_source in ("default", "environment"):
            if not postgres_urls:
                postgres_urls.append(postgres.create_database())
                monkeypatch.setenv("WEBAIMS_DATABASE_URL", postgres_urls[0])
            paths = dataclasses.replace(settings.paths, database_url=postgres_urls[0])
            settings = dataclasses.replace(settings, paths=paths)
        return settings

    return factory


def _with_path_setting(config_text: str, key: str, value: str) -> str:
    """``config_text`` with ``key = "value"`` in its [paths] table (added if it has none)."""
    line = f'{key} = "{value}"'
    header = re.search(r"^\[paths\][ \t]*(#.*)?$", config_text, flags=re.MULTILINE)
    if header is None:
        return f"{config_text}\n[paths]\n{line}\n"
    # A second [paths] table would be invalid TOML: the key goes into the existing one.
    end = header.end()
    return f"{config_text[:end]}\n{line}{config_text[end:]}"


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def engine(make_settings: SettingsFactory, events: EventRecorder) -> Iterator[Engine]:
    """A started engine (SCP listening on a free loopback port) on a temporary data dir."""
    running = Engine(make_settings(), sink=events)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def receiver(make_settings: SettingsFactory, events: EventRecorder) -> Iterator[Engine]:
    """An engine with only the Storage SCP running: received files stay in incoming/."""
    settings = make_settings()
    running = Engine(settings, sink=events)
    running.open()
    paths = settings.paths
    running.server = StorageServer(settings.server, paths.incoming, paths.spool, events)
    running.server.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    return storage_corpus()
