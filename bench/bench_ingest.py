"""Ingest benchmark: our SCP and autoloader against a bare pynetdicom SCP and Orthanc.

Run by hand, never by CI (see bench/README.md)::

    .venv/bin/python bench/bench_ingest.py --count 1000 --size 512
    .venv/bin/python bench/bench_ingest.py --count 3000 --size 64

It generates N synthetic CT instances (16-bit, SIZE x SIZE, spread over 3 patients, 6 studies
and 12 series), then, in one run, sends the same files with DCMTK ``storescu`` (one association,
``TCP_NODELAY=1``) to:

1. a bare pynetdicom Storage SCP whose handler only writes ``event.encoded_dataset()`` to a file;
2. our SCP alone (``Engine`` with the Storage SCP and no autoloader): receive-only;
3. ``webaims-tui serve`` (SCP + autoloader): end to end, from the first byte sent until the last
   instance is archived and indexed (incoming/ empty, every row in the database);
4. Orthanc (Debian package, own JSON config, free ports, temporary storage, no plugins), which
   stores and indexes each instance before it answers;
5. the autoloader alone, on the files already in incoming/ (``Engine.process_incoming``).

Peak RSS is VmHWM from /proc for each process (with its worker processes) just before it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

UID_ROOT = "1.2.826.0.1.3680043.10.1234.99."


@dataclass
class Result:
    name: str
    seconds: float
    peak_rss_mb: float = 0.0

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds else 0.0


# --- data -----------------------------------------------------------------------------------


def _uid(kind: int, n: int) -> str:
    return f"{UID_ROOT}{kind}.{n + 10_000_000}"  # fixed width: patched into the template bytes


def generate(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` CT files made by patching fixed-width UIDs into one pydicom-written template."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(_uid(3, 0))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(3, 0)
    ds.PatientName = "Bench^Patient"
    ds.PatientID = "BENCH0"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = _uid(1, 0)
    ds.SeriesInstanceUID = _uid(2, 0)
    ds.StudyDate = "20261201"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(size * size * 2)
    template_path = folder / "template.dcm"
    ds.save_as(template_path, enforce_file_format=True)
    template = template_path.read_bytes()
    template_path.unlink()
    files = []
    for n in range(count):
        content = (
            template.replace(_uid(3, 0).encode(), _uid(3, n).encode())
            .replace(_uid(2, 0).encode(), _uid(2, n % 12).encode())
            .replace(_uid(1, 0).encode(), _uid(1, n % 12 // 2).encode())
            .replace(b"BENCH0", f"BENCH{n % 12 // 4}".encode())
        )
        path = folder / f"{n:06d}.dcm"
        path.write_bytes(content)
        files.append(path)
    return files


# --- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` plus that of its children (the autoloader's worker processes)."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def storescu(files: list[Path], port: int, called: str) -> float:
    """Send every file on one association; returns the wall time."""
    env = {**os.environ, "TCP_NODELAY": "1"}  # Nagle on loopback costs a delayed ACK per PDU
    command = ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port)]
    started = time.perf_counter()
    subprocess.run([*command, *map(str, files)], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


BARE_SCP = """
import sys, os, uuid
from pynetdicom import AE, evt, AllStoragePresentationContexts
folder = sys.argv[2]
def handle(event):
    name = os.path.join(folder, uuid.uuid4().hex + ".dcm")
    with open(name, "wb") as f:
        f.write(event.encoded_dataset())
    return 0x0000
ae = AE(ae_title="BARE")
ae.supported_contexts = AllStoragePresentationContexts
ae.maximum_pdu_size = 65536
handlers = [(evt.EVT_C_STORE, handle)]
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, evt_handlers=handlers)
"""

RECEIVE_ONLY = """
import sys, signal, threading
from pathlib import Path
import dataclasses
from webaims_tui.config import Overrides, load_settings
from webaims_tui.engine.service import Engine
from webaims_tui.engine.scp import StorageServer
config, data, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
settings = load_settings(Overrides(config_file=config, data_dir=data, port=port, host="127.0.0.1"))
engine = Engine(settings)
engine.open()
paths = settings.paths
engine.server = StorageServer(settings.server, paths.incoming, paths.spool, lambda event: None)
engine.server.start()
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stopped.set())
stopped.wait()
engine.stop()
"""

AUTOLOADER_ALONE = """
import sys, time
from pathlib import Path
from webaims_tui.config import Overrides, load_settings
from webaims_tui.engine.service import Engine
def main():
    config, data = Path(sys.argv[1]), Path(sys.argv[2])
    engine = Engine(load_settings(Overrides(config_file=config, data_dir=data)))
    engine.open()
    started = time.perf_counter()
    counters = engine.process_incoming()
    elapsed = time.perf_counter() - started
    engine.stop()
    import resource
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(elapsed, counters.archived, own + children)
if __name__ == "__main__":
    main()
"""


def indexed(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM instance").fetchone()[0])
    except sqlite3.Error:
        return 0


# --- the runs -------------------------------------------------------------------------------


def run_bare(files: list[Path], work: Path) -> Result:
    folder = work / "bare"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port), str(folder)])
    try:
        wait_for_port(port, process)
        seconds = storescu(files, port, "BARE")
        return Result("bare pynetdicom SCP (writes files)", seconds, peak_rss_mb(process.pid))
    finally:
        stop(process)


def run_receive_only(files: list[Path], work: Path, config: Path) -> Result:
    port = free_port()
    data = work / "receive-only"
    process = subprocess.Popen(
        [sys.executable, "-c", RECEIVE_ONLY, str(config), str(data), str(port)], cwd=REPO
    )
    try:
        wait_for_port(port, process)
        seconds = storescu(files, port, "WEBAIMS")
        return Result("webaims SCP, receive only", seconds, peak_rss_mb(process.pid))
    finally:
        stop(process)


def run_end_to_end(files: list[Path], work: Path, config: Path) -> Result:
    port = free_port()
    data = work / "end-to-end"
    command = [sys.executable, "-m", "webaims_tui", "--config", str(config), "--data-dir"]
    command += [str(data), "--host", "127.0.0.1", "--port", str(port), "serve"]
    with open(work / "serve.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_for_port(port, process)
        started = time.perf_counter()
        sent = storescu(files, port, "WEBAIMS")
        database = data / "webaims.sqlite3"
        deadline = time.monotonic() + 600
        while indexed(database) < len(files) or any(
            not p.name.startswith(".") for p in (data / "incoming").iterdir()
        ):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(
                    f"end to end did not finish: {indexed(database)} of {len(files)} indexed; "
                    f"see {work / 'serve.log'}"
                )
            # Coarse polling: a tight loop here would take CPU from the process measured.
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        # Where the time goes: receiving (storescu's own duration) or the autoloader's backlog.
        print(f"  (end to end: sent in {sent:.2f} s, last archived {seconds - sent:.2f} s later)")
        return Result("webaims end to end (archived + indexed)", seconds, peak_rss_mb(process.pid))
    finally:
        stop(process)


def run_orthanc(files: list[Path], work: Path, fsync: bool) -> Result | None:
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        return None
    folder = work / "orthanc"
    folder.mkdir()
    dicom_port, http_port = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(folder / "storage"),
                "IndexDirectory": str(folder / "index"),
                "DicomAet": "ORTHANC",
                "DicomPort": dicom_port,
                "HttpPort": http_port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "Plugins": [],
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
                "DicomCheckCalledAet": False,
                # Orthanc's default (>= 1.7.4), like ours: each stored file is synced to disk.
                "SyncStorageArea": fsync,
            }
        )
    )
    env = {**os.environ, "TCP_NODELAY": "1"}
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(config)], env=env, stdout=log, stderr=log)
    try:
        wait_for_port(dicom_port, process)
        seconds = storescu(files, dicom_port, "ORTHANC")
        return Result("Orthanc (stores + indexes)", seconds, peak_rss_mb(process.pid))
    finally:
        stop(process)


def run_autoloader_alone(files: list[Path], work: Path, config: Path) -> Result:
    data = work / "autoloader-alone"
    incoming = data / "incoming"
    incoming.mkdir(parents=True)
    for n, path in enumerate(files):
        # The SCP's naming: complete files, renamed in, processed at once.
        shutil.copyfile(path, incoming / f"{time.time_ns()}-{n:012x}.dcm")
    output = subprocess.run(
        [sys.executable, "-c", AUTOLOADER_ALONE, str(config), str(data)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    seconds, archived, rss = float(output[0]), int(output[1]), float(output[2])
    if archived != len(files):
        raise RuntimeError(f"the autoloader archived {archived} of {len(files)}")
    return Result("autoloader alone (files already in incoming/)", seconds, rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="instances (default 1000)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="webaims and Orthanc without syncing each file to disk (both sync by default)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["bare", "receive", "e2e", "orthanc", "alone"],
    )
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        print("DCMTK storescu is needed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="webaims-bench-"))
    try:
        config = work / "config.toml"
        # --no-fsync: neither webaims nor Orthanc syncs what it writes (the bare SCP never does).
        config.write_text(
            "" if args.fsync else "[server]\nfsync = false\n[autoloader]\nfsync = false\n"
        )
        source = work / "source"
        source.mkdir()
        started = time.perf_counter()
        files = generate(source, args.count, args.size)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{args.count} x {args.size}x{args.size} 16-bit CT, {megabytes:.0f} MB "
            f"(generated in {time.perf_counter() - started:.1f} s)"
        )
        runs = {
            "bare": lambda: run_bare(files, work),
            "receive": lambda: run_receive_only(files, work, config),
            "e2e": lambda: run_end_to_end(files, work, config),
            "orthanc": lambda: run_orthanc(files, work, args.fsync),
            "alone": lambda: run_autoloader_alone(files, work, config),
        }
        results: dict[str, Result] = {}
        for key, run in runs.items():
            if key in args.skip:
                continue
            result = run()
            if result is None:
                print(f"{key}: skipped (not installed)")
                continue
            results[key] = result
            print(
                f"{result.name:<48} {result.seconds:7.2f} s {result.rate(args.count):7.0f}/s "
                f"peak RSS {result.peak_rss_mb:6.0f} MB"
            )
        print()
        if "receive" in results and "bare" in results:
            ratio = results["receive"].rate(args.count) / results["bare"].rate(args.count)
            print(f"receive-only throughput / bare pynetdicom: {ratio:.2f}x (bar: >= 0.9x)")
        if "e2e" in results and "orthanc" in results:
            ratio = results["e2e"].rate(args.count) / results["orthanc"].rate(args.count)
            print(f"end-to-end throughput / Orthanc:           {ratio:.2f}x (bar: >= 1.0x)")
        if "alone" in results:
            print(f"autoloader alone: {results['alone'].rate(args.count):.0f} instances/s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
