"""The gateway's encryption key: what the platform encrypts device keys to (docs/commands.md,
"Device keys").

The identity key only signs (in a TPM it cannot decrypt anything), so ``provision init``
makes a second key pair for the platform's ``pair-tag`` and ``pair-kiosk`` commands: X25519
(suite ``ed25519``) or SM2 (suite ``sm``), :class:`core.commands.BoxKey`. Two files in the
identity directory:

* ``enc.key`` (mode 0600): the private key, encrypted under the storage key (AES-GCM or
  SM4-GCM, as the registries' device keys): with a TPM the storage key is sealed by it,
  so a copy of the SD card decrypts no device key sent to this gateway;
* ``enc.pub`` (mode 0644): the public key in a document signed by the identity key
  (:func:`core.commands.make_box_document`): the platform believes it through the
  identity it registered. The daemon also announces it in a ``key.encryption`` record
  (app/commands.py), so the platform's ingest learns it with no file carried.

An identity made before this key existed gets one at the daemon's next start.
"""

from __future__ import annotations

import json
import os
import time

from cryptography.exceptions import InvalidTag

from core.commands import BOX_X25519, BoxKey, BoxPublic, box_alg_of_suite, make_box_document
from core.durable import atomic_write
from core.errors import UserError
from core.record import JSON, b64u, unb64u
from core.suites import storage_aead
from provisioning.identity import Identity

BOX_KEY_FILE = "enc.key"
BOX_PUB_FILE = "enc.pub"
FORMAT = 1
PUBLIC_MODE = 0o644
_NONCE_BYTES = 12
_AAD = b"smartcorr.enc-key\x00"


class BoxKeyError(UserError):
    """The encryption key's files are unusable; the message says how to fix it."""


def _aad(identity: Identity) -> bytes:
    return _AAD + identity.gateway_id.encode()


def load_box_key(identity: Identity) -> BoxKey | None:
    """The gateway's encryption key, or None when it has none yet."""
    path = identity.directory / BOX_KEY_FILE
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BoxKeyError(f"{path} is unreadable ({exc}): remove it and {BOX_PUB_FILE}; the "
                          "gateway makes a new pair at its next start (the platform learns "
                          "it from the key.encryption record)") from None
    try:
        raw = unb64u(str(obj["nonce"])) + unb64u(str(obj["ct"]))
        private = storage_aead(identity.storage_key).decrypt(
            raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(identity))
        public = unb64u(str(obj["public"])) if obj.get("public") else None
        return BoxKey(str(obj["alg"]), private, public)
    except (KeyError, TypeError, ValueError, InvalidTag) as exc:
        raise BoxKeyError(f"{path} does not decrypt with this gateway's storage key ({exc}): "
                          f"remove it and {BOX_PUB_FILE}; the gateway makes a new pair at its "
                          "next start") from None


def box_document(identity: Identity) -> dict[str, JSON] | None:
    """The signed public document (``enc.pub``), or None without one."""
    try:
        obj = json.loads((identity.directory / BOX_PUB_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def ensure_box_key(identity: Identity, *, now_ms: int | None = None,
                   ) -> tuple[BoxKey, dict[str, JSON], bool]:
    """The encryption key and its signed document, made (and written: the private key
    first) when missing; whether they were made now."""
    key = load_box_key(identity)
    made = key is None
    if key is None:
        key = BoxKey.generate(box_alg_of_suite(identity.suite.name))
        nonce = os.urandom(_NONCE_BYTES)
        sealed = storage_aead(identity.storage_key).encrypt(nonce, key.private_bytes(),
                                                            _aad(identity))
        entry: dict[str, JSON] = {"format": FORMAT, "alg": key.alg, "nonce": b64u(nonce),
                                  "ct": b64u(sealed)}
        if key.alg != BOX_X25519:  # SM2: the point beside the scalar
            entry["public"] = b64u(key.public.public_raw)
        atomic_write(identity.directory / BOX_KEY_FILE, json.dumps(entry).encode())
    doc = box_document(identity)
    if doc is None or not _describes(doc, key.public, identity.gateway_id):
        doc = make_box_document(identity.key, gateway_id=identity.gateway_id, box=key.public,
                                created_ms=int(time.time() * 1000) if now_ms is None
                                else now_ms)
        atomic_write(identity.directory / BOX_PUB_FILE,
                     json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", PUBLIC_MODE)
    return key, doc, made


def _describes(doc: dict[str, JSON], public: BoxPublic, gateway_id: str) -> bool:
    return doc.get("kid") == public.kid and doc.get("gw") == gateway_id \
        and doc.get("key") == b64u(public.public_raw)
