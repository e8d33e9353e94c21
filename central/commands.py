"""The platform's command tool (``ingest command``): sign a command to one gateway, publish
it, wait for the gateway's answer (docs/commands.md).

For each gateway the platform numbers its commands 1, 2, 3… (``cseq``) in the ``commands``
table of the ingest database (schema version 7); the gateway applies them in that order,
each once. A command is signed by a command key (``command-key issue``: the key file with
its certificate, :func:`central.command_keys.load_command_signer`), published at QoS 1 on
``smartcorr/v1/gw/<gw>/cmd`` as the command publisher (certificate CN
:data:`core.topics.COMMAND_CN`), and answered by the gateway's ``command.applied`` or
``command.rejected`` record, which reaches this database through the ingest consumers: the
tool waits for it there and prints the outcome and the round trip.

A device key (``pair-tag``, ``pair-kiosk``) is read from a file or stdin, never argv, and
leaves this tool only encrypted to the gateway's encryption key: the one its latest
verified ``key.encryption`` record announced, checked against the identity keys the
platform registered for it.

Bounds: at most :data:`MAX_OUTSTANDING` unexpired commands of a gateway may wait for their
answer; a new one is refused until they are answered or expire.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from central.command_keys import load_command_signer
from central.db import Database, DatabaseError, open_db
from core.command_keys import CommandKeyCert
from core.commands import (
    KINDS,
    MAX_LIFETIME_MS,
    SETTINGS,
    BodyError,
    BoxPublic,
    command_digest,
    device_key_aad,
    parse_box_document,
    sign_command,
    validate_body,
)
from core.devices import KIOSK_SERIAL_MAX, MAX_ABSENT_AFTER_S, MIN_ABSENT_AFTER_S, TAG_REF_RE
from core.errors import UserError
from core.mqtt import BrokerConfig, make_client
from core.record import JSON
from core.suites import SoftwareKey, Verifier
from core.supervision import EndReason, LegalBasis
from core.topics import COMMAND_CN, commands_topic

#: The schema version that has the ``commands`` table (central/db.py).
COMMANDS_SCHEMA_VERSION = 7
#: Unexpired commands of one gateway waiting for an answer, at most.
MAX_OUTSTANDING = 32
#: How long a command is valid by default, and how long the tool waits for its answer.
DEFAULT_VALID_S = 86_400
DEFAULT_TIMEOUT_S = 60.0
#: How often the database is looked at for the answer, seconds.
POLL_S = 0.1
#: How long the broker has to acknowledge the publication, seconds.
PUBLISH_TIMEOUT_S = 15.0
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
ANSWER_KINDS = ("command.applied", "command.rejected")
BOX_KIND = "key.encryption"
DEVICE_KEY_BYTES = 16


class CommandError(UserError):
    """The command cannot be made or sent; the message says why and what to do."""


@dataclass(frozen=True)
class Issued:
    gw: str
    cseq: int
    kind: str
    sha256: str
    data: bytes
    not_after_ms: int


@dataclass(frozen=True)
class Outcome:
    """The gateway's answer: ``applied`` or ``rejected`` (with its reason), the record."""

    outcome: str
    seq: int
    body: dict[str, Any]

    @property
    def reason(self) -> str | None:
        return None if self.outcome == "applied" else str(self.body.get("reason"))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _open(url: str) -> Database:
    db = open_db(url, migrate=False)  # NoDatabaseError when there is none
    if db.version(write=False) < COMMANDS_SCHEMA_VERSION:
        db.close()
        raise CommandError(f"the database at {url} has no commands table yet (schema "
                           f"{COMMANDS_SCHEMA_VERSION}): run an ingest consumer of this "
                           "version once (it migrates), then try again")
    return db


# --- the gateway's encryption key ------------------------------------------------------------

def identities(db: Database, gw: str) -> dict[str, Verifier]:
    """The identity keys the platform registered for *gw* (enrolment and rotations)."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT kid, alg, pubkey FROM identities WHERE gw = ?", (gw,))
    return {str(kid): Verifier(str(alg), bytes(pub)) for kid, alg, pub in rows}


def gateway_box(db: Database, gw: str) -> BoxPublic:
    """The encryption key of *gw*'s latest verified ``key.encryption`` record, its identity
    signature checked; CommandError when none arrived (or none verifies)."""
    keys = identities(db, gw)
    if not keys:
        raise CommandError(f"gateway {gw} is not enrolled in this database")
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT seq, data FROM records WHERE gw = ? AND kind = ? "
                      "ORDER BY seq DESC LIMIT 8", (gw, BOX_KIND))
    problems = []
    for seq, data in rows:
        try:
            body = json.loads(bytes(data))["body"]
            return parse_box_document(body, keys, gw)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"seq {seq}: {exc}")
    raise CommandError(f"no usable key.encryption record of {gw} in this database"
                       + (f" ({'; '.join(problems)})" if problems else "") + ": the gateway "
                       "announces its encryption key at its first start after enrolment; "
                       "wait until its records arrive (ingest report --gw " + gw + ")")


def sealed_key_body(box: BoxPublic, gw: str, device: str, ident: str, key: bytes,
                    ) -> dict[str, JSON]:
    return box.seal(key, device_key_aad(gw, device, ident)).to_json()


# --- issuing -----------------------------------------------------------------------------------

def issue(db: Database, signer: SoftwareKey, cert: CommandKeyCert, gw: str, *, kind: str,
          body: Mapping[str, JSON], valid_ms: int, created_by: str,
          now_ms: Callable[[], int] = _now_ms, cseq: int | None = None) -> Issued:
    """Sign the next command of *gw* (or, with *cseq*, a fresh copy of an unanswered one
    whose bytes were lost or expired) and store it; not yet published."""
    if kind not in KINDS:
        raise CommandError(f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    if not 0 < valid_ms <= MAX_LIFETIME_MS:
        raise CommandError(f"a command is valid for 1 ms to {MAX_LIFETIME_MS // 1000} s (7 "
                           "days)")
    now = now_ms()
    if now >= cert.not_after or now < cert.not_before:
        raise CommandError(f"command key {cert.kid} is valid from {cert.not_before} to "
                           f"{cert.not_after} only: use a current key (command-key issue)")
    with db.transaction() as tx:
        tx.lock_gateway(gw)
        row = tx.one("SELECT status FROM gateways WHERE gw = ?", (gw,))
        if row is None:
            raise CommandError(f"gateway {gw} is not enrolled in this database")
        if row[0] != "active":
            raise CommandError(f"gateway {gw} is {row[0]}: it takes no command")
        waiting = tx.one("SELECT COUNT(*) FROM commands WHERE gw = ? AND outcome IS NULL "
                         "AND not_after > ?", (gw, now))
        if waiting is not None and int(waiting[0]) >= MAX_OUTSTANDING:
            raise CommandError(f"{waiting[0]} commands to {gw} still wait for an answer (at "
                               f"most {MAX_OUTSTANDING}): is the gateway offline? They "
                               "are answered when it comes back, or expire")
        top = tx.one("SELECT MAX(cseq) FROM commands WHERE gw = ?", (gw,))
        highest = int(top[0]) if top is not None and top[0] is not None else 0
        if cseq is None:
            cseq = highest + 1
        else:
            answered = tx.one("SELECT outcome FROM commands WHERE gw = ? AND cseq = ? AND "
                              "outcome IS NOT NULL AND outcome NOT IN ('rejected:replayed', "
                              "'rejected:out_of_order')", (gw, cseq))
            if not 0 < cseq <= highest or answered is not None:
                raise CommandError(f"cseq {cseq} of {gw} is not an unanswered command (the "
                                   f"highest is {highest})")
        data = sign_command(signer, gw=gw, cseq=cseq, issued_at_ms=now,
                            not_after_ms=now + valid_ms, kind=kind, body=body)
        sha = command_digest(data)
        tx.execute("INSERT INTO commands (gw, cseq, kind, sha256, data, kid, issued_at, "
                   "not_after, created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (gw, cseq, kind, sha, data, cert.kid, now, now + valid_ms, created_by,
                    now))
    return Issued(gw, cseq, kind, sha, data, now + valid_ms)


def stored(db: Database, gw: str, cseq: int) -> Issued:
    """The latest stored command of *gw* at *cseq* (to publish again)."""
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT kind, sha256, data, not_after FROM commands WHERE gw = ? AND "
                     "cseq = ? ORDER BY id DESC LIMIT 1", (gw, cseq))
    if row is None:
        raise CommandError(f"no command {cseq} of {gw} in this database")
    if not bytes(row[2]):
        raise CommandError(f"command {cseq} of {gw} was purged with its case (ingest purge: "
                           "its bytes are gone, its digest and outcome kept)")
    return Issued(gw, cseq, str(row[0]), str(row[1]), bytes(row[2]), int(row[3]))


def publish(broker: BrokerConfig, issued: Issued, *, client_id: str = COMMAND_CN,
            timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
    """Publish *issued* at QoS 1 and wait for the broker's PUBACK; CommandError when it
    is refused (the ACL: only the command publisher may write a command topic) or the
    broker cannot be reached."""
    client = make_client(client_id, broker)
    client.reconnect_delay_set(1, 2)
    events: dict[str, Any] = {}
    connected, acked = threading.Event(), threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        events["connack"] = reason
        connected.set()

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        events["puback"] = reason
        acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    try:
        client.connect_async(broker.host, broker.port, broker.keepalive_s, clean_start=True)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot reach the broker {broker.host}:{broker.port}: {exc}") \
            from None
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise CommandError(f"no connection to the broker {broker.host}:{broker.port} "
                               f"within {timeout_s:g} s: check --broker and the TLS files")
        if events["connack"].is_failure:
            raise CommandError(f"the broker refused the connection: {events['connack']} "
                               f"(the certificate's CN must be {COMMAND_CN})")
        info = client.publish(commands_topic(issued.gw), issued.data, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS or not acked.wait(timeout_s):
            raise CommandError("the broker did not acknowledge the command: try again "
                               f"(ingest command --gw {issued.gw} resend --cseq {issued.cseq})")
        if events["puback"].is_failure:
            raise CommandError(f"the broker refused the command ({events['puback']}): its ACL "
                               f"must let {COMMAND_CN} write smartcorr/v1/gw/+/cmd "
                               "(core.topics.broker_acl, docs/broker.md)")
    finally:
        client.disconnect()
        client.loop_stop()


def last_answer_seq(db: Database, gw: str) -> int:
    """The seq of *gw*'s latest answer record stored (0: none): a command published again
    is answered by a later one (an earlier answer to the same bytes may be a refusal that
    used nothing up, such as ``out_of_order``)."""
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT MAX(seq) FROM records WHERE gw = ? AND kind IN (?, ?)",
                     (gw, *ANSWER_KINDS))
    return int(row[0]) if row is not None and row[0] is not None else 0


def answer(db: Database, issued: Issued, after_seq: int = 0) -> Outcome | None:
    """The gateway's record answering *issued* (by its digest) with a seq above
    *after_seq*, if it arrived; stored as the command's outcome."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT seq, kind, data FROM records WHERE gw = ? AND kind IN (?, ?) "
                      "AND seq > ? ORDER BY seq", (issued.gw, *ANSWER_KINDS, after_seq))
    for seq, kind, data in rows:
        try:
            body = json.loads(bytes(data))["body"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(body, dict) or body.get("command_sha256") != issued.sha256:
            continue
        outcome = Outcome("applied" if kind == ANSWER_KINDS[0] else "rejected", int(seq), body)
        label = outcome.outcome if outcome.reason is None else f"rejected:{outcome.reason}"
        with db.transaction() as tx:
            tx.execute("UPDATE commands SET outcome = ?, outcome_seq = ?, outcome_at = ? WHERE "
                       "gw = ? AND sha256 = ?",
                       (label, int(seq), _now_ms(), issued.gw, issued.sha256))
        return outcome
    return None


def wait_answer(db: Database, issued: Issued, timeout_s: float,
                after_seq: int = 0) -> Outcome | None:
    deadline = time.monotonic() + timeout_s
    while True:
        found = answer(db, issued, after_seq)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


# --- the command line -------------------------------------------------------------------------

def _read_device_key(name: str, what: str) -> bytes:
    """A 16-byte key as 32 hex digits from file *name* or ``-`` (stdin); never argv."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{what} {name}: cannot read it ({exc})") from None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise CommandError(f"{what} {name}: the key must be 32 hex digits") from None
    if len(key) != DEVICE_KEY_BYTES:
        raise CommandError(f"{what} {name}: the key must be 16 bytes (32 hex digits)")
    return key


def _tag(text: str) -> str:
    tag = text.strip().upper()
    if not TAG_REF_RE.fullmatch(tag):
        raise CommandError(f"--tag {text!r}: give T and 8 hex digits (T0000ABCD)")
    return tag


def _serial(text: str) -> str:
    if not 1 <= len(text) <= KIOSK_SERIAL_MAX or not text.isprintable() or not text.isascii():
        raise CommandError(f"--serial: 1-{KIOSK_SERIAL_MAX} printable ASCII characters, as "
                           "the kiosk reports it")
    return text


def _signer(path: Path) -> tuple[SoftwareKey, CommandKeyCert]:
    """``--key``: a key file made by ``command-key issue``, or a directory holding them
    (the one valid now that expires last)."""
    if not path.is_dir():
        return load_command_signer(path)
    now = _now_ms()
    found = [load_command_signer(p) for p in sorted(path.glob("command-key-*.key"))]
    valid = [(k, c) for k, c in found if c.not_before <= now < c.not_after]
    if not valid:
        raise CommandError(f"--key {path}: no command key valid now in it (command-key "
                           "issue writes command-key-N.key)")
    return max(valid, key=lambda kc: kc[1].not_after)


def _broker(args: argparse.Namespace) -> BrokerConfig:
    host, sep, port = str(args.broker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CommandError(f"--broker {args.broker!r}: expected HOST:PORT")
    if args.no_tls:
        return BrokerConfig(host, int(port), tls=False)
    if not (args.ca and args.tls_cert and args.tls_key):
        raise CommandError(f"TLS needs --ca, --tls-cert and --tls-key (the command "
                           f"publisher's certificate, CN {COMMAND_CN}), or --no-tls for a "
                           "broker on loopback")
    for flag, value in (("--ca", args.ca), ("--tls-cert", args.tls_cert),
                        ("--tls-key", args.tls_key)):
        if not Path(value).is_file():
            raise CommandError(f"{flag} {value}: no such file")
    return BrokerConfig(host, int(port), str(args.ca), str(args.tls_cert), str(args.tls_key))


def body_of(args: argparse.Namespace, db: Database) -> dict[str, JSON]:  # noqa: PLR0911
    """The body of the kind the arguments name (device keys sealed to the gateway)."""
    kind, gw = args.kind, args.gw
    if kind == "pair-tag":
        tag = _tag(args.tag)
        key = _read_device_key(args.tag_key_file, "--tag-key-file")
        body: dict[str, JSON] = {"tag": tag, "key": sealed_key_body(
            gateway_box(db, gw), gw, "tag", tag, key)}
        if args.absent_after is not None:
            body["absent_after_s"] = args.absent_after
        if args.replace:
            body["replace"] = True
        return body
    if kind == "unpair-tag":
        return {"tag": _tag(args.tag)}
    if kind == "pair-kiosk":
        serial = _serial(args.serial)
        key = _read_device_key(args.kiosk_key_file, "--kiosk-key-file")
        body = {"serial": serial, "key": sealed_key_body(gateway_box(db, gw), gw, "kiosk",
                                                          serial, key)}
        if args.replace:
            body["replace"] = True
        return body
    if kind == "unpair-kiosk":
        return {"serial": _serial(args.serial)}
    if kind in SUPERVISION_KINDS:
        return supervision_body(args)
    if kind == "request-diag":
        from central import diag_command

        return diag_command.body_of(args)
    body = {"key": args.setting, "value": args.value}
    if args.tag is not None:
        body["tag"] = _tag(args.tag)
    return body


# --- the supervision kinds (docs/supervision.md) ---------------------------------------------

SUPERVISION_KINDS = ("set-authorisation", "end-authorisation", "set-presence-rules",
                     "approve-leave", "revoke-leave", "request-presence")
#: The record answering a spot check (request-presence), beside its command.applied.
PRESENCE_NOW = "presence.now"


def _window(text: str, option: str) -> dict[str, JSON]:
    """``mon,tue=22:00-06:00`` (``--window``) or ``2027-05-03=20:00-23:00`` (``--extra``)."""
    what, sep, span = text.partition("=")
    start, dash, end = span.partition("-")
    if not sep or not dash or not what:
        example = "mon,tue=22:00-06:00" if option == "--window" else "2027-05-03=20:00-23:00"
        raise CommandError(f"{option} {text!r}: expected like {example}")
    if option == "--window":
        return {"days": [d.strip().lower() for d in what.split(",")], "start": start,
                "end": end}
    return {"date": what, "start": start, "end": end}


def _instant(text: str, option: str) -> int:
    """Milliseconds since 1970, or an ISO 8601 time with its offset (``2027-05-01T08:00+08:00``)."""
    if text.isdigit():
        return int(text)
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise CommandError(f"{option} {text!r}: give milliseconds since 1970 or an ISO 8601 "
                           "time with its offset (2027-05-01T08:00+08:00)")
    return int(at.timestamp() * 1000)


def supervision_body(args: argparse.Namespace) -> dict[str, JSON]:
    """The body of a supervision kind from its options (checked by the gateway's own
    parser before it is signed)."""
    kind, tag = args.kind, _tag(args.tag)
    if kind == "set-authorisation":
        return {"tag": tag, "basis": args.basis, "document": args.document,
                "approver": args.approver, "start": args.start, "end": args.end,
                "zone": args.zone}
    if kind == "end-authorisation":
        return {"tag": tag, "document": args.document, "approver": args.approver,
                "reason": args.reason}
    if kind == "set-presence-rules":
        exceptions: list[JSON] = [{"date": d, "skip": True} for d in args.skip or ()]
        exceptions += [_window(e, "--extra") for e in args.extra or ()]
        body: dict[str, JSON] = {"tag": tag, "zone": args.zone, "grace_min": args.grace_min,
                                 "windows": [_window(w, "--window") for w in args.window or ()]}
        if exceptions:
            body["exceptions"] = exceptions
        return body
    if kind == "approve-leave":
        return {"tag": tag, "leave_id": args.leave_id, "document": args.document,
                "approver": args.approver, "start_ms": _instant(args.start, "--start"),
                "end_ms": _instant(args.end, "--end"), "grace_min": args.grace_min}
    if kind == "revoke-leave":
        return {"tag": tag, "leave_id": args.leave_id}
    return {"tag": tag}


def presence_answer(db: Database, issued: Issued, after_seq: int = 0) -> dict[str, Any] | None:
    """The ``presence.now`` record answering the spot check *issued*, if it arrived."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT seq, data FROM records WHERE gw = ? AND kind = ? AND seq > ? "
                      "ORDER BY seq", (issued.gw, PRESENCE_NOW, after_seq))
    for seq, data in rows:
        try:
            body = json.loads(bytes(data))["body"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(body, dict) and body.get("command_sha256") == issued.sha256:
            return {"seq": int(seq), **body}
    return None


def wait_presence(db: Database, issued: Issued, timeout_s: float,
                  after_seq: int = 0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while True:
        found = presence_answer(db, issued, after_seq)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_S)


def presence_words(answer: Mapping[str, Any]) -> str:
    """A spot check's answer for an officer: present or not, last heard, the rule and leave."""
    if not answer.get("authorised"):
        return f"{answer.get('tag')}: not under an authorised period (nothing is recorded)"
    present = {True: "PRESENT", False: "ABSENT", None: "not known yet"}[answer.get("present")]
    heard = answer.get("last_heard_ms")
    ago = "never heard" if heard is None else \
        f"last heard {max(0, int(answer['now_ms']) - int(heard)) // 1000} s ago"
    rssi = "" if answer.get("rssi_dbm") is None else f", {answer['rssi_dbm']} dBm"
    window = answer.get("window")
    rule = "no window in force" if not window else \
        f"must be home ({window.get('start')}-{window.get('end')})" \
        if answer.get("must_be_home") else "window suspended"
    leave = answer.get("leave")
    on_leave = "" if not leave else f", on leave {leave.get('leave_id')}"
    return f"{answer.get('tag')}: {present} ({ago}{rssi}); {rule}{on_leave}"


def _check_body(args: argparse.Namespace, body: Mapping[str, JSON]) -> None:
    """What the gateway will check of the body, checked here first (a usage error)."""
    try:
        validate_body(args.kind, body, gateway_id=args.gw)
    except BodyError as exc:
        raise CommandError(f"{args.kind}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """``ingest command``: sign, store, publish, wait, print."""
    broker = _broker(args)
    if args.valid_for <= 0 or args.valid_for * 1000 > MAX_LIFETIME_MS:
        raise CommandError(f"--valid-for must be 1 to {MAX_LIFETIME_MS // 1000} seconds")
    try:
        db = _open(args.db)
    except DatabaseError as exc:
        raise CommandError(str(exc)) from None
    try:
        if args.kind == "resend":
            issued = stored(db, args.gw, args.cseq)
            if issued.not_after_ms <= _now_ms():
                signer, cert = _signer(args.key)
                old = json.loads(issued.data)
                issued = issue(db, signer, cert, args.gw, kind=old["kind"], body=old["body"],
                               valid_ms=args.valid_for * 1000, created_by=args.by,
                               cseq=args.cseq)
        else:
            signer, cert = _signer(args.key)
            body = body_of(args, db)
            _check_body(args, body)
            issued = issue(db, signer, cert, args.gw, kind=args.kind, body=body,
                           valid_ms=args.valid_for * 1000, created_by=args.by)
            if issued.kind == "request-diag" and not args.no_wait:
                from central import diag_command

                return diag_command.run_request(args, broker, db, issued)
        after = last_answer_seq(db, issued.gw)
        started = time.monotonic()
        publish(broker, issued)
        out: dict[str, Any] = {"gw": issued.gw, "cseq": issued.cseq, "kind": issued.kind,
                               "command_sha256": issued.sha256, "published": True}
        if args.no_wait:
            _print(args, out, f"command {issued.cseq} ({issued.kind}) to {issued.gw} "
                              "published; not waiting for the answer")
            return EXIT_OK
        found = wait_answer(db, issued, args.timeout, after)
        rtt_ms = round((time.monotonic() - started) * 1000)
        spot = None
        if found is not None and found.outcome == "applied" and issued.kind == "request-presence":
            spot = wait_presence(db, issued, max(1.0, args.timeout - rtt_ms / 1000), after)
            spot_ms = round((time.monotonic() - started) * 1000)
    finally:
        db.close()
    if found is None:
        out.update(outcome=None, rtt_ms=None)
        _print(args, out, f"command {issued.cseq} ({issued.kind}) to {issued.gw}: no answer "
                          f"within {args.timeout:g} s. The gateway may be offline (the broker "
                          "keeps the command for it until it expires) or its records may not "
                          f"have reached this database yet (ingest report --gw {issued.gw})")
        return EXIT_PROBLEM
    out.update(outcome=found.outcome, reason=found.reason, record_seq=found.seq,
               rtt_ms=rtt_ms, answer=found.body)
    if issued.kind == "request-presence" and found.outcome == "applied":
        if spot is None:
            out.update(presence=None)
            _print(args, out, f"spot check {issued.cseq} applied by {issued.gw}, but its "
                              "presence.now record has not reached this database yet")
            return EXIT_PROBLEM
        out.update(presence=spot, presence_rtt_ms=spot_ms)
        _print(args, out, f"{presence_words(spot)} [{issued.gw}, answered in {spot_ms} ms]")
        return EXIT_OK
    if found.outcome == "applied":
        text = (f"command {issued.cseq} ({issued.kind}) applied by {issued.gw} in {rtt_ms} ms "
                f"(record {found.seq}{'' if found.body.get('changed') else ', nothing changed'}"
                ")")
    else:
        hint = ""
        if found.reason in ("out_of_order", "replayed"):
            hint = (f"; the gateway expects cseq {found.body.get('expected_cseq')}: resend it "
                    f"(ingest command --gw {issued.gw} resend --cseq "
                    f"{found.body.get('expected_cseq')})")
        text = (f"command {issued.cseq} ({issued.kind}) REFUSED by {issued.gw}: "
                f"{found.reason}: {found.body.get('detail')}{hint} ({rtt_ms} ms)")
    _print(args, out, text)
    return EXIT_OK if found.outcome == "applied" else EXIT_PROBLEM


def _print(args: argparse.Namespace, out: Mapping[str, Any], text: str) -> None:
    print(json.dumps(out, sort_keys=True) if args.json else text)


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``command --gw GW KIND …``."""
    cmd = sub.add_parser("command", help="sign and send a command to a gateway, wait for its "
                                         "answer (docs/commands.md)")
    db_arg(cmd)
    cmd.add_argument("--gw", required=True, metavar="GW", help="the gateway's id")
    cmd.add_argument("--key", required=True, type=Path, metavar="PATH",
                     help="the command key: a command-key-N.key file made by 'command-key "
                          "issue', or the directory holding them (the valid one that expires "
                          "last)")
    cmd.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker")
    cmd.add_argument("--ca", metavar="FILE", help="the broker's CA certificate")
    cmd.add_argument("--tls-cert", metavar="FILE",
                     help=f"the command publisher's certificate (CN {COMMAND_CN})")
    cmd.add_argument("--tls-key", metavar="FILE", help="its private key (mode 600)")
    cmd.add_argument("--no-tls", action="store_true", help="plain MQTT (loopback only)")
    cmd.add_argument("--valid-for", type=int, default=DEFAULT_VALID_S, metavar="S",
                     help=f"how long the command may be applied, seconds (default "
                          f"{DEFAULT_VALID_S}; at most 7 days)")
    cmd.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                     help=f"how long to wait for the answer (default {DEFAULT_TIMEOUT_S:g} s)")
    cmd.add_argument("--no-wait", action="store_true", help="publish and return")
    cmd.add_argument("--by", default=getpass.getuser(), metavar="NAME",
                     help="who sends it, kept with the command (default: the OS user)")
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    kinds = cmd.add_subparsers(dest="kind", required=True, metavar="KIND")
    pt = kinds.add_parser("pair-tag", help="pair a tag (its key encrypted to the gateway)")
    pt.add_argument("--tag", required=True, help="T and 8 hex digits")
    pt.add_argument("--tag-key-file", required=True, metavar="FILE|-",
                    help="the tag's key, 32 hex digits, in a file or '-' for stdin (never "
                         "on the command line)")
    pt.add_argument("--absent-after", type=int, metavar="S",
                    help=f"absent after S seconds unheard ({MIN_ABSENT_AFTER_S}-"
                         f"{MAX_ABSENT_AFTER_S}; default: the gateway's)")
    pt.add_argument("--replace", action="store_true",
                    help="replace the key of a tag paired already (once it holds the new one)")
    ut = kinds.add_parser("unpair-tag", help="unpair a tag")
    ut.add_argument("--tag", required=True, help="T and 8 hex digits")
    pk = kinds.add_parser("pair-kiosk", help="pair a check-in kiosk")
    pk.add_argument("--serial", required=True, help="the kiosk's serial")
    pk.add_argument("--kiosk-key-file", required=True, metavar="FILE|-",
                    help="the kiosk's key, 32 hex digits, in a file or '-' for stdin")
    pk.add_argument("--replace", action="store_true", help="replace a paired kiosk's key")
    uk = kinds.add_parser("unpair-kiosk", help="unpair a kiosk")
    uk.add_argument("--serial", required=True, help="the kiosk's serial")
    sc = kinds.add_parser("set-config", help="change a setting: "
                          + ", ".join(f"{k} ({s.low}-{s.high} {s.unit}"
                                      f"{', with --tag' if s.per_tag else ''})"
                                      for k, s in sorted(SETTINGS.items())))
    sc.add_argument("--setting", required=True, choices=sorted(SETTINGS), help="which")
    sc.add_argument("--value", required=True, type=int, help="its new value")
    sc.add_argument("--tag", help="the tag, for a tag's setting")
    _supervision_parsers(kinds)
    from central import diag_command

    diag_command.add_parser(kinds)
    rs = kinds.add_parser("resend", help="publish an unanswered command again (signed anew "
                                         "at the same cseq if it expired)")
    rs.add_argument("--cseq", required=True, type=int, help="which")


def _supervision_parsers(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The supervision kinds' options (docs/supervision.md defines each field)."""
    tag_help = "the tag, T and 8 hex digits"
    sa = kinds.add_parser("set-authorisation", help="authorise the monitoring of a tag for a "
                          "period of at most three calendar months (Art. 29), or renew it")
    sa.add_argument("--tag", required=True, help=tag_help)
    sa.add_argument("--basis", required=True, choices=[b.value for b in LegalBasis],
                    help="the case of Art. 29 para. 1")
    sa.add_argument("--document", required=True, help="the approval decision's number")
    sa.add_argument("--approver", required=True, help="who approved it")
    sa.add_argument("--start", required=True, metavar="YYYY-MM-DD", help="the first day")
    sa.add_argument("--end", required=True, metavar="YYYY-MM-DD",
                    help="the last day (at most three calendar months after --start)")
    sa.add_argument("--zone", required=True, metavar="AREA/CITY",
                    help="the person's IANA time zone (Asia/Shanghai)")
    ea = kinds.add_parser("end-authorisation", help="end a tag's monitoring now")
    ea.add_argument("--tag", required=True, help=tag_help)
    ea.add_argument("--document", required=True, help="the decision ending it")
    ea.add_argument("--approver", required=True, help="who decided")
    ea.add_argument("--reason", required=True, choices=[r.value for r in EndReason],
                    help="why it ends")
    pr = kinds.add_parser("set-presence-rules", help="the weekly windows in which the "
                          "person must be home (replacing the tag's rules)")
    pr.add_argument("--tag", required=True, help=tag_help)
    pr.add_argument("--zone", required=True, metavar="AREA/CITY",
                    help="the person's IANA time zone")
    pr.add_argument("--grace-min", required=True, type=int, metavar="MIN",
                    help="minutes away (or late) before a breach, 0-240")
    pr.add_argument("--window", action="append", metavar="DAYS=HH:MM-HH:MM",
                    help="a weekly window, e.g. mon,tue,wed,thu,fri=22:00-06:00 (repeat it; "
                         "none: the rules are cleared)")
    pr.add_argument("--skip", action="append", metavar="YYYY-MM-DD",
                    help="a date on which no weekly window opens (repeat it)")
    pr.add_argument("--extra", action="append", metavar="YYYY-MM-DD=HH:MM-HH:MM",
                    help="a one-off window opening on that date (repeat it)")
    al = kinds.add_parser("approve-leave", help="an approved leave, which suspends the rules")
    al.add_argument("--tag", required=True, help=tag_help)
    al.add_argument("--leave-id", required=True, help="the platform's id of the leave")
    al.add_argument("--document", required=True, help="the approval's number")
    al.add_argument("--approver", required=True, help="who approved it")
    al.add_argument("--start", required=True, metavar="TIME",
                    help="when it starts: ISO 8601 with offset, or ms since 1970")
    al.add_argument("--end", required=True, metavar="TIME",
                    help="when the person must be back (at most 30 days later)")
    al.add_argument("--grace-min", required=True, type=int, metavar="MIN",
                    help="how late the person may be back, 0-240 minutes")
    rl = kinds.add_parser("revoke-leave", help="withdraw a leave, or end it now")
    rl.add_argument("--tag", required=True, help=tag_help)
    rl.add_argument("--leave-id", required=True, help="which leave")
    rp = kinds.add_parser("request-presence", help="a night spot check: the gateway answers "
                          "with a signed presence.now record; prints it and the round trip")
    rp.add_argument("--tag", required=True, help=tag_help)


def _run(args: argparse.Namespace) -> int:
    return run(args)


COMMANDS = {"command": _run}

