#!/usr/bin/env python3
"""Stable device names for the gateway's USB devices: ``/etc/smartcorr/devices.conf`` in,
a udev rules file out (``packaging/install.sh`` installs it as
``/etc/udev/rules.d/70-smartcorr.rules``).

    python3 packaging/udev_rules.py /etc/smartcorr/devices.conf > 70-smartcorr.rules

devices.conf, one device a line (``#`` starts a comment)::

    # name          vendor  product  serial      [interface]
    tag-receiver    0403    6015     DK0AB1CD
    kiosk           10c4    ea60     0001        00
    gnss            1546    01a7     -
    usb-allow       2c7c    0125     -           # the LTE modem: no name, allowed
    lock-usb        yes

Each named device gets ``/dev/smartcorr/<name>`` (use that path in gateway.toml). The
values are what ``udevadm info /dev/ttyUSB0`` prints as ``ID_VENDOR_ID``,
``ID_MODEL_ID``, ``ID_SERIAL_SHORT`` and ``ID_USB_INTERFACE_NUM`` (docs/installing.md);
``-`` as the serial matches any (only for a device without a serial number: two alike
would then fight over the name). ``lock-usb yes`` de-authorizes every other USB device
as it is plugged in (hubs excepted; docs/hardening.md): list the modem, a keyboard you
need, anything else with ``usb-allow``.

Standard library only: it runs with the system's python3 before any virtual env exists.
Errors name the file and the line and exit with status 2.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
HEX4_RE = re.compile(r"^[0-9a-f]{4}$")
# udev puts ID_SERIAL_SHORT through its own replacement of unsafe characters: what is
# left is letters, digits and a few marks. No glob characters: a value is a pattern.
SERIAL_RE = re.compile(r"^[A-Za-z0-9_.+:-]{1,64}$")
INTERFACE_RE = re.compile(r"^[0-9a-f]{2}$")
#: At most this many devices in one file: a gateway has three or four.
MAX_DEVICES = 32
ALLOW = "usb-allow"
LOCK = "lock-usb"
RESERVED = {ALLOW, LOCK}
SYMLINK_DIR = "smartcorr"


class DevicesError(ValueError):
    """A line of devices.conf that cannot be used: the message names the file and line."""


@dataclass(frozen=True)
class Device:
    name: str | None  # None: allowed (lock-usb) but not named
    vendor: str
    product: str
    serial: str | None  # None: any
    interface: str | None  # None: any
    line: int


@dataclass(frozen=True)
class Devices:
    devices: tuple[Device, ...]
    lock_usb: bool


def parse(text: str, source: str = "devices.conf") -> Devices:
    devices: list[Device] = []
    lock_usb = False
    names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        fields = line.split()
        if fields[0] == LOCK:
            if len(fields) != 2 or fields[1] not in ("yes", "no"):
                raise DevicesError(f"{where}: write 'lock-usb yes' or 'lock-usb no'")
            lock_usb = fields[1] == "yes"
            continue
        if len(fields) not in (4, 5):
            raise DevicesError(f"{where}: expected 'name vendor product serial [interface]' "
                               f"(4 or 5 fields), got {len(fields)}")
        name, vendor, product, serial = (f.lower() if i in (1, 2) else f
                                         for i, f in enumerate(fields[:4]))
        interface = fields[4].lower() if len(fields) == 5 else None
        if name != ALLOW and not NAME_RE.match(name):
            raise DevicesError(f"{where}: name {name!r}: use lower-case letters, digits and "
                               "'-' (e.g. tag-receiver, kiosk, gnss)")
        if name in names:
            raise DevicesError(f"{where}: name {name!r} is given twice (line {names[name]})")
        for what, value in (("vendor", vendor), ("product", product)):
            if not HEX4_RE.match(value):
                raise DevicesError(f"{where}: {what} {value!r}: four hex digits, as udevadm "
                                   f"info shows it (ID_VENDOR_ID, ID_MODEL_ID)")
        if serial != "-" and not SERIAL_RE.match(serial):
            raise DevicesError(f"{where}: serial {serial!r}: letters, digits and _.+:- only "
                               "(ID_SERIAL_SHORT), or '-' for any")
        if interface is not None and not INTERFACE_RE.match(interface):
            raise DevicesError(f"{where}: interface {interface!r}: two hex digits "
                               "(ID_USB_INTERFACE_NUM, e.g. 00)")
        if len(devices) == MAX_DEVICES:
            raise DevicesError(f"{where}: more than {MAX_DEVICES} devices")
        if name != ALLOW:
            names[name] = number
        devices.append(Device(None if name == ALLOW else name, vendor, product,
                              None if serial == "-" else serial, interface, number))
    return Devices(tuple(devices), lock_usb)


HEADER = """\
# Made by packaging/udev_rules.py from {source}: edit that file, then run
# packaging/install.sh again (it reloads udev). Do not edit this one.
"""


def render(devices: Devices, source: str = "/etc/smartcorr/devices.conf") -> str:
    out = [HEADER.format(source=source)]
    out.append('ACTION=="remove", GOTO="smartcorr_end"\n')
    named = [d for d in devices.devices if d.name is not None]
    if named:
        out.append("\n# stable names: /dev/smartcorr/<name> (ENV from 60-serial.rules' usb_id)\n")
        out.append('SUBSYSTEM!="tty", GOTO="smartcorr_tty_end"\n')
        out.append('ENV{ID_BUS}!="usb", GOTO="smartcorr_tty_end"\n')
    for d in named:
        keys = [f'ENV{{ID_VENDOR_ID}}=="{d.vendor}"', f'ENV{{ID_MODEL_ID}}=="{d.product}"']
        if d.serial is not None:
            keys.append(f'ENV{{ID_SERIAL_SHORT}}=="{d.serial}"')
        if d.interface is not None:
            keys.append(f'ENV{{ID_USB_INTERFACE_NUM}}=="{d.interface}"')
        keys += [f'SYMLINK+="{SYMLINK_DIR}/{d.name}"', 'GROUP="dialout"', 'MODE="0660"']
        out.append(", ".join(keys) + "\n")
    if named:
        out.append('LABEL="smartcorr_tty_end"\n')
    if devices.lock_usb:
        out.append(
            "\n# lock-usb: a USB device not listed is de-authorized as it arrives (no driver\n"
            "# keeps it); hubs and listed devices are authorized, which also serves a kernel\n"
            "# started with usbcore.authorized_default=0 (docs/hardening.md).\n"
            'SUBSYSTEM!="usb", GOTO="smartcorr_end"\n'
            'ENV{DEVTYPE}!="usb_device", GOTO="smartcorr_end"\n'
            'ACTION!="add", GOTO="smartcorr_end"\n'
            'ATTR{bDeviceClass}=="09", ATTR{authorized}="1", GOTO="smartcorr_end"\n')
        for d in devices.devices:
            keys = [f'ATTR{{idVendor}}=="{d.vendor}"', f'ATTR{{idProduct}}=="{d.product}"']
            if d.serial is not None:
                keys.append(f'ATTR{{serial}}=="{d.serial}"')
            out.append(", ".join(keys) + ', ATTR{authorized}="1", GOTO="smartcorr_end"\n')
        out.append('ATTR{authorized}="0"\n')
    out.append('\nLABEL="smartcorr_end"\n')
    return "".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n", 2)[1] if argv and argv[0] in ("-h", "--help")
              else "usage: udev_rules.py DEVICES_CONF  (the rules go to stdout)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    path = Path(argv[0])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"udev_rules.py: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    try:
        devices = parse(text, str(path))
    except DevicesError as exc:
        print(f"udev_rules.py: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(devices, str(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
