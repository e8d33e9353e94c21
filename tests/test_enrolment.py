"""Enrolment (issue 12, item 1): a gateway the platform trusts from its first minute.

Both paths with the real parts: the gateway's and the platform's command lines on real
files, a real SQLite registry, a real mosquitto with the production ACL (an mTLS listener
whose CA is the platform's CA, and a bootstrap listener with a password), the real
enrolment service, and the gateway's real uplink connecting with what was installed."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

import gateway
from buffer.store import store_path
from central import ca as central_ca
from central import cli as ingest_cli
from central import command_keys as central_command_keys
from central import enrolment as service_mod
from central.db import open_db
from central.enrolment import EnrolmentService
from central.ingest import report
from core.enrolment import (
    ANSWER_FILE,
    REQUEST_FILE,
    EnrolmentError,
    kid_of,
    make_request,
    new_claim_token,
)
from core.mqtt import BrokerConfig
from core.record import canonical
from core.topics import (
    BOOTSTRAP_USER,
    ENROL_CN,
    PLATFORM_CN,
    enrol_answer_topic,
    enrol_request_topic,
)
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki, client_config, free_port, start_mosquitto
from lab.site import Site
from provisioning import actions as journal
from provisioning import enrol
from provisioning import operator as operators
from provisioning import pki as lab_pki
from provisioning.identity import Identity, create_identity, install_files, recover_identity
from tests.helpers import stored_records, wait_for

pytestmark = pytest.mark.slow
WHO = ("--operator", "Ann Installer")
REPO = Path(__file__).resolve().parents[1]
PASSWORD = "bootstrap-kit-secret"  # noqa: S105 (a test broker's)


@pytest.fixture(autouse=True)
def _no_ambient_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No operator unless a test gives one (not the machine's /etc/smartcorr)."""
    monkeypatch.delenv(operators.OPERATOR_FILE_ENV, raising=False)
    monkeypatch.setattr(operators, "DEFAULT_OPERATOR_FILE", tmp_path / "no-operator.json")


@dataclass
class Platform:
    directory: Path
    ca: central_ca.Authority
    db_url: str
    command_keys: Path

    @property
    def ca_dir(self) -> Path:
        return self.ca.directory

    @property
    def ca_file(self) -> Path:
        return self.ca.directory / central_ca.CA_CERT

    def pki(self) -> Pki:
        """The lab broker's PKI under this CA: its server certificate and clients'."""
        authority = lab_pki.Authority(self.ca.key, self.ca.cert)
        server = lab_pki.issue_to(self.directory / "pki", authority, "broker", server=True)
        return Pki(self.directory / "pki", authority, self.ca_file, server)


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    directory = tmp_path / "platform"
    ca = central_ca.init_ca(directory / "ca", "Test Province CA")
    root = directory / "command-root"  # the platform's command keys, exported for gateways
    central_command_keys.init_root(root)
    central_command_keys.issue(root, "*", 365, directory / "command-key")
    keys = directory / "command-export"
    central_command_keys.export(root, keys)
    (keys / "README.txt").write_text("not handed out")
    return Platform(directory, ca, f"sqlite:///{directory / 'ingest.db'}", keys)


def gateway_identity(tmp_path: Path, gw: str) -> Identity:
    return create_identity(tmp_path / gw, gw)


def gw_cli(*argv: str) -> int:
    return gateway.main(list(argv))


def ingest(*argv: str) -> int:
    return ingest_cli.main(list(argv))


def entries(identity: Identity) -> list[journal.Entry]:
    return journal.read(identity.directory, journal.journal_aead(identity)).entries


# --- provision init ----------------------------------------------------------------------------

def test_init_makes_a_private_tls_key_and_a_csr_bound_to_the_identity(tmp_path: Path) -> None:
    assert gw_cli("provision", "init", "--identity-dir", str(tmp_path / "id"),
                  "--gateway-id", "gw-qc-0042", "--no-tpm") == 0
    key_path, csr_path = tmp_path / "id" / "tls.key", tmp_path / "id" / "tls.csr"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-qc-0042"
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    assert csr.public_key() == key.public_key()
    meta = json.loads((tmp_path / "id" / "gateway.json").read_text())
    assert kid_of(csr.extensions) == meta["kid"]  # the TLS key names its identity


# --- the offline path ----------------------------------------------------------------------------

def test_offline_round_trip_installs_everything_and_each_step_is_a_record(
        tmp_path: Path, platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    identity = gateway_identity(tmp_path, "gw-qc-0042")
    usb = tmp_path / "usb"
    ident = str(identity.directory)
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", ident,
                  "--request-out", str(usb), "--json") == 0
    requested = json.loads(capsys.readouterr().out)
    assert (usb / REQUEST_FILE).exists()

    assert ingest("ca", "sign", str(usb), "--ca-dir", str(platform.ca_dir), "--db",
                  platform.db_url, "--command-keys", str(platform.command_keys), "--json") == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["new_gateway"] is True
    assert signed["files"] == ["command-keys.json", "command-root.pub"]  # not README.txt

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[broker]\nhost = "127.0.0.1"\nca_file = "{ident}/ca.crt"\n'
                   f'cert_file = "{ident}/tls.crt"\nkey_file = "{ident}/tls.key"\n')
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", ident, "--answer", str(usb),
                  "--ca-fingerprint", platform.ca.fingerprint, "--config", str(cfg),
                  "--json") == 0
    done = json.loads(capsys.readouterr().out)
    assert done["status"] == "installed"
    assert done["config_to_change"] == []  # the configuration already names them

    cert = x509.load_pem_x509_certificate((identity.directory / "tls.crt").read_bytes())
    key = load_pem_private_key((identity.directory / "tls.key").read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-qc-0042"
    assert kid_of(cert.extensions) == identity.kid
    assert cert.issuer == platform.ca.cert.subject
    assert (identity.directory / "ca.crt").read_bytes() == platform.ca_file.read_bytes()
    for name in ("command-root.pub", "command-keys.json"):  # opaque, byte for byte
        assert (identity.directory / name).read_bytes() == \
            (platform.command_keys / name).read_bytes()
    assert not (identity.directory / "README.txt").exists()

    with open_db(platform.db_url) as db:  # the registry knows the identity and the cert
        known = report(db, "gw-qc-0042")
    assert known["status"] == "active"
    assert known["identities"][0]["kid"] == identity.kid
    assert known["tls_fingerprint"] == signed["fingerprint"] == done["fingerprint"]

    # each step is a record the daemon seals, under its own kind, naming the installer
    site = Site(tmp_path / "site", identity, BrokerConfig("127.0.0.1", 9, tls=False))
    site.start()
    store = store_path(site.workdir / "data")

    def records() -> list[dict[str, Any]]:
        return [json.loads(r) for r in stored_records(store, identity.storage_key)]

    def of_kind(kind: str) -> list[dict[str, Any]]:
        return [r for r in records() if r["kind"] == kind]

    try:
        wait_for(lambda: of_kind("enrol.completed") != [], 10, "the enrol.completed record")
        [req], [comp] = of_kind("enrol.requested"), of_kind("enrol.completed")
    finally:
        site.close(drain_s=0.1)
    assert req["prio"] == comp["prio"] == "alarm"
    assert req["body"]["details"]["request_id"] == requested["request_id"]
    assert req["body"]["details"]["mode"] == "offline"
    assert comp["body"]["details"]["serial"] == signed["serial"]
    assert comp["body"]["details"]["ca_fingerprint"] == platform.ca.fingerprint
    assert comp["body"]["details"]["replaced"]["tls.crt"] is None  # a first certificate
    assert comp["body"]["operator"]["name"] == "Ann Installer"


def _answer_for(tmp_path: Path, platform: Platform, identity: Identity, name: str) -> Path:
    usb = tmp_path / name
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", str(identity.directory),
                  "--request-out", str(usb)) == 0
    assert ingest("ca", "sign", str(usb), "--ca-dir", str(platform.ca_dir), "--db",
                  platform.db_url, "--command-keys", str(platform.command_keys)) == 0
    return usb


def _install(identity: Identity, answer: Path, *extra: str) -> int:
    return gw_cli("provision", "enrol", *WHO, "--identity-dir", str(identity.directory),
                  "--answer", str(answer), *extra)


def test_an_answer_that_does_not_check_is_refused_installs_nothing_and_is_recorded(
        tmp_path: Path, platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    b = gateway_identity(tmp_path, "gw-bbbb-0001")
    usb_a = _answer_for(tmp_path, platform, a, "usb-a")
    usb_b = _answer_for(tmp_path, platform, b, "usb-b")
    capsys.readouterr()

    assert _install(a, usb_b) == 1  # another gateway's answer
    assert "FAILED (wrong_gateway)" in capsys.readouterr().err

    other = central_ca.init_ca(tmp_path / "other-ca", "Someone Else CA")
    assert _install(a, usb_a, "--ca-fingerprint", other.fingerprint) == 1
    assert "FAILED (ca_mismatch)" in capsys.readouterr().err

    answer = json.loads((usb_a / ANSWER_FILE).read_bytes())  # command material swapped
    answer["files"]["command-root.pub"] = "ZXZpbC1yb290"
    forged = tmp_path / "forged.json"
    forged.write_bytes(canonical(answer))
    assert _install(a, forged) == 1
    assert "FAILED (bad_answer_signature)" in capsys.readouterr().err

    (a.directory / "tls.key").unlink()  # a new TLS key since the request: the answer is stale
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", str(a.directory),
                  "--request-out", str(tmp_path / "usb-a2")) == 0
    assert _install(a, usb_a) == 1
    assert "FAILED (wrong_key)" in capsys.readouterr().err

    assert not (a.directory / "tls.crt").exists()
    assert not (a.directory / "command-root.pub").exists()
    failed = [e.details["reason"] for e in entries(a) if e.action == "enrol.failed"]
    assert failed == ["wrong_gateway", "ca_mismatch", "bad_answer_signature", "wrong_key"]

    assert _install(a, _answer_for(tmp_path, platform, a, "usb-a3")) == 0  # a good one: taken


def test_a_tampered_or_mismatched_request_is_refused_and_registers_nothing(
        tmp_path: Path, platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    b = gateway_identity(tmp_path, "gw-bbbb-0001")
    usb = tmp_path / "usb"
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", str(a.directory),
                  "--request-out", str(usb)) == 0
    request = json.loads((usb / REQUEST_FILE).read_bytes())

    def sign(data: bytes) -> tuple[int, str]:
        (usb / REQUEST_FILE).write_bytes(data)
        capsys.readouterr()
        rc = ingest("ca", "sign", str(usb), "--ca-dir", str(platform.ca_dir), "--db",
                    platform.db_url)
        return rc, capsys.readouterr().err

    swapped = dict(request, csr=(b.directory / "tls.csr").read_text())  # after signing
    rc, err = sign(canonical(swapped))
    assert rc == 2
    assert "bad_signature" in err
    rc, err = sign(json.dumps(request, indent=2).encode())  # edited by hand: not canonical
    assert (rc, "malformed" in err) == (2, True)
    # signed by A's identity, but the CSR's key says it belongs to B's identity
    alien = make_request(a.key, request_id=request["request_id"], gateway_id=a.gateway_id,
                         registration=a.registration(),
                         csr_pem=(b.directory / "tls.csr").read_text(), claim=None,
                         created_ms=1)
    rc, err = sign(alien)
    assert (rc, "bad_csr" in err) == (2, True)
    assert not (usb / ANSWER_FILE).exists()
    with open_db(platform.db_url) as db, pytest.raises(KeyError):
        report(db, a.gateway_id)


def test_the_contract_documents_the_enrolment_topics() -> None:
    import yaml
    api = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())
    addresses = {c["address"] for c in api["channels"].values()}
    assert enrol_request_topic("{clientId}") in addresses
    assert enrol_answer_topic("{clientId}") in addresses


def test_a_command_keys_directory_holding_a_private_key_is_refused(platform: Platform) -> None:
    (platform.command_keys / "command-root.key").write_text('{"private": "…"}')
    with pytest.raises(central_ca.CaError, match="private key"):
        central_ca.command_files(platform.command_keys)


def test_an_interrupted_installation_is_completed_or_rolled_back(tmp_path: Path) -> None:
    identity = gateway_identity(tmp_path, "gw-qc-0042")
    d = identity.directory
    (d / ".tls.crt.new").write_bytes(b"staged")  # a power cut before the intent
    recover_identity(d)
    assert not (d / ".tls.crt.new").exists()
    assert not (d / "tls.crt").exists()
    install_files(d, {"tls.crt": b"old", "ca.crt": b"old-ca"})
    (d / ".tls.crt.new").write_bytes(b"new")  # a power cut after the intent
    (d / "install.json").write_text('["ca.crt", "tls.crt"]')
    recover_identity(d)
    assert (d / "tls.crt").read_bytes() == b"new"
    assert (d / "ca.crt").read_bytes() == b"old-ca"  # renamed before the cut
    assert not (d / "install.json").exists()


# --- claim tokens --------------------------------------------------------------------------------

def _request(identity: Identity, claim: str | None) -> bytes:
    return enrol.make(identity, claim=claim, mode="claim").data


def test_a_lost_answer_is_answered_again_and_a_token_enrols_once(
        tmp_path: Path, platform: Platform) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    b = gateway_identity(tmp_path, "gw-bbbb-0001")
    with open_db(platform.db_url) as db:
        token = central_ca.new_claim(db).token
        data = _request(a, token)
        first = central_ca.sign_request(db, platform.ca, data, require_claim=True)
        again = central_ca.sign_request(db, platform.ca, data, require_claim=True)
        assert (again.serial, again.new, first.new) == (first.serial, False, True)
        assert central_ca.claim_status(db, token) == "used"
        with pytest.raises(EnrolmentError) as refused:
            central_ca.sign_request(db, platform.ca, _request(b, token), require_claim=True)
        assert refused.value.reason == "claim_used"
        with pytest.raises(EnrolmentError) as missing:
            central_ca.sign_request(db, platform.ca, _request(b, None), require_claim=True)
        assert missing.value.reason == "claim_missing"
        only_a = central_ca.new_claim(db, gateway_id="gw-aaaa-0001").token
        with pytest.raises(EnrolmentError) as other:
            central_ca.sign_request(db, platform.ca, _request(b, only_a), require_claim=True)
        assert other.value.reason == "claim_other_gateway"
        assert central_ca.claim_status(db, only_a) == "open"  # a refusal spends nothing
        impostor = create_identity(tmp_path / "impostor", "gw-aaaa-0001")  # another key
        with pytest.raises(EnrolmentError) as registry:
            central_ca.sign_request(db, platform.ca, _request(impostor, only_a),
                                    require_claim=True)
        assert registry.value.reason == "registry"
        assert central_ca.claim_status(db, only_a) == "open"  # given back
        assert len(central_ca.certificates(db)) == 1


def test_claim_tokens_are_bounded(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(central_ca, "MAX_OPEN_CLAIMS", 3)
    monkeypatch.setattr(central_ca, "MAX_CLAIM_ROWS", 5)
    with open_db(platform.db_url) as db:
        tokens = [central_ca.new_claim(db).token for _ in range(3)]
        with pytest.raises(central_ca.CaError, match="3 claim tokens are open"):
            central_ca.new_claim(db)
        assert central_ca.cancel_open_claims(db) == 3  # the operator expires them
        assert [central_ca.claim_status(db, t) for t in tokens] == ["expired"] * 3
        tokens += [central_ca.new_claim(db).token for _ in range(3)]
        with db.transaction() as tx:
            rows = tx.one("SELECT COUNT(*) FROM claims")
        assert rows is not None
        assert int(rows[0]) == 5  # the oldest spent one went to make room
        assert central_ca.claim_status(db, tokens[0]) == "unknown"
        assert central_ca.claim_status(db, tokens[1]) == "expired"


def test_the_service_queue_is_bounded(platform: Platform,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "MAX_PENDING", 1)
    service = EnrolmentService(platform.db_url, BrokerConfig("127.0.0.1", 9, tls=False),
                               platform.ca_dir)  # not started: nothing takes from the queue
    for n in range(3):
        message = mqtt.MQTTMessage(topic=f"smartcorr/v1/enrol/req-{n:032x}/request".encode())
        message.payload = b"{}"
        service._on_message(service.client, None, message)
    assert service.stats == {"refused.busy": 2}


# --- the online path over a real mosquitto --------------------------------------------------------

@dataclass
class Online:
    broker: Mosquitto
    bootstrap_port: int
    kit_password: Path
    pki: Pki
    service: EnrolmentService
    events: list[dict[str, Any]]

    def enrol(self, identity: Identity, token_stdin: str, *extra: str) -> int:
        return gw_cli("provision", "enrol", *WHO, "--identity-dir", str(identity.directory),
                      "--claim", "-", "--broker", f"127.0.0.1:{self.bootstrap_port}", "--ca",
                      str(self.pki.ca_file), "--bootstrap-password-file",
                      str(self.kit_password), "--timeout", "15", *extra)


def bootstrap_conf(workdir: Path, pki: Pki, port: int) -> list[str]:
    """The bootstrap listener: TLS with the server's certificate, no client certificate,
    the bootstrap user's password (hashed by mosquitto_passwd, never on its argv)."""
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = workdir / "bootstrap.passwd"
    fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{BOOTSTRAP_USER}:{PASSWORD}\n".encode())
    os.close(fd)
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-U", str(passwd)], check=True, capture_output=True)
    return [f"password_file {passwd}", f"listener {port} 127.0.0.1",
            f"certfile {pki.server.cert}", f"keyfile {pki.server.key}",
            "require_certificate false", "use_identity_as_username false",
            "use_username_as_clientid false"]


@pytest.fixture
def online(tmp_path: Path, platform: Platform) -> Iterator[Online]:
    pki = platform.pki()
    port = free_port()
    broker = start_mosquitto(tmp_path / "mq", pki,
                             extra_conf=bootstrap_conf(tmp_path / "mq", pki, port))
    kit = tmp_path / "kit.pass"  # what the installer's kit holds
    kit.write_text(PASSWORD + "\n")
    kit.chmod(0o600)
    events: list[dict[str, Any]] = []
    service = EnrolmentService(platform.db_url, client_config(broker, pki, ENROL_CN),
                               platform.ca_dir, command_keys=platform.command_keys,
                               on_event=events.append).start()
    try:
        assert service.subscribed.wait(10)
        yield Online(broker, port, kit, pki, service, events)
    finally:
        service.stop()
        broker.stop()


def _claim(platform: Platform, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    assert ingest("ca", "claim", "--db", platform.db_url, "--json", *extra) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    assert isinstance(token, str)
    return token


def test_claim_round_trip_then_the_uplink_connects_with_what_was_installed(
        tmp_path: Path, platform: Platform, online: Online,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    token = _claim(platform, capsys, "--ttl", "15m")
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert online.enrol(a, "-", "--json", "--ca-fingerprint", platform.ca.fingerprint) == 0
    out, err = capsys.readouterr()
    done = json.loads(out)
    assert done["status"] == "installed"
    assert "connecting to 127.0.0.1" in err
    assert "answer received" in err
    assert token not in out + err  # the token is never echoed
    assert online.events[-1]["event"] == "issued"
    assert online.events[-1]["gw"] == "gw-aaaa-0001"
    assert (a.directory / "command-keys.json").exists()
    assert not (a.directory / enrol.PENDING).exists()

    # the gateway's uplink connects to the mTLS listener (CA: the platform's) with the
    # installed certificate, and its enrolment records reach the platform's ingest
    from lab.site import IngestPlatform
    consumer = IngestPlatform(client_config(online.broker, online.pki, PLATFORM_CN), a,
                              platform.db_url, client_id=PLATFORM_CN).start()
    acked = AckedCounter()
    site = Site(tmp_path / "site", a, BrokerConfig(
        "127.0.0.1", online.broker.port, str(a.directory / "ca.crt"),
        str(a.directory / "tls.crt"), str(a.directory / "tls.key")), on_acked=acked)
    site.start()
    try:
        with open_db(platform.db_url) as db:
            wait_for(lambda: "enrol.completed" in report(db, a.gateway_id)["kinds"], 20,
                     "the enrol.completed record at the platform")
            kinds = report(db, a.gateway_id)["kinds"]
    finally:
        site.close(drain_s=1)
        consumer.stop()
    assert acked.count > 0
    assert isinstance(kinds, dict)
    assert kinds["enrol.requested"] == 1


def test_reused_expired_wrong_and_tampered_claims_are_refused_at_both_ends(
        tmp_path: Path, platform: Platform, online: Online,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    b = gateway_identity(tmp_path, "gw-bbbb-0001")

    def attempt(identity: Identity, token: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(token))
        capsys.readouterr()
        rc = online.enrol(identity, "-")
        return rc, capsys.readouterr().err

    token = _claim(platform, capsys)
    assert attempt(a, token)[0] == 0
    rc, err = attempt(b, token)  # reused
    assert rc == 1
    assert "FAILED (claim_used)" in err
    assert "each token enrols one gateway once" in err

    with open_db(platform.db_url) as db:  # made two hours ago, for one hour
        stale = central_ca.new_claim(db, ttl_s=3600,
                                     now=central_ca.now_ms() - 2 * 3600_000).token
    rc, err = attempt(b, stale)
    assert (rc, "FAILED (claim_expired)" in err) == (1, True)
    rc, err = attempt(b, new_claim_token())  # never made by this platform
    assert (rc, "FAILED (claim_unknown)" in err) == (1, True)
    rc, err = attempt(b, "hunter2")  # not even a token: refused before anything is sent
    assert (rc, "not a claim token" in err) == (2, True)

    # a request altered on its way (its CSR swapped after the identity signed it)
    good = json.loads(_request(b, _claim(platform, capsys)))
    good["csr"] = (a.directory / "tls.csr").read_text()
    bootstrap = enrol.Bootstrap("127.0.0.1", online.bootstrap_port, str(online.pki.ca_file),
                                PASSWORD)
    answer = enrol.exchange(bootstrap, good["request_id"], canonical(good), timeout_s=10,
                            progress=lambda _t: None)
    assert json.loads(answer)["reason"] == "bad_signature"

    refused = [e["reason"] for e in online.events if e["event"] == "refused"]
    assert refused == ["claim_used", "claim_expired", "claim_unknown", "bad_signature"]
    assert not (b.directory / "tls.crt").exists()
    failed = [e.details["reason"] for e in entries(b) if e.action == "enrol.failed"]
    assert failed == ["claim_used", "claim_expired", "claim_unknown"]


def _bootstrap_client(online: Online, client_id: str) -> tuple[mqtt.Client, dict[int, str],
                                                                 list[str]]:
    """A client of the bootstrap user (its PUBACK reasons by mid, the topics it received)."""
    pubacks: dict[int, str] = {}
    received: list[str] = []
    ready = threading.Event()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(online.pki.ca_file), cert_reqs=ssl.CERT_REQUIRED)
    client.username_pw_set(BOOTSTRAP_USER, PASSWORD)
    client.on_connect = lambda *_a: ready.set()
    client.on_subscribe = lambda *_a: ready.set()
    client.on_publish = lambda _c, _u, mid, reason, _p: pubacks.__setitem__(mid, str(reason))
    client.on_message = lambda _c, _u, m: received.append(m.topic)
    client.connect("127.0.0.1", online.bootstrap_port)
    client.loop_start()
    assert ready.wait(5)
    ready.clear()
    client.subscribe("smartcorr/v1/#", qos=1)  # it may ask: it receives only its own answer
    assert ready.wait(5)
    return client, pubacks, received


def test_the_bootstrap_user_reaches_nothing_but_its_own_enrolment_topics(
        tmp_path: Path, online: Online) -> None:
    spy, pubacks, received = _bootstrap_client(online, "req-" + "5" * 32)
    try:
        mids = [spy.publish(topic, b"x", qos=1).mid for topic in (
            "smartcorr/v1/gw/gw-aaaa-0001/records",  # as a gateway
            f"smartcorr/v1/gw/{BOOTSTRAP_USER}/status",
            "smartcorr/v1/enrol/req-" + "6" * 32 + "/request")]  # another client's topic
        wait_for(lambda: len(pubacks) == 3, 5, "three PUBACKs")
        assert [pubacks[m] for m in mids] == ["Not authorized"] * 3
        # another installer's request and its answer: the spy sees neither
        a = gateway_identity(tmp_path, "gw-aaaa-0001")
        bootstrap = enrol.Bootstrap("127.0.0.1", online.bootstrap_port,
                                    str(online.pki.ca_file), PASSWORD)
        request = enrol.make(a, claim=new_claim_token(), mode="claim")
        answer = enrol.exchange(bootstrap, request.request_id, request.data, timeout_s=10,
                                progress=lambda _t: None)
        assert json.loads(answer)["reason"] == "claim_unknown"
        assert received == []
    finally:
        spy.disconnect()
        spy.loop_stop()
    wrong = enrol.Bootstrap("127.0.0.1", online.bootstrap_port, str(online.pki.ca_file),
                            "not-the-password")
    with pytest.raises(enrol.EnrolFailed) as refused:
        enrol.exchange(wrong, "req-" + "0" * 32, b"{}", timeout_s=5, progress=lambda _t: None)
    assert refused.value.reason == "bootstrap_refused"


def test_usage_errors_exit_2_with_what_to_do(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a = gateway_identity(tmp_path, "gw-aaaa-0001")
    ident = str(a.directory)
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", ident, "--claim", "-") == 2
    assert "--claim needs --broker HOST:PORT" in capsys.readouterr().err
    assert gw_cli("provision", "enrol", *WHO, "--identity-dir", ident, "--claim", "-",
                  "--bootstrap-password-file", "-") == 2
    assert "both read stdin" in capsys.readouterr().err
    assert gw_cli("provision", "enrol", "--identity-dir", ident, "--request-out",
                  str(tmp_path / "usb")) == 2  # nobody said who acts
    assert "--operator" in capsys.readouterr().err
    assert ingest("ca", "sign", "--ca-dir", str(tmp_path / "none"), "--db",
                  f"sqlite:///{tmp_path / 'x.db'}") == 2
    assert "give the request's directory" in capsys.readouterr().err


def test_the_enrolment_service_runs_from_the_command_line(
        tmp_path: Path, platform: Platform, capsys: pytest.CaptureFixture[str]) -> None:
    pki = platform.pki()
    port = free_port()
    broker = start_mosquitto(tmp_path / "mq", pki,
                             extra_conf=bootstrap_conf(tmp_path / "mq", pki, port))
    certs = tmp_path / "service"
    assert ingest("ca", "issue", "--ca-dir", str(platform.ca_dir), "--db", platform.db_url,
                  "--cn", ENROL_CN, "--out", str(certs)) == 0
    assert stat.S_IMODE((certs / f"{ENROL_CN}.key").stat().st_mode) == 0o600
    proc = subprocess.Popen(
        [sys.executable, "-m", "central", "enrol-service", "--db", platform.db_url,
         "--ca-dir", str(platform.ca_dir), "--broker", f"127.0.0.1:{broker.port}",
         "--ca", str(platform.ca_file), "--cert", str(certs / f"{ENROL_CN}.crt"),
         "--key", str(certs / f"{ENROL_CN}.key"), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "subscribed"
        a = gateway_identity(tmp_path, "gw-aaaa-0001")
        request = enrol.make(a, claim=new_claim_token(), mode="claim")
        answer = enrol.exchange(enrol.Bootstrap("127.0.0.1", port, str(pki.ca_file), PASSWORD),
                                request.request_id, request.data, timeout_s=10,
                                progress=lambda _t: None)
        assert json.loads(answer)["reason"] == "claim_unknown"
        event = json.loads(proc.stdout.readline())
        assert (event["event"], event["reason"]) == ("refused", "claim_unknown")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert json.loads(proc.stdout.readline())["stats"] == {"refused.claim_unknown": 1}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        broker.stop()
