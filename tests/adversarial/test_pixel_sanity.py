"""A header that claims far more pixel data than the file holds: quarantined, never decoded.

Such a file is a decompression bomb (a few KB whose Rows x Columns x frames make whatever decodes
it allocate gigabytes: pydicom sizes its output array from the header) or a file cut inside its
pixel data. The autoloader compares the header's claim with the pixel data element's declared
length, without reading the value. The crafted files start from pydicom's own CT_small.dcm and a
JPEG baseline file and arrive through ``import`` and through the real SCP; every file of pydicom's
test corpus must still pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import echo_succeeds
from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.engine import db
from webaims_tui.engine.archive import DEFER_SIZE
from webaims_tui.engine.autoloader import pixel_data_problem
from webaims_tui.engine.events import InstanceArchived, InstanceQuarantined
from webaims_tui.engine.service import Engine

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
#: Explicit VR Little Endian, 128 x 128 x 16 bits: 32,768 bytes of pixel data.
CT_SMALL = TEST_FILES / "CT_small.dcm"
#: JPEG Baseline, 100 x 100 RGB, one frame of 1,744 bytes.
JPEG = TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm"

#: name: (source file, header values to claim, what the quarantine detail must say)
BOMBS: dict[str, tuple[Path, dict[str, int], str]] = {
    "100,000 frames": (
        CT_SMALL,
        {"NumberOfFrames": 100_000},
        "the header claims 3276800000 bytes",
    ),
    "65535 x 65535 pixels": (
        CT_SMALL,
        {"Rows": 65535, "Columns": 65535},
        "8589672450 bytes per frame",
    ),
    "twice the rows (a file cut in its pixel data)": (
        CT_SMALL,
        {"Rows": 256},
        "the header claims 65536 bytes",
    ),
    "64 bits allocated": (CT_SMALL, {"BitsAllocated": 64}, "the header claims 131072 bytes"),
    "no rows": (CT_SMALL, {"Rows": 0}, "has pixel data but its header says Rows 0"),
    "JPEG claiming 2**31 - 1 frames": (
        JPEG,
        {"NumberOfFrames": 2**31 - 1},
        "2147483647 frames claimed in a file of",
    ),
    "JPEG claiming 65535 x 65535 RGB": (
        JPEG,
        {"Rows": 65535, "Columns": 65535},
        "12884508675 bytes per frame",
    ),
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bomb(name: str) -> Dataset:
    """The crafted data set: the source file's pixel data under a header that claims more."""
    source, claims, _ = BOMBS[name]
    ds = dcmread(source)
    for keyword, value in claims.items():
        setattr(ds, keyword, value)
    # A UID of its own: a bomb that got through would be archived, not taken for a duplicate.
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _check_quarantine(engine: Engine, events: EventRecorder, sent: dict[str, str]) -> None:
    """Each bomb (by SOP Instance UID) is quarantined with its detail; only the control is
    archived."""
    quarantined = events.wait_for(InstanceQuarantined, count=len(BOMBS), timeout=60)
    with db.database.connection_context():
        entries = {e.sop_instance_uid: e for e in db.QuarantineEntry.select()}
        indexed = [row.sop_instance_uid for row in db.Instance.select()]
    assert len(quarantined) == len(entries) == len(BOMBS)
    for uid, name in sent.items():
        entry = entries[uid]
        assert entry.reason == "truncated", name
        assert entry.detail.startswith("pixel data mismatch: "), (name, entry.detail)
        assert BOMBS[name][2] in entry.detail, (name, entry.detail)
        assert (engine.settings.paths.quarantine / entry.path).is_file()
    assert len(indexed) == 1  # the control


def test_bombs_imported_into_incoming_are_quarantined(
    make_settings: SettingsFactory, events: EventRecorder, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    sent: dict[str, str] = {}
    crafted: dict[str, bytes] = {}
    for number, name in enumerate(BOMBS):
        ds = _bomb(name)
        path = media / f"bomb-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent[str(ds.SOPInstanceUID)] = name
        crafted[path.name] = path.read_bytes()
    (media / "control.dcm").write_bytes(CT_SMALL.read_bytes())
    engine = Engine(make_settings(), sink=events)  # the default rule set, as in production
    try:
        summary = engine.import_paths([media])
        assert summary.imported == len(BOMBS) + 1 and not summary.failed
        counters = engine.process_incoming()
        assert counters is not None and (counters.archived, counters.quarantined) == (1, len(BOMBS))
        _check_quarantine(engine, events, sent)
        # Quarantined as they arrived, byte for byte.
        quarantined = engine.settings.paths.quarantine / "truncated"
        for path in quarantined.glob("*.dcm"):
            original = path.name.partition("--")[2]
            assert path.read_bytes() == crafted[original], original
        assert not list(engine.settings.paths.incoming.iterdir())
    finally:
        engine.stop()


def test_bombs_sent_to_the_scp_are_quarantined_and_the_server_keeps_serving(
    start_engine: EngineFactory, events: EventRecorder
) -> None:
    engine = start_engine()
    bombs = {name: _bomb(name) for name in BOMBS}
    ae = AE(ae_title="BOMBER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ds in bombs.values():
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title="WEBAIMS")
    assert assoc.is_established
    for name, ds in bombs.items():
        # Accepted: the SCP checks UIDs, the autoloader checks content.
        assert assoc.send_c_store(ds).Status == 0x0000, name
    assoc.release()
    quarantined = events.wait_for(InstanceQuarantined, count=len(BOMBS), timeout=60)
    assert not events.of(InstanceArchived)
    assert echo_succeeds(port_of(engine))

    # The server and the autoloader go on with honest data.
    control = dcmread(CT_SMALL)
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title="WEBAIMS")
    assert assoc.is_established
    assert assoc.send_c_store(control).Status == 0x0000
    assoc.release()
    events.wait_for(InstanceArchived, timeout=60)
    _check_quarantine(engine, events, {str(ds.SOPInstanceUID): n for n, ds in bombs.items()})
    assert {q.reason for q in quarantined} == {"truncated"}


def _readable_test_files() -> list[tuple[Path, Dataset]]:
    """Every pydicom test file the autoloader could read, read as it reads them."""
    found = []
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found.append((path, dcmread(path, defer_size=DEFER_SIZE)))
        except Exception:
            continue  # the autoloader quarantines these as not-dicom before any pixel check
    return found


def test_no_file_of_pydicom_s_test_corpus_trips_the_check() -> None:
    files = _readable_test_files()
    assert len(files) > 150
    tripped = {
        path.name: problem
        for path, ds in files
        if (problem := pixel_data_problem(ds, path.stat().st_size))
    }
    assert tripped == {}


def _conformant_native_images() -> list[tuple[Path, Dataset]]:
    """Uncompressed corpus images whose pixel data is as long as pydicom expects, padded to
    even (PS3.5 8.1.1): claiming one frame more, or twice the rows, must then be caught."""
    chosen = []
    for path, ds in _readable_test_files():
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        try:
            native = syntax is not None and not UID(syntax).is_compressed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = get_expected_length(ds)
        except Exception:
            continue  # compressed, or an image header pydicom cannot size
        if not isinstance(expected, int):
            continue  # badVR.dcm: NumberOfFrames "1A" makes pydicom multiply a string
        length = ds.get_item("PixelData", keep_deferred=True).length
        if native and length == expected + expected % 2:
            chosen.append((path, ds))
    return chosen


@pytest.mark.parametrize(
    "change",
    [
        lambda ds: setattr(ds, "NumberOfFrames", int(ds.get("NumberOfFrames") or 1) + 1),
        lambda ds: setattr(ds, "Rows", ds.Rows * 2),
    ],
    ids=["one frame more", "twice the rows"],
)
def test_every_native_corpus_image_claiming_more_is_caught_with_pydicom_s_length(
    change: Callable[[Dataset], None],
) -> None:
    """The expected length is pydicom's (1-bit and YBR_FULL_422 images included)."""
    images = _conformant_native_images()
    assert len(images) > 40
    for path, ds in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            change(ds)
            expected = get_expected_length(ds)
        problem = pixel_data_problem(ds, path.stat().st_size)
        assert problem is not None, path.name
        assert problem.startswith(f"pixel data mismatch: the header claims {expected} bytes"), (
            path.name,
            problem,
        )
