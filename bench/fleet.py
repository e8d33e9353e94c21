#!/usr/bin/env python3
"""Fleet benchmark: N simulated gateways on one broker, K ingest consumers on PostgreSQL
(issue 11 items 1 and 2).

Each simulated gateway is a real MQTT v5 client (paho) with its own client id, identity
key and record chain (``lab.chains.Chain``: a ``key.session`` certified by the identity,
then records signed by the session key). It publishes QoS 1 messages of at most
``BATCH_RECORDS`` records of one class in seq order on ``smartcorr/v1/gw/<gw>/records``,
each message ending with the gateway's signed head statement (docs/records.md,
Transport), with at most ``WINDOW`` messages unacknowledged (the uplink's window). A few
records of each gateway are alarms (``tag.tamper``; the ``key.session`` is one too).

The records are sealed before each timed phase by the publisher processes
(``--publishers``, each driving its share of the gateways' MQTT clients from one
``selectors`` loop), written to a spool file on disk and read back while publishing:
memory stays bounded whatever the fleet's size.

The platform side is what a province runs: K processes of ``python -m central consume``
(each its own client id) on the shared subscription ``$share/ingest/...``, storing on a
private PostgreSQL (``lab/postgres.py``, fsync on). Every gateway is enrolled first
(``Ingest.enrol`` with its chain's registration).

Phases:

1. for each K of ``--consumers``: every gateway publishes ``--records-per-gateway`` new
   records; ``ingest_records_per_s`` = records / (the last record's ``received_at`` in
   the database - the first publish); the alarms' latency = their ``stored_at`` in the
   ``alarms`` table - the time their message was published;
2. a regional outage: every gateway is disconnected, seals ``--backlog`` records with
   alarms interleaved, then all reconnect at once and send their backlog, alarms first
   (the uplink's order); ``drain_s`` = the last record stored - the first reconnect.

Counted in the database at the end: ``records_stored`` (rows of ``records``),
``duplicates_stored`` (rows sharing a (gw, seq): 0 by the primary key, counted anyway),
``conflicts``, ``quarantined``, ``held``; ``records_lost`` = sent - stored.

The broker is a private mosquitto on **plain TCP on loopback**, without client
certificates: a certificate for each of 1,000 clients would cost minutes, and TLS is not
what is measured here (the broker ACL and the binding of client ids to certificates are
exercised in tests/test_consumer.py and docs/broker.md).

    python bench/fleet.py --json                  # 1,000 gateways (docs/scaling.md)
    python bench/fleet.py --json --quick          # 50 gateways, seconds (CI)

Progress goes to stderr; with ``--json`` the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from central.db import open_db  # noqa: E402
from central.ingest import Ingest  # noqa: E402
from core.head import make_head  # noqa: E402
from core.kinds import priority_of  # noqa: E402
from core.record import Source, Timestamp  # noqa: E402
from core.topics import records_topic  # noqa: E402
from lab.chains import Chain  # noqa: E402
from lab.mosquitto import free_port, mosquitto_binary  # noqa: E402
from lab.postgres import Postgres  # noqa: E402
from uplink.forwarder import BATCH_RECORDS, WINDOW  # noqa: E402

TAG_SOURCE = Source("tag_receiver", "TR-FLEET-0001", "1.4.2")
#: One record in this many is an alarm (``tag.tamper``).
ALARM_EVERY = 50
#: Progress on stderr every this many seconds.
PROGRESS_S = 5.0
#: A phase that stores nothing new for this long has lost records: stop waiting.
STALL_S = 90.0
GROUP = "ingest"


# --- the publisher processes ---------------------------------------------------------


@dataclass
class _Msg:
    offset: int
    length: int
    records: int
    alarms: list[int]  # seqs of the alarm records in it


@dataclass
class _Gateway:
    chain: Chain
    topic: str
    mono: int = 1_000
    client: mqtt.Client | None = None
    connected: bool = False
    inflight: int = 0
    queue: list[_Msg] = field(default_factory=list)
    next: int = 0


def _seal_records(gw: _Gateway, count: int, *, session: bool) -> list[tuple[int, str, bytes]]:
    """*count* new records of *gw* (a ``key.session`` first if *session*): (seq, class,
    canonical bytes)."""
    out = []
    now = time.time_ns() // 1_000_000
    if session:
        rec = gw.chain.start_session(Timestamp(now, "ntp", gw.mono))
        out.append((rec.seq, "alarm", rec.data))
        count -= 1
    for _ in range(count):
        gw.mono += 10
        ts = Timestamp(now, "ntp", gw.mono)
        seq = gw.chain.sealer.last_seq + 1
        if seq % ALARM_EVERY == 0:
            kind, body = "tag.tamper", {"tag": "T00001001", "strap_closed": False,
                                        "dev_event": seq}
        else:
            kind, body = "tag.presence", {"tag": f"T{0x1000 + seq % 3:08X}", "counter": seq,
                                          "battery_pct": 90, "strap_closed": True,
                                          "body_contact": True, "rssi_dbm": -60,
                                          "dev_event": seq}
        rec = gw.chain.seal(kind, body, ts, TAG_SOURCE)
        out.append((rec.seq, priority_of(kind).label, rec.data))
    return out


def _messages(records: list[tuple[int, str, bytes]], *, alarms_first: bool
              ) -> list[list[tuple[int, str, bytes]]]:
    """Messages of at most BATCH_RECORDS records of one class, each class in seq order:
    as sealed (a run of one class, then the next), or every alarm first (a backlog)."""
    if alarms_first:
        records = sorted(records, key=lambda r: (r[1] != "alarm", r[0]))
    out: list[list[tuple[int, str, bytes]]] = []
    for rec in records:
        if out and out[-1][0][1] == rec[1] and len(out[-1]) < BATCH_RECORDS:
            out[-1].append(rec)
        else:
            out.append([rec])
    return out


class Publisher:
    """One publisher process: its share of the gateways, their chains and clients."""

    def __init__(self, host: str, port: int, db_url: str, spool: Path) -> None:
        self.host, self.port, self.db_url, self.spool = host, port, db_url, spool
        self.gateways: list[_Gateway] = []
        self.sel = selectors.DefaultSelector()
        self.first_session = True
        self.last_misc = time.monotonic()

    # commands ------------------------------------------------------------------------

    def init(self, ids: list[str]) -> dict[str, Any]:
        self.gateways = [_Gateway(Chain(gw_id), records_topic(gw_id)) for gw_id in ids]
        with open_db(self.db_url) as db:
            ingest = Ingest(db)
            for gw in self.gateways:
                ingest.enrol(gw.chain.registration)
        return {"enrolled": len(self.gateways)}

    def seal(self, phase: str, records: int, *, alarms_first: bool) -> dict[str, Any]:
        path = self.spool / f"{phase}.spool"
        sealed = messages = alarms = 0
        with path.open("wb") as out:
            for gw in self.gateways:
                recs = _seal_records(gw, records, session=self.first_session)
                key = gw.chain.session
                assert key is not None  # noqa: S101 (start_session was called)
                gw.queue, gw.next = [], 0
                for msg in _messages(recs, alarms_first=alarms_first):
                    committed = recs[-1][0] if alarms_first else msg[-1][0]
                    before = b"\n".join(r[2] for r in msg) + b"\n"
                    payload = before + make_head(gw.chain.gateway_id, gw.chain.boot,
                                                 committed, gw.mono, key, before=before)
                    gw.queue.append(_Msg(out.tell(), len(payload), len(msg),
                                         [r[0] for r in msg if r[1] == "alarm"]))
                    out.write(payload)
                    sealed += len(msg)
                    messages += 1
                    alarms += len(gw.queue[-1].alarms)
        self.first_session = False
        return {"records": sealed, "messages": messages, "alarms": alarms,
                "spool_bytes": path.stat().st_size}

    def _client(self, gw: _Gateway) -> mqtt.Client:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=gw.chain.gateway_id, protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(WINDOW)

        def on_connect(_c: object, _u: object, _f: object, reason: Any, _p: object) -> None:
            if reason.is_failure:
                raise RuntimeError(f"{gw.chain.gateway_id}: connection refused: {reason}")
            gw.connected = True

        def on_publish(_c: object, _u: object, _mid: int, reason: Any, _p: object) -> None:
            if reason.is_failure:
                raise RuntimeError(f"{gw.chain.gateway_id}: PUBACK {reason}")
            gw.inflight -= 1

        def on_disconnect(_c: object, _u: object, _f: object, _r: object, _p: object) -> None:
            gw.connected = False

        client.on_connect = on_connect
        client.on_publish = on_publish
        client.on_disconnect = on_disconnect
        return client

    def _connect(self, gw: _Gateway) -> None:
        gw.client = self._client(gw)
        gw.client.connect(self.host, self.port, keepalive=60, clean_start=True)
        sock = gw.client.socket()
        assert sock is not None  # noqa: S101 (connect made it)
        self.sel.register(sock, selectors.EVENT_READ, gw)

    def _turn(self, timeout: float = 0.005) -> None:
        """One turn of the event loop: write what waits, read what came."""
        for gw in self.gateways:
            if gw.client is not None and gw.client.want_write():
                gw.client.loop_write()
        for key, _ in self.sel.select(timeout):
            gw = key.data
            if gw.client is not None:
                gw.client.loop_read()

    def _misc(self) -> None:
        for gw in self.gateways:
            if gw.client is not None:
                gw.client.loop_misc()

    def idle(self) -> None:
        """Between commands: answer the broker, send keepalives."""
        self._turn(0.05)
        if time.monotonic() - self.last_misc > 1.0:
            self.last_misc = time.monotonic()
            self._misc()

    def connect(self) -> dict[str, Any]:
        for gw in self.gateways:
            self._connect(gw)
        deadline = time.monotonic() + 60
        while not all(gw.connected for gw in self.gateways):
            if time.monotonic() > deadline:
                raise RuntimeError("gateways not connected within 60 s")
            self._turn()
        return {"connected": len(self.gateways)}

    def disconnect(self) -> dict[str, Any]:
        for gw in self.gateways:
            if gw.client is not None:
                gw.client.disconnect()
        deadline = time.monotonic() + 30
        while any(gw.connected for gw in self.gateways) and time.monotonic() < deadline:
            self._turn()
        for gw in self.gateways:  # the selector goes with them (closed sockets in it)
            gw.client = None
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        return {"disconnected": len(self.gateways)}

    def publish(self, phase: str, *, reconnect: bool) -> dict[str, Any]:
        """Send every gateway's queue (connecting each first if *reconnect*: all at once)
        and wait for every PUBACK; the alarms' publish times (ms)."""
        alarms: list[tuple[str, int, int]] = []
        sent = messages = 0
        start_ms = time.time_ns() // 1_000_000
        if reconnect:
            for gw in self.gateways:
                self._connect(gw)
        fd = os.open(self.spool / f"{phase}.spool", os.O_RDONLY)
        progress = (time.monotonic(), 0)
        try:
            pending = [gw for gw in self.gateways if gw.queue]
            while pending or any(gw.inflight for gw in self.gateways):
                now = time.monotonic()
                acked = messages - sum(gw.inflight for gw in self.gateways)
                if acked != progress[1]:
                    progress = (now, acked)
                elif now - progress[0] > STALL_S:
                    down = sum(not gw.connected for gw in self.gateways)
                    raise RuntimeError(f"no PUBACK for {STALL_S:.0f} s ({down} gateways "
                                       "not connected)")
                still = []
                for gw in pending:
                    while gw.connected and gw.inflight < WINDOW and gw.next < len(gw.queue):
                        msg = gw.queue[gw.next]
                        gw.next += 1
                        payload = os.pread(fd, msg.length, msg.offset)
                        assert gw.client is not None  # noqa: S101 (connected)
                        gw.inflight += 1
                        now_ms = time.time_ns() // 1_000_000
                        gw.client.publish(gw.topic, payload, qos=1)
                        alarms += [(gw.chain.gateway_id, seq, now_ms) for seq in msg.alarms]
                        sent += msg.records
                        messages += 1
                    if gw.next < len(gw.queue):
                        still.append(gw)
                pending = still
                self._turn()
                if now - self.last_misc > 1.0:
                    self.last_misc = now
                    self._misc()
        finally:
            os.close(fd)
        (self.spool / f"{phase}.spool").unlink()
        for gw in self.gateways:
            gw.queue = []
        return {"sent": sent, "messages": messages, "start_ms": start_ms,
                "end_ms": time.time_ns() // 1_000_000, "alarms": alarms}


def publisher_main(host: str, port: int, db_url: str, spool: str) -> int:
    """A publisher process: one JSON command a line on stdin, one JSON answer on stdout.
    Between commands its clients' loop keeps running (keepalives, as a gateway's)."""
    pub = Publisher(host, port, db_url, Path(spool))
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for text in sys.stdin:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            pub.idle()
            continue
        if line is None:
            break
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        if name == "quit":
            break
        try:
            answer = getattr(pub, name)(**cmd)
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which stops)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    pub.disconnect()
    return 0


class PublisherProcess:
    def __init__(self, host: str, port: int, db_url: str, spool: Path) -> None:
        spool.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--publisher", host, str(port),
             db_url, str(spool)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)

    def send(self, cmd: str, **kwargs: Any) -> None:
        assert self.proc.stdin is not None  # noqa: S101
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None  # noqa: S101
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"fleet bench: a publisher exited ({self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise SystemExit(f"fleet bench: a publisher failed: {out['error']}")
        return out

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def all_answer(pubs: list[PublisherProcess], cmd: str, **kwargs: Any) -> list[dict[str, Any]]:
    """*cmd* to every publisher at once; their answers."""
    for p in pubs:
        p.send(cmd, **kwargs)
    return [p.answer() for p in pubs]


# --- the broker and the consumers -----------------------------------------------------


@contextlib.contextmanager
def plain_mosquitto(workdir: Path) -> Iterator[int]:
    """A private mosquitto on plain TCP, loopback only, no persistence; its port. Queues
    are unbounded: the bench measures the platform, the broker holds what it has not
    delivered yet (a cluster's sizing: docs/scaling.md)."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
        "max_inflight_messages 100", "max_queued_messages 0", "set_tcp_nodelay true",
        "log_dest stderr", "log_type error", "log_type warning",
        *(["user root"] if os.geteuid() == 0 else [])]) + "\n")
    log = (workdir / "mosquitto.log").open("w")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("fleet bench: mosquitto did not start: "
                                 + (workdir / "mosquitto.log").read_text()[-2000:])
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class ConsumerProcess:
    """``python -m central consume --no-tls`` in a child process, its JSON events read."""

    def __init__(self, db_url: str, port: int, client_id: str) -> None:
        self.client_id = client_id
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "central", "consume", "--db", db_url,
             "--broker", f"127.0.0.1:{port}", "--no-tls", "--group", GROUP,
             "--client-id", client_id, "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._pump = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                      daemon=True)
        self._pump.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            event = json.loads(line)
            if event.get("event") != "alarm":  # the alarms are read in the database
                self.events.append(event)

    def seen(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == event), None)

    def stop(self) -> dict[str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        stopped = self.seen("stopped")
        return dict(stopped["totals"]) if stopped else {}


def drop_session(port: int, client_id: str) -> None:
    """Leave no session of *client_id* on the broker (a stopped consumer's, kept a week:
    a broker may go on sharing the group's messages to it)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda *_: done.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect("127.0.0.1", port, 30, clean_start=True, properties=props)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()


def start_consumers(db_url: str, port: int, k: int, label: str) -> list[ConsumerProcess]:
    consumers = [ConsumerProcess(db_url, port, f"fleet-{label}-{i + 1}") for i in range(k)]
    deadline = time.monotonic() + 60
    while not all(c.seen("subscribed") for c in consumers):
        for c in consumers:
            if c.proc.poll() is not None:
                raise SystemExit(f"fleet bench: consumer {c.client_id} exited "
                                 f"({c.proc.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit("fleet bench: consumers not subscribed within 60 s")
        time.sleep(0.1)
    return consumers


def stop_consumers(consumers: list[ConsumerProcess], port: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for c in consumers:
        for name, n in c.stop().items():
            totals[name] = totals.get(name, 0) + n
        drop_session(port, c.client_id)
    return totals


# --- measuring --------------------------------------------------------------------------


def _count(db_url: str, sql: str) -> int:
    with open_db(db_url, migrate=False) as db, db.transaction() as tx:
        row = tx.one(sql)
    return int(row[0]) if row and row[0] is not None else 0


def wait_stored(db_url: str, expected: int, label: str) -> int:
    """Wait until *expected* records are in the database (or nothing new for STALL_S)."""
    last_n, last_change = -1, time.monotonic()
    last_print = 0.0
    with open_db(db_url, migrate=False) as db:
        while True:
            with db.transaction() as tx:
                row = tx.one("SELECT COUNT(*) FROM records")
            n = int(row[0]) if row else 0
            now = time.monotonic()
            if n != last_n:
                last_n, last_change = n, now
            if n >= expected:
                return n
            if now - last_change > STALL_S:
                print(f"fleet bench: {label}: stalled at {n}/{expected} records",
                      file=sys.stderr)
                return n
            if now - last_print > PROGRESS_S:
                last_print = now
                print(f"fleet bench: {label}: {n}/{expected} records stored", file=sys.stderr)
            time.sleep(0.2)


def _p99(values: list[int]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return round(statistics.quantiles(values, n=100, method="inclusive")[98], 1)


def alarm_latencies(db_url: str, published: list[tuple[str, int, int]]) -> list[int]:
    """stored_at in the alarms table - publish time, for each alarm of *published*."""
    sent = {(gw, seq): ms for gw, seq, ms in published}
    with open_db(db_url, migrate=False) as db, db.transaction() as tx:
        rows = tx.all("SELECT gw, seq, stored_at FROM alarms")
    return [int(stored_at) - sent[(gw, seq)] for gw, seq, stored_at in rows
            if (gw, seq) in sent]


def run_phase(pubs: list[PublisherProcess], db_url: str, port: int, *, label: str,
              k: int, records: int, alarms_first: bool, reconnect: bool,
              expected_before: int) -> dict[str, Any]:
    print(f"fleet bench: {label}: sealing {records} records per gateway", file=sys.stderr)
    t = time.monotonic()
    sealed = all_answer(pubs, "seal", phase=label, records=records, alarms_first=alarms_first)
    n_records = sum(s["records"] for s in sealed)
    print(f"fleet bench: {label}: sealed {n_records} records in "
          f"{sum(s['messages'] for s in sealed)} messages ({time.monotonic() - t:.0f} s); "
          f"starting {k} consumer(s)", file=sys.stderr)
    consumers = start_consumers(db_url, port, k, label)
    try:
        answers = all_answer(pubs, "publish", phase=label, reconnect=reconnect)
        sent = sum(a["sent"] for a in answers)
        start_ms = min(a["start_ms"] for a in answers)
        print(f"fleet bench: {label}: {sent} records published in "
              f"{(max(a['end_ms'] for a in answers) - start_ms) / 1000:.1f} s",
              file=sys.stderr)
        stored = wait_stored(db_url, expected_before + sent, label) - expected_before
    finally:
        totals = stop_consumers(consumers, port)
    last_ms = _count(db_url, "SELECT MAX(received_at) FROM records")
    wall_s = max(1e-3, (last_ms - start_ms) / 1000)
    lat = alarm_latencies(db_url, [tuple(x) for a in answers for x in a["alarms"]])
    out: dict[str, Any] = {
        "consumers": k, "records_sent": sent, "records_stored": stored,
        "wall_s": round(wall_s, 2), "records_per_s": round(stored / wall_s, 1),
        "alarms_sent": sum(len(a["alarms"]) for a in answers), "alarms_stored": len(lat),
        "alarm_latency_ms_p50": _median(lat), "alarm_latency_ms_p99": _p99(lat),
        "alarm_latency_ms_max": max(lat) if lat else None,
        "redelivered_duplicates": totals.get("duplicates", 0),
        "reorders": totals.get("reorders", 0),
    }
    print(f"fleet bench: {label}: {stored}/{sent} stored in {wall_s:.1f} s = "
          f"{out['records_per_s']} records/s; alarm latency p99 "
          f"{out['alarm_latency_ms_p99']} ms", file=sys.stderr)
    return out


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"arch": platform.machine(), "cpus": os.cpu_count(), "cpu_model": model,
            "memory_gb": round(mem_kb / 1e6, 1), "python": platform.python_version(),
            "kernel": platform.release()}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall0 = time.monotonic()
    ids = [f"gw-fleet-{i:05d}" for i in range(args.gateways)]
    n_pubs = max(1, min(args.publishers, args.gateways))
    results: dict[str, Any] = {
        "gateways": args.gateways, "records_per_gateway": args.records_per_gateway,
        "backlog_per_gateway": args.backlog, "consumers": args.consumers,
        "publishers": n_pubs, "batch_records": BATCH_RECORDS, "window": WINDOW,
        "quick": args.quick, "transport": "MQTT v5 QoS 1, plain TCP on loopback (no TLS, "
        "no client certificates), mosquitto", "database": "PostgreSQL (lab/postgres.py)",
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="smartcorr-fleet-") as tmp, Postgres() as pg:
        results["machine"]["postgresql"] = pg.bindir.parent.name
        open_db(pg.dsn).close()  # the schema, before anyone enrols
        with plain_mosquitto(Path(tmp)) as port:
            pubs = [PublisherProcess("127.0.0.1", port, pg.dsn, Path(tmp) / f"spool-{i}")
                    for i in range(n_pubs)]
            try:
                t = time.monotonic()
                for i, p in enumerate(pubs):
                    p.send("init", ids=ids[i::n_pubs])
                enrolled = sum(p.answer()["enrolled"] for p in pubs)
                all_answer(pubs, "connect")
                print(f"fleet bench: {enrolled} gateways enrolled and connected "
                      f"({time.monotonic() - t:.0f} s)", file=sys.stderr)
                stored_so_far = 0
                by_k: dict[str, Any] = {}
                for k in args.consumers:
                    by_k[str(k)] = run_phase(
                        pubs, pg.dsn, port, label=f"k{k}", k=k,
                        records=args.records_per_gateway, alarms_first=False,
                        reconnect=False, expected_before=stored_so_far)
                    stored_so_far += by_k[str(k)]["records_stored"]
                all_answer(pubs, "disconnect")
                k_out = max(args.consumers)
                outage = run_phase(pubs, pg.dsn, port, label="outage", k=k_out,
                                   records=args.backlog, alarms_first=True, reconnect=True,
                                   expected_before=stored_so_far)
            finally:
                for p in pubs:
                    p.stop()
        records_sent = sum(p["records_sent"] for p in by_k.values()) + outage["records_sent"]
        stored = _count(pg.dsn, "SELECT COUNT(*) FROM records")
        distinct = _count(pg.dsn, "SELECT COUNT(*) FROM (SELECT DISTINCT gw, seq FROM "
                                  "records) AS d")
        results.update({
            "records_sent": records_sent,
            "records_stored": stored,
            "records_lost": records_sent - stored,
            "duplicates_stored": stored - distinct,
            "conflicts": _count(pg.dsn, "SELECT COUNT(*) FROM conflicts"),
            "quarantined": _count(pg.dsn, "SELECT COUNT(*) FROM quarantine"),
            "held": _count(pg.dsn, "SELECT COUNT(*) FROM held"),
            "chain_breaks": _count(pg.dsn, "SELECT COUNT(*) FROM chain_breaks"),
            "database_bytes": _count(pg.dsn, "SELECT pg_database_size(current_database())"),
            "records_table_bytes": _count(pg.dsn,
                                          "SELECT pg_total_relation_size('records')"),
            "record_bytes_mean": round(_count(
                pg.dsn, "SELECT AVG(LENGTH(data)) FROM records"), 1),
            "ingest_records_per_s_by_consumers": {k: v["records_per_s"]
                                                  for k, v in by_k.items()},
            "phases": by_k,
            "alarm_latency_ms_p99": max((v["alarm_latency_ms_p99"] or 0)
                                        for v in by_k.values()),
            "outage": {"consumers": k_out, "backlog_records": outage["records_sent"],
                       "drain_s": outage["wall_s"],
                       "drain_records_per_s": outage["records_per_s"],
                       "alarm_latency_ms_p50": outage["alarm_latency_ms_p50"],
                       "alarm_latency_ms_p99": outage["alarm_latency_ms_p99"],
                       "alarm_latency_ms_max": outage["alarm_latency_ms_max"],
                       "alarms": outage["alarms_sent"],
                       "alarms_stored": outage["alarms_stored"],
                       "reorders": outage["reorders"]},
        })
    results["run_s"] = round(time.monotonic() - wall0, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publisher"]:
        host, port, db_url, spool = argv[1:5]
        return publisher_main(host, int(port), db_url, spool)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, help="simulated gateways (1,000; quick 50)")
    parser.add_argument("--records-per-gateway", type=int,
                        help="records each gateway sends in each consumers phase "
                             "(100; quick 40)")
    parser.add_argument("--backlog", type=int,
                        help="records each gateway holds after the outage (300; quick 100)")
    parser.add_argument("--consumers", default=None,
                        help="the consumer counts to measure, comma separated (1,2,3; "
                             "quick 2)")
    parser.add_argument("--publishers", type=int, default=2,
                        help="publisher processes driving the gateways' clients (2)")
    parser.add_argument("--quick", action="store_true", help="a small run for CI")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)
    quick = args.quick
    args.gateways = args.gateways or (50 if quick else 1000)
    args.records_per_gateway = args.records_per_gateway or (40 if quick else 100)
    args.backlog = args.backlog or (100 if quick else 300)
    try:
        args.consumers = [int(k) for k in (args.consumers or ("2" if quick else "1,2,3"))
                          .split(",")]
    except ValueError:
        parser.error("--consumers: comma-separated numbers, e.g. 1,2,3")
    if args.gateways < 1 or args.records_per_gateway < 2 or args.backlog < 1 or \
            min(args.consumers) < 1:
        parser.error("--gateways, --backlog and each consumer count at least 1; "
                     "--records-per-gateway at least 2")
    _raise_nofile()
    results = run(args)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for k, rate in results["ingest_records_per_s_by_consumers"].items():
            print(f"{k} consumer(s): {rate} records/s")
        print(f"lost {results['records_lost']}, duplicates {results['duplicates_stored']}, "
              f"conflicts {results['conflicts']}; outage drained in "
              f"{results['outage']['drain_s']} s")
    return 0 if results["records_lost"] == 0 and results["duplicates_stored"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
