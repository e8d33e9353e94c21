"""The head statement: the last line of every records message (docs/records.md, Transport).

A record says nothing of the records after it, so a platform that stopped receiving
cannot tell a quiet gateway from a tail that was dropped (or a box destroyed before it
sent its last records). Each message therefore ends with a line the gateway signs with
its current session key at publish time, saying how far its chain is committed:

``{"alg":…,"boot":…,"committed_seq":N,"covers":…,"gw":…,"kid":…,"mono":…,"type":"head","sig":…}``

canonical bytes as records (``sig`` over the canonical bytes without ``sig``). It has
no ``seq`` and no ``kind``: it can never pass for a record, nor a record for it. A
platform that verified it knows that every seq up to ``committed_seq`` exists; one that
has not arrived within the platform's bound is a gap, however the tail was lost.

``covers`` (base64url) is the hash of the session key's algorithm (SHA-256, or SM3 for
``sm2-sm3``) over every byte of the message before the head line, its newline
included. The one signature on the head therefore signs every record line of the
message: a platform that verified the head has verified each record line signed by the
same session key without checking that record's own signature (docs/records.md,
"Transport"); the records still carry their own signatures, which stand on their own
in an export. A head of a gateway from before ``covers`` has none and covers nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from core.record import JSON, b64u, canonical, unb64u
from core.suites import Signer, digest, key_id

HEAD_TYPE = "head"
_FIELDS: dict[str, type] = {"alg": str, "boot": int, "committed_seq": int, "gw": str,
                            "kid": str, "mono": int, "type": str, "sig": str}
#: The optional field: the hash of the message's bytes before the head line.
COVERS = "covers"


@dataclass(frozen=True, slots=True)
class Head:
    gateway_id: str
    boot: int
    committed_seq: int
    mono: int
    alg: str
    kid: str
    sig: bytes
    signed: bytes  # the canonical bytes without sig
    #: the hash the head signs of the message's bytes before it (None: a head without)
    covers: bytes | None = None


def make_head(gateway_id: str, boot: int, committed_seq: int, mono_ms: int,
              key: Signer, *, before: bytes | None = None) -> bytes:
    """The signed head line (canonical bytes); with *before*, the bytes of the message
    that precede it (its newline included), a head that ``covers`` them."""
    body: dict[str, JSON] = {"alg": key.alg, "boot": boot, "committed_seq": committed_seq,
                             "gw": gateway_id, "kid": key_id(key.alg, key.public_raw),
                             "mono": mono_ms, "type": HEAD_TYPE}
    if before is not None:
        body[COVERS] = b64u(digest(key.alg, before))
    signed = canonical(body)
    body["sig"] = b64u(key.sign(signed))
    return canonical(body)


def is_head(line: bytes) -> bool:
    """Cheap test: a head line, not a record (records never hold ``"type":"head"``
    at their top level before ``"sig"``; the parse below decides)."""
    return b'"type":"head"' in line and b'"seq":' not in line


def parse_head(line: bytes) -> Head:
    """The head statement in *line*, shape-checked (ValueError otherwise); the caller
    verifies ``sig`` over ``signed`` with the session key ``kid`` of ``gw``."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"head: not JSON ({exc})") from None
    if not isinstance(obj, Mapping) or set(obj) - {COVERS} != set(_FIELDS):
        raise ValueError("head: not a head statement (fields)")
    covers: bytes | None = None
    if COVERS in obj:
        if not isinstance(obj[COVERS], str):
            raise ValueError("head: covers is not str")
        covers = unb64u(obj[COVERS])
    for name, kind in _FIELDS.items():
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise ValueError(f"head: {name} is not {kind.__name__}")  # noqa: TRY004
    if obj["type"] != HEAD_TYPE:
        raise ValueError("head: type is not 'head'")
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    if canonical(obj) != line:
        raise ValueError("head: not canonical bytes")
    return Head(obj["gw"], obj["boot"], obj["committed_seq"], obj["mono"], obj["alg"],
                obj["kid"], unb64u(obj["sig"]), canonical(unsigned), covers)


def covered_prefix(payload: bytes, head_line: bytes) -> bytes | None:
    """The bytes of *payload* a head line ending it covers (all before it, its newline
    included); None if *head_line* is not the payload's last line."""
    if not payload.endswith(b"\n" + head_line):
        return None
    return payload[:len(payload) - len(head_line)]
