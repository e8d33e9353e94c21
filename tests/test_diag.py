"""Technicians' diagnostics: useful, machine-readable, and free of secrets and personal data."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from buffer.store import Store, store_path
from core.clock import Clock
from core.record import Reading, Source
from provisioning.identity import create_identity
from provisioning.registry import open_registry

REPO = Path(__file__).resolve().parents[1]


def setup(tmp_path: Path) -> Path:
    ident = create_identity(tmp_path / "identity", "gw-diag-0001")
    registry = open_registry(ident)
    registry.pair("T0000CAFE", bytes(range(16)))
    registry.close()
    (tmp_path / "data").mkdir()
    store = Store(store_path(tmp_path / "data"), ident.storage_key)
    sealer = store.sealer(ident.gateway_id, ident.signing_key)
    store.commit([sealer.seal(Reading("tag.presence", Source("tag_receiver", "TR-1"),
                                      {"tag": "T0000CAFE", "lat_e7": 468123456}, 1),
                              Clock().timestamp(time.monotonic_ns()))])
    store.close()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{tmp_path / 'identity'}"
data_dir = "{tmp_path / 'data'}"
[broker]
host = "127.0.0.1"
tls = false
insecure_plaintext = true
[[devices]]
name = "tags"
kind = "tag_receiver"
path = "/dev/serial/by-id/usb-nothing-here"
""")
    return cfg


def diag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), "diag", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_buffer_keys_ports_reports(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    buf = json.loads(diag("buffer", "--config", cfg, "--json").stdout)
    assert buf["classes"]["position"]["queued"] == 1
    assert buf["integrity"] == "ok"
    assert buf["last_seq"] == 1
    keys = json.loads(diag("keys", "--config", cfg, "--json").stdout)
    assert keys["gateway_id"] == "gw-diag-0001"
    assert keys["paired_tags"] == 1
    assert keys["ok"] is True
    ports = json.loads(diag("ports", "--config", cfg, "--json").stdout)
    assert ports["tags"]["exists"] is False
    assert "by-id" in ports["tags"]["hint"]
    human = diag("buffer", "--config", cfg)
    assert "position:" in human.stdout


def test_the_bundle_holds_no_secret_and_no_personal_data_unless_asked(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    secrets = [(tmp_path / "identity" / "storage.key").read_bytes(),
               (tmp_path / "identity" / "signing.key").read_bytes(), bytes(range(16))]
    plain = tmp_path / "plain.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(plain)).returncode == 0
    with tarfile.open(plain) as tar:
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers())  # type: ignore[union-attr]
    assert b"T0000CAFE" not in blob
    assert b"468123456" not in blob
    assert all(s not in blob and s.hex().encode() not in blob for s in secrets)
    personal = tmp_path / "personal.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(personal),
                "--include-personal").returncode == 0
    with tarfile.open(personal) as tar:
        names = tar.getnames()
        records = tar.extractfile("records.ndjson").read()  # type: ignore[union-attr]
    assert "records.ndjson" in names
    assert b"T0000CAFE" in records
