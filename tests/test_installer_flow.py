"""The installer's flow end to end (issue 12's required test): ``lab.installer_flow`` run once,
its outcome checked step by step, not only its exit statuses.

The flow (lab/installer_flow.py) drives everything through the command lines, each in a
process of its own: ``ingest ca init``, the command root, key and export, a real
mosquitto (mTLS, the production ACL, the bootstrap listener, the CRL), ``ingest
enrol-service`` and ``ingest consume`` on SQLite; gateway A enrolled by claim, gateway B
by USB stick after the token A used is refused; tag simulators on ptys paired by
``provision pair-tag``; ``provision check``; ``gateway.py run``; ``provision renew``;
``ingest ca revoke`` + ``ingest ca crl`` + SIGHUP; ``provision decommission``.

Also required by the issue, and proved here or elsewhere (not duplicated):

* a wrong CN, a mismatched key, an expired certificate and a wrong CA each give their one
  line within 5 s while readings are still committed:
  :func:`test_a_bad_certificate_or_ca_is_said_within_5_s_while_readings_are_committed`
  below, with the uplink's production timing (``tests/test_uplink_failures.py`` proves one
  line, not ten, and the record, but with the file check scaled down to 20 ms and no bound
  on when the line comes: its waits allow 15 s);
* a claim token used twice is refused: in the flow (B with A's token, ``claim_used``), and
  at both ends with expired, unknown and tampered ones in
  ``tests/test_enrolment.py::test_reused_expired_wrong_and_tampered_claims_are_refused_at_both_ends``
  and ``::test_a_lost_answer_is_answered_again_and_a_token_enrols_once``;
* a command key not certified by the root is refused: in the flow (a command signed by a
  key of another root, sent with the platform's own publisher certificate: ``command.rejected``
  ``unknown_key``, while the certified key's command is applied); the keyring's side in
  ``tests/test_command_keys.py::test_a_certificate_signed_by_a_command_key_is_refused`` (a
  certificate signed by a command key naming itself: ``wrong_root``; naming the root:
  ``bad_signature``) and ``::test_every_altered_document_is_refused``; every refusal reason
  over MQTT in ``tests/test_commands.py::test_each_bad_command_is_refused_with_its_reason_record``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.assembly import Gateway
from buffer.store import store_path
from core.mqtt import BrokerConfig
from lab.installer_flow import GW_A, GW_B, FlowError, Transcript, run_flow
from lab.mosquitto import Mosquitto, Pki, make_pki
from lab.simulators.tag import SimTag
from lab.site import Site
from provisioning.identity import Identity, create_identity
from provisioning.pki import CertFiles
from tests.helpers import wait_for
from tests.test_uplink_failures import _bad_files

pytestmark = [
    pytest.mark.slow,
    # the whole flow runs in the module's fixture: 54 s on a quiet machine of 2 cores,
    # 121-134 s under a load of 7, past the suite's 120 s bound
    pytest.mark.timeout(420),
    # paho leaks the socket of a failed TLS handshake; it is collected within the test
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"),
]
#: The issue's bound: a certificate problem is said within this many seconds.
SAID_WITHIN_S = 5.0
KEYS = ("signing.key", "storage.key", "tls.key", "tags.json")


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Transcript:
    """The flow, run once for the module's tests."""
    try:
        return run_flow(tmp_path_factory.mktemp("installer-flow"))
    except FlowError as exc:
        return exc.transcript


def test_the_flow_runs_to_its_end_with_every_check_passed(flow: Transcript) -> None:
    assert flow.error is None, flow.markdown()
    assert [c.what for c in flow.checks if not c.ok] == []
    assert len(flow.checks) >= 30
    text = flow.markdown()
    assert "```console\n$ ingest ca init" in text
    assert "$ python gateway.py provision enrol" in text
    assert text.count(str(flow.root)) == 1  # said once; $FLOW stands for it elsewhere


def test_no_secret_on_a_command_line_or_in_an_output(flow: Transcript) -> None:
    claim = [s for s in flow.steps if "--claim -" in s.command]
    assert len(claim) == 2  # the token from stdin, both times
    assert all(s.stdin and "token" in s.stdin for s in claim)
    root = flow.root
    secrets = {
        "the claim token": (root / "platform" / "claim-1.token").read_text().strip(),
        "the bootstrap password": (root / "kit" / "bootstrap.pass").read_text().strip(),
        "A's tag key": (root / GW_A / "tag-T00001000.key").read_text().strip(),
        "B's tag key": (root / GW_B / "tag-T00002000.key").read_text().strip(),
    }
    shown = flow.markdown()
    for what, secret in secrets.items():
        assert len(secret) >= 16, what
        assert secret not in shown, what
        assert all(secret not in s.stdout + s.stderr for s in flow.steps), what


def test_a_enrolled_online_and_its_records_are_verified_at_the_platform(
        flow: Transcript) -> None:
    rep: dict[str, Any] = flow.facts["a.report_running"]
    assert rep["status"] == "active"
    assert rep["records"] >= 9  # its start, enrolment, pairing, and a presence interval
    assert rep["stored_ranges"] == [[1, rep["highest_seq"]]]  # every record, in one run
    assert (rep["gaps_unexplained"], rep["chain_breaks"], rep["quarantined"]) == ([], [], {})
    assert rep["kinds"]["tag.interval"] >= 1  # the paired tag's beacons, through its receiver
    assert rep["kinds"]["enrol.completed"] == 1
    enrolled = flow.step(f"{GW_A}: enrol by claim")
    assert "provision enrol: answer received" in enrolled.stderr
    assert flow.facts["a.serial_enrolled"] in enrolled.stdout


def test_a_token_used_twice_is_refused_and_b_enrols_offline(flow: Transcript) -> None:
    refused = flow.step(f"{GW_B}: the token already used is refused")
    assert refused.returncode == 1
    assert "FAILED (claim_used)" in refused.stderr
    assert f"by {GW_A}" in refused.stderr
    signed = flow.step(f"{GW_B}: answer the request")
    assert f"gateway {GW_B}" in signed.stdout
    assert flow.facts["b.serial"] in signed.stdout
    rep: dict[str, Any] = flow.facts["b.report_running"]
    assert rep["records"] > 0
    assert rep["kinds"]["enrol.failed"] == 1  # the refused claim is a record too


def test_renewal_changed_the_serial_and_records_kept_arriving(flow: Transcript) -> None:
    before, after = flow.facts["a.serial_enrolled"], flow.facts["a.serial_renewed"]
    assert before != after
    renewed = flow.step(f"{GW_A}: renew the certificate now")
    assert "renewed by the running gateway" in renewed.stdout
    assert after in renewed.stdout
    assert "provision renew: the gateway is running: asked it to renew now" in renewed.stderr
    # the uplink took the new files at once (the renewal tells it), not at its next
    # 15-second look: reconnected once they stayed still for 2 s
    assert flow.facts["a.reconnect_after_renewal_s"] <= 6
    at_reconnect, later = flow.facts["a.records_after_renewal"]
    assert later > at_reconnect
    kinds = flow.facts["a.report_final"]["kinds"]
    assert (kinds["cert.renewal_requested"], kinds["cert.renewed"]) == (1, 1)


def test_a_command_key_the_root_did_not_certify_is_refused(flow: Transcript) -> None:
    applied = flow.step(f"{GW_A}: a signed command")
    assert applied.returncode == 0
    assert f"applied by {GW_A}" in applied.stdout
    refused = flow.step(f"{GW_A}: a command signed by a key the root did not certify")
    assert refused.returncode == 1
    assert f"REFUSED by {GW_A}: unknown_key" in refused.stdout
    kinds = flow.facts["a.report_final"]["kinds"]  # both answers are records of A's chain
    # the set-authorisation of its tag, then the set-config; the forged one
    assert (kinds["command.applied"], kinds["command.rejected"]) == (2, 1)


def test_revoked_b_is_refused_at_tls_quarantined_and_keeps_recording(
        flow: Transcript) -> None:
    assert flow.facts["b.tls_refused"] is True  # mosquitto: certificate verify failed
    assert "certificate revoked" in flow.facts["b.refused_line"]
    assert "refused this gateway's certificate" in flow.facts["b.refused_line"]
    rep: dict[str, Any] = flow.facts["b.report_revoked"]
    assert rep["status"] == "revoked"
    assert rep["quarantined"]["revoked"] > 0  # sent on its open connection after revoke
    assert rep["records"] >= flow.facts["b.report_running"]["records"]  # stored before: kept
    first, second = flow.facts["b.records_while_refused"]
    assert second["sealed"] > first["sealed"]  # readings committed while refused
    assert second["forwarded"] == 0
    restarted = flow.step(f"{GW_B}: the gateway after its restart")
    assert " 0 forwarded" in restarted.stderr  # its stop line: nothing left the unit


def test_decommission_a_final_record_at_the_platform_then_keys_gone(
        flow: Transcript) -> None:
    final = flow.facts["a.final_seq"]
    rep: dict[str, Any] = flow.facts["a.report_final"]
    assert rep["final_seq"] == final == rep["highest_seq"]
    assert rep["kinds"]["gateway.decommissioned"] == 1
    assert rep["stored_ranges"] == [[1, final]]  # everything before it, too
    assert flow.facts["a.identity_left"] == ["decommissioned.json"]
    assert not any((flow.root / GW_A / "identity" / k).exists() for k in KEYS)
    assert not store_path(flow.root / GW_A / "data").exists()
    daemon = flow.step(f"{GW_A}: start the gateway")
    assert daemon.returncode == 3  # it stopped by itself once everything was delivered


def test_decommission_b_forced_keys_gone_platform_not_told(flow: Transcript) -> None:
    forced = flow.step(f"{GW_B}: decommission it anyway")
    assert "forced: not everything was delivered" in forced.stdout
    assert "the platform was NOT told" in forced.stderr
    assert flow.facts["b.identity_left"] == ["decommissioned.json"]
    assert not any((flow.root / GW_B / "identity" / k).exists() for k in KEYS)
    # the platform's operator does what the warning says; revoked, B stays revoked (its
    # records refused either way), and the command says so
    told = flow.step(f"{GW_B}: the platform's side")
    assert told.stdout.strip() == f"gw={GW_B} status=revoked"
    assert flow.facts["b.report_final"]["status"] == "revoked"


# --- a bad certificate, key or CA: said within 5 s, recording goes on -----------------------

@pytest.fixture
def site(tmp_path: Path) -> Iterator[Callable[[Identity, BrokerConfig], tuple[Site, Any]]]:
    sites: list[Site] = []

    def start(identity: Identity, broker: BrokerConfig) -> tuple[Site, Any]:
        workdir = tmp_path / identity.gateway_id
        workdir.mkdir()
        s = Site(workdir, identity, broker)
        sim = s.tag_receiver([SimTag(0x1000, bytes(range(16)))], "TR-FLOW-0001")
        sites.append(s)
        return s, sim

    yield start
    for s in sites:
        s.close(drain_s=0)


def _bad(kind: str, pki: Pki, tmp_path: Path, gw: str) -> tuple[CertFiles, Path | None]:
    if kind == "wrong_ca":  # the gateway's own good files, but another CA as ca_file
        return pki.client(gw), make_pki(tmp_path / "rogue").ca_file
    return _bad_files(kind, pki, tmp_path / "tls", gw)


@pytest.mark.parametrize(("kind", "says"), [
    ("cn_mismatch", "is for 'gw-other-0002'"),
    ("key_mismatch", "does not belong to the certificate"),
    ("expired", "expired on"),
    ("ca_not_ca", "holds no CA certificate"),
    ("wrong_ca", "is not trusted"),
])
def test_a_bad_certificate_or_ca_is_said_within_5_s_while_readings_are_committed(
        kind: str, says: str, tmp_path: Path, pki: Pki, *, mosquitto: Mosquitto,
        site: Callable[[Identity, BrokerConfig], tuple[Site, Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    """The uplink's production timing (its files checked at start, then every 15 s)."""
    caplog.set_level(logging.INFO)
    identity = create_identity(tmp_path / "identity", "gw-flow-0001")
    files, ca_file = _bad(kind, pki, tmp_path, identity.gateway_id)
    broker = BrokerConfig("127.0.0.1", mosquitto.port, str(ca_file or pki.ca_file),
                          str(files.cert), str(files.key))
    s, sim = site(identity, broker)
    started = time.time()
    gateway: Gateway = s.start()

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "uplink.forwarder"
                and r.levelno == logging.ERROR and says in r.getMessage()]

    wait_for(lambda: said() != [], 2 * SAID_WITHIN_S, f"the {kind} line")
    [line] = said()  # one line, said at once
    assert line.created - started <= SAID_WITHIN_S, line.created - started
    # the tag keeps beaconing: every beacon is still committed (its presence interval's
    # ledger entries: the tag's counter moves)
    key = f"tag:{sim.tags[0].tag}"
    committed = gateway.writer.ledger_value(key) or 0
    for _ in range(10):
        sim.send_beacon()
    wait_for(lambda: (gateway.writer.ledger_value(key) or 0) >= committed + 10, 10,
             "ten readings committed after the line")
    assert not gateway.forwarder.stats.connected
    assert gateway.forwarder.stats.records_acked == 0
    assert len(said()) == 1
