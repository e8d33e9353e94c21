"""``request-diag`` (core/diag_transfer.py, app/diag_command.py, central/diag_command.py,
docs/commands.md): the platform asks a gateway for its redacted bundle, which comes back
in chunks over a real mosquitto (mTLS, the production ACL) and is written only once it
reassembles into the SHA-256 the gateway's signed ``command.applied`` record names."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from app import diag_command
from app.assembly import Gateway
from central.diag_command import DiagListener, wait_chunks
from core.commands import BodyError, sign_command, validate_body
from core.diag_transfer import (
    CHUNK_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_CHUNKS,
    ChunkError,
    Reassembly,
    chunks_of,
    parse_chunk,
)
from core.record import canonical
from core.topics import COMMAND_CN, diag_topic
from lab.mosquitto import client_config
from provisioning.registry import open_registry
from tests.helpers import wait_for
from tests.test_commands import GW, OTHER, Lab, mqtt_client, publish_and_wait, running
from tests.test_commands import lab as lab  # noqa: PLC0414 - the fixture, reused
from tests.test_diag import LOG_LINES, PERSON, position_forms

TAG = "T0000CAFE"
TAG_KEY = bytes(range(16))


# --- the body and the chunks (sans-IO) --------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"request": "req-0001", "include_personal": True}, "include_personal"),
    ({"request": "req-0001", "include_personal": False}, "include_personal"),
    ({"request": "a/b+#cdef"}, "request"),
    ({"request": "short"}, "request"),
    ({}, "request"),
    ({"request": "req-0001", "sections": ["records"]}, "sections"),
    ({"request": "req-0001", "sections": []}, "sections"),
    ({"request": "req-0001", "sections": ["logs", "logs"]}, "sections"),
    ({"request": "req-0001", "operator": "x"}, "operator"),
])
def test_bad_bodies_are_refused_and_personal_data_never_asked(body: dict[str, Any],
                                                              field: str) -> None:
    with pytest.raises(BodyError) as caught:
        validate_body("request-diag", body, gateway_id=GW)
    assert caught.value.field == field
    got = validate_body("request-diag", {"request": "req-0001", "sections": ["logs",
                                                                              "reports"]},
                        gateway_id=GW)
    assert got.sections == ("reports", "logs")


def test_chunks_reassemble_and_any_change_is_detected() -> None:
    bundle = random.Random(7).randbytes(3 * CHUNK_BYTES + 5)
    sha = hashlib.sha256(bundle).hexdigest()
    chunks = chunks_of(bundle, gw=GW, request="req-0001", cseq=4)
    assert len(chunks) == 4
    whole = Reassembly(GW, "req-0001")
    for chunk in reversed(chunks):  # any order
        assert whole.add(chunk)
    assert whole.bundle(sha) == bundle
    # a byte flipped on the way: the chunk's own hash refuses it, the bundle is incomplete
    obj = json.loads(chunks[1])
    data = bytearray(base64.urlsafe_b64decode(obj["data"] + "=" * (-len(obj["data"]) % 4)))
    data[100] ^= 1
    flipped = dict(obj, data=base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode())
    torn = Reassembly(GW, "req-0001")
    assert not torn.add(canonical(flipped))
    assert "does not match its hash" in torn.refused[0]
    for chunk in (chunks[0], chunks[2], chunks[3]):
        torn.add(chunk)
    with pytest.raises(ChunkError, match="3 of 4 chunks"):
        torn.bundle(sha)
    # a forged chunk with its hash made to fit: the signed record's hash refuses the whole
    forged = dict(flipped, chunk_sha256=hashlib.sha256(bytes(data)).hexdigest())
    fake = Reassembly(GW, "req-0001")
    for chunk in (chunks[0], canonical(forged), chunks[2], chunks[3]):
        assert fake.add(chunk)
    with pytest.raises(ChunkError, match=r"signed command\.applied record"):
        fake.bundle(sha)
    # a chunk of another request or gateway does not mix in
    assert not Reassembly(OTHER, "req-0001").add(chunks[0])
    assert not Reassembly(GW, "req-0002").add(chunks[0])


def test_the_bounds_of_a_bundle() -> None:
    with pytest.raises(ValueError, match="bundle is 1 to"):
        chunks_of(b"x" * (MAX_BUNDLE_BYTES + 1), gw=GW, request="req-0001", cseq=1)
    obj = json.loads(chunks_of(b"x", gw=GW, request="req-0001", cseq=1)[0])
    with pytest.raises(ChunkError, match="out of range"):
        parse_chunk(canonical(dict(obj, count=MAX_CHUNKS + 1)))
    with pytest.raises(ChunkError, match="out of range"):
        parse_chunk(canonical(dict(obj, size=MAX_BUNDLE_BYTES + 1)))
    with pytest.raises(ChunkError, match="larger than any chunk"):
        parse_chunk(b" " * (2 * CHUNK_BYTES + 1))


# --- end to end over mosquitto ----------------------------------------------------------------

def _serve(gateway: Gateway, log_file: Path, log_lines: int = 500) -> None:
    """The daemon's log as a file (it logs to journald in production)."""
    diag_command.serve(gateway.identity.gateway_id, gateway.config, lambda topic, data: (
        gateway.forwarder.client.publish(topic, data, qos=1).rc == 0),
        log_file=log_file, log_lines=log_lines)


def _blobs(bundle: bytes) -> tuple[list[bytes], dict[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers()}
    return [bundle, gzip.decompress(bundle), *members.values()], members


@pytest.mark.slow
def test_the_bundle_arrives_whole_verified_and_redacted(
        lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    from central.cli import main as ingest

    registry = open_registry(lab.identity)
    registry.pair(TAG, TAG_KEY)
    registry.close()
    log_file = lab.tmp / "gateway.log"
    log_file.write_text("".join(f"{line}\n" for line in LOG_LINES))
    gateway = running(lab)
    files = lab.pki.client(COMMAND_CN)
    common = ["command", "--db", lab.db_url, "--gw", GW, "--key", str(lab.tmp / "keys"),
              "--broker", f"{lab.broker.host}:{lab.broker.port}", "--ca", str(lab.pki.ca_file),
              "--tls-cert", str(files.cert), "--tls-key", str(files.key), "--json",
              "--timeout", "20"]
    out = lab.tmp / "diag.tar.gz"
    try:
        _serve(gateway, log_file)
        started = time.monotonic()
        assert ingest([*common, "request-diag", "--out", str(out)]) == 0
        elapsed = time.monotonic() - started
        said = json.loads(capsys.readouterr().out)
        assert (said["outcome"], said["verified"]) == ("applied", True)
        bundle = out.read_bytes()
        assert out.stat().st_mode & 0o777 == 0o600
        record = lab.records("command.applied")[-1]["body"]
        assert record["details"]["bundle"]["sha256"] == hashlib.sha256(bundle).hexdigest() \
            == said["sha256"]
        assert record["details"]["personal_data"] is False
        assert record["state"] == {"of": "diag", "sha256": said["sha256"]}
        blobs, members = _blobs(bundle)
        assert set(members) >= {"reports.json", "logs.txt"}
        logs = members["logs.txt"].decode()
        assert "uplink connected to 127.0.0.1:8883" in logs  # the technician's lines stay
        secrets = [(lab.identity.directory / name).read_bytes()
                   for name in ("signing.key", "storage.key")] + [TAG_KEY]
        for blob in blobs:
            assert TAG.encode() not in blob
            assert PERSON.encode() not in blob
            assert all(s not in blob and s.hex().encode() not in blob for s in secrets)
            for form in position_forms():
                assert form not in blob, f"{form!r} is in the bundle"
        print(f"request-diag round trip {elapsed:.2f} s, {len(bundle)} bytes")

        # one section only; a usage error for a --out that is a directory (exit 2)
        assert ingest([*common, "request-diag", "--out", str(out), "--section", "logs"]) == 0
        _, members = _blobs(out.read_bytes())
        assert set(members) == {"logs.txt", "logs.json"}
        capsys.readouterr()
        assert ingest([*common, "request-diag", "--out", str(lab.tmp)]) == 2
        assert "is a directory" in capsys.readouterr().err

        # a bundle of several chunks (a log of random text does not compress), one of
        # them changed on the way: the reassembly is refused against the signed record
        medium = lab.tmp / "medium.log"
        rng = random.Random(5)
        medium.write_text("".join(base64.b64encode(rng.randbytes(700)).decode() + "\n"
                                  for _ in range(400)))
        _serve(gateway, medium, log_lines=400)
        issued = lab.issue("request-diag", {"request": "tamper-0001"})
        listener = DiagListener(client_config(lab.broker, lab.pki, COMMAND_CN), GW,
                                "tamper-0001")
        try:
            listener.open()
            listener.send(issued)
            answer = lab.answer(issued)
            got = wait_chunks(listener, time.monotonic() + 15)
        finally:
            listener.close()
        expected = answer.body["details"]["bundle"]["sha256"]
        assert got.complete
        assert answer.body["details"]["bundle"]["chunks"] == len(listener.payloads) >= 3
        assert hashlib.sha256(got.bundle(expected)).hexdigest() == expected
        obj = json.loads(listener.payloads[0])
        data = obj["data"]
        swapped = data[:10] + ("A" if data[10] != "A" else "B") + data[11:]
        raw = base64.urlsafe_b64decode(swapped + "=" * (-len(swapped) % 4))
        forged = canonical(dict(obj, data=swapped, chunk_sha256=hashlib.sha256(raw).hexdigest()))
        tampered = Reassembly(GW, "tamper-0001")
        for payload in [forged, *listener.payloads[1:]]:
            tampered.add(payload)
        with pytest.raises(ChunkError, match=r"signed command\.applied record"):
            tampered.bundle(expected)

        # over the bound: refused with its reason, nothing sent
        big = lab.tmp / "big.log"
        rng = random.Random(3)
        big.write_text("".join(base64.b64encode(rng.randbytes(1400)).decode() + "\n"
                               for _ in range(2000)))
        _serve(gateway, big, log_lines=2000)
        too = lab.send("request-diag", {"request": "too-large-1", "sections": ["logs"]})
        answer = lab.answer(too, timeout=40)
        assert (answer.outcome, answer.reason) == ("rejected", "conflict")
        assert answer.body["detail"].startswith("too_large:")
        # include_personal: refused by the gateway (signed by hand: the tool refuses it too)
        forged_ask = sign_command(lab.signer, gw=GW, cseq=too.cseq + 1,
                                  issued_at_ms=time.time_ns() // 1_000_000,
                                  not_after_ms=time.time_ns() // 1_000_000 + 60_000,
                                  kind="request-diag",
                                  body={"request": "personal-01", "include_personal": True})
        lab.publish(forged_ask)
        refused = lab.answer(forged_ask)
        assert (refused.outcome, refused.reason) == ("rejected", "bad_body")
        assert refused.body["field"] == "include_personal"

    finally:
        diag_command.unserve(GW)
        gateway.stop(2)


@pytest.mark.slow
def test_another_gateway_cannot_write_this_gateway_s_diag_topic(lab: Lab) -> None:
    """The ACL: a gateway writes only its own diag topics; the command publisher reads."""
    seen: list[bytes] = []
    reader = mqtt_client(lab, COMMAND_CN, subscribe=diag_topic(GW, "+"), seen=seen)
    attacker = mqtt_client(lab, OTHER)
    owner = mqtt_client(lab, GW)
    try:
        forged = publish_and_wait(attacker, diag_topic(GW, "req-0001"), b"forged")
        assert forged.is_failure, forged
        assert forged.value == 0x87, forged
        own = publish_and_wait(owner, diag_topic(GW, "req-0001"), b"genuine")
        assert not own.is_failure, own
        wait_for(lambda: b"genuine" in seen, 10, "the gateway's own chunk")
        assert seen == [b"genuine"]
    finally:
        for client in (reader, attacker, owner):
            client.disconnect()
            client.loop_stop()
