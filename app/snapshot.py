"""What the running gateway publishes in its state file (app/state.py), gathered from the
other threads' plain values as they stand: the store's usage counts (kept by the writer
after each commit, no query), the uplink's stats, each port's and link's counters, the
drivers' views of the tags and of the last GNSS fix, the clock. Nothing here takes a lock
of another thread or touches the store's database: a snapshot costs tens of microseconds
(docs/status.md has the figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.state import (
    MAX_TAGS,
    UplinkTracker,
    serial_by_id,
    wall_of,
)
from buffer.store import Store, free_bytes
from core.clock import TRUSTED_QUALITIES, Clock
from core.kinds import Priority
from drivers.gnss import GnssProtocol, distance_m
from drivers.tag_receiver import TagReceiverDriver, TagView
from firmware_bridge.framed import FramedDeviceProtocol
from firmware_bridge.port import PortProtocol, PortWorker

if TYPE_CHECKING:
    from buffer.writer import StoreWriter
    from uplink.forwarder import Forwarder

#: A GNSS fix older than this is no fix, ns.
FIX_FRESH_NS = 10_000_000_000
#: The clock's sources as the state names them (records say ``unsynced``).
CLOCK_SOURCES = {"unsynced": "none"}


def queued_by_class(store: Store, writer: StoreWriter) -> dict[str, int]:
    """Records queued per class, from the counts the writer keeps (no query): the rows in
    the store less those delivered whose deletion waits to ride a commit."""
    usage = store.usage  # replaced whole after each commit: a consistent dict
    delivered = writer.deletions_waiting_by_class()
    return {prio.label: max(0, usage.get(prio, (0, 0))[0] - delivered.get(prio, 0))
            for prio in Priority}


@dataclass
class Heard:
    """When each port last received a valid frame, from its frame counter seen growing
    between two snapshots (one a second): no hook on the port's thread."""

    frames: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    acked: tuple[int, int | None] = (0, None)

    def port(self, name: str, frames: int, now_ms: int) -> int | None:
        seen, at = self.frames.get(name, (0, None))
        if frames > seen:
            at = now_ms
        self.frames[name] = (frames, at)
        return at

    def ack(self, acked: int, now_ms: int) -> int | None:
        seen, at = self.acked
        if acked > seen:
            at = now_ms
        self.acked = (acked, at)
        return at


def uplink_entry(tracker: UplinkTracker, forwarder: Forwarder, by_class: dict[str, int],
                 heard: Heard, now_ms: int) -> dict[str, Any]:
    """The state file's ``uplink``; *by_class*: :func:`queued_by_class`."""
    now = tracker.now
    broker = forwarder.broker
    return {
        "state": now.state, "reason": now.reason, "code": now.code, "since_ms": now.since_ms,
        "queued": sum(by_class.values()), "queued_by_class": by_class,
        # of the queued, those the linger holds back (positions, health: they go out
        # together once the oldest waited linger_s, or behind anything that may not wait)
        "held": forwarder.stats.held, "linger_s": forwarder.linger_s,
        "last_ack_ms": heard.ack(forwarder.stats.records_acked, now_ms),
        "target": f"{broker.host}:{broker.port}", "tls": broker.tls,
    }


def device_entries(workers: Iterable[PortWorker], protocols: Mapping[str, PortProtocol],
                   roles: Mapping[str, str], heard: Heard, now_ms: int) -> list[dict[str, Any]]:
    out = []
    for worker in workers:
        proto = protocols.get(worker.name)
        stats = worker.stats
        handshake, serial, firmware = "n/a", None, None
        frames, errors = 0, stats.protocol_errors
        if isinstance(proto, FramedDeviceProtocol):
            link, hello = proto.link, proto.last_hello
            handshake = ("ok" if link.hello is not None else
                         f"failed: {proto.refused}" if proto.refused else "pending")
            if hello is not None:
                serial, firmware = hello.serial, hello.firmware_text
            frames = link.stats.frames_in
            errors += link.stats.bad_frames + proto.stats.driver_errors
        elif isinstance(proto, GnssProtocol):
            nmea = proto.reader.stats
            frames = nmea.sentences_ok
            errors += nmea.checksum_errors + nmea.rejected
        out.append({
            "name": worker.name, "role": roles.get(worker.name), "port": worker.path,
            "by_id": serial_by_id(worker.path), "held": stats.connected,
            "handshake": handshake, "serial": serial, "firmware": firmware,
            "frames": frames, "errors": errors,
            "last_heard_ms": heard.port(worker.name, frames, now_ms),
        })
    return out


def tag_entries(protocols: Iterable[PortProtocol], paired: Iterable[str],
                now_mono_ns: int, now_ms: int) -> tuple[list[dict[str, Any]], int]:
    """The paired tags (at most :data:`MAX_TAGS`, by id) and how many there are. A tag
    heard by two receivers shows its latest beacon."""
    views: dict[str, TagView] = {}
    for proto in protocols:
        driver = getattr(proto, "driver", None)
        if not isinstance(driver, TagReceiverDriver):
            continue
        for view in driver.view():
            best = views.get(view.tag)
            if best is None or (view.beacon_ns or 0) > (best.beacon_ns or 0):
                views[view.tag] = view
    for tag in paired:  # paired, and no receiver configured to hear it
        views.setdefault(tag, TagView(tag, None, None, None, 0, None))
    entries = [{
        "tag": v.tag, "present": v.present,
        "last_beacon_ms": wall_of(v.beacon_ns, now_mono_ns, now_ms),
        "rssi_dbm": v.rssi_dbm, "beacons": v.beacons, "counter": v.counter,
    } for _, v in sorted(views.items())[:MAX_TAGS]]
    return entries, len(views)


def gnss_entry(proto: PortProtocol | None, now_mono_ns: int, now_ms: int) -> dict[str, Any]:
    """The last fix: whether it is recent, its geometry, how far from the installed position
    (never the coordinates)."""
    if not isinstance(proto, GnssProtocol):
        return {"configured": False, "fix": False, "sats": None, "hdop": None,
                "distance_from_installed_m": None, "last_fix_ms": None, "moved": None}
    monitor = proto.monitor
    fix, home = monitor.last_fix, monitor.installed
    distance = None
    if fix is not None and home is not None:
        distance = round(distance_m(home.lat_e7, home.lon_e7, fix.lat_e7, fix.lon_e7))
    return {
        "configured": True,
        "fix": fix is not None and now_mono_ns - fix.mono_ns <= FIX_FRESH_NS,
        "sats": None if fix is None else fix.sats,
        "hdop": None if fix is None or fix.hdop_c is None else fix.hdop_c / 100,
        "distance_from_installed_m": distance,
        "last_fix_ms": None if fix is None else wall_of(fix.mono_ns, now_mono_ns, now_ms),
        "moved": monitor.moved if home is not None else None,
    }


def clock_entry(clock: Clock, now_ms: int) -> dict[str, Any]:
    source, utc_ms = clock.source_now()
    return {"source": CLOCK_SOURCES.get(source, source), "trusted": source in TRUSTED_QUALITIES,
            # how far the time records carry is from this machine's clock
            "offset_ms": utc_ms - now_ms}


def disk_entry(store: Store) -> dict[str, Any]:
    try:
        free: int | None = free_bytes(store.path.parent)
    except OSError:
        free = None
    return {"store_bytes": store.used_bytes, "quota_bytes": store.quota_bytes,
            "free_bytes": free}
