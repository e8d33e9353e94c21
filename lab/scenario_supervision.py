"""``gateway.py demo --scenario supervision``: the platform supervising through signed
commands (docs/commands.md, docs/supervision.md), beside the ordinary demo's traffic.

While the demo's tags beacon and people check in, a script plays the platform's side with
the real command tool (:mod:`central.commands`: signed, numbered, published at QoS 1 as
the command publisher, answered by the gateway's records at the demo's ingest):

1. four tags are authorised (Art. 29): ``home``, ``leave`` and ``check`` for 30 days;
   ``lapse`` until the end of *today* in the IANA zone whose midnight comes next;
2. ``home`` gets presence rules (must be home all week, no grace); ``leave`` an approved
   leave that ends a few seconds from now, no grace;
3. a forged command (a real one's bytes with its body changed: the signature no longer
   holds) and a replayed one (an earlier signed copy of a command the platform reissued
   and the gateway applied) are published: each is refused with a ``command.rejected``;
4. ``home`` stops beaconing: ``tag.absent`` after 10 s, a ``presence.violation`` at once;
   a night spot check (``request-presence``) finds it ABSENT; it beacons again:
   ``presence.returned``. ``leave`` is silent: its ``leave.late_return`` (it stays away
   to the end, so every ``presence.returned`` answers a ``presence.violation``);
5. ``lapse`` stops beaconing and the lab moves time: the demo's gateway reads a **lab-only
   wall clock** (:class:`LabWall`, the system clock plus an offset; a production gateway
   reads the system clock), which the script steps forward to just past that zone's
   midnight. The gateway sees it as it would see any NTP step: a ``time.step`` record,
   handed to the supervision rules (never a silent jump), and the period ends:
   ``authorisation.expired``. The step is at most about 30 minutes (every zone's midnight
   falls on a quarter hour of UTC, at :00, :15 or :30) and comes after every other step.

The summary's counts come from the records at the platform (:func:`counts`);
``spot_check_ms_p99`` is from the publication of a ``request-presence`` to its
``presence.now`` stored at the platform.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
import sys
import threading
import time
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.assembly import Gateway
from app.config import DeviceSection
from central import command_keys as root_side
from central import commands as tool
from central.commands import Issued
from central.db import open_db
from core.clock import Clock
from core.commands import command_digest
from core.mqtt import BrokerConfig
from core.record import canonical
from firmware_bridge.messages import DeviceClass
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import Site
from provisioning import command_keys as gateway_keys
from provisioning.identity import Identity
from provisioning.registry import open_registry

#: The tags the script supervises (the demo's ``--tags`` others beacon as usual).
HOME, LEAVE, LAPSE, CHECK = 0x5E01, 0x5E02, 0x5E03, 0x5E04
#: Silent this long, a tag is absent (the least a pairing allows).
ABSENT_AFTER_S = 10
#: The leave ends this long after it is approved (no grace: late unless back by then).
LEAVE_ENDS_IN_MS = 6_000
#: How long each command is valid, ms (a day; the lab step moves time by minutes).
VALID_MS = 86_400_000
#: How long the script waits for one answer or record, seconds.
WAIT_S = 30.0
#: The wall clock is stepped to this long after the zone's midnight, ms.
PAST_MIDNIGHT_MS = 2_000
COUNTED = {
    "commands_applied": "command.applied",
    "commands_rejected": "command.rejected",
    "presence_violations": "presence.violation",
    "presence_returns": "presence.returned",
    "leave_late_returns": "leave.late_return",
    "spot_checks_answered": "presence.now",
    "authorisation_expired": "authorisation.expired",
}


class ScenarioError(RuntimeError):
    """A step of the script did not happen in time."""


class LabWall:
    """The demo gateway's wall clock: the system's plus an offset the script may step
    forward (:meth:`step`). Lab only: the daemon never takes one."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns

    def step(self, ms: int) -> None:
        self.offset_ns += ms * 1_000_000


def next_midnight(after_ms: int) -> tuple[str, dt.date, int]:
    """The IANA zone whose local midnight comes first after *after_ms*: (zone, its local
    date before that midnight, the midnight in ms)."""
    at = dt.datetime.fromtimestamp(after_ms / 1000, dt.UTC)
    best: tuple[int, str, dt.date] | None = None
    for name in sorted(zoneinfo.available_timezones()):
        if name.startswith(("posix/", "right/")) or name in ("Factory", "localtime"):
            continue
        try:
            zone = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            continue
        day = at.astimezone(zone).date()
        midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
        ms = int(midnight.timestamp() * 1000)
        if best is None or ms < best[0]:
            best = (ms, name, day)
    assert best is not None  # noqa: S101 - zoneinfo always has zones
    return best[1], best[2], best[0]


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class SupervisionSite(Site):
    """The demo's site, its gateway on a :class:`LabWall` taken as synchronised (NTP, as a
    connected gateway's: commands are judged by trusted time), and its tags paired with
    :data:`ABSENT_AFTER_S`. It runs as in production, ``[supervision]
    require_authorisation = true``: a tag's presence is recorded only once the platform
    authorised it (the demo's other tags, never authorised, are counted and dropped)."""

    def __init__(self, *args: Any, wall: LabWall, **kwargs: Any) -> None:
        kwargs.setdefault("require_authorisation", True)
        super().__init__(*args, **kwargs)
        self.wall = wall

    def tag_receiver(self, tags: list[SimTag], serial: str = "TR-SITE-0001", *,
                     name: str = "tags", **_: Any) -> TagReceiverSim:
        registry = open_registry(self.identity)
        try:
            for tag in tags:
                registry.pair(tag.tag, tag.key, absent_after_s=ABSENT_AFTER_S)
        finally:
            registry.close()
        sim = TagReceiverSim(serial, tags=tags, link=self.workdir / f"tty-{name}")
        self._sims.callback(sim.stop)
        sim.start()
        self.devices.append(DeviceSection(name, DeviceClass.TAG_RECEIVER, sim.path))
        return sim

    def start(self) -> Gateway:
        self._gateway = Gateway(self.config, self.identity,
                                health_interval_s=self.health_interval_s,
                                on_acked=self.on_acked,
                                clock=Clock(synced=lambda: True, wall_ns=self.wall))
        self._gateway.start()
        return self._gateway


def scenario_tags() -> list[SimTag]:
    return [SimTag(t, secrets.token_bytes(16)) for t in (HOME, LEAVE, LAPSE, CHECK)]


@dataclass
class Platform:
    """The platform's command side: its command root and key (``ingest command-key``),
    installed in the gateway's identity as an installer does, and the demo's ingest
    database for the numbering and the answers."""

    gw: str
    db_url: str
    broker: BrokerConfig  # as the command publisher (CN core.topics.COMMAND_CN)
    signer: Any = None
    cert: Any = None
    sent: int = 0
    forged_or_replayed: int = 0
    spot_ms: list[float] = field(default_factory=list)

    def prepare(self, tmp: Path, identity: Identity) -> None:
        root_side.init_root(tmp / "command-root")
        root_side.issue(tmp / "command-root", "*", 30, tmp / "command-keys")
        root_side.export(tmp / "command-root", tmp / "command-export")
        gateway_keys.install(identity.directory, tmp / "command-export",
                             time.time_ns() // 1_000_000)
        self.signer, self.cert = root_side.load_command_signer(
            tmp / "command-keys" / "command-key-1.key")

    def issue(self, kind: str, body: dict[str, Any], *, cseq: int | None = None,
              valid_ms: int = VALID_MS) -> Issued:
        with open_db(self.db_url, migrate=False) as db:
            return tool.issue(db, self.signer, self.cert, self.gw, kind=kind, body=body,
                              valid_ms=valid_ms, created_by="demo", cseq=cseq)

    def publish(self, data: bytes) -> None:
        tool.publish(self.broker, Issued(self.gw, 0, "raw", command_digest(data), data, 0))
        self.sent += 1

    def send(self, kind: str, body: dict[str, Any]) -> Issued:
        issued = self.issue(kind, body)
        self.publish(issued.data)
        return issued

    def answer(self, issued: Issued | bytes, want: str) -> tool.Outcome:
        if isinstance(issued, bytes):
            issued = Issued(self.gw, 0, "raw", command_digest(issued), issued, 0)
        with open_db(self.db_url, migrate=False) as db:
            got = tool.wait_answer(db, issued, WAIT_S)
        if got is None:
            raise ScenarioError(f"no answer to {issued.kind} (cseq {issued.cseq}) within "
                                f"{WAIT_S:g} s")
        if got.outcome != want:
            raise ScenarioError(f"{issued.kind}: {got.outcome} ({got.reason}), expected "
                                f"{want}: {got.body}")
        return got

    def spot_check(self, tag: str, issued: Issued | None = None) -> dict[str, Any]:
        """A night spot check of *tag* (or the already issued *issued*): published, then
        its ``presence.now`` awaited at the platform; the round trip kept."""
        issued = issued or self.issue("request-presence", {"tag": tag})
        started = time.monotonic()
        self.publish(issued.data)
        with open_db(self.db_url, migrate=False) as db:
            got = tool.wait_presence(db, issued, WAIT_S)
        if got is None:
            raise ScenarioError(f"no presence.now for the spot check of {tag}")
        self.spot_ms.append((time.monotonic() - started) * 1000)
        return got

    def records(self, kind: str) -> list[dict[str, Any]]:
        with open_db(self.db_url, migrate=False) as db, db.transaction(write=False) as tx:
            rows = tx.all("SELECT data FROM records WHERE gw = ? AND kind = ? ORDER BY seq",
                          (self.gw, kind))
        return [json.loads(bytes(r[0])) for r in rows]

    def wait_record(self, kind: str, tag: str, stop: threading.Event) -> None:
        deadline = time.monotonic() + WAIT_S
        while not any(r["body"].get("tag") == tag for r in self.records(kind)):
            if time.monotonic() >= deadline:
                raise ScenarioError(f"no {kind} of {tag} at the platform within {WAIT_S:g} s")
            if stop.wait(tool.POLL_S):
                raise ScenarioError(f"stopped while waiting for {kind} of {tag}")


def authorisation(tag: str, document: str, start: dt.date, end: dt.date,
                  zone: str) -> dict[str, Any]:
    return {"tag": tag, "basis": "left_area_without_approval", "document": document,
            "approver": "county justice bureau head", "start": start.isoformat(),
            "end": end.isoformat(), "zone": zone}


def forged_from(data: bytes, cseq: int) -> bytes:
    """A signed command's bytes, its sequence and body changed in transit (a longer
    period): the signature no longer holds."""
    obj = json.loads(data)
    obj["cseq"] = cseq
    obj["body"]["end"] = (dt.date.fromisoformat(obj["body"]["end"])
                          + dt.timedelta(days=60)).isoformat()
    return canonical(obj)


class Script:
    """The platform's side of the scenario, on a thread of its own (:meth:`start`);
    *silent* is the set of tag ids the demo's drive does not beacon for now."""

    def __init__(self, platform: Platform, gateway: Callable[[], Gateway], wall: LabWall,
                 silent: set[int]) -> None:
        self.platform, self.gateway, self.wall, self.silent = platform, gateway, wall, silent
        self.stop = threading.Event()
        self.error: str | None = None
        self.done = threading.Event()
        self.step_ms = 0
        self.zone = ""
        self._thread = threading.Thread(target=self._run, name="demo-supervision",
                                         daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.stop.set()
            self._thread.join(5)

    def say(self, text: str) -> None:
        print(f"supervision: {text}", file=sys.stderr)

    def _run(self) -> None:
        try:
            self._script()
        except ScenarioError as exc:
            self.error = str(exc)
            self.say(f"PROBLEM: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug: said, and the summary shows it
            self.error = f"{type(exc).__name__}: {exc}"
            self.say(f"PROBLEM: {self.error}")
        finally:
            self.done.set()

    def _script(self) -> None:
        p = self.platform
        home, leave, lapse, check = (SimTag(t, b"").tag for t in (HOME, LEAVE, LAPSE, CHECK))
        self.silent.add(LEAVE)  # away on leave from the start
        deadline = time.monotonic() + WAIT_S
        while not self.gateway().forwarder.stats.connected:
            if time.monotonic() >= deadline or self.stop.wait(0.1):
                raise ScenarioError("the gateway's uplink did not connect")
        today = dt.datetime.now(dt.UTC).date()
        first, last = today - dt.timedelta(days=1), today + dt.timedelta(days=29)
        # 1. the authorisations; the lapsing one ends at the next midnight anywhere
        zone, local_day, midnight_ms = next_midnight(time.time_ns() // 1_000_000 + 60_000)
        self.zone = zone
        sent = [p.send("set-authorisation", authorisation(t, f"SJ-2026-{i:03d}", first,
                                                          last, "UTC"))
                for i, t in enumerate((home, leave, check), start=1)]
        sent.append(p.send("set-authorisation", authorisation(
            lapse, "SJ-2026-004", local_day - dt.timedelta(days=1), local_day, zone)))
        for issued in sent:
            p.answer(issued, "applied")
        self.say(f"4 tags authorised; {lapse}'s period ends at midnight in {zone}")
        # 2. presence rules and a leave
        now = time.time_ns() // 1_000_000
        rules = p.send("set-presence-rules", {
            "tag": home, "zone": "UTC", "grace_min": 0,
            "windows": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                         "start": "00:00", "end": "24:00"}]})
        approved = p.send("approve-leave", {
            "tag": leave, "leave_id": "LV-DEMO-1", "document": "QJ-2026-001",
            "approver": "officer on duty", "start_ms": now - 60_000,
            "end_ms": now + LEAVE_ENDS_IN_MS, "grace_min": 0})
        p.answer(rules, "applied")
        p.answer(approved, "applied")
        self.silent.add(HOME)  # slips out during the must-be-home window
        self.say(f"{home} must be home all week and now stops beaconing; {leave} on leave "
                 f"until {LEAVE_ENDS_IN_MS // 1000} s from now")
        # 3. a forged and a replayed command, each refused with its reason
        captured = p.issue("request-presence", {"tag": check})  # lost on its way...
        reissued = p.issue("request-presence", {"tag": check}, cseq=captured.cseq,
                           valid_ms=VALID_MS - 1000)  # ...so the platform sent it again
        p.spot_check(check, reissued)
        forged = forged_from(sent[0].data, reissued.cseq + 1)
        for data, why in ((forged, "bad_signature"), (captured.data, "replayed")):
            p.publish(data)
            p.forged_or_replayed += 1
            got = p.answer(data, "rejected")
            if got.reason != why:
                raise ScenarioError(f"a {why} command refused as {got.reason}")
        self.say("a forged and a replayed command: both refused, each on record")
        # 4. the violation, a night spot check, the return; the late return from leave
        p.wait_record("presence.violation", home, self.stop)
        answer = p.spot_check(home)
        self.say(f"night spot check: {tool.presence_words(answer)} "
                 f"({p.spot_ms[-1]:.0f} ms)")
        self.silent.discard(HOME)
        p.wait_record("presence.returned", home, self.stop)
        self.say(f"{home}: violation, then back home")
        p.wait_record("leave.late_return", leave, self.stop)
        self.say(f"{leave}: not back from leave in time")
        # 5. the period lapses: the lab moves the gateway's clock past the zone's midnight
        self.silent.add(LAPSE)
        self.step_ms = max(0, midnight_ms + PAST_MIDNIGHT_MS - self.wall() // 1_000_000)
        self.wall.step(self.step_ms)
        self.say(f"lab clock stepped {self.step_ms / 60_000:.1f} min forward, past midnight "
                 f"in {zone}")
        p.wait_record("authorisation.expired", lapse, self.stop)
        self.say(f"{lapse}: authorisation expired")


def counts(kinds: dict[str, int], platform: Platform) -> dict[str, Any]:
    """The summary's supervision keys, from the records stored at the platform."""
    out: dict[str, Any] = {key: int(kinds.get(kind, 0)) for key, kind in COUNTED.items()}
    worst = p99(platform.spot_ms)
    out["commands_sent"] = platform.sent
    out["forged_or_replayed_sent"] = platform.forged_or_replayed
    out["spot_check_ms_p99"] = None if worst is None else round(worst)
    return out


def problems(out: dict[str, Any], script: Script) -> list[str]:
    """What the scenario should have shown and did not (empty: all of it)."""
    found = []
    if script.error:
        found.append(f"the supervision script stopped: {script.error}")
    if not out["commands_rejected"] == out["forged_or_replayed_sent"] > 0:
        found.append(f"{out['commands_rejected']} commands rejected, "
                     f"{out['forged_or_replayed_sent']} forged or replayed sent")
    for key in ("presence_violations", "leave_late_returns", "spot_checks_answered",
                "authorisation_expired"):
        if out[key] < 1:
            found.append(f"no {COUNTED[key]} record at the platform")
    if out["presence_returns"] != out["presence_violations"]:
        found.append(f"{out['presence_returns']} presence.returned for "
                     f"{out['presence_violations']} presence.violation")
    return found


class Supervised:
    """The scenario as :mod:`lab.demo` runs it: :meth:`make_site` instead of
    :class:`lab.site.Site`, :attr:`tags` beside the demo's, :meth:`start` with the drive,
    :meth:`finish` after it, then :meth:`counts` and :meth:`problems` for the summary."""

    def __init__(self, tmp: Path, identity: Identity, db_url: str,
                 command_broker: BrokerConfig) -> None:
        self.wall = LabWall()
        self.platform = Platform(identity.gateway_id, db_url, command_broker)
        self.platform.prepare(tmp, identity)
        self.tags = scenario_tags()
        self.silent: set[int] = set()
        self.script: Script | None = None

    def make_site(self, *args: Any, **kwargs: Any) -> SupervisionSite:
        return SupervisionSite(*args, wall=self.wall, **kwargs)

    def start(self, site: Site) -> None:
        self.script = Script(self.platform, lambda: site.gateway, self.wall, self.silent)
        self.script.start()

    def finish(self, timeout_s: float = WAIT_S) -> None:
        """The script's end (waited for up to *timeout_s* after the drive's)."""
        if self.script is not None:
            self.script.join(timeout_s)

    def counts(self, kinds: dict[str, int]) -> dict[str, Any]:
        out = counts(kinds, self.platform)
        out["lab_clock_step_ms"] = self.script.step_ms if self.script else 0
        out["lapse_zone"] = self.script.zone if self.script else None
        return out

    def problems(self, out: dict[str, Any]) -> list[str]:
        if self.script is None:
            return ["the supervision script never started"]
        return problems(out, self.script)
