"""Paired devices as values (tags, kiosks): what a driver needs to know of a device an
installer paired.

The registry that keeps them (a file, encrypted keys) is :mod:`provisioning.registry`;
drivers receive these values and never open the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Device events in the store's ledger are kept under this prefix, apart from the
#: gateway's own entries (tag counters, the clock's floor, ...): a device names itself,
#: and must not be able to name one of those.
DEVICE_LEDGER_PREFIX = "dev:"


def device_ledger_key(serial: str) -> str:
    """The ledger key of the last event committed for device *serial*."""
    return DEVICE_LEDGER_PREFIX + serial


#: A paired tag not heard for this long is reported absent, seconds.
DEFAULT_ABSENT_AFTER_S = 120
#: The absence times a pairing may set (``provision pair-tag --absent-after``, the
#: platform's ``pair-tag`` and ``set-config`` commands), seconds: longer than a day would
#: disable the alarm.
MIN_ABSENT_AFTER_S = 10
MAX_ABSENT_AFTER_S = 86_400
#: The longest kiosk serial a HELLO can carry (docs/serial-protocol.md, section 5).
KIOSK_SERIAL_MAX = 230


@dataclass(frozen=True)
class PairedTag:
    tag: str  # "T" + 8 hex digits
    key: bytes  # AES-128 CMAC key
    absent_after_s: int
    paired_at: int

    @property
    def tag_id(self) -> int:
        return int(self.tag[1:], 16)


#: A tag's reference in records and registries: ``T`` and its 32-bit id in 8 hex digits.
TAG_REF_RE = re.compile(r"^T[0-9A-F]{8}$")


def tag_ref(tag_id: int) -> str:
    return f"T{tag_id:08X}"


@dataclass(frozen=True)
class PairedKiosk:
    """A check-in kiosk paired with this gateway: its serial (as in its HELLO) and the
    AES-128 key under which it signs its check-ins. The key stays out of ``repr``."""

    serial: str
    key: bytes = field(repr=False)
    paired_at: int
