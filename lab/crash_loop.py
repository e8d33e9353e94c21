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

import contextlib
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.store import store_path
from core.topics import PLATFORM_CN
from lab.mosquitto import client_config, make_pki, start_mosquitto
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import Platform, pair_tags
from lab.swtpm import Swtpm
from provisioning.identity import create_identity

REPO = Path(__file__).resolve().parents[1]  # where gateway.py is

GATEWAY_ID = "gw-crash-0001"
CONFIG = """
[gateway]
identity_dir = "{identity}"
data_dir = "{data}"

[paths]
runtime_dir = "{run}"

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

[supervision]
require_authorisation = false  # simulated tags, no platform authorising them
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


class _Beacons:
    """Tags beaconing at *rate* through the receiver, on a thread of their own."""

    def __init__(self, sim: TagReceiverSim, rate: float) -> None:
        self.sim, self.rate = sim, rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crash-beacons", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        tags = self.sim.tags
        while not self._stop.wait(0.01):
            while self.sent < int((time.monotonic() - t0) * self.rate):
                self.sim.send_beacon(tags[self.sent % len(tags)])
                self.sent += 1

    def stop(self) -> None:
        """Stop and wait: no beacon is queued into a stopped simulator."""
        self._stop.set()
        self._thread.join()


class _Loop:
    """The lab around the gateway process: PKI, mosquitto, identity, configuration,
    tag receiver, platform."""

    def __init__(self, tmp: Path, stack: contextlib.ExitStack, *, verbose: bool,
                 suite: str = "ed25519", tpm: bool = True) -> None:
        self.tmp, self.verbose = tmp, verbose
        pki = make_pki(tmp / "pki")
        broker = start_mosquitto(tmp / "mq", pki)
        stack.callback(broker.stop)
        tcti = None
        if tpm:  # the TPM outlives every kill, as a TPM chip outlives the process
            swtpm = Swtpm(tmp / "swtpm").start()
            stack.callback(swtpm.stop)
            tcti = swtpm.tcti
        identity = create_identity(tmp / "identity", GATEWAY_ID, suite_name=suite, tpm=tcti)
        self.key_class = identity.key_class
        stack.callback(identity.close)
        self.platform = Platform(client_config(broker, pki, PLATFORM_CN), identity).start()
        stack.callback(self.platform.stop)
        tags = [SimTag(0x2000 + i, bytes([i + 7]) * 16) for i in range(3)]
        pair_tags(identity, tags)
        identity.close()  # a swtpm serves one connection: the gateway's
        tty = tmp / "ttyTAGS"
        self.sim = TagReceiverSim("TR-CRASH-0001", tags=tags, link=tty).start()
        stack.callback(self.sim.stop)
        gw_files = pki.client(GATEWAY_ID)
        self.config = tmp / "gateway.toml"
        self.config.write_text(CONFIG.format(
            identity=tmp / "identity", data=tmp / "data", run=tmp / "run",
            host=broker.host, port=broker.port,
            ca=pki.ca_file, cert=gw_files.cert, key=gw_files.key, tty=tty))
        self.db = store_path(tmp / "data")
        self.starts = 0

    def start_gateway(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with (self.tmp / "gateway.log").open("ab") as logf:
            return subprocess.Popen(
                [sys.executable, str(REPO / "gateway.py"), *(["-v"] if self.verbose else []),
                 "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=logf)

    def integrity_problems(self) -> int:
        return _integrity_problems(self.db) if self.db.exists() else 0


def run(kills: int, seed: int = 1, *, rate: float = 40.0, min_up_s: float = 0.3,
        max_up_s: float = 2.0, drain_timeout_s: float = 120.0, verbose: bool = False,
        keep: bool = False, suite: str = "ed25519", tpm: bool = True) -> Result:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-crash-"))
    result = Result()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        lab = _Loop(tmp, stack, verbose=verbose, suite=suite, tpm=tpm)
        result.extra.update(suite=suite, key_class=lab.key_class)
        beacons = _Beacons(lab.sim, rate)
        stack.callback(beacons.stop)
        for i in range(kills):
            proc = lab.start_gateway()
            time.sleep(rng.uniform(min_up_s, max_up_s))  # the random moment of the crash
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            result.kills += 1
            result.store_corruptions += lab.integrity_problems()
            if (i + 1) % 10 == 0 or i + 1 == kills:
                _progress(f"crash: {i + 1}/{kills} kills, {len(lab.sim.acked())} beacons acked, "
                          f"{lab.platform.summary()['verified']} records verified")
        beacons.stop()
        result.beacons_sent = beacons.sent
        _drain(lab, beacons.sent, drain_timeout_s)
        result.store_corruptions += lab.integrity_problems()
        result.gateway_starts = lab.starts
    _count(result, lab)
    result.duration_s = round(time.monotonic() - started, 1)
    result.extra["seed"] = seed
    if keep:
        result.extra["workdir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _drain(lab: _Loop, beacons_sent: int, timeout_s: float) -> None:
    """A last gateway runs until every acked beacon is verified, then stops cleanly."""
    proc = lab.start_gateway()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(lab.sim.acked()) >= beacons_sent and _complete(lab.platform, lab.sim):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.5)  # last messages in flight to the verifier


def _count(result: Result, lab: _Loop) -> None:
    acked = set(lab.sim.acked())
    client = lab.platform.client
    with client.lock:
        summary = client.verifier.summary()
        gaps = client.verifier.gaps(GATEWAY_ID)
        events = Counter(r.record["body"]["dev_event"] for r in lab.platform.arrived
                         if r.kind == "tag.presence")
    result.records_acked_to_devices = len(acked)
    result.records_verified = summary["verified"]
    result.records_lost = len(acked - set(events))
    result.bad_signatures = summary["bad_signature"]
    result.unexplained_gaps = len(gaps) + summary["chain_breaks"]
    result.duplicates_after_dedupe = sum(n - 1 for n in events.values() if n > 1)
    result.extra["duplicates_at_platform"] = summary["duplicates"]


def _complete(platform: Platform, sim: TagReceiverSim) -> bool:
    with platform.client.lock:
        if platform.client.verifier.gaps(GATEWAY_ID):
            return False
        seen = {r.record["body"]["dev_event"] for r in platform.arrived
                if r.kind == "tag.presence"}
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
