"""Test vectors for platform verifiers written in any language (docs/test-vectors/).

Run: ``.venv/bin/python -m lab.vectors docs/test-vectors``. The output is deterministic:
fixed keys (Ed25519 private keys are RFC 8032 32-byte seeds, given in the files), fixed
times, and Ed25519 signatures, which are deterministic. SM2 signatures are randomized, so
the SM2 vectors are *verify only*: their signatures were made once and are kept here
(:data:`SM2_SIGNATURES`); a recorded signature is reused whenever it verifies over the
bytes to sign. Should the record format change, the generator signs anew, writes the
files, prints the new signatures to paste here and exits 1.

Every file is JSON (ASCII, non-ASCII characters as ``\\u`` escapes of the file itself):

* ``canonical.json``: values and their canonical bytes (docs/records.md, Canonical bytes);
* ``ed25519.json``: a registration, a chain of records (a ``key.session``, readings, a
  ``key.rotate``, a session certified by the new identity, a ``local.action`` with
  escaped and non-ASCII text, an evicted record and the ``gap`` record naming it), each
  with its canonical bytes, the bytes its ``sig`` signs and its chain digest; and invalid
  records, each with the exact reason it is refused and the valid records (``context``)
  a verifier has taken before it;
* ``sm2.json``: the same for the ``sm`` suite, verify only;
* ``commands.json``: the platform's commands (docs/commands.md), made by
  :mod:`lab.command_vectors`;
* ``intervals.json``: presence intervals (docs/records.md ``tag.interval``), made by
  :mod:`lab.interval_vectors`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from buffer.store import Evicted
from buffer.writer import gap_reading
from core.kinds import Priority
from core.record import JSON, Reading, SealedRecord, Source, Timestamp, b64u, canonical
from core.session import SESSION_LIFETIME_MS
from core.suites import ED25519, SM2, Signer, SoftwareKey, key_id
from core.suites import Verifier as PublicKey
from core.topics import records_topic
from lab import interval_vectors
from lab.chains import Chain
from lab.command_vectors import command_vectors

GATEWAY = "gw-vector-0001"
OTHER_GATEWAY = "gw-vector-0002"
SM_GATEWAY = "gw-vector-sm-0001"
#: The first record's time; the others follow a few seconds apart.
T0 = Timestamp(1_760_000_000_000, "ntp", 3_600_000)
TAG_SOURCE = Source("tag_receiver", "TR-0001", "1.0.0")
GNSS_SOURCE = Source("gnss", "port:gnss")

#: SM2 keys of the sm2.json vectors: (private scalar, public point 04||X||Y), hex.
SM2_IDENTITY = (
    "8304333e9121c9eae146b80847ee884d0ac923b49d8c5449723d1552ac024ea7",
    "048a8ec9f3a735d5648cc01c62fbe16c73eff165f7d04161a766ede9344f9935"
    "516c9da57af7ffd6fe06d61684d755b35c268e80bcf9b6b5c0e30c87d1c043c237",
)
SM2_SESSION = (
    "41565ffa4c16b3c8228cf8c052faa04a1be3b620491a36ba7a96b049375f9681",
    "04cef5581f822ecc21bb15cd6dcc0ebd9d76af2e263fa8a22225ca1921725f7c"
    "271ec37d334009c7c346d1acbf8552922764318a249ea8d271faa5f0df1b76226b",
)
#: SM2 signatures (r||s, hex) made once over the sm2.json vectors' bytes, by the SHA-256
#: (first 8 bytes, hex) of the bytes they sign.
SM2_SIGNATURES: dict[str, str] = {
    "6eb654402e870fd7": "99b9a6335bc19eec4bf638c79bdf755f8f37bca3413ef19cf87d263275cc35d1"
                        "af49a3dcfcf485a2b65f72a6594ce4469819548b5f072df5a103e671935e5471",
    "58c1f2e807471465": "b2a2d039c3eb867ff47d9c657006b896b111416586f77b07e0c3028312753be5"
                        "0ace423a3b0a704a1f8fa32a2eee0dd035512b39b7f1b1bc8289e5ee3108fc91",
    "d06c77dc3003727f": "2f5637d8f981a469cb3fe635ab22a9f5349ab300a17c5609d463edbcb2cdab01"
                        "2df9f10f4ab8e8f31c695ef01f8aa12d44e0dc0abec6d509f7805df172598596",
}


def seed(name: str) -> bytes:
    """An Ed25519 private key (RFC 8032: the 32-byte seed) derived from *name*."""
    return hashlib.sha256(f"smartcorr test vector {name}".encode()).digest()


def at(seconds: int) -> Timestamp:
    return Timestamp(T0.utc_ms + seconds * 1000, T0.quality, T0.mono_ms + seconds * 1000)


class Recorded:
    """An SM2 signer that gives the recorded signature of the bytes when there is one."""

    def __init__(self, key: SoftwareKey, recorded: Mapping[str, str]) -> None:
        self.key = key
        self.alg, self.public_raw = key.alg, key.public_raw
        self._recorded = recorded
        self.fresh: dict[str, str] = {}

    def sign(self, data: bytes) -> bytes:
        name = hashlib.sha256(data).digest()[:8].hex()
        text = self._recorded.get(name)
        if text is not None and PublicKey(self.alg, self.public_raw).verify(
                bytes.fromhex(text), data):
            return bytes.fromhex(text)
        sig = self.key.sign(data)
        self.fresh[name] = sig.hex()
        return sig


def _key_json(key: SoftwareKey, **extra: JSON) -> dict[str, JSON]:
    out: dict[str, JSON] = {"alg": key.alg}
    if key.alg == ED25519:
        out["seed_hex"] = key.private_bytes().hex()
    else:
        out["private_hex"] = key.private_bytes().hex()
    out.update({"public_b64u": b64u(key.public_raw), "kid": key_id(key.alg, key.public_raw)})
    out.update(extra)
    return out


def _registration(gateway_id: str, key: SoftwareKey, suite: str) -> dict[str, JSON]:
    """The gateway's ``signing.pub``, as the platform registers it."""
    return {"alg": key.alg, "class": "file", "format": 2, "gateway_id": gateway_id,
            "key": b64u(key.public_raw), "kid": key_id(key.alg, key.public_raw),
            "suite": suite}


def _record_json(name: str, rec: SealedRecord, *, key: str, delivered: bool = True,
                 note: str = "") -> dict[str, JSON]:
    obj = json.loads(rec.data)
    unsigned = dict(obj)
    del unsigned["sig"]
    out: dict[str, JSON] = {"name": name, "seq": rec.seq, "kind": rec.kind,
                            "prio": obj["prio"], "signed_by": key, "delivered": delivered}
    if note:
        out["note"] = note
    out.update({
        "canonical": rec.data.decode("utf-8"),
        "canonical_hex": rec.data.hex(),
        "signed_hex": canonical(unsigned).hex(),
        "sig": obj["sig"],
        "prev": obj["prev"],
        "digest_hex": rec.digest.hex(),
    })
    return out


@dataclass
class _Cases:
    """Invalid records and why each is refused."""

    cases: list[dict[str, JSON]] = field(default_factory=list)

    def add(self, name: str, reason: str, why: str, data: bytes, *, context: Sequence[str],
            topic: str, alone: bool = True) -> None:
        """*alone*: the record's own bytes and the key its kid names show the refusal
        (no certificate, chain or topic needed)."""
        case: dict[str, JSON] = {"name": name, "reason": reason, "why": why,
                                 "context": list(context), "topic": topic, "alone": alone}
        with contextlib.suppress(UnicodeDecodeError):  # no text for bytes that are no UTF-8
            case["text"] = data.decode("utf-8")
        case["bytes_hex"] = data.hex()
        self.cases.append(case)


def _replace(data: bytes, old: str, new: str) -> bytes:
    """*data* with the one occurrence of *old* replaced."""
    raw_old, raw_new = old.encode(), new.encode()
    if data.count(raw_old) != 1:
        raise ValueError(f"{old!r} occurs {data.count(raw_old)} times")
    return data.replace(raw_old, raw_new)


def _resigned(data: bytes, key: Signer, **changes: JSON) -> bytes:
    """The record of *data* with *changes*, signed again by *key* (canonical bytes)."""
    rec = json.loads(data)
    rec.update(changes)
    del rec["sig"]
    rec["sig"] = b64u(key.sign(canonical(rec)))
    return canonical(rec)


def _presence(counter: int) -> dict[str, JSON]:
    return {"tag": "T00001000", "counter": counter, "battery_pct": 87, "strap_closed": True,
            "body_contact": True, "rssi_dbm": -61, "dev_event": counter}


def ed25519_vectors() -> dict[str, JSON]:
    identity_1 = SoftwareKey(ED25519, seed("identity 1"))
    identity_2 = SoftwareKey(ED25519, seed("identity 2"))
    session_1 = SoftwareKey(ED25519, seed("session 1"))
    session_2 = SoftwareKey(ED25519, seed("session 2"))
    impostor = SoftwareKey(ED25519, seed("impostor"))
    stray = SoftwareKey(ED25519, seed("stray session"))
    topic = records_topic(GATEWAY)

    gw = Chain(GATEWAY, identity=identity_1)
    registration = _registration(GATEWAY, identity_1, "ed25519")
    r1 = gw.start_session(at(0), session=session_1)
    r2 = gw.seal("tag.presence", _presence(41), at(1), TAG_SOURCE)
    r3 = gw.seal("gnss.fix", {"lat_e7": -338688000, "lon_e7": 1512093000, "quality": 1,
                              "sats": 8, "hdop_c": 90, "alt_dm": 0, "sentence": "GPGGA",
                              "gnss_utc": "2025-10-09T08:53:21Z"}, at(2), GNSS_SOURCE)
    r4 = gw.rotate_identity(at(3), identity_2)
    r5 = gw.start_session(at(4), session=session_2)
    r6 = gw.seal("local.action", {
        "action": "tag.paired",
        "details": {"tag": "T00001000", "file": "/etc/smartcorr/tags.json",
                    "sha256_before": None},
        "operator": {"name": 'Zoë "Zed" Ngata\\Ōtautahi', "role": "installer",
                     "badge": "B-0042\t(night)", "os_user": "smartcorr", "sudo_user": None,
                     "ssh_client": None, "origin": "argv"},
        "entry": 1, "journal": "j-0001", "at_ms": at(5).utc_ms - 60_000}, at(5))
    r7 = gw.seal("tag.presence", _presence(42), at(6), TAG_SOURCE)
    r8 = gw.sealer.seal(gap_reading([Evicted(int(Priority.POSITION), r7.seq, 400)],
                                    gw.source, at(7).mono_ms * 1_000_000), at(7))
    records = [
        _record_json("session_1", r1, key="session_1",
                     note="key.session: session_1 certified by identity_1 (registered)"),
        _record_json("presence", r2, key="session_1"),
        _record_json("fix", r3, key="session_1"),
        _record_json("rotate", r4, key="session_1",
                     note="key.rotate: identity_2 certified by identity_1 from seq 4"),
        _record_json("session_2", r5, key="session_2",
                     note="key.session: session_2 certified by identity_2 (after the "
                          "rotation); session_1 signs no record from seq 5 on"),
        _record_json("action", r6, key="session_2",
                     note="escaped characters (\", \\, tab) and non-ASCII ones as themselves"),
        _record_json("evicted", r7, key="session_2", delivered=False,
                     note="evicted unsent: never delivered, named by the gap record"),
        _record_json("gap", r8, key="session_2",
                     note="the gap record naming seq 7: the platform reports no missing seq"),
    ]

    cases = _Cases()
    ctx1 = ["session_1"]
    pres = r2.data
    cases.add("key_order", "non_canonical", "the members are not in code-point order of "
              "their keys (\"v\" moved first)",
              b'{"v":2,' + _replace(pres, ',"v":2}', "}")[1:], context=ctx1, topic=topic)
    cases.add("whitespace", "non_canonical", "one space after the opening brace",
              b"{ " + pres[1:], context=ctx1, topic=topic)
    cases.add("float_1_0", "malformed", "41.0: a number with a fraction, even a zero one",
              _replace(pres, '"counter":41', '"counter":41.0'), context=ctx1, topic=topic)
    cases.add("exponent", "malformed", "4.1e1: a number with an exponent",
              _replace(pres, '"counter":41', '"counter":4.1e1'), context=ctx1, topic=topic)
    cases.add("duplicate_key", "non_canonical", "the member \"kind\" twice (with one value)",
              _replace(pres, '"kind":"tag.presence",', '"kind":"tag.presence",' * 2),
              context=ctx1, topic=topic)
    cases.add("escaped_ascii", "non_canonical", "\\u0054 for T: only \", \\ and U+0000..U+001F "
              "are escaped", _replace(pres, '"tag":"T00001000"', '"tag":"\\u005400001000"'),
              context=ctx1, topic=topic)
    cases.add("escaped_non_ascii", "non_canonical", "\\u00eb for the character itself",
              _replace(r6.data, "Zoë", "Zo\\u00eb"),
              context=["session_1", "presence", "fix", "rotate", "session_2"], topic=topic)
    cases.add("minus_zero", "non_canonical", "-0 parses as 0, whose encoding is 0",
              _replace(r3.data, '"alt_dm":0', '"alt_dm":-0'), context=ctx1, topic=topic)
    cases.add("int_beyond_64_bits", "malformed", "2^63: integers are signed 64-bit",
              _replace(pres, '"counter":41', '"counter":9223372036854775808'),
              context=ctx1, topic=topic)
    cases.add("lone_surrogate", "malformed", "\\ud800: a string with no UTF-8 encoding",
              _replace(pres, '"tag":"T00001000"', '"tag":"\\ud800"'), context=ctx1, topic=topic)
    sig = json.loads(pres)["sig"]
    cases.add("padded_sig", "malformed", "sig with its base64 padding",
              _replace(pres, f'"sig":"{sig}"', f'"sig":"{sig}=="'), context=ctx1, topic=topic)
    # 64 bytes are 86 characters: the last carries 2 bits and 4 unused ones, set here
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    other = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
    cases.add("sig_unused_bits", "malformed", "the unused low bits of sig's last character "
              "are not zero (it decodes to the same signature)",
              _replace(pres, f'"sig":"{sig}"', f'"sig":"{sig[:-1]}{other}"'),
              context=ctx1, topic=topic)
    body = json.loads(r1.data)["body"]
    padded_cert = dict(body, cert_sig=body["cert_sig"] + "==")
    cases.add("padded_cert_sig", "malformed", "a key.session whose cert_sig has its padding "
              "(the record signed again)", _resigned(r1.data, session_1, body=padded_cert),
              context=[], topic=topic, alone=False)
    cases.add("bad_signature", "bad_signature", "counter 41 changed to 42 after signing",
              _replace(pres, '"counter":41', '"counter":42'), context=ctx1, topic=topic)
    other_gw = Chain(OTHER_GATEWAY, identity=impostor)
    draft = other_gw.sealer.draft()
    draft.use_key(session_1)
    foreign = draft.seal(Reading("tag.presence", TAG_SOURCE, _presence(1), 0), at(1))
    cases.add("wrong_gateway", "wrong_gateway", f"a record of {OTHER_GATEWAY} signed with "
              f"{GATEWAY}'s session_1, published on {GATEWAY}'s topic", foreign.data,
              context=ctx1, topic=topic, alone=False)
    cases.add("wrong_topic", "wrong_gateway", f"a valid record of {GATEWAY} on the topic of "
              f"{OTHER_GATEWAY}", pres, context=ctx1, topic=records_topic(OTHER_GATEWAY),
              alone=False)
    stale = gw.sealer.draft()
    stale.use_key(session_1)
    late = stale.seal(Reading("tag.presence", TAG_SOURCE, _presence(43), 0), at(8))
    cases.add("superseded_session", "out_of_validity", "seq 9 signed by session_1, which "
              "signs only seqs 1 to 4 (session_2 begins at seq 5)", late.data,
              context=["session_1", "presence", "fix", "rotate", "session_2"], topic=topic,
              alone=False)
    forged = Chain(GATEWAY, identity=identity_1)
    forgery = forged.start_session(at(0), session=stray, certifier=_Claiming(identity_1,
                                                                               impostor))
    cases.add("forged_certificate", "forged_certificate", "a key.session whose certificate "
              "names identity_1 but is signed by another key", forgery.data, context=[],
              topic=topic, alone=False)
    until = json.loads(r1.data)["body"]["cert"]["until_mono"]
    expired = Chain(GATEWAY, identity=identity_1)
    expired.start_session(at(0), session=session_1)
    beyond = expired.seal("tag.presence", _presence(41),
                          Timestamp(at(1).utc_ms, "ntp", until + 1), TAG_SOURCE)
    cases.add("beyond_until_mono", "out_of_validity", f"mono {until + 1}: past its session's "
              f"until_mono {until} ({SESSION_LIFETIME_MS} ms after the session began)",
              beyond.data, context=ctx1, topic=topic, alone=False)
    cases.add("v1_with_alg", "malformed", "v 1 with an alg field (format 1 has none), "
              "signed again", _resigned(pres, session_1, v=1), context=ctx1, topic=topic)
    cases.add("unknown_alg", "malformed", "alg ed448-shake256, which this format does not "
              "have", _resigned(pres, session_1, alg="ed448-shake256"), context=ctx1,
              topic=topic)
    uncertified = Chain(GATEWAY, identity=identity_1)
    uncertified.start_session(at(0), session=stray)
    cases.add("unknown_key", "unknown_key", "signed by a session key no key.session "
              "certified (the platform holds it, bounded, then counts it unknown_key)",
              uncertified.seal("tag.presence", _presence(41), at(1), TAG_SOURCE).data,
              context=ctx1, topic=topic)
    return {
        "description": "Format 2 records of the ed25519 suite (docs/records.md). Ed25519 "
                       "(RFC 8032) private keys are given as their 32-byte seeds. Feed the "
                       "delivered records, in this order, to a verifier that registered "
                       "'registration': every one verifies, its chain digest is digest_hex, "
                       "and no seq is missing (seq 7 is named by the gap record). Each "
                       "invalid record goes to a fresh verifier that took its context "
                       "records first, on its topic, and is refused with its reason.",
        "suite": "ed25519",
        "chain_hash": "sha-256",
        "gateway": GATEWAY,
        "topic": topic,
        "keys": {
            "identity_1": _key_json(identity_1, role="registered identity"),
            "identity_2": _key_json(identity_2, role="identity certified by key.rotate "
                                                     "from seq 4"),
            "session_1": _key_json(session_1, role="session key of seqs 1 to 4"),
            "session_2": _key_json(session_2, role="session key from seq 5"),
            "impostor": _key_json(impostor, role="signs the forged certificate"),
            "stray": _key_json(stray, role="a session key never certified"),
        },
        "registration": registration,
        "records": records,
        "invalid": cases.cases,
    }


class _Claiming:
    """Names *claimed*'s public key (so its key id) but signs with *signer*."""

    def __init__(self, claimed: SoftwareKey, signer: SoftwareKey) -> None:
        self.alg, self.public_raw, self._signer = claimed.alg, claimed.public_raw, signer

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)


def sm2_vectors() -> tuple[dict[str, JSON], dict[str, str]]:
    """The sm2.json vectors and the signatures that had to be made anew (none when the
    recorded ones fit)."""
    identity = _sm2_key(SM2_IDENTITY)
    session = _sm2_key(SM2_SESSION)
    certifier = Recorded(identity, SM2_SIGNATURES)
    signer = Recorded(session, SM2_SIGNATURES)
    topic = records_topic(SM_GATEWAY)
    gw = Chain(SM_GATEWAY, suite="sm", identity=identity)
    r1 = gw.start_session(at(0), session=signer, certifier=certifier)
    r2 = gw.seal("tag.presence", _presence(41), at(1), TAG_SOURCE)
    cases = _Cases()
    cases.add("bad_signature", "bad_signature", "counter 41 changed to 42 after signing",
              _replace(r2.data, '"counter":41', '"counter":42'), context=["session"],
              topic=topic)
    fresh = certifier.fresh | signer.fresh
    vectors: dict[str, JSON] = {
        "description": "Format 2 records of the sm suite: SM2 (GB/T 32918.2, signer id "
                       "1234567812345678) over SM3 (GB/T 32905). SM2 signatures are "
                       "randomized: these are verify only (a new signature of the same "
                       "bytes differs, and verifies too).",
        "suite": "sm",
        "chain_hash": "sm3",
        "gateway": SM_GATEWAY,
        "topic": topic,
        "keys": {"identity": _key_json(identity, role="registered identity"),
                 "session": _key_json(session, role="session key")},
        "registration": _registration(SM_GATEWAY, identity, "sm"),
        "records": [
            _record_json("session", r1, key="session",
                         note="key.session: session certified by identity"),
            _record_json("presence", r2, key="session"),
        ],
        "invalid": cases.cases,
    }
    return vectors, fresh


def _sm2_key(pair: tuple[str, str]) -> SoftwareKey:
    return SoftwareKey(SM2, bytes.fromhex(pair[0]), bytes.fromhex(pair[1]))


#: Values and their canonical bytes: every escape, the characters left as themselves,
#: integers at the ends of their range, key order.
CANONICAL_VALUES: list[tuple[str, JSON]] = [
    ("key_order", {"b": 1, "a": 2, "B": 3, "_": 4, "a1": 5, "": 6}),
    ("nesting", {"z": [1, {"y": None, "x": True}, [], {}], "a": False}),
    ("escapes", {"s": "\" \\ \n \r \t \b \f"}),
    ("controls", {"s": "".join(chr(c) for c in range(0x20))}),
    ("not_escaped", {"s": "/ ' < > & \x7f \x80 \u00e9 \u2028 \u2029 \ufeff \U0001f600"}),
    ("integers", {"max": 2**63 - 1, "min": -(2**63), "zero": 0, "minus": -1}),
    ("empty", {}),
]


def canonical_vectors() -> dict[str, JSON]:
    cases: list[dict[str, JSON]] = []
    for name, value in CANONICAL_VALUES:
        data = canonical(value)
        cases.append({"name": name, "value": value, "canonical": data.decode("utf-8"),
                      "canonical_hex": data.hex()})
    return {"description": "Values (as this file's JSON gives them) and their canonical "
                           "bytes (docs/records.md, Canonical bytes).",
            "cases": cases}


def write(directory: Path) -> dict[str, str]:
    """Write the vector files into *directory*; the SM2 signatures made anew."""
    directory.mkdir(parents=True, exist_ok=True)
    sm2, fresh = sm2_vectors()
    files: dict[str, JSON] = {"canonical.json": canonical_vectors(),
                              "ed25519.json": ed25519_vectors(), "sm2.json": sm2,
                              "commands.json": command_vectors(),  # docs/commands.md
                              interval_vectors.FILE: interval_vectors.interval_vectors()}
    for name, content in files.items():
        text = json.dumps(content, indent=1, ensure_ascii=True) + "\n"
        (directory / name).write_text(text, encoding="ascii")
    return fresh


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.vectors",
        description="Write the test vectors of docs/records.md (canonical.json, ed25519.json, "
                    "sm2.json) into DIRECTORY; exit 1 when the SM2 signatures had to be made "
                    "anew (paste the printed ones into lab/vectors.py).")
    parser.add_argument("directory", metavar="DIRECTORY",
                        help="where to write them, e.g. docs/test-vectors")
    args = parser.parse_args(argv)  # --help: exit 0; no or bad arguments: usage, exit 2
    fresh = write(Path(args.directory))
    if fresh:
        print("the SM2 vectors were signed anew (the format changed?): make them the "
              "recorded ones in lab/vectors.py:\nSM2_SIGNATURES: dict[str, str] = {\n"
              + "".join(f'    "{name}": "{sig[:64]}"\n{" " * 24}"{sig[64:]}",\n'
                        for name, sig in fresh.items()) + "}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
