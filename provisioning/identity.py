"""The gateway's identity and key store: who it is, how it signs, how it encrypts at rest.

An identity directory holds (mode 0700, files 0600):

* ``gateway.json`` - gateway id and the signing key id;
* ``signing.key`` - Ed25519 private key, PKCS#8 PEM;
* ``signing.pub`` - its public key, for enrolment at the platform;
* ``storage.key`` - 32 random bytes, the AES-256-GCM key of the record store.

Files are written atomically (temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from core.errors import UserError
from core.record import key_id

GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")


class IdentityError(UserError):
    """The identity directory is missing, incomplete or unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Identity:
    gateway_id: str
    signing_key: Ed25519PrivateKey
    storage_key: bytes
    directory: Path

    @property
    def next_key(self) -> Ed25519PrivateKey | None:
        """A key staged by 'provision rotate-key', announced at the next start."""
        path = self.directory / "signing.next.key"
        if not path.exists():
            return None
        return _load_private(path)

    def promote_next_key(self) -> None:
        """After the key.rotate record is committed: the staged key becomes the key."""
        d = self.directory
        nxt = d / "signing.next.key"
        if not nxt.exists():
            return
        key = _load_private(nxt)
        meta = {"gateway_id": self.gateway_id, "kid": key_id(key.public_key()), "format": 1}
        (d / "signing.next.pub").replace(d / "signing.pub")
        nxt.replace(d / "signing.key")  # the old private key is gone
        atomic_write(d / "gateway.json", json.dumps(meta, indent=2).encode(), 0o644)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def kid(self) -> str:
        return key_id(self.public_key)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_identity(directory: Path, gateway_id: str, *, force: bool = False) -> Identity:
    if not GATEWAY_ID_RE.match(gateway_id):
        raise IdentityError(
            f"gateway id {gateway_id!r} is not valid: use 3-63 lower-case letters, digits, '-'"
        )
    if (directory / "gateway.json").exists() and not force:
        raise IdentityError(
            f"{directory} already holds an identity; decommission it first or pass --force"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    storage = secrets.token_bytes(32)
    atomic_write(directory / "signing.key",
                 key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    atomic_write(directory / "signing.pub",
                 key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
                 0o644)
    atomic_write(directory / "storage.key", storage)
    ident = Identity(gateway_id, key, storage, directory)
    meta = {"gateway_id": gateway_id, "kid": ident.kid, "format": 1}
    atomic_write(directory / "gateway.json", json.dumps(meta, indent=2).encode(), 0o644)
    return ident


def stage_next_key(directory: Path) -> Ed25519PublicKey:
    """Create the next signing key; the gateway announces it and switches at its next start."""
    load_identity(directory)  # there must be an identity to rotate
    key = Ed25519PrivateKey.generate()
    atomic_write(directory / "signing.next.pub",
                 key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
                 0o644)
    atomic_write(directory / "signing.next.key",
                 key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return key.public_key()


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return key


def load_identity(directory: Path) -> Identity:
    def need(name: str) -> bytes:
        path = directory / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(
                f"{path} is missing: provision this gateway with "
                f"'python gateway.py provision init --identity-dir {directory} --gateway-id ID'"
            ) from None
        except OSError as exc:
            raise IdentityError(f"{path} cannot be read: {exc}") from None

    try:
        meta = json.loads(need("gateway.json"))
        gateway_id = str(meta["gateway_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"{directory / 'gateway.json'} is corrupt ({exc})") from None
    need("signing.key")
    key = _load_private(directory / "signing.key")
    storage = need("storage.key")
    if len(storage) != 32:
        raise IdentityError(f"{directory / 'storage.key'} must hold 32 bytes, has {len(storage)}")
    return Identity(gateway_id, key, storage, directory)


def load_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted gateway keys for the verifier, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise IdentityError(f"{path} is not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys
