#!/usr/bin/env python3
"""What one commit of the record store costs the disk at a home's rates (issue 15).

At a home the store commits about every half minute: a fix, a health record, an
interval. That is longer than the kernel keeps a dirty page before writing it back
(``vm.dirty_expire_centisecs``, 30 s), so every commit dirties its pages afresh: the
WAL's frame, the wal-index's pages and, when the WAL grows, its size and allocation.
This bench reproduces that with the product's ``buffer.store.Store``: one record per
commit (a real sealed fix-sized record), the previous one's deletion riding in it, and
``sync`` between commits so that each starts from clean pages. It reports, per commit:

* ``write_bytes``: the process's ``/proc/self/io`` ``write_bytes``, what the page cache
  accounts. On kernels whose ext4 keeps large folios (6.16 and later) a small write into
  a large folio is accounted as the whole folio, so this can overstate what reaches the
  card; on a Raspberry Pi's kernel it counts 4 KiB pages;
* ``device_bytes`` (with ``--device NAME``, e.g. ``loop0`` when the work directory is
  on a loop-mounted image): sectors written to that block device, the filesystem's
  journal included — what the card receives. Nothing else may write to it meanwhile.

Variants, each a fresh store: ``product`` (as shipped: the WAL preallocated to its
bound), ``wal_grows`` (the WAL left to grow by appends, as before 1 Dec) and, for
reference only, ``exclusive`` (``PRAGMA locking_mode=EXCLUSIVE``: SQLite keeps the
wal-index in memory, but then no other connection — the forwarder's, the tools' — can
read the store).

    python bench/sparse_commit.py [--commits N] [--workdir DIR] [--device loop0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import buffer.store as store_mod  # noqa: E402
from bench.store_variants import write_bytes  # noqa: E402
from buffer.seal import Sealer  # noqa: E402
from buffer.store import Store  # noqa: E402
from core.clock import Clock  # noqa: E402
from core.kinds import Priority  # noqa: E402
from core.record import GENESIS_PREV, Reading, SealedRecord, Source  # noqa: E402
from core.suites import ED25519, SoftwareKey  # noqa: E402


def device_bytes(device: str | None) -> int:
    if device is None:
        return 0
    fields = Path(f"/sys/block/{device}/stat").read_text().split()
    return int(fields[6]) * 512  # sectors written


def fix_record() -> bytes:
    source = Source("gnss", "gps0", "u-blox 8")
    body = {"lat_e7": 455088120, "lon_e7": -735875310, "alt_dm": 521, "hdop_x10": 9,
            "sats": 11, "fix": "3d", "utc": "2026-12-01T08:00:00Z"}
    reading = Reading("gnss.fix", source, body, 0)
    sealer = Sealer("gw-bench-0001", SoftwareKey.generate(ED25519), last_seq=0,
                    last_digest=GENESIS_PREV, boot=1)
    return sealer.seal(reading, Clock().timestamp(0)).data


@contextmanager
def variant(name: str) -> Iterator[None]:
    """The product's Store, changed for this variant only while it is opened."""
    if name == "product":
        yield
        return
    if name == "wal_grows":
        saved = Store._preallocate_wal
        Store._preallocate_wal = lambda self: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            Store._preallocate_wal = saved  # type: ignore[method-assign]
        return
    if name == "exclusive":
        connect = store_mod._connect

        def exclusive(path: Path, wal_bytes: int = store_mod.WAL_MAX_BYTES
                      ) -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.close()
            conn = connect(path, wal_bytes)
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            return conn

        store_mod._connect = exclusive  # type: ignore[assignment]
        try:
            yield
        finally:
            store_mod._connect = connect  # type: ignore[assignment]
        return
    raise ValueError(name)


def run(name: str, workdir: Path, commits: int, device: str | None,
        data: bytes) -> dict[str, Any]:
    path = workdir / f"{name}.db"
    with variant(name):
        store = Store(path, os.urandom(32))
    try:
        seq = store.state.last_seq
        wb = dev = 0
        for i in range(commits):
            os.sync()
            w0, d0 = write_bytes(), device_bytes(device)
            seq += 1
            record = SealedRecord(seq, Priority.POSITION, "gnss.fix", data, b"\0" * 32)
            ranges = [(int(Priority.POSITION), seq - 1, seq - 1)] if i else []
            store.commit([record], delete_ranges=ranges)
            os.sync()
            wb += write_bytes() - w0
            dev += device_bytes(device) - d0
        wal = path.with_name(path.name + "-wal").stat().st_size
    finally:
        store.close()
        for p in workdir.glob(f"{name}.db*"):
            p.unlink()
    out: dict[str, Any] = {"commits": commits, "write_bytes_per_commit": wb / commits,
                           "wal_file_bytes": wal}
    if device is not None:
        out["device_bytes_per_commit"] = dev / commits
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=60)
    parser.add_argument("--workdir", type=Path, help="a directory on the disk to measure "
                        "(default: a temporary one under /var/tmp)")
    parser.add_argument("--device", help="a block device under /sys/block whose sectors "
                        "written to count (the workdir's, nothing else writing to it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device and not Path(f"/sys/block/{args.device}/stat").exists():
        parser.error(f"no block device {args.device!r} under /sys/block")
    if args.commits < 1:
        parser.error("--commits: at least 1")
    data = fix_record()
    results: dict[str, Any] = {"record_bytes": len(data), "variants": {}}
    base = args.workdir or Path("/var/tmp")  # noqa: S108 - a random name, 0700, below
    with tempfile.TemporaryDirectory(prefix="smartcorr-sparse-", dir=base) as tmp:
        for name in ("product", "wal_grows", "exclusive"):
            print(f"[sparse] {name}: {args.commits} commits, sync between ...",
                  file=sys.stderr, flush=True)
            res = run(name, Path(tmp), args.commits, args.device, data)
            results["variants"][name] = res
            line = f"    write_bytes {res['write_bytes_per_commit']:,.0f} B per commit"
            if "device_bytes_per_commit" in res:
                line += f", device {res['device_bytes_per_commit']:,.0f} B per commit"
            print(line, file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
