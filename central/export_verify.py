#!/usr/bin/env python3
# ruff: noqa: PLR0911, TRY004 - kept plain for a reader who checks it line by line
"""Check a SmartCorr records export, on its own.

Run it in the directory where the export was unzipped:  python3 verify.py
It needs Python 3.9 or later and the "cryptography" package (pip install cryptography);
records of the "sm" suite (alg sm2-sm3) also need "gmssl-fast" for their SM2 signatures.
It imports nothing else and changes nothing.

What it checks, in this order (the rules are those of the format's document,
docs/records.md, "Records: format version 2"):
  1. every file named in manifest.json has the size, SHA-256 and SM3 written there;
  2. every record is one JSON object whose bytes are exactly its canonical bytes;
  3. the gateway's identity: the key registered at enrolment (keys.json), then each
     identity certified by a key.rotate record signed by the identity before it;
  4. every key.session certificate is signed by the gateway's identity at its seq, and
     every record's signature verifies with the session key certified for its seq;
  5. every record's "prev" is the hash of the record before it, and every seq of the
     period is present or named by a signed "gap" record.
It prints each problem as "PROBLEM file seq N: reason", then a verdict.
Exit status: 0 valid, 1 problems found, 2 the export cannot be read.
"""

import base64
import hashlib
import json
import re
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

FIELDS = {"alg": str, "v": int, "gw": str, "seq": int, "prev": str, "boot": int, "t": int,
          "tq": str, "mono": int, "src": dict, "kind": str, "prio": str, "body": dict,
          "kid": str, "sig": str}
ALGS = ("ed25519-sha256", "ecdsa-p256-sha256", "sm2-sm3")
problems = []
limits = []


def problem(file, seq, reason):
    problems.append(f"{file} seq {seq}: {reason}" if seq is not None else f"{file}: {reason}")


def sm3(data):
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def chain_hash(alg, data):
    """The hash that goes with a signature algorithm: SM3 for sm2-sm3, else SHA-256."""
    return sm3(data) if alg == "sm2-sm3" else hashlib.sha256(data).digest()


def unb64u(text):
    """Unpadded base64url in its one form (RFC 4648 section 5), else ValueError."""
    if not isinstance(text, str) or len(text) % 4 == 1 or \
            any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                for c in text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != text:
        raise ValueError("not base64url in its one form")
    return data


def key_id(alg, raw):
    return base64.urlsafe_b64encode(chain_hash(alg, raw)[:12]).rstrip(b"=").decode()


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def no_duplicates(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("a key appears twice in an object")
    return dict(pairs)


def refuse(text):
    raise ValueError(f"{text} is not an integer of the format")


def check_ints(value):
    if isinstance(value, dict):
        for item in value.values():
            check_ints(item)
    elif isinstance(value, list):
        for item in value:
            check_ints(item)
    elif isinstance(value, int) and not isinstance(value, bool) and \
            not -(2**63) <= value < 2**63:
        raise ValueError("an integer outside the signed 64-bit range")


def parse_record(data):
    """The record's fields, or ValueError naming what is wrong with its bytes."""
    rec = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates,
                     parse_float=refuse, parse_constant=refuse)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    check_ints(rec)
    if canonical(rec) != data:
        raise ValueError("the bytes are not the canonical bytes of the record")
    legacy = rec.get("v") == 1 and "alg" not in rec  # format 1: Ed25519, no alg
    for name, kind in FIELDS.items():
        if (name != "alg" or not legacy) and \
                (not isinstance(rec.get(name), kind) or isinstance(rec.get(name), bool)):
            raise ValueError(f"field {name!r} missing or of another type")
    if not legacy and (rec["v"] != 2 or rec["alg"] not in ALGS):
        raise ValueError("neither format 2 with a known alg nor format 1")
    unb64u(rec["prev"])
    unb64u(rec["sig"])
    return rec


def verify_signature(alg, raw_key, signature, data):
    """True when *signature* (raw bytes) of *data* verifies with the raw public key."""
    try:
        if alg == "ed25519-sha256":
            Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, data)
            return True
        if len(signature) != 64:
            return False
        if alg == "ecdsa-p256-sha256":
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw_key)
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                       int.from_bytes(signature[32:], "big"))
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
            return True
        if alg == "sm2-sm3":  # SM2 with the default signer id 1234567812345678
            import gmssl_fast  # only the "sm" suite needs it

            return bool(gmssl_fast.SM2(public_key=raw_key.hex()).verify(data, signature))
    except ImportError:
        raise SystemExit("sm2-sm3 signatures need the gmssl-fast package") from None
    except (InvalidSignature, ValueError):
        return False
    except Exception as exc:  # gmssl-fast's own errors mean "does not verify"
        if type(exc).__module__.startswith("gmssl_fast"):
            return False
        raise
    return False


def record_signature_ok(rec, alg, raw_key):
    """The record's sig: over the canonical bytes of the record without "sig"."""
    unsigned = {k: v for k, v in rec.items() if k != "sig"}
    return verify_signature(alg, raw_key, unb64u(rec["sig"]), canonical(unsigned))


def certificate(body, expected_type):
    """(claims, raw key, signature, signed bytes) of a key.session / key.rotate body."""
    claims = body.get("cert")
    if not isinstance(claims, dict) or claims.get("type") != expected_type:
        raise ValueError(f"no {expected_type} certificate in the body")
    raw = unb64u(claims.get("key"))
    if claims.get("alg") not in ALGS or key_id(claims["alg"], raw) != claims.get("kid"):
        raise ValueError("the certified key id does not match its key")
    return claims, raw, unb64u(body.get("cert_sig")), canonical(claims)


def identity_at(identities, kid, seq):
    """The identity *kid* if it was the gateway's identity at *seq*, else None."""
    for i, ident in enumerate(identities):
        until = identities[i + 1]["from_seq"] if i + 1 < len(identities) else None
        if ident["kid"] == kid and ident["from_seq"] <= seq and (until is None or seq < until):
            return ident
    return None


def check_files(here, manifest):
    for entry in manifest["files"]:
        path = here / entry["name"]
        if not path.is_file():
            problem(entry["name"], None, "missing")
            continue
        data = path.read_bytes()
        if len(data) != entry["size"]:
            problem(entry["name"], None, f"size {len(data)}, the manifest says {entry['size']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problem(entry["name"], None, "SHA-256 differs from the manifest: the file changed")
        try:
            if sm3(data).hex() != entry["sm3"]:
                problem(entry["name"], None, "SM3 differs from the manifest: the file changed")
        except UnsupportedAlgorithm:  # an OpenSSL built without SM3
            limits.append(f"{entry['name']}: SM3 not available here, not checked")


def load(here):
    """Every record of the export by seq: (file, bytes); a seq twice with other bytes
    is a problem."""
    found = {}
    lines = (here / "records.jsonl").read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    keys = json.loads((here / "keys.json").read_bytes())
    items = [("records.jsonl", line) for line in lines]
    items += [("keys.json", e["record"].encode("utf-8"))
              for e in keys["rotations"] + keys["sessions"]]
    parsed = {}
    for file, data in items:
        try:
            rec = parse_record(data)
        except (ValueError, UnicodeDecodeError) as exc:
            seq = re.search(rb'"seq":(\d+)', data)  # to name the record, if it can be
            problem(file, int(seq[1]) if seq else "?", f"not a valid record: {exc}")
            continue
        seq = rec["seq"]
        if seq in found and found[seq][1] != data:
            problem(file, seq, f"differs from the record of seq {seq} in {found[seq][0]}")
            continue
        found.setdefault(seq, (file, data))
        parsed[seq] = rec
    return found, parsed, keys


def check_record(rec, file, state):
    """Step 3 and 4 for one record, in seq order: its key, its signature, and what a
    key.session or key.rotate record adds to the trusted keys."""
    seq, gw, identities = rec["seq"], state["gw"], state["identities"]
    if rec["gw"] != gw:
        return problem(file, seq, f"a record of gateway {rec['gw']!r}")
    if "alg" not in rec:  # format 1: signed by the identity key itself (Ed25519)
        ident = identity_at(identities, rec["kid"], seq)
        if ident is None or not record_signature_ok(rec, "ed25519-sha256", ident["key"]):
            problem(file, seq, "format 1 record not signed by the gateway's identity")
        return None
    if rec["kind"] == "key.session":
        return check_session(rec, file, state)
    cert = max((c for c in state["sessions"].get(rec["kid"], []) if c["from_seq"] <= seq),
               key=lambda c: c["from_seq"], default=None)
    if cert is None:
        return problem(file, seq, f"no key.session in the export certifies key {rec['kid']} "
                       "(certificate chain fails)")
    if not record_signature_ok(rec, rec["alg"], cert["raw"]):
        return problem(file, seq, "bad signature: the record changed or another key signed it")
    if rec["boot"] != cert["boot"] or rec["mono"] > cert["until_mono"] or \
            any(cert["from_seq"] < s <= seq for s in state["session_starts"]):
        return problem(file, seq, "signed outside its session key's validity (boot, mono or "
                       "a later key.session)")
    if rec["kind"] == "key.rotate":
        try:
            claims, raw, cert_sig, signed = certificate(rec["body"], "identity")
        except (ValueError, TypeError, AttributeError) as exc:
            return problem(file, seq, f"key.rotate certificate malformed: {exc}")
        ident = identity_at(identities, claims["by"]["kid"], seq)
        if claims.get("gw") != gw or claims.get("from_seq") != seq or ident is None or \
                not verify_signature(ident["alg"], ident["key"], cert_sig, signed):
            return problem(file, seq, "key.rotate not certified by the gateway's identity")
        identities.append({"from_seq": seq, "kid": claims["kid"], "alg": claims["alg"],
                           "key": raw})
    if rec["kind"] == "gap":  # the seqs the gateway evicted (quota), signed
        for lo, hi in rec["body"].get("evicted", []):
            state["explained"].update(range(lo, hi + 1))
    return None


def check_session(rec, file, state):
    """A key.session: its certificate matches the record, the gateway's identity at that
    seq signed it, and the record is signed by the key it certifies."""
    seq = rec["seq"]
    try:
        claims, raw, cert_sig, signed = certificate(rec["body"], "session")
    except (ValueError, TypeError, AttributeError) as exc:
        return problem(file, seq, f"key.session certificate malformed: {exc}")
    ident = identity_at(state["identities"], claims["identity"]["kid"], seq)
    if (claims.get("gw"), claims.get("boot"), claims.get("from_seq"), claims["kid"],
            claims["alg"]) != (state["gw"], rec["boot"], seq, rec["kid"], rec["alg"]):
        return problem(file, seq, "key.session certificate is for another gateway, boot, "
                       "seq or key than its record")
    if ident is None or not verify_signature(ident["alg"], ident["key"], cert_sig, signed):
        return problem(file, seq, "key.session not certified by the gateway's identity at "
                       "that seq (certificate chain fails)")
    if not record_signature_ok(rec, rec["alg"], raw):
        return problem(file, seq, "bad signature (by the session key it certifies)")
    state["sessions"].setdefault(rec["kid"], []).append({**claims, "raw": raw})
    state["session_starts"].append(seq)
    return None


def check_chain(found, parsed, period, explained):
    """Step 5: prev of seq n is the hash of the bytes of seq n-1; every seq of the
    period is in the export or named by a gap record."""
    for seq, rec in sorted(parsed.items()):
        alg = rec.get("alg", "ed25519-sha256")
        if seq == 1 and unb64u(rec["prev"]) != bytes(32):
            problem(found[seq][0], seq, "seq 1 does not carry the zero prev")
        elif seq - 1 in found and unb64u(rec["prev"]) != chain_hash(alg, found[seq - 1][1]):
            problem(found[seq][0], seq, f"chain broken: prev is not the hash of seq {seq - 1}")
    first, last = period["first_seq"], period["last_seq"]
    if first > 1 and first - 1 not in found:
        limits.append(f"seq {first}: its prev is not checked (the record before it is not "
                      "in the export: the platform does not hold it)")
    declared = {s for lo, hi in period["gaps_unexplained"] for s in range(lo, hi + 1)}
    for seq in range(first, last + 1):
        if seq in found or seq in explained:
            continue
        if seq in declared:
            limits.append(f"seq {seq}: missing at the platform, no gap record names it "
                          "(declared in the manifest)")
        else:
            problem("records.jsonl", seq, "missing: not in the export and no gap record "
                    "names it (a record was removed?)")
    in_period = sum(1 for r in parsed.values() if found[r["seq"]][0] == "records.jsonl"
                    and period["from_ms"] <= r["t"] <= period["to_ms"])
    if in_period != period["records"]:
        problem("records.jsonl", None, f"{in_period} records in the period, the manifest "
                f"says {period['records']}")


def main():
    here = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    try:
        manifest = json.loads((here / "manifest.json").read_bytes())
        check_files(here, manifest)
        found, parsed, keys = load(here)
        reg, gw, period = keys["registration"], manifest["export"]["gw"], manifest["period"]
        registered = {"from_seq": 0, "kid": reg["kid"], "alg": reg["alg"],
                      "key": unb64u(reg["key"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"CANNOT READ the export in {here}: {exc}")
        return 2
    if reg["gateway_id"] != gw or key_id(reg["alg"], registered["key"]) != reg["kid"]:
        problem("keys.json", None, "the registration is not of this gateway or its kid does "
                "not match its key")
    state = {"gw": gw, "identities": [registered], "sessions": {}, "session_starts": [],
             "explained": set()}
    for seq in sorted(parsed):
        check_record(parsed[seq], found[seq][0], state)
    listed = [(i["from_seq"], i["kid"]) for i in keys["identities"]]
    if listed != [(i["from_seq"], i["kid"]) for i in state["identities"]]:
        problem("keys.json", None, "the identity history listed differs from the one the "
                "registration and the key.rotate records prove")
    check_chain(found, parsed, period, state["explained"])
    for text in limits:
        print(f"LIMIT   {text}")
    for text in problems:
        print(f"PROBLEM {text}")
    print(f"gateway {gw}, {period['records']} records of the period, seqs "
          f"{period['first_seq']}..{period['last_seq']}, identity at enrolment {reg['kid']} "
          f"({reg['class']})")
    if problems:
        print(f"VERDICT: NOT VALID ({len(problems)} problems above)")
        return 1
    print("VERDICT: VALID: files as listed, every record authentic and chained"
          + (f" ({len(limits)} limits above)" if limits else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
