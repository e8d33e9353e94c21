"""The check-in kiosk simulator: check-ins and status changes from a kiosk on a pty.

Wire faults come from :class:`lab.wire.Damage`, as for every framed device.
The kiosk keeps its status flags; :meth:`KioskSim.set_status` changes some and
sends the whole state, as the firmware does on any change. Each check-in and each
status is signed under the kiosk's pairing key with the next value of its one message
counter (docs/kiosk.md); fault injection beyond the wire: a replayed check-in
(:meth:`KioskSim.replay`), a forged one (:meth:`KioskSim.forge`, the wrong key) and
one without a signature (:meth:`KioskSim.send_unsigned`, firmware of kiosk messages
version 1); likewise a replayed status (:meth:`KioskSim.replay_status`) and an
unsigned one (:meth:`KioskSim.send_unsigned_status`, version 2).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from drivers.kiosk import (
    FLAG_NAMES,
    KEY_BYTES,
    MSG_CHECKIN,
    MSG_STATUS,
    MSG_UNSIGNED_CHECKIN,
    MSG_UNSIGNED_STATUS,
    CheckIn,
    KioskStatus,
    MessageError,
    Method,
    Result,
    SignedCheckIn,
    SignedStatus,
)
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass
from lab.simulators.device import FramedDeviceSim
from lab.simulators.pty import SerialEnd
from lab.wire import Damage

_FLAG_OF_NAME = {name: flag for flag, name in FLAG_NAMES.items()}


class _Keep(enum.Enum):
    BATTERY = enum.auto()


class KioskSim(FramedDeviceSim):
    def __init__(
        self,
        serial: str = "KI-0001",
        *,
        key: bytes = bytes(KEY_BYTES),
        link: Path | None = None,
        tz_offset_min: int = 60,
        battery_pct: int | None = 100,
        wall_clock: Callable[[], float] = time.time,
        to_host: Damage | None = None,
        from_host: Damage | None = None,
        byte_delay_s: float = 0.0,
        firmware: tuple[int, int, int] = (1, 0, 0),
        end: SerialEnd | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        window: int = 0,
    ) -> None:
        super().__init__(DeviceClass.KIOSK, serial, link=link, firmware=firmware,
                         to_host=to_host, from_host=from_host, byte_delay_s=byte_delay_s,
                         end=end, protocol_version=protocol_version, window=window)
        self.tz_offset_min = tz_offset_min
        self.status = KioskStatus(0, battery_pct)
        self._wall_clock = wall_clock
        self.key = key
        self.counter = 0  # the message counter (check-ins and statuses), kept in flash
        self.signed: list[SignedCheckIn] = []  # every check-in signed, for replays
        self.statuses: list[SignedStatus] = []  # every status signed, for replays

    def checkin(
        self,
        person: str,
        method: Method | str = Method.FINGERPRINT,
        score: int = 1000,
        result: Result | str = Result.MATCH,
    ) -> CheckIn:
        """Queue a check-in, signed with the next counter; *score* in thousandths (973 is
        97.3 %)."""
        checkin = self._checkin(person, method, score, result)
        self.counter += 1
        signed = SignedCheckIn.sign(self.key, self.counter, checkin)
        self.signed.append(signed)
        self.enqueue(MSG_CHECKIN, signed.to_bytes())
        return checkin

    def replay(self, index: int = -1) -> SignedCheckIn:
        """Send again a check-in sent before, byte for byte (a new event of the kiosk)."""
        signed = self.signed[index]
        self.enqueue(MSG_CHECKIN, signed.to_bytes())
        return signed

    def forge(self, person: str, method: Method | str = Method.FINGERPRINT) -> SignedCheckIn:
        """A check-in with a fresh counter, signed with a key that is not the kiosk's."""
        wrong = bytes(b ^ 0xFF for b in self.key)
        signed = SignedCheckIn.sign(wrong, self.counter + 1,
                                    self._checkin(person, method, 1000, Result.MATCH))
        self.enqueue(MSG_CHECKIN, signed.to_bytes())
        return signed

    def send_unsigned(self, person: str) -> CheckIn:
        """A check-in as kiosk messages version 1 sent it: no counter, no MAC."""
        checkin = self._checkin(person, Method.FINGERPRINT, 1000, Result.MATCH)
        self.enqueue(MSG_UNSIGNED_CHECKIN, checkin.to_bytes())
        return checkin

    def _checkin(self, person: str, method: Method | str, score: int,
                 result: Result | str) -> CheckIn:
        return CheckIn(
            person,
            method if isinstance(method, Method) else Method.from_label(method),
            score,
            result if isinstance(result, Result) else Result.from_label(result),
            int(self._wall_clock()),
            self.tz_offset_min,
        )

    def set_status(
        self,
        *,
        battery_pct: int | Literal[_Keep.BATTERY] | None = _Keep.BATTERY,
        **flags: bool,
    ) -> KioskStatus:
        """Change flags by name (``tamper=True, paper_fault=False``, see
        :data:`drivers.kiosk.FLAG_NAMES`) and/or the battery (None: unknown;
        left as is when not given), then send the whole state."""
        value = self.status.flags
        for name, on in flags.items():
            flag = _FLAG_OF_NAME.get(name)
            if flag is None:
                raise MessageError(f"no status flag {name!r}; flags: {', '.join(_FLAG_OF_NAME)}")
            value = value | flag if on else value & ~flag
        battery = self.status.battery_pct if battery_pct is _Keep.BATTERY else battery_pct
        self.status = KioskStatus(value, battery)
        self.counter += 1
        signed = SignedStatus.sign(self.key, self.counter, self.status)
        self.statuses.append(signed)
        self.enqueue(MSG_STATUS, signed.to_bytes())
        return self.status

    def replay_status(self, index: int = -1) -> SignedStatus:
        """Send again a status sent before, byte for byte (a new event of the kiosk)."""
        signed = self.statuses[index]
        self.enqueue(MSG_STATUS, signed.to_bytes())
        return signed

    def send_unsigned_status(self, status: KioskStatus) -> KioskStatus:
        """A status as kiosk messages version 2 sent it: no counter, no MAC (the kiosk's
        own state is left as it is)."""
        self.enqueue(MSG_UNSIGNED_STATUS, status.to_bytes())
        return status


if __name__ == "__main__":  # the same as: python -m lab.simulators kiosk
    import sys

    from lab.simulators.cli import main

    sys.exit(main(["kiosk", *sys.argv[1:]]))
