"""Input lines through the Linux GPIO character device, uAPI v2 (``linux/gpio.h``).

Two halves, kept apart so that the second is testable without a GPIO chip:

* :func:`request_lines` opens ``/dev/gpiochipN`` and asks the kernel for input lines
  with both edges detected and a debounce (``GPIO_V2_GET_LINE_IOCTL``); the kernel
  answers with a line-request file descriptor. :func:`read_levels` reads the lines'
  levels from it (``GPIO_V2_LINE_GET_VALUES_IOCTL``). Only these two ioctls need a
  real (or the kernel's simulated, gpio-sim) chip.
* :class:`EventReader` decodes what the kernel writes on that descriptor: whole
  ``struct gpio_v2_line_event`` (48 bytes each). It works on any file descriptor, so
  tests and the lab feed it a pipe carrying the same structs packed with the same
  ctypes layout: only the ioctl is bypassed.

Levels are physical (the request sets no ``ACTIVE_LOW`` flag): a rising edge is level 1.
Which level means "open" or "present" is :mod:`drivers.inputs`' business. Event
timestamps are ``CLOCK_MONOTONIC`` (the kernel's default), the clock of
``time.monotonic_ns``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Sequence
from dataclasses import dataclass

# -- linux/gpio.h --------------------------------------------------------------------
GPIO_MAX_NAME_SIZE = 32
GPIO_V2_LINES_MAX = 64
GPIO_V2_LINE_NUM_ATTRS_MAX = 10

GPIO_V2_LINE_FLAG_INPUT = 1 << 2
GPIO_V2_LINE_FLAG_EDGE_RISING = 1 << 4
GPIO_V2_LINE_FLAG_EDGE_FALLING = 1 << 5
GPIO_V2_LINE_ATTR_ID_DEBOUNCE = 3
GPIO_V2_LINE_EVENT_RISING_EDGE = 1
GPIO_V2_LINE_EVENT_FALLING_EDGE = 2


class GpioV2LineAttributeValue(ctypes.Union):
    _fields_ = (("flags", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("debounce_period_us", ctypes.c_uint32))


class GpioV2LineAttribute(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = (("id", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("u", GpioV2LineAttributeValue))


class GpioV2LineConfigAttribute(ctypes.Structure):
    _fields_ = (("attr", GpioV2LineAttribute), ("mask", ctypes.c_uint64))


class GpioV2LineConfig(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("num_attrs", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 5),
                ("attrs", GpioV2LineConfigAttribute * GPIO_V2_LINE_NUM_ATTRS_MAX))


class GpioV2LineRequest(ctypes.Structure):
    _fields_ = (("offsets", ctypes.c_uint32 * GPIO_V2_LINES_MAX),
                ("consumer", ctypes.c_char * GPIO_MAX_NAME_SIZE),
                ("config", GpioV2LineConfig),
                ("num_lines", ctypes.c_uint32), ("event_buffer_size", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 5), ("fd", ctypes.c_int32))


class GpioV2LineValues(ctypes.Structure):
    _fields_ = (("bits", ctypes.c_uint64), ("mask", ctypes.c_uint64))


class GpioV2LineEvent(ctypes.Structure):
    _fields_ = (("timestamp_ns", ctypes.c_uint64), ("id", ctypes.c_uint32),
                ("offset", ctypes.c_uint32), ("seqno", ctypes.c_uint32),
                ("line_seqno", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 6))


# The header's sizes (the ABI: identical on 32- and 64-bit, hence __aligned_u64).
assert ctypes.sizeof(GpioV2LineAttribute) == 16  # noqa: S101
assert ctypes.sizeof(GpioV2LineConfig) == 272  # noqa: S101
assert ctypes.sizeof(GpioV2LineRequest) == 592  # noqa: S101
assert ctypes.sizeof(GpioV2LineValues) == 16  # noqa: S101
assert ctypes.sizeof(GpioV2LineEvent) == 48  # noqa: S101
EVENT_SIZE = ctypes.sizeof(GpioV2LineEvent)

_IOC_WRITE, _IOC_READ = 1, 2


def _iowr(nr: int, size: int) -> int:
    """``_IOWR(0xB4, nr, size)`` of asm-generic/ioctl.h (dir 30, size 16, type 8, nr 0)."""
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (0xB4 << 8) | nr


GPIO_V2_GET_LINE_IOCTL = _iowr(0x07, ctypes.sizeof(GpioV2LineRequest))
GPIO_V2_LINE_GET_VALUES_IOCTL = _iowr(0x0E, ctypes.sizeof(GpioV2LineValues))

# -- ours -------------------------------------------------------------------------------
CONSUMER = b"smartcorr-gateway"
#: The kernel's own debounce of every requested line, microseconds: it swallows contact
#: chatter below the core's debounce (drivers/inputs.py) so that it never floods us.
KERNEL_DEBOUNCE_US = 5_000
#: Events the kernel should keep for us (16 per line by default).
EVENT_BUFFER_SIZE = 64
#: Events read at once, at most (the reader's buffer is bounded by this).
READ_EVENTS = 64


class GpioError(OSError):
    """A chip or a line could not be opened or read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LineEvent:
    """One edge: the line's offset, its new level (1 rising, 0 falling), when (ns)."""

    offset: int
    level: int
    timestamp_ns: int
    seqno: int = 0
    line_seqno: int = 0


def pack_event(event: LineEvent) -> bytes:
    """The 48 bytes the kernel writes for *event* (the lab's simulated line uses it)."""
    raw = GpioV2LineEvent(
        timestamp_ns=event.timestamp_ns,
        id=GPIO_V2_LINE_EVENT_RISING_EDGE if event.level else GPIO_V2_LINE_EVENT_FALLING_EDGE,
        offset=event.offset, seqno=event.seqno, line_seqno=event.line_seqno)
    return bytes(raw)


def decode_event(raw: bytes) -> LineEvent | None:
    """One ``struct gpio_v2_line_event``; None for an event id this code does not know."""
    if len(raw) != EVENT_SIZE:
        raise ValueError(f"a gpio_v2_line_event is {EVENT_SIZE} bytes, got {len(raw)}")
    ev = GpioV2LineEvent.from_buffer_copy(raw)
    if ev.id == GPIO_V2_LINE_EVENT_RISING_EDGE:
        level = 1
    elif ev.id == GPIO_V2_LINE_EVENT_FALLING_EDGE:
        level = 0
    else:
        return None
    return LineEvent(ev.offset, level, ev.timestamp_ns, ev.seqno, ev.line_seqno)


class EventReader:
    """Whole events from a line-request descriptor (or a pipe carrying the same bytes).

    The kernel only ever returns whole events; a pipe may split them, so a partial event
    is kept (less than 48 bytes: the buffer is bounded) until the rest arrives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._partial = b""
        self.unknown_ids = 0

    def read(self) -> tuple[list[LineEvent], bool]:
        """Read what is there (call when *fd* is readable): the events, and whether the
        descriptor reached its end (a pipe's writer closed; a chip removed)."""
        data = os.read(self.fd, EVENT_SIZE * READ_EVENTS)
        if not data:
            return [], True
        data = self._partial + data
        whole = len(data) - len(data) % EVENT_SIZE
        self._partial = data[whole:]
        events: list[LineEvent] = []
        for start in range(0, whole, EVENT_SIZE):
            event = decode_event(data[start:start + EVENT_SIZE])
            if event is None:
                self.unknown_ids += 1
            else:
                events.append(event)
        return events, False


# -- the ioctl half: needs a GPIO chip ---------------------------------------------------
def request_lines(chip: str, offsets: Sequence[int], *,
                  debounce_us: int = KERNEL_DEBOUNCE_US) -> int:
    """Request *offsets* of *chip* as inputs with both edges and a debounce; return the
    line-request descriptor (non-blocking, close-on-exec; the caller closes it)."""
    if not 1 <= len(offsets) <= GPIO_V2_LINES_MAX:
        raise ValueError(f"request 1-{GPIO_V2_LINES_MAX} lines, got {len(offsets)}")
    req = GpioV2LineRequest()
    for index, offset in enumerate(offsets):
        req.offsets[index] = offset
    req.num_lines = len(offsets)
    req.consumer = CONSUMER
    req.event_buffer_size = EVENT_BUFFER_SIZE
    req.config.flags = (GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_EDGE_RISING
                        | GPIO_V2_LINE_FLAG_EDGE_FALLING)
    if debounce_us:
        req.config.num_attrs = 1
        attr = req.config.attrs[0]
        attr.attr.id = GPIO_V2_LINE_ATTR_ID_DEBOUNCE
        attr.attr.debounce_period_us = debounce_us
        attr.mask = (1 << len(offsets)) - 1
    try:
        chip_fd = os.open(chip, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise GpioError(exc.errno, f"cannot open GPIO chip {chip}: {exc.strerror}") from None
    try:
        fcntl.ioctl(chip_fd, GPIO_V2_GET_LINE_IOCTL, req)
    except OSError as exc:
        raise GpioError(exc.errno, f"{chip}: cannot request lines {list(offsets)} "
                                   f"(in use, or not on this chip?): {exc.strerror}") from None
    finally:
        os.close(chip_fd)  # the line request lives on in its own descriptor
    if req.fd <= 0:
        raise GpioError(0, f"{chip}: the kernel returned no line descriptor")
    os.set_blocking(req.fd, False)
    return int(req.fd)


def read_levels(line_fd: int, count: int) -> list[int]:
    """The physical levels (0/1) of the *count* lines of a request, in request order."""
    values = GpioV2LineValues(bits=0, mask=(1 << count) - 1)
    try:
        fcntl.ioctl(line_fd, GPIO_V2_LINE_GET_VALUES_IOCTL, values)
    except OSError as exc:
        raise GpioError(exc.errno, f"cannot read the line levels: {exc.strerror}") from None
    return [(values.bits >> index) & 1 for index in range(count)]
