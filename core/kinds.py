"""The one table of record kinds and their delivery classes (DESIGN.md section 3).

Every kind a gateway may seal is listed here, once. A kind missing from the
table is an error (:class:`UnknownKindError`), never a default class: an unlisted
alarm would otherwise go out behind the backlog.
"""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    """Delivery classes, highest first."""

    ALARM = 0
    CHECKIN = 1
    STATUS = 2
    POSITION = 3
    HEARTBEAT = 4

    @property
    def label(self) -> str:
        return self.name.lower()


#: The classes whose records may wait before they go up (positions and the heartbeat:
#: nothing the platform waits for, no alarm, no check-in, no status change, no command's
#: answer): the uplink's linger holds them (uplink/linger.py), and the record store keeps
#: a few of them in its state file before they join its table (buffer/store.py).
HOLDABLE: frozenset[Priority] = frozenset({Priority.POSITION, Priority.HEARTBEAT})


class UnknownKindError(KeyError):
    """A reading of a kind that is not in :data:`KIND_PRIORITY`."""


KIND_PRIORITY: dict[str, Priority] = {
    "tag.tamper": Priority.ALARM,
    "tag.spoof": Priority.ALARM,
    "gateway.moved": Priority.ALARM,
    # another client connected with this gateway's MQTT client id (uplink/takeover.py)
    "uplink.takeover": Priority.ALARM,
    # the uplink refuses to connect: its TLS files are unusable (uplink/certs.py), one record
    # per distinct problem of a refusal; recording goes on, everything waits in the store
    "uplink.refused": Priority.STATUS,
    "gateway.returned": Priority.STATUS,
    "checkin": Priority.CHECKIN,
    "tag.tamper_restored": Priority.STATUS,
    "tag.absent": Priority.STATUS,
    "tag.present": Priority.STATUS,
    "tag.battery_low": Priority.STATUS,
    "tag.battery_ok": Priority.STATUS,
    "kiosk.status": Priority.STATUS,
    "kiosk.tamper": Priority.ALARM,
    "kiosk.tamper_cleared": Priority.STATUS,
    "kiosk.fault": Priority.STATUS,
    "kiosk.fault_cleared": Priority.STATUS,
    "kiosk.spoof": Priority.ALARM,
    "device.up": Priority.STATUS,
    "device.lost": Priority.STATUS,
    "device.refused": Priority.STATUS,
    "device.flapping": Priority.STATUS,
    "time.step": Priority.STATUS,
    "gap": Priority.ALARM,
    "tag.presence": Priority.POSITION,
    # presence as intervals of beacons (docs/records.md); presence.unknown: a counter range
    # the gateway cannot account for (reserved: an explained hole for the platform)
    "tag.interval": Priority.POSITION,
    "presence.unknown": Priority.STATUS,
    "gnss.fix": Priority.POSITION,
    "gateway.health": Priority.HEARTBEAT,
    "gateway.boot": Priority.STATUS,
    "device.error": Priority.STATUS,
    # the disk filled up (another process: the quota keeps the store below), and its restore
    "storage.full": Priority.ALARM,
    "storage.recovered": Priority.STATUS,
    # first out, so the platform learns the new key before records signed with it
    "key.rotate": Priority.ALARM,
    # the session key of this start, certified by the identity key (core/session.py)
    "key.session": Priority.ALARM,
    # the enclosure's tamper switch and mains power (drivers/inputs.py), with their
    # restores; power.shutdown: the gateway powers off cleanly before its UPS runs out
    "enclosure.opened": Priority.ALARM,
    "enclosure.closed": Priority.STATUS,
    "power.lost": Priority.ALARM,
    "power.restored": Priority.STATUS,
    "power.shutdown": Priority.ALARM,
    # every local human action, naming who (app/actions.py, issue 9 item 6); the files the
    # gateway runs with, hashed at each start, and an alarm when they changed since
    "local.action": Priority.ALARM,
    # enrolment (provisioning/enrol.py, docs/enrolment.md): local actions with kinds of their
    # own, alarm class as every local action: a certificate, a CA and command keys installed
    # change whom the gateway trusts
    "enrol.requested": Priority.ALARM,
    "enrol.completed": Priority.ALARM,
    "enrol.failed": Priority.ALARM,
    # the certificate renewing itself (provisioning/renewal.py, app/renewal.py): each attempt
    # and its outcome; warnings at 30 days left (status) and at 7 (alarm: a gateway whose
    # certificate expires delivers nothing, alarms included) when renewal has not succeeded
    "cert.renewal_requested": Priority.STATUS,
    "cert.renewed": Priority.STATUS,
    "cert.renewal_failed": Priority.STATUS,
    "cert.expiring": Priority.STATUS,
    "cert.expiring_soon": Priority.ALARM,
    "config.loaded": Priority.STATUS,
    "config.changed": Priority.ALARM,
    # the last record a gateway seals (provision decommission): alarm class, so it goes out
    # first; nothing is sealed after it (buffer/writer.py)
    "gateway.decommissioned": Priority.ALARM,
    # what the gateway kept of an unpaired tag or kiosk removed, once every record sealed
    # while it was paired was delivered (app/removals.py)
    "tag.data_removed": Priority.STATUS,
    "kiosk.data_removed": Priority.STATUS,
    # an installer's walk with a tag (provision range-test, app/range_test.py): a local
    # action with a kind of its own, status class: a measurement changes nothing the
    # gateway trusts, so it need not overtake the backlog
    "tag.range_test": Priority.STATUS,
    # the platform's signed commands (app/commands.py, docs/commands.md): each answered by
    # one record. Applied: status (the platform ordered it; its tool waits for this, which
    # overtakes the positions and heartbeats of a backlog). Refused: alarm (a forged,
    # replayed or stale command is an attack sign, or the platform's own fault)
    "command.applied": Priority.STATUS,
    "command.rejected": Priority.ALARM,
    # the gateway's encryption public key, signed by its identity key: the platform encrypts
    # device keys to it (pair-tag, pair-kiosk); once per key. Status: it gates no record's
    # verification (key.rotate does), and is no alarm for a justice office
    "key.encryption": Priority.STATUS,
    # supervision (core/supervision.py, docs/supervision.md): the legal authorisation's
    # period (Community Corrections Law Art. 29), status class: they change what is
    # recorded, not what an officer must do now
    "authorisation.started": Priority.STATUS,
    "authorisation.expiring": Priority.STATUS,
    "authorisation.expired": Priority.STATUS,
    "authorisation.renewed": Priority.STATUS,
    "authorisation.ended": Priority.STATUS,
    # presence rules and leave: a person not home in a must-be-home window, or not back from
    # leave, is an alarm (ahead of any backlog); the return and the leave's bounds are status
    "presence.violation": Priority.ALARM,
    "presence.failed_to_return": Priority.ALARM,
    "presence.returned": Priority.STATUS,
    "leave.started": Priority.STATUS,
    "leave.ended": Priority.STATUS,
    "leave.late_return": Priority.ALARM,
    # the answer to a night spot check (request-presence): alarm class, so it overtakes a
    # backlog and reaches the officer waiting for it within seconds
    "presence.now": Priority.ALARM,
}


def priority_of(kind: str) -> Priority:
    """The delivery class of *kind*; :class:`UnknownKindError` if the table does not list it."""
    try:
        return KIND_PRIORITY[kind]
    except KeyError:
        raise UnknownKindError(f"record kind {kind!r} is not in core.kinds.KIND_PRIORITY: "
                          "add it there (and to docs/records.md)") from None
