"""Alarms to the right justice office (司法所): the registry, the outbox, the webhook worker.

The registry maps each gateway to the supervised person's case (an opaque reference, no
name) and to the office responsible for it; an office has an id, a webhook URL and the
secret that signs what it receives (stored, never printed nor logged).

The ingest's ``alarms`` table is the outbox. :func:`route_new` reads it past its cursor
(table ``routing``) and gives each new alarm one row of ``deliveries`` for the office its
gateway is assigned to then (an alarm of a gateway assigned to no office is kept in
``unrouted`` and routed when the gateway is assigned). Routes are numbered in the order
they are made, under one lock, so a route id is a cursor that never skips one: the pull
API (:func:`pull`) reads an office's routes after a cursor.

:class:`Worker` delivers the pending rows: it claims one (``SELECT … FOR UPDATE SKIP
LOCKED`` on PostgreSQL, where SQLite's single writer already serialises) and takes a
lease on it (``claimed_by``, ``claim_until``) for the time of the POST, so a worker killed
mid-delivery leaves a row that another (or the same, restarted) takes again once the
lease runs out. The POST is signed (:func:`sign`) and carries the idempotency key
``gw:seq``: delivery is at least once, and exactly once at a receiver that de-duplicates
by that key. A failure is tried again after an exponential backoff until
:attr:`DeliveryConfig.give_up_s` after the routing; then the row is ``failed``, which
:func:`delivery_report` shows (nothing is dropped silently). docs/alarms.md is the
interface for the offices.

Latencies are measured to the webhook's 2xx from two instants: the record's ``t`` (the
gateway's clock when it sealed the record, with that clock's error) and the platform's
store (``stored_at``, the platform's clock).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import re
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from central.db import (
    ROUTING_SCHEMA_VERSION,
    Database,
    DatabaseError,
    Row,
    Transaction,
    open_db,
)
from core.errors import UserError
from core.record import JSON
from core.stopping import StopFlag, Stopping, stop_on_signals

log = logging.getLogger(__name__)

# --- the interface (docs/alarms.md) ---------------------------------------------------

#: The body's format version (``"v"``).
BODY_VERSION = 1
HEADER_SIGNATURE = "X-SmartCorr-Signature"
HEADER_TIMESTAMP = "X-SmartCorr-Timestamp"
HEADER_IDEMPOTENCY = "Idempotency-Key"
HEADER_ATTEMPT = "X-SmartCorr-Attempt"
HEADER_OFFICE = "X-SmartCorr-Office"
#: The signature's scheme, the prefix of the header's value.
SIGNATURE_SCHEME = "v1"
#: How far a receiver should accept the timestamp from its own clock (docs/alarms.md).
REPLAY_WINDOW_S = 300
#: The shortest secret accepted, bytes.
MIN_SECRET_BYTES = 16

# --- the worker's defaults (each a ``deliver`` option) ----------------------------------

#: Give up on a delivery this long after it was routed, seconds (then ``failed``).
GIVE_UP_S = 24 * 3600.0
#: The first retry's delay, doubled at each failure up to BACKOFF_MAX_S, seconds.
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0
#: One POST's timeout, seconds; a claim's lease, seconds (longer than the timeout).
TIMEOUT_S = 10.0
LEASE_S = 30.0
#: How often an idle worker looks for new alarms and due retries, seconds.
POLL_S = 0.2
#: Alarms routed per transaction.
ROUTE_BATCH = 500

_OFFICE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_CASE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RoutingError(UserError):
    """A registry entry refused (unknown office, gateway not enrolled, bad URL or secret);
    the message says what to do."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def idempotency_key(gw: str, seq: int) -> str:
    """``gw:seq``: one alarm, whichever attempt carries it."""
    return f"{gw}:{seq}"


def sign(secret: bytes, timestamp_ms: int, body: bytes) -> str:
    """The value of the signature header: ``v1=`` and the lower-case hex of
    HMAC-SHA256(secret, ASCII decimal timestamp + ``.`` + body)."""
    mac = hmac.new(secret, str(timestamp_ms).encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_SCHEME}={mac.hexdigest()}"


def check_signature(secret: bytes, headers: Mapping[str, str], body: bytes, now_ms: int,
                    window_s: float = REPLAY_WINDOW_S) -> bool:
    """What a receiver does (docs/alarms.md): the signature matches and the timestamp is
    within *window_s* of its clock."""
    named = {k.lower(): v for k, v in headers.items()}  # header names are case-blind
    stamp = named.get(HEADER_TIMESTAMP.lower(), "")
    if not stamp.isascii() or not stamp.isdigit():
        return False
    if abs(now_ms - int(stamp)) > window_s * 1000:
        return False
    return hmac.compare_digest(sign(secret, int(stamp), body),
                               named.get(HEADER_SIGNATURE.lower(), ""))


@dataclass(frozen=True, slots=True)
class Routed:
    """One alarm routed to one office: what the webhook's body and the pull API carry."""

    route: int  # the route's id: the pull API's cursor
    alarm_id: int
    office: str
    case_ref: str
    gw: str
    seq: int
    kind: str
    t: int
    stored_at: int
    record: bytes  # the record's canonical bytes, as stored

    @property
    def key(self) -> str:
        return idempotency_key(self.gw, self.seq)

    def body_json(self) -> dict[str, JSON]:
        return {"v": BODY_VERSION, "idempotency_key": self.key, "alarm_id": self.alarm_id,
                "office": self.office, "case": self.case_ref, "gw": self.gw,
                "seq": self.seq, "kind": self.kind, "t": self.t,
                "stored_at": self.stored_at, "record": self.record.decode("utf-8")}

    def body(self) -> bytes:
        """The POST's body: compact JSON, keys sorted, UTF-8; the same at every attempt."""
        return json.dumps(self.body_json(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")


# --- the registry ---------------------------------------------------------------------


def _lock_routing(tx: Transaction) -> int:
    """Take the routing lock (the routing row; SQLite's writer lock already is one) and
    return the cursor: the last alarm id routed."""
    suffix = " FOR UPDATE" if tx.backend == "postgresql" else ""
    row = tx.one(f"SELECT last_alarm FROM routing WHERE name = 'alarms'{suffix}")  # noqa: S608
    return int(row[0]) if row else 0


def check_webhook(url: str) -> str:
    """*url* if it can be an office's webhook: https, or http on loopback only (a test, a
    proxy on the same host), no credentials in it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise RoutingError(f"--webhook {url!r}: expected https://HOST/PATH")
    if parts.username or parts.password:
        raise RoutingError("--webhook: no credentials in the URL (the office's secret "
                           "signs each request: --secret-file)")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise RoutingError(f"--webhook {parts.scheme}://{parts.hostname}…: alarms carry a "
                           "case reference: https only (http on loopback only)")
    return url


def read_secret(path: Path) -> bytes:
    """The secret in *path* (a final newline is not part of it)."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise RoutingError(f"--secret-file {path}: cannot read it ({exc.strerror})") from None
    secret = raw.rstrip(b"\r\n")
    if len(secret) < MIN_SECRET_BYTES:
        raise RoutingError(f"--secret-file {path}: a secret of at least {MIN_SECRET_BYTES} "
                           "bytes (e.g. openssl rand -hex 32 > FILE)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others than its owner: chmod 600 it", path)
    return secret


def add_office(db: Database, office: str, webhook: str | None, secret: bytes, *,
               now_ms: int | None = None) -> bool:
    """Add *office* (or change its webhook and secret); True if it is new. Without a
    webhook, the office pulls its alarms (:func:`pull`)."""
    if not _OFFICE_ID.match(office):
        raise RoutingError(f"office id {office!r}: 2 to 64 of a-z 0-9 . _ -, starting "
                           "with a letter or digit")
    if webhook is not None:
        check_webhook(webhook)
    if len(secret) < MIN_SECRET_BYTES:
        raise RoutingError(f"a secret of at least {MIN_SECRET_BYTES} bytes")
    now = _now_ms() if now_ms is None else now_ms
    with db.transaction() as tx:
        new = tx.one("SELECT 1 FROM offices WHERE office = ?", (office,)) is None
        tx.execute("INSERT INTO offices (office, webhook, secret, added_at, updated_at) "
                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT (office) DO UPDATE SET "
                   "webhook = excluded.webhook, secret = excluded.secret, "
                   "updated_at = excluded.updated_at", (office, webhook, secret, now, now))
    log.info("office %s %s (%s)", office, "added" if new else "updated",
             "webhook" if webhook else "pull only")
    return new


def assign(db: Database, gw: str, case_ref: str, office: str, *,
           now_ms: int | None = None) -> int:
    """Map gateway *gw* to the case *case_ref* and *office*: its alarms routed from now
    on go there. Its alarms that found no office are routed there now; their number."""
    if not _CASE_REF.match(case_ref):
        raise RoutingError(f"--case {case_ref!r}: an opaque case reference (1 to 64 of "
                           "A-Z a-z 0-9 . _ : / -), never a name")
    now = _now_ms() if now_ms is None else now_ms
    with db.transaction() as tx:
        _lock_routing(tx)
        if tx.one("SELECT 1 FROM gateways WHERE gw = ?", (gw,)) is None:
            raise RoutingError(f"gateway {gw!r} is not enrolled: enrol it first "
                               "(ingest enrol --registration signing.pub)")
        row = tx.one("SELECT webhook FROM offices WHERE office = ?", (office,))
        if row is None:
            raise RoutingError(f"office {office!r} is unknown: add it first (ingest office "
                               "--add OFFICE --webhook URL --secret-file F)")
        tx.execute("INSERT INTO assignments (gw, case_ref, office, assigned_at) VALUES "
                   "(?, ?, ?, ?) ON CONFLICT (gw) DO UPDATE SET case_ref = excluded.case_ref,"
                   " office = excluded.office, assigned_at = excluded.assigned_at",
                   (gw, case_ref, office, now))
        waiting = [int(r[0]) for r in tx.all("SELECT alarm_id FROM unrouted WHERE gw = ? "
                                             "ORDER BY alarm_id", (gw,))]
        state = "pending" if row[0] else "pull"
        for alarm_id in waiting:
            tx.execute("INSERT INTO deliveries (alarm_id, office, case_ref, state, routed_at,"
                       " next_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (alarm_id, office, case_ref, state, now, now))
        tx.execute("DELETE FROM unrouted WHERE gw = ?", (gw,))
    return len(waiting)


def offices(db: Database) -> list[dict[str, JSON]]:
    """The offices: id, webhook (None: pull only), gateways assigned. Never the secret."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT o.office, o.webhook, o.added_at, o.updated_at, COUNT(a.gw) "
                      "FROM offices o LEFT JOIN assignments a ON a.office = o.office "
                      "GROUP BY o.office, o.webhook, o.added_at, o.updated_at "
                      "ORDER BY o.office")
    return [{"office": r[0], "webhook": r[1], "added_at": int(r[2]),
             "updated_at": int(r[3]), "gateways": int(r[4])} for r in rows]


# --- the outbox -----------------------------------------------------------------------


def route_new(tx: Transaction, now: int) -> int:
    """Route the alarms stored since the cursor (in a write transaction); how many."""
    top = tx.one("SELECT MAX(id) FROM alarms")
    if top is None or top[0] is None or int(top[0]) <= _lock_free_cursor(tx):
        return 0  # nothing new: no need to wait for the routing lock
    last = _lock_routing(tx)
    routed = 0
    while True:
        rows = tx.all("SELECT a.id, a.gw, s.office, s.case_ref, o.webhook FROM alarms a "
                      "LEFT JOIN assignments s ON s.gw = a.gw "
                      "LEFT JOIN offices o ON o.office = s.office "
                      "WHERE a.id > ? ORDER BY a.id LIMIT ?", (last, ROUTE_BATCH))
        for alarm_id, gw, office, case_ref, webhook in rows:
            if office is None:
                log.warning("alarm #%d of %s: the gateway is assigned to no office (ingest "
                            "assign); kept until it is", alarm_id, gw)
                tx.execute("INSERT INTO unrouted (alarm_id, gw, found_at) VALUES (?, ?, ?)",
                           (alarm_id, gw, now))
            else:
                tx.execute("INSERT INTO deliveries (alarm_id, office, case_ref, state, "
                           "routed_at, next_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (alarm_id, office, case_ref, "pending" if webhook else "pull",
                            now, now))
            last = int(alarm_id)
        routed += len(rows)
        if len(rows) < ROUTE_BATCH:
            break
    if routed:
        tx.execute("UPDATE routing SET last_alarm = ? WHERE name = 'alarms'", (last,))
    return routed


_ROUTED_COLUMNS = ("d.id, d.alarm_id, d.office, d.case_ref, a.gw, a.seq, a.kind, a.t, "
                   "a.stored_at, r.data FROM deliveries d JOIN alarms a ON a.id = d.alarm_id "
                   "JOIN records r ON r.gw = a.gw AND r.seq = a.seq")


def _routed(row: Row) -> Routed:
    return Routed(int(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4]),
                  int(row[5]), str(row[6]), int(row[7]), int(row[8]), bytes(row[9]))


def pull(db: Database, office: str, since: int = 0, limit: int = 1000,
         *, now_ms: int | None = None) -> list[Routed]:
    """The pull API: the alarms routed to *office* after the cursor *since* (a
    :attr:`Routed.route`), oldest first. Routes what is new first."""
    now = _now_ms() if now_ms is None else now_ms
    with db.transaction() as tx:
        if tx.one("SELECT 1 FROM offices WHERE office = ?", (office,)) is None:
            raise RoutingError(f"office {office!r} is unknown: 'ingest offices' lists them")
        route_new(tx, now)
    with db.transaction(write=False) as tx:
        rows = tx.all(f"SELECT {_ROUTED_COLUMNS} WHERE d.office = ? AND d.id > ? "
                      "ORDER BY d.id LIMIT ?", (office, since, limit))
    return [_routed(r) for r in rows]


# --- delivery -------------------------------------------------------------------------


class DeliveryError(Exception):
    """One POST that did not get a 2xx: the status (None: no answer) and what happened."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def http_post(url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> int:
    """POST *body* to *url*; the 2xx status, or :class:`DeliveryError`. Redirects are not
    followed (a 3xx is a failure: the office fixes its URL)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout_s)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers=dict(headers))
        response = conn.getresponse()
        response.read(64 << 10)
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(None, f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise DeliveryError(response.status, f"HTTP {response.status} {response.reason}"[:300])
    return response.status


Post = Callable[[str, Mapping[str, str], bytes, float], int]


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    give_up_s: float = GIVE_UP_S
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S
    timeout_s: float = TIMEOUT_S
    lease_s: float = LEASE_S
    poll_s: float = POLL_S

    def __post_init__(self) -> None:
        if self.lease_s <= self.timeout_s:
            raise RoutingError(f"the lease ({self.lease_s} s) must be longer than a POST's "
                               f"timeout ({self.timeout_s} s), or two workers would POST "
                               "at once")
        if min(self.give_up_s, self.backoff_s, self.backoff_max_s, self.timeout_s,
               self.poll_s) <= 0:
            raise RoutingError("times must be positive")

    def backoff_ms(self, attempts: int, jitter: float) -> int:
        """The delay after the *attempts*-th failure: doubled each time, capped, times
        *jitter* (0.5 to 1: workers retrying together spread out)."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** min(attempts - 1, 30))
        return int(delay * jitter * 1000)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: the route, delivered or not, and if so the latencies."""

    routed: Routed
    attempt: int
    state: str  # delivered, retry, failed
    status: int | None
    error: str | None
    at: int

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {
            "event": self.state, "route": self.routed.route, "alarm_id": self.routed.alarm_id,
            "office": self.routed.office, "idempotency_key": self.routed.key,
            "attempt": self.attempt, "status": self.status, "error": self.error}
        if self.state == "delivered":
            out["latency_from_t_ms"] = self.at - self.routed.t
            out["latency_from_store_ms"] = self.at - self.routed.stored_at
        return out


class Worker:
    """One delivery worker on *db* (one connection: one worker per thread or process)."""

    def __init__(self, db: Database, worker_id: str, config: DeliveryConfig | None = None,
                 *, post: Post = http_post, now_ms: Callable[[], int] = _now_ms,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.db = db
        self.worker_id = worker_id
        self.config = config or DeliveryConfig()
        self._post = post
        self._now_ms = now_ms
        self._on_outcome = on_outcome
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)

    def _has_work(self, now: int) -> bool:
        """Whether a write transaction is worth taking (a cheap read first)."""
        with self.db.transaction(write=False) as tx:
            top = tx.one("SELECT MAX(id) FROM alarms")
            if top and top[0] is not None and int(top[0]) > _lock_free_cursor(tx):
                return True
            return tx.one("SELECT 1 FROM deliveries WHERE state = 'pending' AND next_at <= ? "
                          "AND (claim_until IS NULL OR claim_until < ?) LIMIT 1",
                          (now, now)) is not None

    def claim(self) -> tuple[Routed, str, bytes, int] | None:
        """Route what is new, then claim one due delivery: it, the office's webhook and
        secret and the attempt's number; None if none is due."""
        now = self._now_ms()
        if not self._has_work(now):
            return None
        lock = " FOR UPDATE OF d SKIP LOCKED" if self.db.backend == "postgresql" else ""
        with self.db.transaction() as tx:
            route_new(tx, now)
            row = tx.one(f"SELECT {_ROUTED_COLUMNS} WHERE d.state = 'pending' AND "
                         "d.next_at <= ? AND (d.claim_until IS NULL OR d.claim_until < ?) "
                         f"ORDER BY d.next_at, d.id LIMIT 1{lock}", (now, now))
            if row is None:
                return None
            routed = _routed(row)
            # the attempt is counted when it starts: one cut short by a crash counts too
            tx.execute("UPDATE deliveries SET claimed_by = ?, claim_until = ?, "
                       "attempts = attempts + 1 WHERE id = ?",
                       (self.worker_id, now + int(self.config.lease_s * 1000), routed.route))
            office = tx.one("SELECT o.webhook, o.secret, d.attempts FROM deliveries d JOIN "
                            "offices o ON o.office = d.office WHERE d.id = ?", (routed.route,))
        if office is None:  # cannot be: a foreign key
            return None
        if office[0] is None:  # the office went pull only
            with self.db.transaction() as tx:
                tx.execute("UPDATE deliveries SET state = 'pull', claimed_by = NULL, "
                           "claim_until = NULL WHERE id = ?", (routed.route,))
            return None
        return routed, str(office[0]), bytes(office[1]), int(office[2])

    def step(self) -> Outcome | None:
        """Deliver one due alarm (one attempt); None if none was due."""
        claimed = self.claim()
        if claimed is None:
            return None
        routed, url, secret, attempt = claimed
        body = routed.body()
        sent_at = self._now_ms()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "User-Agent": "smartcorr-central",
                   HEADER_TIMESTAMP: str(sent_at),
                   HEADER_SIGNATURE: sign(secret, sent_at, body),
                   HEADER_IDEMPOTENCY: routed.key,
                   HEADER_ATTEMPT: str(attempt),
                   HEADER_OFFICE: routed.office}
        try:
            status: int | None = self._post(url, headers, body, self.config.timeout_s)
            error = None
        except DeliveryError as exc:
            status, error = exc.status, str(exc)
        now = self._now_ms()
        outcome = self._record(routed, attempt, status, error, now)
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    def _record(self, routed: Routed, attempt: int, status: int | None, error: str | None,
                now: int) -> Outcome:
        with self.db.transaction() as tx:
            if error is None:
                state = "delivered"
                tx.execute("UPDATE deliveries SET state = 'delivered', delivered_at = ?, "
                           "last_attempt_at = ?, last_status = ?, "
                           "last_error = NULL, claimed_by = NULL, claim_until = NULL "
                           "WHERE id = ? AND state = 'pending'",
                           (now, now, status, routed.route))
            else:
                row = tx.one("SELECT routed_at FROM deliveries WHERE id = ?", (routed.route,))
                give_up_at = (int(row[0]) if row else now) + int(self.config.give_up_s * 1000)
                if now >= give_up_at:
                    state = "failed"
                    next_at = now
                else:
                    state = "retry"
                    jitter = 0.5 + self._rng.random() / 2
                    next_at = min(now + self.config.backoff_ms(attempt, jitter), give_up_at)
                tx.execute("UPDATE deliveries SET state = ?, "
                           "next_at = ?, last_attempt_at = ?, last_status = ?, last_error = ?,"
                           " claimed_by = NULL, claim_until = NULL WHERE id = ? AND "
                           "state = 'pending' AND claimed_by = ?",
                           ("failed" if state == "failed" else "pending", next_at, now,
                            status, error, routed.route, self.worker_id))
        if state == "delivered":
            log.info("alarm #%d (%s) delivered to office %s on attempt %d: %d ms after its "
                     "t, %d ms after it was stored", routed.alarm_id, routed.key,
                     routed.office, attempt, now - routed.t, now - routed.stored_at)
        elif state == "failed":
            log.error("alarm #%d (%s) to office %s FAILED after %d attempts: %s (it stays "
                      "in 'ingest deliveries'; the office can pull it)", routed.alarm_id,
                      routed.key, routed.office, attempt, error)
        else:
            log.warning("alarm #%d (%s) to office %s: attempt %d failed (%s), tried again",
                        routed.alarm_id, routed.key, routed.office, attempt, error)
        return Outcome(routed, attempt, state, status, error, now)

    def pending(self) -> int:
        """Deliveries not yet delivered nor failed (routing what is new first)."""
        with self.db.transaction() as tx:
            route_new(tx, self._now_ms())
            row = tx.one("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
        return int(row[0]) if row else 0

    def run(self, stop: Stopping) -> None:
        """Deliver until *stop* is set (the attempt in hand is finished first)."""
        while not stop.is_set():
            if self.step() is None:
                stop.wait(self.config.poll_s)

    def drain(self, timeout_s: float) -> bool:
        """Deliver until nothing is pending (True) or *timeout_s* ran out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.step() is None:
                if self.pending() == 0:
                    return True
                time.sleep(min(self.config.poll_s, 0.02))
        return False


def _lock_free_cursor(tx: Transaction) -> int:
    row = tx.one("SELECT last_alarm FROM routing WHERE name = 'alarms'")
    return int(row[0]) if row else 0


def _percentile(values: list[int], p: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


@dataclass
class _OfficeTally:
    counts: dict[str, int]
    retries: int
    from_t: list[int]
    from_store: list[int]
    failures: list[JSON]

    def to_json(self) -> dict[str, JSON]:
        out: dict[str, JSON] = dict(self.counts)
        out["retries"] = self.retries
        out["failures"] = self.failures
        for label, values in (("latency_from_t_ms", self.from_t),
                              ("latency_from_store_ms", self.from_store)):
            out[label] = {"p50": _percentile(values, 0.5), "p95": _percentile(values, 0.95),
                          "max": max(values) if values else None}
        return out


def delivery_report(db: Database, office: str | None = None) -> dict[str, JSON]:
    """Per office: deliveries by state, retries, latencies of the delivered (from the
    record's ``t``, the gateway's clock, and from the platform's store), the failed and
    the unrouted alarms. Never a secret."""
    where, params = ("WHERE d.office = ?", (office,)) if office else ("", ())
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT d.office, d.state, d.attempts, d.delivered_at, a.t, "  # noqa: S608
                      "a.stored_at, d.alarm_id, a.gw, a.seq, a.kind, d.last_error, "
                      "d.last_status, d.routed_at, d.last_attempt_at FROM deliveries d "
                      f"JOIN alarms a ON a.id = d.alarm_id {where} ORDER BY d.id",
                      params)
        unrouted = tx.all("SELECT u.alarm_id, u.gw, a.seq, a.kind, u.found_at FROM "
                          "unrouted u JOIN alarms a ON a.id = u.alarm_id ORDER BY u.alarm_id")
    per: dict[str, _OfficeTally] = {}
    for (name, state, attempts, delivered_at, t, stored_at, alarm_id, gw, seq, kind, error,
         status, routed_at, last_at) in rows:
        tally = per.setdefault(name, _OfficeTally(
            {"pending": 0, "delivered": 0, "failed": 0, "pull": 0}, 0, [], [], []))
        tally.counts[state] += 1
        tally.retries += max(0, int(attempts) - 1)
        if state == "delivered":
            tally.from_t.append(int(delivered_at) - int(t))
            tally.from_store.append(int(delivered_at) - int(stored_at))
        elif state == "failed":
            tally.failures.append({
                "alarm_id": int(alarm_id), "idempotency_key": idempotency_key(gw, int(seq)),
                "kind": kind, "attempts": int(attempts), "last_status": status,
                "last_error": error, "routed_at": int(routed_at),
                "last_attempt_at": None if last_at is None else int(last_at)})
    return {"offices": {name: tally.to_json() for name, tally in per.items()},
            "unrouted": [{"alarm_id": int(r[0]), "gw": r[1], "seq": int(r[2]),
                          "kind": r[3], "found_at": int(r[4])} for r in unrouted]}


# --- the command line (central/cli.py adds these) -------------------------------------


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``assign``, ``office``, ``offices``, ``deliver``, ``deliveries``."""
    asg = sub.add_parser("assign", help="map a gateway to its case and justice office")
    db_arg(asg)
    asg.add_argument("--gw", required=True, metavar="ID", help="the gateway's id")
    asg.add_argument("--case", required=True, metavar="REF",
                     help="the case's opaque reference (never a name)")
    asg.add_argument("--office", required=True, metavar="OFFICE",
                     help="the justice office its alarms go to (added by 'office --add')")
    asg.add_argument("--json", action="store_true", help="print one JSON object")

    off = sub.add_parser("office", help="add a justice office (or change its webhook and "
                                        "secret)")
    db_arg(off)
    off.add_argument("--add", required=True, metavar="OFFICE", help="the office's id")
    off.add_argument("--webhook", metavar="URL",
                     help="where its alarms are POSTed (https); without it, the office "
                          "pulls them (alarms --office)")
    off.add_argument("--secret-file", required=True, type=Path, metavar="F",
                     help="a file holding the secret that signs its requests (never on "
                          "the command line)")
    off.add_argument("--json", action="store_true", help="print one JSON object")

    offs = sub.add_parser("offices", help="the justice offices (never their secrets)")
    db_arg(offs)
    offs.add_argument("--json", action="store_true", help="one JSON object a line")

    dlv = sub.add_parser("deliver", help="run one delivery worker: alarms to the offices' "
                                         "webhooks (run several)")
    db_arg(dlv)
    dlv.add_argument("--worker-id", default=None,
                     help="this worker's name in its claims (default: HOST-PID)")
    dlv.add_argument("--give-up-s", type=float, default=GIVE_UP_S,
                     help=f"mark a delivery failed this long after routing (default "
                          f"{GIVE_UP_S:.0f})")
    dlv.add_argument("--backoff-s", type=float, default=BACKOFF_S,
                     help=f"the first retry's delay, doubled each time (default {BACKOFF_S})")
    dlv.add_argument("--backoff-max-s", type=float, default=BACKOFF_MAX_S,
                     help=f"the longest delay between retries (default {BACKOFF_MAX_S:g})")
    dlv.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help="one POST's timeout")
    dlv.add_argument("--lease-s", type=float, default=LEASE_S,
                     help="how long a claim holds (longer than --timeout-s)")
    dlv.add_argument("--poll-s", type=float, default=POLL_S,
                     help=f"how often to look for alarms due when idle (default {POLL_S:g})")
    dlv.add_argument("--once", action="store_true",
                     help="deliver what is due, then exit (retries still pending are left)")
    dlv.add_argument("--json", action="store_true",
                     help="print events (started, delivered, retry, failed) as JSON lines")

    rep = sub.add_parser("deliveries", help="alarms delivered, retrying, failed and "
                                            "unrouted, per office, with latencies")
    db_arg(rep)
    rep.add_argument("--office", metavar="OFFICE", help="only this office's deliveries")
    rep.add_argument("--json", action="store_true", help="print one JSON object")


def _open(url: str, *, create: bool = False) -> Database:
    try:
        db = open_db(url, migrate=create)
    except DatabaseError as exc:
        raise RoutingError(str(exc)) from None
    if db.version(write=False) < ROUTING_SCHEMA_VERSION:
        db.close()
        raise RoutingError(f"{url} has no justice offices yet: add one first (ingest office "
                           "--add OFFICE --webhook URL --secret-file F)")
    return db


def _emit(args: argparse.Namespace, out: Mapping[str, JSON], text: str) -> None:
    print(json.dumps(out, sort_keys=True) if args.json else text, flush=True)


def _assign(args: argparse.Namespace) -> int:
    with _open(args.db, create=True) as db:
        moved = assign(db, args.gw, args.case, args.office)
    _emit(args, {"gw": args.gw, "case": args.case, "office": args.office,
                 "routed_waiting": moved},
          f"gw={args.gw} case={args.case} office={args.office}"
          + (f" ({moved} waiting alarm(s) routed)" if moved else ""))
    return 0


def _office(args: argparse.Namespace) -> int:
    secret = read_secret(args.secret_file)
    with _open(args.db, create=True) as db:
        new = add_office(db, args.add, args.webhook, secret)
    _emit(args, {"office": args.add, "webhook": args.webhook, "new": new},
          f"office={args.add} webhook={args.webhook or '(pull only)'} "
          f"{'added' if new else 'updated'}")
    return 0


def _offices(args: argparse.Namespace) -> int:
    with _open(args.db) as db:
        rows = offices(db)
    if not rows and not args.json:
        print(f"no office in {args.db} (ingest office --add OFFICE --webhook URL "
              "--secret-file F)")
    for row in rows:
        _emit(args, row, f"{row['office']}  {row['webhook'] or '(pull only)'}  "
                         f"{row['gateways']} gateway(s)")
    return 0


def _deliver(args: argparse.Namespace) -> int:
    config = DeliveryConfig(args.give_up_s, args.backoff_s, args.backoff_max_s,
                            args.timeout_s, args.lease_s, args.poll_s)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    stop = StopFlag()

    def on_outcome(outcome: Outcome) -> None:
        if args.json:
            print(json.dumps(outcome.to_json(), sort_keys=True), flush=True)

    stop_on_signals(stop)
    with _open(args.db, create=True) as db:
        worker = Worker(db, worker_id, config, on_outcome=on_outcome)
        if args.json:
            print(json.dumps({"event": "started", "worker": worker_id}), flush=True)
        log.info("delivery worker %s started", worker_id)
        if args.once:
            while not stop.is_set() and worker.step() is not None:
                pass
        else:
            worker.run(stop)
    if args.json:
        print(json.dumps({"event": "stopped", "worker": worker_id}), flush=True)
    return 0


def _deliveries(args: argparse.Namespace) -> int:
    with _open(args.db) as db:
        out = delivery_report(db, args.office)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    office_rows = out["offices"]
    for name, entry in sorted(office_rows.items() if isinstance(office_rows, dict) else []):
        if not isinstance(entry, dict):
            continue
        print(f"{name}: {entry['delivered']} delivered, {entry['pending']} pending, "
              f"{entry['failed']} FAILED, {entry['pull']} pull, {entry['retries']} retries; "
              f"latency from t {json.dumps(entry['latency_from_t_ms'])}, from store "
              f"{json.dumps(entry['latency_from_store_ms'])}")
        for failure in entry["failures"] if isinstance(entry["failures"], list) else []:
            print(f"  FAILED {json.dumps(failure, sort_keys=True)}")
    for alarm in out["unrouted"] if isinstance(out["unrouted"], list) else []:
        print(f"UNROUTED (no office assigned) {json.dumps(alarm, sort_keys=True)}")
    return 0


def pull_command(args: argparse.Namespace) -> int:
    """``alarms --office OFFICE [--since CURSOR] [--follow] [--json]``."""
    with _open(args.db) as db:
        cursor = args.since
        while True:
            for routed in pull(db, args.office, cursor):
                cursor = routed.route
                if args.json:
                    print(json.dumps({"cursor": routed.route, **routed.body_json()},
                                     sort_keys=True), flush=True)
                else:
                    print(f"@{routed.route} #{routed.alarm_id} {routed.key} {routed.kind} "
                          f"case {routed.case_ref} t {routed.t}", flush=True)
            if not args.follow:
                return 0
            threading.Event().wait(POLL_S)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "assign": _assign, "office": _office, "offices": _offices, "deliver": _deliver,
    "deliveries": _deliveries}
