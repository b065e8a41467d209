"""Malformed input: random bytes, unknown PDU types, broken A-ASSOCIATE-RQ items.

Every case starts from a real encoded PDU (pynetdicom's own encoder) or from seeded random
bytes. Whatever arrives, the server must answer with an abort or a rejection (or close), and
keep serving: a C-ECHO succeeds after each case and no thread is left behind.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Callable

import pytest

from tests.adversarial.conftest import EngineFactory, port_of
from tests.adversarial.peers import (
    association_request,
    closed_by_peer,
    echo_succeeds,
    item,
    join_association_request,
    raw_connection,
    server_reply,
    split_association_request,
    thread_count,
    wait_until,
)
from webaims_tui.engine.service import Engine

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    value = bytes([context_id, 0, 0, 0]) + item(0x30, abstract.encode())
    value += b"".join(item(0x40, uid.encode()) for uid in syntaxes)
    return item(0x20, value)


def _mutate(change: Callable[[bytes, list[bytes]], tuple[bytes, list[bytes]]]) -> bytes:
    fixed, items = split_association_request(association_request())
    return join_association_request(*change(fixed, items))


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Each case: the bytes a hostile peer sends on a fresh connection.
CASES: dict[str, bytes] = {
    "random bytes 16": _random(1, 16),
    "random bytes 4 KB": _random(2, 4096),
    "random bytes after a valid request header": association_request()[:6] + _random(3, 368),
    "unknown PDU type 0x09": struct.pack(">BBL", 0x09, 0, 4) + b"\x00" * 4,
    "unknown PDU type 0xFF, huge length": struct.pack(">BBL", 0xFF, 0, 0xFFFFFFFF),
    "P-DATA before association": struct.pack(">BBL", 0x04, 0, 8) + b"\x00\x00\x00\x04\x01\x03xx",
    "release request before association": bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
    "PDU length shorter than its items": (lambda rq: rq[:2] + struct.pack(">L", 80) + rq[6:])(
        association_request()
    ),
    "PDU length longer than sent": (lambda rq: rq[:2] + struct.pack(">L", 9000) + rq[6:])(
        association_request()
    ),
    "item length beyond the PDU": _mutate(
        lambda f, items: (f, [*items[:-1], item(0x50, items[-1][4:], declared=0xFFFF)])
    ),
    "item length zero": _mutate(lambda f, items: (f, [item(0x10, b""), *items[1:]])),
    "unknown item type": _mutate(lambda f, items: (f, [*items, item(0x99, b"abc")])),
    "no application context": _mutate(lambda f, items: (f, items[1:])),
    "no presentation context": _mutate(lambda f, items: (f, [items[0], items[-1]])),
    "3,000 transfer syntaxes in one context": _mutate(
        lambda f, items: (f, [items[0], _context(1, CT, [EXPLICIT_LE] * 3000), items[-1]])
    ),
    "2,000 presentation contexts": _mutate(
        lambda f, items: (
            f,
            [items[0], *(_context(i % 256, CT, [EXPLICIT_LE]) for i in range(2000)), items[-1]],
        )
    ),
    "5,000 user information sub-items": _mutate(
        lambda f, items: (
            f,
            [*items[:-1], item(0x50, items[-1][4:] + item(0x55, b"X") * 5000)],
        )
    ),
    "sub-item length beyond its item": _mutate(
        lambda f, items: (f, [*items[:-1], item(0x50, item(0x51, b"\x00\x00\x40\x00", 0xFF00))])
    ),
    "AE titles of control characters": _mutate(
        lambda f, items: (f[:4] + b"\x00\x1b[2J" + b"\x07" * 10 + f[20:], items)
    ),
    "protocol version 0": _mutate(lambda f, items: (b"\x00\x00" + f[2:], items)),
}


@pytest.fixture
def serving(start_engine: EngineFactory) -> Engine:
    return start_engine(acse_timeout=2.0, network_timeout=2.0)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_refused_and_the_server_keeps_serving(
    serving: Engine, case: str
) -> None:
    port = port_of(serving)
    baseline = thread_count()
    with raw_connection(port, timeout=20) as sock:
        with contextlib.suppress(OSError):  # closed while we were still sending: fine
            sock.sendall(CASES[case])
        outcome = server_reply(sock)
        # A peer that broke the protocol is never associated, and its connection is closed.
        assert outcome in {"aborted", "rejected", "closed"}, outcome
        assert closed_by_peer(sock)
    assert echo_succeeds(port)
    assert wait_until(lambda: thread_count() <= baseline, timeout=20), thread_count()
