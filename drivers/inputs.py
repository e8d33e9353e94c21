"""Enclosure tamper switch and mains power: line levels become alarms and restores (sans-IO).

Fed line-level changes (``on_level(line, level, at_ns)``) and the time (``poll(now_ns)``)
by its caller (``app/inputs.py`` reads them from the GPIO character device,
``drivers/gpio.py``); returns :class:`core.record.Reading`. No I/O, no clock of its own.

Lines (each optional, each with the level at which its condition holds):

* ``enclosure``: active = the enclosure is open. ``enclosure.opened`` (alarm) /
  ``enclosure.closed`` (status).
* ``mains``: active = mains power is present. ``power.lost`` (alarm) /
  ``power.restored`` (status).
* ``ups_low``: active = the UPS HAT says its battery is nearly empty. Not a record of
  its own: it brings the clean shutdown forward.

A change counts once it has held for the line's debounce time; a change that reverts
sooner is a bounce, suppressed and counted. A record's ``mono`` is the instant the
change began (the first edge of the level that held), not when it was confirmed.

State at start: an open enclosure or absent mains is reported at start (``at_start``:
true), so an enclosure opened while the gateway was off is not missed; a closed
enclosure or present mains at start says nothing. A restore only ever follows its alarm.

Clean shutdown on battery: with ``ups_runtime_s``, ``power.lost`` starts a budget;
once ``ups_runtime_s - shutdown_margin_s`` has passed on battery, or the ``ups_low``
line asserts while on battery, the core emits one ``power.shutdown`` alarm and sets
:attr:`InputsCore.shutdown` (the decision the app acts on). Mains restored before that
cancels the budget. There is at most one ``power.shutdown`` per core.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from core.record import JSON, Reading, Source

log = logging.getLogger(__name__)

ENCLOSURE = "enclosure"
MAINS = "mains"
UPS_LOW = "ups_low"
#: Every line the core knows, in the order it reports changes that fall due together.
LINE_NAMES = (ENCLOSURE, MAINS, UPS_LOW)

#: A tamper switch's contacts bounce for a few milliseconds (5-20 ms for a microswitch);
#: 50 ms hides that and no real opening is that short: a lid cannot be lifted and
#: put back within 50 ms, so nothing an adversary does is lost to this filter.
DEFAULT_ENCLOSURE_DEBOUNCE_MS = 50
#: Mains dips and brown-outs of up to a second or so (a kettle, a motor starting, the
#: grid switching over) are not outages: the UPS rides through them. 2 s of absence is
#: an outage worth an alarm; a flicker is counted as a bounce, not recorded.
DEFAULT_MAINS_DEBOUNCE_MS = 2000
#: A UPS's low-battery output can chatter under load peaks near its threshold; one
#: second of it asserted is a real low battery (it only hastens a shutdown due anyway).
DEFAULT_UPS_LOW_DEBOUNCE_MS = 1000
#: Time kept in hand to commit, stop and power off before the battery runs out, seconds.
DEFAULT_SHUTDOWN_MARGIN_S = 60.0
#: Longest debounce a line may have: longer would hide a real opening or outage.
MAX_DEBOUNCE_MS = 60_000

NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class LineSpec:
    """One input line: its offset on the GPIO chip (named in records), the level at which
    its condition holds (open, present, low battery), and its debounce time."""

    offset: int
    active_high: bool = True
    debounce_ms: int = DEFAULT_ENCLOSURE_DEBOUNCE_MS

    def asserted(self, level: int) -> bool:
        return bool(level) == self.active_high


@dataclass(frozen=True, slots=True)
class InputsSpec:
    """The configured lines and the UPS's shutdown budget (``[inputs]`` in the TOML)."""

    enclosure: LineSpec | None = None
    mains: LineSpec | None = None
    ups_low: LineSpec | None = None
    #: How long the UPS keeps the gateway running on battery, seconds (None: no budget).
    ups_runtime_s: float | None = None
    shutdown_margin_s: float = DEFAULT_SHUTDOWN_MARGIN_S

    def lines(self) -> dict[str, LineSpec]:
        """The configured lines by name, in :data:`LINE_NAMES` order."""
        found = {ENCLOSURE: self.enclosure, MAINS: self.mains, UPS_LOW: self.ups_low}
        return {name: spec for name, spec in found.items() if spec is not None}


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The decision to power off cleanly: why, and how long the gateway was on battery."""

    reason: str  # "ups_low" | "runtime_budget"
    on_battery_ms: int
    at_ns: int


@dataclass
class InputStats:
    """Counters for the health record (plain integers)."""

    events: int = 0  # level changes received
    bounces: int = 0  # changes that reverted within their debounce time (not recorded)
    repeated: int = 0  # a level equal to the last one (nothing changed)
    unknown_lines: int = 0  # a change of a line the core was not given
    records: int = 0  # readings returned
    shutdowns: int = 0

    def as_dict(self) -> dict[str, JSON]:
        return {"events": self.events, "bounces": self.bounces, "repeated": self.repeated,
                "unknown_lines": self.unknown_lines, "records": self.records,
                "shutdowns": self.shutdowns}


@dataclass
class _Line:
    spec: LineSpec
    asserted: bool  # the debounced state
    raw: bool  # the latest level seen
    pending_since_ns: int | None = None  # raw differs from asserted since then
    alarm_since_ns: int | None = None  # its alarm awaits its restore since then


@dataclass
class _Battery:
    since_ns: int  # mains lost (the first edge of the outage), or the start
    deadline_ns: int | None  # the runtime budget spent, or None without one


class InputsCore:
    """Line levels to readings; see the module's docstring. Call :meth:`start` first."""

    def __init__(self, spec: InputsSpec, source: Source) -> None:
        self.spec = spec
        self.source = source
        self.stats = InputStats()
        #: Set once, when the gateway must power off (then stays set).
        self.shutdown: Shutdown | None = None
        self._lines: dict[str, _Line] = {}
        self._battery: _Battery | None = None
        self._now_ns = 0
        self._started = False

    def start(self, levels: Mapping[str, int], now_ns: int) -> list[Reading]:
        """The levels read when the lines were opened: an open enclosure or absent mains
        is an alarm now. Every configured line must have a level."""
        if self._started:
            raise RuntimeError("InputsCore.start called twice")
        specs = self.spec.lines()
        missing = sorted(set(specs) - set(levels))
        if missing:
            raise ValueError(f"no initial level for line {missing[0]!r}")
        self._started = True
        self._now_ns = now_ns
        out: list[Reading] = []
        for name, spec in specs.items():
            asserted = spec.asserted(levels[name])
            self._lines[name] = _Line(spec, asserted, asserted)
            out.extend(self._changed(name, now_ns, at_start=True))
        out.extend(self._check_shutdown(now_ns))
        return self._count(out)

    def on_level(self, line: str, level: int, at_ns: int) -> list[Reading]:
        """*line* is now at *level* (0/1) since *at_ns*: what fell due before it, and the
        start of its debounce. Times before the last one seen count as that one."""
        out = self.poll(at_ns)
        at_ns = self._now_ns
        state = self._lines.get(line)
        self.stats.events += 1
        if state is None:
            self.stats.unknown_lines += 1
            return out
        raw = state.spec.asserted(level)
        if raw == state.raw:
            self.stats.repeated += 1
            return out
        state.raw = raw
        if raw == state.asserted:
            state.pending_since_ns = None  # back before it held: a bounce
            self.stats.bounces += 1
        else:
            state.pending_since_ns = at_ns
        return out

    def poll(self, now_ns: int) -> list[Reading]:
        """Everything due up to *now_ns*, in the order it fell due."""
        if not self._started:
            raise RuntimeError("InputsCore.start must come first")
        now_ns = max(now_ns, self._now_ns)
        out: list[Reading] = []
        while True:
            due = self._next_due()
            if due is None or due[0] > now_ns:
                break
            at_ns, name = due
            if name is None:
                out.extend(self._shut_down("runtime_budget", at_ns))
                continue
            state = self._lines[name]
            began_ns = state.pending_since_ns
            assert began_ns is not None  # noqa: S101 - _next_due only names pending lines
            state.pending_since_ns = None
            state.asserted = state.raw
            out.extend(self._changed(name, began_ns, at_start=False))
            out.extend(self._check_shutdown(at_ns))
        self._now_ns = now_ns
        return self._count(out)

    def next_deadline_ns(self) -> int | None:
        """When :meth:`poll` next has something to do (None: only a level change can)."""
        due = self._next_due()
        return None if due is None else due[0]

    def state(self) -> dict[str, bool]:
        """The debounced state of each line (True: open, present, battery low)."""
        return {name: line.asserted for name, line in self._lines.items()}

    # -- internals ---------------------------------------------------------------
    def _next_due(self) -> tuple[int, str | None] | None:
        """The earliest (time, line) to confirm, or (time, None) for the budget."""
        best: tuple[int, str | None] | None = None
        for name, state in self._lines.items():
            if state.pending_since_ns is not None:
                at = state.pending_since_ns + state.spec.debounce_ms * NS_PER_MS
                if best is None or at < best[0]:
                    best = (at, name)
        battery = self._battery
        if (self.shutdown is None and battery is not None and battery.deadline_ns is not None
                and (best is None or battery.deadline_ns < best[0])):
            best = (battery.deadline_ns, None)
        return best

    def _changed(self, name: str, at_ns: int, *, at_start: bool) -> list[Reading]:
        """The debounced state of *name* changed at *at_ns*: its alarm or its restore."""
        state = self._lines[name]
        line = state.spec.offset
        alarm = state.asserted if name == ENCLOSURE else not state.asserted
        if name == UPS_LOW:
            mains = self._lines.get(MAINS)
            if state.asserted and mains is not None and mains.asserted:
                log.warning("the UPS reports a low battery while on mains (replace it?)")
            return []
        since = state.alarm_since_ns
        if alarm == (since is not None):
            return []  # no alarm to raise, or no alarm to restore
        if alarm:
            state.alarm_since_ns = at_ns
            if name == ENCLOSURE:
                return [self._reading("enclosure.opened", at_ns,
                                      {"line": line, "at_start": at_start})]
            self._on_battery(at_ns)
            return [self._reading("power.lost", at_ns, {
                "line": line, "at_start": at_start,
                "ups_runtime_s": _int_or_none(self.spec.ups_runtime_s),
            })]
        state.alarm_since_ns = None
        lasted_ms = max(0, (at_ns - (since or at_ns)) // NS_PER_MS)
        if name == ENCLOSURE:
            return [self._reading("enclosure.closed", at_ns, {"line": line, "open_ms": lasted_ms})]
        self._battery = None  # a shutdown not yet decided is cancelled
        return [self._reading("power.restored", at_ns, {
            "line": line, "outage_ms": lasted_ms,
            "shutdown_requested": self.shutdown is not None,
        })]

    def _on_battery(self, since_ns: int) -> None:
        runtime = self.spec.ups_runtime_s
        deadline = None
        if runtime is not None:
            deadline = since_ns + int((runtime - self.spec.shutdown_margin_s) * 1e9)
        self._battery = _Battery(since_ns, deadline)

    def _check_shutdown(self, at_ns: int) -> list[Reading]:
        """The ``ups_low`` line asserted while on battery (or, without a mains line, at
        all: the UPS only says so on battery) brings the shutdown now."""
        low = self._lines.get(UPS_LOW)
        if self.shutdown is not None or low is None or not low.asserted:
            return []
        if MAINS in self._lines and self._battery is None:
            return []
        return self._shut_down("ups_low", at_ns)

    def _shut_down(self, reason: str, at_ns: int) -> list[Reading]:
        if self.shutdown is not None:  # pragma: no cover - _next_due and the check guard
            return []
        battery = self._battery
        on_battery_ms = 0 if battery is None else max(0, (at_ns - battery.since_ns)
                                                      // NS_PER_MS)
        self.shutdown = Shutdown(reason, on_battery_ms, at_ns)
        self.stats.shutdowns += 1
        log.warning("powering off cleanly: %s after %d ms on battery", reason, on_battery_ms)
        return [self._reading("power.shutdown", at_ns, {
            "reason": reason, "on_battery_ms": on_battery_ms,
            "ups_runtime_s": _int_or_none(self.spec.ups_runtime_s),
            "margin_s": int(self.spec.shutdown_margin_s),
        })]

    def _reading(self, kind: str, at_ns: int, body: dict[str, JSON]) -> Reading:
        return Reading(kind, self.source, body, at_ns)

    def _count(self, out: list[Reading]) -> list[Reading]:
        self.stats.records += len(out)
        return out


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)
