"""Cryptographic suites: which signature, hash and cipher a deployment uses (docs/records.md).

A deployment chooses one suite when it is provisioned:

* ``ed25519`` (default): Ed25519 signatures, SHA-256, AES-256-GCM;
* ``sm`` (GB/T 39786-2021 deployments): SM2 signatures (GB/T 32918.2, with SM3 and the
  default signer id ``1234567812345678`` of GM/T 0009), SM3 (GB/T 32905), SM4-GCM
  (GB/T 32907 in GCM mode, as in RFC 8998).

Every signature names its algorithm (``alg``): the algorithm and the hash it goes with.

* ``ed25519-sha256``: Ed25519 (RFC 8032) over the bytes; raw 32-byte public keys;
* ``ecdsa-p256-sha256``: ECDSA on P-256 over SHA-256 of the bytes, the signature as raw
  ``r || s`` (32 + 32 bytes, big-endian), public keys as the 65-byte uncompressed point.
  Identity keys held by a TPM 2.0 that has no Ed25519;
* ``sm2-sm3``: SM2 over SM3(Z_A || bytes), ``r || s`` as above, 65-byte public points.

The hash half of ``alg`` is the chain's hash (``prev``) and the hash of key ids.

SM3 and SM4-GCM come from pyca/cryptography; SM2 from ``gmssl-fast`` (GmSSL, the
reference implementation of the GM/T algorithms), imported only when used.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

ED25519 = "ed25519-sha256"
ECDSA_P256 = "ecdsa-p256-sha256"
SM2 = "sm2-sm3"
SIGNATURE_ALGS = (ED25519, ECDSA_P256, SM2)
#: The signer id of SM2 signatures (GM/T 0009-2012 default; GmSSL's default too).
SM2_DEFAULT_ID = b"1234567812345678"


class UnknownAlgorithmError(ValueError):
    """An ``alg`` or suite name this software does not know."""


def _sm3(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hash_function(alg: str) -> Callable[[bytes], bytes]:
    """The hash that goes with signature algorithm *alg* (chain digests, key ids)."""
    if alg in (ED25519, ECDSA_P256):
        return _sha256
    if alg == SM2:
        return _sm3
    raise UnknownAlgorithmError(f"unknown signature algorithm {alg!r}; known: "
                                f"{', '.join(SIGNATURE_ALGS)}")


def digest(alg: str, data: bytes) -> bytes:
    return hash_function(alg)(data)


def key_id(alg: str, public_raw: bytes) -> str:
    """base64url of the first 12 bytes of the alg's hash over the raw public key (for
    Ed25519 the key ids of format 1)."""
    import base64

    return base64.urlsafe_b64encode(digest(alg, public_raw)[:12]).rstrip(b"=").decode()


# --- signatures -------------------------------------------------------------------------

class Signer(Protocol):
    """Anything that signs for a record or a certificate: a key in RAM, in a file, in a TPM."""

    @property
    def alg(self) -> str: ...

    @property
    def public_raw(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def _sm2_module() -> Any:
    import gmssl_fast

    return gmssl_fast


def sm2_public_hex(public_raw: bytes) -> str:
    return public_raw.hex()


class SoftwareKey:
    """A private key held by this process: a session key (RAM only) or a file-class identity.

    ``private_bytes()`` gives the raw scalar/seed for a key file; session keys never call it.
    """

    key_class = "file"

    def __init__(self, alg: str, private: bytes, public_raw: bytes | None = None) -> None:
        hash_function(alg)  # known?
        self.alg = alg
        self._private = private
        if alg == ED25519:
            self._ed = Ed25519PrivateKey.from_private_bytes(private)
            self.public_raw = self._ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        elif alg == ECDSA_P256:
            self._ec = ec.derive_private_key(int.from_bytes(private, "big"), ec.SECP256R1())
            self.public_raw = self._ec.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint)
        else:
            if public_raw is None:
                # GmSSL derives the point itself but does not give it back: one EC
                # multiplication here through the P-256-shaped arithmetic is not possible
                # (another curve), so key files carry the public key beside the scalar.
                raise ValueError("an SM2 private key needs its public key beside it")
            gm = _sm2_module()
            self._sm2_lock = threading.Lock()  # one GmSSL handle; the uplink signs heads too
            self._sm2 = gm.SM2(private_key=private.hex(), public_key=sm2_public_hex(public_raw))
            self.public_raw = public_raw
            try:  # GmSSL checks that the point is d*G when it parses the pair
                matches = self._sm2.verify(b"check", self._sm2.sign(b"check"))
            except (gm.GmsslError, ValueError):  # GmsslValueError: the pair does not parse
                matches = False
            if not matches:
                raise ValueError("the SM2 public key does not belong to the private key")

    @classmethod
    def generate(cls, alg: str) -> SoftwareKey:
        if alg == ED25519:
            return cls(alg, Ed25519PrivateKey.generate().private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        if alg == ECDSA_P256:
            key = ec.generate_private_key(ec.SECP256R1())
            return cls(alg, key.private_numbers().private_value.to_bytes(32, "big"))
        if alg == SM2:
            pair = _sm2_module().SM2.generate()
            public = bytes.fromhex(pair.public_key_hex)
            if len(public) == 64:
                public = b"\x04" + public
            return cls(alg, bytes.fromhex(pair.private_key_hex), public)
        raise UnknownAlgorithmError(f"unknown signature algorithm {alg!r}")

    @property
    def kid(self) -> str:
        return key_id(self.alg, self.public_raw)

    def private_bytes(self) -> bytes:
        return self._private

    def sign(self, data: bytes) -> bytes:
        if self.alg == ED25519:
            return self._ed.sign(data)
        if self.alg == ECDSA_P256:
            r, s = decode_dss_signature(self._ec.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        with self._sm2_lock:
            return bytes(self._sm2.sign(data))


class Verifier:
    """A public key of a known algorithm, ready to check signatures (cached per key)."""

    def __init__(self, alg: str, public_raw: bytes) -> None:
        hash_function(alg)
        self.alg = alg
        self.public_raw = public_raw
        if alg == ED25519:
            self._ed = Ed25519PublicKey.from_public_bytes(public_raw)
        elif alg == ECDSA_P256:
            self._ec = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_raw)
        else:
            if len(public_raw) != 65 or public_raw[0] != 4:
                raise ValueError("an SM2 public key is the 65-byte uncompressed point 04||X||Y")
            self._sm2 = _sm2_module().SM2(public_key=sm2_public_hex(public_raw))

    @property
    def kid(self) -> str:
        return key_id(self.alg, self.public_raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if self.alg == ED25519:
                self._ed.verify(signature, data)
                return True
            if len(signature) != 64:
                return False
            if self.alg == ECDSA_P256:
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                           int.from_bytes(signature[32:], "big"))
                self._ec.verify(der, data, ec.ECDSA(hashes.SHA256()))
                return True
            return bool(self._sm2.verify(data, signature))
        except (InvalidSignature, ValueError):
            return False
        except Exception as exc:
            if type(exc).__module__.startswith("gmssl_fast"):
                return False
            raise


def public_key(alg: str, public_raw: bytes) -> Verifier:
    """A :class:`Verifier`; :class:`ValueError` if the bytes are no key of that algorithm."""
    return Verifier(alg, public_raw)


# --- authenticated encryption -----------------------------------------------------------

class Aead(Protocol):
    """AESGCM's interface: ciphertext is data + 16-byte tag; InvalidTag when altered."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class SM4GCM:
    """SM4 in GCM mode (RFC 8998 section 3.1), with AESGCM's interface."""

    TAG = 16

    def __init__(self, key: bytes) -> None:
        if len(key) != 16:
            raise ValueError("an SM4 key is 16 bytes")
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        if associated_data:
            enc.authenticate_additional_data(associated_data)
        out = enc.update(data) + enc.finalize()
        return out + enc.tag

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        if len(data) < self.TAG:
            raise InvalidTag
        dec = Cipher(algorithms.SM4(self._key),
                     modes.GCM(nonce, data[-self.TAG:])).decryptor()
        if associated_data:
            dec.authenticate_additional_data(associated_data)
        return dec.update(data[:-self.TAG]) + dec.finalize()


# --- suites ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Suite:
    name: str
    #: the records' (session keys') signature algorithm
    alg: str
    #: identity key algorithms, preferred first (a TPM without the first takes the next)
    identity_algs: tuple[str, ...]
    aead_name: str
    storage_key_bytes: int

    def aead(self, key: bytes) -> Aead:
        if len(key) != self.storage_key_bytes:
            raise ValueError(f"the {self.aead_name} key of suite {self.name!r} is "
                             f"{self.storage_key_bytes} bytes, not {len(key)}")
        return AESGCM(key) if self.aead_name == "aes-256-gcm" else SM4GCM(key)

    def new_storage_key(self) -> bytes:
        return secrets.token_bytes(self.storage_key_bytes)


SUITES: dict[str, Suite] = {
    "ed25519": Suite("ed25519", ED25519, (ED25519, ECDSA_P256), "aes-256-gcm", 32),
    "sm": Suite("sm", SM2, (SM2, ECDSA_P256), "sm4-gcm", 16),
}
DEFAULT_SUITE = "ed25519"


def suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise UnknownAlgorithmError(f"unknown suite {name!r}: choose one of "
                                    f"{', '.join(SUITES)}") from None


def storage_aead(key: bytes) -> Aead:
    """The cipher of a storage key: the suites' key lengths differ (32 bytes: AES-256-GCM,
    16: SM4-GCM), so the key says which (checked below, at import)."""
    for candidate in SUITES.values():
        if candidate.storage_key_bytes == len(key):
            return candidate.aead(key)
    sizes = " or ".join(str(s.storage_key_bytes) for s in SUITES.values())
    raise ValueError(f"a storage key is {sizes} bytes, not {len(key)}")


if len({s.storage_key_bytes for s in SUITES.values()}) != len(SUITES):
    raise RuntimeError("storage_aead tells the suites apart by their key length")
