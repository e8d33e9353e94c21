"""A records message compressed with DEFLATE (docs/records.md "Transport", "Compressed
messages").

A gateway configured for it (``[uplink] deflate = true``, only once its platform reads
such messages: a platform from before would quarantine them) sends a records message as
:data:`MARK` followed by the raw DEFLATE stream (RFC 1951) of the message's bytes, the
head line included: the head covers and signs the inflated bytes, exactly as in a plain
message. A plain message starts with ``{`` (a canonical record or head), so the mark
cannot be mistaken for one, nor one for it.

The platform inflates at most :func:`inflate_message`'s *limit* bytes (its bound on a plain
message): a stream that inflates to more (a "bomb") is refused, as is one that is not a
complete DEFLATE stream, each with its reason (:class:`InflateError`).
"""

from __future__ import annotations

import zlib

#: The first bytes of a compressed records message.
MARK = b"deflate\n"
#: Reasons of a refused compressed message (the ingest's quarantine reasons).
TOO_LARGE = "inflate_too_large"
CORRUPT = "inflate_corrupt"
_WBITS = -15  # a raw DEFLATE stream: no zlib header, no checksum (the head signs the bytes)


class InflateError(ValueError):
    """A compressed message that is refused; :attr:`reason` is :data:`TOO_LARGE` or
    :data:`CORRUPT`."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def is_deflated(payload: bytes) -> bool:
    return payload.startswith(MARK)


def deflate_message(payload: bytes) -> bytes:
    """*payload* (a records message) compressed and marked."""
    packer = zlib.compressobj(6, zlib.DEFLATED, _WBITS)  # 9: no smaller here, twice the time
    return MARK + packer.compress(payload) + packer.flush()


def inflate_message(payload: bytes, limit: int) -> bytes:
    """The records message a compressed *payload* holds, at most *limit* bytes
    (:class:`InflateError` otherwise, or when it is no complete DEFLATE stream)."""
    if not is_deflated(payload):
        raise InflateError(CORRUPT, "not a compressed records message (no mark)")
    unpacker = zlib.decompressobj(_WBITS)
    try:
        out = unpacker.decompress(payload[len(MARK):], limit + 1)
    except zlib.error as exc:
        raise InflateError(CORRUPT, f"not a DEFLATE stream: {exc}") from None
    if len(out) > limit or unpacker.unconsumed_tail:
        raise InflateError(TOO_LARGE, f"inflates to more than {limit} bytes")
    if not unpacker.eof:
        raise InflateError(CORRUPT, "the DEFLATE stream is cut short")
    if unpacker.unused_data:
        raise InflateError(CORRUPT, "bytes after the end of the DEFLATE stream")
    return out
