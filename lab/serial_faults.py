"""Serial fault scenarios over pseudo-terminals, through the real gateway stack.

A tag receiver simulator talks to the gateway over a pty while the wire flips
bits and drops bytes in both directions; a spoofing tag (wrong key) and a
replaying tag (old beacons sent again) mix in; half-way, the receiver's USB
cable is pulled and plugged back. Afterwards every event the simulator
generated is looked up in the gateway's store. :func:`run` returns the figures
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
from drivers.tag_receiver import Beacon
from firmware_bridge.framed import FramedDeviceProtocol
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import NOWHERE, Site
from lab.wire import Damage
from provisioning.identity import Identity, create_identity

_pause = threading.Event()
#: Device messages whose records say which device event they came from.
_EVENT_KINDS = ("tag.presence", "tag.spoof", "device.error")


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
        out = _check(_committed_events(tmp, identity), sim, traffic)
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


def _committed_events(tmp: Path, identity: Identity) -> dict[int, list[dict[str, Any]]]:
    """The records of the store that name a device event, by event id."""
    seen: dict[int, list[dict[str, Any]]] = {}
    reader = StoreReader(store_path(tmp / "data"), identity.storage_key)
    try:
        for data in reader.queued():
            rec = json.loads(data)
            ev = rec["body"].get("dev_event")
            if rec["src"]["class"] == "tag_receiver" and ev is not None and \
                    rec["kind"] in _EVENT_KINDS:
                seen.setdefault(ev, []).append(rec)
    finally:
        reader.close()
    return seen


def _check(seen: dict[int, list[dict[str, Any]]], sim: TagReceiverSim,
           traffic: _Traffic) -> dict[str, Any]:
    """Each event the device made: committed once, lost, duplicated, or corrupted."""
    corrupted = 0
    spoof_rejected = 0
    for recs in seen.values():
        rec = recs[0]
        if rec["kind"] == "device.error":
            corrupted += 1
        elif rec["kind"] == "tag.spoof":
            spoof_rejected += 1
        else:
            body = rec["body"]
            expected = traffic.genuine.get((body["tag"], body["counter"]))
            if expected is None or expected.battery_pct != body["battery_pct"] or \
                    expected.strap_closed != body["strap_closed"]:
                corrupted += 1
    event_ids = set(sim.sent)
    return {
        "events_committed_once": sum(1 for e in event_ids if len(seen.get(e, [])) == 1),
        "events_lost": sum(1 for e in event_ids if e not in seen),
        "events_duplicated": sum(1 for e in event_ids if len(seen.get(e, [])) > 1),
        "events_corrupted": corrupted,
        "spoof_rejected": spoof_rejected,
    }
