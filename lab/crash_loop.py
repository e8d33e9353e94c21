"""kill -9 loop: the real gateway process SIGKILLed at seeded random moments, again and again.

Simulated tags beacon steadily through a tag receiver on a pseudo-terminal; the
gateway (``gateway.py run`` in its own process) reads them, commits and forwards
to a local mosquitto (mTLS); the platform verifier listens throughout. The
gateway is killed with SIGKILL at random moments and restarted each time. At the
end it is left to drain, and :func:`run` counts (in a :class:`Result`):

- ``records_acked_to_devices``: beacons the receiver got an ACK for;
- ``records_lost``: acked beacons never verified at the platform;
- ``bad_signatures``, ``unexplained_gaps`` (chain gaps no signed gap record covers),
  ``duplicates_after_dedupe`` (one device event recorded under two seqs),
  ``store_corruptions`` (``PRAGMA integrity_check`` of the store after each kill).

``tests/test_crash.py`` runs it short, ``bench/crash.py`` long.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from central.client import VerifierClient
from central.record import VerifiedRecord
from core.devices import tag_ref
from core.mqtt import BrokerConfig
from core.topics import PLATFORM_CN
from lab.mosquitto import make_pki, start_mosquitto
from lab.simulators.tag import SimTag, TagReceiverSim
from provisioning.identity import create_identity
from provisioning.registry import open_registry

REPO = Path(__file__).resolve().parents[1]  # where gateway.py is

GATEWAY_ID = "gw-crash-0001"
CONFIG = """
[gateway]
identity_dir = "{identity}"
data_dir = "{data}"

[broker]
host = "{host}"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

[[devices]]
name = "tags"
kind = "tag_receiver"
path = "{tty}"
"""


@dataclass
class Result:
    kills: int = 0
    records_acked_to_devices: int = 0
    records_verified: int = 0
    records_lost: int = 0
    bad_signatures: int = 0
    unexplained_gaps: int = 0
    duplicates_after_dedupe: int = 0
    store_corruptions: int = 0
    beacons_sent: int = 0
    gateway_starts: int = 0
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(kills: int, seed: int = 1, *, rate: float = 40.0, min_up_s: float = 0.3,
        max_up_s: float = 2.0, drain_timeout_s: float = 120.0, verbose: bool = False,
        keep: bool = False) -> Result:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-crash-"))
    result = Result()
    started = time.monotonic()
    pki = make_pki(tmp / "pki")
    broker = start_mosquitto(tmp / "mq", pki)
    identity = create_identity(tmp / "identity", GATEWAY_ID)
    gw_files = pki.client(GATEWAY_ID)
    plat = pki.client(PLATFORM_CN)
    config = tmp / "gateway.toml"
    tty = tmp / "ttyTAGS"
    config.write_text(CONFIG.format(
        identity=tmp / "identity", data=tmp / "data", host=broker.host, port=broker.port,
        ca=pki.ca_file, cert=gw_files.cert, key=gw_files.key, tty=tty))
    verifier = VerifierClient(
        BrokerConfig(broker.host, broker.port, str(pki.ca_file), str(plat.cert), str(plat.key)),
        {identity.kid: identity.public_key})
    arrived: list[VerifiedRecord] = []
    verifier.verifier._on_record = arrived.append  # collect for the checks
    verifier.start()
    if not verifier.subscribed.wait(15):
        raise RuntimeError("verifier could not subscribe")

    tags = [SimTag(0x2000 + i, bytes([i + 7]) * 16) for i in range(3)]
    registry = open_registry(identity)
    for tag in tags:
        registry.pair(tag_ref(tag.tag_id), tag.key)
    registry.close()
    sim = TagReceiverSim("TR-CRASH-0001", tags=tags, link=tty).start()
    stop_beacons = threading.Event()

    def beacons() -> None:
        n = 0
        t0 = time.monotonic()
        while not stop_beacons.wait(0.01):
            while n < int((time.monotonic() - t0) * rate):
                sim.send_beacon(tags[n % len(tags)])
                n += 1
        result.beacons_sent = n

    beacon_thread = threading.Thread(target=beacons, daemon=True)
    beacon_thread.start()
    log_path = tmp / "gateway.log"

    def start_gateway() -> subprocess.Popen[bytes]:
        result.gateway_starts += 1
        with log_path.open("ab") as logf:
            return subprocess.Popen(
                [sys.executable, str(REPO / "gateway.py"), *(["-v"] if verbose else []),
                 "run", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=logf)

    db = tmp / "data" / "records.db"
    try:
        for i in range(kills):
            proc = start_gateway()
            time.sleep(rng.uniform(min_up_s, max_up_s))  # the random moment of the crash
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            result.kills += 1
            if db.exists():
                result.store_corruptions += _integrity_problems(db)
            if (i + 1) % 10 == 0 or i + 1 == kills:
                _progress(f"crash: {i + 1}/{kills} kills, {len(sim.acked())} beacons acked, "
                          f"{verifier.summary()['verified']} records verified")
        stop_beacons.set()
        beacon_thread.join()
        proc = start_gateway()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            if len(sim.acked()) >= result.beacons_sent and _complete(verifier, sim, arrived):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if db.exists():
            result.store_corruptions += _integrity_problems(db)
        time.sleep(0.5)  # last messages in flight to the verifier
    finally:
        stop_beacons.set()
        beacon_thread.join()  # no beacon is queued into a stopped simulator
        sim.stop()
        verifier.stop()
        broker.stop()

    acked = set(sim.acked())
    with verifier.lock:
        records = list(arrived)
        summary = verifier.verifier.summary()
        gaps = verifier.verifier.gaps(GATEWAY_ID)
    events: dict[int, int] = {}
    for rec in records:
        if rec.kind == "tag.presence":
            ev = rec.record["body"]["dev_event"]
            events[ev] = events.get(ev, 0) + 1
    result.records_acked_to_devices = len(acked)
    result.records_verified = summary["verified"]
    result.records_lost = len(acked - set(events))
    result.bad_signatures = summary["bad_signature"]
    result.unexplained_gaps = len(gaps) + summary["chain_breaks"]
    result.duplicates_after_dedupe = sum(n - 1 for n in events.values() if n > 1)
    result.duration_s = round(time.monotonic() - started, 1)
    result.extra = {"duplicates_at_platform": summary["duplicates"], "seed": seed}
    if keep:
        result.extra["workdir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _complete(verifier: VerifierClient, sim: TagReceiverSim, arrived: list[VerifiedRecord]) -> bool:
    with verifier.lock:
        if verifier.verifier.gaps(GATEWAY_ID):
            return False
        seen = {r.record["body"]["dev_event"] for r in arrived if r.kind == "tag.presence"}
    return set(sim.acked()) <= seen


def _integrity_problems(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError:
        return 1
    finally:
        conn.close()
    return 0 if rows == [("ok",)] else 1
