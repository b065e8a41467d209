"""UI test helpers: a pynetdicom SCU that sends real files, and waiting on the running app."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from textual.pilot import Pilot

from tests.conftest import SettingsFactory
from tests.ui.archive import TEST_FILES, FilledArchive, fill_archive
from webaims_tui.app import WebaimsApp
from webaims_tui.config import Settings

SIZE = (120, 40)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests (Pilot tests) in a fresh event loop; no asyncio plugin needed."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**arguments))
    return True


def scu(calling_ae: str = "UITESTSCU") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def send_files(port: int, files: list[Path], calling_ae: str = "UITESTSCU") -> list[int]:
    """C-STORE ``files`` over one association (run it in a thread); returns the statuses."""
    ae = scu(calling_ae)
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="WEBAIMS")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(path).Status) for path in files]
    assoc.release()
    return statuses


async def wait_until(
    pilot: Pilot[None], condition: Callable[[], bool], what: str, timeout: float = 20.0
) -> None:
    """Let the app run until ``condition`` holds (the engine works in other threads)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def started(pilot: Pilot[None]) -> WebaimsApp:
    app = pilot.app
    assert isinstance(app, WebaimsApp)
    await wait_until(pilot, lambda: app.engine_ready and app.listening, "the engine to listen")
    return app


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
def filled(settings: Settings) -> FilledArchive:
    return fill_archive(settings)


CT_FILES = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
