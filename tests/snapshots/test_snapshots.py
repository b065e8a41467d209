"""Snapshot tests of the shell, the receive log, the browser and the instance screen at 80x24
and 120x40.

Deterministic by construction: the server is not started (the test injects the events the engine
would emit, with fixed times and port 11112), the clock and the free-disk figure are fixed, and the
database is pre-filled with fixed values. Regenerate with ``pytest tests/snapshots
--snapshot-update`` after an intended change, and look at the SVGs before committing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import pytest
from textual.pilot import Pilot
from textual.widgets import Tree

from tests.conftest import SettingsFactory
from tests.ui.archive import fill_archive
from tests.ui.conftest import wait_until
from webaims_tui.app import WebaimsApp
from webaims_tui.engine.events import (
    AssociationEnded,
    AssociationRejected,
    AssociationStarted,
    InstanceArchived,
    InstanceQuarantined,
    InstanceReceived,
    QueueDepth,
    ServerFailed,
    ServerStarted,
)
from webaims_tui.screens.browser import BrowserScreen
from webaims_tui.screens.instance import InstanceScreen

NOW = datetime(2026, 12, 1, 10, 0, 30)
START = datetime(2026, 12, 1, 10, 0, 0)
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"

SnapCompare = Callable[..., bool]


@pytest.fixture
def make_app(make_settings: SettingsFactory) -> Callable[[], WebaimsApp]:
    def factory() -> WebaimsApp:
        settings = make_settings(port=11112)
        fill_archive(settings)
        return WebaimsApp(
            settings,
            clock=lambda: NOW,
            disk_free=lambda _path: 50 * 1024**3,
            start_server=False,
        )

    return factory


def _feed(app: WebaimsApp) -> None:
    """What the engine emits for two associations, one rejected caller and some outcomes."""
    sink = app.engine_sink
    sink(ServerStarted("WEBAIMS", "127.0.0.1", 11112, at=START))
    sink(AssociationStarted(1, "CT_SCANNER_01", "WEBAIMS", "10.0.0.21", 50001, 2, (), at=START))
    for number in range(12):
        at = START + timedelta(seconds=number)
        uid = f"1.2.826.0.1.3680043.10.5.{number}"
        sink(InstanceReceived(1, "CT_SCANNER_01", CT, uid, EXPLICIT, 525_000, f"{number}", at=at))
        sink(
            InstanceArchived(uid, CT, "CT", "REC-0001", number == 0, f"a/{number}", 525_000, at=at)
        )
    sink(
        AssociationEnded(
            1,
            "CT_SCANNER_01",
            "10.0.0.21",
            12,
            0,
            12 * 525_000,
            11.5,
            "released",
            at=START + timedelta(seconds=12),
        )
    )
    sink(
        AssociationRejected(
            "UNKNOWN_AE",
            "WEBAIMS",
            "10.0.0.99",
            "calling AE title not recognised",
            at=START + timedelta(seconds=14),
        )
    )
    sink(
        AssociationStarted(
            2,
            "MR_3T",
            "WEBAIMS",
            "10.0.0.35",
            50002,
            1,
            ("RTPlanStorage",),
            at=START + timedelta(seconds=20),
        )
    )
    for number in range(3):
        at = START + timedelta(seconds=21 + number)
        sink(
            InstanceReceived(
                2,
                "MR_3T",
                MR,
                f"1.2.826.0.1.3680043.10.6.{number}",
                EXPLICIT,
                262_000,
                f"m{number}",
                at=at,
            )
        )
    sink(
        InstanceQuarantined(
            "m1.dcm",
            "residual-phi",
            "PatientName in a private tag",
            at=START + timedelta(seconds=25),
        )
    )
    sink(QueueDepth(2, at=START + timedelta(seconds=25)))


async def _log_ready(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    _feed(app)
    await wait_until(pilot, lambda: app.activity.received == 15, "the events")
    await pilot.pause(0.3)


async def _log_expanded(pilot: Pilot[None]) -> None:
    await _log_ready(pilot)
    await pilot.press("home", "enter")
    await pilot.pause(0.2)


async def _browser_ready(pilot: Pilot[None]) -> None:
    await _log_ready(pilot)
    await pilot.press("2")
    screen = pilot.app.screen
    assert isinstance(screen, BrowserScreen)
    await wait_until(
        pilot,
        lambda: screen.page is not None and screen.summary is not None,
        "the first page and its detail",
    )
    await pilot.pause(0.2)


async def _browser_series(pilot: Pilot[None]) -> None:
    await _browser_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, BrowserScreen)
    await pilot.press("enter")
    await wait_until(
        pilot, lambda: screen.page is not None and screen.page.query.level == "study", "studies"
    )
    await pilot.press("enter")
    await wait_until(
        pilot,
        lambda: (
            screen.page is not None
            and screen.page.query.level == "series"
            and screen.summary is not None
            and screen.summary.level == "series"
        ),
        "series",
    )
    await pilot.pause(0.2)


async def _port_in_use(pilot: Pilot[None]) -> None:
    """What the engine emits when another process holds port 11112 (the SCP's own wording)."""
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready, "the database")
    reason = "cannot listen on 127.0.0.1:11112: Address already in use"
    app.engine_sink(ServerFailed("127.0.0.1", 11112, reason, at=START))
    await wait_until(pilot, lambda: bool(app.server_error), "the bind error")
    await pilot.pause(0.3)


async def _instance_tags(pilot: Pilot[None]) -> None:
    """The tag dump of the CT instance, with the image preview hidden (v).

    The preview widget is chosen from the terminal pytest runs in (Sixel, kitty graphics or
    half blocks) and its pixels come from Pillow's resampling, which is not pinned: neither
    belongs in a snapshot.
    """
    await _browser_ready(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, BrowserScreen)

    def at_level(level: str) -> Callable[[], bool]:
        return lambda: screen.page is not None and screen.page.query.level == level

    for level in ("study", "series", "instance"):
        await pilot.press("enter")
        await wait_until(pilot, at_level(level), level)
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, InstanceScreen), "the instance")
    instance = pilot.app.screen
    assert isinstance(instance, InstanceScreen)
    tree = instance.query_one("#tags", Tree)
    await wait_until(pilot, lambda: len(tree.root.children) > 10, "the tag dump")
    await wait_until(pilot, lambda: instance.frame is not None, "the decoded frame")
    await pilot.press("v")
    await pilot.pause(0.2)


Before = Callable[[Pilot[None]], Awaitable[None]]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize(
    "run_before",
    [_log_ready, _log_expanded, _browser_ready, _browser_series, _port_in_use, _instance_tags],
    ids=["log", "log-expanded", "browser", "browser-series", "port-in-use", "instance-tags"],
)
def test_screen(
    snap_compare: SnapCompare,
    make_app: Callable[[], WebaimsApp],
    run_before: Before,
    size: tuple[int, int],
) -> None:
    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)
