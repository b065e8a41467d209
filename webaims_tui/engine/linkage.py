"""Keys and the linkage: the site secret, keyed pseudonyms, UIDs and date shifts, and the
separate database that links originals to pseudonyms.

Everything derived here is an HMAC-SHA256 of the original under the site secret: the same
original always gives the same pseudonym, UID and date shift on this site, across associations,
restarts and re-imports, while nobody without the secret can test a guess (an unkeyed hash of a
Patient ID or a UID is reversed by hashing candidates). The secret is created on first use, with
owner-only permissions, in the data dir; losing it breaks consistency with earlier exports.

The linkage database is not the archive database, so the archive can be shared without it. It
has its own peewee Database object (never the archive's proxy), usable from the autoloader's
writer thread and from the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import peewee as pw

from webaims_tui.engine.db import connect, schema_lock

log = logging.getLogger(__name__)

SECRET_BYTES = 32


class SiteSecretError(Exception):
    """The site secret exists but cannot be used (unreadable, empty, not hex)."""


def load_or_create_site_secret(path: Path) -> bytes:
    """The site secret at ``path``, created (0600) on first use.

    Two processes starting together both end up with the one secret: creation is exclusive.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        secret = secrets.token_bytes(SECRET_BYTES)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process won the race: read its secret below
        else:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:
                handle.write(secret.hex() + "\n")
            log.info("created a new site secret at %s", path)
            return secret
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # A key readable by others undoes the keyed hash: tighten it rather than go on silently.
        log.warning("site secret %s had mode %o; setting it to 600", path, mode)
        with contextlib.suppress(OSError):
            path.chmod(0o600)
    try:
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SiteSecretError(f"{path}: cannot read the site secret ({exc})") from None
    if len(secret) < 16:
        raise SiteSecretError(f"{path}: the site secret is shorter than 16 bytes")
    return secret


class Keys:
    """Keyed derivations from the site secret. Pure functions of (secret, input)."""

    def __init__(self, secret: bytes, uid_root: str = "2.25.") -> None:
        self._secret = secret
        self.uid_root = uid_root if uid_root.endswith(".") else uid_root + "."

    def digest(self, purpose: str, value: str) -> bytes:
        # The purpose separates the uses: a UID's digest never equals an ID's.
        message = purpose.encode("ascii") + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A new valid UID (<= 64 characters) under the root for ``original``."""
        number = int.from_bytes(self.digest("uid", original)[:16], "big")
        digits = str(number)[: 64 - len(self.uid_root)]
        # A UID component must not start with 0 (unless it is 0).
        return self.uid_root + (digits.lstrip("0") or "0")

    def pseudonym(self, original: str, prefix: str = "") -> str:
        """A pseudonym for ``original``: prefix + 12 characters of base-32 keyed hash."""
        code = _base32(self.digest("pseudonym", original))[:12]
        return prefix + code

    def date_shift_days(self, patient_key: str, max_days: int) -> int:
        """Days (1..max_days) to move one patient's dates back: the same for all their studies."""
        number = int.from_bytes(self.digest("date-shift", patient_key)[:8], "big")
        return 1 + number % max_days


_BASE32 = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1: read aloud and typed by people


def _base32(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, index = divmod(number, 32)
        out.append(_BASE32[index])
    return "".join(out)


def valid_uid_root(root: str) -> str | None:
    """Why ``root`` cannot prefix generated UIDs (None when it can)."""
    stripped = root.rstrip(".")
    parts = stripped.split(".")
    if not stripped or any(not p.isdigit() or (len(p) > 1 and p[0] == "0") for p in parts):
        return f"uid_root {root!r} is not a UID prefix (digits and dots, no leading zeros)"
    if len(stripped) > 40:
        return f"uid_root {root!r} is longer than 40 characters: no room for unique UIDs"
    return None


@dataclass(frozen=True)
class LinkEntry:
    kind: str  # what was pseudonymized: "PatientID", "AccessionNumber"...
    original: str
    pseudonym: str
    created_at: datetime


class Linkage:
    """The linkage database: original value -> pseudonym, written once per new pair."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = connect(url)
        self._param = self._db.param
        # Pairs written (or found) already: one INSERT per new patient, not per instance.
        self._known: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._ready = False

    def __getstate__(self) -> dict[str, str]:
        # The autoloader may hand the anonymizer to worker processes: each reconnects by URL.
        return {"url": self.url}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["url"])  # type: ignore[misc]

    def _ensure_table(self) -> None:
        if self._ready:
            return
        self._db.connect(reuse_if_open=True)
        # Nodes sharing a PostgreSQL linkage database may start together: serialise the DDL.
        with schema_lock(self._db):
            self._db.execute_sql(
                "CREATE TABLE IF NOT EXISTS linkage ("
                " kind VARCHAR(64) NOT NULL,"
                " original VARCHAR(1024) NOT NULL,"
                " pseudonym VARCHAR(128) NOT NULL,"
                " created_at VARCHAR(32) NOT NULL,"
                " PRIMARY KEY (kind, original))"
            )
            self._db.execute_sql(
                "CREATE INDEX IF NOT EXISTS linkage_pseudonym ON linkage (pseudonym)"
            )
        self._ready = True

    def record(self, kind: str, original: str, pseudonym: str) -> None:
        """Remember that ``original`` (of ``kind``) became ``pseudonym``; idempotent."""
        if (kind, original) in self._known:
            return
        with self._lock:
            self._ensure_table()
            self._db.connect(reuse_if_open=True)
            p = self._param
            with self._db.atomic():
                self._db.execute_sql(
                    f"INSERT INTO linkage (kind, original, pseudonym, created_at) "
                    f"VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (kind, original) DO NOTHING",
                    (kind, original, pseudonym, datetime.now().isoformat(timespec="seconds")),
                )
            self._known.add((kind, original))

    def lookup(self, pseudonym: str) -> list[LinkEntry]:
        """Every original that became ``pseudonym`` (normally one)."""
        with self._lock:
            self._ensure_table()
            self._db.connect(reuse_if_open=True)
            cursor = self._db.execute_sql(
                f"SELECT kind, original, pseudonym, created_at FROM linkage "
                f"WHERE pseudonym = {self._param} ORDER BY kind",
                (pseudonym,),
            )
            rows = cursor.fetchall()
        return [
            LinkEntry(kind=k, original=o, pseudonym=p, created_at=datetime.fromisoformat(c))
            for k, o, p, c in rows
        ]

    def count(self) -> int:
        with self._lock:
            self._ensure_table()
            self._db.connect(reuse_if_open=True)
            return int(self._db.execute_sql("SELECT COUNT(*) FROM linkage").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if not self._db.is_closed():
                self._db.close()

    @property
    def database(self) -> pw.Database:
        return self._db
