"""Alarms to the right justice office (central/routing.py, docs/alarms.md): the registry,
the signed webhook with retries and a bound, the pull API, a delivery worker SIGKILLed
mid-delivery; on SQLite and PostgreSQL, against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from central.db import Database, open_db
from central.ingest import Ingest
from central.routing import (
    HEADER_ATTEMPT,
    HEADER_IDEMPOTENCY,
    DeliveryConfig,
    Outcome,
    Worker,
    add_office,
    assign,
    check_signature,
    delivery_report,
    pull,
    sign,
)
from core.record import Timestamp
from core.topics import records_topic
from lab.chains import Chain

REPO = Path(__file__).resolve().parents[1]
TS = Timestamp(1_760_000_000_000, "ntp", 1_000)
SECRET_A = b"secret-of-office-a-7f3c91d2e8b4a6"
SECRET_B = b"secret-of-office-b-0c5e72a9f1d3b8"
#: Scaled down: retries every few tens of ms, a bound of a fraction of a second.
FAST = DeliveryConfig(give_up_s=30, backoff_s=0.02, backoff_max_s=0.1, timeout_s=2,
                      lease_s=3, poll_s=0.02)


# --- an office's receiver: a real HTTP server ------------------------------------------


@dataclass
class Receiver:
    """An office's webhook as docs/alarms.md says to write one: it checks the signature
    and the timestamp, and processes each idempotency key once."""

    secret: bytes
    fail_first: int = 0  # per key: answer 503 this many times first
    hang_first: bool = False  # the very first request: processed, then no answer
    requests: list[tuple[str, int, bool]] = field(default_factory=list)  # key, attempt, ok
    processed: dict[str, dict[str, object]] = field(default_factory=dict)
    duplicates: int = 0
    hanging: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/alarms"

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers["Content-Length"]))
        headers = dict(request.headers.items())
        ok = check_signature(self.secret, headers, body, time.time_ns() // 1_000_000)
        key = headers.get(HEADER_IDEMPOTENCY, "")
        with self.lock:
            self.requests.append((key, int(headers.get(HEADER_ATTEMPT, "0")), ok))
            seen = sum(1 for k, _, _ in self.requests if k == key)
            hang = self.hang_first and len(self.requests) == 1
        if not ok:
            request.send_response(401)
            request.end_headers()
            return
        if seen <= self.fail_first:
            request.send_response(503)
            request.end_headers()
            return
        with self.lock:  # processed: de-duplicated by the idempotency key
            if key in self.processed:
                self.duplicates += 1
            else:
                self.processed[key] = json.loads(body)
        if hang:  # processed, but the sender dies before it hears the answer
            self.hanging.set()
            self.release.wait(20)
        try:
            request.send_response(200)
            request.end_headers()
        except OSError:
            pass  # the sender is gone


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.release.set()
        assert receiver.server is not None
        receiver.server.shutdown()
        receiver.server.server_close()


def serve(receivers: list[Receiver], secret: bytes, **behaviour: object) -> Receiver:
    receiver = Receiver(secret, **behaviour)  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver.handle(self)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    receiver.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.server.daemon_threads = True
    threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
    receivers.append(receiver)
    return receiver


# --- a platform with two gateways, two offices ------------------------------------------


@dataclass
class Platform:
    a: Chain
    b: Chain
    ingest: Ingest

    def alarms(self, chain: Chain, n: int = 1) -> list[str]:
        """A key.session and *n* tamper alarms of *chain*, ingested: their keys."""
        records = [chain.start_session(TS)] if chain.session is None else []
        records += [chain.seal("tag.tamper", {"n": i}, TS) for i in range(n)]
        records.append(chain.seal("tag.presence", {"n": 0}, TS))  # not an alarm
        self.ingest.ingest_message(records_topic(chain.gateway_id),
                                   b"\n".join(r.data for r in records))
        return [f"{chain.gateway_id}:{r.seq}" for r in records
                if json.loads(r.data)["prio"] == "alarm"]


def platform(db: Database, url_a: str | None, url_b: str | None) -> Platform:
    a, b = Chain("gw-aaaa-0001"), Chain("gw-bbbb-0001")
    ingest = Ingest(db)
    for chain in (a, b):
        ingest.enrol(chain.registration)
    add_office(db, "office-a", url_a, SECRET_A)
    add_office(db, "office-b", url_b, SECRET_B)
    assign(db, a.gateway_id, "CASE-A-0001", "office-a")
    assign(db, b.gateway_id, "CASE-B-0001", "office-b")
    return Platform(a, b, ingest)


def states(db: Database) -> dict[str, tuple[str, int]]:
    """Per idempotency key: the delivery's state and attempts."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT a.gw, a.seq, d.state, d.attempts FROM deliveries d JOIN alarms a "
                      "ON a.id = d.alarm_id")
    return {f"{r[0]}:{r[1]}": (str(r[2]), int(r[3])) for r in rows}


# --- the tests ------------------------------------------------------------------------


def test_an_alarm_reaches_its_office_s_webhook_signed_and_not_the_other_s(
        db: Database, receivers: list[Receiver]) -> None:
    rx_a, rx_b = serve(receivers, SECRET_A), serve(receivers, SECRET_B)
    p = platform(db, rx_a.url, rx_b.url)
    keys_a = p.alarms(p.a, 2)
    outcomes: list[Outcome] = []
    worker = Worker(db, "w1", FAST, on_outcome=outcomes.append)
    assert worker.drain(10)
    assert sorted(rx_a.processed) == sorted(keys_a)
    assert rx_b.requests == []  # B's office hears nothing of A
    assert all(ok for _, _, ok in rx_a.requests)  # every signature verified
    body = rx_a.processed[keys_a[-1]]
    assert body["case"] == "CASE-A-0001"
    assert body["office"] == "office-a"
    assert body["kind"] == "tag.tamper"
    assert body["idempotency_key"] == keys_a[-1]
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT data FROM records WHERE gw = ? AND seq = ?",
                     (p.a.gateway_id, body["seq"]))
    assert row is not None
    assert str(body["record"]).encode() == bytes(row[0])  # the record's bytes, as stored
    delivered = [o for o in outcomes if o.state == "delivered"]
    assert len(delivered) == len(keys_a)
    first = delivered[0].to_json()
    assert int(str(first["latency_from_t_ms"])) >= int(str(first["latency_from_store_ms"])) >= 0
    # then B's alarm goes to B only
    keys_b = p.alarms(p.b, 1)
    assert worker.drain(10)
    assert sorted(rx_b.processed) == sorted(keys_b)
    assert sorted(rx_a.processed) == sorted(keys_a)
    report = delivery_report(db)["offices"]
    assert isinstance(report, dict)
    assert report["office-a"]["delivered"] == len(keys_a)  # type: ignore[index]
    assert report["office-b"]["delivered"] == len(keys_b)  # type: ignore[index]


def test_a_webhook_failing_3_times_gets_each_alarm_once_and_the_retries_are_counted(
        db: Database, receivers: list[Receiver]) -> None:
    rx_a = serve(receivers, SECRET_A, fail_first=3)
    p = platform(db, rx_a.url, None)
    keys = p.alarms(p.a, 1)
    assert Worker(db, "w1", FAST).drain(10)
    assert sorted(rx_a.processed) == sorted(keys)
    assert rx_a.duplicates == 0
    assert all(n == 4 for _, n in states(db).values())
    for key in keys:
        assert [n for k, n, _ in rx_a.requests if k == key] == [1, 2, 3, 4]  # attempt header
    tally = delivery_report(db, "office-a")["offices"]["office-a"]  # type: ignore[index]
    assert tally["retries"] == 3 * len(keys)  # type: ignore[index]
    assert tally["delivered"] == len(keys)  # type: ignore[index]


def test_a_webhook_down_past_the_bound_is_failed_and_reported(
        db: Database, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens: the webhook is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/alarms"
    p = platform(db, down, None)
    keys = p.alarms(p.a, 1)
    config = DeliveryConfig(give_up_s=0.4, backoff_s=0.02, backoff_max_s=0.1, timeout_s=1,
                            lease_s=2, poll_s=0.02)
    started = time.monotonic()
    assert Worker(db, "w1", config).drain(10)
    assert time.monotonic() - started >= 0.4
    assert {state for state, _ in states(db).values()} == {"failed"}
    assert all(n > 2 for _, n in states(db).values())
    tally = delivery_report(db)["offices"]["office-a"]  # type: ignore[index]
    failures = tally["failures"]  # type: ignore[index]
    assert sorted(f["idempotency_key"] for f in failures) == sorted(keys)  # type: ignore[index,union-attr]
    assert all("Connection" in f["last_error"] for f in failures)  # type: ignore[index,union-attr,operator]
    from central.cli import main

    assert main(["deliveries", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out
    assert keys[-1] in out
    # never dropped: the office can still pull them
    assert [r.key for r in pull(db, "office-a")] == keys


def _deliver(db_url: str, worker_id: str, err: Path) -> subprocess.Popen[str]:
    with err.open("w") as stderr:  # the child has its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "central", "deliver", "--db", db_url, "--json",
             "--worker-id", worker_id, "--timeout-s", "1.5", "--lease-s", "2",
             "--backoff-s", "0.05", "--poll-s", "0.05"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_exactly_once_at_the_right_office_across_a_worker_sigkilled_mid_delivery(
        db: Database, db_url: str, receivers: list[Receiver], tmp_path: Path) -> None:
    rx_a = serve(receivers, SECRET_A, hang_first=True)
    rx_b = serve(receivers, SECRET_B)
    p = platform(db, rx_a.url, rx_b.url)
    keys_a, keys_b = p.alarms(p.a, 2), p.alarms(p.b, 1)
    first = _deliver(db_url, "w1", tmp_path / "w1.err")
    try:
        assert rx_a.hanging.wait(15), "the worker never POSTed"
        os.kill(first.pid, signal.SIGKILL)  # mid-delivery: A's office processed it, no 2xx
        first.wait(5)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        assert first.stdout is not None
        first.stdout.close()
    assert first.returncode == -signal.SIGKILL
    rx_a.release.set()
    (cut_short,) = [k for k, _, _ in rx_a.requests]
    second = _deliver(db_url, "w2", tmp_path / "w2.err")
    try:
        assert _wait(lambda: {s for s, _ in states(db).values()} == {"delivered"}
                     and len(states(db)) == len(keys_a) + len(keys_b), 20), states(db)
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=10)
    assert second.returncode == 0
    # exactly once at the receiver, each at its own office
    assert sorted(rx_a.processed) == sorted(keys_a)
    assert sorted(rx_b.processed) == sorted(keys_b)
    assert rx_a.duplicates == 1  # the one cut short came again: the key made it once
    assert [k for k, _, _ in rx_a.requests].count(cut_short) == 2
    assert states(db)[cut_short] == ("delivered", 2)  # the killed attempt is counted
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["idempotency_key"] for e in events if e["event"] == "delivered"} \
        == set(keys_a) | set(keys_b)
    for text in (out, (tmp_path / "w1.err").read_text(), (tmp_path / "w2.err").read_text()):
        assert SECRET_A.decode() not in text
        assert SECRET_B.decode() not in text


def test_the_pull_api_returns_exactly_the_office_s_alarms_after_a_cursor(
        db: Database, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from central.cli import main

    p = platform(db, None, None)  # both offices pull
    keys_a = p.alarms(p.a, 2)
    p.alarms(p.b, 2)
    got = pull(db, "office-a")
    assert [r.key for r in got] == keys_a
    cursor = got[0].route
    more_a = p.alarms(p.a, 1)
    assert main(["alarms", "--db", db_url, "--office", "office-a", "--since", str(cursor),
                 "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["idempotency_key"] for line in lines] == keys_a[1:] + more_a
    assert all(line["case"] == "CASE-A-0001" for line in lines)
    assert [line["cursor"] for line in lines] == sorted(line["cursor"] for line in lines)
    assert main(["alarms", "--db", db_url, "--office", "office-a", "--since",
                 str(lines[-1]["cursor"]), "--json"]) == 0
    assert capsys.readouterr().out == ""  # nothing after the last cursor
    # a gateway assigned to no office: kept (reported), then routed when assigned
    c = Chain("gw-cccc-0001")
    p.ingest.enrol(c.registration)
    keys_c = p.alarms(c, 1)
    assert pull(db, "office-b", since=10**9) == []
    unrouted = delivery_report(db)["unrouted"]
    assert [f"{u['gw']}:{u['seq']}" for u in unrouted] == keys_c  # type: ignore[index,union-attr]
    last_b = pull(db, "office-b")[-1].route
    assert assign(db, c.gateway_id, "CASE-C-0001", "office-b") == len(keys_c)
    assert [r.key for r in pull(db, "office-b", last_b)] == keys_c
    assert delivery_report(db)["unrouted"] == []
    # no pending delivery for a pull-only office
    assert {s for s, _ in states(db).values()} == {"pull"}


def test_the_registry_on_the_command_line_never_shows_the_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, receivers: list[Receiver]) -> None:
    from central.cli import main

    caplog.set_level(logging.DEBUG)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    rx = serve(receivers, SECRET_A)
    secret_file = tmp_path / "office-a.secret"
    secret_file.write_bytes(SECRET_A + b"\n")
    secret_file.chmod(0o600)
    with open_db(url) as db:
        a = Chain("gw-aaaa-0001")
        ingest = Ingest(db)
        ingest.enrol(a.registration)
    assert main(["office", "--db", url, "--add", "office-a", "--webhook", rx.url,
                 "--secret-file", str(secret_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new"] is True
    assert main(["assign", "--db", url, "--gw", a.gateway_id, "--case", "CASE-A-0001",
                 "--office", "office-a"]) == 0
    assert main(["offices", "--db", url, "--json"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()[-1:]]
    assert listed == {"office": "office-a", "webhook": rx.url, "gateways": 1,
                      "added_at": listed["added_at"], "updated_at": listed["updated_at"]}
    with open_db(url) as db:
        Platform(a, a, Ingest(db)).alarms(a, 1)
    assert main(["deliver", "--db", url, "--once", "--json", "--timeout-s", "2",
                 "--lease-s", "3"]) == 0
    assert len(rx.processed) == 2  # the key.session and the tamper alarm, signed
    assert all(ok for _, _, ok in rx.requests)
    for command in (["deliveries", "--db", url], ["deliveries", "--db", url, "--json"],
                    ["alarms", "--db", url, "--office", "office-a", "--json"],
                    ["offices", "--db", url]):
        assert main(command) == 0
    # errors say what to do, exit 2, and never echo the secret
    short = tmp_path / "short.secret"
    short.write_bytes(b"too-short")
    assert main(["office", "--db", url, "--add", "office-x", "--webhook", rx.url,
                 "--secret-file", str(short)]) == 2
    assert main(["office", "--db", url, "--add", "office-x", "--webhook",
                 "http://sfs.example.org/hook", "--secret-file", str(secret_file)]) == 2
    assert main(["assign", "--db", url, "--gw", a.gateway_id, "--case", "Zhang San",
                 "--office", "office-a"]) == 2
    assert main(["assign", "--db", url, "--gw", a.gateway_id, "--case", "CASE-1",
                 "--office", "office-nowhere"]) == 2
    assert main(["alarms", "--db", url, "--office", "office-nowhere"]) == 2
    captured = capsys.readouterr()
    assert "add it first" in captured.err
    assert "https only" in captured.err
    everything = captured.out + captured.err + caplog.text
    assert "  FAILED {" not in everything  # every alarm delivered
    assert SECRET_A.decode() not in everything
    assert SECRET_A.hex() not in everything


def test_the_worked_example_of_the_document_is_the_signature() -> None:
    doc = (REPO / "docs" / "alarms.md").read_text()
    body = re.search(r"^body: (\{.*\})$", doc, re.MULTILINE)
    secret = re.search(r"^secret: (\S+)$", doc, re.MULTILINE)
    stamp = re.search(r"^X-SmartCorr-Timestamp: (\d+)$", doc, re.MULTILINE)
    signature = re.search(r"^X-SmartCorr-Signature: (v1=[0-9a-f]{64})$", doc, re.MULTILINE)
    assert body
    assert secret
    assert stamp
    assert signature
    assert sign(secret[1].encode(), int(stamp[1]), body[1].encode()) == signature[1]
    assert check_signature(secret[1].encode(), {"X-SmartCorr-Timestamp": stamp[1],
                                                "X-SmartCorr-Signature": signature[1]},
                           body[1].encode(), int(stamp[1]) + 1000)
    # a replayed request (timestamp too old) and another body are refused
    assert not check_signature(secret[1].encode(), {"X-SmartCorr-Timestamp": stamp[1],
                                                    "X-SmartCorr-Signature": signature[1]},
                               body[1].encode(), int(stamp[1]) + 301_000)
    assert not check_signature(secret[1].encode(), {"X-SmartCorr-Timestamp": stamp[1],
                                                    "X-SmartCorr-Signature": signature[1]},
                               body[1].encode() + b" ", int(stamp[1]))
