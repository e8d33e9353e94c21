"""The gateway's identity and key store: who it is, how it signs, how it encrypts at rest.

The **identity key** signs only certificates (:mod:`core.session`): of the session key
made in RAM at each start, and of the next identity key at a rotation. Records are signed
by the session key. Where a TPM 2.0 can be had, the identity key lives in it and never
leaves it, and the storage key is sealed by it (:mod:`provisioning.tpm`): a copy of the
SD card then signs nothing and decrypts nothing (docs/threat-model.md). Without a TPM
both are files (class ``file``): the demo and hardware without one, said in every
session certificate and warned about by ``provision check``.

An identity directory holds (mode 0700, files 0600):

* ``gateway.json`` - gateway id, suite, identity key id, algorithm and class, the TPM's
  TCTI; written last by ``provision init``, so an identity without it is an unfinished one
  (``provision init`` again);
* ``signing.key`` - the identity key: a TPM key blob (class ``tpm``; its private part is
  wrapped by the TPM's storage root key), or the private key (class ``file``: Ed25519 in
  PKCS#8 PEM, other algorithms as JSON);
* ``signing.pub`` - what the platform registers (JSON: gateway id, algorithm, key, key id,
  class, suite), for enrolment;
* ``storage.key`` - the store's key (32 bytes for AES-256-GCM, 16 for SM4-GCM), raw
  (class ``file``) or sealed by the TPM (a sealed-object blob);
* while a rotation is staged: ``signing.next.key`` and ``signing.next.pub``;
* while a staged key is being promoted: ``rotation.json``, the intent;
* ``tls.key`` - the TLS client key (ECDSA P-256, PKCS#8 PEM, mode 0600: a file even with a
  TPM, which Python's TLS cannot use) and ``tls.csr``, its certificate signing request
  (CN = the gateway id, the identity key id in an extension, :data:`core.enrolment.KID_OID`),
  both made by ``provision init``;
* ``enc.key`` and ``enc.pub`` - the encryption key the platform's pairing commands are
  encrypted to (:mod:`provisioning.box`, docs/commands.md), made last by ``provision init``;
* after enrolment (``provision enrol``, docs/enrolment.md): ``tls.crt`` (the gateway's
  certificate), ``ca.crt`` (the platform's CA) and the platform's command material
  (``command-*.pub``, ``command-*.json``), installed together by :func:`install_files`
  (its intent: ``install.json``).

Every write is atomic and durable (:mod:`core.durable`: temporary file, fsync, rename,
fsync of the directory); the directory's creation fsyncs its parent.

Multi-file changes and their recovery (:func:`recover_identity`, run by
:func:`load_identity` before it reads): the private keys are the truth, the public
files and ``gateway.json``'s key id are derived from them.

* staging (``provision rotate-key``) writes ``signing.next.pub`` then
  ``signing.next.key``; the latter is the commit point. A ``signing.next.pub`` alone is
  rolled back; a ``signing.next.pub`` that does not match ``signing.next.key`` is
  rewritten from it.
* promotion (after the ``key.rotate`` record that certifies the staged key is
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
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from core import durable
from core.durable import atomic_write
from core.errors import UserError
from core.record import JSON, b64u, unb64u
from core.suites import (
    DEFAULT_SUITE,
    ED25519,
    SoftwareKey,
    Suite,
    UnknownAlgorithmError,
    key_id,
    suite,
)

__all__ = ["GATEWAY_ID_RE", "TPM_ENV", "Identity", "IdentityError", "IdentityKey",
           "atomic_write", "check_tcti", "create_identity", "find_tpm", "install_files",
           "load_identity", "promotion_steps", "recover_identity", "registration",
           "stage_next_key", "staging_steps", "tls_request"]

GATEWAY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
META = "gateway.json"
KEY = "signing.key"
PUB = "signing.pub"
STORAGE = "storage.key"
NEXT_KEY = "signing.next.key"
NEXT_PUB = "signing.next.pub"
#: The intent of a promotion: written once its key.rotate record is committed.
INTENT = "rotation.json"
TLS_KEY = "tls.key"
TLS_CSR = "tls.csr"
TLS_CERT = "tls.crt"
CA_CERT = "ca.crt"
#: The intent of an installation of several files (:func:`install_files`).
INSTALL_INTENT = "install.json"
IDENTITY_FILES = (META, KEY, PUB, STORAGE, NEXT_KEY, NEXT_PUB, INTENT, TLS_KEY, TLS_CSR,
                  TLS_CERT, CA_CERT, INSTALL_INTENT)
#: Files :func:`install_files` may install (the others are the identity's own); ``tls.key``
#: with its certificate at a renewal (provisioning/renewal.py), mode 0600.
INSTALLABLE = re.compile(
    r"^(?:tls\.key|tls\.crt|ca\.crt|command-[a-z0-9][a-z0-9._-]{0,54}\.(?:pub|json))$")
PUBLIC_MODE = 0o644
#: Overrides the TCTI that gateway.json names (the TPM moved to another bus; a lab TPM).
TPM_ENV = "SMARTCORR_TPM"
#: The TCTIs of tpm2-tss an installer names (``name:config``), then tpm2-tss's others.
COMMON_TCTIS = ("device", "swtpm", "mssim", "tabrmd")
OTHER_TCTIS = ("libtpms", "cmd", "spi-helper", "i2c-helper", "spidev", "spi-ltt2go",
               "spi-ftdi", "i2c-ftdi", "pcap")
TCTI_EXAMPLES = "device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321"
#: The kernel's TPM resource manager (tpm_tis_spi on a Raspberry Pi TPM module).
DEVICE_TPM = "/dev/tpmrm0"
META_FORMAT = 2
Step = Callable[[], None]


class IdentityError(UserError):
    """The identity directory is missing, incomplete or unusable; the message says how to fix it."""


class IdentityKey(Protocol):
    """An identity key: in a TPM (class ``tpm``) or a file (class ``file``)."""

    @property
    def alg(self) -> str: ...

    @property
    def public_raw(self) -> bytes: ...

    @property
    def key_class(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def check_tcti(tcti: str, where: str = "--tpm", fix: str = "or --no-tpm") -> str:
    """*tcti* when it is a TCTI tpm2-tss knows (``name`` or ``name:config``); else an
    IdentityError naming *where* it came from (an empty or malformed one, an unknown name)."""
    name = tcti.partition(":")[0]
    if not name or any(c.isspace() or not c.isprintable() for c in tcti):
        raise IdentityError(f"{where}: give a TCTI such as {TCTI_EXAMPLES}, {fix}")
    if name not in COMMON_TCTIS + OTHER_TCTIS:
        raise IdentityError(f"{where}: unknown TCTI {name!r} (known: {', '.join(COMMON_TCTIS)}; "
                            f"also {', '.join(OTHER_TCTIS)}): give a TCTI such as "
                            f"{TCTI_EXAMPLES}, {fix}")
    return tcti


def find_tpm(choice: str = "auto") -> str | None:
    """The TCTI to use: *choice* itself, or for ``auto`` :data:`TPM_ENV`, else the kernel's
    resource manager ``/dev/tpmrm0`` when present, else None (no TPM). IdentityError for a
    TCTI that is empty, malformed or of an unknown name."""
    if choice != "auto":
        return check_tcti(choice)
    if os.environ.get(TPM_ENV):
        return check_tcti(os.environ[TPM_ENV], f"${TPM_ENV}={os.environ[TPM_ENV]}",
                          f"or unset {TPM_ENV}")
    return f"device:{DEVICE_TPM}" if Path(DEVICE_TPM).exists() else None


def kid_of(key: IdentityKey) -> str:
    return key_id(key.alg, key.public_raw)


def registration(gateway_id: str, key: IdentityKey, suite_name: str) -> dict[str, JSON]:
    """What the platform registers for this gateway (``signing.pub``; docs/records.md)."""
    return {"format": 2, "gateway_id": gateway_id, "alg": key.alg, "key": b64u(key.public_raw),
            "kid": kid_of(key), "class": key.key_class, "suite": suite_name}


def _public_bytes(gateway_id: str, key: IdentityKey, suite_name: str) -> bytes:
    return json.dumps(registration(gateway_id, key, suite_name), indent=2,
                      sort_keys=True).encode() + b"\n"


def _file_key_bytes(key: SoftwareKey) -> bytes:
    if key.alg == ED25519:  # PKCS#8 PEM, as every identity of format 1
        return Ed25519PrivateKey.from_private_bytes(key.private_bytes()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return json.dumps({"format": 1, "class": "file", "alg": key.alg,
                       "private": b64u(key.private_bytes()),
                       "public": b64u(key.public_raw)}).encode()


class _Keys:
    """Loads and makes keys for one identity directory; opens its TPM at most once."""

    def __init__(self, tcti: str | None, source: str = "the identity (gateway.json)") -> None:
        self.tcti = os.environ.get(TPM_ENV) or tcti
        #: Where the TCTI comes from, for error messages.
        self.source = f"${TPM_ENV}" if os.environ.get(TPM_ENV) else source
        self._tpm: Any = None
        self._lock = threading.Lock()

    def tpm(self) -> Any:
        with self._lock:
            if self._tpm is None:
                if not self.tcti:
                    raise IdentityError("this identity's keys are in a TPM, but no TPM is "
                                        f"named: set {TPM_ENV}=TCTI (e.g. device:/dev/tpmrm0)")
                from provisioning.tpm import TpmError, open_tpm

                if self.source == "--tpm":
                    check_tcti(self.tcti)
                else:
                    check_tcti(self.tcti, f"the TPM {self.tcti!r} named by {self.source}",
                               f"or unset {TPM_ENV}" if self.source.startswith("$")
                               else f"or set {TPM_ENV}=TCTI to override it")
                try:
                    self._tpm = open_tpm(self.tcti)
                except TpmError as exc:
                    if self.source == "--tpm":
                        raise
                    raise TpmError(
                        f"{exc}. This identity's TPM is {self.tcti} (named by {self.source}); "
                        f"if the TPM moved or a lab TPM restarted elsewhere, {TPM_ENV}=TCTI "
                        f"overrides it (e.g. {TPM_ENV}=swtpm:host=127.0.0.1,port=2321)"
                    ) from None
            return self._tpm

    def close(self) -> None:
        with self._lock:
            if self._tpm is not None:
                self._tpm.close()
                self._tpm = None

    def create(self, alg: str, key_class: str) -> tuple[bytes, IdentityKey]:
        """A new key: the bytes of its key file and the key."""
        if key_class == "tpm":
            tpm = self.tpm()
            blob = tpm.create_signing_key(alg)
            return blob.to_json(), tpm.load_signing_key(blob)
        soft = SoftwareKey.generate(alg)
        return _file_key_bytes(soft), soft

    def load(self, path: Path) -> IdentityKey:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"{path} is missing: restore the identity directory from "
                                "backup or provision it anew ('provision init')") from None
        except OSError as exc:
            raise IdentityError(f"{path} cannot be read ({exc})") from None
        if data.startswith(b"-----BEGIN"):
            return _load_pem(path, data)
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise IdentityError(f"{path} is not a key file (PEM or JSON): restore the "
                                "identity directory from backup")
        if "kind" in obj:  # a TPM key blob
            from provisioning.tpm import KeyBlob

            tpm = self.tpm()
            return tpm.load_signing_key(KeyBlob.from_json(data))  # type: ignore[no-any-return]
        try:
            return SoftwareKey(str(obj["alg"]), unb64u(str(obj["private"])),
                               unb64u(str(obj["public"])))
        except (KeyError, ValueError, UnknownAlgorithmError) as exc:
            raise IdentityError(f"{path} is not a usable key file ({exc})") from None

    def storage_key(self, path: Path, storage_class: str, the_suite: Suite) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"{path} cannot be read ({exc}): restore it from "
                                "backup") from None
        if storage_class == "tpm":
            from provisioning.tpm import KeyBlob

            data = self.tpm().unseal(KeyBlob.from_json(data))
        if len(data) != the_suite.storage_key_bytes:
            raise IdentityError(f"{path} must hold a {the_suite.storage_key_bytes}-byte "
                                f"{the_suite.aead_name} key, has {len(data)} bytes")
        return data

    def seal_storage(self, key: bytes, storage_class: str) -> bytes:
        if storage_class == "tpm":
            return bytes(self.tpm().seal(key).to_json())
        return key


def _load_pem(path: Path, data: bytes) -> IdentityKey:
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path} is not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return SoftwareKey(ED25519, key.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                  NoEncryption()))


@dataclass(frozen=True)
class Identity:
    gateway_id: str
    suite: Suite
    key: IdentityKey
    storage_key: bytes
    directory: Path
    storage_class: str = "file"
    keys: _Keys = field(default_factory=lambda: _Keys(None), repr=False, compare=False)

    @property
    def kid(self) -> str:
        return kid_of(self.key)

    @property
    def key_class(self) -> str:
        return self.key.key_class

    @property
    def next_key(self) -> IdentityKey | None:
        """A key staged by 'provision rotate-key', certified at the next start."""
        path = self.directory / NEXT_KEY
        if not path.exists():
            return None
        return self.keys.load(path)

    def promote_next_key(self) -> None:
        """After the key.rotate record is committed: the staged key becomes the key."""
        for step in promotion_steps(self.directory, self.keys):
            step()

    def registration(self) -> dict[str, JSON]:
        return registration(self.gateway_id, self.key, self.suite.name)

    def session_key(self) -> SoftwareKey:
        """A new session key of the suite, in RAM only."""
        return SoftwareKey.generate(self.suite.alg)

    def close(self) -> None:
        """Close the TPM connection (if any)."""
        self.keys.close()


def _meta(gateway_id: str, key: IdentityKey, suite_name: str, tcti: str | None,
          storage_class: str) -> bytes:
    return json.dumps({"format": META_FORMAT, "gateway_id": gateway_id, "kid": kid_of(key),
                       "alg": key.alg, "class": key.key_class, "suite": suite_name,
                       "storage": storage_class, "tpm": tcti}, indent=2).encode()


def create_identity(directory: Path, gateway_id: str, *, force: bool = False,
                    suite_name: str = DEFAULT_SUITE, tpm: str | None = None) -> Identity:
    """A new identity: with *tpm* (a TCTI) its key in that TPM and the storage key sealed
    by it; without, both in files."""
    if not GATEWAY_ID_RE.match(gateway_id):
        raise IdentityError(
            f"gateway id {gateway_id!r} is not valid: use 3-63 lower-case letters, digits, '-'"
        )
    if tpm is not None:
        check_tcti(tpm)  # an empty one is an error, not "no TPM"
    try:
        the_suite = suite(suite_name)
    except UnknownAlgorithmError as exc:
        raise IdentityError(str(exc)) from None
    if (directory / META).exists() and not force:
        raise IdentityError(
            f"{directory} already holds an identity; decommission it first or pass --force"
        )
    bound = _under_storage_key(directory)
    if bound:
        raise IdentityError(
            f"{directory} holds {', '.join(bound)}: encrypted under the storage key of the "
            "identity there, which a new identity replaces, so nothing could read them any "
            "more. Decommission the gateway (provision decommission: it delivers the final "
            "record and removes them), or unpair the devices first; to discard them "
            "anyway, move those files out of the directory yourself"
        )
    try:
        durable.make_dirs(directory, 0o700)
    except OSError as exc:
        raise IdentityError(f"{directory}: cannot create the identity directory ({exc})") \
            from None
    keys = _Keys(tpm, "--tpm")
    key_class = "tpm" if tpm else "file"
    alg = the_suite.identity_algs[0]
    if key_class == "tpm":
        supported = [a for a in the_suite.identity_algs if keys.tpm().supports(a)]
        if not supported:
            raise IdentityError(f"the TPM at {tpm} holds none of {the_suite.identity_algs}")
        alg = supported[0]
    key_bytes, key = keys.create(alg, key_class)
    storage = the_suite.new_storage_key()
    sealed = keys.seal_storage(storage, key_class)
    # gateway.json goes first and comes back last: until then this is no identity
    for name in (META, INTENT, NEXT_KEY, NEXT_PUB, TLS_CERT, CA_CERT, INSTALL_INTENT,
                 "enc.key", "enc.pub"):  # a former identity's certificate, encryption key
        durable.remove(directory / name)
    atomic_write(directory / KEY, key_bytes)
    atomic_write(directory / PUB, _public_bytes(gateway_id, key, the_suite.name), PUBLIC_MODE)
    atomic_write(directory / STORAGE, sealed)
    tls_request(directory, gateway_id, kid_of(key), new_key=True)
    atomic_write(directory / META, _meta(gateway_id, key, the_suite.name, tpm, key_class),
                 PUBLIC_MODE)
    identity = Identity(gateway_id, the_suite, key, storage, directory, key_class, keys)
    from provisioning.box import ensure_box_key  # what the platform encrypts device keys to

    ensure_box_key(identity)
    return identity


def _under_storage_key(directory: Path) -> list[str]:
    """What *directory* holds under its identity's storage key that a new identity could
    not read: paired tags and kiosks (their keys), local actions not yet erased from the
    journal. Empty registries and an empty journal do not count."""
    from provisioning.actions import JOURNAL_FILE
    from provisioning.kiosks import KIOSKS_FILE
    from provisioning.registry import REGISTRY_FILE

    found = []
    for name, table, what in ((REGISTRY_FILE, "tags", "paired tag"),
                              (KIOSKS_FILE, "kiosks", "paired kiosk")):
        try:
            data = json.loads((directory / name).read_bytes())
            count = len(data.get(table) or {})
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError, TypeError):
            found.append(f"{name} (unreadable)")
            continue
        if count:
            found.append(f"{count} {what}{'s' if count > 1 else ''} ({name})")
    try:  # the header line, then an entry a line (provisioning/actions.py)
        lines = (directory / JOURNAL_FILE).read_bytes().splitlines()[1:]
    except FileNotFoundError:
        lines = []
    except OSError:
        lines = [b"unreadable"]
    waiting = sum(1 for line in lines if line.strip())
    if waiting:
        found.append(f"{waiting} local action{'s' if waiting > 1 else ''} not yet recorded "
                     f"by the daemon ({JOURNAL_FILE})")
    return found


def tls_request(directory: Path, gateway_id: str, kid: str, *, new_key: bool = False) -> bytes:
    """The CSR (PEM) of the TLS key in *directory* (made when missing or *new_key*): CN
    *gateway_id*, the identity key id *kid* in the extension :data:`core.enrolment.KID_OID`;
    written to ``tls.csr`` too."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from core.enrolment import kid_extension

    path = directory / TLS_KEY
    if new_key or not path.exists():
        tls_key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(path, tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                 NoEncryption()))
    else:
        loaded = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{path} is not an EC private key: move it away and run "
                                "'provision enrol' again (it makes a new one)")
        tls_key = loaded
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
           .add_extension(kid_extension(kid), critical=False)
           .sign(tls_key, hashes.SHA256()))
    pem = csr.public_bytes(Encoding.PEM)
    atomic_write(directory / TLS_CSR, pem, PUBLIC_MODE)
    return pem


def install_files(directory: Path, files: dict[str, bytes]) -> None:
    """Install *files* (names :data:`INSTALLABLE`, mode 0644, ``tls.key`` 0600) in
    *directory* together: each is staged as ``.NAME.new``, then the intent ``install.json``
    names them (the commit point), then each is renamed over its name, then the intent
    goes. A power cut
    before the intent leaves the old files (the staged ones are removed at the next
    :func:`recover_identity`); after it, the next one completes the installation."""
    for name in files:
        if not INSTALLABLE.fullmatch(name):
            raise IdentityError(f"{name!r} is not a file enrolment installs")
    for name, data in files.items():
        atomic_write(directory / f".{name}.new", data, 0o600 if name == TLS_KEY else PUBLIC_MODE)
    atomic_write(directory / INSTALL_INTENT, json.dumps(sorted(files)).encode())
    _complete_install(directory)


def _complete_install(directory: Path) -> list[str]:
    """Rename the staged files the intent names, then remove the intent; what was done."""
    names = _read_json_list(directory / INSTALL_INTENT)
    done = []
    for name in names:
        staged = directory / f".{name}.new"
        if staged.exists():
            durable.replace(staged, directory / name)
            done.append(name)
    durable.remove(directory / INSTALL_INTENT)
    return done


def _recover_install(directory: Path) -> list[str]:
    if (directory / INSTALL_INTENT).exists():
        names = _complete_install(directory)
        return [f"completed an interrupted installation ({', '.join(names) or 'nothing left'})"]
    staged = [p for p in directory.glob(".*.new*")
              if INSTALLABLE.fullmatch(p.name.lstrip(".").split(".new")[0])]
    for path in staged:
        durable.remove(path)
    return [f"removed an unfinished installation ({len(staged)} staged files)"] if staged else []


def _read_json_list(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is corrupt ({exc}): remove it and enrol again") from None
    if not isinstance(data, list) or not all(isinstance(n, str) and INSTALLABLE.fullmatch(n)
                                             for n in data):
        raise IdentityError(f"{path} is corrupt (not a list of installable files): remove it "
                            "and enrol again")
    return data


def staging_steps(directory: Path, keys: _Keys | None = None) -> list[Step]:
    """The durable steps of staging a new key; the last one is the commit point. The new
    key is of the current one's algorithm and class."""
    meta = _read_meta(directory)
    keys = keys or _Keys(meta.tcti)
    current = keys.load(directory / KEY)
    key_bytes, key = keys.create(current.alg, current.key_class)
    public = _public_bytes(meta.gateway_id, key, meta.suite)
    return [lambda: atomic_write(directory / NEXT_PUB, public, PUBLIC_MODE),
            lambda: atomic_write(directory / NEXT_KEY, key_bytes)]


def stage_next_key(directory: Path) -> IdentityKey:
    """Create the next identity key; the gateway certifies it and switches at its next start."""
    ident = load_identity(directory)  # there must be an identity to rotate (none half-done)
    try:
        for step in staging_steps(directory, ident.keys):
            step()
        return ident.keys.load(directory / NEXT_KEY)
    finally:
        ident.close()


def promotion_steps(directory: Path, keys: _Keys | None = None) -> list[Step]:
    """The durable steps of promoting the staged key (none when nothing is staged). Only
    after its ``key.rotate`` record is committed: the intent says the platform knows it."""
    nxt = directory / NEXT_KEY
    if not nxt.exists():
        return []
    keys = keys or _Keys(_read_meta(directory).tcti)
    intent = {"from": kid_of(keys.load(directory / KEY)), "to": kid_of(keys.load(nxt))}
    return [lambda: atomic_write(directory / INTENT, json.dumps(intent).encode()),
            *_completion_steps(directory, keys)]


def _completion_steps(directory: Path, keys: _Keys) -> list[Step]:
    """After the intent: the staged key over the key, then the derived files."""
    def adopt() -> None:
        if (directory / NEXT_KEY).exists():
            durable.replace(directory / NEXT_KEY, directory / KEY)  # the old key is gone

    def derive() -> None:
        meta = _read_meta(directory)
        atomic_write(directory / PUB, _public_bytes(meta.gateway_id, keys.load(directory / KEY),
                                                    meta.suite), PUBLIC_MODE)

    def write_meta() -> None:
        meta = _read_meta(directory)
        atomic_write(directory / META, _meta(meta.gateway_id, keys.load(directory / KEY),
                                             meta.suite, meta.tcti, meta.storage), PUBLIC_MODE)

    return [adopt, derive, lambda: durable.remove(directory / NEXT_PUB), write_meta,
            lambda: durable.remove(directory / INTENT)]


def recover_identity(directory: Path, keys: _Keys | None = None) -> list[str]:
    """Complete or roll back an interrupted change (module docstring); what it did."""
    done: list[str] = []
    for name in IDENTITY_FILES:
        tmp = directory / f".{name}.tmp"
        if tmp.exists():
            durable.remove(tmp)
            done.append(f"removed the unfinished write {tmp.name}")
    done += _recover_install(directory)
    if not (directory / META).exists():
        return done  # not (or not yet) an identity: load_identity says so
    meta = _read_meta(directory)
    keys = keys or _Keys(meta.tcti)
    if (directory / INTENT).exists():
        _complete_promotion(directory, keys)
        return [*done, "completed an interrupted key promotion"]
    nxt_key, nxt_pub = directory / NEXT_KEY, directory / NEXT_PUB
    if nxt_key.exists():
        if _sync_public(nxt_pub, _public_bytes(meta.gateway_id, keys.load(nxt_key),
                                               meta.suite)):
            done.append(f"rewrote {NEXT_PUB} from {NEXT_KEY}")
    elif nxt_pub.exists():
        durable.remove(nxt_pub)
        done.append(f"rolled back an unfinished staging ({NEXT_PUB} without {NEXT_KEY})")
    if (directory / KEY).exists() and _sync_public(
            directory / PUB, _public_bytes(meta.gateway_id, keys.load(directory / KEY),
                                           meta.suite)):
        done.append(f"rewrote {PUB} from {KEY}")
    return done


def _complete_promotion(directory: Path, keys: _Keys) -> None:
    intent = _read_json(directory / INTENT)
    target = intent.get("to")
    nxt = directory / NEXT_KEY
    staged = kid_of(keys.load(nxt)) if nxt.exists() else None
    current = kid_of(keys.load(directory / KEY))
    if target not in (staged, current):
        raise IdentityError(
            f"{directory / INTENT} promotes key {target!r}, but neither {KEY} nor {NEXT_KEY} "
            "holds it: restore the identity directory from backup")
    if staged is not None and staged != target:
        raise IdentityError(f"{nxt} is not the key {directory / INTENT} promotes: "
                            "restore the identity directory from backup")
    for step in _completion_steps(directory, keys):
        step()


def _sync_public(pub: Path, want: bytes) -> bool:
    """Make *pub* hold *want*; True when it had to be (re)written."""
    try:
        if pub.read_bytes() == want:
            return False
    except FileNotFoundError:
        pass
    atomic_write(pub, want, PUBLIC_MODE)
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is corrupt ({exc}): restore it from backup") from None
    if not isinstance(data, dict):
        raise IdentityError(f"{path} is corrupt (not a JSON object): restore it from backup")
    return data


@dataclass(frozen=True)
class _Meta:
    gateway_id: str
    kid: str | None
    suite: str
    tcti: str | None
    storage: str


def _read_meta(directory: Path) -> _Meta:
    """gateway.json (format 1: Ed25519 files, no suite)."""
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
    suite_name = meta.get("suite", DEFAULT_SUITE)
    storage = meta.get("storage", "file")
    tcti = meta.get("tpm")
    if suite_name not in ("ed25519", "sm") or storage not in ("tpm", "file") or \
            not isinstance(tcti, str | None):
        raise IdentityError(f"{path} is corrupt (suite {suite_name!r}, storage {storage!r}, "
                            f"tpm {tcti!r}): restore it from backup")
    return _Meta(gateway_id, kid if isinstance(kid, str) else None, suite_name, tcti, storage)


def load_identity(directory: Path, *, repair: bool = True) -> Identity:
    """The identity in *directory*, after completing or rolling back an interrupted
    change (*repair*; without it such a change is an error, e.g. for read-only tools).
    Opens the identity's TPM when its keys are there (:data:`TPM_ENV` overrides which)."""
    keys = _Keys(_read_meta(directory).tcti)
    try:
        return _load(directory, keys, repair=repair)
    except BaseException:
        keys.close()
        raise


def _load(directory: Path, keys: _Keys, *, repair: bool) -> Identity:
    if repair:
        recover_identity(directory, keys)
    elif (directory / INTENT).exists():
        raise IdentityError(f"{directory}: a key rotation is half done; the gateway "
                            "completes it at its next start")
    meta = _read_meta(directory)
    key = keys.load(directory / KEY)
    if meta.kid is not None and meta.kid != kid_of(key):
        raise IdentityError(
            f"{directory / KEY} (key id {kid_of(key)}) is not the key "
            f"{directory / META} names ({meta.kid}) and no rotation is under way: restore "
            "the identity directory from backup")
    the_suite = suite(meta.suite)
    storage = keys.storage_key(directory / STORAGE, meta.storage, the_suite)
    return Identity(meta.gateway_id, the_suite, key, storage, directory, meta.storage, keys)
