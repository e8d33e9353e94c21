"""The gateway's TPM 2.0: a signing key that never leaves it, a storage key it seals.

Why a TPM (docs/threat-model.md, A1): a person with the box at home can copy the SD
card. Keys kept in files on the card would let the copy sign invented records and
decrypt the store. Here the identity key is made inside the TPM (``sensitiveDataOrigin``,
``fixedTPM``, ``fixedParent``) and the store's key is sealed by it: what lands on the
card (:class:`KeyBlob`) is wrapped by the TPM's storage root key and useless on any
other TPM, or on this one after a TPM clear.

The storage root key (SRK) is a primary key of the owner hierarchy, made again at each
:func:`open_tpm` from the TCG ECC P-256 SRK template (TCG "TPM v2.0 Provisioning
Guidance" v1.0 r1.0, section 7.5.1, the ECC SRK template; the same template is referred
to by "TPM 2.0 Keys for Device Identity and Attestation"). A primary key is derived from
the hierarchy's seed and the template, so it is the same key at every boot, and nothing
needs to be stored in the TPM's NV memory.

Authorisation values are empty on purpose: the attacker we answer (A1) holds a copy of
the card, not the board, and the TPM is soldered to the board. A password would have to
live on the same card, which is no protection. Probing the TPM bus or decapping the
chip is not promised (threat model). Secrets that do cross the bus (the sealed storage
key, in both directions) go through a session salted to the SRK with AES-128-CFB
parameter encryption, so a logic analyser on the SPI lines does not read them.

Without a kernel resource manager (``swtpm:`` or ``device:/dev/tpm0``) the TPM holds
only a few transient objects (3 in the reference implementation) and keeps them after
a process dies. :class:`Tpm` therefore flushes left-over transient objects when it
opens (a TCTI without a resource manager is used by one process only), keeps loaded
keys as saved contexts, and holds at most :data:`RESIDENT_KEYS` of them loaded.

Every failure is a :class:`TpmError` (a :class:`core.errors.UserError`) that says what
is wrong and what to do; no tpm2-pytss exception leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Final, TypeVar

# tpm2-tss logs every failed connection attempt to stderr (WARNING:tcti:..., ERROR:tcti:...)
# before our own message says the same clearly: silent unless the user set TSS2_LOG
# (gateway.py -vv sets it to tpm2-tss's warnings). Set before tpm2-tss reads it.
os.environ.setdefault("TSS2_LOG", "all+none")

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HT,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
    TSS2_RC,
)
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_CONTEXT,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SCHEME_HASH,
    TPMS_SENSITIVE_CREATE,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_PUBLIC_PARMS,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from core.errors import UserError

__all__ = ["ALGS", "ALG_ECDSA_P256", "ALG_SM2", "KIND_SEALED", "KIND_SIGNING", "MAX_SEALED_BYTES",
           "KeyBlob", "Tpm", "TpmError", "TpmSigner", "open_tpm"]

ALG_ECDSA_P256: Final = "ecdsa-p256-sha256"
ALG_SM2: Final = "sm2-sm3"
ALGS: Final = (ALG_ECDSA_P256, ALG_SM2)
KIND_SIGNING: Final = "signing"
KIND_SEALED: Final = "sealed"
#: Version of :meth:`KeyBlob.to_json`'s layout.
BLOB_FORMAT: Final = 1
#: MAX_SYM_DATA of the TPM 2.0 library: the most a sealed data object can hold.
MAX_SEALED_BYTES: Final = 128
#: Signing keys kept loaded at once: the reference TPM has 3 object slots, and loading a
#: key or a sealed object needs 2 (the SRK and the object).
RESIDENT_KEYS: Final = 2
OBJECT_SLOTS: Final = 3
COORD_BYTES: Final = 32
#: The default signer identity of GB/T 32918.2 / GM/T 0009 (and of GmSSL), 16 bytes.
SM2_DEFAULT_ID: Final = b"1234567812345678"
# The SM2 curve (GB/T 32918.5): a, b, and the base point G, for Z_A.
_SM2_P: Final = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
_SM2_A: Final = _SM2_P - 3
_SM2_B: Final = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
_SM2_GX: Final = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
_SM2_GY: Final = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
_CURVES: Final = {ALG_ECDSA_P256: TPM2_ECC.NIST_P256, ALG_SM2: TPM2_ECC.SM2_P256}
_SCHEMES: Final = {ALG_ECDSA_P256: TPM2_ALG.ECDSA, ALG_SM2: TPM2_ALG.SM2}
_TCTI_LAYER: Final = int(TSS2_RC.TCTI_RC_LAYER)
_LAYER_MASK: Final = 0xFF0000

_REPROVISION = ("the identity directory was copied from another gateway (or the TPM was "
                "cleared); re-provision with provision init")

T = TypeVar("T")


class TpmError(UserError):
    """The TPM is missing, refused, or a key blob is not this TPM's; the message says what to do."""


# --- key blobs on disk ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyBlob:
    """What the identity directory stores of a TPM object: its TPM2B_PUBLIC and
    TPM2B_PRIVATE, marshalled. The private part is encrypted and integrity-protected by
    the TPM's storage root key: useless without this TPM."""

    kind: str  # KIND_SIGNING | KIND_SEALED
    alg: str | None  # for signing: ALG_ECDSA_P256 | ALG_SM2; None for sealed
    public: bytes
    private: bytes

    def to_json(self) -> bytes:
        doc = {"format": BLOB_FORMAT, "kind": self.kind, "alg": self.alg,
               "public": base64.b64encode(self.public).decode("ascii"),
               "private": base64.b64encode(self.private).decode("ascii")}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> KeyBlob:
        """Parse and check a blob (shape, base64, TPM structures); TpmError if damaged."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _damaged(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise _damaged("not a JSON object")
        if doc.get("format") != BLOB_FORMAT:
            raise _damaged(f"format {doc.get('format')!r}, this software reads {BLOB_FORMAT}")
        kind, alg = doc.get("kind"), doc.get("alg")
        if not ((kind == KIND_SIGNING and alg in ALGS) or (kind == KIND_SEALED and alg is None)):
            raise _damaged(f"kind {kind!r} with alg {alg!r}")
        parts = []
        for name in ("public", "private"):
            text = doc.get(name)
            if not isinstance(text, str):
                raise _damaged(f"no {name!r} string")
            try:
                parts.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise _damaged(f"{name!r} is not base64") from None
        blob = cls(kind, alg, parts[0], parts[1])
        blob.tpm_objects()
        return blob

    def tpm_objects(self) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
        """The unmarshalled structures; TpmError if the bytes are not exactly one each,
        or the public part is not of this blob's kind and algorithm."""
        public = _unmarshal(TPM2B_PUBLIC, self.public, "public")
        private = _unmarshal(TPM2B_PRIVATE, self.private, "private")
        area = public.publicArea
        if self.kind == KIND_SEALED:
            ok = area.type == TPM2_ALG.KEYEDHASH
        else:
            ok = (area.type == TPM2_ALG.ECC and self.alg in _CURVES
                  and area.parameters.eccDetail.curveID == _CURVES[self.alg]
                  and bool(area.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT))
        if not ok:
            raise _damaged(f"its public part is not a {self.kind} object of alg {self.alg}")
        return public, private


def _unmarshal(cls: Any, data: bytes, name: str) -> Any:
    try:
        value, used = cls.unmarshal(data)
    except TSS2_Exception as exc:
        raise _damaged(f"{name!r} does not parse ({exc})") from None
    if used != len(data):
        raise _damaged(f"{name!r} has {len(data) - used} bytes too many")
    return value


def _damaged(why: str) -> TpmError:
    return TpmError(f"the TPM key file is damaged: {why}; restore it from a backup of this "
                    "gateway's identity directory, or re-provision with provision init")


# --- templates -------------------------------------------------------------------------


def _srk_template() -> TPM2B_PUBLIC:
    """The TCG ECC P-256 SRK template (Provisioning Guidance v1.0 r1.0, 7.5.1): a restricted
    decryption key, AES-128-CFB for its children, unique = 32 zero bytes for x and y."""
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED
             | TPMA_OBJECT.DECRYPT)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                          keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                          mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))),
        unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=bytes(COORD_BYTES), y=bytes(COORD_BYTES)))))


def _ecc_parms(alg: str) -> TPMS_ECC_PARMS:
    """A signing key bound to one scheme: the TPM refuses any other use of it. For SM2 the
    scheme's hash (SHA-256) only fixes the digest size: e = SM3(Z_A || M) is made here."""
    return TPMS_ECC_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=TPMT_ECC_SCHEME(scheme=_SCHEMES[alg], details=TPMU_ASYM_SCHEME(
            anySig=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))),
        curveID=_CURVES[alg],
        kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))


def _signing_template(alg: str) -> TPM2B_PUBLIC:
    """An ordinary (unrestricted) signing key under the SRK, made in and bound to this TPM."""
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=_ecc_parms(alg))))


def _sealed_template() -> TPM2B_PUBLIC:
    """A keyedhash sealed data object: no sign, no decrypt; only TPM2_Unseal reads it."""
    attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.USERWITHAUTH
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
        parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(
            scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL)))))


def _sm3(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def sm2_digest(public_raw: bytes, data: bytes, ident: bytes = SM2_DEFAULT_ID) -> bytes:
    """e = SM3(Z_A || M) of GB/T 32918.2, with Z_A = SM3(ENTL || ID || a || b || xG || yG ||
    xA || yA): what the TPM signs for an SM2 signature that standard verifiers accept."""
    entl = (len(ident) * 8).to_bytes(2, "big")
    curve = b"".join(v.to_bytes(COORD_BYTES, "big") for v in (_SM2_A, _SM2_B, _SM2_GX, _SM2_GY))
    z_a = _sm3(entl + ident + curve + public_raw[1:])
    return _sm3(z_a + data)


# --- the TPM -------------------------------------------------------------------------


class TpmSigner:
    """A signing key loaded in the TPM; :meth:`sign` returns raw r||s (2 x 32 bytes)."""

    key_class = "tpm"

    def __init__(self, tpm: Tpm, alg: str, public_raw: bytes, context: TPMS_CONTEXT) -> None:
        self._tpm = tpm
        self.alg = alg
        #: The uncompressed EC point 0x04 || X || Y (65 bytes).
        self.public_raw = public_raw
        self._context = context

    def sign(self, data: bytes) -> bytes:
        """ecdsa-p256-sha256: ECDSA over SHA-256(data). sm2-sm3: SM2 over data with the
        default ID (GB/T 32918.2). Both as r||s, each 32 bytes big-endian."""
        if self.alg == ALG_SM2:
            digest = sm2_digest(self.public_raw, data)
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.SM2, details=TPMU_SIG_SCHEME(
                sm2=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
        else:
            digest = hashlib.sha256(data).digest()
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(
                ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
        return self._tpm._sign(self, digest, scheme)


class Tpm:
    """One ESAPI connection to a TPM; thread-safe (one lock around every TPM call)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._lock = threading.RLock()
        self._resident: OrderedDict[TpmSigner, ESYS_TR] = OrderedDict()
        self._closed = False
        try:
            self._esys = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise self._unreachable(exc) from None
        try:
            self._flush_leftovers()
            srk = self._call("make the storage root key", lambda: self._esys.create_primary(
                None, _srk_template(), ESYS_TR.OWNER)[0])
            self._srk = self._call("save the storage root key",
                                   lambda: self._esys.context_save(srk))
            self._call("flush the storage root key", lambda: self._esys.flush_context(srk))
        except BaseException:
            self._esys.close()
            raise

    # context manager
    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Flush the keys this connection holds loaded and close it; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._evict(0)
            except TpmError:
                pass  # the TPM is gone; nothing left to flush
            finally:
                self._esys.close()

    # public operations

    def supports(self, alg: str) -> bool:
        """Whether this TPM can hold a signing key of *alg* (TPM2_TestParms on its template)."""
        if alg not in ALGS:
            return False
        if alg == ALG_SM2:
            try:  # e = SM3(Z_A || M) is computed here, by the local OpenSSL
                _sm3(b"")
            except UnsupportedAlgorithm:
                return False
        parms = TPMT_PUBLIC_PARMS(type=TPM2_ALG.ECC,
                                  parameters=TPMU_PUBLIC_PARMS(eccDetail=_ecc_parms(alg)))
        with self._lock:
            self._check_open()
            try:
                self._esys.test_parms(parms)
            except TSS2_Exception as exc:
                if _is_tcti(exc):
                    raise self._lost(exc) from None
                return False
        return True

    def create_signing_key(self, alg: str) -> KeyBlob:
        """A new key pair made inside the TPM; only its wrapped form comes out."""
        if alg not in ALGS:
            raise TpmError(f"unknown signing algorithm {alg!r}: use one of {', '.join(ALGS)}")
        with self._with_srk() as srk:
            try:
                private, public, *_ = self._esys.create(srk, None, _signing_template(alg))
            except TSS2_Exception as exc:
                if _is_tcti(exc):
                    raise self._lost(exc) from None
                raise TpmError(f"this TPM cannot make an {alg} key ({exc}); choose another "
                               f"algorithm (Tpm.supports tells which it can)") from None
        return KeyBlob(KIND_SIGNING, alg, public.marshal(), private.marshal())

    def load_signing_key(self, blob: KeyBlob) -> TpmSigner:
        """Load *blob* into this TPM; TpmError if it was made by another TPM."""
        if blob.kind != KIND_SIGNING or blob.alg is None:
            raise TpmError(f"this TPM key file holds a {blob.kind} object, not a signing key: "
                           "the identity directory's files were mixed up; re-provision with "
                           "provision init")
        public, private = blob.tpm_objects()
        with self._with_srk() as srk:
            handle = self._load(srk, public, private)
            context = self._call("save the loaded key", lambda: self._esys.context_save(handle))
            self._call("flush the loaded key", lambda: self._esys.flush_context(handle))
        point = public.publicArea.unique.ecc
        raw = (b"\x04" + bytes(point.x).rjust(COORD_BYTES, b"\0")
               + bytes(point.y).rjust(COORD_BYTES, b"\0"))
        return TpmSigner(self, blob.alg, raw, context)

    def seal(self, secret: bytes) -> KeyBlob:
        """Seal *secret* (1..128 bytes) as a keyedhash object under the SRK."""
        if not 0 < len(secret) <= MAX_SEALED_BYTES:
            raise TpmError(f"a sealed secret holds 1 to {MAX_SEALED_BYTES} bytes, not "
                           f"{len(secret)}")
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(
            data=TPM2B_SENSITIVE_DATA(secret)))
        with self._with_srk() as srk, self._salted(srk) as session:
            private, public, *_ = self._call("seal a secret", lambda: self._esys.create(
                srk, sensitive, _sealed_template(), session1=session))
        return KeyBlob(KIND_SEALED, None, public.marshal(), private.marshal())

    def unseal(self, blob: KeyBlob) -> bytes:
        """The secret sealed in *blob*; TpmError if it was sealed by another TPM."""
        if blob.kind != KIND_SEALED:
            raise TpmError(f"this TPM key file holds a {blob.kind} key, not a sealed secret: "
                           "the identity directory's files were mixed up; re-provision with "
                           "provision init")
        public, private = blob.tpm_objects()
        with self._with_srk() as srk:
            item = self._load(srk, public, private)
            try:
                with self._salted(srk) as session:
                    data = self._call("unseal", lambda: self._esys.unseal(item, session1=session))
            finally:
                self._call("flush the sealed object", lambda: self._esys.flush_context(item))
        return bytes(data)

    def clear(self) -> None:
        """TPM2_Clear with the lockout authorisation (empty, as the gateway leaves it):
        the owner hierarchy gets a new seed, so every key blob wrapped by this TPM's storage
        root key (a copy of the card, a backup, a block the flash kept) never loads again,
        and every object of the owner hierarchy is flushed. Endorsement keys survive.
        TpmError when the TPM refuses (lockout authorisation set, clear disabled)."""
        with self._lock:
            self._check_open()
            self._evict(0)
            try:
                self._esys.clear(ESYS_TR.LOCKOUT)
            except TSS2_Exception as exc:
                if _is_tcti(exc):
                    raise self._lost(exc) from None
                raise TpmError(f"the TPM at {self.tcti} refused to clear its owner hierarchy "
                               f"({exc}): its lockout authorisation is set or clearing is "
                               "disabled; clear it from the firmware setup (or tpm2_clear "
                               "with the lockout password)") from None

    # internals (all called with the lock held)

    def _sign(self, signer: TpmSigner, digest: bytes, scheme: TPMT_SIG_SCHEME) -> bytes:
        with self._lock:
            self._check_open()
            handle = self._resident.get(signer)
            if handle is None:
                self._evict(RESIDENT_KEYS - 1)
                handle = self._call("reload the signing key",
                                    lambda: self._esys.context_load(signer._context))
                self._resident[signer] = handle
            self._resident.move_to_end(signer)
            sig = self._call("sign", lambda: self._esys.sign(handle, digest, scheme))
        parts = sig.signature.sm2 if signer.alg == ALG_SM2 else sig.signature.ecdsa
        return (bytes(parts.signatureR).rjust(COORD_BYTES, b"\0")
                + bytes(parts.signatureS).rjust(COORD_BYTES, b"\0"))

    @contextmanager
    def _with_srk(self) -> Iterator[ESYS_TR]:
        """Lock, make room for the SRK and one object, load the SRK, flush it after."""
        with self._lock:
            self._check_open()
            self._evict(OBJECT_SLOTS - 2)
            srk = self._call("load the storage root key",
                             lambda: self._esys.context_load(self._srk))
            try:
                yield srk
            finally:
                self._call("flush the storage root key", lambda: self._esys.flush_context(srk))

    @contextmanager
    def _salted(self, srk: ESYS_TR) -> Iterator[ESYS_TR]:
        """An HMAC session salted to the SRK with AES-128-CFB parameter encryption, so a
        secret crosses the bus encrypted (sessions do not take object slots)."""
        session = self._call("start an encrypted session", lambda: self._esys.start_auth_session(
            srk, ESYS_TR.NONE, TPM2_SE.HMAC,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                         mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            TPM2_ALG.SHA256))
        try:
            self._esys.trsess_set_attributes(
                session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
                | TPMA_SESSION.ENCRYPT)
            yield session
        finally:
            self._call("end the session", lambda: self._esys.flush_context(session))

    def _load(self, srk: ESYS_TR, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> ESYS_TR:
        try:
            return self._esys.load(srk, private, public)
        except TSS2_Exception as exc:
            if _is_tcti(exc):
                raise self._lost(exc) from None
            if exc.error == TPM2_RC.INTEGRITY:
                raise TpmError(f"this key was made by another TPM: {_REPROVISION}") from None
            raise TpmError(f"the TPM refused the key file ({exc}): it is damaged, or was made "
                           f"by another TPM; {_REPROVISION}") from None

    def _evict(self, keep: int) -> None:
        """Flush the least recently used loaded keys until at most *keep* stay loaded."""
        while len(self._resident) > keep:
            _, handle = self._resident.popitem(last=False)
            self._call("flush a signing key", partial(self._esys.flush_context, handle))

    def _flush_leftovers(self) -> None:
        """Flush transient objects a crashed process left (no resource manager cleans up
        a direct TCTI; with one, this connection sees none)."""
        _more, data = self._call("list loaded objects", lambda: self._esys.get_capability(
            TPM2_CAP.HANDLES, int(TPM2_HT.TRANSIENT) << 24, 64))
        for raw in list(data.data.handles):
            handle = self._call("find a left-over object",
                                partial(self._esys.tr_from_tpmpublic, raw))
            self._call("flush a left-over object", partial(self._esys.flush_context, handle))

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except TSS2_Exception as exc:
            if _is_tcti(exc):
                raise self._lost(exc) from None
            raise TpmError(f"the TPM at {self.tcti} refused to {action}: {exc} (response code "
                           f"{int(exc.rc):#x}); if it persists, check the TPM with "
                           "'tpm2_selftest -f' and the kernel log") from None

    def _check_open(self) -> None:
        if self._closed:
            raise TpmError("this TPM connection is closed: open it again with open_tpm")

    def _unreachable(self, exc: TSS2_Exception) -> TpmError:
        return TpmError(f"no TPM answers at {self.tcti} ({exc}): is swtpm/tpm2-abrmd running? "
                        "check /dev/tpmrm0 exists and its permissions (group tss), and the "
                        "TCTI string (e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321)")

    def _lost(self, exc: TSS2_Exception) -> TpmError:
        return TpmError(f"lost the TPM at {self.tcti} ({exc}): did swtpm stop, or the TPM "
                        "driver fail? check the kernel log; restart the gateway")


def _is_tcti(exc: TSS2_Exception) -> bool:
    return int(exc.rc) & _LAYER_MASK == _TCTI_LAYER


def open_tpm(tcti: str) -> Tpm:
    """Open the TPM behind *tcti* (e.g. ``device:/dev/tpmrm0``); TpmError if none answers."""
    return Tpm(tcti)
