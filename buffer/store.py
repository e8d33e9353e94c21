"""The durable record buffer: SQLite in WAL mode, ``synchronous=FULL``, payloads AES-GCM.

One :class:`Store` (the writer's connection) commits sealed records, deletions
and the per-device ledger of committed device events in single transactions;
:class:`StoreReader` (the forwarder's own connection) reads what is queued. A
committed transaction is fsynced: it survives power loss, not only a crash.

Each row holds ``nonce (12 bytes) || AES-GCM(record bytes)`` with the record's
priority and seq as associated data, so a row cannot be moved to another seq.

Under a quota (:class:`Limits`) everything the store puts on disk counts: the pages
in use, the WAL (bounded: checkpointed at half its bound, truncated past it), the
wal-index and a reserve file. The reserve (``records.db.reserve``, preallocated and
fsynced) is released when the disk fills anyway (another process), so that
deletions can still commit, and re-created once there is room again.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buffer.seal import Sealer
from core.durable import fsync_dir
from core.errors import UserError
from core.kinds import Priority
from core.record import GENESIS_PREV, SealedRecord
from core.suites import Signer, storage_aead

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
log = logging.getLogger(__name__)

#: Eviction frees this share of the quota beyond what is needed, so it runs rarely.
EVICT_SLACK = 0.02
#: Bytes a row costs beyond its blob (key, cell header); the logical size of a row.
ROW_OVERHEAD = 16
#: Pages of the B-tree per logical byte of rows (pages are not full). An estimate, used
#: to size an incoming group and how much to evict; the quota itself is checked against
#: the pages really in use, so a wrong estimate is corrected at the next commit.
PAGE_FACTOR = 1.5
#: Pages a transaction may take beyond its records' estimate (B-tree splits, the gap
#: record, the meta rows): kept free under the quota.
TXN_MARGIN_PAGES = 4
#: The smallest quota: room for the schema, the WAL bound, the wal-index and the reserve.
MIN_QUOTA_BYTES = 256 * 1024
#: The WAL's bound is quota/WAL_SHARE, between these; without a quota, the maximum.
WAL_SHARE = 8
WAL_MIN_BYTES = 32 * 1024
WAL_MAX_BYTES = 4 * 1024 * 1024
#: The reserve file is quota/RESERVE_SHARE, between these (none without a quota).
RESERVE_SHARE = 16
RESERVE_MIN_BYTES = 32 * 1024
RESERVE_MAX_BYTES = 1024 * 1024
#: The wal-index (``-shm``) file: 32 KiB covers a WAL of up to about 4,000 pages.
SHM_BYTES = 32 * 1024
#: Default quota (no ``[gateway] quota_bytes``): this share of the filesystem's size...
DEFAULT_QUOTA_SHARE = 2
#: ...and never more than what is free plus what the store holds, less this share of the
#: filesystem's size left to the rest of the system.
FS_RESERVE_SHARE = 10
_ZEROS = bytes(64 * 1024)
_AAD = struct.Struct(">4sBQ")
NONCE_BYTES = 12
#: A batch read by :meth:`StoreReader.queued` stops at this many bytes.
QUEUED_BATCH_BYTES = 16 * 1024 * 1024
#: The store's file in the gateway's data directory (SQLite adds -wal and -shm beside it).
STORE_FILE = "records.db"
#: Beside it, the reserve file: ``records.db.reserve``.
RESERVE_SUFFIX = ".reserve"


def store_path(data_dir: Path) -> Path:
    """Where the record store of the gateway whose data directory is *data_dir* lives."""
    return data_dir / STORE_FILE


def is_disk_full(exc: BaseException) -> bool:
    """Whether *exc* (from SQLite or the OS) means "no space left", not another I/O error."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of *path*."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def default_quota(data_dir: Path) -> int:
    """The quota when the configuration gives none, from the filesystem of *data_dir*:
    half its size, and no more than the store's files plus the free space, less a tenth
    of its size left to the rest of the system; at least :data:`MIN_QUOTA_BYTES`."""
    st = os.statvfs(_existing(data_dir))
    size = st.f_blocks * st.f_frsize
    held = store_files_bytes(store_path(data_dir))
    quota = min(size // DEFAULT_QUOTA_SHARE,
                held + st.f_bavail * st.f_frsize - size // FS_RESERVE_SHARE)
    if quota < MIN_QUOTA_BYTES:
        log.warning("the filesystem of %s has little room (%d bytes of %d free): the "
                    "record store's quota is the minimum, %d bytes", data_dir,
                    st.f_bavail * st.f_frsize, size, MIN_QUOTA_BYTES)
        return MIN_QUOTA_BYTES
    return quota


def store_files_bytes(path: Path) -> int:
    """Bytes on disk of the store at *path*: the database, WAL, wal-index and reserve."""
    total = 0
    for suffix in ("", "-wal", "-shm", RESERVE_SUFFIX):
        try:
            total += path.with_name(path.name + suffix).stat().st_size
        except FileNotFoundError:
            continue
    return total


@dataclass(frozen=True, slots=True)
class Limits:
    """How a quota is shared: the WAL's bound, the reserve file, the rest for pages."""

    quota: int | None
    wal: int
    reserve: int

    @classmethod
    def of(cls, quota: int | None) -> Limits:
        if quota is None:
            return cls(None, WAL_MAX_BYTES, 0)
        wal = min(WAL_MAX_BYTES, max(WAL_MIN_BYTES, quota // WAL_SHARE))
        reserve = min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, quota // RESERVE_SHARE))
        return cls(quota, wal, reserve)

    @property
    def pages(self) -> int | None:
        """Bytes of database pages in use the quota allows."""
        if self.quota is None:
            return None
        return self.quota - self.wal - self.reserve - SHM_BYTES

    @property
    def group_bytes(self) -> int:
        """The most (logical) bytes of records one transaction may add: a transaction
        goes whole into the WAL, which is checkpointed at half its bound."""
        return int(self.wal / 4 / PAGE_FACTOR)


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


def _connect(path: Path, wal_bytes: int = WAL_MAX_BYTES) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # the WAL: checkpointed once it holds half its bound, cut back to the bound when reset
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint={max(1, wal_bytes // 2 // page)}")
    conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
    return conn


class Store:
    """The writer's side. Not thread-safe: one thread (the store writer) owns it."""

    def __init__(self, path: Path, storage_key: bytes, *, quota_bytes: int | None = None) -> None:
        if quota_bytes is not None and quota_bytes < MIN_QUOTA_BYTES:
            raise StoreError(f"quota of {quota_bytes} bytes is too small: give at least "
                             f"{MIN_QUOTA_BYTES} bytes ({MIN_QUOTA_BYTES // 1024} KiB)")
        self.quota_bytes = quota_bytes
        self.limits = Limits.of(quota_bytes)
        try:
            aead = storage_aead(storage_key)
        except ValueError as exc:
            raise StoreError(f"storage key: {exc}") from None
        self.path = path
        self.reserve_path = path.with_name(path.name + RESERVE_SUFFIX)
        self._aead = aead
        try:
            self._db = _connect(path, self.limits.wal)
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open record store {path}: {exc}") from exc
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self.state = self._bump_boot()
        self.usage = self._read_usage()
        if self.limits.reserve and not self.restore_reserve():
            log.warning("no room for the record store's reserve file %s (%d bytes) yet",
                        self.reserve_path, self.limits.reserve)

    def sealer(self, gateway_id: str, signing_key: Signer | None = None) -> Sealer:
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
        """Bytes the store holds on disk (database, WAL, wal-index, reserve): the quota's
        measure."""
        return store_files_bytes(self.path)

    def pages_in_use_bytes(self) -> int:
        """Bytes of the database's pages in use (its file, less the free pages)."""
        count = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(count - free) * self._page_size

    def plan_eviction(self, incoming_bytes: int) -> list[Evicted]:
        """Rows to evict so that *incoming_bytes* more (logical) fit the quota's pages:
        lowest class first, oldest first within a class; alarms and check-ins only when
        nothing else is left."""
        budget = self.limits.pages
        if budget is None or self.quota_bytes is None:
            return []
        margin = TXN_MARGIN_PAGES * self._page_size
        excess = self.pages_in_use_bytes() + int(incoming_bytes * PAGE_FACTOR) + margin - budget
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
                    freed += int((size + ROW_OVERHEAD) * PAGE_FACTOR)
                    if freed >= target:
                        break
        return out

    # -- the reserve file and the WAL's bound --------------------------------------------
    @property
    def has_reserve(self) -> bool:
        try:
            return self.reserve_path.stat().st_size >= self.limits.reserve
        except FileNotFoundError:
            return False

    def room(self) -> bool:
        """Whether the filesystem has room to re-create the reserve and let the WAL and
        the next groups grow (twice the reserve plus the WAL's bound free)."""
        return free_bytes(self.path) >= 2 * self.limits.reserve + self.limits.wal

    def restore_reserve(self) -> bool:
        """Create the reserve file (preallocated, fsynced, with its directory) unless it is
        in place; False when there is no room for it."""
        if not self.limits.reserve or self.has_reserve:
            return True
        if not self.room():
            return False
        tmp = self.reserve_path.with_name(self.reserve_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _preallocate(fd, self.limits.reserve)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.reserve_path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not is_disk_full(exc):
                raise
            return False
        return True

    def release_reserve(self) -> int:
        """Delete the reserve file so that deletions can commit on a full disk; the bytes
        released (0 if it was not there)."""
        try:
            size = self.reserve_path.stat().st_size
            self.reserve_path.unlink()
        except FileNotFoundError:
            return 0
        fsync_dir(self.path.parent)
        return size

    def bound_wal(self) -> None:
        """Checkpoint and truncate the WAL if it has grown past its bound (a checkpoint
        held back by a reader); the automatic checkpoints keep it below otherwise."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            if wal.stat().st_size <= self.limits.wal:
                return
        except FileNotFoundError:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("checkpoint of %s failed: %s", wal, exc)

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
        forget: Iterable[str] = (),
    ) -> None:
        """Insert, delete, evict and advance the chain state in one fsynced transaction;
        *forget* names ledger entries removed in it (an unpaired device's)."""
        sealed = list(records)
        now = int(time.time())
        rows = [
            (int(r.priority), r.seq, now, self._seal_row(r.priority, r.seq, r.data))
            for r in sealed
        ]
        new_state = self.state
        with self._transaction():
            # deletions first: the inserts reuse the pages they free, so the file does
            # not grow past the quota within the transaction
            self._db.executemany("DELETE FROM records WHERE prio=? AND seq BETWEEN ? AND ?",
                                 list(delete_ranges))
            self._db.executemany("DELETE FROM records WHERE prio=? AND seq=?",
                                 [(e.prio, e.seq) for e in evict])
            if sealed:
                last = max(sealed, key=lambda r: r.seq)
                new_state = StoreState(last.seq, last.digest, self.state.boot)
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("last_seq", str(last.seq).encode()), ("last_digest", last.digest)],
                )
            if device_events:
                self._db.executemany(
                    "INSERT OR REPLACE INTO device_events VALUES (?, ?)",
                    list(device_events.items()),
                )
            self._db.executemany("DELETE FROM device_events WHERE serial=?",
                                 [(key,) for key in forget])
        self.state = new_state
        self.usage = self._read_usage()
        self.bound_wal()

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
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite rolls back by itself after SQLITE_FULL or an I/O error: a ROLLBACK then
        # fails ("no transaction is active") and would hide the real cause
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _preallocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        for offset in range(0, size, len(_ZEROS)):  # a filesystem without fallocate
            os.pwrite(fd, _ZEROS[: size - offset], offset)


class StoreReader:
    """A read connection (the forwarder's): decrypts queued records in delivery order."""

    def __init__(self, path: Path, storage_key: bytes) -> None:
        self._aead = storage_aead(storage_key)
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

    def lowest_seq(self) -> int | None:
        """The lowest seq still queued in any class (None: nothing queued): every record
        below it has left the store (delivered, or evicted with a ``gap`` record). One
        lookup per class on the primary key."""
        return _lowest_seq(self._db)

    def depth(self) -> dict[str, int]:
        rows = self._db.execute("SELECT prio, COUNT(*) FROM records GROUP BY prio").fetchall()
        return {Priority(p).label: n for p, n in rows}

    def newest_record(self) -> bytes | None:
        """The record with the highest seq still in the store, decrypted (None when the
        store is empty): at start, its time is a floor for the clock. One lookup per class
        on the primary key. Raises ``cryptography.exceptions.InvalidTag`` if it is corrupt."""
        newest: tuple[int, int, bytes] | None = None
        for prio in Priority:
            row = self._db.execute(
                "SELECT seq, blob FROM records WHERE prio=? ORDER BY seq DESC LIMIT 1",
                (int(prio),),
            ).fetchone()
            if row is not None and (newest is None or row[0] > newest[0]):
                newest = (row[0], int(prio), bytes(row[1]))
        return None if newest is None else self.open_row(newest[1], newest[0], newest[2])

    def close(self) -> None:
        self._db.close()


def _lowest_seq(db: sqlite3.Connection) -> int | None:
    lowest: int | None = None
    for prio in Priority:
        row = db.execute("SELECT seq FROM records WHERE prio=? ORDER BY seq LIMIT 1",
                         (int(prio),)).fetchone()
        if row is not None and (lowest is None or row[0] < lowest):
            lowest = int(row[0])
    return lowest


@dataclass(frozen=True, slots=True)
class Undelivered:
    """What a store holds that the broker has not acknowledged, as another process sees
    it: records with seq up to a bound, per class, and a ledger entry asked for."""

    by_class: dict[str, int]
    lowest_seq: int | None
    last_seq: int
    ledger: int | None
    #: Whether the record whose seq the ledger entry holds is still queued.
    ledger_queued: bool | None = None

    @property
    def count(self) -> int:
        return sum(self.by_class.values())


def undelivered(path: Path, through: int | None = None, ledger_key: str | None = None
                ) -> Undelivered:
    """Read-only (the daemon may be running), without the store's key: the records still
    queued with seq up to *through* (all when None), per class, and the ledger entry
    *ledger_key* (e.g. the seq of the final record). A record leaves the store only once
    the broker acknowledged it (or when evicted, which a ``gap`` record names)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        last = conn.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()
        if through is None or through >= int(last[0] if last else 0):
            # everything queued: the usage table's counts (kept by triggers), no scan
            rows = conn.execute("SELECT prio, count FROM usage").fetchall()
        else:
            rows = [(int(p), conn.execute("SELECT COUNT(*) FROM records WHERE prio=? AND "
                                          "seq<=?", (int(p), through)).fetchone()[0])
                    for p in Priority]
        entry, queued = None, None
        if ledger_key is not None:
            found = conn.execute("SELECT last_event FROM device_events WHERE serial=?",
                                 (ledger_key,)).fetchone()
            entry = None if found is None else int(found[0])
        if entry is not None:
            queued = any(conn.execute("SELECT 1 FROM records WHERE prio=? AND seq=?",
                                      (int(p), entry)).fetchone() for p in Priority)
        return Undelivered({Priority(p).label: n for p, n in rows if n}, _lowest_seq(conn),
                           int(last[0]) if last else 0, entry, queued)
    finally:
        conn.close()


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
