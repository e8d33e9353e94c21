"""Ports that vanish, come back, or stop answering, over real pseudo-terminals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from app.assembly import Pipeline
from core.clock import Clock
from core.devices import PairedTag, tag_ref
from core.record import Source
from drivers.tag_receiver import TagReceiverDriver
from firmware_bridge.framed import FramedDeviceProtocol
from firmware_bridge.link import HostLink
from firmware_bridge.messages import DeviceClass
from firmware_bridge.port import PortWorker
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import NOWHERE
from provisioning.identity import Identity
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def pipeline(tmp_path: Path, identity: Identity) -> Pipeline:
    """The product's own store, sealer and writer (no uplink: records wait in the store)."""
    pipe = Pipeline(tmp_path / "data", identity, NOWHERE, clock=Clock(),
                    source=Source("gateway", identity.gateway_id))
    pipe.start(uplink=False)
    return pipe


class Rig:
    def __init__(self, tmp_path: Path, identity: Identity, *, link_timeout_s: float = 7) -> None:
        self.tag = SimTag(0x1000, bytes(range(16)))
        self.sim = TagReceiverSim("TR-PORT-01", tags=[self.tag], link=tmp_path / "ttyTAGS").start()
        self.pipeline = pipeline(tmp_path, identity)
        self.writer = self.pipeline.writer
        tags = {tag_ref(0x1000): PairedTag(tag_ref(0x1000), self.tag.key, 600, 0)}
        driver = TagReceiverDriver(tags, self.writer.ledger_value)
        link = HostLink(self.writer.last_committed_event, heartbeat_s=1,
                        link_timeout_s=link_timeout_s)
        self.proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER, driver, self.writer,
                                          link=link)
        self.worker = PortWorker("tags", self.sim.path, 115200, self.proto, reopen_min_s=0.05)
        self.worker.start()

    @property
    def kinds(self) -> Counter[str]:
        """Records committed, by kind."""
        return self.writer.stats.by_kind

    def beacons(self, n: int) -> None:
        for _ in range(n):
            self.sim.send_beacon(self.tag)

    def close(self) -> None:
        self.worker.stop()
        self.sim.stop()
        self.pipeline.stop(drain_s=0)


def test_unplug_and_replug_recover_without_a_restart(tmp_path: Path, identity: Identity) -> None:
    rig = Rig(tmp_path, identity)
    try:
        rig.beacons(10)
        wait_for(lambda: len(rig.sim.acked()) == 10, 20, "the first beacons")
        rig.sim.unplug()
        rig.beacons(10)  # kept in the receiver while the cable is out
        wait_for(lambda: "device.lost" in rig.kinds, 20, "the loss to be recorded")
        rig.sim.replug()
        wait_for(lambda: len(rig.sim.acked()) == 20, 20, "the queued beacons after replug")
        assert rig.worker.stats.opens >= 2
        # every beacon committed once (most as their tag's interval's ledger entries alone)
        assert rig.proto.stats.messages == rig.proto.stats.acked == 20
        assert rig.proto.stats.ledger_only >= 18
        assert rig.kinds["device.up"] >= 2
    finally:
        rig.close()


def test_a_device_that_stops_answering_gets_its_port_reopened(
    tmp_path: Path, identity: Identity
) -> None:
    rig = Rig(tmp_path, identity, link_timeout_s=1.5)
    try:
        rig.beacons(3)
        wait_for(lambda: len(rig.sim.acked()) == 3, 20, "the first beacons")
        opens = rig.worker.stats.opens
        rig.sim.freeze()
        wait_for(lambda: rig.worker.stats.opens > opens, 20, "the port to be reopened")
        wait_for(lambda: "device.lost" in rig.kinds, 10, "the silence to be recorded")
        rig.sim.thaw()
        rig.beacons(3)
        wait_for(lambda: len(rig.sim.acked()) == 6, 20, "beacons after the device woke up")
    finally:
        rig.close()


def test_a_missing_port_is_retried_and_counted(tmp_path: Path, identity: Identity) -> None:
    pipe = pipeline(tmp_path, identity)
    writer = pipe.writer
    proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER,
                                 TagReceiverDriver({}, writer.ledger_value), writer)
    worker = PortWorker("tags", str(tmp_path / "no-such-tty"), 115200, proto,
                        reopen_min_s=0.01, reopen_max_s=0.05)
    worker.start()
    try:
        wait_for(lambda: worker.stats.open_failures >= 3, 10, "retries")
        assert worker.stats.opens == 0
    finally:
        worker.stop()
        pipe.stop(drain_s=0)

