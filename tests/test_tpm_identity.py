"""The hardware-rooted identity end to end, on a software TPM (swtpm) and a real mosquitto:
records signed by a session key that a TPM-held identity certified verify at the
platform, in both suites; a copy of the identity and data directories on another machine
(another TPM) can neither sign as the gateway nor decrypt its store (docs/threat-model.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from buffer.store import store_path
from core.record import Timestamp
from core.topics import PLATFORM_CN
from lab.acked import AckedCounter
from lab.chains import Chain
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.simulators.tag import SimTag
from lab.site import Platform, Site, registrations
from lab.swtpm import Swtpm
from provisioning.identity import (
    TPM_ENV,
    Identity,
    create_identity,
    load_identity,
)
from provisioning.tpm import TpmError
from tests.helpers import plaintext_config, stored_records, wait_for


def tpm_identity(tmp_path: Path, tpm: Swtpm, suite: str = "ed25519") -> Identity:
    return create_identity(tmp_path / "identity", "gw-tpm-0001", suite_name=suite,
                           tpm=tpm.tcti)


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["ed25519", "sm"])
def test_records_certified_by_a_tpm_identity_verify_at_the_platform(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, swtpm: Swtpm, suite: str
) -> None:
    identity = tpm_identity(tmp_path, swtpm, suite)
    assert identity.key_class == "tpm"
    assert identity.storage_class == "tpm"
    assert identity.key.alg == ("ecdsa-p256-sha256" if suite == "ed25519" else "sm2-sm3")
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    acked = AckedCounter()
    site = Site(tmp_path, identity, client_config(mosquitto, pki, identity.gateway_id),
                on_acked=acked)
    tags = [SimTag(0x2000 + i, bytes([i + 7]) * 16) for i in range(2)]
    sim = site.tag_receiver(tags, "TR-TPM-0001")
    site.start()
    try:
        for i in range(40):
            sim.send_beacon(tags[i % 2])
        wait_for(lambda: len(sim.acked()) == 40, 30, "the gateway to ack every beacon")
    finally:
        assert site.close(drain_s=15)
    wait_for(lambda: platform.summary()["received"] >= acked.count, 15, "the verifier")
    platform.stop()
    summary = platform.summary()
    assert summary["received"] == summary["verified"] == acked.count
    assert summary["bad_signature"] == summary["forged_certificate"] == 0
    assert summary["chain_gaps"] == 0
    arrived = platform.arrived
    session = next(r for r in arrived if r.kind == "key.session")
    cert = session.record["body"]["cert"]
    assert cert["identity"] == {"kid": identity.kid, "alg": identity.key.alg, "class": "tpm"}
    assert cert["alg"] == identity.suite.alg
    assert {r.record["alg"] for r in arrived} == {identity.suite.alg}
    assert {r.key_class for r in arrived} == {"tpm"}  # every record says what signed it
    # the 40 beacons: one presence interval per tag, sealed at the clean stop
    assert sorted(r.record["body"]["beacons"] for r in arrived if r.kind == "tag.interval") \
        == [20, 20]


def _stored(identity: Identity, data_dir: Path) -> list[bytes]:
    return stored_records(store_path(data_dir), identity.storage_key)


def test_a_copied_card_on_another_tpm_neither_signs_nor_decrypts(
    tmp_path: Path, swtpm_factory: Callable[[str], Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = swtpm_factory("home-tpm")
    identity = tpm_identity(tmp_path / "home", home)
    site_dir = tmp_path / "home"
    from app.assembly import Gateway
    from app.config import Config
    from lab.site import NOWHERE

    gateway = Gateway(Config(site_dir / "data", NOWHERE), identity)
    gateway.start()
    assert gateway.writer.flush()
    gateway.stop(drain_s=0.1)
    stored = _stored(identity, site_dir / "data")
    assert stored
    identity.close()
    home.stop()  # the box is off; its card is copied to another machine with another TPM
    copy = tmp_path / "copy"
    shutil.copytree(site_dir, copy)
    other = swtpm_factory("other-tpm")
    monkeypatch.setenv(TPM_ENV, other.tcti)
    with pytest.raises(TpmError, match="made by another TPM"):
        load_identity(copy / "identity")
    # the storage key is nowhere on the card in the clear: the sealed blob is all there is
    sealed = (copy / "identity" / "storage.key").read_bytes()
    assert identity.storage_key not in sealed
    on_card = b"".join(p.read_bytes() for p in copy.rglob("*") if p.is_file())
    assert identity.storage_key not in on_card
    # and the store's rows are ciphertext (a record's canonical text is not on the card)
    assert b'"kind":"gateway.boot"' not in on_card
    assert b"key.session" not in on_card


def test_the_tpm_identity_survives_a_restart_of_the_tpm_and_the_gateway(
    tmp_path: Path, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = tpm_identity(tmp_path, swtpm, "sm")
    kid, storage = identity.kid, identity.storage_key
    identity.close()
    swtpm.stop()
    swtpm.start()  # a power cycle: same TPM, same state (on another loopback port)
    monkeypatch.setenv(TPM_ENV, swtpm.tcti)
    again = load_identity(tmp_path / "identity")
    assert again.kid == kid
    assert again.storage_key == storage
    chain = Chain(gateway_id=again.gateway_id, suite="sm", identity=None)
    ts = Timestamp(1_760_000_000_000, "ntp", 5)
    record = chain.start_session(ts, certifier=again.key, identity_class="tpm")
    from central.verifier import Verifier

    v = Verifier(registrations(again))
    v.ingest(record.data)
    assert v.summary()["verified"] == 1
    again.close()


def test_signing_pub_is_the_registration_the_platform_needs(
    tmp_path: Path, swtpm: Swtpm
) -> None:
    identity = tpm_identity(tmp_path, swtpm)
    reg = json.loads((identity.directory / "signing.pub").read_text())
    assert reg == identity.registration()
    assert reg["class"] == "tpm"
    assert reg["alg"] == "ecdsa-p256-sha256"
    assert (identity.directory / "signing.pub").stat().st_mode & 0o777 == 0o644
    assert (identity.directory / "storage.key").stat().st_mode & 0o777 == 0o600
    identity.close()


def test_an_unreachable_tpm_is_a_clear_error(tmp_path: Path, swtpm: Swtpm) -> None:
    identity = tpm_identity(tmp_path, swtpm)
    identity.close()
    swtpm.stop()
    with pytest.raises(TpmError, match="no TPM answers"):
        load_identity(tmp_path / "identity")


def test_without_a_tpm_the_key_class_is_file_and_check_warns(tmp_path: Path) -> None:
    identity = create_identity(tmp_path / "identity", "gw-file-0001")
    assert identity.key_class == "file"
    assert identity.storage_class == "file"
    from app.config import Config
    from app.diag import keys_report
    from lab.site import NOWHERE

    report = keys_report(Config(tmp_path / "data", NOWHERE,
                                identity_dir=identity.directory))
    assert report["key_class"] == "file"
    assert any("no TPM" in w for w in report["warnings"])
    shutil.rmtree(tmp_path / "identity")


def _config(tmp_path: Path, identity: Identity) -> Path:
    return plaintext_config(tmp_path, identity.directory)


def _check(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The keys report (``provision check``'s identity line is made from it)."""
    return subprocess.run([sys.executable, "gateway.py", "diag", "keys", "--config",
                           str(cfg), "--json"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parents[1], env=env, timeout=60)


def test_provision_check_warns_about_a_key_file_and_not_about_a_tpm(
    tmp_path: Path, swtpm: Swtpm
) -> None:
    filed = create_identity(tmp_path / "file" / "identity", "gw-file-0001")
    done = _check(_config(tmp_path / "file", filed))
    assert done.returncode == 0, done.stderr
    assert any(w.startswith("the identity key is a file")
               for w in json.loads(done.stdout)["warnings"])
    assert json.loads(done.stdout)["key_class"] == "file"
    held = tpm_identity(tmp_path / "tpm", swtpm)
    held.close()
    done = _check(_config(tmp_path / "tpm", held))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not any("no TPM" in w for w in report["warnings"])
    assert (report["key_class"], report["storage_class"]) == ("tpm", "tpm")
