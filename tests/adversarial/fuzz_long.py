"""The long fuzz run, by hand: ``.venv/bin/python -m tests.adversarial.fuzz_long``.

Runs the same network fuzz as the suite (mutated PDUs against a live SCP, health checks every
``--check-every`` cases) and the autoloader fuzz (mutated real files through parse -> anonymize
-> write), with random rather than fixed cases, and prints the figures the README quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.fuzzing import (
    CASES,
    MUTATION,
    FuzzTarget,
    Seed,
    fuzz_engine,
    mutate,
    uncaught_thread_exceptions,
)
from tests.adversarial.test_fuzz_autoloader import SEEDS, Harness


def network(cases: int, check_every: int, folder: Path) -> FuzzTarget:
    engine = fuzz_engine(folder / "network")
    target = FuzzTarget(engine, check_every=check_every)
    target.set_bounds(rss_headroom_mb=150)

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=CASES)
    def fuzz(case: tuple[Seed, list[tuple[object, ...]]]) -> None:
        target.run_case(*case)

    try:
        with uncaught_thread_exceptions(target.crashes):
            fuzz()
            target.check_health("at the end")
    finally:
        engine.stop()
    return target


def autoloader(cases: int, folder: Path) -> tuple[Harness, float]:
    engine = fuzz_engine(folder / "autoloader")
    engine.stop()  # only the database and the anonymizer are needed
    engine.open()
    temp = folder / "autoloader-temp"
    temp.mkdir()
    harness = Harness(
        engine.settings.paths.incoming,
        temp,
        engine.settings.autoloader.path_template,
        engine.make_anonymizer(),
    )
    seeds = [path.read_bytes() for path in SEEDS]
    started = time.monotonic()

    @settings(
        max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(seed=st.sampled_from(seeds), mutations=st.lists(MUTATION, min_size=0, max_size=6))
    def fuzz(seed: bytes, mutations: list[tuple[object, ...]]) -> None:
        # A failure is kept as a regression file by the harness; go on fuzzing.
        with contextlib.suppress(Exception):
            harness.run(mutate(seed, mutations))

    fuzz()
    engine.stop()
    return harness, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--network-cases", type=int, default=5000)
    parser.add_argument("--autoloader-cases", type=int, default=5000)
    parser.add_argument("--check-every", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webaims-fuzz-") as scratch:
        folder = Path(scratch)
        os.environ["XDG_CONFIG_HOME"] = str(folder / "xdg-config")
        os.environ["XDG_DATA_HOME"] = str(folder / "xdg-data")
        if args.network_cases:
            target = network(args.network_cases, args.check_every, folder)
            print("network:", target.summary())
            for crash in target.crashes[:20]:
                print("  crash:", crash)
        if args.autoloader_cases:
            harness, elapsed = autoloader(args.autoloader_cases, folder)
            print(
                f"autoloader: {harness.cases} cases in {elapsed:.1f} s, "
                f"{len(harness.bugs)} bugs; outcomes {dict(sorted(harness.outcomes.items()))}"
            )
            for bug in harness.bugs[:20]:
                print("  bug:", bug)


if __name__ == "__main__":
    main()
