"""A record store on TinyDB's default storage, for comparison with ``buffer.store`` only.

DESIGN.md section 3 asks us to measure candidates before choosing. This is the
TinyDB candidate, duck-typed to what :class:`buffer.writer.StoreWriter` and
:class:`uplink.forwarder.Forwarder` call (``state``, ``quota_bytes``,
``device_ledger``, ``plan_eviction``, ``used_bytes``, ``commit``; and
``next_batch``), with the same AES-GCM rows, so the pipeline around it is the
product's own.

It is TinyDB's *best* case: a group commit is one read-modify-write of the
whole JSON file through ``JSONStorage`` (which writes, flushes, fsyncs and
truncates in place: not atomic, a crash mid-write leaves a truncated file).
TinyDB's table API would rewrite the file once per operation (the insert, the
delete, each meta update), several times per group. Reads go through the table
API (``search``), which parses the whole file each time. One lock serialises the
writer's and the forwarder's use of the single file handle: JSONStorage is not
safe to share between threads, and a second handle could read a half-written
file.

Not product code: nothing outside ``bench/`` imports it.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tinydb import TinyDB, where

from buffer.store import NONCE_BYTES, Evicted, StoreState, _aad
from core.kinds import Priority
from core.record import GENESIS_PREV, SealedRecord
from core.suites import storage_aead

RECORDS = "records"
META = "meta"
DEVICES = "device_events"


def _doc_id(prio: int, seq: int) -> str:
    # seq is unique per gateway; the class rides along so ids never collide
    return str(seq * 8 + prio)


class TinyStore:
    """The writer's side, on one TinyDB file (JSONStorage, the default)."""

    def __init__(self, path: Path, storage_key: bytes, *, quota_bytes: int | None = None) -> None:
        if quota_bytes is not None:
            raise ValueError("the TinyDB candidate has no quota")
        self.quota_bytes = None
        self.path = path
        self.lock = threading.Lock()
        self.db = TinyDB(path)  # storage=JSONStorage
        self._aead = storage_aead(storage_key)
        with self.lock:
            data = self.db.storage.read() or {}
            meta = data.get(META, {})
            last_seq = int(meta.get("1", {}).get("last_seq", 0))
            digest_text = meta.get("1", {}).get("last_digest")
            digest = base64.b64decode(digest_text) if digest_text else GENESIS_PREV
            boot = int(meta.get("1", {}).get("boot", 0)) + 1
            data.setdefault(RECORDS, {})
            data.setdefault(DEVICES, {})
            data[META] = {"1": {"last_seq": last_seq, "last_digest": base64.b64encode(digest)
                                .decode(), "boot": boot}}
            self.db.storage.write(data)
        self.state = StoreState(last_seq, digest, boot)
        self.used_bytes = 0

    def device_ledger(self) -> dict[str, int]:
        with self.lock:
            data = self.db.storage.read() or {}
        return {d["serial"]: d["last_event"] for d in data.get(DEVICES, {}).values()}

    def plan_eviction(self, incoming_bytes: int) -> list[Evicted]:
        del incoming_bytes
        return []

    def health(self) -> dict[str, dict[str, int]]:
        return {}

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
        """One whole-file rewrite (and fsync) per group: inserts, deletes, chain state,
        ledger entries *forget* names removed (*maintain*, *delivered*: the SQLite store's
        own; a whole-file rewrite has no WAL to checkpoint and deletes in every group)."""
        sealed = list(records)
        now = int(time.time())
        new_docs = {
            _doc_id(int(r.priority), r.seq): {
                "prio": int(r.priority), "seq": r.seq, "at": now,
                "blob": base64.b64encode(self._seal_row(int(r.priority), r.seq, r.data))
                .decode("ascii"),
            }
            for r in sealed
        }
        gone = [_doc_id(p, s) for p, lo, hi in delete_ranges for s in range(lo, hi + 1)]
        gone += [_doc_id(e.prio, e.seq) for e in evict]
        with self.lock:
            data = self.db.storage.read() or {}
            table = data.setdefault(RECORDS, {})
            table.update(new_docs)
            for key in gone:
                table.pop(key, None)
            if device_events:
                devices = data.setdefault(DEVICES, {})
                for serial, event in device_events.items():
                    devices[serial] = {"serial": serial, "last_event": event}
            for key in forget:
                data.get(DEVICES, {}).pop(key, None)
            if sealed:
                last = max(sealed, key=lambda r: r.seq)
                data[META]["1"].update(last_seq=last.seq,
                                       last_digest=base64.b64encode(last.digest).decode())
            self.db.storage.write(data)
        if sealed:
            last = max(sealed, key=lambda r: r.seq)
            self.state = StoreState(last.seq, last.digest, self.state.boot)

    def maintain(self) -> None:
        """Nothing: a TinyDB file has no WAL to checkpoint."""

    def _seal_row(self, prio: int, seq: int, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, _aad(prio, seq))

    def close(self) -> None:
        self.db.close()


class TinyReader:
    """The forwarder's side: the table API over the same TinyDB (and its lock)."""

    def __init__(self, store: TinyStore, storage_key: bytes) -> None:
        self._store = store
        self._aead = storage_aead(storage_key)
        # cache_size=0: the writer writes through the storage, not this table
        self._table = store.db.table(RECORDS, cache_size=0)

    def next_batch(
        self, after: Mapping[Priority, int], limit: int, max_bytes: int
    ) -> tuple[Priority, list[tuple[int, bytes]]] | None:
        for prio in Priority:
            cursor = after.get(prio, 0)
            with self._store.lock:
                docs: list[Any] = self._table.search(
                    (where("prio") == int(prio)) & (where("seq") > cursor)
                )
            if not docs:
                continue
            docs.sort(key=lambda d: d["seq"])
            out: list[tuple[int, bytes]] = []
            size = 0
            for doc in docs[:limit]:
                blob = base64.b64decode(doc["blob"])
                data = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                          _aad(int(prio), doc["seq"]))
                size += len(data)
                if out and size > max_bytes:
                    break
                out.append((doc["seq"], data))
            return prio, out
        return None

    def depth(self) -> dict[str, int]:
        with self._store.lock:
            docs = self._table.all()
        out: dict[str, int] = {}
        for d in docs:
            label = Priority(d["prio"]).label
            out[label] = out.get(label, 0) + 1
        return out

    def close(self) -> None:
        pass
