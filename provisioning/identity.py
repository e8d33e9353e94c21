"""The gateway's identity and key store: who it is, how it signs, how it encrypts at rest.

An identity directory holds (mode 0700, files 0600):

* ``gateway.json`` - gateway id and the signing key id; written last by ``provision
  init``, so an identity without it is an unfinished one (``provision init`` again);
* ``signing.key`` - Ed25519 private key, PKCS#8 PEM;
* ``signing.pub`` - its public key, for enrolment at the platform;
* ``storage.key`` - 32 random bytes, the AES-256-GCM key of the record store;
* while a rotation is staged: ``signing.next.key`` and ``signing.next.pub``;
* while a staged key is being promoted: ``rotation.json``, the intent.

Every write is atomic and durable (:mod:`core.durable`: temporary file, fsync, rename,
fsync of the directory); the directory's creation fsyncs its parent.

Multi-file changes and their recovery (:func:`recover_identity`, run by
:func:`load_identity` before it reads): the private keys are the truth, the public
files and ``gateway.json``'s key id are derived from them.

* staging (``provision rotate-key``) writes ``signing.next.pub`` then
  ``signing.next.key``; the latter is the commit point. A ``signing.next.pub`` alone is
  rolled back; a ``signing.next.pub`` that does not match ``signing.next.key`` is
  rewritten from it.
* promotion (after the ``key.rotate`` record that announces the staged key is
  committed) writes ``rotation.json`` (from, to), then renames ``signing.next.key`` over
  ``signing.key``, rewrites ``signing.pub`` and ``gateway.json``, removes
  ``signing.next.pub`` and finally ``rotation.json``. With ``rotation.json`` present the
  next start completes the promotion (the platform was told of the new key: the record
  was committed before the intent was written); without it a staged key is announced
  again (a second announcement of the same key is harmless).
* a ``signing.key`` whose key id is not the one ``gateway.json`` names, with no
  promotion under way, is refused: the identity was tampered with or mixed up.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from core import durable
from core.durable import atomic_write
from core.errors import UserError
from core.record import key_id

__all__ = ["GATEWAY_ID_RE", "Identity", "IdentityError", "atomic_write", "create_identity",
           "load_identity", "load_public_keys", "promotion_steps", "recover_identity",
           "stage_next_key", "staging_steps"]

GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
META = "gateway.json"
KEY = "signing.key"
PUB = "signing.pub"
STORAGE = "storage.key"
NEXT_KEY = "signing.next.key"
NEXT_PUB = "signing.next.pub"
#: The intent of a promotion: written once its key.rotate record is committed.
INTENT = "rotation.json"
IDENTITY_FILES = (META, KEY, PUB, STORAGE, NEXT_KEY, NEXT_PUB, INTENT)
PUBLIC_MODE = 0o644
STORAGE_KEY_BYTES = 32
Step = Callable[[], None]


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
        path = self.directory / NEXT_KEY
        if not path.exists():
            return None
        return _load_private(path)

    def promote_next_key(self) -> None:
        """After the key.rotate record is committed: the staged key becomes the key."""
        for step in promotion_steps(self.directory):
            step()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def kid(self) -> str:
        return key_id(self.public_key)


def _pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _meta(gateway_id: str, key: Ed25519PrivateKey) -> bytes:
    return json.dumps({"gateway_id": gateway_id, "kid": key_id(key.public_key()), "format": 1},
                      indent=2).encode()


def create_identity(directory: Path, gateway_id: str, *, force: bool = False) -> Identity:
    if not GATEWAY_ID_RE.match(gateway_id):
        raise IdentityError(
            f"gateway id {gateway_id!r} is not valid: use 3-63 lower-case letters, digits, '-'"
        )
    if (directory / META).exists() and not force:
        raise IdentityError(
            f"{directory} already holds an identity; decommission it first or pass --force"
        )
    try:
        durable.make_dirs(directory, 0o700)
    except OSError as exc:
        raise IdentityError(f"{directory}: cannot create the identity directory ({exc})") \
            from None
    key = Ed25519PrivateKey.generate()
    storage = secrets.token_bytes(STORAGE_KEY_BYTES)
    # gateway.json goes first and comes back last: until then this is no identity
    for name in (META, INTENT, NEXT_KEY, NEXT_PUB):
        durable.remove(directory / name)
    atomic_write(directory / KEY, _pem_private(key))
    atomic_write(directory / PUB, _pem_public(key), PUBLIC_MODE)
    atomic_write(directory / STORAGE, storage)
    atomic_write(directory / META, _meta(gateway_id, key), PUBLIC_MODE)
    return Identity(gateway_id, key, storage, directory)


def staging_steps(directory: Path) -> list[Step]:
    """The durable steps of staging a new key; the last one is the commit point."""
    key = Ed25519PrivateKey.generate()
    return [lambda: atomic_write(directory / NEXT_PUB, _pem_public(key), PUBLIC_MODE),
            lambda: atomic_write(directory / NEXT_KEY, _pem_private(key))]


def stage_next_key(directory: Path) -> Ed25519PublicKey:
    """Create the next signing key; the gateway announces it and switches at its next start."""
    load_identity(directory)  # there must be an identity to rotate (and no rotation half-done)
    for step in staging_steps(directory):
        step()
    return _load_private(directory / NEXT_KEY).public_key()


def promotion_steps(directory: Path) -> list[Step]:
    """The durable steps of promoting the staged key (none when nothing is staged). Only
    after its ``key.rotate`` record is committed: the intent says the platform knows it."""
    nxt = directory / NEXT_KEY
    if not nxt.exists():
        return []
    intent = {"from": key_id(_load_private(directory / KEY).public_key()),
              "to": key_id(_load_private(nxt).public_key())}
    return [lambda: atomic_write(directory / INTENT, json.dumps(intent).encode()),
            *_completion_steps(directory)]


def _completion_steps(directory: Path) -> list[Step]:
    """After the intent: the staged key over the key, then the derived files."""
    def adopt() -> None:
        if (directory / NEXT_KEY).exists():
            durable.replace(directory / NEXT_KEY, directory / KEY)  # the old key is gone

    def derive() -> None:
        key = _load_private(directory / KEY)
        atomic_write(directory / PUB, _pem_public(key), PUBLIC_MODE)

    def meta() -> None:
        key = _load_private(directory / KEY)
        atomic_write(directory / META, _meta(_read_meta(directory)[0], key), PUBLIC_MODE)

    return [adopt, derive, lambda: durable.remove(directory / NEXT_PUB), meta,
            lambda: durable.remove(directory / INTENT)]


def recover_identity(directory: Path) -> list[str]:
    """Complete or roll back an interrupted change (module docstring); what it did."""
    done: list[str] = []
    for name in IDENTITY_FILES:
        tmp = directory / f".{name}.tmp"
        if tmp.exists():
            durable.remove(tmp)
            done.append(f"removed the unfinished write {tmp.name}")
    if not (directory / META).exists():
        return done  # not (or not yet) an identity: load_identity says so
    if (directory / INTENT).exists():
        _complete_promotion(directory)
        return [*done, "completed an interrupted key promotion"]
    nxt_key, nxt_pub = directory / NEXT_KEY, directory / NEXT_PUB
    if nxt_key.exists():
        if _sync_public(nxt_pub, _load_private(nxt_key)):
            done.append(f"rewrote {NEXT_PUB} from {NEXT_KEY}")
    elif nxt_pub.exists():
        durable.remove(nxt_pub)
        done.append(f"rolled back an unfinished staging ({NEXT_PUB} without {NEXT_KEY})")
    if (directory / KEY).exists() and _sync_public(directory / PUB,
                                                   _load_private(directory / KEY)):
        done.append(f"rewrote {PUB} from {KEY}")
    return done


def _complete_promotion(directory: Path) -> None:
    intent = _read_json(directory / INTENT)
    target = intent.get("to")
    nxt = directory / NEXT_KEY
    staged = key_id(_load_private(nxt).public_key()) if nxt.exists() else None
    current = key_id(_load_private(directory / KEY).public_key())
    if target not in (staged, current):
        raise IdentityError(
            f"{directory / INTENT} promotes key {target!r}, but neither {KEY} nor {NEXT_KEY} "
            "holds it: restore the identity directory from backup")
    if staged is not None and staged != target:
        raise IdentityError(f"{nxt} is not the key {directory / INTENT} promotes: "
                            "restore the identity directory from backup")
    for step in _completion_steps(directory):
        step()


def _sync_public(pub: Path, key: Ed25519PrivateKey) -> bool:
    """Make *pub* the public half of *key*; True when it had to be (re)written."""
    want = _pem_public(key)
    try:
        if pub.read_bytes() == want:
            return False
    except FileNotFoundError:
        pass
    atomic_write(pub, want, PUBLIC_MODE)
    return True


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise IdentityError(f"{path} is missing: restore the identity directory from backup "
                            "or provision it anew ('provision init')") from None
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return key


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is corrupt ({exc}): restore it from backup") from None
    if not isinstance(data, dict):
        raise IdentityError(f"{path} is corrupt (not a JSON object): restore it from backup")
    return data


def _read_meta(directory: Path) -> tuple[str, str | None]:
    """gateway.json's gateway id and key id."""
    path = directory / META
    if not path.exists():
        raise IdentityError(
            f"{path} is missing: provision this gateway with "
            f"'python gateway.py provision init --identity-dir {directory} --gateway-id ID'")
    meta = _read_json(path)
    gateway_id, kid = meta.get("gateway_id"), meta.get("kid")
    if not isinstance(gateway_id, str) or not GATEWAY_ID_RE.match(gateway_id):
        raise IdentityError(f"{path} is corrupt (gateway_id {gateway_id!r}): restore it "
                            "from backup")
    return gateway_id, kid if isinstance(kid, str) else None


def load_identity(directory: Path, *, repair: bool = True) -> Identity:
    """The identity in *directory*, after completing or rolling back an interrupted
    change (*repair*; without it such a change is an error, e.g. for read-only tools)."""
    if repair:
        recover_identity(directory)
    elif (directory / INTENT).exists():
        raise IdentityError(f"{directory}: a key rotation is half done; the gateway "
                            "completes it at its next start")
    gateway_id, kid = _read_meta(directory)
    key = _load_private(directory / KEY)
    if kid is not None and kid != key_id(key.public_key()):
        raise IdentityError(
            f"{directory / KEY} (key id {key_id(key.public_key())}) is not the key "
            f"{directory / META} names ({kid}) and no rotation is under way: restore the "
            "identity directory from backup")
    try:
        storage = (directory / STORAGE).read_bytes()
    except OSError as exc:
        raise IdentityError(f"{directory / STORAGE} cannot be read ({exc}): restore it from "
                            "backup") from None
    if len(storage) != STORAGE_KEY_BYTES:
        raise IdentityError(f"{directory / STORAGE} must hold {STORAGE_KEY_BYTES} bytes, "
                            f"has {len(storage)}")
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
