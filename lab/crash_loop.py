"""kill -9 loop: the real gateway process SIGKILLed at seeded random moments, again and again.

Simulated tags beacon steadily through a tag receiver on a pseudo-terminal; the
gateway (``gateway.py run`` in its own process) reads them, commits and forwards
to a local mosquitto (mTLS); the platform verifier listens throughout. The
gateway is killed with SIGKILL at random moments and restarted each time. At the
end it is left to drain, and :func:`run` counts (in a :class:`Result`):

- ``records_acked_to_devices``: beacons the receiver got an ACK for;
- ``records_lost``: acked beacons no verified ``tag.interval`` covers (a beacon is
  delivered when an interval of its tag covers its counter: docs/records.md);
- ``bad_signatures``, ``unexplained_gaps`` (chain gaps no signed gap record covers),
  ``duplicates_after_dedupe`` (a beacon covered by two intervals),
  ``store_corruptions`` (``PRAGMA integrity_check`` of the store after each kill).
- ``intervals``, ``intervals_recovered`` (sealed at a start from the ledger: the interval
  a kill left open).

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

from app.state import STATE_FILE
from buffer.store import store_path
from core.topics import PLATFORM_CN
from drivers.tag_receiver import MSG_BEACON
from lab.mosquitto import client_config, make_pki, start_mosquitto
from lab.presence import Coverage, beacon_of
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
        keep: bool = False, suite: str = "ed25519", tpm: bool = True,
        acked_before_kill: int = 0) -> Result:
    """*acked_before_kill*: each gateway is killed only once the receiver got this many
    more ACKs since its start (then after the random delay), so that every kill finds the
    gateway at work (a slow start otherwise takes the whole delay)."""
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
            acked = len(lab.sim.acked())
            proc = lab.start_gateway()
            _wait_acked(lab.sim, acked + acked_before_kill, proc)
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


def _wait_acked(sim: TagReceiverSim, count: int, proc: subprocess.Popen[bytes],
                timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(sim.acked()) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _drain(lab: _Loop, beacons_sent: int, timeout_s: float) -> None:
    """A last gateway runs until every beacon is acked and the chain has no gap, then
    stops cleanly (which seals the open intervals); again while an acked beacon is not
    verified (what a stop did not forward goes at the next start)."""
    deadline = time.monotonic() + timeout_s
    state = lab.tmp / "run" / STATE_FILE  # written once the gateway's start is done
    while True:
        state.unlink(missing_ok=True)  # a killed gateway leaves its own behind
        proc = lab.start_gateway()
        # its start seals the intervals a kill left open: a SIGTERM before it ends would
        # leave them for the next start, and this loop would never see them
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        while time.monotonic() < deadline:
            if len(lab.sim.acked()) >= beacons_sent and _chain_whole(lab.platform):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        settle = time.monotonic() + 5.0  # last messages in flight to the verifier
        while time.monotonic() < settle and not _complete(lab.platform, lab.sim):
            time.sleep(0.1)
        if _complete(lab.platform, lab.sim) or time.monotonic() >= deadline:
            return


def _count(result: Result, lab: _Loop) -> None:
    acked = set(lab.sim.acked())
    client = lab.platform.client
    with client.lock:
        summary = client.verifier.summary()
        gaps = client.verifier.gaps(GATEWAY_ID)
        bodies = [r.record["body"] for r in lab.platform.arrived if r.kind == "tag.interval"]
    coverage = Coverage(bodies)
    covered = Counter(_cover_count(coverage, lab.sim, event) for event in acked)
    result.records_acked_to_devices = len(acked)
    result.records_verified = summary["verified"]
    result.records_lost = covered[0]
    result.bad_signatures = summary["bad_signature"]
    result.unexplained_gaps = len(gaps) + summary["chain_breaks"]
    result.duplicates_after_dedupe = sum(n - 1 for n in covered.elements() if n > 1)
    result.extra["duplicates_at_platform"] = summary["duplicates"]
    result.extra["intervals"] = coverage.intervals
    result.extra["intervals_recovered"] = sum(b.get("closed") == "recovered" for b in bodies)


def _cover_count(coverage: Coverage, sim: TagReceiverSim, event: int) -> int:
    """How many intervals cover the beacon of device event *event* (-1: not a beacon:
    never in this loop, which sends beacons only)."""
    found = beacon_of(MSG_BEACON, sim.sent.get(event, b""))
    return -1 if found is None else coverage.count(*found)


def _chain_whole(platform: Platform) -> bool:
    with platform.client.lock:
        return not platform.client.verifier.gaps(GATEWAY_ID)


def _complete(platform: Platform, sim: TagReceiverSim) -> bool:
    """Every acked beacon is covered by a verified interval, and the chain has no gap."""
    with platform.client.lock:
        if platform.client.verifier.gaps(GATEWAY_ID):
            return False
        coverage = Coverage(r.record["body"] for r in platform.arrived
                            if r.kind == "tag.interval")
    return all(_cover_count(coverage, sim, event) > 0 for event in sim.acked())


def _integrity_problems(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError:
        return 1
    finally:
        conn.close()
    return 0 if rows == [("ok",)] else 1
