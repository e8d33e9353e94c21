#!/usr/bin/env python3
"""A home's day through the real stack, measured for N minutes and extrapolated (issue 15).

The home: a tag receiver with **three tags beaconing every 2 s**, a check-in kiosk (two
check-ins a day; here at least one during the run), a GNSS receiver replaying a real
u-blox 8 capture (../shared/data/nmea/ublox-8.log, one epoch a second; the gateway keeps a
fix a minute, ``[gnss] fix_interval_s`` = 60, its default) and the gateway's health record
every 5 minutes (its default). Everything is real and runs as on a unit: the simulators
(``python -m lab.simulators … --pty``, processes on pseudo-terminals under by-id names),
``provision init`` / ``config`` / ``pair-tag`` / ``pair-kiosk``, the daemon
(``gateway.py run --config``), a real mosquitto with mTLS and the province's ACL
(lab/mosquitto.py) and a platform client subscribed to the records (QoS 1, as
``lab.mosquitto.records_sink``; it counts the records by kind and the payload bytes, and
hands each message to the platform's real ingest, central/ingest.py on SQLite: the run's
``platform`` figures say every record was verified and stored, the chain has no gap, and
what the presence records prove).

What is measured, over a window that starts once the daemon is up, its devices
handshaken, its tags present and its queue empty (so the start's one-off records are
not extrapolated), and ends when the queue is empty again:

* ``uplink_wire_bytes``: every byte between the daemon and the broker, both ways — TLS
  records, so MQTT payloads, MQTT headers, PUBACKs, pings and TLS overhead — counted by a
  loopback TCP relay the daemon's uplink goes through (TCP/IP headers, ~52 B a segment,
  are not in it); ``uplink_payload_bytes``: the MQTT payloads the platform received;
* ``disk_bytes_written``: the daemon's ``/proc/<pid>/io`` ``write_bytes`` (and its
  children's, if any): what reached the block layer;
* ``fsyncs``: the daemon's fsync and fdatasync calls, counted by ``strace -f -c`` attached
  for the window (None without strace); ``records``: sealed (the daemon's state file)
  and received by kind (the platform).

Extrapolated to a day (``home_day_*``, labelled as such): everything scales by
86,400 s / the window, except check-ins and health records, counted at two and 288 a day
(a short window holds one or two of them: scaled, they would weigh 144 or 288 times).

    python bench/home_day.py --json                 # 10 minutes measured
    python bench/home_day.py --minutes 30 --json
    python bench/home_day.py --quick --json         # ~1 minute: a smoke run

Progress goes to stderr; with ``--json`` stdout's last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.serialization import (  # noqa: E402
    Encoding,
    load_pem_private_key,
)

from central.db import open_db  # noqa: E402
from central.ingest import Ingest  # noqa: E402
from central.ingest import report as ingest_report  # noqa: E402
from central.record import Registration  # noqa: E402
from core.deflate import InflateError, inflate_message, is_deflated  # noqa: E402
from core.mqtt import make_client  # noqa: E402
from core.topics import PLATFORM_CN, TOPIC_ROOT  # noqa: E402
from lab.background import Background, isolated_env  # noqa: E402
from lab.mosquitto import Pki, client_config, make_pki, start_mosquitto  # noqa: E402
from lab.technician_guide import BY_ID, first_fix  # noqa: E402
from provisioning.identity import atomic_write  # noqa: E402
from provisioning.pki import issue_custom  # noqa: E402

GATEWAY_ID = "gw-home-0001"
TAGS = ("T00002001", "T00002002", "T00002003")
BEACON_INTERVAL_S = 2.0
#: The tag receiver's serial window by default: a home's receiver speaks protocol 2 with
#: WINDOW (docs/serial-protocol.md 9.8), so the acknowledgements of beacons that only
#: extend a presence interval wait for one checkpoint commit ([tags] interval_checkpoint_s).
TAG_WINDOW = 64
#: The kinds whose count a day is fixed by the home, not by the window: two check-ins, a
#: health record every 5 minutes (app/assembly.py HEALTH_INTERVAL_S).
PER_DAY = {"checkin": 2, "gateway.health": 288}
DAY_S = 86_400
TAG_RX_SERIAL, KIOSK_SERIAL = "TR-HOME-01", "KI-HOME-01"
OPERATOR = "Bench Installer"
#: The GNSS capture replayed, in the shared data beside the repo (a worktree's repo is one
#: level further down).
CAPTURE_NAME = Path("shared", "data", "nmea", "ublox-8.log")
CAPTURE = next((p / CAPTURE_NAME for p in REPO.parents if (p / CAPTURE_NAME).is_file()),
               REPO.parent / CAPTURE_NAME)
#: Targets once issue 15 lands (bench/README.md).
TARGETS = {"home_day_uplink_bytes": 2_000_000, "home_day_disk_bytes_written": 50_000_000}
#: Bounds on what is awaited, seconds.
READY_TIMEOUT_S = 90.0
#: At most the uplink's longest linger (app/config.py UPLINK_LINGER_RANGE, 300 s) and a minute.
DRAIN_TIMEOUT_S = 360.0
#: Records queued and not yet acknowledged at a window's edge, at most.
IN_FLIGHT = 3


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the byte-counting relay between the daemon and the broker --------------------------


class Relay:
    """127.0.0.1:port → the broker: every connection piped both ways, bytes counted."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = 0  # daemon → broker
        self.down = 0  # broker → daemon
        self.connections = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.connections += 1
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()


# --- the platform's side: records by kind, payload bytes --------------------------------


class Sink:
    """A platform client subscribed (QoS 1) to the records, counting what arrives."""

    def __init__(self, broker_host: str, broker_port: int, pki: Pki, broker: Any) -> None:
        self.kinds: Counter[str] = Counter()
        self.kind_bytes: Counter[str] = Counter()  # the lines' bytes by kind ("head": heads)
        self.messages = 0
        self.payload_bytes = 0
        self.checkin_bytes: list[int] = []
        self._lock = threading.Lock()
        self._db_url: str | None = None
        self._ingest: Ingest | None = None
        self.subscribed = threading.Event()
        self.client = make_client(PLATFORM_CN, client_config(broker, pki, PLATFORM_CN))
        self.client.on_connect = lambda c, *_a: c.subscribe(f"{TOPIC_ROOT}/+/records", qos=1)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._message
        self.client.connect(broker_host, broker_port)
        self.client.loop_start()

    def ingest_into(self, db_url: str, signing_pub: Path) -> None:
        """From now on, every message also goes through the platform's real ingest
        (verified, chained, stored) in the database at *db_url*, the gateway enrolled."""
        with open_db(db_url) as db:
            Ingest(db).enrol(Registration.from_json(json.loads(signing_pub.read_bytes())))
        with self._lock:
            self._db_url = db_url

    def _message(self, _client: object, _userdata: object, msg: Any) -> None:
        payload = bytes(msg.payload)
        if self._db_url is not None:  # paho's network thread: the database is its own
            if self._ingest is None:
                self._ingest = Ingest(open_db(self._db_url, migrate=False))
            self._ingest.ingest_message(str(msg.topic), payload)
        kinds: list[str] = []
        sizes: Counter[str] = Counter()
        lines = payload
        if is_deflated(payload):  # the bytes by kind are the inflated lines'
            try:
                lines = inflate_message(payload, 1 << 20)
            except InflateError:
                lines = b"\xff"  # counted "unreadable"
        for line in lines.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                kinds.append("unreadable")
                continue
            kinds.append(str(obj.get("kind", "head")) if isinstance(obj, dict) else "unreadable")
            sizes[kinds[-1]] += len(line) + 1
            if kinds[-1] == "checkin":
                self.checkin_bytes.append(len(line) + 1)
        with self._lock:
            self.messages += 1
            self.payload_bytes += len(payload)
            self.kinds.update(kinds)
            self.kind_bytes.update(sizes)

    def snapshot(self) -> tuple[int, int, Counter[str]]:
        with self._lock:
            return self.messages, self.payload_bytes, Counter(self.kinds)

    def bytes_by_kind(self) -> Counter[str]:
        with self._lock:
            return Counter(self.kind_bytes)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        if self._ingest is not None:
            self._ingest.db.close()


# --- the daemon's counters ---------------------------------------------------------------


def proc_write_bytes(pid: int) -> int:
    """``write_bytes`` of *pid* and of its children (each read from /proc)."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


class Fsyncs:
    """``strace -f -c -e trace=fsync,fdatasync -p PID`` for the window (None: no strace)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("strace")
        if exe is None:
            say("strace is not installed: fsyncs are not counted")
            return
        self.proc = subprocess.Popen([exe, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o",
                                      str(out), "-p", str(pid)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, int] | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        calls: dict[str, int] = {"fsync": 0, "fdatasync": 0}
        with contextlib.suppress(OSError):
            for line in self.out.read_text().splitlines():
                parts = line.split()
                if parts and parts[-1] in calls and len(parts) >= 5:
                    calls[parts[-1]] = int(parts[3])
        if not self.out.exists():
            say(f"strace wrote no summary: {err.decode(errors='replace')[-300:]}")
            return None
        return calls


# --- the home -------------------------------------------------------------------------


class Home:
    def __init__(self, root: Path, *, checkin_every_s: float, tag_window: int,
                 linger_s: float | None = None, deflate: bool = True) -> None:
        self.root = root
        #: ``[uplink] deflate``: this version's platform reads compressed messages
        self.deflate = deflate
        #: ``[uplink] linger_s`` (None: left out, the configuration file's default)
        self.linger_s = linger_s
        #: the tag receiver's WINDOW (serial protocol 2): frames unacknowledged; 0 is
        #: stop-and-wait (every beacon's effect committed before the next one comes)
        self.tag_window = tag_window
        #: the daemon's runtime directory (its state.json, once a second): on a tmpfs, as
        #: /run/smartcorr is on a unit, so that its writes are not counted as the card's
        shm = Path("/dev/shm")  # noqa: S108 - mkdtemp below: 0700, a random name
        self.run_dir = Path(tempfile.mkdtemp(prefix="home-day-run-", dir=shm)) \
            if shm.is_dir() else root / "run"
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        self.env = isolated_env()
        self.procs: list[Background] = []
        self.checkin_every_s = checkin_every_s
        self.daemon: Background | None = None

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    def run(self, *args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])}: exit {done.returncode}: "
                               f"{done.stderr[-1000:]}")
        return done.stdout

    def background(self, *args: str, ready: str) -> Background:
        proc = Background([sys.executable, *args], self.env, REPO)
        self.procs.append(proc)
        if proc.wait_line(ready, 30) is None:
            raise RuntimeError(f"{' '.join(args[:4])} did not start: "
                               f"{proc.text()[-5:]}")
        return proc

    def setup(self, broker_port: int, pki: Pki) -> None:
        root = self.root
        identity = root / "identity"
        gw = str(REPO / "gateway.py")
        self.run(gw, "provision", "init", "--identity-dir", str(identity), "--gateway-id",
                 GATEWAY_ID, "--no-tpm")
        key = load_pem_private_key((identity / "tls.key").read_bytes(), None)
        _, cert = issue_custom(pki.ca, GATEWAY_ID, key=key)  # type: ignore[arg-type]
        atomic_write(identity / "tls.crt", cert.public_bytes(Encoding.PEM), 0o644)
        shutil.copy(pki.ca_file, identity / "ca.crt")
        for name in ("tag.key", "kiosk.key"):
            atomic_write(root / name, (secrets.token_bytes(16).hex() + "\n").encode(), 0o600)
        by_id = root / "by-id"
        by_id.mkdir()
        tags = [a for t in TAGS for a in ("--tag", t)]
        self.background("-m", "lab.simulators", "tag", "--pty", "--link",
                        str(by_id / BY_ID["tags"]), "--key-file", str(root / "tag.key"),
                        *tags, "--serial", TAG_RX_SERIAL, "--interval",
                        str(BEACON_INTERVAL_S), "--rssi", "-67",
                        *(("--window", str(self.tag_window)) if self.tag_window else ()),
                        ready=r"^/")
        self.background("-m", "lab.simulators", "kiosk", "--pty", "--link",
                        str(by_id / BY_ID["kiosk"]), "--key-file", str(root / "kiosk.key"),
                        "--serial", KIOSK_SERIAL, "--checkin-every",
                        f"{self.checkin_every_s:g}", ready=r"^/")
        self.background("-m", "lab.simulators", "gnss", "--pty", "--link",
                        str(by_id / BY_ID["gnss"]), "--replay", str(CAPTURE), "--loop",
                        ready=r"^/")
        self.run(gw, "provision", "config", "--out", str(self.config), "--identity-dir",
                 str(identity), "--data-dir", str(root / "data"), "--broker",
                 f"127.0.0.1:{broker_port}", "--by-id", str(by_id))
        fix = first_fix(CAPTURE)
        text = self.config.read_text()
        text = re.sub(r"^#\s*installed_lat\s*=.*$", f"installed_lat = {fix.lat_e7 / 1e7:.7f}",
                      text, count=1, flags=re.MULTILINE)
        text = re.sub(r"^#\s*installed_lon\s*=.*$", f"installed_lon = {fix.lon_e7 / 1e7:.7f}",
                      text, count=1, flags=re.MULTILINE)
        # the platform's authorisation of each tag is not part of this bench: its tags are
        # recorded as tags in an authorised period are
        text = re.sub(r"^#\s*\[supervision\]\s*$", "[supervision]", text, count=1,
                      flags=re.MULTILINE)
        text = re.sub(r"^#\s*require_authorisation\s*=.*$", "require_authorisation = false",
                      text, count=1, flags=re.MULTILINE)
        text += f'\n[paths]\nruntime_dir = "{self.run_dir}"\n'
        text += f"\n[uplink]\ndeflate = {'true' if self.deflate else 'false'}\n"
        if self.linger_s is not None:  # else the file's default (app/config.py)
            text += f"linger_s = {self.linger_s}\n"
        atomic_write(self.config, text.encode(), 0o600)
        for tag in TAGS:
            self.run(gw, "provision", "pair-tag", "--identity-dir", str(identity), "--tag", tag,
                     "--key-file", str(root / "tag.key"), "--operator", OPERATOR)
        self.run(gw, "provision", "pair-kiosk", "--identity-dir", str(identity), "--serial",
                 KIOSK_SERIAL, "--key-file", str(root / "kiosk.key"), "--operator", OPERATOR)

    def start_daemon(self) -> Background:
        self.daemon = self.background(str(REPO / "gateway.py"), "run", "--config",
                                      str(self.config), ready=r"running \(version")
        return self.daemon

    def state(self) -> dict[str, Any]:
        try:
            value = json.loads((self.run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def wait(self, what: str, condition: Callable[[dict[str, Any]], bool],
             timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and condition(state):
                return state
            if self.daemon is not None and self.daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon ended: {self.daemon.text()[-10:]}")
            time.sleep(0.2)  # the state file is rewritten once a second: polled
        raise RuntimeError(f"{what}: not within {timeout:.0f} s; state {self.state()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.proc.pid, signal.SIGKILL)
                proc.proc.wait()
        if self.run_dir.parent != self.root:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def ready(state: dict[str, Any]) -> bool:
    devices = state.get("devices") or []
    tags = state.get("tags") or []
    return (state.get("uplink", {}).get("state") == "connected"
            and sum(d.get("handshake") == "ok" for d in devices) >= 2
            and bool((state.get("gnss") or {}).get("fix"))
            and sum(bool(t.get("present")) for t in tags) == len(TAGS))


def drained(state: dict[str, Any]) -> bool:
    """The queue holds no more than the records in flight at this rate (a beacon's record
    every 0.67 s: the queue is seldom exactly empty): the window's edges are within
    :data:`IN_FLIGHT` records of each other's. And nothing is held by the uplink's linger
    (``[uplink] linger_s``): the edges fall just after held records went out, so the window
    holds whole batches and never cuts one in two."""
    queued = state.get("uplink", {}).get("queued")
    held = state.get("uplink", {}).get("held", 0)  # a daemon from before the linger: none
    return isinstance(queued, int) and queued <= IN_FLIGHT and held == 0


@contextlib.contextmanager
def stack(root: Path, checkin_every_s: float, tag_window: int, linger_s: float | None = None,
          deflate: bool = True) -> Iterator[tuple[Home, Relay, Sink, Pki]]:
    pki = make_pki(root / "pki")
    broker = start_mosquitto(root / "broker", pki)
    relay = Relay((broker.host, broker.port))
    sink = Sink(broker.host, broker.port, pki, broker)
    home = Home(root, checkin_every_s=checkin_every_s, tag_window=tag_window,
                linger_s=linger_s, deflate=deflate)
    try:
        if not sink.subscribed.wait(15):
            raise RuntimeError("the platform's client did not subscribe within 15 s")
        yield home, relay, sink, pki
    finally:
        home.stop()
        sink.close()
        relay.close()
        broker.stop()


def measure(root: Path, minutes: float, tag_window: int = 0,
            linger_s: float | None = None, deflate: bool = True) -> dict[str, Any]:
    window_s = minutes * 60
    checkin_every_s = max(20.0, window_s * 0.6)  # at least one within the window
    db_url = f"sqlite:///{root / 'platform.db'}"
    with stack(root, checkin_every_s, tag_window, linger_s, deflate) as (home, relay, sink,
                                                                         pki):
        say(f"setting up the home in {root}")
        home.setup(relay.port, pki)
        sink.ingest_into(db_url, root / "identity" / "signing.pub")
        home.start_daemon()
        say("daemon started; waiting for its devices, tags, GNSS fix and uplink")
        home.wait("the daemon ready", ready, READY_TIMEOUT_S)
        before = home.wait("the queue drained", drained, DRAIN_TIMEOUT_S)
        assert home.daemon is not None  # noqa: S101 (started above)
        pid = home.daemon.pid
        fsyncs = Fsyncs(pid, root / "strace.txt")
        time.sleep(0.5)  # strace attaches to every thread (no event to await from it)
        t0 = time.monotonic()
        sealed0 = int(before["records"]["sealed"])
        io0 = proc_write_bytes(pid)
        wire0 = relay.counts()
        msgs0, payload0, kinds0 = sink.snapshot()
        sizes0 = sink.bytes_by_kind()
        say(f"measuring for {window_s:.0f} s (pid {pid})")
        deadline = t0 + window_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 30.0))  # the run's length itself: nothing to await
            got = sink.snapshot()[2] - kinds0
            say(f"  {time.monotonic() - t0:5.0f} s: {got.total() - got['head']} records "
                "received in the window")
        after = home.wait("the queue drained", drained, DRAIN_TIMEOUT_S)
        measured_s = time.monotonic() - t0
        io1 = proc_write_bytes(pid)
        wire1 = relay.counts()
        msgs1, payload1, kinds1 = sink.snapshot()
        calls = fsyncs.stop()
        sealed = int(after["records"]["sealed"]) - sealed0
        kinds = kinds1 - kinds0
        sizes = sink.bytes_by_kind() - sizes0
        checkin_bytes = list(sink.checkin_bytes)
    records_received = sum(n for k, n in kinds.items() if k != "head")
    with open_db(db_url, migrate=False) as db:
        stored = ingest_report(db, GATEWAY_ID)
    return {
        "measured_s": round(measured_s, 1), "records_sealed": sealed,
        "records_received": records_received,
        "records_by_kind": dict(sorted((k, n) for k, n in kinds.items() if k != "head")),
        "messages": msgs1 - msgs0, "head_statements": kinds.get("head", 0),
        # the payload's bytes by kind, each line with its newline ("head": the heads)
        "payload_bytes_by_kind": dict(sorted(sizes.items())),
        "uplink_payload_bytes": payload1 - payload0,
        "uplink_wire_bytes_up": wire1[0] - wire0[0],
        "uplink_wire_bytes_down": wire1[1] - wire0[1],
        "uplink_wire_bytes": (wire1[0] - wire0[0]) + (wire1[1] - wire0[1]),
        "uplink_connections": relay.connections,
        # [uplink] linger_s in effect (the daemon's state; None: a daemon from before it)
        "uplink_linger_s": after.get("uplink", {}).get("linger_s"),
        "uplink_deflate": deflate,  # [uplink] deflate: messages compressed (core/deflate.py)
        "disk_bytes_written": io1 - io0,
        "fsyncs": None if calls is None else sum(calls.values()),
        "fsync_calls": calls,
        # the platform's real ingest, over the whole run: every record verified and stored,
        # the chain without a gap, and what the presence records prove (central/presence.py)
        "platform": {
            "records_stored": stored["records"],
            "gaps_unexplained": len(stored["gaps_unexplained"]),
            "chain_breaks": len(stored["chain_breaks"]),
            "quarantined": stored["quarantined"],
            "presence_holes_unexplained": stored["presence_holes_unexplained"],
            "presence_anomalies": stored["presence_anomalies"],
        },
        "checkin_every_s": checkin_every_s,
        "checkin_record_bytes": round(sum(checkin_bytes) / len(checkin_bytes))
        if checkin_bytes else None,
    }


def extrapolate(m: dict[str, Any]) -> dict[str, Any]:
    """The day's figures from the window's: scaled by 86,400 s / window, except the kinds
    whose daily count the home fixes (:data:`PER_DAY`: a 10-minute window holds one or
    two of them, scaling would say 144 or 288), counted at that rate, each record added
    or removed at the window's average per record."""
    scale = DAY_S / float(m["measured_s"])
    records = max(int(m["records_received"]), 1)
    by_kind = m["records_by_kind"]
    excess = float(sum(by_kind.get(kind, 0) * scale - per_day
                       for kind, per_day in PER_DAY.items()))

    def day(value: int | None) -> int | None:
        if value is None:
            return None
        return round(value * scale - excess * value / records)

    return {
        "home_day_records": round(m["records_received"] * scale - excess),
        "home_day_uplink_bytes": day(m["uplink_wire_bytes"]),
        "home_day_uplink_payload_bytes": day(m["uplink_payload_bytes"]),
        "home_day_disk_bytes_written": day(m["disk_bytes_written"]),
        "home_day_fsyncs": day(m["fsyncs"]),
        "home_day_extrapolated_from_s": m["measured_s"],
        "home_day_label": (f"EXTRAPOLATED to 86,400 s from {m['measured_s']:.0f} s measured "
                           f"(x{scale:.1f}); " + ", ".join(
                               f"{kind} at {n} a day" for kind, n in PER_DAY.items())),
    }


def report(out: dict[str, Any]) -> str:
    k = out["records_by_kind"]
    lines = [
        f"home_day: 3 tags every {BEACON_INTERVAL_S:g} s, kiosk, GNSS fix a minute, health "
        "every 5 min; the daemon through mosquitto (mTLS)",
        f"measured over {out['measured_s']:.0f} s: {out['records_received']} records received "
        f"({out['records_sealed']} sealed), {out['messages']} messages",
        "  by kind: " + ", ".join(f"{n} {kind}" for kind, n in k.items()),
        "  records by kind, bytes (inflated): " + ", ".join(
            f"{kind} {n:,}" for kind, n in out["payload_bytes_by_kind"].items()),
        f"  uplink: [uplink] linger_s {out['uplink_linger_s']}, deflate "
        f"{'on' if out['uplink_deflate'] else 'off'}; {out['messages']} messages",
        f"  uplink: {out['uplink_wire_bytes']:,} B on the wire ({out['uplink_wire_bytes_up']:,}"
        f" up, {out['uplink_wire_bytes_down']:,} down), {out['uplink_payload_bytes']:,} B of "
        "MQTT payloads",
        f"  disk: {out['disk_bytes_written']:,} B written; fsyncs: {out['fsyncs']}",
        f"  the platform's ingest (whole run): {out['platform']}",
        out["home_day_label"] + ":",
        f"  home_day_records {out['home_day_records']:,}",
        f"  home_day_uplink_bytes {out['home_day_uplink_bytes']:,} (target <= "
        f"{TARGETS['home_day_uplink_bytes']:,})",
        f"  home_day_disk_bytes_written {out['home_day_disk_bytes_written']:,} (target <= "
        f"{TARGETS['home_day_disk_bytes_written']:,})",
        f"  home_day_fsyncs {out['home_day_fsyncs']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long the window measures (default 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 minute")
    parser.add_argument("--tag-window", type=int, default=TAG_WINDOW, metavar="N",
                        help=f"the tag receiver's serial window (protocol 2 WINDOW, default "
                             f"{TAG_WINDOW}: beacons' acknowledgements deferred to one commit "
                             "a checkpoint); 0: a stop-and-wait receiver")
    parser.add_argument("--linger", type=float, metavar="S",
                        help="the uplink's [uplink] linger_s (default: the configuration "
                             "file's default; 0: every record goes out at once)")
    parser.add_argument("--no-deflate", action="store_true",
                        help="[uplink] deflate = false (default: true, messages compressed, "
                             "as for a platform of this version)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--workdir", type=Path, help="where the home lives (default: a temp "
                        "dir on disk, removed after)")
    args = parser.parse_args(argv)
    minutes = 1.0 if args.quick else args.minutes
    if minutes <= 0:
        parser.error("--minutes must be positive")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="home-day-", dir="/var/tmp"))
    root = base / "home"
    root.mkdir(parents=True)
    try:
        measured = measure(root, minutes, args.tag_window, args.linger, not args.no_deflate)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    out = {"bench": "home_day", "minutes": minutes, "tag_window": args.tag_window, **measured,
           **extrapolate(measured)}
    out["targets"] = {key: {"target": limit, "value": out[key],
                            "met": out[key] is not None and out[key] <= limit}
                      for key, limit in TARGETS.items()}
    say(report(out))
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
