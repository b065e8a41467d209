"""The archive writer: what it writes reads back as the data set it was given, for every file.

``write_part10`` copies untouched values byte for byte and encodes the rest with pydicom (from a
cache of encoded values); these tests hold it to pydicom's own writer over pydicom's test files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from webaims_tui.engine.archive import deferred_elements, write_part10

#: Smaller than the autoloader's (64 KB): pydicom's bundled files are small, and the writer
#: takes the same path whatever the size that left a value on disk.
DEFER_SIZE = 256


def _corpus() -> list[Path]:
    files = []
    # Only the files installed with pydicom: get_testdata_files() would try to download more.
    root = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(root.rglob("*.dcm")):
        try:
            dataset = dcmread(path, defer_size=DEFER_SIZE)
            syntax = dataset.file_meta.TransferSyntaxUID
            dataset.SOPInstanceUID  # noqa: B018 (a readable header is the point)
        except (InvalidDicomError, AttributeError, OSError, EOFError, ValueError, KeyError):
            continue
        deferred = deferred_elements(dataset)
        if syntax.is_deflated or not deferred:
            continue  # the streaming path is not taken: pydicom writes the file itself
        size = path.stat().st_size
        if any(e.value_tell + e.length > size for e in deferred.values()):
            continue  # cut files (MR_truncated.dcm): the autoloader quarantines them unwritten
        files.append(path)
    return files


CORPUS = _corpus()


def _anonymize_a_little(dataset: Dataset) -> None:
    """What an anonymizer does: replace, add, delete; each file differently."""
    dataset.PatientName = "ANON^PATIENT"
    dataset.PatientID = "ANON-1"
    dataset.PatientIdentityRemoved = "YES"
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    dataset.DeidentificationMethodCodeSequence = Sequence([code])
    if "InstitutionName" in dataset:
        del dataset.InstitutionName


def test_the_corpus_is_not_trivially_small() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_written_file_reads_back_as_the_data_set_and_its_hash_is_the_files(
    path: Path, tmp_path: Path
) -> None:
    dataset = dcmread(path, defer_size=DEFER_SIZE)
    deferred = deferred_elements(dataset)
    _anonymize_a_little(dataset)
    ours = tmp_path / "ours.dcm"
    digest = write_part10(dataset, ours, path, deferred)
    assert digest == hashlib.sha256(ours.read_bytes()).hexdigest()

    expected = dcmread(path)
    _anonymize_a_little(expected)
    written = dcmread(ours)
    assert written.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
    assert [e.tag for e in written] == [e.tag for e in expected if not _group_length(e.tag)]
    for element in written:
        assert element.value == expected[element.tag].value, element.tag


def test_twice_with_other_values_gives_other_files(tmp_path: Path) -> None:
    """The cache of encoded values must never hand one file's value to another."""
    source = Path(str(get_testdata_file("CT_small.dcm")))
    hashes = set()
    for n, name in enumerate(["A^B", "C^D", "A^B"]):
        dataset = dcmread(source, defer_size=DEFER_SIZE)
        deferred = deferred_elements(dataset)
        dataset.PatientName = name
        dataset.SliceThickness = ["1.50", "1.5", "1.50"][n]  # DS keeps its original text
        hashes.add(write_part10(dataset, tmp_path / f"{n}.dcm", source, deferred))
        back = dcmread(tmp_path / f"{n}.dcm")
        assert back.PatientName == name
        assert str(back.SliceThickness) == ["1.50", "1.5", "1.50"][n]
    assert len(hashes) == 2


def _group_length(tag: int) -> bool:
    return tag & 0xFFFF == 0 and tag >> 16 > 6
