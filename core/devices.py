"""Paired devices as values: what a driver needs to know of a device an installer paired.

The registry that keeps them (a file, encrypted keys) is :mod:`provisioning.registry`;
drivers receive these values and never open the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A paired tag not heard for this long is reported absent, seconds.
DEFAULT_ABSENT_AFTER_S = 120


@dataclass(frozen=True)
class PairedTag:
    tag: str  # "T" + 8 hex digits
    key: bytes  # AES-128 CMAC key
    absent_after_s: int
    paired_at: int

    @property
    def tag_id(self) -> int:
        return int(self.tag[1:], 16)


def tag_ref(tag_id: int) -> str:
    return f"T{tag_id:08X}"
