"""The enclosure switch and mains power through the whole gateway: alarm and restore
records sealed, stored and verified; a UPS running out powers the gateway off cleanly.
The lines are the lab's stand-in (lab/simulators/gpio.py: the kernel's event structs on
a pipe; only the GPIO ioctl is bypassed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.assembly import Gateway
from app.config import Config, InputsSection
from buffer.store import store_path
from central.verifier import Verifier
from drivers.inputs import InputsSpec, LineSpec
from lab.simulators.gpio import SimulatedLines
from lab.site import NOWHERE, registrations
from provisioning.identity import Identity
from tests.helpers import stored_records, wait_for

ENCLOSURE, MAINS = 17, 27


def stored(data_dir: Path, identity: Identity) -> list[bytes]:
    return stored_records(store_path(data_dir), identity.storage_key)


def gateway_with_lines(tmp_path: Path, identity: Identity, *, levels: dict[str, int],
                       ups_runtime_s: float | None = None,
                       command: tuple[str, ...] = ("true",)) -> tuple[Gateway, SimulatedLines]:
    spec = InputsSpec(enclosure=LineSpec(ENCLOSURE, active_high=True, debounce_ms=20),
                      mains=LineSpec(MAINS, active_high=False, debounce_ms=50),
                      ups_runtime_s=ups_runtime_s, shutdown_margin_s=0.0)
    config = Config(tmp_path / "data", NOWHERE,
                    inputs=InputsSection("/dev/gpiochip-lab", spec, command))
    lines = SimulatedLines({"enclosure": ENCLOSURE, "mains": MAINS}, levels)
    gateway = Gateway(config, identity)
    gateway.open_lines = lines.open
    return gateway, lines


def kinds_committed(gateway: Gateway) -> dict[str, int]:
    return dict(gateway.writer.stats.by_kind)


def test_enclosure_and_mains_give_alarm_restore_pairs_that_verify(
    tmp_path: Path, identity: Identity
) -> None:
    gateway, lines = gateway_with_lines(tmp_path, identity,
                                        levels={"enclosure": 0, "mains": 0})
    gateway.start()
    try:
        lines.set("enclosure", 1)
        wait_for(lambda: kinds_committed(gateway).get("enclosure.opened") == 1, 10,
                 "the enclosure.opened record")
        lines.set("enclosure", 0)
        wait_for(lambda: kinds_committed(gateway).get("enclosure.closed") == 1, 10,
                 "the enclosure.closed record")
        lines.set("mains", 1)  # active low: 1 is mains gone
        wait_for(lambda: kinds_committed(gateway).get("power.lost") == 1, 10, "power.lost")
        lines.set("mains", 0)
        wait_for(lambda: kinds_committed(gateway).get("power.restored") == 1, 10,
                 "power.restored")
    finally:
        gateway.stop(drain_s=0.1)
        lines.close()
    records = [json.loads(r) for r in stored(tmp_path / "data", identity)]
    events = [r["kind"] for r in sorted(records, key=lambda r: r["seq"])
              if r["kind"].startswith(("enclosure.", "power."))]
    assert events == ["enclosure.opened", "enclosure.closed", "power.lost", "power.restored"]
    assert {r["prio"] for r in records if r["kind"] in ("enclosure.opened", "power.lost")} \
        == {"alarm"}
    v = Verifier(registrations(identity))
    v.ingest(b"\n".join(stored(tmp_path / "data", identity)))
    assert v.summary()["verified"] == len(records)
    assert v.summary()["chain_gaps"] == 0


def test_an_enclosure_opened_while_off_is_an_alarm_at_start(
    tmp_path: Path, identity: Identity
) -> None:
    gateway, lines = gateway_with_lines(tmp_path, identity,
                                        levels={"enclosure": 1, "mains": 0})
    gateway.start()
    try:
        wait_for(lambda: kinds_committed(gateway).get("enclosure.opened") == 1, 10,
                 "the enclosure.opened record at start")
    finally:
        gateway.stop(drain_s=0.1)
        lines.close()
    opened = next(json.loads(r) for r in stored(tmp_path / "data", identity)
                  if b"enclosure.opened" in r)
    assert opened["body"].get("at_start") is True


def test_a_ups_running_out_records_and_powers_off_cleanly(
    tmp_path: Path, identity: Identity
) -> None:
    marker = tmp_path / "powered-off"
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'w').close()")
    gateway, lines = gateway_with_lines(tmp_path, identity, levels={"enclosure": 0, "mains": 0},
                                        ups_runtime_s=0.3, command=command)
    gateway.start()
    try:
        lines.set("mains", 1)
        wait_for(marker.exists, 15, "the shutdown command")
        assert not gateway.writer.is_alive()  # stopped before powering off
    finally:
        gateway.stop(drain_s=0.1)  # a second stop (SIGTERM after poweroff) is harmless
        lines.close()
    kinds = [json.loads(r)["kind"] for r in stored(tmp_path / "data", identity)]
    assert kinds.count("power.lost") == 1
    assert kinds.count("power.shutdown") == 1
