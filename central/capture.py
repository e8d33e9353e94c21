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
``messages`` and ``other_topics``) is zero, 1 otherwise, 2 when the capture or a key
cannot be read (the message names the file and line).
"""

from __future__ import annotations

import argparse
import binascii
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from central.record import (
    Registration,
    load_registrations,
)
from central.verifier import Verifier
from core.head import is_head
from core.topics import TOPIC_ROOT

EXIT_OK, EXIT_PROBLEM, EXIT_BAD_INPUT = 0, 1, 2
#: What the report counts; all but ``records`` and ``verified`` must be zero for exit 0.
COUNTS = ("records", "verified", "bad_signature", "chain_breaks", "unexplained_gaps",
          "duplicates", "conflicts", "reordered", "non_canonical", "wrong_gateway",
          "wrong_key", "unknown_gateway", "malformed")
#: Counts that say how much was read, not what is wrong.
INFORMATIVE = ("records", "verified", "messages", "other_topics", "heads")
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


def read_capture(path: Path) -> Iterator[Message]:
    """The messages of the capture file *path*, one at a time."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                msg = parse_line(raw, f"{path}:{number}")
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


def verify_messages(messages: Iterable[Message],
                    registrations: Mapping[str, Registration]) -> dict[str, int]:
    """The report's counts for *messages* (see :data:`COUNTS`)."""
    verifier = Verifier(registrations)
    messages_seen = records = other = heads = 0
    for msg in messages:
        messages_seen += 1
        if not is_records_topic(msg.topic):
            other += 1
            continue
        lines = [line for line in msg.payload.split(b"\n") if line]
        heads += sum(1 for line in lines if is_head(line))
        records += sum(1 for line in lines if not is_head(line))
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


def run(args: argparse.Namespace) -> int:
    try:
        registrations = _registrations(args)
        report = verify_messages(read_capture(args.capture), registrations)
    except CaptureError as exc:
        print(f"ingest verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    wrong = problems(report)
    verdict = "OK" if not wrong else "PROBLEM: " + ", ".join(f"{k} {v}"
                                                               for k, v in wrong.items())
    print(f"{args.capture}: {report['records']} records in {report['messages']} messages, "
          f"{report['verified']} verified -> {verdict}")
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return EXIT_OK if not wrong else EXIT_PROBLEM
