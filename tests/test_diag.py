"""Technicians' diagnostics: useful, machine-readable, and free of secrets and personal data."""

from __future__ import annotations

import gzip
import json
import struct
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
    sealer = store.sealer(ident.gateway_id, ident.session_key())
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
[gnss]
path = "/dev/ttyACM0"
# the house on the corner: 46.8123, -71.2145
installed_lat = 46.8123
installed_lon = -71.2145
""")
    return cfg


#: The installed position of setup(), and every textual form it could take.
HOME = (46.8123, -71.2145)


def position_forms() -> list[bytes]:
    forms: list[bytes] = []
    for value in HOME:
        e7 = round(value * 1e7)
        for text in (f"{abs(value):.4f}", f"{abs(value):.4f}".replace(".", ","),  # 46.8123
                     f"{abs(value):.3f}", repr(value), str(abs(e7)), str(abs(e7))[:6],
                     f"{abs(value) * 1e7:.1f}"):
            forms += [text.encode(), text.encode("utf-16-le")]
        forms += [struct.pack(fmt, value) for fmt in ("<d", ">d", "<f", ">f")]
        forms += [struct.pack(fmt, e7) for fmt in ("<i", ">i")]
    return forms


def test_the_bundle_holds_no_installed_position_in_any_form(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    out = tmp_path / "bundle.tar.gz"
    assert diag("bundle", "--config", cfg, "--out", str(out)).returncode == 0
    compressed = out.read_bytes()
    blobs = [compressed, gzip.decompress(compressed)]  # the tar stream: headers and members
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    blobs += members.values()
    for form in position_forms():
        for blob in blobs:
            assert form not in blob, f"{form!r} is in the bundle"
    config = json.loads(members["gateway.json"])
    assert config["gnss"]["installed_lat"] == "<redacted: personal data>"
    assert config["gnss"]["path"] == "/dev/ttyACM0"  # the rest is there for the technician
    assert out.stat().st_mode & 0o077 == 0


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
                "--include-personal", "--operator", "Tom Technician").returncode == 0
    with tarfile.open(personal) as tar:
        names = tar.getnames()
        records = tar.extractfile("records.ndjson").read()  # type: ignore[union-attr]
    assert "records.ndjson" in names
    assert b"T0000CAFE" in records
