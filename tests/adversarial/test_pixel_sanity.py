"""A header that claims far more pixel data than the file holds: quarantined, never decoded.

Such a file is a decompression bomb (a few KB whose Rows x Columns x frames make whatever decodes
it allocate gigabytes: pydicom sizes its output array from the header) or a file cut inside its
pixel data. The autoloader compares the header's claim with the pixel data element's declared
length, without reading the value; compressed data, whose stored size says nothing of the decoded
one, is bounded per decoded frame (``autoloader.max_decoded_frame_mb``) and per instance. The
crafted files start from pydicom's own CT_small.dcm and JPEG, JPEG 2000 and RLE files and arrive
through ``import`` and through the real SCP, with pydicom's pixel decoding made to fail so that
decoding anything would show; the browser's preview refuses such a frame too. Every file of
pydicom's test corpus must still pass, and so must the sizes of real images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder, DecodeRunner
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import MPEG4HP41, UID, generate_uid
from pynetdicom import AE

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import echo_succeeds
from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.config import AutoloaderSettings
from webaims_tui.engine import db
from webaims_tui.engine.archive import DEFER_SIZE
from webaims_tui.engine.autoloader import Autoloader, pixel_data_problem
from webaims_tui.engine.events import InstanceArchived, InstanceQuarantined
from webaims_tui.engine.service import Engine
from webaims_tui.screens.instance import FrameTooLarge, decode_frame

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
#: Explicit VR Little Endian, 128 x 128 x 16 bits: 32,768 bytes of pixel data.
CT_SMALL = TEST_FILES / "CT_small.dcm"
#: JPEG Baseline, 100 x 100 RGB, one frame of 1,744 bytes.
JPEG = TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm"
#: JPEG 2000, 1024 x 256 x 16 bits, one frame.
JPEG_2000 = TEST_FILES / "JPEG2000.dcm"
#: RLE Lossless, 100 x 100 RGB, two frames.
RLE = TEST_FILES / "SC_rgb_rle_2frame.dcm"
#: The default bound on a decoded frame, 1 GB.
DEFAULT_BOUND = AutoloaderSettings().max_decoded_frame_bytes

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
    # Frames a DICOM file could hold, decompressed: only the bound on a decoded frame stops them.
    "JPEG claiming 30000 x 30000 RGB": (
        JPEG,
        {"Rows": 30000, "Columns": 30000},
        "Rows 30000 x Columns 30000 x 3 samples x 8 bits allocated x 1 frames makes 2700000000 "
        "bytes per decoded frame, more than autoloader.max_decoded_frame_mb allows (1024 MB)",
    ),
    "JPEG 2000 claiming 32768 x 32768 x 16 bits": (
        JPEG_2000,
        {"Rows": 32768, "Columns": 32768},
        "2147483648 bytes per decoded frame",
    ),
    # Each frame under the bound, all of them together over what any instance may decode to.
    "RLE claiming 2000 frames of 16384 x 16384 RGB": (
        RLE,
        {"Rows": 16384, "Columns": 16384, "NumberOfFrames": 2000},
        "makes 1610612736000 bytes decoded, more than any instance may decode to (1024 GB)",
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
        prefixes = ("pixel data mismatch: ", "pixel data too large: ")
        assert entry.detail.startswith(prefixes), (name, entry.detail)
        assert BOMBS[name][2] in entry.detail, (name, entry.detail)
        # Header values only: no patient data.
        source = dcmread(BOMBS[name][0], stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            assert str(source.get(keyword, "")) not in entry.detail, (name, keyword)
        assert (engine.settings.paths.quarantine / entry.path).is_file()
    assert len(indexed) == 1  # the control


@pytest.fixture
def decoding_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """pydicom's pixel decoding, every way in, fails and is noted (in this process only).

    A failure alone could be swallowed (the autoloader quarantines whatever raises); the list
    of what was called cannot.
    """
    called: list[str] = []

    def forbidden(name: str) -> Callable[..., None]:
        def refuse(*args: object, **kwargs: object) -> None:
            called.append(name)
            raise AssertionError(f"pixel data decoded: {name}")

        return refuse

    # Decoder: pixel_array(), iter_pixels(), decompress(); DecodeRunner: each compressed frame;
    # Dataset.convert_pixel_data: ds.pixel_array, with or without the old pixel data handlers.
    for owner, method in (
        (Decoder, "as_array"),
        (Decoder, "as_buffer"),
        (Decoder, "iter_array"),
        (Decoder, "iter_buffer"),
        (DecodeRunner, "decode"),
        (Dataset, "convert_pixel_data"),
    ):
        monkeypatch.setattr(owner, method, forbidden(f"{owner.__name__}.{method}"))
    with pytest.raises(AssertionError, match="pixel data decoded"):
        _ = dcmread(JPEG).pixel_array
    called.clear()
    yield called


def test_bombs_imported_into_incoming_are_quarantined_and_nothing_is_decoded(
    make_settings: SettingsFactory,
    events: EventRecorder,
    tmp_path: Path,
    decoding_forbidden: list[str],
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
    settings = make_settings()
    engine = Engine(settings, sink=events)
    try:
        summary = engine.import_paths([media])
        assert summary.imported == len(BOMBS) + 1 and not summary.failed
        # In this process, where decoding is forbidden (no worker pool); with the default rule
        # set, as in production.
        autoloader = Autoloader(settings, events, engine.make_anonymizer(), processes=0)
        counters = autoloader.run_once()
        assert (counters.archived, counters.quarantined) == (1, len(BOMBS))
        assert decoding_forbidden == []
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
        if (problem := pixel_data_problem(ds, path.stat().st_size, DEFAULT_BOUND))
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
        problem = pixel_data_problem(ds, path.stat().st_size, DEFAULT_BOUND)
        assert problem is not None, path.name
        assert problem.startswith(f"pixel data mismatch: the header claims {expected} bytes"), (
            path.name,
            problem,
        )


def _claiming(source: Path, **claims: int) -> Dataset:
    ds = dcmread(source)
    for keyword, value in claims.items():
        setattr(ds, keyword, value)
    return ds


GB = 1024**3


@pytest.mark.parametrize(
    ("source", "claims", "file_size"),
    [
        # A tomosynthesis frame, 16 bits: ~30 MB decoded.
        (JPEG_2000, {"Rows": 4096, "Columns": 3328, "NumberOfFrames": 70}, 300_000_000),
        # An enhanced CT volume in one instance: 2 GB decoded.
        (JPEG_2000, {"Rows": 512, "Columns": 512, "NumberOfFrames": 4000}, 900_000_000),
        # A whole-slide image's full-resolution level: 200,000 tiles, 37 GB decoded.
        (JPEG, {"Rows": 256, "Columns": 256, "NumberOfFrames": 200_000}, 3_000_000_000),
        # The largest frame the default bound lets through: 1 GB decoded.
        (JPEG_2000, {"Rows": 32768, "Columns": 16384}, 10_000_000),
    ],
    ids=["tomosynthesis", "enhanced CT", "whole-slide level", "1 GB frame"],
)
def test_real_compressed_image_sizes_pass(
    source: Path, claims: dict[str, int], file_size: int
) -> None:
    assert pixel_data_problem(_claiming(source, **claims), file_size, DEFAULT_BOUND) is None


def test_video_is_bounded_per_frame_not_in_length() -> None:
    """Five hours of HD video (an MPEG-4 stream is decoded a frame at a time) pass; the same
    claim in JPEG frames does not, nor does a video frame over the bound."""
    hours = _claiming(JPEG, Rows=1080, Columns=1920, NumberOfFrames=5 * 3600 * 30)
    assert "more than any instance may decode to" in str(
        pixel_data_problem(hours, 4 * GB, DEFAULT_BOUND)
    )
    hours.file_meta.TransferSyntaxUID = MPEG4HP41
    assert pixel_data_problem(hours, 4 * GB, DEFAULT_BOUND) is None
    huge = _claiming(JPEG, Rows=20000, Columns=20000)
    huge.file_meta.TransferSyntaxUID = MPEG4HP41
    assert "bytes per decoded frame" in str(pixel_data_problem(huge, 4 * GB, DEFAULT_BOUND))


def test_the_configured_bound_applies(
    make_settings: SettingsFactory, events: EventRecorder
) -> None:
    """Under ``max_decoded_frame_mb = 1`` a 1000 x 1000 RGB JPEG (3 MB decoded) is refused;
    the control, uncompressed, is archived whatever its frame size."""
    settings = make_settings("[autoloader]\nmax_decoded_frame_mb = 1\n")
    assert settings.autoloader.max_decoded_frame_bytes == 1024 * 1024
    ds = _claiming(JPEG, Rows=1000, Columns=1000)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    media = settings.paths.data_dir.parent / "media"
    media.mkdir()
    ds.save_as(media / "big.dcm", enforce_file_format=True)
    (media / "control.dcm").write_bytes(CT_SMALL.read_bytes())
    engine = Engine(settings, sink=events)
    try:
        engine.import_paths([media])
        counters = engine.process_incoming()
        assert counters is not None and (counters.archived, counters.quarantined) == (1, 1)
        with db.database.connection_context():
            (entry,) = db.QuarantineEntry.select()
        assert (entry.sop_instance_uid, entry.reason) == (ds.SOPInstanceUID, "truncated")
        assert entry.detail.endswith(
            "makes 3000000 bytes per decoded frame, more than autoloader.max_decoded_frame_mb "
            "allows (1 MB)"
        )
    finally:
        engine.stop()


def test_the_preview_refuses_a_frame_over_the_bound_without_decoding_it(
    tmp_path: Path, decoding_forbidden: list[str]
) -> None:
    """A bomb archived before the check existed (or under a larger bound) is never decoded."""
    path = tmp_path / "bomb.dcm"
    _bomb("JPEG claiming 30000 x 30000 RGB").save_as(path, enforce_file_format=True)
    with pytest.raises(FrameTooLarge) as refused:
        decode_frame(path, 0, DEFAULT_BOUND)
    assert decoding_forbidden == []
    assert str(refused.value) == (
        "a frame would decode to 2574 MB (30000 x 30000 x 3 samples x 8 bits), more than "
        "autoloader.max_decoded_frame_mb allows (1024 MB)"
    )


def test_the_preview_decodes_a_frame_under_the_bound() -> None:
    frame = decode_frame(JPEG, 0, 100 * 100 * 3)
    assert frame.values.shape == (100, 100, 3) and frame.color
    with pytest.raises(FrameTooLarge):
        decode_frame(JPEG, 0, 100 * 100 * 3 - 1)
