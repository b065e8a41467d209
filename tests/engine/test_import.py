"""``webaims-tui import``: folders (recursive) and DICOMDIR media, through the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread

from tests.conftest import SettingsFactory
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.service import Engine

DICOMDIR_FOLDER = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def _cli(settings_dir: Path, *args: str) -> list[str]:
    return [
        "--config",
        str(settings_dir / "config.toml"),
        "--data-dir",
        str(settings_dir / "data"),
        *args,
    ]


def _indexed_uids(make_settings: SettingsFactory) -> set[str]:
    engine = Engine(make_settings())
    engine.open()
    try:
        with db.database.connection_context():
            return {row.sop_instance_uid for row in db.Instance.select()}
    finally:
        engine.stop()


def test_import_of_a_folder_archives_dicom_and_skips_the_rest(
    make_settings: SettingsFactory,
    tmp_path: Path,
    corpus: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_settings()  # writes tmp_path/config.toml
    media = tmp_path / "media"
    (media / "sub" / "deeper").mkdir(parents=True)
    # CT and MR: the default rule set quarantines modalities that may carry burned-in text.
    chosen = [
        p
        for p in corpus
        if dcmread(p).get("SeriesInstanceUID") and dcmread(p).get("Modality") in ("CT", "MR")
    ][:6]
    for n, path in enumerate(chosen):
        shutil.copy(path, media / ("sub/deeper" if n % 2 else "sub") / path.name)
    (media / "README.txt").write_text("not DICOM")
    (media / "sub" / "thumbs.db").write_bytes(b"\x00" * 300)
    before = {p: p.read_bytes() for p in media.rglob("*") if p.is_file()}

    code = main(_cli(tmp_path, "import", "--quiet", str(media)))

    out = capsys.readouterr().out
    assert code == 0
    assert "imported: 6" in out and "skipped as non-DICOM: 2" in out and "failed: 0" in out
    assert "archived: 6" in out
    # Counted, not compared: the active rule set replaces the UIDs.
    assert len(_indexed_uids(make_settings)) == len(chosen)
    assert {p: p.read_bytes() for p in media.rglob("*") if p.is_file()} == before  # untouched


def test_import_of_a_dicomdir_brings_in_the_files_it_references(
    make_settings: SettingsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_settings()
    index = dcmread(DICOMDIR_FOLDER / "DICOMDIR")
    referenced = {
        str(dcmread(DICOMDIR_FOLDER.joinpath(*record.ReferencedFileID)).SOPInstanceUID)
        for record in index.DirectoryRecordSequence
        if "ReferencedFileID" in record
    }

    code = main(_cli(tmp_path, "import", "--quiet", str(DICOMDIR_FOLDER / "DICOMDIR")))

    out = capsys.readouterr().out
    assert code == 0
    assert f"imported: {len(referenced)}" in out and "DICOMDIR indexes read: 1" in out
    assert len(_indexed_uids(make_settings)) == len(referenced)


def test_import_of_a_missing_path_is_reported(
    make_settings: SettingsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_settings()
    code = main(_cli(tmp_path, "import", "--quiet", str(tmp_path / "nowhere")))
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: 1" in captured.out and "no such file or folder" in captured.err
