"""The TPM backend (provisioning/tpm.py) against a real software TPM (lab/swtpm.py).

What it promises (docs/threat-model.md, A1): keys made in this TPM sign verifiable
signatures, the sealed storage key comes back after a reboot, and a copy of the key
files on another TPM neither signs nor unseals: it fails with a TpmError naming why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gmssl_fast
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from lab.swtpm import Swtpm, SwtpmError
from lab.swtpm import main as swtpm_main
from provisioning.tpm import (
    ALG_ECDSA_P256,
    ALG_SM2,
    KeyBlob,
    Tpm,
    TpmError,
    TpmSigner,
    open_tpm,
)

REPO = Path(__file__).resolve().parents[1]
STORAGE_KEY = bytes(range(32))


def verify(signer: TpmSigner, data: bytes, sig: bytes) -> bool:
    """Verify with a library that has never seen the TPM: pyca for ECDSA, GmSSL for SM2."""
    assert len(sig) == 64
    if signer.alg == ALG_SM2:
        return bool(gmssl_fast.SM2(public_key=signer.public_raw.hex()).verify(data, sig))
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), signer.public_raw)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def algs_of(tpm: Tpm) -> list[str]:
    return [alg for alg in (ALG_ECDSA_P256, ALG_SM2) if tpm.supports(alg)]


@pytest.mark.parametrize("alg", [ALG_ECDSA_P256, ALG_SM2])
def test_key_made_in_the_tpm_signs_verifiable_signatures(swtpm: Swtpm, alg: str) -> None:
    with open_tpm(swtpm.tcti) as tpm:
        if not tpm.supports(alg):
            pytest.skip(f"this swtpm's libtpms cannot hold {alg} keys")
        blob = KeyBlob.from_json(tpm.create_signing_key(alg).to_json())
        assert (blob.kind, blob.alg) == ("signing", alg)
        signer = tpm.load_signing_key(blob)
        assert signer.alg == alg
        assert signer.key_class == "tpm"
        assert len(signer.public_raw) == 65
        assert signer.public_raw[0] == 4
        record = b'{"seq":1,"kind":"tag.presence"}'
        sig = signer.sign(record)
        assert verify(signer, record, sig)
        assert not verify(signer, record + b" ", sig)
        assert not verify(signer, record, bytes(64 - 1) + b"\x01")


def test_swtpm_holds_standard_sm2_keys(swtpm: Swtpm) -> None:
    """libtpms lists SM2 and the SM2 curve; the signature over e = SM3(Z_A || M) made by the
    TPM is one GmSSL accepts (checked above): this pins that finding."""
    with open_tpm(swtpm.tcti) as tpm:
        assert tpm.supports(ALG_ECDSA_P256)
        assert tpm.supports(ALG_SM2)
        assert not tpm.supports("ed25519")


def test_seal_unseal_round_trip(swtpm: Swtpm) -> None:
    with open_tpm(swtpm.tcti) as tpm:
        blob = tpm.seal(STORAGE_KEY)
        assert (blob.kind, blob.alg) == ("sealed", None)
        assert STORAGE_KEY not in blob.to_json()
        assert STORAGE_KEY not in blob.private
        assert tpm.unseal(KeyBlob.from_json(blob.to_json())) == STORAGE_KEY
        with pytest.raises(TpmError, match="1 to 128 bytes"):
            tpm.seal(b"")
        with pytest.raises(TpmError, match="not a signing key"):
            tpm.load_signing_key(blob)
        with pytest.raises(TpmError, match="not a sealed secret"):
            tpm.unseal(tpm.create_signing_key(ALG_ECDSA_P256))


def test_sealed_key_crosses_the_bus_encrypted(swtpm: Swtpm, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A logic analyser on the TPM bus (tpm2-tss's pcap TCTI records every command and
    response byte) sees neither the sealed secret going in nor coming out; a digest sent
    to be signed, which is not secret, is there in the clear (the capture works)."""
    capture = tmp_path / "bus.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(capture))
    secret = b"storage key 0123456789abcdef!!!!"
    with open_tpm("pcap:" + swtpm.tcti) as tpm:
        assert tpm.unseal(tpm.seal(secret)) == secret
        signer = tpm.load_signing_key(tpm.create_signing_key(ALG_ECDSA_P256))
        signer.sign(b"not secret")
    bus = capture.read_bytes()
    assert hashlib.sha256(b"not secret").digest() in bus
    assert secret not in bus


def test_keys_survive_a_restart_of_the_same_tpm(swtpm: Swtpm) -> None:
    """A reboot: the same TPM state, a new process; the SRK is derived again, the same."""
    with open_tpm(swtpm.tcti) as tpm:
        algs = algs_of(tpm)
        blobs = {alg: tpm.create_signing_key(alg).to_json() for alg in algs}
        publics = {alg: tpm.load_signing_key(KeyBlob.from_json(b)).public_raw
                   for alg, b in blobs.items()}
        sealed = tpm.seal(STORAGE_KEY).to_json()
    swtpm.stop()
    swtpm.start()
    with open_tpm(swtpm.tcti) as tpm:
        assert tpm.unseal(KeyBlob.from_json(sealed)) == STORAGE_KEY
        for alg, blob in blobs.items():
            signer = tpm.load_signing_key(KeyBlob.from_json(blob))
            assert signer.public_raw == publics[alg]
            assert verify(signer, b"after reboot", signer.sign(b"after reboot"))


def test_key_files_copied_to_another_tpm_are_refused(
        swtpm_factory: Callable[[str], Swtpm]) -> None:
    """The SD card copied into another gateway (or the TPM cleared): nothing loads."""
    ours, theirs = swtpm_factory("ours"), swtpm_factory("theirs")
    with open_tpm(ours.tcti) as tpm:
        blobs = [tpm.create_signing_key(alg) for alg in algs_of(tpm)]
        sealed = tpm.seal(STORAGE_KEY)
    with open_tpm(theirs.tcti) as other:
        for blob in blobs:
            with pytest.raises(TpmError, match=r"made by another TPM.*provision init"):
                other.load_signing_key(KeyBlob.from_json(blob.to_json()))
        with pytest.raises(TpmError, match=r"made by another TPM.*provision init"):
            other.unseal(KeyBlob.from_json(sealed.to_json()))


def _doc(blob: KeyBlob) -> dict[str, object]:
    return dict(json.loads(blob.to_json()))


def _mutations(blob: KeyBlob) -> dict[str, bytes]:
    doc = _doc(blob)
    short = base64.b64encode(blob.public[:-5]).decode()
    long_ = base64.b64encode(blob.private + b"\0").decode()
    return {
        "empty": b"",
        "not json": b"\x00\xffsigning",
        "a list": b"[]",
        "format 2": json.dumps({**doc, "format": 2}).encode(),
        "unknown alg": json.dumps({**doc, "alg": "rsa"}).encode(),
        "sealed with alg": json.dumps({**doc, "kind": "sealed"}).encode(),
        "no public": json.dumps({k: v for k, v in doc.items() if k != "public"}).encode(),
        "bad base64": json.dumps({**doc, "private": "@@@"}).encode(),
        "short public": json.dumps({**doc, "public": short}).encode(),
        "trailing bytes": json.dumps({**doc, "private": long_}).encode(),
    }


def test_damaged_key_files_give_a_tpm_error(swtpm: Swtpm) -> None:
    with open_tpm(swtpm.tcti) as tpm:
        blob = tpm.create_signing_key(ALG_ECDSA_P256)
        sealed = tpm.seal(STORAGE_KEY)
        refusals: dict[str, str] = {}
        for name, data in _mutations(blob).items():
            try:
                KeyBlob.from_json(data)
            except TpmError as exc:
                refusals[name] = str(exc)
        assert refusals.keys() == _mutations(blob).keys()
        assert all("damaged" in why for why in refusals.values())
        # a sealed object's public part under a signing label
        swapped = json.dumps({**_doc(blob), "public": _doc(sealed)["public"]}).encode()
        with pytest.raises(TpmError, match="damaged"):
            KeyBlob.from_json(swapped)
        # well-formed but altered: the TPM's integrity check refuses it
        flipped = bytearray(blob.private)
        flipped[len(flipped) // 2] ^= 0x01
        altered = KeyBlob(blob.kind, blob.alg, blob.public, bytes(flipped))
        with pytest.raises(TpmError, match="another TPM"):
            tpm.load_signing_key(altered)
        # the untouched key still works on the same connection
        signer = tpm.load_signing_key(blob)
        assert verify(signer, b"x", signer.sign(b"x"))


def test_unreachable_tcti_fails_quickly() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TpmError, match=r"no TPM answers at swtpm:host=127\.0\.0\.1"):
        open_tpm(f"swtpm:host=127.0.0.1,port={port}")
    assert time.monotonic() - start < 2.0
    with pytest.raises(TpmError, match="no TPM answers"):
        open_tpm("swtpm:host=127.0.0.1,port=notaport")


def test_closed_connection_says_so(swtpm: Swtpm) -> None:
    tpm = open_tpm(swtpm.tcti)
    signer = tpm.load_signing_key(tpm.create_signing_key(ALG_ECDSA_P256))
    tpm.close()
    tpm.close()
    with pytest.raises(TpmError, match="closed"):
        signer.sign(b"x")


def test_two_threads_sign_concurrently(swtpm: Swtpm) -> None:
    with open_tpm(swtpm.tcti) as tpm:
        algs = algs_of(tpm)
        signers = [tpm.load_signing_key(tpm.create_signing_key(alg)) for alg in algs]
        shared = signers[0]
        start = threading.Barrier(2)
        results: list[list[tuple[TpmSigner, bytes, bytes]]] = [[], []]
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                start.wait(5)
                for i in range(60):
                    # both threads use the shared key, and each a key of its own
                    signer = shared if i % 2 else signers[n % len(signers)]
                    data = f"thread {n} record {i}".encode()
                    results[n].append((signer, data, signer.sign(data)))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert sum(len(r) for r in results) == 120
        assert all(verify(s, d, sig) for r in results for s, d, sig in r)


def test_more_keys_than_tpm_slots(swtpm: Swtpm) -> None:
    """The TPM holds 3 objects; five keys and unseals in between still work (the backend
    keeps keys as saved contexts and loads at most two at a time)."""
    with open_tpm(swtpm.tcti) as tpm:
        sealed = tpm.seal(STORAGE_KEY)
        signers = [tpm.load_signing_key(tpm.create_signing_key(ALG_ECDSA_P256))
                   for _ in range(5)]
        for round_ in range(3):
            for signer in signers:
                data = f"round {round_}".encode()
                assert verify(signer, data, signer.sign(data))
            assert tpm.unseal(sealed) == STORAGE_KEY


CRASH = """
import os, sys
from provisioning.tpm import open_tpm, KeyBlob
tpm = open_tpm(sys.argv[1])
for path in sys.argv[2:]:
    tpm.load_signing_key(KeyBlob.from_json(open(path, "rb").read())).sign(b"x")
os._exit(0)  # killed: no close(), the keys stay loaded in the TPM
"""


def test_objects_left_by_a_crashed_process_are_flushed(swtpm: Swtpm, tmp_path: Path) -> None:
    """Without a resource manager a dead process's objects stay in the TPM; two crashes
    leave more than the TPM has room for, and the next open still works."""
    with open_tpm(swtpm.tcti) as tpm:
        paths = []
        for i in range(2):
            path = tmp_path / f"key{i}.json"
            path.write_bytes(tpm.create_signing_key(ALG_ECDSA_P256).to_json())
            paths.append(str(path))
        sealed = tpm.seal(STORAGE_KEY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", CRASH, swtpm.tcti, *paths], check=True,
                       env=env, timeout=60, capture_output=True)
    with open_tpm(swtpm.tcti) as tpm:
        assert tpm.unseal(sealed) == STORAGE_KEY


def test_swtpm_missing_names_the_setup_script(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SwtpmError, match=r"scripts/setup\.sh --test"):
        Swtpm(tmp_path / "state").start()


def test_swtpm_command_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        swtpm_main(["--help"])
    assert stop.value.code == 0
    assert "--state" in capsys.readouterr().out
