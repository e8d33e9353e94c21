"""The platform's command line: ``python -m central …`` (or the ``ingest`` script).

``enrol`` registers a gateway (its ``signing.pub``) or decommissions one; ``consume``
runs one ingest consumer (run several: a shared subscription spreads the gateways'
messages over them); ``alarms`` lists (or follows) the alarm-class records stored;
``report`` says everything the platform knows of one gateway's stream; ``presence`` what
its ``tag.interval`` records prove of one tag (:mod:`central.presence`); ``gateways`` lists
the enrolled gateways; ``verify`` checks
a capture offline (:mod:`central.capture`); ``export`` writes a court-ready zip of one
gateway's records over a period and ``verify-export`` checks one (:mod:`central.export`);
``office``, ``offices``, ``assign``, ``deliver``, ``deliveries`` and ``alarms --office``
route alarms to the justice offices (:mod:`central.routing`, docs/alarms.md);
``close-case``, ``purge``, ``actions`` and ``action-key`` keep a closed case's data for
its retention period, then purge it as a signed platform action (:mod:`central.retention`);
``command-root`` and ``command-key`` run the offline root that certifies the platform's
command keys, and export what gateways install (:mod:`central.command_keys`);
``ca`` is the gateways' certificate authority (enrolment answers, claim tokens,
revocation, the CRL: :mod:`central.ca`) and ``enrol-service`` answers enrolment requests
over MQTT (:mod:`central.enrolment`; docs/enrolment.md); ``command`` signs and sends a
command to a gateway and waits for its answer (:mod:`central.commands`, docs/commands.md).
Errors say what is wrong and how to fix it,
and exit 2 (``ingest <command>: …``); ``--json`` gives one JSON object a line. Only
``enrol`` and ``consume`` create or migrate a database; the commands that read one refuse
a URL where there is none (and create nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from central import ca, command_keys, enrolment, retention, routing
from central import commands as command_tool
from central.db import Database, DatabaseError, StorageError, open_db
from central.examples import add_examples
from central.ingest import SIG_AUDIT, Alarm, EnrolError, Ingest, alarms, report
from central.record import load_registrations
from core.devices import TAG_REF_RE
from core.errors import UserError
from core.mqtt import BrokerConfig
from core.stopping import StopFlag, stop_on_signals

EXIT_ERROR = 2
#: How often ``alarms --follow`` looks for new ones, seconds.
FOLLOW_POLL_S = 0.5
log = logging.getLogger("central")


class CliError(UserError):
    """A wrong argument or setup; the message says how to fix it."""


def _share(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return value


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="URL",
                        help="the platform's database: sqlite:///PATH or "
                             "postgresql://USER@HOST:PORT/DB")


def program_name(argv0: str | None = None) -> str:
    """How this command line was called: ``ingest`` (the console script), or ``python -m
    central``."""
    raw = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    path = Path(raw)
    if path.name == "__main__.py" and path.parent.name == "central":
        return "python -m central"
    # the console script (or a copy, ingest-2); called from elsewhere (a test runner,
    # python -c): the script's name
    return path.name if path.name.startswith("ingest") else "ingest"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or program_name(),
                                     description="The SmartCorr platform's ingest.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    enrol = sub.add_parser("enrol", help="register a gateway's identity key, or "
                                         "decommission a gateway")
    _db_arg(enrol)
    what = enrol.add_mutually_exclusive_group(required=True)
    what.add_argument("--registration", type=Path, metavar="signing.pub",
                      help="the gateway's registration (signing.pub of its identity)")
    what.add_argument("--decommission", metavar="GW",
                      help="refuse this gateway's records from now on")
    enrol.add_argument("--tls-fingerprint", metavar="SHA256",
                       help="the SHA-256 fingerprint of the gateway's TLS certificate")
    enrol.add_argument("--json", action="store_true", help="print one JSON object")

    consume = sub.add_parser("consume", help="run one ingest consumer (MQTT to database)")
    _db_arg(consume)
    consume.add_argument("--broker", required=True, metavar="HOST:PORT",
                         help="the broker the gateways publish to (start the consumers "
                              "before the first gateway: docs/enrolment.md)")
    consume.add_argument("--ca", metavar="FILE", help="the broker's CA certificate")
    consume.add_argument("--cert", metavar="FILE", help="this consumer's client certificate")
    consume.add_argument("--key", metavar="FILE", help="its private key")
    consume.add_argument("--no-tls", action="store_true",
                         help="plain MQTT (a broker on loopback only)")
    consume.add_argument("--group", default="ingest",
                         help="the shared subscription's group (default: ingest)")
    consume.add_argument("--client-id", required=True,
                         help="this consumer's MQTT client id: its own, kept across restarts "
                              "(its session holds what it has not acknowledged)")
    consume.add_argument("--json", action="store_true",
                         help="print events (subscribed, alarm, stopped) as JSON lines")
    consume.add_argument("--sig-audit", type=_share, default=SIG_AUDIT, metavar="SHARE",
                         help="the share (0 to 1) of the records a verified head covers "
                              "whose own signature is checked too (docs/records.md, "
                              f"Transport; default {SIG_AUDIT:g}; 1 checks every one)")

    alarm = sub.add_parser("alarms", help="the alarm-class records stored")
    _db_arg(alarm)
    alarm.add_argument("--since", type=int, default=0, metavar="ID",
                       help="only after this alarm id (a cursor)")
    alarm.add_argument("--follow", action="store_true", help="keep printing new ones")
    alarm.add_argument("--json", action="store_true", help="one JSON object a line")
    alarm.add_argument("--office", metavar="OFFICE",
                       help="the pull API: the alarms routed to this justice office, "
                            "--since its cursor (docs/alarms.md)")

    rep = sub.add_parser("report", help="what the platform holds of one gateway's stream")
    _db_arg(rep)
    rep.add_argument("--gw", required=True, metavar="ID", help="the gateway's id")
    rep.add_argument("--json", action="store_true", help="print one JSON object")

    pres = sub.add_parser("presence", help="what a gateway's tag.interval records prove of "
                                           "one tag: spans, holes explained or not "
                                           "(central/presence.py)")
    _db_arg(pres)
    pres.add_argument("--gw", required=True, metavar="ID", help="the gateway's id")
    pres.add_argument("--tag", required=True, metavar="T", help="the tag (T and 8 hex digits)")
    pres.add_argument("--from", dest="from_", metavar="T",
                      help="only intervals sealed from then: ISO 8601 UTC or ms since 1970")
    pres.add_argument("--to", metavar="T", help="only intervals sealed until then (included)")
    pres.add_argument("--json", action="store_true", help="print one JSON object")

    gws = sub.add_parser("gateways", help="the enrolled gateways: id, status, enrolment, "
                                          "records stored, highest seq")
    _db_arg(gws)
    gws.add_argument("--json", action="store_true", help="one JSON object a line")

    exp = sub.add_parser("export", help="a court-ready zip of one gateway's records over a "
                                        "period (central/export.py)")
    _db_arg(exp)
    exp.add_argument("--gw", required=True, metavar="ID", help="the gateway's id")
    exp.add_argument("--from", dest="from_", required=True, metavar="T",
                     help="the period's start: ISO 8601 UTC (2025-10-09T08:00:00Z) or ms "
                          "since 1970, over the records' t (included)")
    exp.add_argument("--to", required=True, metavar="T", help="the period's end (included)")
    exp.add_argument("--out", required=True, type=Path, metavar="F.zip",
                     help="the zip to write (never replaced if it exists)")
    exp.add_argument("--by", metavar="NAME", help="who makes the export (default: the OS user)")
    exp.add_argument("--json", action="store_true", help="print one JSON object")
    vexp = sub.add_parser("verify-export", help="check an export zip: exit 0 valid, 1 "
                                                "problems, 2 unreadable")
    vexp.add_argument("zip", type=Path, metavar="F.zip", help="the export to check")
    vexp.add_argument("--json", action="store_true", help="print one JSON object")

    routing.add_commands(sub, _db_arg)  # assign, office, offices, deliver, deliveries
    retention.add_commands(sub, _db_arg)  # close-case, purge, actions, action-key
    command_keys.add_commands(sub)  # command-root init; command-key issue|revoke|list|export
    ca.add_commands(sub, _db_arg)  # ca init|sign|claim|revoke|crl|list|issue
    enrolment.add_commands(sub, _db_arg)  # enrol-service
    command_tool.add_commands(sub, _db_arg)  # command --gw GW KIND: signed commands

    verify = sub.add_parser("verify", help="verify a capture of MQTT messages offline")
    from central import capture

    capture.add_arguments(verify)
    add_examples(parser)
    return parser


def _open(url: str, *, create: bool = False) -> Database:
    """The database at *url*; created and migrated only with *create* (``enrol``):
    otherwise one must be there (:class:`~central.db.NoDatabaseError`)."""
    try:
        return open_db(url, migrate=create)
    except DatabaseError as exc:
        raise CliError(str(exc)) from None


def _enrol(args: argparse.Namespace) -> int:
    with _open(args.db, create=True) as db:
        ingest = Ingest(db)
        if args.decommission:
            if not ingest.decommission(args.decommission):
                raise CliError(f"gateway {args.decommission!r} is not enrolled: "
                               "'ingest gateways --db URL' lists the ids")
            with db.transaction(write=False) as tx:  # a revoked gateway stays revoked
                row = tx.one("SELECT status FROM gateways WHERE gw = ?", (args.decommission,))
            out = {"gw": args.decommission, "status": "decommissioned" if row is None
                   else str(row[0])}
        else:
            try:
                (reg,) = load_registrations([args.registration]).values()
            except ValueError as exc:
                raise CliError(f"{exc}: give the signing.pub of the gateway's identity "
                               "directory") from None
            try:
                new = ingest.enrol(reg, tls_fingerprint=args.tls_fingerprint)
            except EnrolError as exc:
                raise CliError(str(exc)) from None
            out = {"gw": reg.gateway_id, "status": "active", "kid": reg.kid,
                   "class": reg.key_class, "new": new}
    print(json.dumps(out, sort_keys=True) if args.json else
          " ".join(f"{k}={v}" for k, v in out.items()))
    return 0


def _broker(args: argparse.Namespace) -> BrokerConfig:
    host, sep, port = str(args.broker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CliError(f"--broker {args.broker!r}: expected HOST:PORT")
    if not args.no_tls and not (args.ca and args.cert and args.key):
        raise CliError("TLS needs --ca, --cert and --key (this consumer's own certificate; "
                       "a broker binding client ids to certificates needs one per consumer), "
                       "or --no-tls for a broker on loopback")
    for name in ("ca", "cert", "key"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            raise CliError(f"--{name} {value}: no such file")
    return BrokerConfig(host, int(port), args.ca, args.cert, args.key, tls=not args.no_tls)


def _consume(args: argparse.Namespace) -> int:
    from central.consumer import Consumer

    broker = _broker(args)
    stop = StopFlag()

    def emit(event: dict[str, object], text: str) -> None:
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            log.info("%s", text)

    def on_alarm(alarm: Alarm) -> None:
        emit({"event": "alarm", **alarm.to_json()},
             f"alarm #{alarm.id}: {alarm.gateway_id} seq {alarm.seq} {alarm.kind} "
             f"(latency {alarm.latency_ms} ms)")

    consumer = Consumer(args.db, broker, client_id=args.client_id, group=args.group,
                        on_alarm=on_alarm, sig_audit=args.sig_audit,
                        on_subscribed=lambda: emit(
                            {"event": "subscribed", "client_id": args.client_id,
                             "topic": consumer.topic},
                            f"consumer {args.client_id} subscribed to {consumer.topic}"))

    stop_on_signals(stop)
    try:
        consumer.start()
    except DatabaseError as exc:
        raise CliError(str(exc)) from None
    try:
        while not stop.wait(0.5):
            if consumer.failed.is_set():
                emit({"event": "failed", "error": str(consumer.error)},
                     f"consumer {args.client_id} failed: {consumer.error}")
                return 1
    finally:
        consumer.stop()
        totals = dict(consumer.ingest.totals) if consumer.ingest else {}
        emit({"event": "stopped", "client_id": args.client_id, "totals": totals},
             stopped_line(args.client_id, totals))
    return 0


def stopped_line(client_id: str, totals: dict[str, int]) -> str:
    """``consumer c2 stopped: 12 messages, 36 records stored`` (and what else is not 0)."""
    messages, stored = totals.get("messages", 0), totals.get("stored", 0)
    rest = ", ".join(f"{k} {v}" for k, v in sorted(totals.items())
                     if v and k not in ("messages", "stored", "records"))
    return (f"consumer {client_id} stopped: {messages} messages, {stored} records stored"
            + (f" ({rest})" if rest else ""))


def _alarms(args: argparse.Namespace) -> int:
    if args.office:
        return routing.pull_command(args)
    with _open(args.db) as db:
        cursor = args.since
        while True:
            for alarm in alarms(db, cursor):
                cursor = alarm.id
                if args.json:
                    print(json.dumps(alarm.to_json(), sort_keys=True), flush=True)
                else:
                    print(alarm_line(alarm, _record_body(db, alarm)), flush=True)
            if not args.follow:
                return 0
            threading.Event().wait(FOLLOW_POLL_S)


def _record_body(db: Database, alarm: Alarm) -> object:
    """The body of the alarm's record, from its stored bytes (None if unreadable)."""
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT data FROM records WHERE gw = ? AND seq = ?",
                     (alarm.gateway_id, alarm.seq))
    if row is None:
        return None
    try:
        record = json.loads(bytes(row[0]))
    except ValueError:
        return None
    return record.get("body") if isinstance(record, dict) else None


def describe(kind: str, body: object) -> str:
    """What an alarm-class record says, in a few words, from its body."""
    if not isinstance(body, dict):
        return kind
    if kind == "local.action":
        operator = body.get("operator")
        who = "an unknown operator"
        if isinstance(operator, dict):
            name = operator.get("name") or operator.get("os_user") or "an unnamed operator"
            role = operator.get("role")
            who = f"{name} ({role})" if role else str(name)
        return f"local action {body.get('action')} by {who}"
    if kind == "gap":
        evicted = body.get("evicted")
        return f"gap: seqs {evicted} evicted" if evicted else "gap"
    scalars = [f"{k}={v}" for k, v in sorted(body.items())
               if isinstance(v, (str, int, float, bool)) and not isinstance(v, dict)]
    return f"{kind} ({', '.join(scalars[:5])})" if scalars else kind


def alarm_line(alarm: Alarm, body: object) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(alarm.t / 1000))
    return (f"#{alarm.id} {when} {alarm.gateway_id} seq {alarm.seq}: "
            f"{describe(alarm.kind, body)} (latency {alarm.latency_ms} ms)")


def _gateways(args: argparse.Namespace) -> int:
    with _open(args.db) as db, db.transaction(write=False) as tx:
        rows = tx.all("SELECT g.gw, g.status, g.enrolled_at, g.decommissioned_at, "
                      "COUNT(r.seq), MAX(r.seq) FROM gateways g LEFT JOIN records r "
                      "ON r.gw = g.gw GROUP BY g.gw, g.status, g.enrolled_at, "
                      "g.decommissioned_at ORDER BY g.gw")
    if not rows and not args.json:
        print(f"no gateway enrolled in {args.db} (ingest enrol --registration signing.pub)")
    for gw, status, enrolled_at, decommissioned_at, records, top in rows:
        out = {"gw": gw, "status": status, "enrolled_at": int(enrolled_at),
               "decommissioned_at": None if decommissioned_at is None
               else int(decommissioned_at),
               "records": int(records), "highest_seq": None if top is None else int(top)}
        if args.json:
            print(json.dumps(out, sort_keys=True))
        else:
            enrolled = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(enrolled_at) / 1000))
            print(f"{gw}  {status}  enrolled {enrolled}  {out['records']} records  "
                  f"highest seq {'-' if top is None else int(top)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    with _open(args.db) as db:
        try:
            out = report(db, args.gw)
        except KeyError:
            raise CliError(f"gateway {args.gw!r} is not enrolled in {args.db}: enrol it "
                           "first (enrol --registration signing.pub)") from None
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    for key, value in out.items():
        print(f"{key}: {json.dumps(value, sort_keys=True)}")
    return 0


def _presence(args: argparse.Namespace) -> int:
    from central import export, presence

    if not TAG_REF_RE.fullmatch(args.tag):
        raise CliError(f"--tag {args.tag!r}: a tag is 'T' and 8 upper-case hex digits, as in "
                       "its records (T0000002A)")
    from_ms = None if args.from_ is None else export.parse_time(args.from_)
    to_ms = None if args.to is None else export.parse_time(args.to)
    with _open(args.db) as db:
        with db.transaction(write=False) as tx:
            if tx.one("SELECT 1 FROM gateways WHERE gw = ?", (args.gw,)) is None:
                raise CliError(f"gateway {args.gw!r} is not enrolled in {args.db}: "
                               "'ingest gateways --db URL' lists the ids")
        proof = presence.presence(db, args.gw, args.tag, from_ms=from_ms, to_ms=to_ms)
    if args.json:
        print(json.dumps({"gw": args.gw, "from_ms": from_ms, "to_ms": to_ms,
                          **proof.to_json()}, sort_keys=True))
        return 0
    print(presence.report_text(args.gw, proof))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from central import capture

    return int(capture.run(args))


def _export(args: argparse.Namespace) -> int:
    from central import export

    with _open(args.db) as db:
        out = export.export(db, args.gw, export.parse_time(args.from_),
                            export.parse_time(args.to), args.out, by=args.by)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"wrote {out['out']}: {out['records']} records of {out['gw']}, seqs "
              f"{out['seq_ranges']}, unexplained gaps {out['gaps_unexplained']}")
        print(f"record outside the zip: manifest.json SHA-256 {out['manifest_sha256']}")
        print(f"                        manifest.json SM3     {out['manifest_sm3']}")
    return 0


def _verify_export(args: argparse.Namespace) -> int:
    from central import export

    try:
        check = export.check_export(args.zip)
    except export.UnreadableExportError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(check.as_json(), sort_keys=True) if args.json else
          export.report_text(check))
    return export.EXIT_PROBLEM if check.problems else export.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    prog = program_name()
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    commands = {"enrol": _enrol, "consume": _consume, "alarms": _alarms, "report": _report,
                "gateways": _gateways, "presence": _presence, "verify": _verify,
                "export": _export,
                "verify-export": _verify_export, **routing.COMMANDS, **retention.COMMANDS,
                **command_keys.COMMANDS, **ca.COMMANDS, **enrolment.COMMANDS,
                **command_tool.COMMANDS}
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except StorageError as exc:
        print(f"{prog} {args.command}: {exc}: check that the database is "
              "reachable and try again", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # '... | head' read enough: no traceback, as a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
