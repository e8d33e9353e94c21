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
from pathlib import Path
from typing import Any

from app.assembly import Gateway
from app.config import Config, DeviceSection
from buffer.store import StoreReader
from core.devices import tag_ref
from core.kinds import Priority
from core.mqtt import BrokerConfig
from drivers.tag_receiver import Beacon
from firmware_bridge.messages import DeviceClass
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.wire import Damage
from provisioning.identity import create_identity
from provisioning.registry import open_registry

_pause = threading.Event()


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        _pause.wait(0.01)
    return True


def run(events: int = 2000, *, bit_error_rate: float = 1e-3, drop_rate: float = 0.01,
        spoofs: int = 25, replays: int = 25, rate: float = 200.0, seed: int = 1,
        unplug: bool = True, unplug_s: float = 1.0, reboot: bool = True,
        garbage_rate: float = 0.01, byte_delay_s: float = 0.0,
        timeout_s: float = 300.0) -> dict[str, Any]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-faults-"))
    try:
        identity = create_identity(tmp / "identity", "gw-faults-0001")
        tags = [SimTag(0x3000 + i, bytes([0x40 + i]) * 16) for i in range(3)]
        registry = open_registry(identity)
        for tag in tags:
            registry.pair(tag_ref(tag.tag_id), tag.key)
        registry.close()
        sim = TagReceiverSim(
            "TR-FAULTS-01", tags=tags, link=tmp / "ttyTAGS",
            to_host=Damage(bit_error_rate, drop_rate, garbage_rate, seed=seed),
            from_host=Damage(bit_error_rate, drop_rate, garbage_rate, seed=seed + 1),
            byte_delay_s=byte_delay_s,
        ).start()
        nowhere = BrokerConfig("127.0.0.1", 9, tls=False)  # records stay in the store
        config = Config(tmp / "data", nowhere,
                        devices=[DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)])
        gateway = Gateway(config, identity)
        gateway.start()
        genuine: dict[tuple[str, int], Beacon] = {}
        kinds = ["genuine"] * events + ["spoof"] * spoofs + ["replay"] * replays
        rng.shuffle(kinds)
        recovery = None
        t0 = time.monotonic()
        for n, planned in enumerate(kinds):
            tag = tags[n % len(tags)]
            kind = "spoof" if planned == "replay" and not tag.history else planned
            if kind == "genuine":
                sim.send_beacon(tag)
                beacon = tag.history[-1]
                genuine[(beacon.tag, beacon.counter)] = beacon
            elif kind == "spoof":
                sim.send_forged(tag)
            else:
                sim.send_replay(tag, rng.randrange(len(tag.history)))
            if reboot and n == len(kinds) // 4:
                sim.reboot()  # power glitch: the queue survives in flash, the link does not
            if unplug and n == len(kinds) // 2:
                sim.unplug()
                time.sleep(unplug_s)  # the cable stays out this long
                before = len(sim.acked())
                sim.replug()
                t_replug = time.monotonic()
                if _wait(lambda b=before: len(sim.acked()) > b, 30):
                    recovery = time.monotonic() - t_replug
            while time.monotonic() - t0 < n / rate:
                _pause.wait(0.001)
        sent = len(kinds)
        done = _wait(lambda: len(sim.acked()) >= sent, timeout_s)
        gateway.stop(drain_s=0)
        sim.stop()

        reader = StoreReader(tmp / "data" / "records.db", identity.storage_key)
        seen: dict[int, list[dict[str, Any]]] = {}
        cursors: dict[Priority, int] = {}
        while (batch := reader.next_batch(cursors, 5000, 1 << 30)) is not None:
            cursors[batch[0]] = batch[1][-1][0]
            for _, data in batch[1]:
                rec = json.loads(data)
                ev = rec["body"].get("dev_event")
                if rec["src"]["class"] == "tag_receiver" and ev is not None and \
                        rec["kind"] in ("tag.presence", "tag.spoof", "device.error"):
                    seen.setdefault(ev, []).append(rec)
        reader.close()
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
                expected = genuine.get((body["tag"], body["counter"]))
                if expected is None or expected.battery_pct != body["battery_pct"] or \
                        expected.strap_closed != body["strap_closed"]:
                    corrupted += 1
        event_ids = set(sim.sent)
        return {
            "events_sent": sent,
            "events_acked": len(sim.acked()),
            "events_committed_once": sum(1 for e in event_ids if len(seen.get(e, [])) == 1),
            "events_lost": sum(1 for e in event_ids if e not in seen),
            "events_duplicated": sum(1 for e in event_ids if len(seen.get(e, [])) > 1),
            "events_corrupted": corrupted,
            "spoof_sent": spoofs + replays,
            "spoof_rejected": spoof_rejected,
            "replug_recovery_s": round(recovery, 3) if recovery is not None else None,
            "completed": done,
            "bit_error_rate": bit_error_rate,
            "drop_rate": drop_rate,
            "wire_faults": {"to_host": sim.to_host.counts, "from_host": sim.from_host.counts},
            "link": {"bad_frames": gateway.protocols["tags"].link.stats.bad_frames,  # type: ignore[attr-defined]
                     "duplicates": gateway.protocols["tags"].link.stats.duplicates,  # type: ignore[attr-defined]
                     "device_retransmits": sim.device.stats.retransmits},
            "duration_s": round(time.monotonic() - t0, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
