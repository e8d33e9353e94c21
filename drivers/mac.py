"""The message authentication paired devices use: AES-CMAC (RFC 4493) truncated to 8 bytes,
under the 16-byte key set at pairing (docs/serial-protocol.md, docs/kiosk.md)."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC

#: Bytes of the truncated AES-CMAC a tag's beacon or a kiosk's check-in carries.
MAC_BYTES = 8


def device_mac(key: bytes, signed_part: bytes) -> bytes:
    """The first :data:`MAC_BYTES` of AES-CMAC under *key* over *signed_part*."""
    mac = CMAC(AES(key))
    mac.update(signed_part)
    return mac.finalize()[:MAC_BYTES]
