"""Benchmarks of the TUI under load, run by hand (never by CI).

``lag``: the app runs headless with its real engine (SCP + autoloader) in this process; DCMTK
``storescu`` (another process, as a modality would be) sends a burst of N small CT images in one
association. A probe task sleeps 10 ms in a loop on the app's event loop and records how late it
wakes: that lateness is what a keypress or a redraw would wait. Reports worst and p99 lag.

``browser``: generates a database of N instances (1,000 patients, 4 series per study, the rest
spread evenly; one big series of 10,000) and times the browser's page queries and, through the
running app, the delay from a key to the page shown.

    .venv/bin/python bench/bench_ui_lag.py lag --instances 1000
    .venv/bin/python bench/bench_ui_lag.py browser --instances 100000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webaims_tui.config import Overrides, Settings, load_settings

CT_SOURCE = "CT_small.dcm"


def _settings(root: Path) -> Settings:
    os.environ["XDG_CONFIG_HOME"] = str(root / "xdg-config")
    os.environ["XDG_DATA_HOME"] = str(root / "xdg-data")
    config = root / "config.toml"
    config.write_text("")
    settings = load_settings(Overrides(config_file=config, data_dir=root / "data"))
    return dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, host="127.0.0.1", port=0)
    )


class LagProbe:
    """Sleeps ``interval`` in a loop on the event loop and records each wake-up's lateness."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._running = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.lags.append(max(loop.time() - before - self.interval, 0.0))

    async def stop(self) -> None:
        self._running = False
        if self._task is not None:
            await self._task

    def report(self) -> str:
        if not self.lags:
            return "no samples"
        ordered = sorted(self.lags)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"worst {max(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"median {statistics.median(ordered) * 1000:.1f} ms over {len(ordered)} samples"
        )


class GCPauses:
    """Records how long each garbage collection takes (a full one can stall the event loop)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> str:
        parts = []
        for generation, pauses in self.pauses.items():
            if pauses:
                parts.append(
                    f"gen{generation}: {len(pauses)} runs, worst {max(pauses) * 1000:.1f} ms"
                )
        return "garbage collections: " + (", ".join(parts) or "none")


def _make_burst(folder: Path, count: int) -> list[Path]:
    """``count`` copies of CT_small with fresh UIDs (one study, one series)."""
    import pydicom.data
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    source = dcmread(Path(pydicom.data.__file__).parent / "test_files" / CT_SOURCE)
    study, series = generate_uid(), generate_uid()
    files = []
    for number in range(count):
        source.StudyInstanceUID = study
        source.SeriesInstanceUID = series
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        source.InstanceNumber = number + 1
        path = folder / f"{number:05d}.dcm"
        source.save_as(path)
        files.append(path)
    return files


async def bench_lag(instances: int) -> None:
    from webaims_tui.app import WebaimsApp

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        burst = root / "burst"
        burst.mkdir()
        files = _make_burst(burst, instances)
        app = WebaimsApp(_settings(root))
        async with app.run_test(size=(120, 40)) as pilot:
            while not (app.engine_ready and app.listening):
                await pilot.pause(0.05)
            idle = LagProbe()
            idle.start()
            await asyncio.sleep(2)
            await idle.stop()
            print(f"idle:  {idle.report()}")

            gc_pauses = GCPauses()
            probe = LagProbe()
            probe.start()
            started = time.perf_counter()
            sender = await asyncio.create_subprocess_exec(
                "storescu", "-aec", "WEBAIMS", "-aet", "BENCH", "127.0.0.1", str(app.port),
                *map(str, files),
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, error = await sender.communicate()
            sent = time.perf_counter() - started
            if sender.returncode:
                print(error.decode(errors="replace"))
            deadline = time.perf_counter() + 120
            while (
                app.activity.archived + app.activity.quarantined < instances
                and time.perf_counter() < deadline
            ):
                await asyncio.sleep(0.05)
            ingested = time.perf_counter() - started
            await asyncio.sleep(0.5)
            await probe.stop()
            print(
                f"burst: {instances} instances received in {sent:.2f}s "
                f"({instances / sent:.0f}/s), archived {app.activity.archived}, "
                f"quarantined {app.activity.quarantined} after {ingested:.2f}s"
            )
            print(f"burst: {probe.report()}")
            print(f"burst: {gc_pauses.report()}")
            gc_pauses.close()
            await pilot.press("q")


def _fill(settings: Settings, instances: int) -> tuple[int, int]:
    """Patients x 1 study x 4 series, plus one 10,000-instance series; returns (study, series)."""
    from datetime import datetime

    from webaims_tui.config import ensure_folders
    from webaims_tui.engine import db

    ensure_folders(settings)
    database = db.open_database(settings.paths.database_url)
    now = datetime(2026, 12, 1)
    big_series_size = min(10_000, instances // 2)
    patients = 1_000
    # Spread the rest evenly; the first `extra` series get one more so the total is exact.
    per_series, extra = divmod(max(instances - big_series_size, patients * 4), patients * 4)
    with database.atomic():
        db.Patient.insert_many(
            [
                {"patient_id": f"ANON{p:06d}", "patient_name": f"ANON^{p:06d}", "sex": "O",
                 "created_at": now}
                for p in range(patients)
            ]
        ).execute()  # fmt: skip
        db.Study.insert_many(
            [
                {"study_instance_uid": f"2.25.1.{p}", "patient": p + 1,
                 "study_date": f"20{10 + p % 15:02d}0{1 + p % 9}15", "description": f"STUDY {p}",
                 "modalities": "CT" if p % 2 else "MR", "created_at": now}
                for p in range(patients)
            ]
        ).execute()  # fmt: skip
        series_rows = [
            {"series_instance_uid": f"2.25.2.{p}.{s}", "study": p + 1, "series_number": s + 1,
             "modality": "CT" if p % 2 else "MR", "created_at": now}
            for p in range(patients)
            for s in range(4)
        ]  # fmt: skip
        for start in range(0, len(series_rows), 1000):
            db.Series.insert_many(series_rows[start : start + 1000]).execute()
        big_series = db.Series.create(
            series_instance_uid="2.25.3.big", study=1, series_number=99, modality="CT"
        ).id
        batch: list[dict[str, object]] = []
        number = 0

        def flush() -> None:
            db.Instance.insert_many(batch).execute()
            batch.clear()

        for series_id in range(1, len(series_rows) + 1):
            for _ in range(per_series + (1 if series_id <= extra else 0)):
                number += 1
                batch.append(_instance_row(number, series_id, now))
                if len(batch) == 2000:
                    flush()
        for _ in range(big_series_size):
            number += 1
            batch.append(_instance_row(number, big_series, now))
            if len(batch) == 2000:
                flush()
        if batch:
            flush()
        total = db.Instance.select().count()
    database.close()
    print(f"database: {patients} patients, {len(series_rows) + 1} series, {total:,} instances")
    return 1, big_series


def _instance_row(number: int, series: int, now: object) -> dict[str, object]:
    return {
        "sop_instance_uid": f"2.25.4.{number}",
        "series": series,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "instance_number": number,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size": 525_000,
        "received_at": now,
        "archive_path": f"x/{number}.dcm",
    }


def _timed(what: str, call: Callable[[], object], repeat: int = 5) -> None:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    print(f"  {what:<48} median {statistics.median(times) * 1000:7.1f} ms, "
          f"worst {max(times) * 1000:7.1f} ms")  # fmt: skip


async def bench_browser(instances: int) -> None:
    from webaims_tui.app import WebaimsApp
    from webaims_tui.engine.browse import BrowseQuery
    from webaims_tui.engine.service import Engine
    from webaims_tui.screens.browser import BrowserScreen

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        settings = _settings(root)
        started = time.perf_counter()
        study, big_series = _fill(settings, instances)
        print(f"  generated in {time.perf_counter() - started:.1f}s")

        engine = Engine(settings)
        engine.open()
        print("engine.browse_page (one page of 100 rows, with its total count):")
        _timed("patients, first page", lambda: engine.browse_page(BrowseQuery()))
        _timed("patients, last page", lambda: engine.browse_page(BrowseQuery(offset=900)))
        _timed(
            "patients, sorted by name descending",
            lambda: engine.browse_page(BrowseQuery(sort="patient_name", descending=True)),
        )
        _timed(
            "patients, search 'ANON^0004'",
            lambda: engine.browse_page(BrowseQuery(patient="ANON^0004")),
        )
        _timed(
            "patients, modality CT + date 2015-2020",
            lambda: engine.browse_page(
                BrowseQuery(modality="CT", date_from="20150000", date_to="20209999")
            ),
        )
        _timed("studies of all patients", lambda: engine.browse_page(BrowseQuery(level="study")))
        _timed(
            "series of a study",
            lambda: engine.browse_page(BrowseQuery(level="series", parent_id=study)),
        )
        _timed(
            "instances of the 10,000-instance series, page 1",
            lambda: engine.browse_page(BrowseQuery(level="instance", parent_id=big_series)),
        )
        _timed(
            "instances of that series, last page",
            lambda: engine.browse_page(
                BrowseQuery(level="instance", parent_id=big_series, offset=9_900)
            ),
        )
        _timed(
            "detail of the patient with the big series", lambda: engine.unit_summary("patient", 1)
        )
        engine.stop()  # fmt: skip

        app = WebaimsApp(settings, start_server=False)
        async with app.run_test(size=(120, 40)) as pilot:
            while not app.engine_ready:
                await pilot.pause(0.05)
            await pilot.press("2")
            screen = app.screen
            assert isinstance(screen, BrowserScreen)
            while screen.page is None:
                await asyncio.sleep(0.005)
            print("through the app (request -> page drawn in the table, event loop included):")

            async def shown(label: str, query: BrowseQuery) -> None:
                previous = screen.page
                started = time.perf_counter()
                screen.reload(query)
                while screen.page is previous:
                    await asyncio.sleep(0.002)
                await asyncio.sleep(0)  # the table's refresh
                page = screen.page
                assert page is not None
                elapsed = (time.perf_counter() - started) * 1000
                print(f"  {label:<48} {elapsed:7.1f} ms ({len(page.rows)} of {page.total:,})")

            for _ in range(2):
                await shown("patients, first page", BrowseQuery())
                await shown("studies of patient 1", BrowseQuery(level="study", parent_id=1))
                await shown("series of its study", BrowseQuery(level="series", parent_id=study))
                await shown(
                    "the 10,000-instance series, page 1",
                    BrowseQuery(level="instance", parent_id=big_series),
                )
                await shown(
                    "the 10,000-instance series, page 100",
                    BrowseQuery(level="instance", parent_id=big_series, offset=9_900),
                )
            await pilot.press("q")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lag", "browser"])
    parser.add_argument("--instances", type=int, default=None)
    args = parser.parse_args()
    if args.what == "lag":
        asyncio.run(bench_lag(args.instances or 1000))
    else:
        asyncio.run(bench_browser(args.instances or 100_000))


if __name__ == "__main__":
    main()
