"""The uplink's certificate check (uplink/certs.py), what the uplink says about itself
(uplink/failures.py, a fake clock), and ``provision check`` on the certificates."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
)

import gateway
from provisioning.identity import create_identity
from provisioning.pki import (
    Authority,
    issue,
    issue_custom,
    make_authority,
    make_not_a_ca,
    write_ca,
    write_pem,
)
from uplink.certs import (
    MAX_PEM_BYTES,
    CertProblem,
    CertReport,
    Severity,
    TlsFiles,
    check_certificates,
    read_tls_files,
)
from uplink.failures import (
    Failure,
    Problem,
    Record,
    Say,
    UplinkWatch,
    connack_failure,
    connect_failure,
    duration,
    socket_failure,
)

GW = "gw-test-0001"
NOW = dt.datetime.now(dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
S = 1_000_000_000
WHERE = "broker.example:8883"


@dataclass
class Lab:
    directory: Path
    ca: Authority
    ca_file: Path

    def files(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
              name: str = "gw", ca_file: Path | None = None) -> TlsFiles:
        written = write_pem(self.directory, name, key, cert)
        return read_tls_files(str(ca_file or self.ca_file), str(written.cert),
                              str(written.key))

    def check(self, files: TlsFiles, *, trusted: bool = True,
              now_ms: int = NOW_MS) -> CertReport:
        return check_certificates(files, GW, now_ms=now_ms, trusted=trusted)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    directory = tmp_path_factory.mktemp("certs")
    ca = make_authority()
    return Lab(directory, ca, write_ca(directory, ca))


def codes(report: CertReport) -> dict[CertProblem, Severity]:
    return {f.code: f.severity for f in report.findings}


# -- the check ----------------------------------------------------------------------------
def test_a_clean_certificate_has_no_finding(lab: Lab) -> None:
    report = lab.check(lab.files(*issue(lab.ca, GW)))
    assert report.findings == ()
    assert not report.refuse
    assert report.fingerprint is not None
    assert report.not_after_ms is not None
    assert report.not_after_ms > NOW_MS


def test_a_certificate_for_another_gateway_is_refused(lab: Lab) -> None:
    report = lab.check(lab.files(*issue(lab.ca, "gw-other-0002")))
    assert codes(report) == {CertProblem.CN_MISMATCH: Severity.ERROR}
    assert report.refuse
    line = report.errors[0].line
    assert "'gw-other-0002'" in line
    assert f"'{GW}'" in line
    assert f"install the certificate issued for {GW}" in line


def test_a_certificate_without_a_common_name_is_refused(lab: Lab) -> None:
    report = lab.check(lab.files(*issue_custom(lab.ca, None)))
    assert codes(report) == {CertProblem.CN_MISMATCH: Severity.ERROR}
    assert "has no common name" in report.errors[0].what


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(lab: Lab) -> None:
    _, cert = issue(lab.ca, GW)
    report = lab.check(lab.files(ec.generate_private_key(ec.SECP256R1()), cert))
    assert codes(report) == {CertProblem.KEY_MISMATCH: Severity.ERROR}


@pytest.mark.parametrize("trusted", [True, False])
def test_an_expired_certificate_is_refused_whatever_the_clock(lab: Lab, trusted: bool) -> None:
    files = lab.files(*issue_custom(lab.ca, GW, not_before=NOW - dt.timedelta(days=60),
                                    not_after=NOW - dt.timedelta(days=1)))
    report = lab.check(files, trusted=trusted)
    assert codes(report) == {CertProblem.EXPIRED: Severity.ERROR}
    assert "expired on" in report.errors[0].what
    assert report.errors[0].todo.startswith("install a renewed certificate")


def test_not_yet_valid_is_an_error_by_trusted_time_and_deferred_otherwise(lab: Lab) -> None:
    files = lab.files(*issue_custom(lab.ca, GW, not_before=NOW + dt.timedelta(days=2),
                                    not_after=NOW + dt.timedelta(days=400)))
    trusted = lab.check(files, trusted=True)
    assert codes(trusted) == {CertProblem.NOT_YET_VALID: Severity.ERROR}
    assert trusted.refuse
    unsynced = lab.check(files, trusted=False)
    assert codes(unsynced) == {CertProblem.NOT_YET_VALID: Severity.DEFERRED}
    assert not unsynced.refuse  # a Pi without RTC runs behind: the uplink goes on
    assert "not synchronised" in unsynced.findings[0].what


def test_a_ca_file_that_is_not_a_ca_is_refused(lab: Lab) -> None:
    not_ca = write_ca(lab.directory, make_not_a_ca(), name="not-a-ca")
    report = lab.check(lab.files(*issue(lab.ca, GW), ca_file=not_ca))
    assert codes(report) == {CertProblem.CA_NOT_CA: Severity.ERROR}
    assert "basicConstraints" in report.errors[0].what


def test_an_expired_ca_is_refused(lab: Lab) -> None:
    old = make_authority(days=1)
    path = write_ca(lab.directory, old, name="old-ca")
    files = lab.files(*issue(old, GW), ca_file=path)
    assert lab.check(files).findings == ()
    report = lab.check(files, now_ms=NOW_MS + 3 * 86_400_000)
    assert codes(report) == {CertProblem.CA_EXPIRED: Severity.ERROR}


def test_a_certificate_of_another_ca_is_a_warning(lab: Lab) -> None:
    other = make_authority("another CA")
    report = lab.check(lab.files(*issue(other, GW)))
    assert codes(report) == {CertProblem.NOT_ISSUED_BY_CA: Severity.WARNING}
    assert not report.refuse  # the broker's CA may differ on purpose: the broker decides


def test_a_certificate_issued_through_an_intermediate_is_clean(lab: Lab) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    inter_cert = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                              "intermediate")]))
                  .issuer_name(lab.ca.cert.subject).public_key(key.public_key())
                  .serial_number(x509.random_serial_number())
                  .not_valid_before(NOW - dt.timedelta(days=1))
                  .not_valid_after(NOW + dt.timedelta(days=400))
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .sign(lab.ca.key, hashes.SHA256()))
    inter = Authority(key, inter_cert)
    leaf_key, leaf = issue(inter, GW)
    written = write_pem(lab.directory, "chained", leaf_key, leaf)
    with written.cert.open("ab") as file:
        file.write(inter_cert.public_bytes(Encoding.PEM))
    files = read_tls_files(str(lab.ca_file), str(written.cert), str(written.key))
    assert lab.check(files).findings == ()


def test_an_expiry_within_30_days_is_a_warning(lab: Lab) -> None:
    files = lab.files(*issue_custom(lab.ca, GW, not_after=NOW + dt.timedelta(days=10)))
    report = lab.check(files)
    assert codes(report) == {CertProblem.EXPIRES_SOON: Severity.WARNING}
    assert "(in 9 days)" in report.findings[0].what or "(in 10 days)" in report.findings[0].what


def test_garbage_missing_encrypted_and_oversized_files_are_refused(lab: Lab) -> None:
    key, cert = issue(lab.ca, GW)
    good = write_pem(lab.directory, "good", key, cert)
    garbage = lab.directory / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    missing = lab.directory / "missing.pem"
    big = lab.directory / "big.pem"
    big.write_bytes(b"x" * (MAX_PEM_BYTES + 1))
    encrypted = lab.directory / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                            BestAvailableEncryption(b"secret")))

    def check(ca: Path, crt: Path, k: Path) -> dict[CertProblem, Severity]:
        return codes(lab.check(read_tls_files(str(ca), str(crt), str(k))))

    assert check(lab.ca_file, garbage, good.key) == {CertProblem.CERT_NOT_PEM: Severity.ERROR}
    assert check(lab.ca_file, good.cert, garbage) == {CertProblem.KEY_NOT_PEM: Severity.ERROR}
    assert check(garbage, good.cert, good.key) == {CertProblem.CA_NOT_PEM: Severity.ERROR}
    assert check(lab.ca_file, missing, good.key) == {
        CertProblem.CERT_UNREADABLE: Severity.ERROR}
    assert check(missing, good.cert, good.key) == {CertProblem.CA_UNREADABLE: Severity.ERROR}
    assert check(lab.ca_file, good.cert, missing) == {
        CertProblem.KEY_UNREADABLE: Severity.ERROR}
    assert check(lab.ca_file, big, good.key) == {CertProblem.CERT_UNREADABLE: Severity.ERROR}
    assert check(lab.ca_file, good.cert, encrypted) == {
        CertProblem.KEY_ENCRYPTED: Severity.ERROR}
    files = read_tls_files(str(lab.ca_file), None, str(good.key))
    assert "not configured" in lab.check(files).errors[0].what


def test_the_digest_follows_the_files(lab: Lab) -> None:
    written = write_pem(lab.directory, "renewed", *issue(lab.ca, GW))
    before = read_tls_files(str(lab.ca_file), str(written.cert), str(written.key)).digest
    assert read_tls_files(str(lab.ca_file), str(written.cert), str(written.key)).digest == before
    write_pem(lab.directory, "renewed", *issue(lab.ca, GW))
    assert read_tls_files(str(lab.ca_file), str(written.cert), str(written.key)).digest != before


# -- what the uplink says (fake clock) ---------------------------------------------------
def said(actions: list[Say | Record]) -> list[Say]:
    return [a for a in actions if isinstance(a, Say)]


def recorded(actions: list[Say | Record]) -> list[Record]:
    return [a for a in actions if isinstance(a, Record)]


def test_a_refusal_is_said_at_once_then_once_a_minute_and_recorded_once(lab: Lab) -> None:
    report = lab.check(lab.files(*issue(lab.ca, "gw-other-0002")))
    watch = UplinkWatch(WHERE)
    first = watch.certificates(report, 0)
    assert [s.level for s in said(first)] == [logging.ERROR]
    assert "uplink refuses to connect" in said(first)[0].text
    assert [r.body["reason"] for r in recorded(first)] == ["cn_mismatch"]
    assert watch.state == "refused: cn_mismatch"
    # checked every second for a minute: nothing more said, nothing more recorded
    later = [a for t in range(1, 60) for a in watch.certificates(report, t * S)]
    assert later == []
    again = watch.certificates(report, 60 * S)
    assert len(said(again)) == 1
    assert recorded(again) == []
    assert "still refuses" in again[0].text
    assert "60 times" in again[0].text


def test_each_distinct_problem_is_recorded_once(lab: Lab) -> None:
    _, cert = issue(lab.ca, "gw-other-0002")
    report = lab.check(lab.files(ec.generate_private_key(ec.SECP256R1()), cert))
    assert {f.code for f in report.errors} == {CertProblem.CN_MISMATCH, CertProblem.KEY_MISMATCH}
    watch = UplinkWatch(WHERE)
    actions = [a for t in range(200) for a in watch.certificates(report, t * S)]
    bodies = [r.body for r in recorded(actions)]
    assert sorted(str(b["reason"]) for b in bodies) == ["cn_mismatch", "key_mismatch"]
    assert bodies[0]["cert_sha256"] == report.fingerprint
    assert set(bodies[0]) == {"reason", "problems", "cert_sha256", "not_before", "not_after"}


def test_a_fixed_certificate_is_said_and_the_connection_counts_the_outage(lab: Lab) -> None:
    bad = lab.check(lab.files(*issue(lab.ca, "gw-other-0002")))
    good = lab.check(lab.files(*issue(lab.ca, GW)))
    watch = UplinkWatch(WHERE)
    watch.certificates(bad, 0)
    fixed = watch.certificates(good, 30 * S)
    assert [s.text for s in said(fixed)] == [
        f"uplink: the certificate problem is fixed; connecting to {WHERE}"]
    assert watch.state == "connecting"
    up = watch.connected(95 * S, backlog=1234)
    assert up == [Say(logging.WARNING, f"uplink connected to {WHERE} after 1 min 35 s without "
                      "it (1 failed attempts); 1234 records queued go out now")]
    # refused again later (the certificate expired): a new refusal, a new record
    again = watch.certificates(bad, 3600 * S)
    assert len(said(again)) == 1
    assert len(recorded(again)) == 1


def test_a_deferred_finding_is_a_warning_and_does_not_refuse(lab: Lab) -> None:
    files = lab.files(*issue_custom(lab.ca, GW, not_before=NOW + dt.timedelta(days=2)))
    watch = UplinkWatch(WHERE)
    actions = watch.certificates(lab.check(files, trusted=False), 0)
    assert [s.level for s in said(actions)] == [logging.WARNING]
    assert recorded(actions) == []
    assert not watch.refused
    assert watch.certificates(lab.check(files, trusted=False), 10 * S) == []
    # trusted time arrives and confirms it: now a refusal
    actions = watch.certificates(lab.check(files, trusted=True), 20 * S)
    assert watch.refused
    assert len(recorded(actions)) == 1


def test_a_failure_is_said_at_once_then_once_a_minute_with_its_count() -> None:
    watch = UplinkWatch(WHERE)
    refused = connect_failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), WHERE,
                              ca_file="ca.crt", tls=True)
    lines = [s for t in range(0, 600, 1) for s in said(watch.failed(refused, t * S // 10))]
    # 600 attempts over a minute: one line
    assert len(lines) == 1
    assert lines[0].level == logging.ERROR
    assert lines[0].text.startswith("uplink cannot connect: nothing accepts connections at "
                                    f"{WHERE}")
    assert watch.state == "retrying: tcp_refused"
    repeat = said(watch.failed(refused, 60 * S))
    assert len(repeat) == 1
    assert "still cannot connect (600 times in the last 1 min 0 s, 601 in all)" in repeat[0].text
    # another failure is said at once
    dns = connect_failure(socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                          WHERE, ca_file="ca.crt", tls=True)
    assert len(said(watch.failed(dns, 61 * S))) == 1
    assert watch.state == "retrying: dns"
    up = said(watch.connected(70 * S, backlog=None))
    assert up[0].text == (f"uplink connected to {WHERE} after 1 min 10 s without it (602 "
                          "failed attempts)")
    assert watch.state == "connected"


def test_a_refusal_whose_alert_was_lost_in_a_race_stays_the_refusal() -> None:
    """TLS 1.3: the broker refuses the certificate after the client's handshake, sends its
    alert and closes; a client that reads the close first has only an EOF. CI saw "tlsv1
    alert decrypt error" then "EOF occurred in violation of protocol" for one rogue
    certificate, said as two problems."""
    alert = ("failed to receive on socket: [SSL: TLSV1_ALERT_DECRYPT_ERROR] tlsv1 alert "
             "decrypt error (_ssl.c:2580)")
    eof = "failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)"
    refusal = socket_failure(alert, WHERE, tls=True)
    closed = socket_failure(eof, WHERE, tls=True)
    assert (refusal.code, closed.code) == (Problem.CERT_REFUSED, Problem.CLOSED)
    watch = UplinkWatch(WHERE)
    lines = said(watch.failed(refusal, 0))
    for t in range(1, 40):  # the two symptoms in turns, as the race falls
        lines += said(watch.failed(closed if t % 2 else refusal, t * S))
        assert watch.state == "retrying: cert_refused"
    assert len(lines) == 1
    assert "refused this gateway's certificate (tlsv1 alert decrypt error)" in lines[0].text
    # the minute's repeat counts both symptoms as the refusal
    again = said(watch.failed(closed, 60 * S))
    assert "still cannot connect (40 times in the last 1 min 0 s, 41 in all)" in again[0].text
    assert "refused this gateway's certificate" in again[0].text
    # once connected, the outage is over: a close alone is a close again
    watch.connected(61 * S, None)
    assert "closed the connection before accepting it" in said(watch.failed(closed, 62 * S))[0].text
    assert watch.state == "retrying: closed"


def test_a_close_before_any_refusal_is_said_as_a_close_and_a_refusal_after_it_too() -> None:
    watch = UplinkWatch(WHERE)
    closed = socket_failure(None, WHERE, tls=True)
    refusal = connack_failure(0x87, "Not authorized", WHERE, GW)
    first = said(watch.failed(closed, 0))
    assert watch.state == "retrying: closed"
    second = said(watch.failed(refusal, S))
    assert watch.state == "retrying: not_authorized"
    assert [len(first), len(second)] == [1, 1]
    assert said(watch.failed(closed, 2 * S)) == []
    assert watch.state == "retrying: not_authorized"


def test_a_flapping_connection_is_bounded() -> None:
    watch = UplinkWatch(WHERE)
    watch.connected(0, None)
    lines = []
    for i in range(1, 120):  # up and down every half second for a minute
        lines += said(watch.lost("Unspecified error", i * S // 2))
        lines += said(watch.connected(i * S // 2 + S // 4, 0))
    assert len(lines) <= 4
    assert lines[0].text.startswith(f"uplink lost the broker {WHERE}")


def test_records_the_broker_refuses_are_said_once_a_minute() -> None:
    watch = UplinkWatch(WHERE)
    topic = "smartcorr/v1/gw/gw-test-0001/records"
    lines = [s for t in range(600)  # ten refused messages a second, for a minute
             for s in said(watch.publish_refused(200, "Not authorized", topic, t * S // 10))]
    assert len(lines) == 1
    assert lines[0].level == logging.ERROR
    assert f"its ACL must let this gateway write {topic}" in lines[0].text
    assert len(said(watch.publish_refused(200, "Not authorized", topic, 60 * S))) == 1


def test_the_told_problems_are_bounded_by_their_closed_set() -> None:
    watch = UplinkWatch(WHERE, repeat_ns=1)
    for t in range(5000):
        watch.failed(Failure(list(Problem)[t % len(Problem)], "x", "y"), t)
    assert len(watch._told) <= len(Problem)
    assert len(Problem) < 32  # a closed set, not a growing table


@pytest.mark.parametrize(("code", "problem"), [(62, Problem.BROKER_NAME),
                                               (64, Problem.BROKER_NAME),
                                               (10, Problem.BROKER_CERT_TIME),
                                               (20, Problem.BROKER_UNTRUSTED),
                                               (7, Problem.BROKER_UNTRUSTED)])
def test_broker_certificate_failures_are_told_apart(code: int, problem: Problem) -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    exc.verify_message = "reason"
    found = connect_failure(exc, WHERE, ca_file="/etc/ca.crt", tls=True)
    assert found.code is problem
    if problem is Problem.BROKER_UNTRUSTED:
        assert "/etc/ca.crt" in found.what
        assert "ca_file" in found.todo


def test_socket_errors_and_connack_codes_are_classified() -> None:
    assert connect_failure(TimeoutError("timed out"), WHERE, ca_file=None,
                           tls=True).code is Problem.TIMEOUT
    assert connect_failure(OSError(errno.EHOSTUNREACH, "No route to host"), WHERE,
                           ca_file=None, tls=True).code is Problem.UNREACHABLE
    assert connect_failure(None, WHERE, ca_file=None, tls=True).code is Problem.NETWORK
    alert = ("failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown "
             "ca (_ssl.c:2580)")
    found = socket_failure(alert, WHERE, tls=True)
    assert found.code is Problem.CERT_REFUSED
    assert found.what == (f"the broker at {WHERE} refused this gateway's certificate (tlsv1 "
                          "alert unknown ca)")
    assert socket_failure(None, WHERE, tls=True).code is Problem.CLOSED
    assert connack_failure(0x87, "Not authorized", WHERE, GW).code is Problem.NOT_AUTHORIZED
    assert connack_failure(0x86, "Bad user name or password", WHERE,
                           GW).code is Problem.NOT_AUTHORIZED
    assert connack_failure(0x89, "Server busy", WHERE, GW).code is Problem.BROKER_BUSY
    assert connack_failure(0x99, "Payload format invalid", WHERE, GW).code is Problem.CONNACK


def test_durations_read_well() -> None:
    assert [duration(n * S) for n in (0, 59, 61, 3599, 3600 * 5 + 60, 86400 * 3 + 7200)] == [
        "0 s", "59 s", "1 min 1 s", "59 min 59 s", "5 h 1 min", "3 d 2 h"]


# -- provision check ---------------------------------------------------------------------
def _config(directory: Path, ca: Path, cert: Path, key: Path) -> Path:
    create_identity(directory / "identity", GW)
    cfg = directory / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{directory / 'identity'}"
data_dir = "{directory / 'data'}"
[broker]
host = "127.0.0.1"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
""")
    return cfg


def test_provision_check_fails_with_one_line_per_certificate_problem(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cert = issue(lab.ca, "gw-other-0002")
    written = write_pem(tmp_path, "gw", ec.generate_private_key(ec.SECP256R1()), cert)
    cfg = _config(tmp_path, lab.ca_file, written.cert, written.key)
    assert gateway.main(["provision", "check", "--config", str(cfg), "--json"]) == 1
    certificate = next(i for i in json.loads(capsys.readouterr().out)["items"]
                       if i["name"] == "certificate")  # one line for the certificate
    assert certificate["ok"] == "fail"
    assert "is for 'gw-other-0002'" in certificate["detail"]
    assert "does not belong to the certificate" in certificate["detail"]
    # the keys report it is made from (diag keys): one problem per finding
    assert gateway.main(["diag", "keys", "--config", str(cfg), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert {f["code"] for f in report["certificates"]["findings"]} == {"cn_mismatch",
                                                                       "key_mismatch"}
    assert len([p for p in report["problems"] if p.startswith("uplink: ")]) == 2


def test_provision_check_passes_with_a_clean_certificate(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = write_pem(tmp_path, "gw", *issue(lab.ca, GW))
    cfg = _config(tmp_path, lab.ca_file, written.cert, written.key)
    gateway.main(["provision", "check", "--config", str(cfg), "--json", "--skip-broker"])
    certificate = next(i for i in json.loads(capsys.readouterr().out)["items"]
                       if i["name"] == "certificate")
    assert certificate["ok"] == "pass", certificate
    assert gateway.main(["diag", "keys", "--config", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["certificates"]["findings"] == []
    assert report["certificates"]["cert_sha256"] is not None
