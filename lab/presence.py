"""Which beacons the platform holds, now that presence goes out as intervals
(docs/records.md ``tag.interval``): a beacon is delivered when an interval of its tag
covers its counter. For the lab's loops and tests (crash, serial faults, demo)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping

from drivers.tag_receiver import MSG_BEACON, Beacon
from firmware_bridge.messages import PayloadError


class Coverage:
    """The counter ranges of the ``tag.interval`` records seen, per tag."""

    def __init__(self, bodies: Iterable[Mapping[str, object]] = ()) -> None:
        self.ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.beacons = 0  # the intervals' beacons, summed
        for body in bodies:
            self.add(body)

    def add(self, body: Mapping[str, object]) -> None:
        tag, first, last = body.get("tag"), body.get("first_counter"), body.get("last_counter")
        beacons = body.get("beacons")
        if isinstance(tag, str) and isinstance(first, int) and isinstance(last, int):
            self.ranges[tag].append((first, last))
            self.beacons += beacons if isinstance(beacons, int) else 0

    def count(self, tag: str, counter: int) -> int:
        """How many intervals cover *counter* of *tag* (1: delivered once)."""
        return sum(lo <= counter <= hi for lo, hi in self.ranges.get(tag, ()))

    @property
    def intervals(self) -> int:
        return sum(len(r) for r in self.ranges.values())


def beacon_of(msg_type: int, body: bytes) -> tuple[str, int] | None:
    """(tag, counter) of a device event that is a well-formed beacon, else None."""
    if msg_type != MSG_BEACON:
        return None
    try:
        beacon = Beacon.from_bytes(body)
    except PayloadError:
        return None
    return beacon.tag, beacon.counter


def platform_intervals(db_url: str, gateway_id: str) -> list[dict[str, object]]:
    """The bodies of the ``tag.interval`` records the platform's store holds of a gateway,
    in seq order (the demo's ingest)."""
    from central.db import open_db

    with open_db(db_url, migrate=False) as db, db.transaction(write=False) as tx:
        rows = tx.all("SELECT data FROM records WHERE gw = ? AND kind = 'tag.interval' "
                      "ORDER BY seq", (gateway_id,))
    bodies = []
    for (data,) in rows:
        body = json.loads(bytes(data))["body"]
        if isinstance(body, dict):
            bodies.append(body)
    return bodies
