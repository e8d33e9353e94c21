"""provision decommission (issue 12, item 5): the final record reaches the broker, then the
keys are gone; with no broker the command says so and keeps them.

A real mosquitto (mTLS) with the platform's verifier on it, the real daemon in a process
of its own, a real software TPM (swtpm)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import gateway
from buffer.store import Store, store_path, undelivered
from buffer.writer import FINAL_LEDGER_KEY, StoreWriter
from core.clock import Clock
from core.record import Reading, Source
from core.topics import PLATFORM_CN
from lab.mosquitto import Mosquitto, Pki, client_config, free_port
from lab.site import Platform
from lab.swtpm import Swtpm
from provisioning import operator as operators
from provisioning.decommission import TOMBSTONE
from provisioning.identity import Identity, create_identity, load_identity
from provisioning.kiosks import open_kiosks
from provisioning.registry import open_registry
from provisioning.tpm import KeyBlob, TpmError, open_tpm
from tests.helpers import plaintext_config, wait_for

REPO = Path(__file__).resolve().parents[1]
WHO = ("--operator", "Ann Installer")
SECRETS = ("signing.key", "storage.key", "tags.json", "kiosks.json", "actions.journal",
           "gateway.json")


@pytest.fixture(autouse=True)
def _no_ambient_operator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(operators.OPERATOR_FILE_ENV, raising=False)
    monkeypatch.setattr(operators, "DEFAULT_OPERATOR_FILE", tmp_path / "no-operator.json")


def tls_config(tmp_path: Path, identity: Identity, broker: Mosquitto, pki: Pki) -> Path:
    files = pki.client(identity.gateway_id)  # this test's own gateway id: its own key file
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nidentity_dir = "{identity.directory}"\n'
                   f'data_dir = "{tmp_path / "data"}"\n'
                   f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
                   f'ca_file = "{pki.ca_file}"\ncert_file = "{files.cert}"\n'
                   f'key_file = "{files.key}"\n')
    return cfg


def pair_devices(identity: Identity) -> None:
    registry = open_registry(identity)
    registry.pair("0x1000", bytes(range(16)))
    registry.close()
    kiosks = open_kiosks(identity)
    kiosks.pair("KI-0001", bytes(range(16, 32)))
    kiosks.close()


def decommission(capsys: pytest.CaptureFixture[str], cfg: Path,
                 *extra: str) -> tuple[int, dict[str, Any], str]:
    code = gateway.main(["provision", "decommission", "--config", str(cfg), *WHO, "--json",
                         *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def daemon(cfg: Path) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    return proc, lines, reader


def final_of(platform: Platform) -> Any:
    finals = [r for r in platform.arrived if r.kind == "gateway.decommissioned"]
    assert len(finals) == 1
    return finals[0]


@pytest.mark.slow
def test_with_the_daemon_running_the_final_record_arrives_then_the_keys_go(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, capsys: pytest.CaptureFixture[str],
) -> None:
    identity = create_identity(tmp_path / "identity", "gw-decom-0001")
    pair_devices(identity)
    cfg = tls_config(tmp_path, identity, mosquitto, pki)
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    proc, lines, reader = daemon(cfg)
    try:
        wait_for(lambda: any("running" in line for line in lines), 30, "the daemon running")
        code, report, err = decommission(capsys, cfg, "--yes", "--timeout", "60")
        assert code == 0, err
        assert proc.wait(30) == 3  # it stopped by itself, and systemd leaves it stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert any("decommissioned" in line for line in lines)  # the daemon said why it stopped
    assert "the gateway daemon (process" in err  # it said who seals the final record
    assert "record(s) to deliver" in err or "delivered" in err
    assert report["daemon"] is True
    assert (report["delivered"], report["platform_told"]) == (True, True)
    assert (report["destroyed"], report["forced"]) == (True, False)
    assert report["tpm"] is None  # keys in files: nothing to clear
    wait_for(lambda: any(r.kind == "gateway.decommissioned" for r in platform.arrived), 15,
             "the final record at the platform")
    platform.stop()
    final = final_of(platform)
    assert final.seq == report["final_seq"]
    assert final.seq == max(r.seq for r in platform.arrived)  # the last record of the chain
    assert final.record["prio"] == "alarm"
    assert final.record["body"]["operator"]["name"] == "Ann Installer"
    assert platform.summary()["chain_gaps"] == 0
    assert platform.summary()["bad_signature"] == 0
    for name in SECRETS:
        assert not (identity.directory / name).exists(), name
    assert not store_path(tmp_path / "data").exists()
    assert not (pki.directory / f"{identity.gateway_id}.key").exists()  # the TLS key too
    tomb = json.loads((identity.directory / TOMBSTONE).read_text())
    assert tomb["state"] == "destroyed"
    assert tomb["gateway_id"] == "gw-decom-0001"
    assert tomb["platform_told"] is True
    # the daemon started again says so and is not restarted (status 3)
    again = subprocess.run([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                            str(cfg)], capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 3
    assert "gw-decom-0001 was decommissioned" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_a_tpm_identity_is_destroyed_in_the_tpm_too(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, swtpm: Swtpm,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The daemon is stopped: the command runs the uplink itself. Afterwards a copy of the
    key files made before (a copied card) no longer loads in the TPM."""
    identity = create_identity(tmp_path / "identity", "gw-decom-0002", tpm=swtpm.tcti)
    copy = (identity.directory / "signing.key").read_bytes()
    identity.close()  # a swtpm serves one connection: the command's
    cfg = tls_config(tmp_path, identity, mosquitto, pki)
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    code, report, err = decommission(capsys, cfg, "--yes", "--timeout", "60")
    assert code == 0, err
    assert report["daemon"] is False
    assert report["delivered"] is True
    assert report["tpm"] == "cleared"
    wait_for(lambda: any(r.kind == "gateway.decommissioned" for r in platform.arrived), 15,
             "the final record at the platform")
    platform.stop()
    kinds = [r.kind for r in sorted(platform.arrived, key=lambda r: r.seq)]
    assert kinds[0] == "key.session"  # certified by the TPM-held identity key
    assert kinds[-1] == "gateway.decommissioned"
    for name in SECRETS:
        assert not (identity.directory / name).exists(), name
    with open_tpm(swtpm.tcti) as tpm, pytest.raises(TpmError, match="another TPM"):
        tpm.load_signing_key(KeyBlob.from_json(copy))


@pytest.mark.slow
def test_with_no_broker_it_fails_and_keeps_the_keys_then_force_destroys(
    tmp_path: Path, identity: Identity, capsys: pytest.CaptureFixture[str],
) -> None:
    pair_devices(identity)
    cfg = plaintext_config(tmp_path, identity.directory, port=free_port())  # nobody there
    code, report, err = decommission(capsys, cfg, "--yes", "--timeout", "1")
    assert code == 1
    assert report["destroyed"] is False
    assert (report["delivered"], report["platform_told"]) == (False, False)
    assert "not delivered within 1 s" in err
    assert "the broker did not acknowledge the final record" in err
    assert "The keys are kept" in err
    assert "--force" in err
    assert "Traceback" not in err
    kept = load_identity(identity.directory)  # the keys, and what they protect, are intact
    try:
        assert kept.kid == identity.kid
        assert open_registry(kept).get("T00001000") is not None
    finally:
        kept.close()
    assert not (identity.directory / TOMBSTONE).exists()
    store = store_path(tmp_path / "data")
    assert undelivered(store).last_seq == report["final_seq"]  # the final record is last
    # the final record waits in the store; nothing is sealed after it, and a second run
    # writes nothing more down: it waits for the same record
    code, again, err = decommission(capsys, cfg, "--yes", "--timeout", "0.5")
    assert code == 1
    assert again["final_seq"] == report["final_seq"]
    assert "already sealed" in err
    assert undelivered(store).last_seq == report["final_seq"]  # still nothing after it
    code, forced, err = decommission(capsys, cfg, "--yes", "--timeout", "0.5", "--force")
    assert code == 0, err
    assert (forced["destroyed"], forced["forced"]) == (True, True)
    assert forced["platform_told"] is False
    assert "the platform was NOT told" in err
    for name in SECRETS:
        assert not (identity.directory / name).exists(), name
    tomb = json.loads((identity.directory / TOMBSTONE).read_text())
    assert (tomb["state"], tomb["forced"], tomb["platform_told"]) == ("destroyed", True, False)
    code, _, err = decommission(capsys, cfg, "--yes")
    assert code == 2
    assert "nothing to decommission" in err


def test_it_asks_for_confirmation_and_an_operator(
    tmp_path: Path, identity: Identity, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = plaintext_config(tmp_path, identity.directory, port=free_port())
    monkeypatch.setattr(sys, "stdin", io.StringIO("gw-test-0001\n"))  # not a terminal
    code, _, err = decommission(capsys, cfg)
    assert code == 2
    assert "cannot be undone: confirm on a terminal, or give --yes" in err
    code = gateway.main(["provision", "decommission", "--config", str(cfg), "--yes"])
    assert code == 2
    assert "--operator" in capsys.readouterr().err
    assert not (identity.directory / "actions.journal").exists()  # nothing written down
    assert (identity.directory / "signing.key").exists()
    code, _, err = decommission(capsys, cfg, "--yes", "--timeout", "0")
    assert code == 2
    assert "--timeout must be more than 0" in err


def test_nothing_is_sealed_after_the_final_record_not_even_after_a_restart(
    tmp_path: Path, identity: Identity,
) -> None:
    source = Source("gateway", identity.gateway_id)
    path = tmp_path / "records.db"

    def writer_on(store: Store) -> StoreWriter:
        writer = StoreWriter(store, store.sealer(identity.gateway_id, identity.session_key()),
                             Clock(), source=source)
        writer.start()
        return writer

    store = Store(path, identity.storage_key)
    writer = writer_on(store)
    try:
        writer.submit(Reading("gateway.boot", source, {}, 0))
        writer.submit_final(Reading("gateway.decommissioned", source, {}, 0))
        writer.submit(Reading("tag.presence", source, {"tag": "T00001000"}, 0))
        writer.submit_health(lambda: {})
        assert writer.flush()
        assert writer.final_seq == 2
        assert writer.last_seq == 2
        assert writer.stats.after_final == 2  # the beacon and the health record: refused
        assert writer.backlog == 0
        writer.delete_range(0, 1, 2, 1)  # deletions go on: the broker acknowledged
        assert writer.flush()
        assert writer.stats.deleted == 1
    finally:
        writer.stop()
        store.close()
    store = Store(path, identity.storage_key)  # the next start
    writer = writer_on(store)
    try:
        writer.submit(Reading("gateway.boot", source, {}, 0))
        assert writer.flush()
        assert writer.final_seq == 2
        assert writer.last_seq == 2
        assert writer.stats.after_final == 1
        assert writer.ledger_value(FINAL_LEDGER_KEY) == 2
    finally:
        writer.stop()
        store.close()
    assert undelivered(path, ledger_key=FINAL_LEDGER_KEY).ledger == 2
