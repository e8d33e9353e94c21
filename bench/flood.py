#!/usr/bin/env python3
"""Flooding and flapping devices against the real gateway stack: the RSS over time.

Each device is :mod:`lab.simulators.flood` in its own process (so it writes at full
pty speed): ``data`` ignores stop-and-wait and sends genuine beacons of a paired tag
as fast as the pty takes them, ``unknown`` sends beacons of random unpaired tags,
``hello`` says HELLO in a loop. This process runs the gateway's own store, writer,
link, driver and port worker for each, and prints its RSS (/proc/self/status) every
second:

    python bench/flood.py --seconds 30 --mode all

The last line is one JSON object: ``rss_mb_start``, ``rss_mb_max``, ``rss_mb_end``,
``frames_sent``, ``frames_received``, ``frames_committed`` (beacons committed, as the
ledger entries of their tag's presence interval, then ACKed), ``intervals`` (``tag.interval``
records), ``held_busy`` (held back by the link's bound), ``pauses`` (the port stopped
reading), ``device_up_records``, ``device_flapping_records``, and per port the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.assembly import Pipeline  # noqa: E402
from core.clock import Clock  # noqa: E402
from core.devices import PairedTag, tag_ref  # noqa: E402
from core.record import Source  # noqa: E402
from drivers.tag_receiver import TagReceiverDriver  # noqa: E402
from firmware_bridge.framed import FramedDeviceProtocol  # noqa: E402
from firmware_bridge.messages import DeviceClass  # noqa: E402
from firmware_bridge.port import PortWorker  # noqa: E402
from lab.site import NOWHERE  # noqa: E402 - a broker nobody reaches: records stay in the store
from provisioning.identity import create_identity  # noqa: E402

TAG_ID = 0x00F1_00D0
TAG_KEY = bytes(range(16))
#: The issue's target: the gateway's RSS under a 30-second flood, MiB.
RSS_TARGET_MB = 80
SETTLE_S = 2.0  # after the devices stop: the last commits and ACKs


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def start_device(mode: str, link: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.simulators.flood", "--link", str(link), "--mode", mode,
         "--seconds", str(seconds), "--tag-id", hex(TAG_ID), "--key", TAG_KEY.hex()],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {mode} device did not start")
    return proc


def run(modes: list[str], seconds: float, workdir: Path) -> dict[str, object]:
    identity = create_identity(workdir / "identity", "gw-bench-flood")
    pipe = Pipeline(workdir / "data", identity, NOWHERE, clock=Clock(),
                    source=Source("gateway", identity.gateway_id))
    rss_start = rss_mb()
    pipe.start(uplink=False)
    writer = pipe.writer
    tags = {tag_ref(TAG_ID): PairedTag(tag_ref(TAG_ID), TAG_KEY, 600, 0)}
    ports: dict[str, tuple[FramedDeviceProtocol, PortWorker, subprocess.Popen[str]]] = {}
    for mode in modes:
        device = start_device(mode, workdir / f"tty-{mode}", seconds)
        proto = FramedDeviceProtocol(mode, DeviceClass.TAG_RECEIVER,
                                     TagReceiverDriver(tags, writer.ledger_value),
                                     writer)
        worker = PortWorker(mode, str(workdir / f"tty-{mode}"), 115200, proto)
        worker.start()
        ports[mode] = (proto, worker, device)
    rss_max = rss_mb()
    started = time.monotonic()
    while any(dev.poll() is None for _, _, dev in ports.values()):
        time.sleep(1.0)
        rss = rss_mb()
        rss_max = max(rss_max, rss)
        frames = sum(p.link.stats.frames_in for p, _, _ in ports.values())
        print(f"{time.monotonic() - started:5.1f} s  rss {rss:6.1f} MB  frames in {frames:>9}"
              f"  committed {writer.stats.committed:>8}  backlog {writer.backlog:>6}",
              file=sys.stderr, flush=True)
    time.sleep(SETTLE_S)
    per_port: dict[str, dict[str, object]] = {}
    for mode, (proto, worker, device) in ports.items():
        out, _ = device.communicate()
        sent = json.loads(out.strip().splitlines()[-1])
        worker.stop()
        per_port[mode] = {
            "frames_sent": sent["frames_sent"], "frames_received": proto.link.stats.frames_in,
            "events_acked": sent["acked_events"], "held_busy": proto.link.stats.held_busy,
            "pauses": proto.stats.pauses, "handshakes": proto.link.stats.handshakes,
            "frames_committed": proto.stats.acked,  # records or ledger entries, then ACKed
        }
    rss_max = max(rss_max, rss_mb())
    pipe.stop(drain_s=0)
    kinds = writer.stats.by_kind
    totals = {key: sum(int(p[key]) for p in per_port.values())  # type: ignore[call-overload]
              for key in ("frames_sent", "frames_received", "held_busy", "pauses")}
    return {
        "seconds": seconds, "modes": modes, "rss_mb_start": round(rss_start, 1),
        "rss_mb_max": round(rss_max, 1), "rss_mb_end": round(rss_mb(), 1),
        **totals, "frames_committed": sum(int(str(p["frames_committed"]))
                                          for p in per_port.values()),
        "intervals": kinds["tag.interval"],
        "records_committed": writer.stats.committed,
        "device_up_records": kinds["device.up"],
        "device_flapping_records": kinds["device.flapping"],
        "rss_target_mb": RSS_TARGET_MB, "ports": per_port,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=["data", "unknown", "hello", "all"], default="all")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument("--json", action="store_true",
                        help="stdout is exactly one JSON object (progress goes to stderr)")
    args = parser.parse_args(argv)
    modes = ["data", "unknown", "hello"] if args.mode == "all" else [args.mode]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(modes, args.seconds, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
            result = run(modes, args.seconds, Path(tmp))
    ok = result["rss_mb_max"] < RSS_TARGET_MB  # type: ignore[operator]
    if not args.json:
        print(f"flood: RSS {result['rss_mb_start']} -> max {result['rss_mb_max']} MB "
              f"(target < {RSS_TARGET_MB}); {result['frames_sent']} frames sent, "
              f"{result['frames_committed']} beacons committed, {result['device_up_records']} "
              f"device.up from {sum(int(p['handshakes']) for p in result['ports'].values())} "  # type: ignore[attr-defined]
              f"handshakes -> {'OK' if ok else 'PROBLEM'}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
