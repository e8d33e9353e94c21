"""``gateway.py demo``: the whole path on one machine, every part real.

A private mosquitto on loopback with mTLS and the production ACL (unless
``--broker`` names one), simulated devices on pseudo-terminals, the gateway
with a throwaway identity in a temporary directory, and the platform-side
verifier. Live counts go to stderr; the summary to stdout (with ``--json`` its
last line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app.assembly import Gateway
from app.config import Config, DeviceSection, GnssSection
from central.client import VerifierClient
from core.devices import tag_ref
from core.mqtt import BrokerConfig
from core.topics import PLATFORM_CN
from firmware_bridge.messages import DeviceClass
from lab.acked import AckedCounter
from lab.mosquitto import BrokerError, make_pki, start_mosquitto
from lab.simulators.gnss import GnssSim
from lab.simulators.kiosk import KioskSim
from lab.simulators.tag import SimTag, TagReceiverSim
from provisioning.identity import create_identity, load_public_keys
from provisioning.registry import open_registry

log = logging.getLogger(__name__)
DEMO_GATEWAY_ID = "demo-gw-0001"
#: The demo shows health records often; a real gateway sends one every 5 minutes.
DEMO_HEALTH_INTERVAL_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds, drain and print a summary "
                             "(default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="beacons per second from the simulated tags (default 50)")
    parser.add_argument("--tags", type=int, default=3, help="number of simulated tags")
    parser.add_argument("--broker", metavar="HOST:PORT", default=None,
                        help="use this broker (plain MQTT) instead of a private mosquitto")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on the last line")
    parser.add_argument("--no-gnss", action="store_true", help="run without the GNSS simulator")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")


def _parse_hostport(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.tags < 1:
        print("demo: --rate must be positive and --tags at least 1", file=sys.stderr)
        return 2
    broker = _parse_hostport(args.broker) if args.broker else None
    if args.broker and broker is None:
        print(f"demo: --broker: expected HOST:PORT (e.g. 127.0.0.1:1883), got {args.broker!r}",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-demo-"))
    stack: list[Any] = []
    try:
        return _run(args, broker, tmp, stack)
    except BrokerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 3
    finally:
        for item in reversed(stack):
            try:
                item()
            except Exception:
                log.exception("demo tear-down step failed")
        if args.keep:
            print(f"demo: files kept in {tmp}", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, broker: tuple[str, int] | None, tmp: Path,
         stack: list[Any]) -> int:
    identity = create_identity(tmp / "identity", DEMO_GATEWAY_ID)
    keys = load_public_keys([tmp / "identity" / "signing.pub"])
    if broker is not None:
        gw_broker = BrokerConfig(*broker, tls=False)
        plat_broker = gw_broker
    else:
        pki = make_pki(tmp / "pki")
        mosq = start_mosquitto(tmp / "mosquitto", pki)
        stack.append(mosq.stop)
        gw_files = pki.client(DEMO_GATEWAY_ID)
        plat_files = pki.client(PLATFORM_CN)
        gw_broker = BrokerConfig(mosq.host, mosq.port, str(pki.ca_file), str(gw_files.cert),
                                 str(gw_files.key))
        plat_broker = BrokerConfig(mosq.host, mosq.port, str(pki.ca_file), str(plat_files.cert),
                                   str(plat_files.key))
        print(f"demo: mosquitto with mTLS on {mosq.host}:{mosq.port}", file=sys.stderr)

    verifier = VerifierClient(plat_broker, keys)
    verifier.start()
    stack.append(verifier.stop)
    if not verifier.subscribed.wait(15):
        print("demo: the verifier could not subscribe to the broker", file=sys.stderr)
        return 3

    tags = [SimTag(0x1000 + i, secrets.token_bytes(16)) for i in range(args.tags)]
    registry = open_registry(identity)
    for tag in tags:  # what the installer does: pair each tag with this gateway
        registry.pair(tag_ref(tag.tag_id), tag.key)
    registry.close()
    tag_sim = TagReceiverSim("TR-DEMO-0001", tags=tags, link=tmp / "ttyTAGS").start()
    stack.append(tag_sim.stop)
    gnss_sim = GnssSim(link=tmp / "ttyGNSS", period_s=1.0).start()
    stack.append(gnss_sim.stop)
    kiosk = KioskSim("KI-DEMO-0001", link=tmp / "ttyKIOSK").start()
    stack.append(kiosk.stop)

    config = Config(
        tmp / "data", gw_broker,
        devices=[DeviceSection("tags", DeviceClass.TAG_RECEIVER, tag_sim.path),
                 DeviceSection("kiosk", DeviceClass.KIOSK, kiosk.path)],
        gnss=None if args.no_gnss else GnssSection(gnss_sim.path, fix_interval_s=5.0))
    acked = AckedCounter()
    gateway = Gateway(config, identity, health_interval_s=DEMO_HEALTH_INTERVAL_S,
                      on_acked=acked)
    gateway.start()
    gateway_stopped = False

    def stop_gateway() -> None:
        if not gateway_stopped:
            gateway.stop(drain_s=2)

    stack.append(stop_gateway)
    print(f"demo: tags on {tag_sim.path}, GNSS on {gnss_sim.path}; gateway {DEMO_GATEWAY_ID}",
          file=sys.stderr)

    start = time.monotonic()
    stop = threading.Event()
    beacons = 0
    checkins = 0
    next_status = start + 1
    try:
        while args.duration is None or time.monotonic() - start < args.duration:
            target = int((time.monotonic() - start) * args.rate)
            while beacons < target:
                tag_sim.send_beacon(tags[beacons % len(tags)])
                beacons += 1
            if time.monotonic() >= next_status:
                next_status += 1
                _live(gateway, verifier, beacons, tag_sim)
                if int(next_status - start) % 5 == 0:  # a person checks in every 5 s
                    checkins += 1
                    kiosk.checkin(f"P-{checkins:06d}", "fingerprint", 960)
                if int(next_status - start) == 7:  # someone opens the kiosk's case
                    kiosk.set_status(tamper=True)
                if int(next_status - start) == 9:
                    kiosk.set_status(tamper=False)
            stop.wait(min(0.02, 1 / args.rate))
    except KeyboardInterrupt:
        print("\ndemo: interrupted, draining", file=sys.stderr)
    elapsed = time.monotonic() - start

    # drain: every beacon acked by the gateway, then everything forwarded and received
    deadline = time.monotonic() + 30
    while (tag_sim.queued() or len(tag_sim.acked()) < beacons or kiosk.queued()) \
            and time.monotonic() < deadline:
        stop.wait(0.05)
    drained = gateway.stop(drain_s=30)
    gateway_stopped = True
    published = acked.count
    deadline = time.monotonic() + 30
    while verifier.summary()["received"] < published and time.monotonic() < deadline:
        stop.wait(0.05)
    summary = verifier.summary()
    out: dict[str, Any] = {
        "published": published,
        "received": summary["received"],
        "verified": summary["verified"],
        "bad_signature": summary["bad_signature"],
        "chain_gaps": summary["chain_gaps"],
        "duplicates": summary["duplicates"],
        "committed": gateway.writer.stats.committed,
        "beacons_sent": beacons,
        "beacons_acked": len(tag_sim.acked()),
        "checkins_sent": checkins,
        "transactions": gateway.writer.stats.transactions,
        "duration_s": round(elapsed, 2),
        "records_per_s": round(summary["verified"] / elapsed, 1) if elapsed else 0,
        "drained": drained,
        "kinds": verifier.verifier.kinds(DEMO_GATEWAY_ID),
    }
    ok = (out["published"] == out["received"] == out["verified"] > 0
          and out["bad_signature"] == 0 and out["chain_gaps"] == 0
          and out["beacons_acked"] == beacons
          and out["kinds"].get("checkin", 0) == checkins)
    print(
        f"demo summary: {beacons} beacons sent, {out['beacons_acked']} acked by the gateway; "
        f"{out['committed']} records committed in {out['transactions']} transactions; "
        f"{published} published; {out['received']} received, {out['verified']} verified, "
        f"{out['bad_signature']} bad signatures, {out['chain_gaps']} chain gaps, "
        f"{out['duplicates']} duplicates; {out['records_per_s']} records/s "
        f"-> {'OK' if ok else 'PROBLEM'}",
    )
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0 if ok else 1


def _live(gateway: Gateway, verifier: VerifierClient, beacons: int, sim: TagReceiverSim) -> None:
    s = verifier.summary()
    print(
        f"beacons {beacons:6d}  acked {len(sim.acked()):6d}  committed "
        f"{gateway.writer.stats.committed:6d}  published {gateway.forwarder.stats.records_acked:6d}"
        f"  verified {s['verified']:6d}  bad {s['bad_signature']}  dup {s['duplicates']}",
        file=sys.stderr,
    )
