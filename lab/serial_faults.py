"""Serial fault scenarios over pseudo-terminals, through the real gateway stack.

A tag receiver simulator talks to the gateway over a pty while the wire flips
bits and drops bytes in both directions; a spoofing tag (wrong key) and a
replaying tag (old beacons sent again) mix in; half-way, the receiver's USB
cable is pulled and plugged back. Afterwards every event the simulator
generated is looked up in the gateway's store: a genuine beacon by the ``tag.interval``
covering its tag's counter (docs/records.md), a rejected one by its ``tag.spoof``, an
unreadable message by its ``device.error``. :func:`run` returns the figures
(``events_sent``, ``events_committed_once``, ``events_lost``, ``events_duplicated``,
``events_corrupted``, ``spoof_sent``, ``spoof_rejected``, ``replug_recovery_s``, ...);
``tests/test_serial_faults.py`` runs it short, ``bench/serial_faults.py`` long.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.store import StoreReader, store_path
from drivers.tag_receiver import MSG_BEACON, Beacon
from firmware_bridge.framed import FramedDeviceProtocol
from lab.presence import Coverage, beacon_of
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import NOWHERE, Site
from lab.wire import Damage
from provisioning.identity import Identity, create_identity

_pause = threading.Event()
#: Device messages whose records say which device event they came from.
_EVENT_KINDS = ("tag.spoof", "device.error")


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        _pause.wait(0.01)
    return True


@dataclass
class _Traffic:
    """What the tags sent: genuine beacons by (tag, counter), and how long the link took
    to come back after the cable was plugged in again."""

    sent: int = 0
    genuine: dict[tuple[str, int], Beacon] = field(default_factory=dict)
    recovery_s: float | None = None


def run(events: int = 2000, *, bit_error_rate: float = 1e-3, drop_rate: float = 0.01,
        spoofs: int = 25, replays: int = 25, rate: float = 200.0, seed: int = 1,
        unplug: bool = True, unplug_s: float = 1.0, reboot: bool = True,
        garbage_rate: float = 0.01, byte_delay_s: float = 0.0,
        timeout_s: float = 300.0, protocol: int = 1, window: int = 0) -> dict[str, Any]:
    """*protocol* and *window*: the device's (1; or 2 with *window* > 0 offering the
    WINDOW feature, several DATA frames unacknowledged)."""
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-faults-"))
    try:
        identity = create_identity(tmp / "identity", "gw-faults-0001")
        tags = [SimTag(0x3000 + i, bytes([0x40 + i]) * 16) for i in range(3)]
        with Site(tmp, identity, NOWHERE) as site:  # records stay in the store
            sim = site.tag_receiver(
                tags, "TR-FAULTS-01",
                to_host=Damage(bit_error_rate, drop_rate, garbage_rate, seed=seed),
                from_host=Damage(bit_error_rate, drop_rate, garbage_rate, seed=seed + 1),
                byte_delay_s=byte_delay_s, protocol_version=protocol, window=window)
            gateway = site.start()
            t0 = time.monotonic()
            plan = ["genuine"] * events + ["spoof"] * spoofs + ["replay"] * replays
            rng = random.Random(seed)  # one source: the shuffle, then the replays' picks
            rng.shuffle(plan)
            traffic = _send(sim, plan, rng=rng, rate=rate, reboot=reboot,
                            unplug=unplug, unplug_s=unplug_s)
            done = _wait(lambda: len(sim.acked()) >= traffic.sent, timeout_s)
            site.stop_gateway(drain_s=0)
        proto = gateway.protocols["tags"]
        if not isinstance(proto, FramedDeviceProtocol):  # pragma: no cover - tags are framed
            raise TypeError(f"port 'tags' runs {type(proto).__name__}")
        out = _check(*_committed(tmp, identity), sim, traffic)
        return out | {
            "events_sent": traffic.sent,
            "events_acked": len(sim.acked()),
            "spoof_sent": spoofs + replays,
            "replug_recovery_s": round(traffic.recovery_s, 3)
            if traffic.recovery_s is not None else None,
            "completed": done,
            "bit_error_rate": bit_error_rate,
            "drop_rate": drop_rate,
            "wire_faults": {"to_host": sim.to_host.counts, "from_host": sim.from_host.counts},
            "protocol": protocol,
            "link": {"bad_frames": proto.link.stats.bad_frames,
                     "duplicates": proto.link.stats.duplicates,
                     "window": proto.link.window,
                     "gaps": proto.link.stats.gaps,
                     "held_ahead": proto.link.stats.held_ahead,
                     "device_retransmits": sim.device.stats.retransmits,
                     "device_handshakes": sim.device.stats.handshakes,
                     "device_fallbacks": sim.device.stats.fallbacks},
            "duration_s": round(time.monotonic() - t0, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _send(sim: TagReceiverSim, plan: list[str], *, rng: random.Random, rate: float,
          reboot: bool, unplug: bool, unplug_s: float) -> _Traffic:
    """Send *plan* (genuine, spoof, replay) at *rate*; a reboot a quarter of the way in,
    an unplug half-way."""
    traffic = _Traffic(sent=len(plan))
    tags = sim.tags
    t0 = time.monotonic()
    for n, planned in enumerate(plan):
        tag = tags[n % len(tags)]
        kind = "spoof" if planned == "replay" and not tag.history else planned
        if kind == "genuine":
            sim.send_beacon(tag)
            beacon = tag.history[-1]
            traffic.genuine[(beacon.tag, beacon.counter)] = beacon
        elif kind == "spoof":
            sim.send_forged(tag)
        else:
            sim.send_replay(tag, rng.randrange(len(tag.history)))
        if reboot and n == len(plan) // 4:
            sim.reboot()  # power glitch: the queue survives in flash, the link does not
        if unplug and n == len(plan) // 2:
            sim.unplug()
            _pause.wait(unplug_s)  # the cable stays out this long
            before = len(sim.acked())
            sim.replug()
            t_replug = time.monotonic()
            if _wait(lambda b=before: len(sim.acked()) > b, 30):
                traffic.recovery_s = time.monotonic() - t_replug
        while time.monotonic() - t0 < n / rate:
            _pause.wait(0.001)
    return traffic


def _committed(tmp: Path, identity: Identity) -> tuple[dict[int, list[dict[str, Any]]],
                                                         list[dict[str, Any]]]:
    """The store's records that name a device event (by event id), and its intervals."""
    seen: dict[int, list[dict[str, Any]]] = {}
    intervals: list[dict[str, Any]] = []
    reader = StoreReader(store_path(tmp / "data"), identity.storage_key)
    try:
        for data in reader.queued():
            rec = json.loads(data)
            if rec["src"]["class"] != "tag_receiver":
                continue
            ev = rec["body"].get("dev_event")
            if rec["kind"] == "tag.interval":
                intervals.append(rec["body"])
            elif ev is not None and rec["kind"] in _EVENT_KINDS:
                seen.setdefault(ev, []).append(rec)
    finally:
        reader.close()
    return seen, intervals


def _check(seen: dict[int, list[dict[str, Any]]], intervals: list[dict[str, Any]],
           sim: TagReceiverSim, traffic: _Traffic) -> dict[str, Any]:
    """Each event the device made: committed once, lost, duplicated, or corrupted. A
    genuine beacon (sent again by a replaying tag, too) is committed by the interval that
    covers its counter, or by the ``tag.spoof`` of a replay: of the events carrying one
    beacon, one is covered and the others rejected."""
    corrupted = sum(recs[0]["kind"] == "device.error" for recs in seen.values())
    spoof_rejected = sum(recs[0]["kind"] == "tag.spoof" for recs in seen.values())
    coverage = Coverage(intervals)
    for body in intervals:  # an interval says what its last beacon said
        last = beacon_of(MSG_BEACON, sim.sent.get(body["dev_events"][1], b""))
        expected = traffic.genuine.get((body["tag"], body["last_counter"]))
        if last != (body["tag"], body["last_counter"]) or expected is None or \
                expected.battery_pct != body["battery_pct"] or \
                expected.strap_closed != body["strap_closed"]:
            corrupted += 1
    by_beacon: dict[tuple[str, int], list[int]] = {}
    once = lost = duplicated = 0
    for event, raw in sim.sent.items():
        key = beacon_of(MSG_BEACON, raw)
        if key is not None and key in traffic.genuine:
            by_beacon.setdefault(key, []).append(event)
            continue
        records = len(seen.get(event, []))  # a forged beacon: its tag.spoof
        once += records == 1
        lost += records == 0
        duplicated += records > 1
    for (tag, counter), events in by_beacon.items():
        covered = coverage.count(tag, counter)
        rejections = [len(seen.get(e, [])) for e in events]  # replays: their tag.spoof
        once += rejections.count(1)
        duplicated += sum(n > 1 for n in rejections)
        unrejected = [e for e, n in zip(events, rejections, strict=True) if n == 0]
        if covered > 1 or (covered and not unrejected):
            duplicated += 1  # accepted twice, or accepted and rejected
        elif covered:
            once += 1
            lost += len(unrejected) - 1
        else:
            lost += len(unrejected)
    return {
        "events_committed_once": once,
        "events_lost": lost,
        "events_duplicated": duplicated,
        "events_corrupted": corrupted,
        "spoof_rejected": spoof_rejected,
        "intervals": coverage.intervals,
    }
