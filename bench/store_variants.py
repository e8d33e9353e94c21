#!/usr/bin/env python3
"""Storage-only experiments behind the suggestions in bench/README.md (issue 4).

The product's ``buffer.store.Store`` against variants of the same SQLite store, built
here only (product code untouched), on three workloads:

- ``low_rate``: one record per commit, its deletion (after PUBACK) in a commit of its
  own: what a home gateway does at tens of readings per second;
- ``linger_5``: the same rate, but the writer lingers ~100 ms: 5 records per commit, and
  the deletions of earlier PUBACKs ride in that commit (a suggested change);
- ``riding_1``: one record per commit, the deletion of the previous one riding in it:
  what the writer does now at 1 reading/s (no linger, deletions wait 2 s). With SQLite's
  WAL its floor is one frame (4096 + 24 bytes) per commit, i.e. two 4 KiB pages dirtied;
- ``grouped``: 1000 inserts and 1000 deletions of the oldest per commit (full speed);
- ``drain_delete``: deleting a deep queue, 200 keys per PUBACKed batch, 100 batches per
  commit (what the writer does while a backlog drains).

Each reports microseconds and disk bytes written (/proc/self/io) per record. Records
are one real sealed record's bytes under fresh seqs, AES-GCM encrypted per row as in
the product; no signing (that is the same for every variant).

    python bench/store_variants.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from buffer.seal import Sealer  # noqa: E402
from buffer.store import Store  # noqa: E402
from buffer.writer import seq_ranges  # noqa: E402
from core.clock import Clock  # noqa: E402
from core.kinds import Priority  # noqa: E402
from core.record import (  # noqa: E402
    GENESIS_PREV,
    Reading,
    SealedRecord,
    Source,
)
from core.suites import ED25519, SoftwareKey  # noqa: E402

PRIO = int(Priority.POSITION)
_AAD = struct.Struct(">4sBQ")


def write_bytes() -> int:
    with Path("/proc/self/io").open() as f:
        for line in f:
            if line.startswith("write_bytes"):
                return int(line.split(":")[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


@dataclass(frozen=True)
class Variant:
    name: str
    page_size: int = 4096
    autocheckpoint: int = 1000  # pages (SQLite's default)
    range_deletes: bool = False  # DELETE ... seq BETWEEN lo AND hi, per contiguous run
    state_row: bool = False  # usage + chain state + device ledger in one row, no triggers


class VariantStore:
    """The product's store layout and transaction, with the variant's changes."""

    def __init__(self, path: Path, key: bytes, v: Variant) -> None:
        self.v = v
        self.aead = AESGCM(key)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA page_size={v.page_size}")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={v.autocheckpoint}")
        self.db.executescript("""
            CREATE TABLE records (prio INTEGER NOT NULL, seq INTEGER NOT NULL,
                at INTEGER NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (prio, seq)) WITHOUT ROWID;
            CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
            CREATE TABLE device_events (serial TEXT PRIMARY KEY, last_event INTEGER NOT NULL)
                WITHOUT ROWID;
            CREATE TABLE usage (prio INTEGER PRIMARY KEY, count INTEGER NOT NULL,
                bytes INTEGER NOT NULL);
            INSERT INTO usage VALUES (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0);
            CREATE TABLE state (id INTEGER PRIMARY KEY, v BLOB NOT NULL);
            INSERT INTO state VALUES (1, x'');
        """)
        if not v.state_row:
            self.db.executescript("""
                CREATE TRIGGER records_in AFTER INSERT ON records BEGIN
                    UPDATE usage SET count = count + 1, bytes = bytes + length(NEW.blob)
                    WHERE prio = NEW.prio;
                END;
                CREATE TRIGGER records_out AFTER DELETE ON records BEGIN
                    UPDATE usage SET count = count - 1, bytes = bytes - length(OLD.blob)
                    WHERE prio = OLD.prio;
                END;
            """)
        self.usage = {p: [0, 0] for p in range(5)}

    def commit(self, records: list[SealedRecord], *, device_events: dict[str, int],
               deletes: Iterable[tuple[int, int]] = ()) -> None:
        now = int(time.time())
        rows = []
        for r in records:
            nonce = os.urandom(12)
            blob = nonce + self.aead.encrypt(nonce, r.data, _AAD.pack(b"SCR1", r.priority, r.seq))
            rows.append((int(r.priority), r.seq, now, blob))
        dels = list(deletes)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        if rows:
            db.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
        if dels:
            if self.v.range_deletes:
                by_prio: dict[int, list[int]] = {}
                for p, s in dels:
                    by_prio.setdefault(p, []).append(s)
                for p, seqs in by_prio.items():
                    for lo, hi in seq_ranges(seqs):
                        if self.v.state_row:
                            n, size = db.execute(
                                "SELECT count(*), coalesce(sum(length(blob)), 0) FROM records "
                                "WHERE prio=? AND seq BETWEEN ? AND ?", (p, lo, hi)).fetchone()
                            self.usage[p][0] -= n
                            self.usage[p][1] -= size
                        db.execute("DELETE FROM records WHERE prio=? AND seq BETWEEN ? AND ?",
                                   (p, lo, hi))
            else:
                db.executemany("DELETE FROM records WHERE prio=? AND seq=?", dels)
        if self.v.state_row:
            for p, _seq, _at, blob in rows:
                self.usage[p][0] += 1
                self.usage[p][1] += len(blob)
            last = records[-1] if records else None
            state = json.dumps({"usage": self.usage, "devices": device_events,
                                "last_seq": last.seq if last else None}).encode()
            db.execute("UPDATE state SET v=? WHERE id=1", (state,))
        else:
            if records:
                last = max(records, key=lambda r: r.seq)
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               [("last_seq", str(last.seq).encode()),
                                ("last_digest", last.digest)])
            if device_events:
                db.executemany("INSERT OR REPLACE INTO device_events VALUES (?, ?)",
                               list(device_events.items()))
            db.execute("SELECT prio, count, bytes FROM usage").fetchall()
        db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class AppendLog:
    """The floor of an append-only segment log (the issue's candidate), not a store: each
    commit appends its rows, deletion markers and a small state entry to one segment
    (zero-filled beforehand, as a recycled segment would be, so that an fdatasync need
    not change the file's size) and fdatasyncs. No index, no priority classes, no
    reader, no quota: only what every commit of such a log would write at the least."""

    SEGMENT = 16 * 1024 * 1024

    def __init__(self, path: Path, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # in 4 KiB writes: the page cache would keep larger writes as larger folios, and
        # the kernel counts (and writes back) a whole folio when a byte of it changes
        zeros = bytes(4096)
        for offset in range(0, self.SEGMENT, len(zeros)):
            os.pwrite(self.fd, zeros, offset)
        os.fsync(self.fd)
        self.offset = 0

    def commit(self, records: list[SealedRecord], *, device_events: dict[str, int],
               deletes: Iterable[tuple[int, int]] = ()) -> None:
        parts = []
        for r in records:
            nonce = os.urandom(12)
            blob = nonce + self.aead.encrypt(nonce, r.data, _AAD.pack(b"SCR1", r.priority, r.seq))
            parts.append(struct.pack(">BBQI", 1, int(r.priority), r.seq, len(blob)) + blob)
        parts += [struct.pack(">BBQ", 2, p, s) for p, s in deletes]
        parts.append(json.dumps(device_events).encode())
        data = b"".join(parts)
        if self.offset + len(data) > self.SEGMENT:
            self.offset = 0  # the next (recycled) segment
        os.pwrite(self.fd, data, self.offset)
        os.fdatasync(self.fd)
        self.offset += len(data)

    def close(self) -> None:
        os.close(self.fd)


class ProductStore:
    """buffer.store.Store itself, behind the same call."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.store = Store(path, key)

    def commit(self, records: list[SealedRecord], *, device_events: dict[str, int],
               deletes: Iterable[tuple[int, int]] = ()) -> None:
        keys = list(deletes)
        ranges = [(p, lo, hi) for p in {p for p, _ in keys}
                  for lo, hi in seq_ranges([s for q, s in keys if q == p])]
        self.store.commit(records, device_events=device_events, delete_ranges=ranges)

    def close(self) -> None:
        self.store.close()


VARIANTS = [
    Variant("same settings as product, bench copy"),
    Variant("wal_autocheckpoint=10000", autocheckpoint=10_000),
    Variant("page_size=2048", page_size=2048),
    Variant("range deletes", range_deletes=True),
    Variant("range deletes + one state row, no triggers", range_deletes=True, state_row=True),
    Variant("range deletes + state row + autocheckpoint 10000", range_deletes=True,
            state_row=True, autocheckpoint=10_000),
]


def template_record() -> bytes:
    source = Source("tag_receiver", "TR-BENCH-01", "1.4.2")
    body = {"tag": "T00001000", "counter": 1, "battery_pct": 90, "strap_closed": True,
            "body_contact": True, "rssi_dbm": -60, "dev_event": 1}
    reading = Reading("tag.presence", source, body, time.monotonic_ns())
    sealer = Sealer("gw-bench-0001", SoftwareKey.generate(ED25519), last_seq=0,
                    last_digest=GENESIS_PREV, boot=1)
    return sealer.seal(reading, Clock().timestamp(reading.mono_ns)).data


class Queue:
    """Drives one store: seqs go in at the top, deletions take the oldest."""

    def __init__(self, store: Any, template: bytes) -> None:
        self.store = store
        self.template = template
        self.last = 0
        self.oldest = 1
        self.event = 0

    def records(self, n: int) -> list[SealedRecord]:
        out = [SealedRecord(s, Priority.POSITION, "tag.presence", self.template, b"\0" * 32)
               for s in range(self.last + 1, self.last + n + 1)]
        self.last += n
        self.event += n
        return out

    def oldest_keys(self, n: int) -> list[tuple[int, int]]:
        keys = [(PRIO, s) for s in range(self.oldest, self.oldest + n)]
        self.oldest += n
        return keys

    def insert(self, n: int, deletes: int = 0) -> None:
        self.store.commit(self.records(n), device_events={"TR-BENCH-01": self.event},
                          deletes=self.oldest_keys(deletes) if deletes else ())

    def delete(self, keys: list[tuple[int, int]]) -> None:
        self.store.commit([], device_events={}, deletes=keys)


def measure(fn: Callable[[], int]) -> dict[str, float]:
    w0, t0 = write_bytes(), time.perf_counter()
    records = fn()
    return {"us_per_record": (time.perf_counter() - t0) / records * 1e6,
            "disk_bytes_per_record": (write_bytes() - w0) / records}


def run(make: Callable[[Path], Any], workdir: Path, template: bytes,
        sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    path = workdir / "low.db"
    q = Queue(make(path), template)
    q.insert(200)  # a short standing queue

    def low_rate() -> int:
        for _ in range(sizes["low"]):
            q.insert(1)
            q.delete(q.oldest_keys(1))
        return sizes["low"]

    out["low_rate"] = measure(low_rate)

    def lingered() -> int:
        # the same rate with a ~100 ms linger at 50 readings/s: 5 records per commit,
        # and the deletions of earlier PUBACKs ride in the same commit
        for _ in range(sizes["low"] // 5):
            q.insert(5, deletes=5)
        return sizes["low"] // 5 * 5

    out["linger_5"] = measure(lingered)

    def grouped() -> int:
        for _ in range(sizes["grouped_steps"]):
            q.insert(1000, deletes=1000)
        return sizes["grouped_steps"] * 1000

    out["grouped"] = measure(grouped)
    q.delete(q.oldest_keys(q.last - q.oldest))  # a home's queue: a record or two

    def riding() -> int:
        for _ in range(sizes["low"]):
            q.insert(1, deletes=1)
        return sizes["low"]

    out["riding_1"] = measure(riding)
    q.store.close()
    path = workdir / "drain.db"
    q = Queue(make(path), template)
    while q.last < sizes["depth"]:
        q.insert(5000)

    def drain() -> int:
        done = 0
        while done < sizes["drain"]:
            keys: list[tuple[int, int]] = []
            for _ in range(100):  # 100 PUBACKed batches of 200 per commit
                keys.extend(q.oldest_keys(200))
            q.delete(keys)
            done += len(keys)
        return done

    out["drain_delete"] = measure(drain)
    q.store.close()
    for p in workdir.iterdir():
        p.unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = ({"low": 200, "grouped_steps": 3, "depth": 30_000, "drain": 20_000} if args.quick
             else {"low": 3_000, "grouped_steps": 30, "depth": 200_000, "drain": 100_000})
    key = os.urandom(32)
    template = template_record()
    results: dict[str, Any] = {"record_bytes": len(template), "sizes": sizes, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="smartcorr-variants-") as tmp:
        workdir = Path(tmp)
        candidates: list[tuple[str, Callable[[Path], Any]]] = [
            ("product Store", lambda p: ProductStore(p, key))]
        candidates += [(v.name, lambda p, v=v: VariantStore(p, key, v)) for v in VARIANTS]
        candidates.append(("append-only log (floor, not a store)",
                           lambda p: AppendLog(p, key)))
        for name, make in candidates:
            print(f"[variants] {name} ...", file=sys.stderr, flush=True)
            res = run(make, workdir, template, sizes)
            results["variants"][name] = res
            print("    " + "  ".join(
                f"{w}: {r['us_per_record']:.0f} us, {r['disk_bytes_per_record']:.0f} B"
                for w, r in res.items()), file=sys.stderr, flush=True)
    workloads = ("low_rate", "linger_5", "riding_1", "grouped", "drain_delete")
    lines = [f"{'variant (us per record / disk bytes per record)':<50}"
             + "".join(f" {w:>18}" for w in workloads)]
    for name, res in results["variants"].items():
        lines.append(f"{name[:50]:<50}" + "".join(
            f" {res[w]['us_per_record']:>8.1f} /{res[w]['disk_bytes_per_record']:>7.0f}"
            for w in workloads))
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
