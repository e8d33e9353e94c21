"""Test vectors of presence intervals (docs/records.md ``tag.interval``):
``docs/test-vectors/intervals.json``.

One tag's beacons (their bytes, MAC under the tag's key given in the file), radio losses,
a tamper and its restore, an absence, its return, an interval closed at its age, a forged
beacon and a clean stop, fed through the gateway's tag driver; the records it makes,
sealed in a chain (a ``key.session`` first) with their canonical bytes; and what a
platform verifier concludes: the intervals, and each hole between two of them with the
record that explains it. Deterministic (fixed keys, times; Ed25519).

Written with the others by ``.venv/bin/python -m lab.vectors docs/test-vectors``.
"""

from __future__ import annotations

import hashlib
import json

from core.devices import PairedTag
from core.record import JSON, Reading, SealedRecord, Timestamp, b64u
from core.suites import ED25519, SoftwareKey, key_id
from core.topics import records_topic
from drivers.tag_receiver import MSG_BEACON, TagReceiverDriver
from firmware_bridge.framed import LedgerOnly
from firmware_bridge.link import Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.chains import Chain
from lab.simulators.tag import SimTag

FILE = "intervals.json"
#: The first record's time (as lab/vectors.py's).
T0 = Timestamp(1_760_000_000_000, "ntp", 3_600_000)
GATEWAY = "gw-vector-0003"
RECEIVER = Hello(1, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-0001")
TAG_KEY = hashlib.sha256(b"smartcorr interval vector tag key").digest()[:16]
TAG_ID = 0x1000
ABSENT_AFTER_S = 30
INTERVAL_MAX_S = 30.0
#: Records between two intervals of a tag that explain a hole in its counters.
EXPLAINING = ("tag.absent", "tag.spoof", "presence.unknown")


def seed(name: str) -> bytes:
    """32 bytes derived from *name* (an Ed25519 private key: RFC 8032 seed)."""
    return hashlib.sha256(f"smartcorr interval vector {name}".encode()).digest()


def _script() -> list[tuple[int, str, int]]:
    """(time s, what, detail): beacon (rssi), lost, strap, tick, forge, stop."""
    steps: list[tuple[int, str, int]] = [(2 * i, "beacon", -60 - i) for i in range(5)]
    steps += [(10, "lost", 0), (12, "beacon", -58)]  # a beacon lost on the radio
    steps += [(13, "strap", 0), (14, "beacon", -57), (16, "beacon", -57)]  # tamper
    steps += [(17, "strap", 0), (18, "beacon", -59), (20, "beacon", -60)]  # its restore
    steps += [(s, "lost", 0) for s in range(22, 60, 2)]  # the tag is away
    steps += [(51, "tick", 0)]  # not heard for 31 s: absent
    steps += [(60, "beacon", -70), (62, "beacon", -66), (64, "beacon", -62)]  # back
    steps += [(64 + 8 * i, "beacon", -61) for i in range(1, 6)]  # 30 s: max age
    steps += [(108, "forge", 0), (110, "beacon", -60), (112, "stop", 0)]
    return steps


def _no_ledger(_key: str) -> int | None:
    return None  # a tag paired just now: no counter kept yet


def interval_vectors() -> dict[str, JSON]:
    tag = SimTag(TAG_ID, TAG_KEY)
    driver = TagReceiverDriver({tag.tag: PairedTag(tag.tag, TAG_KEY, ABSENT_AFTER_S, 0)},
                               _no_ledger, started_ns=0, interval_max_s=INTERVAL_MAX_S)
    driver.on_device_up(RECEIVER)
    identity = SoftwareKey(ED25519, seed("intervals identity"))
    session = SoftwareKey(ED25519, seed("intervals session"))
    chain = Chain(GATEWAY, identity=identity)
    records: list[SealedRecord] = [chain.start_session(T0, session=session)]
    steps: list[dict[str, JSON]] = []
    event = 0

    def seal(readings: list[Reading] | LedgerOnly, t_s: int) -> list[int]:
        if isinstance(readings, LedgerOnly):
            return []
        ts = Timestamp(T0.utc_ms + t_s * 1000, T0.quality, T0.mono_ms + t_s * 1000)
        for reading in readings:
            records.append(chain.sealer.seal(reading, ts))
        return [rec.seq for rec in records[len(records) - len(readings):]]

    for t_s, what, detail in _script():
        mono_ns = T0.mono_ms * 1_000_000 + t_s * 1_000_000_000
        step: dict[str, JSON] = {"t_s": t_s, "do": what}
        out: list[Reading] | LedgerOnly = []
        if what in ("beacon", "forge"):
            beacon = tag.beacon(detail) if what == "beacon" else tag.forged()
            event += 1
            step.update(event=event, beacon_hex=beacon.to_bytes().hex())
            out = driver.on_message(Message(RECEIVER.serial, event, MSG_BEACON,
                                            beacon.to_bytes()), RECEIVER, mono_ns)
        elif what == "lost":
            step["counter"] = tag.beacon().counter  # sent, never heard
        elif what == "strap":
            tag.strap_closed = not tag.strap_closed
        elif what == "tick":
            out = driver.tick(mono_ns)
        elif what == "stop":
            out = driver.close_all(mono_ns)
        step["records"] = list(seal(out, t_s))
        steps.append(step)
    return {
        "description": "One tag's beacons through the gateway's tag driver (absent after "
                       f"{ABSENT_AFTER_S} s, intervals closed at {INTERVAL_MAX_S:g} s): each "
                       "step, the seqs of the records it made (none: a beacon that only "
                       "extends the open interval), the chain, and the continuity a "
                       "verifier proves (docs/records.md, tag.interval).",
        "gateway": GATEWAY, "topic": records_topic(GATEWAY),
        "registration": {"alg": identity.alg, "class": "file", "format": 2,
                         "gateway_id": GATEWAY, "key": b64u(identity.public_raw),
                         "kid": key_id(identity.alg, identity.public_raw), "suite": "ed25519"},
        "tag": tag.tag, "tag_key_hex": TAG_KEY.hex(),
        "steps": steps,
        "records": [{"seq": r.seq, "kind": r.kind, "canonical_hex": r.data.hex()}
                    for r in records],
        "continuity": continuity([json.loads(r.data) for r in records], tag.tag),
    }


def continuity(records: list[dict[str, JSON]], tag: str) -> dict[str, JSON]:
    """The intervals of *tag* in seq order, and each hole between two of them with the seq
    and kind of the first record between them that explains it (null: unexplained)."""
    intervals: list[dict[str, JSON]] = []
    holes: list[dict[str, JSON]] = []
    between: list[dict[str, JSON]] = []
    for rec in records:
        body = rec["body"]
        if not isinstance(body, dict) or body.get("tag") != tag:
            continue
        if rec["kind"] != "tag.interval":
            between.append(rec)
            continue
        first, last = body["first_counter"], body["last_counter"]
        before = intervals[-1]["last_counter"] if intervals else None
        if not isinstance(first, int) or not isinstance(last, int):
            raise TypeError(f"record {rec['seq']}: counters must be integers")
        if isinstance(before, int) and first != before + 1:
            why = next((r for r in between if r["kind"] in EXPLAINING), None)
            holes.append({"from_counter": before + 1, "to_counter": first - 1,
                          "explained_by": None if why is None else
                          {"seq": why["seq"], "kind": why["kind"]}})
        intervals.append({"seq": rec["seq"], "first_counter": first, "last_counter": last,
                          "beacons": body["beacons"], "closed": body["closed"]})
        between = []
    return {"intervals": intervals, "holes": holes}


