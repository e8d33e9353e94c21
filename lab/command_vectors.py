"""Test vectors of the platform's commands (docs/commands.md): ``docs/test-vectors/
commands.json``, written by ``python -m lab.vectors docs/test-vectors`` with the record
vectors and reproduced byte for byte by tests/test_command_vectors.py.

Deterministic: fixed keys (Ed25519 seeds and an X25519 private key derived from names),
fixed times, Ed25519 signatures, and the pair-tag's ephemeral X25519 key fixed too. The
file holds the platform's command root and key (with the key's certificate), the keyring
the gateway holds (the certificates and a revocation list), the gateway's encryption key,
and:

* ``valid``: a command of each kind, with its canonical bytes, the bytes its signature
  covers and, for the kinds that carry a device key, every step of the key's encryption
  (the X25519 shared secret, the HKDF output, the AES-GCM key and nonce, the associated
  data) and the key in clear;
* ``invalid``: each refusal of docs/commands.md, "The checks", with the gateway's state
  (trusted time or the floor, the last cseq answered, the digests of the commands
  answered, its region) and the reason (and the body's field) expected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.command_keys import Revoked, make_certificate, make_revocations
from core.commands import (
    BOX_X25519,
    MAX_LIFETIME_MS,
    BoxKey,
    command_digest,
    device_key_aad,
    digest_value,
    make_box_document,
    sign_command,
)
from core.record import JSON, b64u, canonical
from core.suites import ED25519, SoftwareKey, key_id

GATEWAY = "gw-vector-0001"
OTHER = "gw-vector-0002"
REGION = "north"
NOW = 1_760_000_000_000
DAY = 86_400_000
YEAR = 365 * DAY
TAG = "T0000BEEF"
KIOSK = "KI-VECTOR-0001"
TAG_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
KIOSK_KEY = bytes.fromhex("f0e0d0c0b0a090807060504030201000")


def _seed(name: str) -> bytes:
    return hashlib.sha256(f"smartcorr command vector {name}".encode()).digest()


def _ed(name: str) -> SoftwareKey:
    return SoftwareKey(ED25519, _seed(name))


def _key_json(key: SoftwareKey, role: str) -> dict[str, JSON]:
    return {"alg": key.alg, "seed_hex": key.private_bytes().hex(),
            "public_b64u": b64u(key.public_raw), "kid": key_id(key.alg, key.public_raw),
            "role": role}


def _sealing_steps(box: BoxKey, ephemeral: bytes, device: str, ident: str,
                   key: bytes) -> dict[str, JSON]:
    """Every intermediate value of sealing *key* to *box* (docs/commands.md, Device keys)."""
    eph = X25519PrivateKey.from_private_bytes(ephemeral)
    epk = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(box.public.public_raw))
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=epk + box.public.public_raw,
               info=b"smartcorr device key/1").derive(shared)
    return {"ephemeral_private_hex": ephemeral.hex(), "epk_hex": epk.hex(),
            "shared_secret_hex": shared.hex(), "hkdf_salt_hex": (epk + box.public.public_raw).hex(),
            "hkdf_info": "smartcorr device key/1", "hkdf_output_hex": okm.hex(),
            "aes_key_hex": okm[:32].hex(), "nonce_hex": okm[32:].hex(),
            "aad_hex": device_key_aad(GATEWAY, device, ident).hex(),
            "device_key_hex": key.hex()}


def command_vectors() -> dict[str, JSON]:
    root, good, north, stolen = _ed("root"), _ed("command key"), _ed("north key"), _ed("stolen")
    stranger, identity = _ed("stranger"), _ed("identity")
    box = BoxKey(BOX_X25519, _seed("gateway encryption key"))
    certs = [make_certificate(root, k.alg, k.public_raw, region=region, serial=serial,
                              not_before=NOW - YEAR, not_after=NOW + YEAR, issued_at=NOW - YEAR)
             for serial, k, region in ((1, good, "*"), (2, north, "south"), (3, stolen, "*"))]
    revocations = make_revocations(root, number=1, issued_at=NOW - DAY, revoked=[
        Revoked(3, stolen.kid, "compromised", NOW - DAY, NOW + YEAR)])

    def command(kind: str, body: dict[str, JSON], *, signer: SoftwareKey = good,
                gw: str = GATEWAY, cseq: int = 8, issued: int = NOW - 60_000,
                valid: int = DAY) -> bytes:
        return sign_command(signer, gw=gw, cseq=cseq, issued_at_ms=issued,
                            not_after_ms=issued + valid, kind=kind, body=body)

    tag_eph, kiosk_eph = _seed("ephemeral tag"), _seed("ephemeral kiosk")
    tag_sealed = box.public.seal(TAG_KEY, device_key_aad(GATEWAY, "tag", TAG),
                                 ephemeral=tag_eph).to_json()
    kiosk_sealed = box.public.seal(KIOSK_KEY, device_key_aad(GATEWAY, "kiosk", KIOSK),
                                   ephemeral=kiosk_eph).to_json()
    valid_bodies: list[tuple[str, str, dict[str, JSON], dict[str, JSON] | None]] = [
        ("pair_tag", "pair-tag", {"absent_after_s": 300, "key": tag_sealed, "tag": TAG},
         _sealing_steps(box, tag_eph, "tag", TAG, TAG_KEY)),
        ("unpair_tag", "unpair-tag", {"tag": TAG}, None),
        ("pair_kiosk", "pair-kiosk", {"key": kiosk_sealed, "replace": True, "serial": KIOSK},
         _sealing_steps(box, kiosk_eph, "kiosk", KIOSK, KIOSK_KEY)),
        ("unpair_kiosk", "unpair-kiosk", {"serial": KIOSK}, None),
        ("set_config", "set-config", {"key": "health_interval_s", "value": 600}, None),
        ("set_config_tag", "set-config", {"key": "absent_after_s", "tag": TAG, "value": 900},
         None),
        # the supervision kinds (docs/supervision.md)
        ("set_authorisation", "set-authorisation", {
            "approver": "bureau head", "basis": "left_area_without_approval",
            "document": "DOC-2025-1", "end": "2026-01-08", "start": "2025-10-09",
            "tag": TAG, "zone": "Asia/Shanghai"}, None),
        ("end_authorisation", "end-authorisation", {
            "approver": "bureau head", "document": "DOC-2025-2",
            "reason": "no_longer_needed", "tag": TAG}, None),
        ("set_presence_rules", "set-presence-rules", {
            "exceptions": [{"date": "2025-10-11", "skip": True},
                           {"date": "2025-10-12", "end": "23:00", "start": "20:00"}],
            "grace_min": 15, "tag": TAG,
            "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "end": "06:00",
                         "start": "22:00"}], "zone": "Asia/Shanghai"}, None),
        ("approve_leave", "approve-leave", {
            "approver": "officer", "document": "LV-2025-1", "end_ms": NOW + 2 * DAY,
            "grace_min": 30, "leave_id": "L-1", "start_ms": NOW + DAY, "tag": TAG}, None),
        ("revoke_leave", "revoke-leave", {"leave_id": "L-1", "tag": TAG}, None),
        ("request_presence", "request-presence", {"tag": TAG}, None),
        # the redacted diagnostic bundle (docs/commands.md, request-diag)
        ("request_diag", "request-diag", {"request": "diag-20251009-1",
                                          "sections": ["reports", "logs"]}, None),
        ("request_diag_all_sections", "request-diag", {"request": "diag-20251009-2"}, None),
    ]
    state: dict[str, JSON] = {"gateway": GATEWAY, "region": REGION, "trusted_now_ms": NOW,
                              "floor_ms": None, "last_cseq": 7, "answered": {}}
    valid = []
    for name, kind, body, sealing in valid_bodies:
        data = command(kind, body)
        obj = json.loads(data)
        case: dict[str, JSON] = {
            "name": name, "kind": kind, "canonical": data.decode(),
            "canonical_hex": data.hex(), "sha256": command_digest(data),
            "signed_hex": canonical({k: v for k, v in obj.items() if k != "sig"}).hex(),
            "expect": "apply"}
        if sealing is not None:
            case["sealing"] = sealing
        valid.append(case)

    base = command("unpair-tag", {"tag": TAG})
    answered = command("unpair-tag", {"tag": "T00000001"}, cseq=7)

    def resigned(data: bytes, signer: SoftwareKey = good, **changes: JSON) -> bytes:
        obj = json.loads(data)
        obj.pop("sig")
        obj.update(changes)
        obj["sig"] = b64u(signer.sign(canonical(obj)))
        return canonical(obj)

    wrong_tag = box.public.seal(TAG_KEY, device_key_aad(GATEWAY, "tag", "T0000BEEE"),
                                ephemeral=tag_eph).to_json()
    untrusted = {"trusted_now_ms": None, "floor_ms": NOW + 2 * DAY}
    invalid: list[tuple[str, bytes, str, dict[str, JSON], str | None]] = [
        ("too_large", base + b" " * (64 * 1024), "too_large", {}, None),
        ("not_json", b"\xff" + base, "malformed", {}, None),
        ("duplicate_member", base.replace(b'"cseq":8,', b'"cseq":8,"cseq":8,'), "malformed",
         {}, None),
        ("float", base.replace(b'"cseq":8', b'"cseq":8.0'), "malformed", {}, None),
        ("whitespace", base.replace(b'{"alg"', b'{ "alg"'), "non_canonical", {}, None),
        ("escaped_letter", base.replace(b'"tag":"T0000BEEF"', b'"tag":"T0000BEE\\u0046"'),
         "non_canonical", {}, None),
        ("unsigned", canonical({k: v for k, v in json.loads(base).items() if k != "sig"}),
         "unsigned", {}, None),
        ("unknown_field", resigned(base, nonce="x"), "malformed", {}, None),
        ("lifetime_too_long", resigned(base, not_after_ms=NOW - 60_000 + MAX_LIFETIME_MS + 1),
         "malformed", {}, None),
        ("unknown_key", command("unpair-tag", {"tag": TAG}, signer=stranger), "unknown_key",
         {}, None),
        ("revoked_key", command("unpair-tag", {"tag": TAG}, signer=stolen), "revoked", {}, None),
        ("key_of_another_region", command("unpair-tag", {"tag": TAG}, signer=north),
         "wrong_region", {}, None),
        ("altered", base.replace(b'"tag":"T0000BEEF"', b'"tag":"T0000BEEE"'),
         "bad_signature", {}, None),
        ("wrong_gateway", command("unpair-tag", {"tag": TAG}, gw=OTHER), "wrong_gateway", {},
         None),
        ("replayed", command("unpair-tag", {"tag": TAG}, cseq=7), "replayed", {}, None),
        ("duplicate", answered, "duplicate", {}, None),
        ("out_of_order", command("unpair-tag", {"tag": TAG}, cseq=10), "out_of_order", {},
         None),
        ("expired", command("unpair-tag", {"tag": TAG}, issued=NOW - 2 * DAY), "expired", {},
         None),
        ("not_yet_valid", command("unpair-tag", {"tag": TAG}, issued=NOW + 300_001),
         "not_yet_valid", {}, None),
        ("expired_by_the_floor", command("unpair-tag", {"tag": TAG}), "expired", untrusted,
         None),
        ("taken_without_trusted_time", command("unpair-tag", {"tag": TAG}), "apply",
         {"trusted_now_ms": None, "floor_ms": NOW - DAY}, None),
        ("unknown_kind", command("reboot-now", {}), "unknown_kind", {}, None),
        ("key_in_clear", command("pair-tag", {"key": TAG_KEY.hex(), "tag": TAG}), "bad_body",
         {}, "key"),
        ("key_for_another_tag", command("pair-tag", {"key": wrong_tag, "tag": TAG}),
         "bad_body", {}, "key.ct"),
        ("setting_out_of_range", command("set-config", {"key": "health_interval_s",
                                                        "value": 59}), "bad_body", {},
         "value"),
        ("unknown_setting", command("set-config", {"key": "quota_bytes", "value": 1}),
         "bad_body", {}, "key"),
        ("diag_asks_for_personal_data", command("request-diag", {
            "include_personal": False, "request": "diag-20251009-3"}), "bad_body", {},
         "include_personal"),
        ("diag_unknown_section", command("request-diag", {
            "request": "diag-20251009-4", "sections": ["records"]}), "bad_body", {},
         "sections"),
    ]
    cases = []
    for name, data, reason, overrides, field in invalid:
        case = {"name": name, "canonical_hex": data.hex(), "sha256": command_digest(data),
                "state": overrides or None, "expect": reason}
        if field is not None:
            case["field"] = field
        cases.append(case)
    state["answered"] = {"7": {"sha256": command_digest(answered),
                               "ledger_value": digest_value(command_digest(answered))}}
    doc = make_box_document(identity, gateway_id=GATEWAY, box=box.public, created_ms=NOW)
    out: dict[str, Any] = {
        "description": "Commands (docs/commands.md). Ed25519 private keys are 32-byte seeds. "
                       "The gateway holds 'keyring' (the root's public key, the "
                       "certificates, the revocation list) and 'gateway_box' (its X25519 "
                       "key), is in 'state' (trusted time, its region, the last cseq it "
                       "answered and the digest of the command it answered at 7). Each "
                       "'valid' command is applied (its device key decrypts to "
                       "sealing.device_key_hex); each 'invalid' one, checked with 'state' "
                       "updated by its own 'state', gives 'expect': a reason (and the "
                       "body's 'field'), 'duplicate' (acknowledged, not answered again) or "
                       "'apply'.",
        "keys": {"root": _key_json(root, "the command root (offline)"),
                 "command_key": _key_json(good, "command key, region *, serial 1"),
                 "north_key": _key_json(north, "command key of region south, serial 2"),
                 "stolen_key": _key_json(stolen, "command key revoked by list 1, serial 3"),
                 "stranger": _key_json(stranger, "never certified"),
                 "identity": _key_json(identity, "the gateway's identity key")},
        "keyring": {"root": json.loads(_root_bytes(root)),
                    "certificates": [json.loads(c) for c in certs],
                    "certificates_hex": [c.hex() for c in certs],
                    "revocations": json.loads(revocations),
                    "revocations_hex": revocations.hex()},
        "gateway_box": {"alg": BOX_X25519, "private_hex": box.private_bytes().hex(),
                        "public_b64u": b64u(box.public.public_raw), "kid": box.kid,
                        "document": doc},
        "state": state,
        "valid": valid,
        "invalid": cases,
    }
    return out


def _root_bytes(root: SoftwareKey) -> bytes:
    from core.command_keys import CommandRoot

    return CommandRoot.of(root).to_bytes()
