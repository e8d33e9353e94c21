"""The platform's enrolment service (``ingest enrol-service``, docs/enrolment.md): gateways
enrolled online, by claim.

It subscribes to every request topic (``smartcorr/v1/enrol/+/request``, a shared
subscription with ``--group`` so that several services split the work) with its own
certificate (CN :data:`core.topics.ENROL_CN`, whose ACL lines let it read requests and
write answers). A request comes from a client whose MQTT client id is the topic's id:
on the bootstrap listener a request id (``req-<32 hex>``), which the request itself must
carry. Each request is answered by :func:`central.ca.sign_request` with a claim token
required, on ``.../<id>/answer`` at QoS 1 (never retained: an answer is for the client
waiting for it): the certificate, the CA and the command material, or a refusal with its
reason (``claim_used``, ``claim_expired``, ``claim_unknown``, ``bad_signature``, …).

paho's network thread only queues what arrives, in a queue of at most
:data:`MAX_PENDING` requests (beyond, a request is refused ``busy`` at once: the gateway
tries again); one worker thread owns the database and the CA. A request larger than
:data:`core.enrolment.MAX_REQUEST_BYTES` is refused unread.

Renewal comes on the same topics: from a gateway on the gateways' listener its client id
is its CN, so its topic id is its gateway id, and its request (type ``renew``, signed by
its registered identity key and its current TLS key) is answered by
:func:`central.ca.renew_request` on ``.../<gateway id>/answer``. A request's type and its
topic must agree: an enrolment on its request id's topic, a renewal on its gateway id's
(the topic id alone authenticates nothing: a bootstrap client picks its own client id, and
such a request fails the signatures). ``--renew-only-after`` spaces one gateway's renewals
(``too_soon``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from central.ca import (
    DEFAULT_CERT_DAYS,
    DEFAULT_RENEW_ONLY_AFTER_MS,
    MAX_RENEW_ONLY_AFTER_MS,
    Authority,
    CaError,
    command_files,
    load_ca,
    parse_ttl,
    renew_request,
    sign_request,
)
from central.db import Database, DatabaseError, StorageError, open_db
from core.enrolment import (
    GATEWAY_ID_RE,
    MAX_REQUEST_BYTES,
    RENEW,
    REQUEST_ID_RE,
    EnrolmentError,
    make_refusal,
    parse_request,
)
from core.mqtt import BrokerConfig, connect, make_client
from core.stopping import StopFlag, stop_on_signals
from core.topics import ENROL_CN, ENROL_ROOT, enrol_answer_topic

log = logging.getLogger(__name__)

#: Requests waiting for the worker at most; beyond, refused ``busy`` at once.
MAX_PENDING = 64

Event = dict[str, Any]


def request_filter(group: str | None) -> str:
    topic = f"{ENROL_ROOT}/+/request"
    return f"$share/{group}/{topic}" if group else topic


def _topic_id(topic: str) -> str | None:
    """The client id a request topic names, when it is one this service answers: a request
    id (an enrolment, bootstrap listener) or a gateway id (a renewal, gateways' listener)."""
    parts = topic.split("/")
    root = ENROL_ROOT.split("/")
    if len(parts) != len(root) + 2 or parts[:len(root)] != root or parts[-1] != "request":
        return None
    rid = parts[len(root)]
    return rid if REQUEST_ID_RE.fullmatch(rid) or GATEWAY_ID_RE.fullmatch(rid) else None


def _same_id(request_id: str, gateway_id: str, kind: str, topic_id: str) -> None:
    """An enrolment comes on its request id's topic, a renewal on its gateway id's."""
    if kind == RENEW:
        if gateway_id != topic_id:
            raise EnrolmentError("malformed", f"the renewal of {gateway_id} came on the topic "
                                 f"of {topic_id}: a gateway renews on its own topic, over the "
                                 "gateways' listener")
    elif request_id != topic_id:
        raise EnrolmentError("malformed", f"the request {request_id} came on the topic of "
                             f"{topic_id}: each request on its own topic")


@dataclass(frozen=True, slots=True)
class _Arrival:
    request_id: str
    payload: bytes


class EnrolmentService:
    """Answers enrolment requests: :meth:`start`, then :meth:`stop`."""

    def __init__(self, db_url: str, broker: BrokerConfig, ca_dir: Path, *,
                 client_id: str = ENROL_CN, group: str | None = None,
                 command_keys: Path | None = None, days: int = DEFAULT_CERT_DAYS,
                 on_event: Callable[[Event], None] | None = None,
                 renew_only_after_ms: int = DEFAULT_RENEW_ONLY_AFTER_MS,
                 validity: dt.timedelta | None = None) -> None:
        self.db_url = db_url
        self.broker = broker
        self.ca: Authority = load_ca(ca_dir)  # a missing or unsafe CA is said at start
        self.command_keys = command_keys
        command_files(command_keys)  # refused at start when it holds a private key
        self.days = days
        #: one gateway's renewals at least this far apart (``too_soon``), ms
        if not 0 <= renew_only_after_ms <= MAX_RENEW_ONLY_AFTER_MS:
            raise CaError(f"--renew-only-after: give 0 to {MAX_RENEW_ONLY_AFTER_MS // 86_400_000}"
                          " days")
        self.renew_only_after_ms = renew_only_after_ms
        #: the certificates' validity when not *days* (short-lived ones: tests)
        self.validity = validity
        self.topic = request_filter(group)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self._on_event = on_event
        self._inbox: queue.Queue[_Arrival | None] = queue.Queue(maxsize=MAX_PENDING)
        self._db: Database | None = None
        self.client = make_client(client_id, broker)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="enrol-service", daemon=True)

    def start(self) -> EnrolmentService:
        self._db = open_db(self.db_url)
        self._worker.start()
        connect(self.client, self.broker)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        with contextlib.suppress(queue.Full):
            self._inbox.put(None, timeout=5)
        self._worker.join(10)
        if self._db is not None:
            self._db.close()

    # -- paho's thread ------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any) -> None:
        if reason.is_failure:
            log.error("enrolment service: the broker refused the connection: %s", reason)
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: Any,
                      _p: Any) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
            self._emit({"event": "subscribed", "topic": self.topic})
        else:
            log.error("enrolment service: subscription to %s refused (%s): the broker's ACL "
                      "must give user %s the enrolment topics (core.topics.broker_acl)",
                      self.topic, reasons[0], ENROL_CN)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        rid = _topic_id(message.topic)
        if rid is None:
            self.stats["ignored"] += 1
            return
        if len(message.payload) > MAX_REQUEST_BYTES:
            self._answer(rid, make_refusal(rid, "malformed", f"a request of "
                         f"{len(message.payload)} bytes (at most {MAX_REQUEST_BYTES})"),
                         {"reason": "malformed"})
            return
        try:
            self._inbox.put_nowait(_Arrival(rid, bytes(message.payload)))
        except queue.Full:
            self._answer(rid, make_refusal(rid, "busy", "the enrolment service is busy: try "
                                           "again in a minute"), {"reason": "busy"})

    # -- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                answer, event = self._handle(item)
            except Exception as exc:  # the worker must answer the next one: logged, refused
                log.exception("enrolment service: request %s failed", item.request_id)
                self.error = exc
                answer, event = make_refusal(item.request_id, "busy", "the enrolment service "
                                             "failed on this request: try again later"), \
                    {"reason": "busy"}
            self._answer(item.request_id, answer, event)

    def _handle(self, item: _Arrival) -> tuple[bytes, Event]:
        rid = item.request_id
        if self._db is None:
            raise RuntimeError("EnrolmentService: start() first")
        request = None
        try:
            request = parse_request(item.payload)
            _same_id(request.request_id, request.gateway_id, request.kind, rid)
            if request.kind == RENEW:
                issued = renew_request(self._db, self.ca, item.payload,
                                       command_keys=self.command_keys, days=self.days,
                                       renew_only_after_ms=self.renew_only_after_ms,
                                       validity=self.validity)
            else:
                issued = sign_request(self._db, self.ca, item.payload, require_claim=True,
                                      command_keys=self.command_keys, days=self.days,
                                      validity=self.validity)
        except EnrolmentError as exc:
            log.warning("enrolment request %s refused (%s): %s", rid, exc.reason, exc)
            # a renewal's refusal names its request (its topic is the gateway's); one that
            # could not be read, the topic's id
            named = request.request_id if request is not None and request.kind == RENEW \
                else rid
            return make_refusal(named, exc.reason, str(exc)), {"reason": exc.reason,
                                                               "detail": str(exc)}
        except StorageError as exc:
            log.error("enrolment request %s: the database failed (%s)", rid, exc)  # noqa: TRY400 (the message says it all)
            return make_refusal(rid, "busy", "the platform's database is unavailable: try "
                                "again in a minute"), {"reason": "busy"}
        log.info("%s request %s: gateway %s, certificate %s%s", issued.request.kind,
                 issued.request.request_id, issued.request.gateway_id, issued.serial,
                 "" if issued.new else " (answered again)")
        return issued.answer, {"issued": {**issued.to_json(), "type": issued.request.kind}}

    def _answer(self, rid: str, answer: bytes, event: Event) -> None:
        """Publish *answer* (paho's thread or the worker's)."""
        self.client.publish(enrol_answer_topic(rid), answer, qos=1)
        with self._lock:
            self.stats["issued" if "issued" in event else f"refused.{event['reason']}"] += 1
        if "issued" in event:
            self._emit({"event": "issued", "request_id": rid, **event["issued"]})
        else:
            self._emit({"event": "refused", "request_id": rid, **event})

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # the printer's failure is not the service's
                log.exception("enrolment service: the event callback failed")


# --- the command line (central/cli.py adds it) -----------------------------------------------

def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    svc = sub.add_parser("enrol-service", help="answer gateways' enrolment requests (online "
                                               "path, claim tokens) and renewals over MQTT")
    db_arg(svc)
    svc.add_argument("--ca-dir", required=True, type=Path, metavar="DIR",
                     help="the CA's directory ('ingest ca init')")
    svc.add_argument("--broker", required=True, metavar="HOST:PORT",
                     help="the broker's listener for platform clients (mTLS)")
    svc.add_argument("--ca", metavar="FILE", help="the broker's CA certificate")
    svc.add_argument("--cert", metavar="FILE", help="this service's client certificate (CN "
                                                    f"{ENROL_CN}: 'ingest ca issue')")
    svc.add_argument("--key", metavar="FILE", help="its private key")
    svc.add_argument("--no-tls", action="store_true",
                     help="plain MQTT (a broker on loopback only)")
    svc.add_argument("--group", metavar="G",
                     help="share the requests with the other services of group G")
    svc.add_argument("--command-keys", type=Path, metavar="DIR",
                     help="the command material handed to gateways ('ingest command-key "
                          "export' directory)")
    svc.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS,
                     help=f"the certificates' validity, days (default {DEFAULT_CERT_DAYS})")
    svc.add_argument("--renew-only-after", default="1h", metavar="DURATION",
                     help="renewals of one gateway at least this far apart, e.g. 1h (default),"
                          " 12h, 1d, 0 (no bound); at most 30d: a gateway in a loop cannot "
                          "mint certificates")
    svc.add_argument("--json", action="store_true",
                     help="print events (subscribed, issued, refused) as JSON lines")


def _renew_only_after(text: str) -> int:
    """``--renew-only-after`` in ms: a duration (``ca claim --ttl``'s form), at most 30 days."""
    try:
        seconds = parse_ttl(text)
    except CaError:
        raise CaError(f"--renew-only-after {text!r}: give a duration such as 1h, 12h, 1d or "
                      "0 (no bound)") from None
    if seconds * 1000 > MAX_RENEW_ONLY_AFTER_MS:
        raise CaError(f"--renew-only-after {text}: at most "
                      f"{MAX_RENEW_ONLY_AFTER_MS // 86_400_000}d")
    return seconds * 1000


def _run(args: argparse.Namespace) -> int:
    from central.ca import private_umask
    from central.cli import _broker as broker_config

    private_umask()
    stop = StopFlag()

    def emit(event: Event) -> None:
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        elif event["event"] == "issued":
            log.info("issued certificate %s to %s (request %s)", event["serial"], event["gw"],
                     event["request_id"])
        elif event["event"] == "refused":
            log.info("refused request %s: %s", event["request_id"], event["reason"])
        else:
            log.info("enrolment service subscribed to %s", event["topic"])

    service = EnrolmentService(args.db, broker_config(args), args.ca_dir, group=args.group,
                               command_keys=args.command_keys, days=args.days, on_event=emit,
                               renew_only_after_ms=_renew_only_after(args.renew_only_after))
    stop_on_signals(stop)
    try:
        service.start()
    except DatabaseError as exc:
        raise CaError(str(exc)) from None
    try:
        stop.wait()
    finally:
        service.stop()
        if args.json:
            print(json.dumps({"event": "stopped", "stats": dict(service.stats)},
                             sort_keys=True), flush=True)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"enrol-service": _run}
