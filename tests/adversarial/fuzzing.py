"""Network fuzzing of the live SCP: real encoded PDUs, mutated by hypothesis.

Shared by the bounded run in the suite (test_fuzz_network.py) and the long run by hand
(fuzz_long.py). Every case opens a connection (and, for PDUs that only make sense inside an
association, first associates properly), sends the mutated bytes, half-closes and reads until
the server closes. Every ``check_every`` cases the target checks that a C-ECHO still succeeds
and that RSS and thread count are within their bounds; any uncaught exception in any thread of
the process counts as a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from tests.adversarial.peers import (
    PDU_ASSOCIATE_AC,
    association_request,
    echo_succeeds,
    make_instance,
    read_pdu,
    rss_mb,
    thread_count,
)
from webaims_tui.config import Overrides, load_settings
from webaims_tui.engine.service import Engine

IMPLICIT = (str(ImplicitVRLittleEndian),)
REQUEST = association_request(
    abstract_syntaxes=(str(Verification), str(SecondaryCaptureImageStorage)),
    transfer_syntaxes=IMPLICIT,
)


RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def command(elements: Dataset) -> bytes:
    """A DIMSE command set, Implicit VR Little Endian, with its group length."""
    body = encode(elements, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def pdv(context_id: int, control: int, value: bytes) -> bytes:
    item = struct.pack(">LBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def _echo_rq() -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = str(Verification)
    cmd.CommandField = 0x0030
    cmd.MessageID = 1
    cmd.CommandDataSetType = 0x0101
    return pdv(1, 0x03, command(cmd))


def _store_rq() -> bytes:
    instance = make_instance(2000)
    cmd = Dataset()
    cmd.AffectedSOPClassUID = str(SecondaryCaptureImageStorage)
    cmd.CommandField = 0x0001
    cmd.MessageID = 2
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = instance.SOPInstanceUID
    data = encode(instance, True, True)
    assert data is not None
    half = len(data) // 2
    return pdv(3, 0x03, command(cmd)) + pdv(3, 0x00, data[:half]) + pdv(3, 0x02, data[half:])


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    #: Sent after a proper association (A-ASSOCIATE-AC received) rather than on a bare socket.
    associated: bool


SEEDS = (
    Seed("A-ASSOCIATE-RQ", REQUEST, False),
    Seed("A-ASSOCIATE-RQ storage", association_request(transfer_syntaxes=IMPLICIT), False),
    Seed("C-ECHO-RQ", _echo_rq(), True),
    Seed("C-STORE-RQ", _store_rq(), True),
    Seed("A-RELEASE-RQ", RELEASE_RQ, True),
    Seed("A-ABORT", bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]), True),
)

_position = st.integers(min_value=0, max_value=2**20)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=64)),
    # Lengths: the PDU's own, or any 2- or 4-byte field (items, PDVs, DICOM elements).
    st.tuples(st.just("pdu length"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("u16"), _position, st.integers(0, 2**16 - 1)),
    st.tuples(st.just("u32"), _position, st.integers(0, 2**32 - 1)),
    st.tuples(st.just("repeat"), _position, st.integers(1, 64), st.integers(2, 300)),
)
CASES = st.tuples(st.sampled_from(SEEDS), st.lists(MUTATION, min_size=1, max_size=4))


def mutate(data: bytes, mutations: list[tuple[object, ...]]) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        kind, args = mutation[0], mutation[1:]
        at = int(args[0]) % (len(out) + 1) if args and kind != "pdu length" else 0
        if kind == "flip" and out:
            out[at % len(out)] ^= int(args[1])  # type: ignore[call-overload]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = args[1]  # type: ignore[assignment]
        elif kind == "pdu length" and len(out) >= 6:
            out[2:6] = struct.pack(">L", int(args[0]))  # type: ignore[call-overload]
        elif kind == "u16":
            out[at : at + 2] = struct.pack(">H", int(args[1]))  # type: ignore[call-overload]
        elif kind == "u32":
            out[at : at + 4] = struct.pack(">L", int(args[1]))  # type: ignore[call-overload]
        elif kind == "repeat":
            chunk = bytes(out[at : at + int(args[1])])  # type: ignore[call-overload]
            out[at:at] = chunk * int(args[2])  # type: ignore[call-overload]
    return bytes(out)


@dataclass
class FuzzTarget:
    """A live engine under fuzz, with the bounds it must respect and what was measured."""

    engine: Engine
    check_every: int
    rss_bound_mb: float = 0.0
    thread_bound: int = 0
    cases: int = 0
    checks: int = 0
    peak_rss_mb: float = 0.0
    peak_threads: int = 0
    crashes: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def port(self) -> int:
        assert self.engine.server is not None
        return self.engine.server.port

    def set_bounds(self, rss_headroom_mb: float) -> None:
        server = self.engine.server
        assert server is not None and server._server is not None
        s = self.engine.settings.server
        pending = server._server.limits.max_pending_connections
        # Two threads per connection (association + DUL reader), pending or associated, plus
        # the short-lived request threads and a little slack for the process's own.
        self.thread_bound = thread_count() + 2 * (pending + s.max_associations) + 16
        self.rss_bound_mb = rss_mb() + rss_headroom_mb

    def run_case(self, seed: Seed, mutations: list[tuple[object, ...]]) -> None:
        data = mutate(seed.data, mutations)
        outcome = self._send(seed, data)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.cases += 1
        self.peak_threads = max(self.peak_threads, thread_count())
        if self.cases % self.check_every == 0:
            self.check_health(f"after case {self.cases} ({seed.name}, {mutations!r})")

    def _send(self, seed: Seed, data: bytes) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if seed.associated:
                sock.sendall(REQUEST)
                reply = read_pdu(sock)
                if reply is None or reply[0] != PDU_ASSOCIATE_AC:
                    return "not associated"  # e.g. at the association limit: allowed
            with contextlib.suppress(OSError):
                sock.sendall(data)
                # Half-close: the server reads everything we sent, then end-of-stream, so it
                # never waits for its timers to end the connection.
                sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except TimeoutError:
                return "server silent for 10 s"
            except OSError:
                return "reset"
        return "closed"

    def check_health(self, where: str) -> None:
        self.checks += 1
        rss, threads = rss_mb(), thread_count()
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        self.peak_threads = max(self.peak_threads, threads)
        if not echo_succeeds(self.port):
            self.crashes.append(f"C-ECHO failed {where}")
        if rss > self.rss_bound_mb:
            self.crashes.append(f"RSS {rss:.0f} MB over {self.rss_bound_mb:.0f} MB {where}")
        if threads > self.thread_bound:
            self.crashes.append(f"{threads} threads over {self.thread_bound} {where}")

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"{self.cases} cases in {elapsed:.1f} s ({self.cases / max(elapsed, 1e-9):.0f}/s), "
            f"{self.checks} health checks, {len(self.crashes)} crashes; "
            f"peak RSS {self.peak_rss_mb:.0f} MB (bound {self.rss_bound_mb:.0f}), "
            f"peak threads {self.peak_threads} (bound {self.thread_bound}); "
            f"outcomes {dict(sorted(self.outcomes.items()))}"
        )


@contextlib.contextmanager
def uncaught_thread_exceptions(crashes: list[str]):  # type: ignore[no-untyped-def]
    """Record every exception that escapes a thread (pynetdicom's or ours) as a crash."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        where = traceback.extract_tb(args.exc_traceback)[-1] if args.exc_traceback else None
        crashes.append(
            f"uncaught {args.exc_type.__name__} ({args.exc_value}) in "
            f"{getattr(args.thread, 'name', '?')} at {where.filename}:{where.lineno}"
            if where
            else f"uncaught {args.exc_type.__name__} ({args.exc_value})"
        )
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def fuzz_engine(data_dir: Path, **server: object) -> Engine:
    """A started engine on a free loopback port, with short timeouts for the fuzz run."""
    config = data_dir / "config.toml"
    data_dir.mkdir(parents=True, exist_ok=True)
    config.write_text("")
    settings = load_settings(Overrides(config_file=config, data_dir=data_dir / "data"))
    values = {"host": "127.0.0.1", "port": 0, "acse_timeout": 5.0, "network_timeout": 5.0}
    values.update(server)
    settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, **values))
    engine = Engine(settings)
    engine.start()
    return engine
