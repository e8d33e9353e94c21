"""``gateway.py demo``: the whole path on one machine, every part real.

A private mosquitto on loopback with mTLS and the production ACL (unless
``--broker`` names one), simulated devices on pseudo-terminals, the gateway
with a throwaway identity in a temporary directory, and the platform-side
verifier. Live counts go to stderr; the summary to stdout, and a PROBLEM says why on
the lines after it; with ``--json`` stdout holds one JSON object and nothing else (the
summary line goes to stderr). While it runs, ``gateway.py status --runtime-dir DIR``
shows the gateway as a technician would see it (the demo prints DIR).

On someone's broker (``--broker``) the demo is a guest: its platform subscribes with a
group and client id of its own (:func:`demo_platform`), to its own gateway only, and with
no lasting session, so it never takes a share of a real ingest's records, during the run
or after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.mqtt import BrokerConfig
from core.topics import COMMAND_CN, PLATFORM_CN
from lab.acked import AckedCounter
from lab.mosquitto import BrokerError, client_config, make_pki, start_mosquitto
from lab.presence import platform_intervals
from lab.simulators.kiosk import KioskSim
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import IngestPlatform, PlatformError, Site
from lab.swtpm import Swtpm, SwtpmError
from provisioning.identity import Identity, create_identity
from provisioning.renewal import RenewalPolicy

log = logging.getLogger(__name__)
#: Every demo run is a new gateway: this prefix and 8 random hex digits
#: (:func:`demo_gateway_id`), so the records of two runs never collide at a platform
#: (a gateway id is never reused with a new identity: docs/records.md, Keys).
DEMO_GATEWAY_PREFIX = "demo-gw-"
#: The demo shows health records often; a real gateway sends one every 5 minutes.
DEMO_HEALTH_INTERVAL_S = 5.0
DEMO_FIX_INTERVAL_S = 5.0
#: A person checks in every this many seconds; the kiosk's case is opened and closed.
CHECKIN_EVERY_S = 5
TAMPER_AT_S, TAMPER_CLEARED_AT_S = 7, 9
#: How long the end of the demo waits for devices, the broker and the platform, seconds.
DRAIN_S = 30.0
EXIT_PROBLEM, EXIT_BAD_ARGS, EXIT_NO_BROKER = 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds, drain and print a summary "
                             "(default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="beacons per second from the simulated tags (default 50)")
    parser.add_argument("--tags", type=int, default=3,
                        help="number of simulated tags (default 3)")
    parser.add_argument("--broker", metavar="HOST:PORT", default=None,
                        help="use this broker (plain MQTT) instead of a private mosquitto")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout, and nothing "
                             "else (everything for people goes to stderr)")
    parser.add_argument("--no-gnss", action="store_true", help="run without the GNSS simulator")
    parser.add_argument("--suite", choices=("ed25519", "sm"), default="ed25519",
                        help="signatures, hash and cipher: Ed25519/SHA-256/AES-256-GCM "
                             "(default) or SM2/SM3/SM4-GCM")
    parser.add_argument("--no-tpm", action="store_true",
                        help="keys in files instead of a software TPM (swtpm)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--scenario", choices=("basic", "supervision"), default="basic",
                        help="basic: devices and records only (default); supervision: also "
                             "the platform's signed commands: authorisations (one lapsing "
                             "through a lab-only clock step), presence rules broken and "
                             "kept, a late return from leave, a night spot check, a forged "
                             "and a replayed command (lab/scenario_supervision.py)")


def demo_gateway_id() -> str:
    """A fresh gateway id for one demo run."""
    return DEMO_GATEWAY_PREFIX + secrets.token_hex(4)


def demo_platform(broker: BrokerConfig, identity: Identity, db_url: str, *,
                  private: bool) -> IngestPlatform:
    """The demo's ingest: group ``demo-<gateway id>``, no lasting session; the client id
    ``demo-<gateway id>``, or on the demo's *private* broker (which binds the client id to
    the certificate) the platform certificate's CN."""
    gw = identity.gateway_id
    return IngestPlatform(broker, identity, db_url,
                          client_id=PLATFORM_CN if private else f"demo-{gw}",
                          group=f"demo-{gw}")


def _parse_hostport(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.tags < 1:
        print("demo: --rate must be positive and --tags at least 1", file=sys.stderr)
        return EXIT_BAD_ARGS
    broker = _parse_hostport(args.broker) if args.broker else None
    if args.broker and broker is None:
        print(f"demo: --broker: expected HOST:PORT (e.g. 127.0.0.1:1883), got {args.broker!r}",
              file=sys.stderr)
        return EXIT_BAD_ARGS
    tmp = Path(tempfile.mkdtemp(prefix="smartcorr-demo-"))
    try:
        with contextlib.ExitStack() as stack:
            return _run(args, broker, tmp, stack)
    except (BrokerError, PlatformError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_NO_BROKER
    finally:
        if args.keep:
            print(f"demo: files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _brokers(broker: tuple[str, int] | None, tmp: Path, stack: contextlib.ExitStack,
             gateway_id: str) -> tuple[BrokerConfig, BrokerConfig, BrokerConfig]:
    """(the gateway's, the platform's, the command publisher's) connection: to *broker* in
    plain MQTT, or to a private mosquitto with mTLS and the production ACL."""
    if broker is not None:
        plain = BrokerConfig(*broker, tls=False)
        return plain, plain, plain
    pki = make_pki(tmp / "pki")
    mosq = start_mosquitto(tmp / "mosquitto", pki)
    stack.callback(mosq.stop)
    print(f"demo: mosquitto with mTLS on {mosq.host}:{mosq.port}", file=sys.stderr)
    return (client_config(mosq, pki, gateway_id), client_config(mosq, pki, PLATFORM_CN),
            client_config(mosq, pki, COMMAND_CN))


def _swtpm(tmp: Path, stack: contextlib.ExitStack) -> str | None:
    """A software TPM for the demo's identity (as a TPM 2.0 module on a real gateway); None,
    said loudly, when swtpm cannot be had."""
    try:
        tpm = Swtpm(tmp / "swtpm").start()
    except SwtpmError as exc:
        print(f"demo: WARNING: no software TPM ({exc}); the identity and storage keys are "
              "FILES this time", file=sys.stderr)
        return None
    stack.callback(tpm.stop)
    print(f"demo: software TPM at {tpm.tcti}", file=sys.stderr)
    return tpm.tcti


def _run(args: argparse.Namespace, broker: tuple[str, int] | None, tmp: Path,
         stack: contextlib.ExitStack) -> int:
    gateway_id = demo_gateway_id()
    identity = create_identity(tmp / "identity", gateway_id, suite_name=args.suite,
                               tpm=None if args.no_tpm else _swtpm(tmp, stack))
    stack.callback(identity.close)
    print(f"demo: identity key {identity.kid} ({identity.key.alg}, class "
          f"{identity.key_class}), suite {identity.suite.name}", file=sys.stderr)
    gw_broker, plat_broker, cmd_broker = _brokers(broker, tmp, stack, gateway_id)
    platform = demo_platform(plat_broker, identity, f"sqlite:///{tmp / 'platform.db'}",
                             private=broker is None).start()
    stack.callback(platform.stop)
    acked = AckedCounter()
    scenario = None
    if args.scenario == "supervision":
        from lab.scenario_supervision import Supervised
        scenario = Supervised(tmp, identity, platform.db_url, cmd_broker)
    site = (scenario.make_site if scenario else Site)(
        tmp, identity, gw_broker, health_interval_s=DEMO_HEALTH_INTERVAL_S, on_acked=acked,
        runtime_dir=tmp / "run",
        renewal=RenewalPolicy(enabled=False))  # no enrolment service to renew with
    stack.callback(site.close, 2.0)
    tags = [SimTag(0x1000 + i, secrets.token_bytes(16)) for i in range(args.tags)]
    tags += scenario.tags if scenario else []
    tag_sim = site.tag_receiver(tags, "TR-DEMO-0001")
    kiosk = site.kiosk("KI-DEMO-0001")
    gnss = "no GNSS" if args.no_gnss else \
        f"GNSS on {site.gnss(fix_interval_s=DEMO_FIX_INTERVAL_S).path}"
    site.start()
    print(f"demo: tags on {tag_sim.path}, {gnss}; gateway {gateway_id}", file=sys.stderr)
    print(f"demo: its state: python gateway.py status --watch --runtime-dir {tmp / 'run'}",
          file=sys.stderr)
    drive = _Drive(site, platform, tag_sim, kiosk, args.rate)
    if scenario:
        drive.silent = scenario.silent
        scenario.start(site)
    elapsed = drive.run(args.duration)
    if scenario:
        scenario.finish()
    drained = _drain(site, platform, drive, acked)
    out = _summary(site, platform, drive, published=acked.count, elapsed=elapsed,
                   drained=drained)
    ok = (out["published"] == out["received"] == out["verified"] > 0
          and out["bad_signature"] == 0 and out["chain_gaps"] == 0
          and out["forged_certificate"] == 0 and out["quarantined"] == 0
          and out["conflicts"] == 0
          and out["beacons_acked"] == drive.beacons
          # presence goes out as intervals: every beacon in one (a scenario's tags are
          # not recorded outside their authorised periods)
          and (scenario is not None or out["beacons_in_intervals"] == drive.beacons)
          and out["kinds"].get("checkin", 0) == drive.checkins)
    if scenario:
        out.update(scenario.counts(out["kinds"]))
        ok = ok and not scenario.problems(out)
    human = sys.stderr if args.json else sys.stdout  # --json: one JSON object on stdout
    print(
        f"demo summary: {drive.beacons} beacons sent, {out['beacons_acked']} acked by the "
        f"gateway, {out['beacons_in_intervals']} in {out['intervals']} presence intervals; "
        f"{out['committed']} records committed in {out['transactions']} transactions; "
        f"{out['published']} published; {out['received']} received, {out['verified']} verified, "
        f"{out['bad_signature']} bad signatures, {out['chain_gaps']} chain gaps, "
        f"{out['duplicates']} duplicates; {out['records_per_s']} records/s "
        f"-> {'OK' if ok else 'PROBLEM'}", file=human,
    )
    if not ok:
        for reason in why_problem(out, drive.beacons, drive.checkins, platform,
                                  every_beacon_recorded=scenario is None) + (
                scenario.problems(out) if scenario else []):
            print(f"  {reason}", file=human)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0 if ok else EXIT_PROBLEM


def why_problem(out: dict[str, Any], beacons: int, checkins: int,
                platform: IngestPlatform, *, every_beacon_recorded: bool = True) -> list[str]:
    """Why the summary is a PROBLEM: one line per thing that is not as it should be."""
    reasons = []
    published, received = out["published"], out["received"]
    if received != published or not published:
        report: dict[str, Any] = platform.report()
        quarantined = report.get("quarantined") or {}
        held = int(report.get("held_for_key") or 0)
        what = [f"held for a key: {held}"] if held else []
        if quarantined:
            what.append("quarantined: " + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(quarantined.items())))
        if not what:
            what.append(f"the ingest held and quarantined nothing: did its subscription "
                        f"({platform.consumer.topic}) get the records (the broker's ACL, "
                        "another broker)?")
        reasons.append(f"{received} of {published} published records reached the demo's "
                       f"ingest: {'; '.join(what)}")
    if not out["drained"]:
        reasons.append("the gateway did not forward everything before it stopped")
    if out["verified"] != received:
        reasons.append(f"{out['verified']} of {received} received records verified")
    for key, text in (("bad_signature", "records with a bad signature"),
                      ("chain_gaps", "chain gaps"),
                      ("forged_certificate", "forged key certificates"),
                      ("quarantined", "records quarantined"),
                      ("conflicts", "conflicting records for a seq")):
        if out[key]:
            reasons.append(f"{out[key]} {text}")
    if out["beacons_acked"] != beacons:
        reasons.append(f"{out['beacons_acked']} of {beacons} beacons acked by the gateway")
    in_intervals = out.get("beacons_in_intervals", beacons)
    if every_beacon_recorded and in_intervals != beacons:
        reasons.append(f"{in_intervals} of {beacons} beacons in the presence intervals "
                       "received")
    if out["kinds"].get("checkin", 0) != checkins:
        reasons.append(f"{out['kinds'].get('checkin', 0)} of {checkins} check-ins stored")
    return reasons


class _Drive:
    """The people and things of the demo: tags beacon at *rate*, a person checks in every
    few seconds, someone opens the kiosk's case; live counts every second."""

    def __init__(self, site: Site, platform: IngestPlatform, tag_sim: TagReceiverSim,
                 kiosk: KioskSim, rate: float) -> None:
        self.site, self.platform = site, platform
        self.tag_sim, self.kiosk, self.rate = tag_sim, kiosk, rate
        self.beacons = 0
        self.checkins = 0
        self.pause = threading.Event()
        self.silent: set[int] = set()  # tag ids not beaconing for now (a scenario's)

    def run(self, duration: float | None) -> float:
        """Until *duration* seconds have passed (or Ctrl-C); the time it ran."""
        start = time.monotonic()
        next_second = 1
        try:
            while duration is None or time.monotonic() - start < duration:
                target = int((time.monotonic() - start) * self.rate)
                while self.beacons < target:
                    tags = [t for t in self.tag_sim.tags if t.tag_id not in self.silent]
                    if not tags:
                        break
                    self.tag_sim.send_beacon(tags[self.beacons % len(tags)])
                    self.beacons += 1
                if time.monotonic() - start >= next_second:
                    next_second += 1
                    self._second(next_second)
                self.pause.wait(min(0.02, 1 / self.rate))
        except KeyboardInterrupt:
            print("\ndemo: interrupted, draining", file=sys.stderr)
        return time.monotonic() - start

    def _second(self, second: int) -> None:
        self._live()
        if second % CHECKIN_EVERY_S == 0:
            self.checkins += 1
            self.kiosk.checkin(f"P-{self.checkins:06d}", "fingerprint", 960)
        if second == TAMPER_AT_S:
            self.kiosk.set_status(tamper=True)
        if second == TAMPER_CLEARED_AT_S:
            self.kiosk.set_status(tamper=False)

    def _live(self) -> None:
        s = self.platform.summary()
        gateway = self.site.gateway
        print(
            f"beacons {self.beacons:6d}  acked {len(self.tag_sim.acked()):6d}  committed "
            f"{gateway.writer.stats.committed:6d}  published "
            f"{gateway.forwarder.stats.records_acked:6d}  verified {s['verified']:6d}  "
            f"bad {s['bad_signature']}  dup {s['duplicates']}",
            file=sys.stderr,
        )


def _drain(site: Site, platform: IngestPlatform, drive: _Drive, acked: AckedCounter) -> bool:
    """Every beacon acked by the gateway, then everything forwarded and received."""
    deadline = time.monotonic() + DRAIN_S
    sim, kiosk = drive.tag_sim, drive.kiosk
    while (sim.queued() or len(sim.acked()) < drive.beacons or kiosk.queued()) \
            and time.monotonic() < deadline:
        drive.pause.wait(0.05)
    drained = site.stop_gateway(drain_s=DRAIN_S)
    deadline = time.monotonic() + DRAIN_S
    while platform.summary()["received"] < acked.count and time.monotonic() < deadline:
        drive.pause.wait(0.05)
    return drained


def _summary(site: Site, platform: IngestPlatform, drive: _Drive, *, published: int,
             elapsed: float, drained: bool) -> dict[str, Any]:
    summary = platform.summary()
    report = platform.report()
    stats = site.gateway.writer.stats
    intervals = platform_intervals(platform.db_url, site.identity.gateway_id)
    return {
        "intervals": len(intervals),
        "beacons_in_intervals": sum(int(str(b.get("beacons", 0))) for b in intervals),
        "published": published,
        "received": summary["received"],
        "verified": summary["verified"],
        "bad_signature": summary["bad_signature"],
        "chain_gaps": summary["chain_gaps"],
        "duplicates": summary["duplicates"],
        "committed": stats.committed,
        "beacons_sent": drive.beacons,
        "beacons_acked": len(drive.tag_sim.acked()),
        "checkins_sent": drive.checkins,
        "transactions": stats.transactions,
        "duration_s": round(elapsed, 2),
        "records_per_s": round(summary["verified"] / elapsed, 1) if elapsed else 0,
        "drained": drained,
        "gateway": site.identity.gateway_id,
        "kinds": report["kinds"],
        "key_classes": report["key_classes"],
        "quarantined": summary["quarantined"],
        "conflicts": summary["conflicts"],
        "platform_db": platform.db_url,
        "forged_certificate": summary["forged_certificate"],
        "suite": site.identity.suite.name,
    }
