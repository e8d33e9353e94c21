"""The durable record buffer: SQLite in WAL mode, ``synchronous=FULL``, payloads AES-GCM.

One :class:`Store` (the writer's connection) commits sealed records, deletions
and the per-device ledger of committed device events in single transactions;
:class:`StoreReader` (the forwarder's own connection) reads what is queued. A
committed transaction is fsynced: it survives power loss, not only a crash.

Each row holds ``nonce (12 bytes) || AES-GCM(record bytes)`` with the record's
priority and seq as associated data, so a row cannot be moved to another seq.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from buffer.seal import Sealer
from core.errors import UserError
from core.kinds import Priority
from core.record import GENESIS_PREV, SealedRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    prio INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (prio, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device_events (
    serial TEXT PRIMARY KEY, last_event INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    prio INTEGER PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO usage VALUES (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0);
CREATE TRIGGER IF NOT EXISTS records_in AFTER INSERT ON records BEGIN
    UPDATE usage SET count = count + 1, bytes = bytes + length(NEW.blob) WHERE prio = NEW.prio;
END;
CREATE TRIGGER IF NOT EXISTS records_out AFTER DELETE ON records BEGIN
    UPDATE usage SET count = count - 1, bytes = bytes - length(OLD.blob) WHERE prio = OLD.prio;
END;
"""
#: Eviction frees this share of the quota beyond what is needed, so it runs rarely.
EVICT_SLACK = 0.02
#: Bytes a row costs beyond its blob (key, page slack); counted against the quota.
ROW_OVERHEAD = 16
_AAD = struct.Struct(">4sBQ")
NONCE_BYTES = 12
#: A batch read by :meth:`StoreReader.queued` stops at this many bytes.
QUEUED_BATCH_BYTES = 16 * 1024 * 1024
#: The store's file in the gateway's data directory (SQLite adds -wal and -shm beside it).
STORE_FILE = "records.db"


def store_path(data_dir: Path) -> Path:
    """Where the record store of the gateway whose data directory is *data_dir* lives."""
    return data_dir / STORE_FILE


class StoreError(UserError):
    """The store could not do what was asked; the message says what and why."""


@dataclass(frozen=True, slots=True)
class Evicted:
    prio: int
    seq: int
    size: int


@dataclass(frozen=True, slots=True)
class StoreState:
    last_seq: int
    last_digest: bytes
    boot: int


def _aad(prio: int, seq: int) -> bytes:
    return _AAD.pack(b"SCR1", prio, seq)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Store:
    """The writer's side. Not thread-safe: one thread (the store writer) owns it."""

    def __init__(self, path: Path, storage_key: bytes, *, quota_bytes: int | None = None) -> None:
        if quota_bytes is not None and quota_bytes < 64 * 1024:
            raise StoreError(f"quota of {quota_bytes} bytes is too small: give at least 64 KiB")
        self.quota_bytes = quota_bytes
        if len(storage_key) != 32:
            raise StoreError("storage key must be 32 bytes (AES-256)")
        self.path = path
        self._aead = AESGCM(storage_key)
        try:
            self._db = _connect(path)
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open record store {path}: {exc}") from exc
        self.state = self._bump_boot()
        self.usage = self._read_usage()

    def sealer(self, gateway_id: str, signing_key: Ed25519PrivateKey) -> Sealer:
        """A sealer that continues this store's chain (its last seq and digest, this boot)."""
        st = self.state
        return Sealer(gateway_id, signing_key, last_seq=st.last_seq, last_digest=st.last_digest,
                      boot=st.boot)

    def _read_usage(self) -> dict[Priority, tuple[int, int]]:
        rows = self._db.execute("SELECT prio, count, bytes FROM usage").fetchall()
        return {Priority(p): (c, b) for p, c, b in rows}

    def health(self) -> dict[str, dict[str, int]]:
        """Per class: records queued, bytes, age in seconds of the oldest (commit time)."""
        out: dict[str, dict[str, int]] = {}
        now = int(time.time())
        for prio, (count, size) in self.usage.items():
            if not count:
                continue
            row = self._db.execute(
                "SELECT at FROM records WHERE prio=? ORDER BY seq LIMIT 1", (int(prio),)
            ).fetchone()
            out[prio.label] = {"queued": count, "bytes": size,
                               "oldest_s": max(0, now - row[0]) if row else 0}
        return out

    @property
    def used_bytes(self) -> int:
        return sum(b + c * ROW_OVERHEAD for c, b in self.usage.values())

    def plan_eviction(self, incoming_bytes: int) -> list[Evicted]:
        """Rows to evict so that *incoming_bytes* more fit the quota: lowest class first,
        oldest first within a class; alarms and check-ins only when nothing else is left."""
        if self.quota_bytes is None:
            return []
        excess = self.used_bytes + incoming_bytes - self.quota_bytes
        if excess <= 0:
            return []
        target = excess + int(self.quota_bytes * EVICT_SLACK)
        out: list[Evicted] = []
        freed = 0
        for prio in sorted(Priority, reverse=True):
            while freed < target:
                after = out[-1].seq if out and out[-1].prio == prio else 0
                rows = self._db.execute(
                    "SELECT seq, length(blob) FROM records WHERE prio=? AND seq>? "
                    "ORDER BY seq LIMIT 256", (int(prio), after),
                ).fetchall()
                if not rows:
                    break
                for seq, size in rows:
                    out.append(Evicted(int(prio), seq, size + ROW_OVERHEAD))
                    freed += size + ROW_OVERHEAD
                    if freed >= target:
                        break
        return out

    def _meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def _bump_boot(self) -> StoreState:
        last_seq = int(self._meta("last_seq") or b"0")
        digest = self._meta("last_digest") or GENESIS_PREV
        boot = int(self._meta("boot") or b"0") + 1
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (str(boot).encode(),)
            )
        return StoreState(last_seq, digest, boot)

    def _transaction(self) -> _Txn:
        return _Txn(self._db)

    def device_ledger(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT serial, last_event FROM device_events").fetchall())

    def commit(
        self,
        records: Iterable[SealedRecord],
        *,
        device_events: Mapping[str, int] | None = None,
        delete_ranges: Iterable[tuple[int, int, int]] = (),
        evict: Iterable[Evicted] = (),
    ) -> None:
        """Insert, delete, evict and advance the chain state in one fsynced transaction."""
        sealed = list(records)
        now = int(time.time())
        rows = [
            (int(r.priority), r.seq, now, self._seal_row(r.priority, r.seq, r.data))
            for r in sealed
        ]
        new_state = self.state
        with self._transaction():
            if sealed:
                last = max(sealed, key=lambda r: r.seq)
                new_state = StoreState(last.seq, last.digest, self.state.boot)
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("last_seq", str(last.seq).encode()), ("last_digest", last.digest)],
                )
            self._db.executemany("DELETE FROM records WHERE prio=? AND seq BETWEEN ? AND ?",
                                 list(delete_ranges))
            self._db.executemany("DELETE FROM records WHERE prio=? AND seq=?",
                                 [(e.prio, e.seq) for e in evict])
            if device_events:
                self._db.executemany(
                    "INSERT OR REPLACE INTO device_events VALUES (?, ?)",
                    list(device_events.items()),
                )
        self.state = new_state
        self.usage = self._read_usage()

    def _seal_row(self, prio: int, seq: int, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, _aad(prio, seq))

    def close(self) -> None:
        self._db.close()


class _Txn:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


class StoreReader:
    """A read connection (the forwarder's): decrypts queued records in delivery order."""

    def __init__(self, path: Path, storage_key: bytes) -> None:
        self._aead = AESGCM(storage_key)
        self._db = _connect(path)

    def queued(self, batch: int = 1000) -> Iterator[bytes]:
        """Every queued record, decrypted, in delivery order (highest class first)."""
        cursors: dict[Priority, int] = {}
        while (found := self.next_batch(cursors, batch, QUEUED_BATCH_BYTES)) is not None:
            prio, rows = found
            cursors[prio] = rows[-1][0]
            for _, data in rows:
                yield data

    def next_batch(
        self, after: Mapping[Priority, int], limit: int, max_bytes: int
    ) -> tuple[Priority, list[tuple[int, bytes]]] | None:
        """Records of the highest non-empty class with seq above that class's cursor."""
        for prio in Priority:
            rows = self._db.execute(
                "SELECT seq, blob FROM records WHERE prio=? AND seq>? ORDER BY seq LIMIT ?",
                (int(prio), after.get(prio, 0), limit),
            ).fetchall()
            if not rows:
                continue
            out: list[tuple[int, bytes]] = []
            size = 0
            for seq, blob in rows:
                data = self.open_row(int(prio), seq, blob)
                size += len(data)
                if out and size > max_bytes:
                    break
                out.append((seq, data))
            return prio, out
        return None

    def open_row(self, prio: int, seq: int, blob: bytes) -> bytes:
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(prio, seq))

    def depth(self) -> dict[str, int]:
        rows = self._db.execute("SELECT prio, COUNT(*) FROM records GROUP BY prio").fetchall()
        return {Priority(p).label: n for p, n in rows}

    def close(self) -> None:
        self._db.close()


def inspect_store(path: Path) -> dict[str, Any]:
    """What a technician asks of a store, read-only (the daemon may be running), without
    its key: last seq, boot count, per class the queued records, their bytes and the age
    of the oldest, the files on disk, and SQLite's quick check."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
        usage = conn.execute("SELECT prio, count, bytes FROM usage ORDER BY prio").fetchall()
        now = int(time.time())
        classes: dict[str, Any] = {}
        for prio, count, size in usage:
            row = conn.execute("SELECT at FROM records WHERE prio=? ORDER BY seq LIMIT 1",
                               (prio,)).fetchone()
            classes[Priority(prio).label] = {
                "queued": count, "bytes": size, "oldest_s": now - row[0] if row else None}
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    return {
        "last_seq": int(meta.get("last_seq", b"0")), "boot": int(meta.get("boot", b"0")),
        "classes": classes, "integrity": integrity,
        "files": {p.name: p.stat().st_size for p in path.parent.glob(f"{path.name}*")},
    }
