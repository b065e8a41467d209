"""Every storage object of pydicom's bundled corpus through the default rule set.

The default set (Basic profile, private tags removed, dates shifted, keyed pseudonyms) must leave
no private element, no profile attribute with its original value, no original identifying
string anywhere in the file, every UID replaced consistently and pixel data byte-identical; the
output must read back with pydicom and be accepted by a DCMTK ``storescu`` send.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from webaims_tui.config import AnonymizationSettings
from webaims_tui.engine.anonymize import RuleAnonymizer
from webaims_tui.engine.linkage import Keys
from webaims_tui.engine.profile import default_rule_set, profile_rules

SECRET = b"corpus test secret, 32 bytes ok"

#: Attributes whose values identify a person or a site: chosen here independently of the
#: engine's own watchlist, so the test does not just repeat the implementation.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientAddress",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
)


@dataclass(frozen=True)
class Anonymized:
    source: Path
    original: Dataset
    output: Path


@pytest.fixture(scope="module")
def anonymized(corpus: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Anonymized]:
    folder = tmp_path_factory.mktemp("anonymized")
    # Burned-in candidates (US, secondary captures) are let through here: the point is what the
    # rules do to every kind of object. Refusing them is tested in test_anonymize.py.
    engine = RuleAnonymizer(
        default_rule_set(), Keys(SECRET), AnonymizationSettings(quarantine_burned_in=False)
    )
    results = []
    for number, path in enumerate(corpus):
        out = engine.anonymize(dcmread(path)).dataset
        target = folder / f"{number:03d}.dcm"
        dcmwrite(target, out, enforce_file_format=True)
        results.append(Anonymized(path, dcmread(path), target))
    return results


def _leaves(ds: Dataset) -> Iterator[tuple[int, str]]:
    """(tag, value text) of every non-sequence element at every depth."""
    for element in ds.iterall():
        if element.VR != "SQ" and element.value not in (None, "", b""):
            yield int(element.tag), str(element.value)


def test_every_file_reads_back_and_is_marked(anonymized: list[Anonymized]) -> None:
    assert len(anonymized) > 100
    for item in anonymized:
        out = dcmread(item.output)
        assert out.PatientIdentityRemoved == "YES", item.source.name
        assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"


def test_no_private_element_remains(anonymized: list[Anonymized]) -> None:
    for item in anonymized:
        out = dcmread(item.output)
        private = [str(e.tag) for e in out.iterall() if e.tag.is_private]
        assert not private, f"{item.source.name}: {private}"


def test_no_profile_attribute_keeps_its_original_value(anonymized: list[Anonymized]) -> None:
    rule_set = default_rule_set()
    changed: set[int] = set()
    for rule in profile_rules(rule_set.profile):
        if rule.action != "keep" and "x" not in rule.match and rule.match.startswith("("):
            changed.add(int(rule.match[1:5] + rule.match[6:10], 16))
    checked = 0
    for item in anonymized:
        before: dict[int, set[str]] = defaultdict(set)
        for tag, value in _leaves(item.original):
            if tag in changed and value != "ANONYMIZED":
                before[tag].add(value)
        after: dict[int, set[str]] = defaultdict(set)
        for tag, value in _leaves(dcmread(item.output)):
            after[tag].add(value)
        for tag, values in before.items():
            kept = values & after[tag]
            assert not kept, f"{item.source.name}: ({tag:08X}) kept {kept}"
            checked += 1
    assert checked > 1000


def test_no_original_identifying_string_occurs_anywhere(anonymized: list[Anonymized]) -> None:
    for item in anonymized:
        values: set[str] = set()
        for element in item.original.iterall():
            if element.keyword in IDENTIFYING and element.value:
                text = str(element.value).strip()
                values.add(text)
                values |= {part for part in re.split(r"[\^=]", text) if part.strip()}
        values = {v.strip() for v in values if len(v.strip()) >= 3}
        values -= {"ANONYMIZED", "Anonymized", "anonymous", "ANONYMOUS"}
        # A word that is also in the vendor's own strings is the vendor's (rtplan.dcm's
        # institution is called "Here", its manufacturer "Manufacturer name here").
        vendor = " ".join(
            str(item.original.get(k, "")) for k in ("Manufacturer", "ManufacturerModelName")
        ).casefold()
        values = {v for v in values if not re.search(rf"\b{re.escape(v.casefold())}\b", vendor)}
        # test-SR.dcm's patient is "Test^S R" and it uses a coding scheme called "TEST".
        schemes = {
            str(e.value).casefold()
            for e in item.original.iterall()
            if e.keyword == "CodingSchemeDesignator"
        }
        values = {v for v in values if v.casefold() not in schemes}
        data = item.output.read_bytes()
        pixel = dcmread(item.output).get("PixelData")
        if pixel:
            data = data.replace(pixel, b"")  # random pixel bytes say nothing
        text = data.decode("latin-1")
        for value in values:
            pattern = rf"(?<![0-9A-Za-z_]){re.escape(value)}(?![0-9A-Za-z_])"
            found = re.search(pattern, text, re.IGNORECASE)
            assert found is None, f"{item.source.name}: an original value is still in the file"


def test_every_uid_changed_consistently(anonymized: list[Anonymized]) -> None:
    keys = Keys(SECRET)
    new_sops: dict[str, str] = {}
    for item in anonymized:
        out = dcmread(item.output)
        original_sop = item.original.SOPInstanceUID
        assert out.SOPInstanceUID == keys.uid(original_sop) != original_sop
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        if "StudyInstanceUID" in item.original:
            assert out.StudyInstanceUID == keys.uid(item.original.StudyInstanceUID)
        if "SeriesInstanceUID" in item.original:
            assert out.SeriesInstanceUID == keys.uid(item.original.SeriesInstanceUID)
        new_sops[original_sop] = out.SOPInstanceUID
        for element in out.iterall():
            if element.VR == "UI" and element.value and element.keyword != "SOPClassUID":
                values = element.value if isinstance(element.value, list) else [element.value]
                for value in values:
                    assert len(value) <= 64
    # References between instances resolve: a reference to an original SOP Instance UID is now
    # the referenced instance's new UID, wherever it sits.
    references = 0
    for item in anonymized:
        out = dcmread(item.output)
        original_refs = [
            e.value for e in item.original.iterall() if e.keyword == "ReferencedSOPInstanceUID"
        ]
        new_refs = [e.value for e in out.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
        assert set(new_refs) <= {keys.uid(v) for v in original_refs}
        assert not set(new_refs) & set(original_refs)
        for value in original_refs:
            if value in new_sops:
                assert new_sops[value] in new_refs
                references += 1
        references += len(new_refs)
    assert references > 0


def test_studies_stay_together(anonymized: list[Anonymized]) -> None:
    by_original: dict[str, set[str]] = defaultdict(set)
    for item in anonymized:
        if "StudyInstanceUID" in item.original:
            new = dcmread(item.output).StudyInstanceUID
            by_original[item.original.StudyInstanceUID].add(new)
    assert all(len(new) == 1 for new in by_original.values())
    assert len(by_original) < len(anonymized)  # several studies have more than one instance


def test_pixel_data_is_byte_identical(anonymized: list[Anonymized]) -> None:
    compared = 0
    for item in anonymized:
        if "PixelData" not in item.original:
            continue
        assert dcmread(item.output).PixelData == item.original.PixelData, item.source.name
        compared += 1
    assert compared > 50


# --- a real DCMTK peer accepts the output ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    received = tmp_path / "received"
    received.mkdir()
    port = _free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    process = subprocess.Popen(
        ["storescp", "+xa", "-od", str(received), "-aet", "STORESCP", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, "storescp did not start"
            assert time.monotonic() < deadline, "storescp did not listen"
            time.sleep(0.05)
        yield port, received
    finally:
        process.terminate()
        process.wait(timeout=10)


#: storescu proposes uncompressed syntaxes unless told which compressed one to propose.
STORESCU_OPTION = {
    "1.2.840.10008.1.2": "-xi",  # implicit little endian
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


@pytest.mark.interop
def test_dcmtk_storescu_accepts_every_anonymized_file(
    anonymized: list[Anonymized], storescp: tuple[int, Path]
) -> None:
    port, received = storescp
    groups: dict[str, list[str]] = defaultdict(list)
    for item in anonymized:
        syntax = str(dcmread(item.output, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if syntax in STORESCU_OPTION:  # else storescu cannot be told to propose it
            groups[STORESCU_OPTION[syntax]].append(str(item.output))
    sent_files = [f for files in groups.values() for f in files]
    assert len(sent_files) >= len(anonymized) - 5
    for option, files in sorted(groups.items()):
        sent = subprocess.run(
            ["storescu", "-aec", "STORESCP", "-R", option, "127.0.0.1", str(port), *files],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert "E:" not in sent.stderr, sent.stderr[-2000:]
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received.iterdir()}
    expected = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sent_files}
    assert stored == expected
