"""The ``request-diag`` command's body and the chunks its answer travels in
(docs/commands.md, "request-diag"). Shared and sans-IO: the gateway cuts a bundle into
chunks (``app/diag_command.py``), the platform puts them back together and checks them
against the signed ``command.applied`` record (``central/diag_command.py``).

A chunk is the canonical bytes (:func:`core.record.canonical`) of::

    {"v": 1, "gw": "gw-…", "request": "<id>", "cseq": n, "index": i, "count": k,
     "size": total, "sha256": "<the whole bundle's SHA-256, hex>",
     "chunk_sha256": "<this chunk's data's SHA-256, hex>", "data": "<base64url>"}

published at QoS 1 on ``smartcorr/v1/gw/<gw>/diag/<request>``, which only that gateway
may write (core/topics.py ``broker_acl``). The chunks themselves are not signed: what
makes them evidence is the ``command.applied`` record (signed and chained like every
record), whose ``details.bundle.sha256`` names the whole bundle. A chunk changed on the
way, a chunk missing or a chunk made up does not reassemble into a bundle of that hash.

The body never asks for personal data: a platform command must not pull it off the box
(an ``include_personal`` field is refused, ``bad_body``, field ``include_personal``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.record import JSON, canonical

__all__ = ["CHUNK_BYTES", "KIND", "MAX_BUNDLE_BYTES", "MAX_CHUNKS", "REQUEST_RE", "SECTIONS",
           "ChunkError", "DiagBodyError", "Reassembly", "RequestDiag", "chunks_of", "parse_chunk",
           "validate_request_diag"]

KIND = "request-diag"
#: The largest bundle sent: beyond it the command is refused (a ``conflict`` whose detail
#: starts ``too_large:``); ask for fewer sections.
MAX_BUNDLE_BYTES = 1024 * 1024
#: The bundle's bytes per chunk (a chunk message is about 4/3 of it plus its header).
CHUNK_BYTES = 64 * 1024
MAX_CHUNKS = -(-MAX_BUNDLE_BYTES // CHUNK_BYTES)
#: What a bundle may hold, by name: the reports (versions, daemon, uplink, certificates'
#: dates, buffer, ports), the configuration (redacted), the recent log lines (redacted).
SECTIONS = ("reports", "config", "logs")
#: A request id: it names the answer's topic, so no MQTT wildcard nor separator.
REQUEST_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS: dict[str, type] = {"v": int, "gw": str, "request": str, "cseq": int, "index": int,
                            "count": int, "size": int, "sha256": str, "chunk_sha256": str,
                            "data": str}
FORMAT_VERSION = 1


class DiagBodyError(ValueError):
    """Raised as core.commands.BodyError by the registered validator (field, why)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True)
class RequestDiag:
    request: str
    sections: tuple[str, ...] = SECTIONS


def validate_request_diag(body: Mapping[str, Any]) -> RequestDiag:
    """The typed body of a ``request-diag`` command; :class:`DiagBodyError` (field, why)
    otherwise. ``include_personal`` is refused whatever its value."""
    if "include_personal" in body:
        raise DiagBodyError("include_personal", "a platform command never pulls personal data "
                                             "off the gateway: only the technician on site "
                                             "may (gateway.py diag bundle --include-personal)")
    for name in body:
        if name not in ("request", "sections"):
            raise DiagBodyError(name, "is not a field of this kind")
    if "request" not in body:
        raise DiagBodyError("request", "is required")
    request = body["request"]
    if not isinstance(request, str) or not REQUEST_RE.fullmatch(request):
        raise DiagBodyError("request", "must be 8-64 of A-Z, a-z, 0-9, '_', '-' (it names the "
                                    "answer's topic)")
    sections: tuple[str, ...] = SECTIONS
    if "sections" in body:
        value = body["sections"]
        if not isinstance(value, list) or not value or len(value) > len(SECTIONS) \
                or not all(isinstance(s, str) for s in value) or len(set(value)) != len(value):
            raise DiagBodyError("sections", f"must be a non-empty list of distinct names of "
                                         f"{', '.join(SECTIONS)}")
        unknown = [s for s in value if s not in SECTIONS]
        if unknown:
            raise DiagBodyError("sections", f"{unknown[0][:40]!r} is not a section (those are: "
                                         f"{', '.join(SECTIONS)})")
        sections = tuple(s for s in SECTIONS if s in value)
    return RequestDiag(request, sections)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def chunks_of(bundle: bytes, *, gw: str, request: str, cseq: int,
              chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """The chunk messages of *bundle* (at most :data:`MAX_BUNDLE_BYTES`: ValueError)."""
    if not 0 < len(bundle) <= MAX_BUNDLE_BYTES:
        raise ValueError(f"a bundle is 1 to {MAX_BUNDLE_BYTES} bytes, this one {len(bundle)}")
    whole = hashlib.sha256(bundle).hexdigest()
    parts = [bundle[i:i + chunk_bytes] for i in range(0, len(bundle), chunk_bytes)]
    out = []
    for index, part in enumerate(parts):
        obj: dict[str, JSON] = {
            "v": FORMAT_VERSION, "gw": gw, "request": request, "cseq": cseq, "index": index,
            "count": len(parts), "size": len(bundle), "sha256": whole,
            "chunk_sha256": hashlib.sha256(part).hexdigest(), "data": _b64u(part)}
        out.append(canonical(obj))
    return out


class ChunkError(ValueError):
    """A chunk that is not one, or does not belong: why."""


@dataclass(frozen=True)
class Chunk:
    gw: str
    request: str
    cseq: int
    index: int
    count: int
    size: int
    sha256: str
    data: bytes = field(repr=False)


def parse_chunk(payload: bytes) -> Chunk:
    """A chunk's fields; :class:`ChunkError` saying what is wrong (its own hash included:
    a chunk altered on the way is refused here, before reassembly)."""
    if len(payload) > CHUNK_BYTES * 2:
        raise ChunkError(f"{len(payload)} bytes: larger than any chunk")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChunkError("not a JSON text") from None
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        raise ChunkError(f"not a chunk (fields {sorted(_FIELDS)})")
    for name, kind in _FIELDS.items():
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise ChunkError(f"{name!r} is of the wrong type")
    if obj["v"] != FORMAT_VERSION:
        raise ChunkError(f"format version {obj['v']}")
    if not 1 <= obj["count"] <= MAX_CHUNKS or not 0 <= obj["index"] < obj["count"]:
        raise ChunkError(f"chunk {obj['index']} of {obj['count']}: out of range")
    if not 0 < obj["size"] <= MAX_BUNDLE_BYTES:
        raise ChunkError(f"a bundle of {obj['size']} bytes: out of range")
    if not _HEX64.fullmatch(obj["sha256"]) or not _HEX64.fullmatch(obj["chunk_sha256"]):
        raise ChunkError("a hash is not 64 lower-case hex digits")
    try:
        data = _unb64u(obj["data"])
    except ValueError:
        raise ChunkError("'data' is not unpadded base64url") from None
    if len(data) > CHUNK_BYTES:
        raise ChunkError(f"{len(data)} bytes of data: more than a chunk holds")
    if hashlib.sha256(data).hexdigest() != obj["chunk_sha256"]:
        raise ChunkError(f"chunk {obj['index']}: its data does not match its hash (altered "
                         "on the way)")
    return Chunk(obj["gw"], obj["request"], obj["cseq"], obj["index"], obj["count"],
                 obj["size"], obj["sha256"], data)


class Reassembly:
    """The chunks of one request, put back together: bounded by the first chunk's count
    and size (themselves bounded); a chunk that disagrees with the first is refused."""

    def __init__(self, gw: str, request: str) -> None:
        self.gw = gw
        self.request = request
        self.first: Chunk | None = None
        self.parts: dict[int, bytes] = {}
        self.refused: list[str] = []  # why chunks were refused (at most 16 kept)
        self.refused_count = 0

    def add(self, payload: bytes) -> bool:
        """Take one chunk message; False (and why, in :attr:`refused`) when refused."""
        try:
            chunk = self._belonging(parse_chunk(payload))
        except ChunkError as exc:
            self.refused_count += 1
            if len(self.refused) < 16:
                self.refused.append(str(exc))
            return False
        self.first = self.first or chunk
        self.parts[chunk.index] = chunk.data
        return True

    def _belonging(self, chunk: Chunk) -> Chunk:
        if (chunk.gw, chunk.request) != (self.gw, self.request):
            raise ChunkError(f"a chunk of {chunk.gw}/{chunk.request}, not of this request")
        first = self.first
        if first is not None and (chunk.count, chunk.size, chunk.sha256, chunk.cseq) != (
                first.count, first.size, first.sha256, first.cseq):
            raise ChunkError(f"chunk {chunk.index} disagrees with the first one on the "
                             "bundle's count, size, hash or command")
        return chunk

    @property
    def complete(self) -> bool:
        return self.first is not None and len(self.parts) == self.first.count

    def bundle(self, expected_sha256: str) -> bytes:
        """The bundle, once complete and its SHA-256 is *expected_sha256* (the signed
        record's); ChunkError otherwise."""
        if self.first is None or not self.complete:
            have = len(self.parts)
            want = "?" if self.first is None else self.first.count
            raise ChunkError(f"{have} of {want} chunks arrived")
        data = b"".join(self.parts[i] for i in range(self.first.count))
        got = hashlib.sha256(data).hexdigest()
        if len(data) != self.first.size or got != expected_sha256:
            raise ChunkError(f"the reassembled bundle's SHA-256 is {got}, the gateway's signed "
                             f"command.applied record names {expected_sha256}: a chunk was "
                             "altered, replaced or made up on the way")
        return data
