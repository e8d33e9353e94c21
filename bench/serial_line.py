#!/usr/bin/env python3
"""One device's sustained events/s over the serial protocol, version 1 against version 2.

Through the real stack: a tag receiver simulator on a pseudo-terminal, the gateway's own
assembly (port worker, ``FramedDeviceProtocol`` with ``HostLink``, the tag driver, the
store writer sealing and committing with fsync), records kept in the store (no broker).
The device (in a process of its own, as it would be on its own microcontroller) holds a
backlog of beacons (three tags) when the gateway starts; the figure is the rate of
commit-ACKs the device receives, from its first until all but its last window are
acknowledged. With the window, beacons that only extend a presence interval are
committed once half the window waits or at the checkpoint (``[tags]
interval_checkpoint_s``, 20 s): the last events of a burst, fewer than half a window,
wait for the checkpoint by design (the device is not held: its window has room), so
that tail is reported apart (``tail_ack_s``), not averaged into the rate.

Two lines:

* **paced**: the simulator's writes go out at the configured line rate (115200 baud, 8N1:
  ten bits a byte), as through a UART. A beacon DATA frame is 32 bytes with its delimiter,
  so the wire carries at most 360 of them a second; ``one_device_line_utilisation_v*`` is
  the events/s divided by that;
* **unpaced**: as fast as the pty takes them, as a USB CDC device would send.

Version 1 is stop-and-wait (one event per round trip, commit included); version 2 here is
a device offering the WINDOW feature (docs/serial-protocol.md, section 9.8).

    python bench/serial_line.py --json

prints one JSON object as its last line: ``one_device_events_per_s_v1`` and ``_v2``
(unpaced, the figure issue 15 names; also as ``one_device_unpaced_events_per_s_v*``),
``one_device_paced_events_per_s_v1`` and ``_v2``, ``one_device_line_utilisation_v1`` and
``_v2`` (paced), and the details of each run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.config import DeviceSection  # noqa: E402
from firmware_bridge.device import WINDOW_DEFAULT  # noqa: E402
from firmware_bridge.framed import FramedDeviceProtocol  # noqa: E402
from firmware_bridge.messages import DeviceClass  # noqa: E402
from lab.simulators.device import BITS_PER_BYTE  # noqa: E402
from lab.simulators.tag import SimTag, TagReceiverSim  # noqa: E402
from lab.site import NOWHERE, Site, pair_tags  # noqa: E402
from provisioning.identity import create_identity  # noqa: E402

#: The configured line rate of the gateway's serial ports (docs/serial-protocol.md, 2).
BAUDRATE = 115_200
#: A beacon DATA frame on the wire, delimiter included (section 13.4).
BEACON_FRAME_BYTES = 32
LINE_FRAMES_PER_S = BAUDRATE / BITS_PER_BYTE / BEACON_FRAME_BYTES
_pause = threading.Event()


def _tags() -> list[SimTag]:
    return [SimTag(0x5000 + i, bytes([0x50 + i]) * 16) for i in range(3)]


def _device(conn: Connection, link: str, plan: dict[str, Any]) -> None:
    """The device, in a process of its own (as on its own microcontroller: it does not
    share the gateway's interpreter): ``plan["events"]`` beacons queued, then the ACKs
    counted."""
    events, protocol, window = plan["events"], plan["protocol"], plan["window"]
    paced, timeout_s = plan["paced"], plan["timeout_s"]
    tags = _tags()
    sim = TagReceiverSim("TR-LINE-01", tags=tags, link=Path(link), protocol_version=protocol,
                         window=window, baudrate=BAUDRATE if paced else None).start()
    try:
        for n in range(events):
            sim.send_beacon(tags[n % len(tags)])
        conn.send("ready")
        first: tuple[float, int] | None = None
        last = (0.0, 0)
        steady: tuple[float, int] | None = None  # all but the last window acknowledged
        deadline = time.monotonic() + timeout_s
        while last[1] < events and time.monotonic() < deadline:
            acked = sim.device.stats.acked
            if acked != last[1]:
                last = (time.monotonic(), acked)
                first = first or last
                if steady is None and acked >= events - sim.device.window:
                    steady = last
            _pause.wait(0.001)
        conn.send({"first": first, "last": last, "steady": steady or last,
                   "retransmits": sim.device.stats.retransmits, "window": sim.device.window})
    finally:
        sim.stop()


def run_one(events: int, *, protocol: int, window: int, paced: bool,
            timeout_s: float = 600.0) -> dict[str, Any]:
    """One run: a device holding *events* beacons, then the gateway started."""
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-line-"))
    try:
        identity = create_identity(tmp / "identity", "gw-line-0001")
        link = tmp / "tty-tags"
        ours, theirs = multiprocessing.Pipe()
        device = multiprocessing.get_context("spawn").Process(
            target=_device, args=(theirs, str(link), {
                "events": events, "protocol": protocol, "window": window, "paced": paced,
                "timeout_s": timeout_s}), daemon=True)
        device.start()
        try:
            if not ours.poll(60) or ours.recv() != "ready":
                raise RuntimeError("the device simulator did not start")
            with Site(tmp, identity, NOWHERE) as site:
                pair_tags(identity, _tags())
                site.devices.append(DeviceSection("tags", DeviceClass.TAG_RECEIVER, str(link)))
                gateway = site.start()
                done = ours.poll(timeout_s + 30)
                result = ours.recv() if done else None
                proto = gateway.protocols["tags"]
                site.stop_gateway(drain_s=0)
        finally:
            device.join(10)
            if device.is_alive():
                device.kill()
        if not isinstance(proto, FramedDeviceProtocol):  # pragma: no cover
            raise TypeError(f"port 'tags' runs {type(proto).__name__}")
        if result is None or result["first"] is None:
            raise RuntimeError("no event was acknowledged")
        (t0, n0), (t1, n1) = result["first"], result["last"]
        ts, ns = result["steady"]
        span = ts - t0
        return {
            "events": events, "acked": n1, "completed": n1 >= events,
            "events_per_s": round((ns - n0) / span, 1) if span > 0 else 0.0,
            "seconds": round(span, 2), "tail_ack_s": round(t1 - ts, 2),
            "window": result["window"], "protocol": protocol,
            "paced": paced, "device_retransmits": result["retransmits"],
            "receipts": proto.link.stats.receipts,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=6000,
                        help="beacons per run with version 2 (default 6000)")
    parser.add_argument("--events-v1", type=int, default=1000,
                        help="beacons per run with version 1, stop-and-wait (default 1000)")
    parser.add_argument("--window", type=int, default=WINDOW_DEFAULT,
                        help=f"the window the version-2 device offers (default {WINDOW_DEFAULT})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"baudrate": BAUDRATE,
                           "line_frames_per_s": round(LINE_FRAMES_PER_S, 1), "runs": {}}
    for paced in (True, False):
        for protocol, window, events in ((1, 0, args.events_v1), (2, args.window, args.events)):
            name = f"{'paced' if paced else 'unpaced'}_v{protocol}"
            print(f"{name}: {events} beacons ...", file=sys.stderr)
            res = run_one(events, protocol=protocol, window=window, paced=paced)
            out["runs"][name] = res
            print(f"  {res['events_per_s']} events/s over {res['seconds']} s (window "
                  f"{res['window']}, retransmits {res['device_retransmits']})", file=sys.stderr)
            suffix = f"v{protocol}"
            if paced:
                out[f"one_device_paced_events_per_s_{suffix}"] = res["events_per_s"]
                out[f"one_device_line_utilisation_{suffix}"] = round(
                    res["events_per_s"] / LINE_FRAMES_PER_S, 3)
            else:
                out[f"one_device_events_per_s_{suffix}"] = res["events_per_s"]
                out[f"one_device_unpaced_events_per_s_{suffix}"] = res["events_per_s"]
    ok = (out["one_device_line_utilisation_v2"] >= 0.9
          and out["one_device_events_per_s_v2"] >= 2000
          and all(r["completed"] for r in out["runs"].values()))
    print(f"paced {BAUDRATE} baud (wire limit {LINE_FRAMES_PER_S:.0f} frames/s): v1 "
          f"{out['one_device_paced_events_per_s_v1']}/s "
          f"({out['one_device_line_utilisation_v1']:.0%}),"
          f" v2 {out['one_device_paced_events_per_s_v2']}/s "
          f"({out['one_device_line_utilisation_v2']:.0%}); unpaced: v1 "
          f"{out['one_device_unpaced_events_per_s_v1']}/s, v2 "
          f"{out['one_device_unpaced_events_per_s_v2']}/s -> {'OK' if ok else 'BELOW TARGET'}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
