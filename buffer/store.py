"""The durable record buffer: SQLite in WAL mode, ``synchronous=FULL``, payloads AES-GCM.

One :class:`Store` (the writer's connection) commits sealed records, deletions
and the per-device ledger of committed device events in single transactions;
:class:`StoreReader` (the forwarder's own connection) reads what is queued. A
committed transaction is fsynced: it survives power loss, not only a crash.

Each row holds ``nonce (12 bytes) || AES-GCM(record bytes)`` with the record's
priority and seq as associated data, so a row cannot be moved to another seq.

The store's state (chain head, per-class counts, device ledger) is committed with
every transaction but written where it costs the fewest blocks (see :class:`_State`):
into the newest record's row, which the commit writes anyway; for a commit of ledger
entries alone, into one slot of the state file beside the store (``records.db.state``,
4 KiB written and one fdatasync, against two WAL blocks and the WAL's fsync); otherwise
into the state row (a row of the records table, of a class of its own: STATE_PRIO). It
is sealed (compressed, then encrypted with the storage key like the records): the
ledger holds when and how each tag was heard.

Under a quota (:class:`Limits`) everything the store puts on disk counts: the pages
in use, the WAL (bounded: checkpointed at half its bound, truncated past it), the
wal-index and a reserve file. The reserve (``records.db.reserve``, preallocated and
fsynced) is released when the disk fills anyway (another process), so that
deletions can still commit, and re-created once there is room again.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import sqlite3
import struct
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag

from buffer.seal import Sealer
from core.durable import fsync_dir
from core.errors import UserError
from core.kinds import HOLDABLE, Priority
from core.record import GENESIS_PREV, SealedRecord
from core.suites import Aead, Signer, storage_aead

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    prio INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    blob BLOB NOT NULL,
    st BLOB,
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
"""
#: The state row: a row of the records table of its own class, below every delivery
#: class (never read, counted nor delivered as a record), key (STATE_PRIO, 0), the
#: sealed state as its blob. Where the records are few (a home: they all fit the table's
#: one page) it shares the page a commit writes anyway.
STATE_PRIO = -1
#: The tables ``meta``, ``usage`` and ``device_events`` are the state of a store from
#: before the state row (plain text): read once at open, emptied by the first commit.
#: A store of the first schema (usage kept by triggers, no ``st`` column) is migrated in
#: place at open: its tables stay, they hold the state as of its last commit.
MIGRATE = """
DROP TRIGGER IF EXISTS records_in;
DROP TRIGGER IF EXISTS records_out;
"""
log = logging.getLogger(__name__)

#: The classes by value, for the commit's usage counts: an index, where ``Priority(prio)``
#: (an Enum call, ~0.5 us) showed as 15 % of the commit thread's time (bench/README.md).
_PRIO: tuple[Priority, ...] = tuple(Priority(i) for i in range(len(Priority)))  # 0..n-1

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
#: The smallest quota: room for the schema, the WAL bound, the wal-index, the reserve and
#: the state file.
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
#: A record this large is stored compressed, before it is encrypted, when that saves a
#: fifth (a health record 1,704 -> ~800 bytes, an interval 661 -> ~470, a fix 521 ->
#: ~400), in a commit of at most ROW_COMPRESS_GROUP records: a home's rates, where the
#: records of a commit then fit the one page it writes (measured: every 5 minutes three
#: intervals, a health record and a fix split the records' B-tree, 8 WAL frames in two
#: commits). A full-speed group does not spend the CPU (~25 us a record). A record's
#: bytes begin with ``{``; compressed ones with zlib's header, so both read back.
ROW_COMPRESS_MIN = 512
ROW_COMPRESS_GROUP = 8
#: A batch read by :meth:`StoreReader.queued` stops at this many bytes.
QUEUED_BATCH_BYTES = 16 * 1024 * 1024
#: Delivered ranges a slot of the state file keeps at most (more wait for a commit).
DELIVERED_MAX_RANGES = 64
#: Records of the classes the uplink may hold (:data:`core.kinds.HOLDABLE`: a fix, an
#: interval, the health record) are committed into the state file while those waiting
#: there stay within these bounds (sealed rows: compressed, encrypted), and join the
#: table with the next commit that goes to the database. At a home that is one 4 KiB
#: slot write instead of a SQLite commit (a WAL frame and two wal-index pages, three
#: to five times the bytes), and the records are usually delivered before they ever
#: reach the table (docs/architecture.md "Where the store's state lives").
HELD_MAX_RECORDS = 16
HELD_MAX_BYTES = 4096
#: Ranges of the table's rows delivered in commits to the state file, kept there until
#: the next commit to the database deletes them (more: that commit goes to the database).
OWED_MAX_RANGES = 16
#: Ledger entries the newest record may carry (changed since the tables were last
#: written); past this many the commit writes them to the tables.
DELTA_MAX_ENTRIES = 64
#: Without the wal-index's frame count (an unknown layout), checkpoint every this many
#: commits.
CHECKPOINT_FALLBACK_COMMITS = 256
#: The wal-index header (``-shm``): mxFrame, the WAL's last valid frame, native u32 here.
_SHM_MXFRAME = struct.Struct("=I")
_SHM_MXFRAME_OFFSET = 16
#: What SQLite fsyncs per checkpoint in WAL mode with synchronous=FULL: the WAL before
#: the copy, the database after it, and the WAL's new header when it restarts.
FSYNCS_PER_CHECKPOINT = 3
#: The store's file in the gateway's data directory (SQLite adds -wal and -shm beside it).
STORE_FILE = "records.db"
#: Beside it, the reserve file: ``records.db.reserve``.
RESERVE_SUFFIX = ".reserve"
#: ...and the state file: ``records.db.state``, two slots of STATE_SLOT_BYTES (preallocated:
#: a slot is written in place, so a commit of ledger entries alone needs no new block and
#: still succeeds on a full disk). Each slot: magic, txn, length, then the sealed state.
STATE_SUFFIX = ".state"
STATE_SLOT_BYTES = 16 * 1024
_SLOT_HEAD = struct.Struct(">4sQI")
_SLOT_MAGIC = b"SCS1"
#: A sealed state: this prefix, the length of its clear part (2 bytes, big-endian), the
#: clear part (JSON: txn, chain head, boot, usage, the ``chain:`` ledger entries), the
#: nonce, then AES-GCM (or SM4-GCM) of the rest of the ledger, zlib-compressed, with the
#: clear part as associated data. A carried state written before (plain JSON) begins
#: with ``{``.
_SEALED_PREFIX = b"E1"
_HEAD_LEN = struct.Struct(">H")
#: Ledger entries kept in clear: the chain's own (the final record's seq), which
#: decommissioning reads without the key.
CLEAR_LEDGER_PREFIX = "chain:"
#: Where a sealed state lives, in its associated data: it cannot be moved between them.
_IN_ROW, _IN_SLOT, _IN_CARRIER = b"SCsr", b"SCss", b"SCsc"
#: Files of the store, by suffix: the database, its WAL and wal-index, reserve, state.
STORE_SUFFIXES = ("", "-wal", "-shm", RESERVE_SUFFIX, STATE_SUFFIX)


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
    """Bytes on disk of the store at *path*: the database, WAL, wal-index, reserve and
    state file."""
    total = 0
    for suffix in STORE_SUFFIXES:
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
        return self.quota - self.wal - self.reserve - SHM_BYTES - 2 * STATE_SLOT_BYTES

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
    # the WAL: checkpointed by the writer (Store) once it holds half its bound, so that a
    # page rewritten by many commits reaches the database file once per checkpoint; the
    # file keeps its size (cut back to the bound only), so commits overwrite its blocks
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
    return conn


@dataclass
class StoreStats:
    """What the store did to the disk since it was opened (the writer's thread)."""

    commits: int = 0  # transactions: one fsync of the WAL (or fdatasync of a slot) each
    slot_writes: int = 0  # commits of ledger entries alone, into the state file
    checkpoints: int = 0  # FSYNCS_PER_CHECKPOINT fsyncs each
    table_writes: int = 0  # commits that wrote the state to its tables (see _State)
    held_records: int = 0  # records committed into the state file (held there)

    @property
    def fsyncs(self) -> int:
        return self.commits + FSYNCS_PER_CHECKPOINT * self.checkpoints


class _Held(NamedTuple):
    """A row committed into the state file, not in the table yet."""

    prio: int
    seq: int
    at: int  # commit time, as the table's ``at``
    blob: bytes  # sealed as the table's (Store._seal_row)


def _covers(ranges: Iterable[tuple[int, int, int]], prio: int, seq: int) -> bool:
    return any(p == prio and lo <= seq <= hi for p, lo, hi in ranges)


@dataclass
class _State:
    """The store's state as committed: chain head, per-class usage, device ledger.

    A commit writes it where it costs the fewest blocks; every write is numbered with
    the commit's txn, and at open the highest-numbered one wins. A *full* state (the
    whole ledger) is in the state row or in a slot of the state file; the txn of the
    one in effect is :attr:`base_txn`. A commit that inserts records writes into the
    ``st`` column of its newest record (:attr:`carrier`) the chain head, the usage and
    the ledger entries changed since that full state (the delta), with its txn: that row
    is on the page the commit writes anyway. A commit of ledger entries alone writes a
    full state into the state file's older slot (the newer one, the base of any carried
    delta, is never overwritten). Any other commit updates the carrier's ``st`` while it
    is there, and writes the state row once it is gone (delivered), when the delta
    grows past :data:`DELTA_MAX_ENTRIES`, or when ledger entries are forgotten.
    """

    txn: int
    last_seq: int
    digest: bytes
    boot: int
    usage: dict[Priority, tuple[int, int]]
    ledger: dict[str, int]  # complete: the full state's entries with the delta applied
    delta: dict[str, int] = field(default_factory=dict)  # changed since the full state
    carrier: tuple[int, int] | None = None  # (prio, seq) of the row whose st holds it
    base_txn: int = 0  # the txn of the full state in effect
    carrier_bytes: int = 0  # the length of the carrier's blob
    #: ranges (class, lo, hi) the broker took whose rows are still on disk: a slot write
    #: keeps them, and the next open deletes them (no resend after a kill)
    delivered: list[tuple[int, int, int]] = field(default_factory=list)
    #: rows (class, seq, sealed row) committed into the state file, not in the table yet
    #: (only in a slot's state: a commit to the database inserts them)
    held: tuple[_Held, ...] = ()
    #: ranges (class, lo, hi) of the table deleted by commits into the state file (their
    #: usage already taken off): the next commit to the database, or open, deletes them
    owed: tuple[tuple[int, int, int], ...] = ()

    def full(self) -> dict[str, Any]:
        """The whole state, as the state row and the state file hold it."""
        out = {"t": self.txn, "s": self.last_seq, "d": self.digest.hex(), "b": self.boot,
               "u": [list(self.usage.get(p, (0, 0))) for p in Priority], "l": self.ledger}
        if self.delivered:
            out["dl"] = [list(r) for r in self.delivered]
        if self.held:  # sealed rows already (AES-GCM): in the clear part, as base64
            out["hr"] = [[h.prio, h.seq, h.at, base64.b64encode(h.blob).decode()]
                         for h in self.held]
        if self.owed:
            out["ow"] = [list(r) for r in self.owed]
        return out

    def carried(self, txn: int) -> dict[str, Any]:
        """What the newest record carries: this state, numbered *txn*, as a delta on the
        full state numbered :attr:`base_txn`."""
        return {"t": txn, "s": self.last_seq, "d": self.digest.hex(), "base": self.base_txn,
                "u": [list(self.usage.get(p, (0, 0))) for p in Priority], "l": self.delta}


def _seal_state(aead: Aead, where: bytes, state: dict[str, Any]) -> bytes:
    """*state* as stored: the chain head, usage and ``chain:`` ledger entries in clear
    (the tools read them without the key: nothing personal), every other ledger entry
    (devices, tags, their presence intervals) compressed and encrypted; both bound to
    *where* it lives and to each other."""
    ledger = state["l"]
    clear = {k: v for k, v in state.items() if k != "l"}
    clear["lc"] = {k: v for k, v in ledger.items() if k.startswith(CLEAR_LEDGER_PREFIX)}
    head = json.dumps(clear, separators=(",", ":")).encode()
    secret = zlib.compress(json.dumps(
        {k: v for k, v in ledger.items() if not k.startswith(CLEAR_LEDGER_PREFIX)},
        separators=(",", ":")).encode(), 6)
    nonce = os.urandom(NONCE_BYTES)
    return (_SEALED_PREFIX + _HEAD_LEN.pack(len(head)) + head + nonce
            + aead.encrypt(nonce, secret, where + head))


def _open_state(aead: Aead | None, where: bytes, blob: bytes) -> dict[str, Any]:
    """A state as :func:`_seal_state` wrote it, or a carried state of before (plain JSON);
    without *aead* (a tool without the key), its ledger is the entries in clear. Raises
    ``InvalidTag`` (or ValueError) when it is not intact."""
    blob = bytes(blob)
    if blob.startswith(b"{"):
        return dict(json.loads(blob))
    if not blob.startswith(_SEALED_PREFIX):
        raise ValueError("not a sealed state")
    at = len(_SEALED_PREFIX)
    (size,) = _HEAD_LEN.unpack_from(blob, at)
    at += _HEAD_LEN.size
    head = blob[at:at + size]
    if len(head) != size:
        raise ValueError("a sealed state cut short")
    state = dict(json.loads(head))
    ledger = {str(k): int(v) for k, v in state.pop("lc").items()}
    if aead is not None:
        nonce = blob[at + size:at + size + NONCE_BYTES]
        secret = aead.decrypt(nonce, blob[at + size + NONCE_BYTES:], where + head)
        ledger.update(json.loads(zlib.decompress(secret)))
    state["l"] = ledger
    return state


def _from_full(state: Mapping[str, Any]) -> _State:
    txn = int(state["t"])
    return _State(txn=txn, last_seq=int(state["s"]), digest=bytes.fromhex(state["d"]),
                  boot=int(state["b"]),
                  usage={p: (int(c), int(b)) for p, (c, b) in
                         zip(Priority, state["u"], strict=True)},
                  ledger={str(k): int(v) for k, v in state["l"].items()}, base_txn=txn,
                  delivered=[(int(p), int(lo), int(hi)) for p, lo, hi in state.get("dl", ())],
                  held=tuple(_Held(int(p), int(q), int(at), base64.b64decode(b))
                             for p, q, at, b in state.get("hr", ())),
                  owed=tuple((int(p), int(lo), int(hi)) for p, lo, hi in state.get("ow", ())))


class _StateFile:
    """The state file: two slots, each a full state sealed (:func:`_seal_state`). A write
    goes into the slot that does not hold the newest valid state, and is fdatasynced: a
    write torn by a crash leaves the other slot, and the newest valid one is the base of
    any delta carried by a record."""

    def __init__(self, path: Path, aead: Aead | None) -> None:
        self.path = path
        self._aead = aead
        self._fd: int | None = None
        self._newest: int | None = None  # the slot of the newest valid state
        self.states: list[dict[str, Any]] = []  # the valid states found at open

    def open(self) -> bool:
        """Open (create, preallocate and fsync when missing) and read the slots; False
        when it cannot be had (no room: commits of ledger entries alone then go to the
        database, as every other commit)."""
        size = 2 * STATE_SLOT_BYTES
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("record store state file %s: %s; its commits go to the database",
                        self.path, exc)
            return False
        try:
            if os.fstat(fd).st_size < size:
                _preallocate(fd, size)
                os.fsync(fd)
                fsync_dir(self.path.parent)
        except OSError as exc:
            os.close(fd)
            log.warning("record store state file %s: %s; its commits go to the database",
                        self.path, exc)
            return False
        self._fd = fd
        best = -1
        for slot in (0, 1):
            state = self._read(slot)
            if state is not None:
                self.states.append(state)
                if int(state["t"]) > best:
                    best, self._newest = int(state["t"]), slot
        return True

    def _read(self, slot: int) -> dict[str, Any] | None:
        if self._fd is None:
            return None
        head = os.pread(self._fd, _SLOT_HEAD.size, slot * STATE_SLOT_BYTES)
        if len(head) < _SLOT_HEAD.size:
            return None
        magic, txn, length = _SLOT_HEAD.unpack(head)
        if magic != _SLOT_MAGIC or length > STATE_SLOT_BYTES - _SLOT_HEAD.size:
            return None
        blob = os.pread(self._fd, length, slot * STATE_SLOT_BYTES + _SLOT_HEAD.size)
        try:
            state = _open_state(self._aead, _IN_SLOT, blob)
            return state if int(state["t"]) == txn else None
        except (InvalidTag, ValueError, KeyError, TypeError, zlib.error):
            return None  # torn by a crash (or damaged): the other slot stands

    def fits(self, blob: bytes) -> bool:
        return self._fd is not None and len(blob) <= STATE_SLOT_BYTES - _SLOT_HEAD.size

    def write(self, txn: int, blob: bytes) -> None:
        """Write *blob* (a full state numbered *txn*) into the older slot, durably."""
        if self._fd is None:
            raise OSError(errno.EBADF, "the state file is not open")
        slot = 1 if self._newest == 0 else 0
        os.pwrite(self._fd, _SLOT_HEAD.pack(_SLOT_MAGIC, txn, len(blob)) + blob,
                  slot * STATE_SLOT_BYTES)
        os.fdatasync(self._fd)
        self._newest = slot

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _has_st(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "st" for row in conn.execute("PRAGMA table_info(records)"))


def _legacy_state(conn: sqlite3.Connection) -> _State:
    """The state in the tables of a store from before the state row (empty ones: the
    state of a new store, txn 0)."""
    meta = {k: bytes(v) for k, v in conn.execute("SELECT k, v FROM meta")}
    txn = int(meta.get("txn", b"0"))
    return _State(
        txn=txn, last_seq=int(meta.get("last_seq", b"0")),
        digest=meta.get("last_digest", GENESIS_PREV), boot=int(meta.get("boot", b"0")),
        usage={Priority(p): (c, b) for p, c, b in
               conn.execute("SELECT prio, count, bytes FROM usage")},
        ledger=dict(conn.execute("SELECT serial, last_event FROM device_events")),
        base_txn=txn)


def _load_state(conn: sqlite3.Connection, aead: Aead | None,
                slots: Iterable[Mapping[str, Any]] = ()) -> _State:
    """The committed state of the store behind *conn* (any connection, read-only too),
    with the valid *slots* of its state file: the highest-numbered write wins. Without
    *aead* (a tool without the key) the ledger holds only the entries kept in clear."""
    fulls = {}
    legacy = _legacy_state(conn)
    fulls[legacy.txn] = legacy
    row = conn.execute("SELECT blob FROM records WHERE prio=? AND seq=0",
                       (STATE_PRIO,)).fetchone()
    if row is not None:
        found = _from_full(_open_state(aead, _IN_ROW, row[0]))
        fulls[found.txn] = found
    for slot in slots:
        found = _from_full(slot)
        fulls[found.txn] = found
    st = fulls[max(fulls)]
    if not _has_st(conn):
        return st  # the first schema: the tables are the state (kept by its triggers)
    newest: tuple[int, int, bytes | None, int] | None = None
    for prio in Priority:
        found_row = conn.execute("SELECT seq, st, length(blob) FROM records WHERE prio=? "
                                 "ORDER BY seq DESC LIMIT 1", (int(prio),)).fetchone()
        if found_row is not None and (newest is None or found_row[0] > newest[1]):
            newest = (int(prio), int(found_row[0]), found_row[1], int(found_row[2]))
    if newest is None or newest[2] is None:
        return st
    carried = _open_state(aead, _IN_CARRIER, newest[2])
    if int(carried["t"]) <= st.txn:
        return st  # a full state was written after it
    base_txn = int(carried.get("base", legacy.txn))  # before "base": on the tables
    base = fulls.get(base_txn)
    if base is None:
        raise StoreError(f"record store state: the newest record carries state "
                         f"{carried['t']} on top of state {base_txn}, which is on disk "
                         f"neither in the state row nor in the state file; restore the "
                         f"store's files together (records.db*, all of them)")
    delta = {str(k): int(v) for k, v in carried["l"].items()}
    return _State(txn=int(carried["t"]), last_seq=int(carried["s"]),
                  digest=bytes.fromhex(carried["d"]), boot=base.boot,
                  usage={p: (int(c), int(b)) for p, (c, b) in
                         zip(Priority, carried["u"], strict=True)},
                  ledger={**base.ledger, **delta}, delta=delta,
                  carrier=(newest[0], newest[1]), base_txn=base_txn, carrier_bytes=newest[3])


def _read_slots(store: Path, aead: Aead | None) -> list[dict[str, Any]]:
    """The valid states in the state file of the store at *store*, read-only (none when
    there is no state file)."""
    slots = _StateFile(store.with_name(store.name + STATE_SUFFIX), aead)
    try:
        slots._fd = os.open(slots.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return [s for s in (slots._read(0), slots._read(1)) if s is not None]
    finally:
        slots.close()


def _read_committed(path: Path, aead: Aead) -> _State:
    """The state of the store at *path* as committed, read-only (its own connection)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _load_state(conn, aead, _read_slots(path, aead))
    finally:
        conn.close()


def committed_state(path: Path, storage_key: bytes) -> tuple[StoreState, dict[str, int]]:
    """The chain head, boot and ledger of the store at *path* as committed, read without
    writing anything (tools, tests)."""
    st = _read_committed(path, storage_aead(storage_key))
    return StoreState(st.last_seq, st.digest, st.boot), dict(st.ledger)


#: The stores open in this process, by real path: a :class:`StoreReader` of the same
#: store reads the rows held in its state file from memory (what the slot says once it
#: is durable), not from the file.
_OPEN: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()


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
        self.stats = StoreStats()
        self._slots = _StateFile(path.with_name(path.name + STATE_SUFFIX), aead)
        try:
            self._db = _connect(path, self.limits.wal)
            self._db.executescript(SCHEMA)
            self._migrate()
            has_slots = self._slots.open()
            self._st = _load_state(self._db, aead, self._slots.states)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open record store {path}: {exc}") from exc
        except (InvalidTag, ValueError, KeyError, zlib.error) as exc:
            raise StoreError(f"record store {path}: its state is damaged or sealed with "
                             f"another storage key ({type(exc).__name__}: {exc})") from None
        self._slots_usable = has_slots
        self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        # the most a row of the records table (WITHOUT ROWID: an index B-tree) keeps on
        # its page: SQLite's ((usable - 12) * 64 / 255) - 23, less the key and header
        self._row_local_bytes = (self._page_size - 12) * 64 // 255 - 23 - ROW_OVERHEAD
        self._checkpoint_frames = max(1, self.limits.wal // 2 // (self._page_size + 24))
        self._commits_since_checkpoint = 0
        self._shm_fd: int | None = None  # the -shm file, for the WAL's frame count
        delivered = self._st.delivered
        self.state = self._bump_boot()
        self._preallocate_wal()
        if delivered:  # the broker took them before a kill: not sent again
            self.commit([], delete_ranges=delivered)
            log.info("record store %s: %d delivered ranges deleted at open", path,
                     len(delivered))
        self.usage = dict(self._st.usage)
        _OPEN[os.path.realpath(path)] = self
        if self.limits.reserve and not self.restore_reserve():
            log.warning("no room for the record store's reserve file %s (%d bytes) yet",
                        self.reserve_path, self.limits.reserve)

    def sealer(self, gateway_id: str, signing_key: Signer | None = None) -> Sealer:
        """A sealer that continues this store's chain (its last seq and digest, this boot)."""
        st = self.state
        return Sealer(gateway_id, signing_key, last_seq=st.last_seq, last_digest=st.last_digest,
                      boot=st.boot)

    def _migrate(self) -> None:
        """A store of the first schema: usage no longer kept by triggers (the writer
        counts), and the ``st`` column (an ALTER that rewrites no row)."""
        if not _has_st(self._db):
            log.warning("record store %s: migrating to the current schema (its queue is "
                        "kept)", self.path)
            with self._transaction():
                self._db.execute("ALTER TABLE records ADD COLUMN st BLOB")
                for statement in MIGRATE.split(";"):
                    if statement.strip():
                        self._db.execute(statement)

    def health(self) -> dict[str, dict[str, int]]:
        """Per class: records queued, bytes, age in seconds of the oldest (commit time)."""
        out: dict[str, dict[str, int]] = {}
        now = int(time.time())
        held, owed = self.held_and_owed()
        for prio, (count, size) in self.usage.items():
            if not count:
                continue
            at = _oldest_at(self._db, int(prio), held, owed)
            out[prio.label] = {"queued": count, "bytes": size,
                               "oldest_s": max(0, now - at) if at is not None else 0}
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
            after = 0
            while freed < target:
                rows = self._db.execute(
                    "SELECT seq, length(blob) FROM records WHERE prio=? AND seq>? "
                    "ORDER BY seq LIMIT 256", (int(prio), after),
                ).fetchall()
                if not rows:
                    break
                after = rows[-1][0]
                for seq, size in rows:
                    if _covers(self._st.owed, int(prio), seq):
                        continue  # delivered already: its deletion is owed
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
            return
        self._preallocate_wal()

    def _preallocate_wal(self) -> None:
        """Give the WAL its bound's blocks (allocated, not written: ``fallocate``), so
        that commits overwrite blocks of a file that keeps its size instead of
        appending to it. An append changes the file's size and its allocation, which
        the filesystem journals: on a loop-mounted ext4 (4 KiB blocks) a one-frame
        commit at home cadence cost the device 69 KB appended, 53 KB preallocated
        (``bench/sparse_commit.py --device``). SQLite reads
        frames up to the first one whose salt or checksum does not match, so blocks
        past the last frame are never read as frames, and ``journal_size_limit`` (the
        same bound) cuts the file back only when it is larger. Best effort: a
        filesystem with no room or no ``fallocate`` keeps SQLite's own growth."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return  # not created yet: SQLite creates it at the first write
        try:
            if os.fstat(fd).st_size < self.limits.wal:
                os.posix_fallocate(fd, 0, self.limits.wal)
        except OSError as exc:
            log.debug("WAL %s not preallocated: %s", wal, exc)
        finally:
            os.close(fd)

    def _bump_boot(self) -> StoreState:
        """Count this start, writing the whole state to the state row (and emptying
        the tables of a store from before it: they held the ledger in plain text)."""
        st = self._st
        st.boot += 1
        held, owed = st.held, st.owed
        st.held = st.owed = ()
        legacy = self._db.execute("SELECT count(*) FROM meta").fetchone()[0]
        with self._transaction():
            # what the state file held joins the table (its usage is counted already)
            self._db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, NULL)",
                                 held)
            self._delete_ranges(owed)
            self._write_full(st, st.txn + 1)
            if legacy:
                self._db.execute("DELETE FROM meta")
                self._db.execute("DELETE FROM device_events")
                self._db.execute("UPDATE usage SET count = 0, bytes = 0")
        self._full_written(st, st.txn + 1)
        st.carrier = None
        self.stats.commits += 1
        return StoreState(st.last_seq, st.digest, st.boot)

    def _delete_ranges(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        """Delete the table's rows in *ranges* ((class, first seq, last seq)); the caller
        keeps the usage counts."""
        self._db.executemany("DELETE FROM records WHERE prio=? AND seq BETWEEN ? AND ?",
                             ranges)

    def _write_full(self, st: _State, txn: int) -> None:
        """Write *st* (its ledger complete), numbered *txn*, to the state row."""
        self._db.execute("INSERT OR REPLACE INTO records VALUES (?, 0, 0, ?, NULL)",
                         (STATE_PRIO, _seal_state(self._aead, _IN_ROW, {**st.full(), "t": txn})))
        self.stats.table_writes += 1

    @staticmethod
    def _full_written(st: _State, txn: int) -> None:
        st.txn = st.base_txn = txn
        st.delta = {}

    def _transaction(self) -> _Txn:
        return _Txn(self._db)

    def device_ledger(self) -> dict[str, int]:
        """The ledger as committed (a copy)."""
        return dict(self._st.ledger)

    def commit(
        self,
        records: Iterable[SealedRecord],
        *,
        device_events: Mapping[str, int] | None = None,
        delete_ranges: Iterable[tuple[int, int, int]] = (),
        evict: Iterable[Evicted] = (),
        forget: Iterable[str] = (),
        maintain: bool = True,
        delivered: Iterable[tuple[int, int, int]] = (),
    ) -> None:
        """Insert, delete, evict and advance the chain state in one durable transaction;
        *forget* names ledger entries removed in it (an unpaired device's). Then, unless
        *maintain* is False (the writer calls :meth:`maintain` once it has acknowledged
        the devices), the WAL's checkpoint when due. *delivered*: ranges the broker took
        whose deletion waits; a commit of ledger entries alone (the state file) keeps
        them, so that the next open deletes them even after a kill."""
        sealed = list(records)
        ranges = list(delete_ranges)
        evicted = list(evict)
        gone = tuple(forget)
        events = dict(device_events or {})
        if not (sealed or ranges or evicted or gone or events):
            return
        old = self._st
        txn = old.txn + 1
        ledger = {**old.ledger, **events}
        for key in gone:
            ledger.pop(key, None)
        if (not (evicted or gone) and (sealed or not ranges)
                and all(r.priority in HOLDABLE for r in sealed)
                and self._commit_to_slot(old, txn, ledger, list(delivered), sealed=sealed,
                                         ranges=ranges)):
            return
        now = int(time.time())
        compress = len(sealed) <= ROW_COMPRESS_GROUP
        rows: list[tuple[int, int, int, bytes, bytes | None]] = [
            (int(r.priority), r.seq, now,
             self._seal_row(r.priority, r.seq, r.data, compress=compress), None)
            for r in sealed
        ]
        st = _State(old.txn, old.last_seq, old.digest, old.boot, dict(old.usage), ledger,
                    {**old.delta, **events}, old.carrier, old.base_txn, old.carrier_bytes)
        for key in gone:
            st.delta.pop(key, None)
        # the rows the state file held join the table, but those delivered meanwhile
        evicted_keys = {(e.prio, e.seq) for e in evicted}  # (rows the state file held, too)
        held = [h for h in old.held
                if not _covers(ranges, h.prio, h.seq) and (h.prio, h.seq) not in evicted_keys]
        for h in old.held:
            st.usage[_PRIO[h.prio]] = _less(st.usage, h.prio, 1, len(h.blob))
        for h in held:
            count, size = st.usage.get(_PRIO[h.prio], (0, 0))
            st.usage[_PRIO[h.prio]] = (count + 1, size + len(h.blob))
        with self._transaction():
            # deletions first: the inserts reuse the pages they free, so the file does
            # not grow past the quota within the transaction; the state file's owed
            # ones first (their usage is taken off already)
            self._delete_ranges(old.owed)
            if st.carrier is not None and _covers(old.owed, *st.carrier):
                st.carrier = None
            for prio, lo, hi in ranges:
                n, size = self._db.execute(
                    "SELECT count(*), coalesce(sum(length(blob)), 0) FROM records "
                    "WHERE prio=? AND seq BETWEEN ? AND ?", (prio, lo, hi)).fetchone()
                if n:
                    self._delete_ranges([(prio, lo, hi)])
                    st.usage[_PRIO[prio]] = _less(st.usage, prio, n, size)
                if st.carrier is not None and st.carrier[0] == prio and lo <= st.carrier[1] <= hi:
                    st.carrier = None
            if evicted:
                self._db.executemany("DELETE FROM records WHERE prio=? AND seq=?",
                                     [(e.prio, e.seq) for e in evicted])
                was_held = {(h.prio, h.seq) for h in old.held}
                for e in evicted:
                    if (e.prio, e.seq) in was_held:
                        continue  # its usage is off already (above)
                    st.usage[_PRIO[e.prio]] = _less(st.usage, e.prio, 1, e.size - ROW_OVERHEAD)
                    if st.carrier == (e.prio, e.seq):
                        st.carrier = None
            for prio, _seq, _at, blob, _st in rows:
                count, size = st.usage.get(_PRIO[prio], (0, 0))
                st.usage[_PRIO[prio]] = (count + 1, size + len(blob))
            rows = [(h.prio, h.seq, h.at, h.blob, None) for h in held] + rows
            if sealed:
                last = max(sealed, key=lambda r: r.seq)
                st.last_seq, st.digest = last.seq, last.digest
            full = bool(gone) or len(st.delta) > DELTA_MAX_ENTRIES or (
                not rows and st.carrier is None)
            newest = max(range(len(rows)), key=lambda i: rows[i][1]) if rows else -1
            carried = b""
            if not full:
                carried = self._carried(st, txn)
                row_bytes = len(rows[newest][3]) if rows else st.carrier_bytes
                # a delta that would push the carrier's row past what its page holds
                # (an overflow page: allocated, freed, the freelist in page 1: 5 WAL
                # frames measured at home) goes to the state row instead (one page)
                full = row_bytes + len(carried) > self._row_local_bytes
            if full:
                self._write_full(st, txn)
                st.base_txn, st.delta = txn, {}
                carried = self._carried(st, txn) if rows else b""
            if rows:
                prio, seq, at, blob, _ = rows[newest]
                rows[newest] = (prio, seq, at, blob, carried)
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
                st.carrier, st.carrier_bytes = (prio, seq), len(blob)
            elif not full and st.carrier is not None:
                self._db.execute("UPDATE records SET st=? WHERE prio=? AND seq=?",
                                 (carried, *st.carrier))
        st.txn = txn
        self.stats.commits += 1
        self._st = st
        self.state = StoreState(st.last_seq, st.digest, st.boot)
        self.usage = dict(st.usage)
        if maintain:
            self.maintain()

    def maintain(self) -> None:
        """The WAL's checkpoint when due, and its bound: after a commit, outside the time
        a device waits for its ACK (a checkpoint copies pages and fsyncs the database)."""
        self._checkpoint_if_due()
        self.bound_wal()

    def _carried(self, st: _State, txn: int) -> bytes:
        return _seal_state(self._aead, _IN_CARRIER, st.carried(txn))

    def _commit_to_slot(self, old: _State, txn: int, ledger: dict[str, int],
                        delivered: list[tuple[int, int, int]], *,
                        sealed: list[SealedRecord] | None = None,
                        ranges: list[tuple[int, int, int]] | None = None) -> bool:
        """Commit into the state file (one slot, fdatasynced) the whole state, numbered
        *txn*: ledger entries, *sealed* records of the holdable classes (they wait there,
        held, with those before them, until a commit to the database) and deletions of
        *ranges* (held rows leave at once; the table's are owed to the next commit to the
        database, their usage taken off now). False when the state file is not to be had,
        the held rows or owed ranges would pass their bounds, or the state does not fit a
        slot: the commit then goes to the database."""
        if not self._slots_usable:
            return False
        if len(old.held) + len(sealed or ()) > HELD_MAX_RECORDS:
            return False  # (before any row is sealed: a full-speed group goes on at once)
        usage = dict(old.usage)
        held = list(old.held)
        owed = list(old.owed)
        for prio, lo, hi in ranges or ():
            for gone in [h for h in held if _covers([(prio, lo, hi)], h.prio, h.seq)]:
                held.remove(gone)
                usage[_PRIO[prio]] = _less(usage, prio, 1, len(gone.blob))
            # the table's rows in it not owed already (a PUBACK may come twice)
            sizes = [n for q, n in self._db.execute(
                "SELECT seq, length(blob) FROM records WHERE prio=? AND seq BETWEEN ? AND ?",
                (prio, lo, hi)) if not _covers(owed, prio, q)]
            if sizes:
                usage[_PRIO[prio]] = _less(usage, prio, len(sizes), sum(sizes))
                owed.append((prio, lo, hi))
        last_seq, digest = old.last_seq, old.digest
        if sealed:
            compress = len(sealed) <= ROW_COMPRESS_GROUP
            now = int(time.time())
            for r in sealed:
                blob = self._seal_row(r.priority, r.seq, r.data, compress=compress)
                held.append(_Held(int(r.priority), r.seq, now, blob))
                count, size = usage.get(r.priority, (0, 0))
                usage[r.priority] = (count + 1, size + len(blob))
            last = max(sealed, key=lambda r: r.seq)
            last_seq, digest = last.seq, last.digest
        if (len(held) > HELD_MAX_RECORDS or sum(len(h.blob) for h in held) > HELD_MAX_BYTES
                or len(owed) > OWED_MAX_RANGES):
            return False
        st = _State(txn, last_seq, digest, old.boot, usage, ledger,
                    carrier=old.carrier, base_txn=txn, carrier_bytes=old.carrier_bytes,
                    delivered=delivered[:DELIVERED_MAX_RANGES], held=tuple(held),
                    owed=tuple(owed))
        blob = _seal_state(self._aead, _IN_SLOT, st.full())
        if not self._slots.fits(blob):
            return False
        try:
            self._slots.write(txn, blob)
        except OSError as exc:
            failure: OSError | None = exc
        else:
            failure = None
        if failure is not None:
            # the older slot may be torn: the newer one and the database still hold the
            # state before; from now on every commit goes to the database
            log.error("record store state file %s: %s; its commits go to the database",
                      self._slots.path, failure)
            self._slots_usable = False
            return False
        self.stats.commits += 1
        self.stats.slot_writes += 1
        self.stats.held_records += len(sealed or ())
        self._st = st
        if sealed or ranges:
            self.state = StoreState(st.last_seq, st.digest, st.boot)
            self.usage = dict(st.usage)
        return True

    def _wal_frames(self) -> int | None:
        """Frames in the WAL (the wal-index header's mxFrame), None if unreadable.

        The ``-shm`` file is opened once and closed only after the database connection
        (:meth:`close`): SQLite's locks on it are POSIX record locks, which belong to the
        process and are all released when the process closes *any* descriptor of the
        file. An open and close here at each commit dropped the daemon's locks (the
        "dead man switch" byte and the WAL's read and write locks): another process
        opening the store (``status``, ``diag``, ``provision decommission``) then took
        the wal-index for abandoned and truncated it under the daemon's mapping of it,
        which ended the daemon with SIGBUS (a stress run of the installer flow)."""
        fd = self._shm_fd
        if fd is None:
            try:
                fd = os.open(self.path.with_name(self.path.name + "-shm"),
                             os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self._shm_fd = fd
        try:
            head = os.pread(fd, _SHM_MXFRAME.size, _SHM_MXFRAME_OFFSET)
        except OSError:
            return None
        return _SHM_MXFRAME.unpack(head)[0] if len(head) == _SHM_MXFRAME.size else None

    def _checkpoint_if_due(self) -> None:
        """Checkpoint (passive: never waits for a reader) once the WAL holds half its
        bound."""
        self._commits_since_checkpoint += 1
        frames = self._wal_frames()
        if frames is None:
            due = self._commits_since_checkpoint >= CHECKPOINT_FALLBACK_COMMITS
        else:
            due = frames >= self._checkpoint_frames
        if not due:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("checkpoint of %s failed: %s", self.path, exc)
            return
        self.stats.checkpoints += 1
        self._commits_since_checkpoint = 0

    def _seal_row(self, prio: int, seq: int, data: bytes, *, compress: bool = True) -> bytes:
        if compress and len(data) >= ROW_COMPRESS_MIN:
            packed = zlib.compress(data, 6)
            if len(packed) * 5 <= len(data) * 4:  # a fifth saved at least
                data = packed
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, _aad(prio, seq))

    def close(self) -> None:
        """Write the whole state if the newest record holds a newer delta (the next open
        reads one place), then close."""
        st = self._st
        if st.txn > st.base_txn:
            try:
                with self._transaction():
                    self._write_full(st, st.txn + 1)
                self._full_written(st, st.txn + 1)
                self.stats.commits += 1
            except sqlite3.Error as exc:  # the newest record keeps it: nothing is lost
                log.warning("record store %s: state not written at close: %s", self.path, exc)
        if _OPEN.get(os.path.realpath(self.path)) is self:
            del _OPEN[os.path.realpath(self.path)]
        self._slots.close()
        self._db.close()
        if self._shm_fd is not None:  # after the connection: see _wal_frames
            os.close(self._shm_fd)
            self._shm_fd = None

    def held_and_owed(self) -> tuple[tuple[_Held, ...], tuple[tuple[int, int, int], ...]]:
        """The rows held in the state file and the table's ranges owed a deletion, as
        committed (any thread: the state is replaced whole by each commit)."""
        st = self._st
        return st.held, st.owed


def _less(usage: Mapping[Priority, tuple[int, int]], prio: int, count: int,
          size: int) -> tuple[int, int]:
    have_count, have_size = usage.get(_PRIO[prio], (0, 0))
    return have_count - count, have_size - size


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
    """A read connection (the forwarder's): decrypts queued records in delivery order.

    Queued records are the table's rows, less those whose deletion is owed, and the
    rows held in the state file: from memory when the store is open in this process
    (the daemon's forwarder), else from the state file's newest valid slot (a tool, a
    test reading a store another process writes; a slot read there may be one not yet
    fdatasynced)."""

    def __init__(self, path: Path, storage_key: bytes) -> None:
        self.path = path
        self._aead = storage_aead(storage_key)
        self._db = _connect(path)
        self._real = os.path.realpath(path)

    def _held_and_owed(self) -> tuple[tuple[_Held, ...], tuple[tuple[int, int, int], ...]]:
        store = _OPEN.get(self._real)
        if store is not None:
            return store.held_and_owed()
        slots = _read_slots(self.path, self._aead)
        if not any("hr" in slot or "ow" in slot for slot in slots):
            return (), ()
        self._db.execute("BEGIN")
        try:
            st = _load_state(self._db, self._aead, slots)
        finally:
            self._db.execute("COMMIT")
        return st.held, st.owed

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
        held, owed = self._held_and_owed()
        for prio in Priority:
            cursor = after.get(prio, 0)
            rows, more = _queued_rows(self._db, int(prio), cursor, limit, owed)
            found = dict(rows)
            for h in held:  # above the table's seqs (one also in the table: just moved)
                if h.prio == prio and h.seq > cursor and not (more and h.seq > rows[-1][0]):
                    found.setdefault(h.seq, h.blob)
            if not found:
                continue
            out: list[tuple[int, bytes]] = []
            size = 0
            for seq in sorted(found)[:limit]:
                data = self.open_row(int(prio), seq, found[seq])
                size += len(data)
                if out and size > max_bytes:
                    break
                out.append((seq, data))
            return prio, out
        return None

    def open_row(self, prio: int, seq: int, blob: bytes) -> bytes:
        data = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(prio, seq))
        if data[:1] != b"{":  # compressed (Store._seal_row): a record's bytes begin with {
            data = zlib.decompress(data)
        return data

    def lowest_seq(self) -> int | None:
        """The lowest seq still queued in any class (None: nothing queued): every record
        below it has left the store (delivered, or evicted with a ``gap`` record). One
        lookup per class on the primary key."""
        return _lowest_seq(self._db, *self._held_and_owed())

    def depth(self) -> dict[str, int]:
        held, owed = self._held_and_owed()
        counts = dict(self._db.execute("SELECT prio, COUNT(*) FROM records WHERE prio >= 0 "
                                       "GROUP BY prio").fetchall())
        for prio in {p for p, _, _ in owed}:
            counts[prio] = counts.get(prio, 0) - len(_owed_seqs(self._db, prio, owed))
        for h in held:
            counts[h.prio] = counts.get(h.prio, 0) + 1
        return {Priority(p).label: n for p, n in sorted(counts.items()) if n > 0}

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
        for h in self._held_and_owed()[0]:
            if newest is None or h.seq > newest[0]:
                newest = (h.seq, h.prio, h.blob)
        return None if newest is None else self.open_row(newest[1], newest[0], newest[2])

    def close(self) -> None:
        self._db.close()


def _queued_rows(db: sqlite3.Connection, prio: int, after: int, limit: int,
                 owed: Iterable[tuple[int, int, int]]) -> tuple[list[tuple[int, bytes]], bool]:
    """Up to *limit* rows (seq, blob) of class *prio* above *after* in the table, less
    those whose deletion is owed (skipped a page at a time), and whether the table may
    have more above them."""
    owed = [r for r in owed if r[0] == prio]
    while True:
        rows = db.execute(
            "SELECT seq, blob FROM records WHERE prio=? AND seq>? ORDER BY seq LIMIT ?",
            (prio, after, limit)).fetchall()
        out = [(int(q), bytes(b)) for q, b in rows if not _covers(owed, prio, q)]
        if out or len(rows) < limit:
            return out, len(rows) == limit
        after = rows[-1][0]


def _first_queued(db: sqlite3.Connection, prio: int, after: int,
                  owed: Iterable[tuple[int, int, int]], column: str = "seq"
                  ) -> tuple[int] | None:
    """(*column*,) of the first row of class *prio* above *after* not owed a deletion."""
    owed = [r for r in owed if r[0] == prio]
    while True:
        row = db.execute(f"SELECT seq, {column} FROM records WHERE prio=? AND seq>? "  # noqa: S608
                         "ORDER BY seq LIMIT 1", (prio, after)).fetchone()
        if row is None:
            return None
        if not _covers(owed, prio, row[0]):
            return (int(row[1]),)
        after = max(hi for p, lo, hi in owed if lo <= row[0] <= hi)


def _oldest_at(db: sqlite3.Connection, prio: int, held: Iterable[_Held],
               owed: Iterable[tuple[int, int, int]]) -> int | None:
    """The commit time of the oldest queued record of class *prio*: the table's first row
    not owed a deletion, else the first held in the state file (None: none)."""
    row = _first_queued(db, prio, 0, owed, "at")
    if row is not None:
        return row[0]
    return next((h.at for h in held if h.prio == prio), None)


def _lowest_seq(db: sqlite3.Connection, held: Iterable[_Held] = (),
                owed: Iterable[tuple[int, int, int]] = ()) -> int | None:
    owed = list(owed)
    lowest: int | None = None
    for prio in Priority:
        row = _first_queued(db, int(prio), 0, owed)
        if row is not None and (lowest is None or row[0] < lowest):
            lowest = row[0]
    for h in held:
        if lowest is None or h.seq < lowest:
            lowest = h.seq
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


def _count_queued(conn: sqlite3.Connection, st: _State, prio: int, through: int) -> int:
    """Records of class *prio* queued with seq up to *through*: the table's, less those
    owed a deletion, and those held in the state file."""
    count = int(conn.execute("SELECT COUNT(*) FROM records WHERE prio=? AND seq<=?",
                             (prio, through)).fetchone()[0])
    count -= len(_owed_seqs(conn, prio, st.owed, through))
    return count + sum(1 for h in st.held if h.prio == prio and h.seq <= through)


def _owed_seqs(conn: sqlite3.Connection, prio: int, owed: Iterable[tuple[int, int, int]],
               through: int | None = None) -> set[int]:
    """The seqs of the table's rows of class *prio* whose deletion is owed (up to
    *through*); owed ranges may overlap."""
    out: set[int] = set()
    for p, lo, hi in owed:
        if p == prio:
            top = hi if through is None else min(hi, through)
            out.update(q for (q,) in conn.execute(
                "SELECT seq FROM records WHERE prio=? AND seq BETWEEN ? AND ?", (p, lo, top)))
    return out


def undelivered(path: Path, through: int | None = None, ledger_key: str | None = None
                ) -> Undelivered:
    """Read-only (the daemon may be running), without the store's key: the records still
    queued with seq up to *through* (all when None), per class, and the ledger entry
    *ledger_key* (e.g. the seq of the final record). A record leaves the store only once
    the broker acknowledged it (or when evicted, which a ``gap`` record names)."""
    if ledger_key is not None and not ledger_key.startswith(CLEAR_LEDGER_PREFIX):
        raise ValueError(f"ledger entry {ledger_key!r} is sealed with the storage key: "
                         f"without it only {CLEAR_LEDGER_PREFIX}* entries can be read")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("BEGIN")  # one snapshot for the state and the counts
        st = _load_state(conn, None, _read_slots(path, None))
        if through is None or through >= st.last_seq:
            # everything queued: the state's counts, no scan
            rows = [(int(p), c) for p, (c, _) in st.usage.items()]
        else:
            rows = [(int(p), _count_queued(conn, st, int(p), through)) for p in Priority]
        entry = None if ledger_key is None else st.ledger.get(ledger_key)
        queued = None
        if entry is not None:
            queued = any(h.seq == entry for h in st.held) or any(
                conn.execute("SELECT 1 FROM records WHERE prio=? AND seq=?",
                             (int(p), entry)).fetchone() and not _covers(st.owed, int(p), entry)
                for p in Priority)
        return Undelivered({Priority(p).label: n for p, n in rows if n},
                           _lowest_seq(conn, st.held, st.owed), st.last_seq, entry, queued)
    finally:
        conn.close()


def inspect_store(path: Path) -> dict[str, Any]:
    """What a technician asks of a store, read-only (the daemon may be running), without
    its key: last seq, boot count, per class the queued records, their bytes and the age
    of the oldest, the files on disk, and SQLite's quick check."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("BEGIN")  # one snapshot for the state and the counts
        st = _load_state(conn, None, _read_slots(path, None))
        now = int(time.time())
        classes: dict[str, Any] = {}
        for prio, (count, size) in sorted(st.usage.items()):
            at = _oldest_at(conn, int(prio), st.held, st.owed)
            classes[Priority(prio).label] = {
                "queued": count, "bytes": size, "oldest_s": None if at is None else now - at,
                "in_state_file": sum(1 for h in st.held if h.prio == prio)}
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    return {
        "last_seq": st.last_seq, "boot": st.boot,
        "classes": classes, "integrity": integrity,
        "files": {p.name: p.stat().st_size for p in path.parent.glob(f"{path.name}*")},
    }
