#!/usr/bin/env python3
"""Platform ingest benchmark: records verified and stored per second by one
:class:`central.ingest.Ingest`, on PostgreSQL and on SQLite (issue 10).

The records are sealed beforehand (``lab.chains.Chain``: one gateway, a ``key.session``
and then ``tag.presence`` records signed by its session key, Ed25519) and cut into
messages as the gateway's uplink does (at most ``BATCH_RECORDS`` records of one class a
message, each ending with its head statement). Each backend gets the same messages, in
order, through ``Ingest.ingest_messages``, ``--group`` messages a transaction as a
consumer with a backlog does (``--group 1``: one transaction a message): every record
verified (by the head covering its message, its own signature on a 1-in-32 sample:
docs/records.md, Transport), chained and stored once.

- PostgreSQL: a private server of this machine's binaries (``lab/postgres.py``, a fresh
  cluster on a loopback port, fsync on), over TCP on 127.0.0.1;
- SQLite: a file in a temporary directory (``central/db.py``'s settings).

Per backend: ``ingest_records_per_s`` (records / wall time of the ingest loop),
``cpu_us_per_record`` (this process's CPU, all threads) and, for PostgreSQL,
``server_cpu_us_per_record`` (the server's processes: postmaster and backends).

    python bench/ingest.py --json                  # 20,000 records per backend
    python bench/ingest.py --records 2000 --json   # a smoke run

Progress goes to stderr; with ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from central.consumer import MAX_BATCH_MESSAGES  # noqa: E402
from central.db import open_db  # noqa: E402
from central.ingest import Ingest  # noqa: E402
from core.record import Source, Timestamp  # noqa: E402
from core.topics import records_topic  # noqa: E402
from lab.chains import Chain  # noqa: E402
from lab.postgres import Postgres  # noqa: E402
from uplink.forwarder import BATCH_RECORDS  # noqa: E402

GATEWAY_ID = "gw-bench-0001"
TAG_SOURCE = Source("tag_receiver", "TR-BENCH-0001", "1.4.2")
TAGS = 8
#: Progress on stderr every this many seconds.
PROGRESS_S = 2.0
T0_MS = 1_760_000_000_000


def seal_messages(records: int, batch: int) -> tuple[Chain, list[bytes]]:
    """A chain of *records* records (its ``key.session`` first) and the messages that
    carry them: the session alone (class alarm), then batches of tag.presence."""
    chain = Chain(GATEWAY_ID)
    session = chain.start_session(Timestamp(T0_MS, "ntp", 1_000))
    messages = [chain.message([session.data], mono_ms=T0_MS)]
    current: list[bytes] = []
    for n in range(1, records):
        ts = Timestamp(T0_MS + 20 * n, "ntp", 1_000 + 20 * n)
        body: dict[str, Any] = {"tag": f"T{0x1000 + n % TAGS:08X}", "counter": n,
                                "battery_pct": 90, "strap_closed": True,
                                "body_contact": True, "rssi_dbm": -60, "dev_event": n}
        current.append(chain.seal("tag.presence", body, ts, TAG_SOURCE).data)
        if len(current) == batch:
            messages.append(chain.message(current, mono_ms=T0_MS + 20 * n))
            current = []
    if current:
        messages.append(chain.message(current, mono_ms=T0_MS + 20 * records))
    return chain, messages


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu_s(pg: Postgres) -> float:
    """CPU of the postmaster and its children (the backends) so far, from /proc."""
    try:
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        pid, ppid = int(stat.parent.name), int(fields[1])
        if postmaster in (pid, ppid):
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _progress(label: str, messages: list[bytes]) -> Iterator[bytes]:
    last = start = time.monotonic()
    for i, msg in enumerate(messages, start=1):
        yield msg
        now = time.monotonic()
        if now - last >= PROGRESS_S:
            last = now
            print(f"ingest bench: {label}: {i}/{len(messages)} messages, "
                  f"{now - start:.0f} s", file=sys.stderr)


def _groups(messages: Iterator[bytes], group: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for msg in messages:
        batch.append(msg)
        if len(batch) == group:
            yield batch
            batch = []
    if batch:
        yield batch


def run_backend(label: str, url: str, chain: Chain, messages: list[bytes],
                records: int, *, group: int = 1,
                pg: Postgres | None = None) -> dict[str, Any]:
    print(f"ingest bench: {label}: {records} records in {len(messages)} messages",
          file=sys.stderr)
    topic = records_topic(GATEWAY_ID)
    with open_db(url) as db:
        ingest = Ingest(db)
        ingest.enrol(chain.registration)
        stored = 0
        server0 = _server_cpu_s(pg) if pg is not None else 0.0
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        for batch in _groups(_progress(label, messages), group):
            stored += sum(r.stored for r in ingest.ingest_messages([(topic, m) for m in batch]))
        wall, cpu = time.perf_counter() - wall0, _cpu_s() - cpu0
        server = _server_cpu_s(pg) - server0 if pg is not None else 0.0
        with db.transaction() as tx:
            row = tx.one("SELECT COUNT(*) FROM records WHERE gw = ?", (GATEWAY_ID,))
    in_db = int(row[0]) if row else 0
    if stored != records or in_db != records:
        raise SystemExit(f"ingest bench: {label}: {stored} records stored ({in_db} in the "
                         f"database) of {records}: the ingest refused some")
    out: dict[str, Any] = {
        "ingest_records_per_s": round(records / wall, 1),
        "cpu_us_per_record": round(cpu / records * 1e6, 1),
        "seconds": round(wall, 2),
        "stored": in_db,
    }
    if pg is not None:
        out["server_cpu_us_per_record"] = round(server / records * 1e6, 1)
    print(f"ingest bench: {label}: {out['ingest_records_per_s']} records/s, "
          f"{out['cpu_us_per_record']} us CPU/record", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000,
                        help="records per backend, the key.session included (20,000)")
    parser.add_argument("--batch", type=int, default=BATCH_RECORDS,
                        help=f"records a message, at most (the gateway's: {BATCH_RECORDS})")
    parser.add_argument("--group", type=int, default=MAX_BATCH_MESSAGES,
                        help="messages a transaction at most (the consumer's: "
                             f"{MAX_BATCH_MESSAGES}; 1: one transaction a message)")
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), action="append",
                        help="only this backend (repeat for both; default both)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.records < 2 or args.batch < 1 or args.group < 1:
        parser.error("--records must be at least 2, --batch and --group at least 1")
    backends = args.backend or ["postgresql", "sqlite"]
    print(f"ingest bench: sealing {args.records} records", file=sys.stderr)
    chain, messages = seal_messages(args.records, args.batch)
    results: dict[str, Any] = {"records": args.records, "batch": args.batch,
                               "group": args.group,
                               "messages": len(messages), "machine": platform.machine(),
                               "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="smartcorr-ingest-bench-") as tmp:
        if "postgresql" in backends:
            with Postgres() as pg:
                results["postgresql"] = run_backend("postgresql", pg.dsn, chain, messages,
                                                    args.records, group=args.group, pg=pg)
        if "sqlite" in backends:
            results["sqlite"] = run_backend("sqlite", f"sqlite:///{tmp}/ingest.db", chain,
                                            messages, args.records, group=args.group)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for name in backends:
            r = results[name]
            print(f"{name}: {r['ingest_records_per_s']} records/s, "
                  f"{r['cpu_us_per_record']} us CPU/record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
