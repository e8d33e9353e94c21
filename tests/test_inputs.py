"""Enclosure switch, mains and UPS: line levels become alarm/restore pairs, a clean
shutdown on battery; the GPIO event layout; the worker over a pipe; the configuration."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import ConfigError, load_config
from app.inputs import InputsWorker, OpenedLines, PowerOff, open_gpio
from core.kinds import Priority
from core.record import Reading, Source
from drivers.gpio import (
    EVENT_SIZE,
    GPIO_V2_GET_LINE_IOCTL,
    GPIO_V2_LINE_GET_VALUES_IOCTL,
    EventReader,
    LineEvent,
    decode_event,
    pack_event,
    read_levels,
)
from drivers.inputs import (
    ENCLOSURE,
    MAINS,
    UPS_LOW,
    InputsCore,
    InputsSpec,
    LineSpec,
)
from lab.simulators.gpio import SimulatedLines

MS = 1_000_000
S = 1_000_000_000
SRC = Source("gateway", "gw-test-0001", "0.1.0")
T0 = 1000 * S  # the monotonic clock is far from zero


def make_core(*, ups_low: bool = False, runtime_s: float | None = None,
              margin_s: float = 60.0, mains: bool = True) -> InputsCore:
    spec = InputsSpec(
        enclosure=LineSpec(17, active_high=True, debounce_ms=50),
        mains=LineSpec(27, active_high=True, debounce_ms=2000) if mains else None,
        ups_low=LineSpec(22, active_high=False, debounce_ms=1000) if ups_low else None,
        ups_runtime_s=runtime_s, shutdown_margin_s=margin_s)
    return InputsCore(spec, SRC)


def kinds(readings: list[Reading]) -> list[str]:
    return [r.kind for r in readings]


CLOSED_POWERED = {ENCLOSURE: 0, MAINS: 1}


# -- the core ------------------------------------------------------------------------
def test_a_change_counts_once_it_held_for_its_debounce() -> None:
    core = make_core()
    assert core.start(CLOSED_POWERED, T0) == []
    assert core.on_level(ENCLOSURE, 1, T0 + S) == []
    assert core.next_deadline_ns() == T0 + S + 50 * MS
    assert core.poll(T0 + S + 49 * MS) == []
    [opened] = core.poll(T0 + S + 50 * MS)
    assert opened.kind == "enclosure.opened"
    assert opened.priority is Priority.ALARM
    assert opened.mono_ns == T0 + S  # when the opening began, not when it was confirmed
    assert opened.body == {"line": 17, "at_start": False}
    assert opened.source == SRC


def test_enclosure_alarm_and_restore_pair() -> None:
    core = make_core()
    core.start(CLOSED_POWERED, T0)
    out = core.on_level(ENCLOSURE, 1, T0 + S)
    out += core.on_level(ENCLOSURE, 0, T0 + 5 * S)  # confirms the opening first
    out += core.poll(T0 + 6 * S)
    assert kinds(out) == ["enclosure.opened", "enclosure.closed"]
    assert out[1].priority is Priority.STATUS
    assert out[1].body == {"line": 17, "open_ms": 4000}
    assert core.state() == {ENCLOSURE: False, MAINS: True}


def test_bounces_are_suppressed_and_counted() -> None:
    core = make_core()
    core.start(CLOSED_POWERED, T0)
    out: list[Reading] = []
    for i, level in enumerate([1, 0, 1, 0, 1, 0]):  # contact chatter, 10 ms apart
        out += core.on_level(ENCLOSURE, level, T0 + i * 10 * MS)
    out += core.poll(T0 + 10 * S)
    assert out == []
    assert core.stats.bounces == 3
    assert core.stats.events == 6


def test_mains_alarm_and_restore_pair_and_a_flicker_is_no_outage() -> None:
    core = make_core()
    core.start(CLOSED_POWERED, T0)
    core.on_level(MAINS, 0, T0 + S)
    core.on_level(MAINS, 1, T0 + S + 1500 * MS)  # 1.5 s dip: the UPS rides through it
    assert core.poll(T0 + 60 * S) == []
    assert core.stats.bounces == 1
    core.on_level(MAINS, 0, T0 + 100 * S)
    assert core.poll(T0 + 102 * S - 1) == []
    [lost] = core.poll(T0 + 102 * S)
    assert (lost.kind, lost.priority, lost.mono_ns) == ("power.lost", Priority.ALARM, T0 + 100 * S)
    assert lost.body == {"line": 27, "at_start": False, "ups_runtime_s": None}
    core.on_level(MAINS, 1, T0 + 160 * S)
    [restored] = core.poll(T0 + 170 * S)
    assert restored.kind == "power.restored"
    assert restored.body == {"line": 27, "outage_ms": 60_000, "shutdown_requested": False}


def test_open_enclosure_and_absent_mains_at_start_are_reported_at_start() -> None:
    core = make_core()
    out = core.start({ENCLOSURE: 1, MAINS: 0}, T0)
    assert kinds(out) == ["enclosure.opened", "power.lost"]
    assert all(r.body["at_start"] is True and r.mono_ns == T0 for r in out)
    core.on_level(ENCLOSURE, 0, T0 + S)
    core.on_level(MAINS, 1, T0 + S)
    assert kinds(core.poll(T0 + 10 * S)) == ["enclosure.closed", "power.restored"]


def test_a_restore_only_follows_an_alarm() -> None:
    core = make_core()
    assert core.start(CLOSED_POWERED, T0) == []
    core.on_level(ENCLOSURE, 0, T0 + S)  # the level it already has
    assert core.poll(T0 + 10 * S) == []
    assert core.stats.repeated == 1


def test_a_line_the_core_was_not_given_is_counted() -> None:
    core = make_core()
    core.start(CLOSED_POWERED, T0)
    assert core.on_level("offset:5", 1, T0 + S) == []
    assert core.stats.unknown_lines == 1


def test_start_needs_every_configured_level() -> None:
    core = make_core()
    with pytest.raises(ValueError, match="mains"):
        core.start({ENCLOSURE: 0}, T0)


def test_shutdown_once_the_runtime_budget_is_spent() -> None:
    core = make_core(runtime_s=600, margin_s=60)
    core.start(CLOSED_POWERED, T0)
    core.on_level(MAINS, 0, T0)
    assert kinds(core.poll(T0 + 2 * S)) == ["power.lost"]
    assert core.next_deadline_ns() == T0 + 540 * S
    assert core.poll(T0 + 540 * S - 1) == []
    assert core.shutdown is None
    [down] = core.poll(T0 + 540 * S)
    assert (down.kind, down.priority, down.mono_ns) == ("power.shutdown", Priority.ALARM,
                                                        T0 + 540 * S)
    assert down.body == {"reason": "runtime_budget", "on_battery_ms": 540_000,
                         "ups_runtime_s": 600, "margin_s": 60}
    assert core.shutdown is not None
    assert core.shutdown.reason == "runtime_budget"
    assert core.next_deadline_ns() is None


def test_mains_restored_before_the_budget_cancels_the_shutdown() -> None:
    core = make_core(runtime_s=600, margin_s=60)
    core.start(CLOSED_POWERED, T0)
    out = core.on_level(MAINS, 0, T0)
    out += core.on_level(MAINS, 1, T0 + 500 * S)  # confirms the loss first
    out += core.poll(T0 + 3600 * S)
    assert kinds(out) == ["power.lost", "power.restored"]
    assert core.shutdown is None
    assert core.next_deadline_ns() is None


def test_mains_absent_at_start_starts_the_budget() -> None:
    core = make_core(runtime_s=120, margin_s=20)
    assert kinds(core.start({ENCLOSURE: 0, MAINS: 0}, T0)) == ["power.lost"]
    assert kinds(core.poll(T0 + 100 * S)) == ["power.shutdown"]


def test_the_ups_low_line_brings_the_shutdown_on_battery_only() -> None:
    core = make_core(ups_low=True)  # no budget: only the UPS's word
    core.start({**CLOSED_POWERED, UPS_LOW: 1}, T0)  # active low: 1 is "battery fine"
    core.on_level(UPS_LOW, 0, T0 + S)  # low battery while on mains: no shutdown
    assert core.poll(T0 + 10 * S) == []
    core.on_level(UPS_LOW, 1, T0 + 11 * S)
    core.poll(T0 + 20 * S)
    core.on_level(MAINS, 0, T0 + 30 * S)
    assert kinds(core.poll(T0 + 40 * S)) == ["power.lost"]
    core.on_level(UPS_LOW, 0, T0 + 50 * S)
    [down] = core.poll(T0 + 52 * S)
    assert down.kind == "power.shutdown"
    assert down.mono_ns == T0 + 51 * S  # when the low battery was confirmed
    assert down.body["reason"] == "ups_low"
    assert down.body["on_battery_ms"] == 21_000


def test_ups_low_without_a_mains_line_is_enough() -> None:
    core = make_core(ups_low=True, mains=False)
    core.start({ENCLOSURE: 0, UPS_LOW: 1}, T0)
    core.on_level(UPS_LOW, 0, T0 + S)
    assert kinds(core.poll(T0 + 3 * S)) == ["power.shutdown"]


def test_exactly_one_power_shutdown() -> None:
    core = make_core(ups_low=True, runtime_s=100, margin_s=10)
    core.start({**CLOSED_POWERED, UPS_LOW: 1}, T0)
    out = core.on_level(MAINS, 0, T0)
    out += core.poll(T0 + 90 * S)  # the budget
    out += core.on_level(UPS_LOW, 0, T0 + 91 * S)  # and the UPS too
    out += core.on_level(MAINS, 1, T0 + 95 * S)
    out += core.on_level(MAINS, 0, T0 + 200 * S)  # lost again: a new budget? no
    out += core.poll(T0 + 3600 * S)
    assert kinds(out) == ["power.lost", "power.shutdown", "power.restored", "power.lost"]
    assert out[2].body["shutdown_requested"] is True
    assert core.stats.shutdowns == 1


def test_events_already_due_are_reported_in_time_order() -> None:
    core = make_core(runtime_s=10, margin_s=5)
    core.start(CLOSED_POWERED, T0)
    core.on_level(MAINS, 0, T0)
    core.on_level(ENCLOSURE, 1, T0 + S)
    out = core.poll(T0 + 60 * S)  # one late poll: opened (1.05 s), lost (2 s), shutdown (5 s)
    assert kinds(out) == ["enclosure.opened", "power.lost", "power.shutdown"]
    assert [r.mono_ns for r in out] == [T0 + S, T0, T0 + 5 * S]


# -- the core under random level sequences ----------------------------------------------
segments = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 120)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(line=st.sampled_from([ENCLOSURE, MAINS]), initial=st.integers(0, 1), steps=segments)
def test_random_levels_give_alternating_alarms_and_restores(
        line: str, initial: int, steps: list[tuple[int, int]]) -> None:
    """Against a model: a level that holds for the debounce time (here 50 ms on both
    lines) becomes the state, at the instant it began; alarms and restores alternate,
    an alarm first; the final state is the last level (it holds for ever)."""
    spec = InputsSpec(enclosure=LineSpec(17, True, 50), mains=LineSpec(27, True, 50))
    core = InputsCore(spec, SRC)
    other = MAINS if line == ENCLOSURE else ENCLOSURE
    levels = {line: initial, other: 1 if other == MAINS else 0}
    alarm_level = 1 if line == ENCLOSURE else 0
    out = [r for r in core.start(levels, T0) if r.body["line"] == spec.lines()[line].offset]
    # the model
    expected: list[tuple[bool, int]] = []  # (alarm?, mono_ns)
    state = initial
    if initial == alarm_level:
        expected.append((True, T0))
    raw, raw_since = initial, T0
    t = T0
    for level, hold_ms in steps:
        out += core.on_level(line, level, t)
        if level != raw:
            raw, raw_since = level, t
        t += hold_ms * MS
        if raw != state and t - raw_since >= 50 * MS:
            state = raw
            expected.append((state == alarm_level, raw_since))
    out += core.poll(t + 3600 * S)
    if raw != state:
        state = raw
        expected.append((state == alarm_level, raw_since))
    got = [(r.priority is Priority.ALARM, r.mono_ns) for r in out]
    # the model collapses a change confirmed twice in a row; so must the core
    assert got == expected
    assert all(a != b for (a, _), (b, _) in itertools.pairwise(got))
    assert not got or got[0][0]  # a restore only follows an alarm
    assert core.state()[line] == (state == 1)  # both lines active high here


# -- the GPIO event layout -------------------------------------------------------------
#: timestamp_ns u64 | id u32 (1 rising) | offset u32 | seqno u32 | line_seqno u32 | pad 6*u32
RISING_17 = bytes.fromhex(
    "08 07 06 05 04 03 02 01" "01 00 00 00" "11 00 00 00" "05 00 00 00" "02 00 00 00"
    + " 00" * 24)


def test_the_event_struct_is_the_kernels_48_bytes() -> None:
    assert EVENT_SIZE == 48 == len(RISING_17)
    event = decode_event(RISING_17)
    assert event == LineEvent(offset=17, level=1, timestamp_ns=0x0102030405060708,
                              seqno=5, line_seqno=2)
    assert pack_event(event) == RISING_17
    falling = LineEvent(3, 0, 123, 9, 4)
    assert decode_event(pack_event(falling)) == falling
    assert pack_event(falling)[8:12] == bytes.fromhex("02 00 00 00")  # FALLING_EDGE


def test_event_decoding_refuses_a_wrong_size_and_skips_an_unknown_id() -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        decode_event(RISING_17[:47])
    assert decode_event(RISING_17[:8] + bytes.fromhex("07 00 00 00") + RISING_17[12:]) is None


def test_ioctl_numbers_are_the_headers() -> None:
    # _IOWR(0xB4, 0x07, struct gpio_v2_line_request /* 592 bytes */), and 0x0E, 16 bytes
    assert GPIO_V2_GET_LINE_IOCTL == 0xC250B407
    assert GPIO_V2_LINE_GET_VALUES_IOCTL == 0xC010B40E


def test_the_reader_reassembles_events_split_by_a_pipe() -> None:
    """The kernel writes whole events; a pipe (the lab's stand-in) may split them."""
    r, w = os.pipe()
    try:
        reader = EventReader(r)
        os.write(w, RISING_17[:30])
        assert reader.read() == ([], False)
        two = pack_event(LineEvent(4, 0, 77))
        os.write(w, RISING_17[30:] + two)
        events, ended = reader.read()
        assert [e.offset for e in events] == [17, 4]
        assert not ended
        os.close(w)
        w = -1
        assert reader.read() == ([], True)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# -- the worker over a pipe (only the ioctl is bypassed) --------------------------------
class Rig:
    def __init__(self, spec: InputsSpec, levels: dict[str, int],
                 submit: Callable[[Reading], None] | None = None) -> None:
        offsets = {name: line.offset for name, line in spec.lines().items()}
        self.lines = SimulatedLines(offsets, levels)
        self.readings: queue.Queue[Reading] = queue.Queue()
        self.shutdown = threading.Event()
        self.worker = InputsWorker(InputsCore(spec, SRC), self.lines.open,
                                   submit or self.readings.put, self.shutdown.set,
                                   reopen_min_s=0.01, reopen_max_s=0.05)

    def next(self) -> Reading:
        return self.readings.get(timeout=5)


@pytest.fixture
def rig_spec() -> InputsSpec:
    return InputsSpec(enclosure=LineSpec(17, True, 20), mains=LineSpec(27, True, 50),
                      ups_low=LineSpec(22, False, 20))


@contextlib.contextmanager
def running(rig: Rig) -> Iterator[Rig]:
    rig.worker.start()
    try:
        yield rig
    finally:
        rig.worker.stop()
        rig.lines.close()
        assert not rig.worker.is_alive()


def test_the_worker_turns_line_events_into_alarm_restore_pairs(rig_spec: InputsSpec) -> None:
    with running(Rig(rig_spec, {ENCLOSURE: 0, MAINS: 1, UPS_LOW: 1})) as rig:
        rig.lines.set(ENCLOSURE, 1)
        assert rig.next().kind == "enclosure.opened"
        rig.lines.set(ENCLOSURE, 0)
        closed = rig.next()
        assert closed.kind == "enclosure.closed"
        rig.lines.set(MAINS, 0)
        assert rig.next().kind == "power.lost"
        rig.lines.set(MAINS, 1)
        restored = rig.next()
        assert restored.kind == "power.restored"
        assert not restored.body["shutdown_requested"]
        health = rig.worker.health()
        assert health["records"] == 4
        assert health["state"] == {ENCLOSURE: False, MAINS: True, UPS_LOW: False}
    assert not rig.shutdown.is_set()


def test_the_worker_reports_an_open_enclosure_at_start(rig_spec: InputsSpec) -> None:
    with running(Rig(rig_spec, {ENCLOSURE: 1, MAINS: 1, UPS_LOW: 1})) as rig:
        opened = rig.next()
        assert opened.kind == "enclosure.opened"
        assert opened.body["at_start"] is True


def test_the_worker_asks_for_the_shutdown_after_the_record(rig_spec: InputsSpec) -> None:
    spec = dataclasses.replace(rig_spec, ups_runtime_s=0.5, shutdown_margin_s=0.2)
    with running(Rig(spec, {ENCLOSURE: 0, MAINS: 1, UPS_LOW: 1})) as rig:
        rig.lines.set(MAINS, 0)
        assert rig.next().kind == "power.lost"
        down = rig.next()  # after 0.3 s on battery
        assert down.kind == "power.shutdown"
        assert down.body["reason"] == "runtime_budget"
        assert rig.shutdown.wait(5)


def test_the_worker_reopens_and_reports_what_changed_meanwhile(rig_spec: InputsSpec) -> None:
    with running(Rig(rig_spec, {ENCLOSURE: 0, MAINS: 1, UPS_LOW: 1})) as rig:
        assert rig.worker.opened.wait(5)
        rig.lines.unplug()  # the descriptor ends
        rig.lines.set(ENCLOSURE, 1)  # no event: the worker learns it from the levels
        opened = rig.next()
        assert opened.kind == "enclosure.opened"
        assert opened.body["at_start"] is False
        assert rig.worker.stats.opens >= 2
        assert rig.worker.stats.losses >= 1


def test_a_failing_submit_does_not_end_the_worker(rig_spec: InputsSpec) -> None:
    calls: queue.Queue[Reading] = queue.Queue()
    failed = threading.Event()

    def flaky(reading: Reading) -> None:
        calls.put(reading)
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the writer is gone")

    with running(Rig(rig_spec, {ENCLOSURE: 0, MAINS: 1, UPS_LOW: 1}, flaky)) as rig:
        rig.lines.set(ENCLOSURE, 1)
        assert calls.get(timeout=5).kind == "enclosure.opened"
        rig.lines.set(ENCLOSURE, 0)
        assert calls.get(timeout=5).kind == "enclosure.closed"
        assert rig.worker.stats.errors == 1


def test_the_worker_stops_while_the_chip_cannot_be_opened() -> None:
    attempts = threading.Event()

    def no_chip() -> OpenedLines:
        attempts.set()
        raise FileNotFoundError(2, "No such file or directory", "/dev/gpiochip9")

    worker = InputsWorker(make_core(), no_chip, lambda _r: None, lambda: None,
                          reopen_min_s=60.0)
    worker.start()
    assert attempts.wait(5)
    worker.stop()
    assert not worker.is_alive()
    assert worker.stats.open_failures >= 1


# -- power off -------------------------------------------------------------------------
def test_power_off_commits_then_stops_then_runs_the_command_once() -> None:
    steps: list[str] = []

    def run(argv: list[str]) -> int:
        steps.append(" ".join(argv))
        return 0

    def flush() -> bool:
        steps.append("flush")
        return True

    off = PowerOff(flush, lambda: steps.append("stop"), ["systemctl", "poweroff"], run=run)
    off()
    off()
    assert off.done.wait(5)
    assert steps == ["flush", "stop", "systemctl poweroff"]
    assert off.returncode == 0


def test_power_off_runs_an_argv_and_survives_a_missing_command(tmp_path: Path) -> None:
    marker = tmp_path / "off"
    off = PowerOff(lambda: True, lambda: None, ["touch", str(marker)])
    off()
    assert off.done.wait(10)
    assert marker.exists()
    missing = PowerOff(lambda: True, lambda: None, [str(tmp_path / "no-such-command")])
    missing()
    assert missing.done.wait(10)
    assert missing.returncode == -1


# -- configuration ---------------------------------------------------------------------
BASE = """
[gateway]
identity_dir = "{ident}"
data_dir = "{data}"

[broker]
host = "127.0.0.1"
tls = false
insecure_plaintext = true
"""
INPUTS = """
[inputs]
chip = "/dev/gpiochip0"
enclosure_line = 17
enclosure_active = "high"
mains_line = 27
mains_active = "low"
ups_low_line = 22
ups_runtime_s = 900
shutdown_margin_s = 90
shutdown_command = ["systemctl", "poweroff"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text.format(ident=tmp_path / "identity", data=tmp_path / "data"))
    return path


def test_no_inputs_table_means_no_inputs(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).inputs is None


def test_an_inputs_table_loads(tmp_path: Path) -> None:
    inputs = load_config(write(tmp_path, BASE + INPUTS)).inputs
    assert inputs is not None
    assert inputs.chip == "/dev/gpiochip0"
    assert inputs.shutdown_command == ("systemctl", "poweroff")
    spec = inputs.spec
    assert spec.enclosure == LineSpec(17, True, 50)
    assert spec.mains == LineSpec(27, False, 2000)
    assert spec.ups_low == LineSpec(22, True, 1000)
    assert (spec.ups_runtime_s, spec.shutdown_margin_s) == (900.0, 90.0)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("enclosure_line = 17", 'enclosure_line = "17"'), "enclosure_line"),
        (("enclosure_line = 17", "enclosure_line = -1"), "enclosure_line"),
        (("enclosure_line = 17", "enclosure_line = 27"), "mains_line"),
        (('enclosure_active = "high"', 'enclosure_active = "open"'), "enclosure_active"),
        (('mains_active = "low"', "mains_active = 0"), "mains_active"),
        (("ups_runtime_s = 900", "ups_runtime_s = 60"), "ups_runtime_s"),
        (("ups_runtime_s = 900", "ups_runtime_s = nan"), "ups_runtime_s"),
        (("shutdown_margin_s = 90", "shutdown_margin_s = -1"), "shutdown_margin_s"),
        (('shutdown_command = ["systemctl", "poweroff"]', 'shutdown_command = "poweroff"'),
         "shutdown_command"),
        (('shutdown_command = ["systemctl", "poweroff"]', "shutdown_command = []"),
         "shutdown_command"),
        (('shutdown_command = ["systemctl", "poweroff"]', 'shutdown_command = ["", 1]'),
         "shutdown_command"),
        (('chip = "/dev/gpiochip0"', 'chip = " "'), "chip"),
        (("ups_low_line = 22", "ups_low_line = 22\nmains_debounce_ms = 120000"),
         "mains_debounce_ms"),
        (("ups_low_line = 22", "ups_low_line = 22\nenclosure_debounce_ms = 5.5"),
         "enclosure_debounce_ms"),
        (("ups_low_line = 22", "ups_low_lines = 22"), "ups_low_lines"),
        (("mains_line = 27", "# no mains"), "ups_runtime_s"),
    ],
)
def test_each_bad_inputs_value_names_the_file_and_the_key(
        tmp_path: Path, change: tuple[str, str], key: str) -> None:
    text = BASE + INPUTS
    assert change[0] in text
    path = write(tmp_path, text.replace(*change))
    with pytest.raises(ConfigError, match=rf"gateway.toml: \[inputs\] {key}: ") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_an_inputs_table_without_a_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[inputs\]: names no line"):
        load_config(write(tmp_path, BASE + '\n[inputs]\nchip = "/dev/gpiochip0"\n'))


# -- the kernel's ioctl path, against gpio-sim ------------------------------------------
GPIO_SIM = Path("/sys/kernel/config/gpio-sim")


@pytest.mark.skipif(not GPIO_SIM.exists(), reason=(
    "gpio-sim is not available (no /sys/kernel/config/gpio-sim: this kernel has no "
    "configfs or no gpio-sim module); the path after the ioctl is tested over a pipe"))
def test_request_lines_and_read_an_edge_from_gpio_sim() -> None:  # pragma: no cover
    chip_dir = GPIO_SIM / f"smartcorr-test-{os.getpid()}"
    bank = chip_dir / "gpio-bank0"
    chip_dir.mkdir()
    try:
        bank.mkdir()
        (bank / "num_lines").write_text("4")
        (chip_dir / "live").write_text("1")
        chip_name = (bank / "chip_name").read_text().strip()
        dev_name = (chip_dir / "dev_name").read_text().strip()
        pulls = Path("/sys/devices/platform") / dev_name / chip_name

        def pull(offset: int, up: bool) -> None:
            (pulls / f"sim_gpio{offset}" / "pull").write_text("pull-up" if up else "pull-down")

        lines = open_gpio(f"/dev/{chip_name}", {ENCLOSURE: LineSpec(0), MAINS: LineSpec(1)})
        try:
            assert lines.levels == {ENCLOSURE: 0, MAINS: 0}  # gpio-sim pulls down
            pull(0, up=True)
            readable, _, _ = select.select([lines.fd], [], [], 5)
            assert readable
            events, ended = EventReader(lines.fd).read()
            assert not ended
            assert [(e.offset, e.level) for e in events] == [(0, 1)]
            assert read_levels(lines.fd, 2) == [1, 0]
        finally:
            os.close(lines.fd)
    finally:
        with contextlib.suppress(OSError):
            (chip_dir / "live").write_text("0")
        with contextlib.suppress(OSError):
            bank.rmdir()
        chip_dir.rmdir()
