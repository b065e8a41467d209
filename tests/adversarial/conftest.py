"""Fixtures of the adversarial suite: an engine started with the bounds a test needs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.engine.service import Engine

EngineFactory = Callable[..., Engine]


@pytest.fixture
def start_engine(make_settings: SettingsFactory, events: EventRecorder) -> Iterator[EngineFactory]:
    """``start_engine(**server_settings)``: a started engine on a free loopback port."""
    started: list[Engine] = []

    def factory(**server: object) -> Engine:
        engine = Engine(make_settings(**server), sink=events)
        engine.start()
        assert engine.server is not None and engine.server.listening, engine.server
        started.append(engine)
        return engine

    yield factory
    for engine in started:
        engine.stop()


def port_of(engine: Engine) -> int:
    assert engine.server is not None
    return engine.server.port


@pytest.fixture(autouse=True)
def _no_thread_dies(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test when any thread (pynetdicom's or ours) died of an uncaught exception."""
    from tests.adversarial.fuzzing import uncaught_thread_exceptions

    crashes: list[str] = []
    with uncaught_thread_exceptions(crashes):
        yield
    if crashes:
        pytest.fail(f"uncaught exceptions in threads: {crashes}")
