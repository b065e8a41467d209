"""A bounded network fuzz run against a live SCP (the long run: fuzz_long.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from pydicom.dataset import Dataset

from tests.adversarial.fuzzing import (
    CASES,
    RELEASE_RQ,
    FuzzTarget,
    Seed,
    command,
    fuzz_engine,
    pdv,
    uncaught_thread_exceptions,
)
from tests.adversarial.peers import thread_count, wait_until

SUITE_CASES = 120


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    engine = fuzz_engine(tmp_path_factory.mktemp("fuzz"))
    fuzz = FuzzTarget(engine, check_every=40)
    fuzz.set_bounds(rss_headroom_mb=150)
    with uncaught_thread_exceptions(fuzz.crashes):
        yield fuzz
    engine.stop()


def test_mutated_pdus_leave_the_server_serving_within_bounds(target: FuzzTarget) -> None:
    @settings(
        max_examples=SUITE_CASES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure here is reproducible
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=CASES)
    def fuzz(case: tuple[Seed, list[tuple[object, ...]]]) -> None:
        target.run_case(*case)
        assert not target.crashes, target.crashes

    fuzz()
    assert target.cases >= SUITE_CASES
    target.check_health("at the end")
    assert not target.crashes, target.crashes
    assert wait_until(lambda: thread_count() <= target.thread_bound, timeout=30)
    print(target.summary())


def _command_without(missing: str, command_field: int = 0x0030) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = "1.2.840.10008.1.1"
    cmd.CommandField = command_field
    cmd.MessageID = 7
    cmd.CommandDataSetType = 0x0101
    if missing:
        delattr(cmd, missing)
    return pdv(1, 0x03, command(cmd))


#: Inputs that killed pynetdicom's reader thread before the guard (found by the fuzz run).
REGRESSIONS = {
    "command set without CommandField": _command_without("CommandField"),
    "command set without CommandDataSetType": _command_without("CommandDataSetType"),
    "unknown command field 0x7777": _command_without("", command_field=0x7777),
    # Race-dependent (Evt14 in Sta13): the release answer crosses the peer's garbage.
    "release request then garbage": RELEASE_RQ + b"\x09\x00\x00\x00\x00\x02xx",
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions_found_by_fuzzing(target: FuzzTarget, case: str) -> None:
    for _ in range(5):
        target.run_case(Seed(case, REGRESSIONS[case], associated=True), [])
    target.check_health(case)
    assert not target.crashes, target.crashes
