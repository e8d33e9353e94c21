"""``ingest command --gw GW request-diag --out FILE`` (docs/commands.md, "request-diag"):
ask a gateway for its redacted diagnostic bundle, receive it in chunks, check it against
the gateway's signed ``command.applied`` record and write it (mode 0600).

One MQTT connection as the command publisher (the broker binds the client id to the
certificate's CN: a second connection would take this one's place) subscribes to the
answer's topic, ``smartcorr/v1/gw/<gw>/diag/<request>``, **before** it publishes the
command, so no chunk is missed. The record comes through the platform's ingest (its
signature and chain verified there); its ``details.bundle.sha256`` is what the chunks
must reassemble into. Nothing is written unless they do.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from central.commands import (
    EXIT_OK,
    EXIT_PROBLEM,
    PUBLISH_TIMEOUT_S,
    CommandError,
    Issued,
    _print,
    last_answer_seq,
    wait_answer,
)
from central.db import Database
from core.diag_transfer import MAX_CHUNKS, REQUEST_RE, SECTIONS, ChunkError, Reassembly
from core.durable import atomic_write
from core.mqtt import BrokerConfig, make_client
from core.topics import COMMAND_CN, commands_topic, diag_topic

__all__ = ["DiagListener", "add_parser", "body_of", "run_request"]


def add_parser(kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rd = kinds.add_parser("request-diag", help="fetch the gateway's diagnostic bundle "
                          "(redacted: never personal data), verified against its signed "
                          "record, into --out")
    rd.add_argument("--out", required=True, type=Path, metavar="FILE",
                    help="where to write the bundle (tar.gz, mode 600); not overwritten "
                         "unless the bundle verifies")
    rd.add_argument("--section", action="append", choices=SECTIONS,
                    help="a part of the bundle (repeat it; default: all of "
                         f"{', '.join(SECTIONS)})")
    rd.add_argument("--request", metavar="ID",
                    help="the request's id, 8-64 of A-Z a-z 0-9 _ - (default: a random one)")


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    """The body, once --out is a file this may write (a usage error otherwise)."""
    out: Path = args.out
    if out.is_dir():
        raise CommandError(f"--out {out}: is a directory: give a file name (diag.tar.gz)")
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: the directory {out.parent} does not exist")
    request = args.request or secrets.token_hex(8)
    if not REQUEST_RE.fullmatch(request):
        raise CommandError("--request: 8-64 of A-Z, a-z, 0-9, '_', '-'")
    body: dict[str, Any] = {"request": request}
    if args.section:
        body["sections"] = sorted(set(args.section), key=SECTIONS.index)
    return body


class DiagListener:
    """One connection as the command publisher: subscribed to one request's topic, it
    publishes the command and keeps the chunks that arrive (at most twice the most a
    bundle has: the rest are counted and dropped)."""

    def __init__(self, broker: BrokerConfig, gw: str, request: str, *,
                 client_id: str = COMMAND_CN) -> None:
        self.gw, self.request = gw, request
        self.topic = diag_topic(gw, request)
        self.payloads: list[bytes] = []
        self.dropped = 0
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        self._events: dict[str, Any] = {}
        self._connected, self._subscribed, self._acked = (threading.Event(),
                                                          threading.Event(), threading.Event())
        self._broker = broker
        client = self._client = make_client(client_id, broker)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._events["connack"] = reason
        self._connected.set()
        if not reason.is_failure:
            c.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        self._events["suback"] = list(reasons)
        self._subscribed.set()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        self._events["puback"] = reason
        self._acked.set()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            if len(self.payloads) < 2 * MAX_CHUNKS:
                self.payloads.append(bytes(message.payload))
            else:
                self.dropped += 1
        self.arrived.set()

    def open(self, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        b = self._broker
        try:
            self._client.connect_async(b.host, b.port, b.keepalive_s, clean_start=True)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot reach the broker {b.host}:{b.port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise CommandError(f"no connection to the broker {b.host}:{b.port} within "
                               f"{timeout_s:g} s: check --broker and the TLS files")
        if self._events["connack"].is_failure:
            raise CommandError(f"the broker refused the connection: {self._events['connack']}"
                               f" (the certificate's CN must be {COMMAND_CN})")
        if not self._subscribed.wait(timeout_s) or any(
                r.is_failure for r in self._events["suback"]):
            raise CommandError(f"the broker refused the subscription to {self.topic}: its "
                               f"ACL must let {COMMAND_CN} read smartcorr/v1/gw/+/diag/+ "
                               "(core.topics.broker_acl, docs/broker.md)")

    def send(self, issued: Issued, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        info = self._client.publish(commands_topic(issued.gw), issued.data, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS or not self._acked.wait(timeout_s) \
                or self._events["puback"].is_failure:
            raise CommandError(f"the broker did not take the command "
                               f"({self._events.get('puback')}): try again")

    def reassembled(self) -> Reassembly:
        """The chunks arrived so far, put together."""
        got = Reassembly(self.gw, self.request)
        with self._lock:
            payloads = list(self.payloads)
        for payload in payloads:
            got.add(payload)
        return got

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def wait_chunks(listener: DiagListener, deadline: float) -> Reassembly:
    """The reassembly once complete, or as it is at *deadline* (time.monotonic())."""
    while True:
        got = listener.reassembled()
        if got.complete or time.monotonic() >= deadline:
            return got
        listener.arrived.clear()
        listener.arrived.wait(min(0.5, max(0.0, deadline - time.monotonic())))


def run_request(args: argparse.Namespace, broker: BrokerConfig, db: Database,
                issued: Issued) -> int:
    """Send *issued* (a ``request-diag``), wait for its answer and its chunks, verify,
    write ``--out``; the exit status."""
    request = str(json.loads(issued.data)["body"]["request"])
    listener = DiagListener(broker, issued.gw, request)
    out: dict[str, Any] = {"gw": issued.gw, "cseq": issued.cseq, "kind": issued.kind,
                           "command_sha256": issued.sha256, "request": request}
    try:
        listener.open()
        after = last_answer_seq(db, issued.gw)
        started = time.monotonic()
        listener.send(issued)
        out["published"] = True
        found = wait_answer(db, issued, args.timeout, after)
        if found is None:
            out.update(outcome=None)
            _print(args, out, f"request-diag {issued.cseq} to {issued.gw}: no answer within "
                              f"{args.timeout:g} s (the gateway may be offline)")
            return EXIT_PROBLEM
        out.update(outcome=found.outcome, reason=found.reason, record_seq=found.seq,
                   answer=found.body)
        if found.outcome != "applied":
            _print(args, out, f"request-diag {issued.cseq} REFUSED by {issued.gw}: "
                              f"{found.reason}: {found.body.get('detail')}")
            return EXIT_PROBLEM
        bundle_info = (found.body.get("details") or {}).get("bundle") or {}
        expected = str(bundle_info.get("sha256"))
        got = wait_chunks(listener, started + args.timeout)
        rtt_ms = round((time.monotonic() - started) * 1000)
    finally:
        listener.close()
    try:
        data = got.bundle(expected)
    except ChunkError as exc:
        out.update(verified=False, error=str(exc), refused_chunks=got.refused[:4])
        _print(args, out, f"request-diag {issued.cseq}: the bundle from {issued.gw} is NOT "
                          f"written: {exc}")
        return EXIT_PROBLEM
    atomic_write(args.out, data, 0o600)
    out.update(verified=True, out=str(args.out), size=len(data), sha256=expected,
               chunks=len(got.parts), rtt_ms=rtt_ms)
    _print(args, out, f"diagnostic bundle of {issued.gw} ({len(data)} bytes, "
                      f"{len(got.parts)} chunks, SHA-256 {expected[:16]}… as its signed "
                      f"record {found.seq} says) written to {args.out} in {rtt_ms} ms")
    return EXIT_OK
