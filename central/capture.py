"""``ingest verify CAPTURE``: a third party checks a capture of the gateways' records.

A capture is what ``mosquitto_sub -v -F '%t\\t%x' -t 'smartcorr/v1/gw/+/records'`` writes:
one message a line, its topic, a TAB, and its payload with each byte as two lower-case
hexadecimal digits (``%x``; ``%X``, upper case, is read too). Messages of other topics
(a gateway's retained status, say) are counted in ``other_topics`` and not verified.

The keys are the gateways' registrations: their ``signing.pub`` (``--key GW=FILE``) or the
platform's registry (``--db URL``). Every record message goes through the platform's own
in-memory :class:`~central.verifier.Verifier` with its topic, and the report counts what
it found; with ``--json`` the last line of the output is one JSON object. The exit status
is 0 when every count but ``records`` and ``verified`` (and the informative
``messages`` and ``other_topics``) is zero and there is at least one record, 1 otherwise
(a capture with no records is a wrong ``mosquitto_sub -t``, not a pass; a line that is not
TOPIC<TAB>HEX is counted in ``bad_lines``, its number on stderr, and the rest is still
verified), 2 when the capture or a key cannot be read at all. Each count is of records
(the verifier counts records, not head statements, of an unknown gateway). The
verifier's own log (one line per refused record) is quiet unless ``-v``: a line per reason
says what was found instead.
"""

from __future__ import annotations

import argparse
import binascii
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from central.record import (
    Registration,
    load_registrations,
)
from central.verifier import MAX_INFLATED_BYTES, Verifier
from core.deflate import InflateError, inflate_message, is_deflated
from core.head import is_head, parse_head
from core.topics import TOPIC_ROOT

EXIT_OK, EXIT_PROBLEM, EXIT_BAD_INPUT = 0, 1, 2
#: What the report counts; all but ``records`` and ``verified`` must be zero for exit 0.
COUNTS = ("records", "verified", "bad_signature", "chain_breaks", "unexplained_gaps",
          "duplicates", "conflicts", "reordered", "non_canonical", "wrong_gateway",
          "wrong_key", "unknown_gateway", "malformed", "bad_lines")
#: Counts that say how much was read, not what is wrong.
INFORMATIVE = ("records", "verified", "messages", "other_topics", "heads")
#: What each problem count means, for the line the report prints per reason.
EXPLAIN = {
    "bad_signature": "records whose signature does not verify (altered bytes or signature)",
    "chain_breaks": "records whose prev is not the digest of the record before",
    "unexplained_gaps": "seq ranges missing and not explained by a gap record",
    "duplicates": "the same record again",
    "conflicts": "a second, different record for a seq already seen",
    "reordered": "records of one class out of their seq order",
    "non_canonical": "records not in canonical JSON",
    "wrong_gateway": "records of another gateway than their topic names",
    "wrong_key": "records signed by a key not certified for that gateway, boot, seqs or time",
    "unknown_gateway": "records of gateways that have no key here",
    "malformed": "records that are not records",
    "bad_lines": "capture lines that are not TOPIC<TAB>PAYLOAD-IN-HEX",
}
_RECORDS_SUFFIX = "/records"


class CaptureError(Exception):
    """The capture or a key file cannot be read; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class Message:
    line: int
    topic: str
    payload: bytes


def parse_line(raw: bytes, where: str) -> Message | None:
    """One line of a ``-F '%t\\t%x'`` capture (None for an empty line)."""
    text = raw.rstrip(b"\r\n")
    if not text:
        return None
    topic_raw, tab, hex_payload = text.rpartition(b"\t")
    if not tab:
        raise CaptureError(f"{where}: expected TOPIC<TAB>PAYLOAD-IN-HEX (mosquitto_sub -v "
                           "-F '%t\\t%x'), found no TAB")
    try:
        topic = topic_raw.decode("utf-8")
        payload = binascii.unhexlify(hex_payload)
    except (UnicodeDecodeError, binascii.Error, ValueError) as exc:
        raise CaptureError(f"{where}: not TOPIC<TAB>PAYLOAD-IN-HEX ({exc})") from None
    if not topic:
        raise CaptureError(f"{where}: empty topic")
    return Message(0, topic, payload)


@dataclass
class BadLines:
    """The capture lines that could not be read: how many, and the first one's error."""

    count: int = 0
    first: str | None = None

    def add(self, error: CaptureError) -> None:
        self.count += 1
        if self.first is None:
            self.first = str(error)


def read_capture(path: Path, bad: BadLines | None = None) -> Iterator[Message]:
    """The messages of the capture file *path*, one at a time. A line that cannot be read
    raises :class:`CaptureError`, or with *bad*, is counted there and skipped."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    msg = parse_line(raw, f"{path}:{number}")
                except CaptureError as exc:
                    if bad is None:
                        raise
                    bad.add(exc)
                    continue
                if msg is not None:
                    yield Message(number, msg.topic, msg.payload)
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read the capture ({exc.strerror or exc})") from None


def is_records_topic(topic: str) -> bool:
    """``smartcorr/v1/gw/<gw>/records``, one level for the gateway."""
    if not topic.startswith(TOPIC_ROOT + "/") or not topic.endswith(_RECORDS_SUFFIX):
        return False
    gateway = topic[len(TOPIC_ROOT) + 1:-len(_RECORDS_SUFFIX)]
    return bool(gateway) and "/" not in gateway


@dataclass
class Unknown:
    """What the capture holds of gateways that have no key here."""

    records: Counter[str] = field(default_factory=Counter)  # gateway id -> records


def _unknown(lines: list[bytes], registrations: Mapping[str, Registration],
             unknown: Unknown) -> None:
    for line in lines:
        try:
            gw = parse_head(line).gateway_id if is_head(line) else json.loads(line).get("gw")
        except (ValueError, AttributeError):
            continue  # malformed: the verifier counts it
        if isinstance(gw, str) and gw not in registrations and not is_head(line):
            unknown.records[gw] += 1


def verify_messages(messages: Iterable[Message],
                    registrations: Mapping[str, Registration],
                    unknown: Unknown | None = None) -> dict[str, int]:
    """The report's counts for *messages* (see :data:`COUNTS`); *unknown* collects the
    records of gateways without a key."""
    verifier = Verifier(registrations)
    unknown = unknown if unknown is not None else Unknown()
    messages_seen = records = other = heads = 0
    for msg in messages:
        messages_seen += 1
        if not is_records_topic(msg.topic):
            other += 1
            continue
        payload = msg.payload
        if is_deflated(payload):  # compressed by the gateway (core/deflate.py)
            try:
                payload = inflate_message(payload, MAX_INFLATED_BYTES)
            except InflateError:
                payload = b""  # the verifier counts it (inflate_refused)
        lines = [line for line in payload.split(b"\n") if line]
        heads += sum(1 for line in lines if is_head(line))
        records += sum(1 for line in lines if not is_head(line))
        _unknown(lines, registrations, unknown)
        verifier.ingest(msg.payload, topic=msg.topic)
    stats = verifier.summary()
    gaps = sum(len(verifier.gaps(gw)) for gw in verifier.registrations)
    return {
        "records": records,
        "verified": stats["verified"],
        "bad_signature": stats["bad_signature"],
        "chain_breaks": stats["chain_breaks"],
        "unexplained_gaps": gaps,
        "duplicates": stats["duplicates"],
        "conflicts": stats["conflicts"],
        "reordered": stats["reordered"],
        "non_canonical": stats["non_canonical"],
        "wrong_gateway": stats["wrong_gateway"],
        # signed by a key not certified for that gateway, boot, seqs or time; summary()
        # counts the records still waiting for a certificate in unknown_key
        "wrong_key": stats["out_of_validity"] + stats["forged_certificate"]
                     + stats["unknown_key"],
        "unknown_gateway": stats["unknown_gateway"],
        "malformed": stats["malformed"],
        "messages": messages_seen,
        "other_topics": other,
        # head statements (the last line of each message) the verifier could check
        "heads": stats["heads"],
    }


def problems(report: Mapping[str, int]) -> dict[str, int]:
    """The non-zero counts that mean something is wrong."""
    return {k: v for k, v in report.items() if k not in INFORMATIVE and v}


# -- the command line ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", type=Path, metavar="CAPTURE",
                        help="what mosquitto_sub -v -F '%%t\\t%%x' wrote: a topic, a TAB "
                             "and the payload in hex, one message a line")
    parser.add_argument("--key", action="append", default=[], metavar="GW=FILE",
                        help="the registration (signing.pub) of gateway GW; repeat for more")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="take the registrations of the platform's registry "
                             "(sqlite:///PATH or postgresql://...)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object on the last line")
    parser.add_argument("-v", "--verbose", action="store_true", dest="verify_verbose",
                        help="log each refused record (the verifier's warnings)")


def _key_registrations(specs: list[str]) -> dict[str, Registration]:
    out: dict[str, Registration] = {}
    for spec in specs:
        gw, sep, file = spec.partition("=")
        if not sep or not gw or not file:
            raise CaptureError(f"--key {spec!r}: expected GW=FILE (a gateway's signing.pub)")
        try:
            (reg,) = load_registrations([Path(file)]).values()
        except ValueError as exc:
            raise CaptureError(f"--key {spec}: {exc}") from None
        if reg.gateway_id != gw:
            raise CaptureError(f"--key {spec}: {file} is the registration of "
                               f"{reg.gateway_id!r}, not of {gw!r}")
        out[gw] = reg
    return out


def _db_registrations(url: str) -> dict[str, Registration]:
    """Every gateway the platform's registry enrolled (``central/db.py``)."""
    from central.db import DatabaseError, StorageError, open_db

    try:
        with open_db(url, migrate=False) as db, db.transaction() as tx:
            rows = tx.all("SELECT gw, registration FROM gateways ORDER BY gw")
    except (DatabaseError, StorageError) as exc:
        raise CaptureError(f"--db: {exc}") from None
    out: dict[str, Registration] = {}
    for gw, text in rows:
        try:
            reg = Registration.from_json(json.loads(text))
        except ValueError as exc:
            raise CaptureError(f"--db: the registration of {gw}: {exc}") from None
        out[reg.gateway_id] = reg
    return out


def _registrations(args: argparse.Namespace) -> dict[str, Registration]:
    registrations = _key_registrations(args.key)
    if args.db:
        registrations = {**_db_registrations(args.db), **registrations}
    if not registrations:
        raise CaptureError("no keys: give --key GW=FILE (a gateway's signing.pub) for each "
                           "gateway of the capture, or --db URL")
    return registrations


def _reasons(report: Mapping[str, int], unknown: Unknown, bad: BadLines,
             registrations: Mapping[str, Registration]) -> list[str]:
    """One line per problem found: what it is, and what to look at."""
    out = []
    for key, n in problems(report).items():
        line = f"{key} {n}: {EXPLAIN.get(key, key)}"
        if key == "unknown_gateway" and unknown.records:
            ids = ", ".join(f"{gw} ({k})" for gw, k in unknown.records.most_common(5))
            more = len(unknown.records) - 5
            line += (f": {ids}{f' and {more} more' if more > 0 else ''}; keys given for "
                     f"{', '.join(sorted(registrations))}: add --key GW=FILE (its "
                     "signing.pub) or --db URL")
        if key == "bad_lines" and bad.first:
            line += f"; the first: {bad.first}"
        out.append(line)
    return out


def run(args: argparse.Namespace) -> int:
    prog = getattr(args, "prog", None) or "ingest"
    verbose = bool(getattr(args, "verbose", False) or getattr(args, "verify_verbose", False))
    verifier_log = logging.getLogger("central.verifier")
    level = verifier_log.level
    if not verbose:
        verifier_log.setLevel(logging.ERROR)
    bad = BadLines()
    unknown = Unknown()
    try:
        registrations = _registrations(args)
        report = verify_messages(read_capture(args.capture, bad), registrations, unknown)
    except CaptureError as exc:
        print(f"{prog} verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        verifier_log.setLevel(level)
    report["bad_lines"] = bad.count
    if bad.first is not None:
        print(f"{prog} verify: {bad.count} line(s) not TOPIC<TAB>PAYLOAD-IN-HEX, skipped; "
              f"the first: {bad.first}", file=sys.stderr)
    wrong = problems(report)
    if not report["records"]:
        verdict = (f"PROBLEM: no records in the capture (no message on "
                   f"{TOPIC_ROOT}/<gw>/records: was it taken with mosquitto_sub -t "
                   f"'{TOPIC_ROOT}/+/records'?)")
    elif wrong:
        verdict = "PROBLEM: " + ", ".join(f"{k} {v}" for k, v in wrong.items())
    else:
        verdict = "OK"
    print(f"{args.capture}: {report['records']} records in {report['messages']} messages, "
          f"{report['verified']} verified -> {verdict}")
    for line in _reasons(report, unknown, bad, registrations):
        print(f"  {line}")
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return EXIT_OK if report["records"] and not wrong else EXIT_PROBLEM
