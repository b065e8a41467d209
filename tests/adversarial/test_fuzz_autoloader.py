"""Fuzzing the autoloader's parse -> anonymize -> write step with mutated real files.

``autoloader.prepare`` promises never to raise for bad input: every file comes back prepared
(anonymized and written), refused (quarantined with a reason) or postponed (left in incoming/).
Seeds are pydicom's real storage files; hypothesis mutates their bytes. An exception, or a
prepared file that cannot be read back or still carries the patient's name, is a bug: the input
is saved under ``regressions/`` and replayed by ``test_regression_files``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from tests.adversarial.fuzzing import MUTATION, mutate
from tests.conftest import SettingsFactory
from tests.helpers import storage_corpus
from webaims_tui.engine.anonymize import Anonymizer
from webaims_tui.engine.autoloader import Job, Postponed, Prepared, Refused, prepare
from webaims_tui.engine.service import Engine

SUITE_CASES = 150
REGRESSIONS = Path(__file__).parent / "regressions"

# Small seeds keep each case quick; mutations reach every part of them.
SEEDS = [path for path in storage_corpus(encodable=False) if path.stat().st_size <= 64 * 1024]


@dataclass
class Harness:
    incoming: Path
    temp: Path
    template: str
    anonymizer: Anonymizer
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    bugs: list[str] = field(default_factory=list)

    def run(self, data: bytes) -> None:
        name = f"fuzz-{hashlib.sha256(data).hexdigest()[:16]}.dcm"
        (self.incoming / name).write_bytes(data)
        job = Job(str(self.incoming), name, str(self.temp), self.template)
        self.cases += 1
        try:
            outcome = prepare(job, self.anonymizer)
        except Exception as exc:  # the promise is broken: keep the input
            self._keep(data, f"{type(exc).__name__}: {exc}")
            raise
        kind = type(outcome).__name__
        if isinstance(outcome, Refused):
            kind = f"Refused({outcome.reason})"
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
        if isinstance(outcome, Prepared):
            self._check_prepared(data, outcome)
        elif isinstance(outcome, Postponed):
            # Postponed means "retry later" (disk full): a malformed file would wait forever.
            self._keep(data, f"postponed a malformed file: {outcome.detail}")
        (self.incoming / name).unlink(missing_ok=True)

    def _check_prepared(self, data: bytes, outcome: Prepared) -> None:
        written = Path(outcome.temp)
        try:
            archived = dcmread(written)
            _ = archived.SOPInstanceUID
        except Exception as exc:
            self._keep(data, f"prepared file unreadable: {type(exc).__name__}: {exc}")
            return
        finally:
            written.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            name = str(dcmread(self.incoming / outcome.name).get("PatientName", "") or "")
            if len(name) >= 4 and name in str(archived.get("PatientName", "")):
                self._keep(data, "the patient's name reached the archive file")

    def _keep(self, data: bytes, problem: str) -> None:
        self.bugs.append(problem)
        REGRESSIONS.mkdir(exist_ok=True)
        digest = hashlib.sha256(data).hexdigest()[:16]
        (REGRESSIONS / f"autoloader-{digest}.dcm").write_bytes(data)
        (REGRESSIONS / f"autoloader-{digest}.txt").write_text(problem + "\n")


@pytest.fixture
def harness(make_settings: SettingsFactory, tmp_path: Path) -> Iterator[Harness]:
    engine = Engine(make_settings())
    engine.open()
    temp = tmp_path / "temp"
    temp.mkdir()
    yield Harness(
        engine.settings.paths.incoming,
        temp,
        engine.settings.autoloader.path_template,
        engine.make_anonymizer(),
    )
    engine.stop()


def test_mutated_files_are_prepared_or_refused_never_raise(harness: Harness) -> None:
    assert SEEDS, "no seed files"
    seeds = [path.read_bytes() for path in SEEDS]

    @settings(
        max_examples=SUITE_CASES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(seed=st.sampled_from(seeds), mutations=st.lists(MUTATION, min_size=0, max_size=4))
    def fuzz(seed: bytes, mutations: list[tuple[object, ...]]) -> None:
        harness.run(mutate(seed, mutations))
        assert not harness.bugs, harness.bugs

    fuzz()
    print(
        f"autoloader fuzz: {harness.cases} cases, outcomes {dict(sorted(harness.outcomes.items()))}"
    )


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.name) for p in sorted(REGRESSIONS.glob("autoloader-*.dcm"))],
)
def test_regression_files(harness: Harness, path: Path) -> None:
    harness.run(path.read_bytes())
    assert not harness.bugs, harness.bugs
