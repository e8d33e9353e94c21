"""The uplink's linger (uplink/linger.py): positions and health records wait in the store to
share one message; alarms never wait, a stop sends what is held, a SIGKILL loses nothing.
Against a real mosquitto with mTLS and the platform's verifier, as tests/test_uplink.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config, UplinkSection
from core.kinds import Priority
from core.mqtt import make_client
from core.record import Reading, Source
from core.topics import COMMAND_CN, PLATFORM_CN, commands_topic
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.site import Platform
from provisioning.identity import Identity
from tests.helpers import wait_for
from uplink.forwarder import LIVE_AFTER_COMMAND_S
from uplink.linger import FULL, LINGER, LIVE, Linger

SRC = Source("gnss", "GNSS-0001", "1.0.0")
LINGER_S = 300.0
LINGER_NS = int(LINGER_S * 1e9)
REPO = Path(__file__).resolve().parents[1]


# -- the sans-IO decision --------------------------------------------------------------
def test_held_records_are_due_once_the_oldest_waited_the_linger() -> None:
    linger = Linger(100, max_records=10, max_bytes=1000)
    assert linger.due(0) is None  # nothing held
    linger.saw(Priority.POSITION, [(5, 50)], now_ns=1000)
    linger.saw(Priority.HEARTBEAT, [(7, 50)], now_ns=1050)  # a later one: the clock stays
    assert linger.due(1099) is None
    assert linger.due(1100) == LINGER
    assert linger.cursor(Priority.POSITION, 3) == 5  # counted ones are not read again
    assert linger.cursor(Priority.POSITION, 9) == 9
    linger.clear()
    assert (linger.records, linger.bytes, linger.since_ns) == (0, 0, None)
    assert linger.due(10**12) is None


def test_held_records_are_due_at_a_messages_bound() -> None:
    by_count = Linger(10**12, max_records=3, max_bytes=10**6)
    by_count.saw(Priority.POSITION, [(1, 10), (2, 10)], now_ns=0)
    assert by_count.due(0) is None
    by_count.saw(Priority.POSITION, [(3, 10)], now_ns=0)
    assert by_count.due(0) == FULL
    by_bytes = Linger(10**12, max_records=100, max_bytes=100)
    by_bytes.saw(Priority.HEARTBEAT, [(1, 99)], now_ns=0)
    assert by_bytes.due(0) is None
    by_bytes.saw(Priority.POSITION, [(2, 1)], now_ns=0)
    assert by_bytes.due(0) == FULL


def test_only_the_non_urgent_classes_can_be_held() -> None:
    linger = Linger(100, max_records=10, max_bytes=1000)
    for prio in (Priority.ALARM, Priority.CHECKIN, Priority.STATUS):
        with pytest.raises(ValueError, match="never held"):
            linger.saw(prio, [(1, 10)], now_ns=0)
    with pytest.raises(ValueError, match="negative"):
        Linger(-1, max_records=10, max_bytes=1000)
    assert not Linger(0, max_records=10, max_bytes=1000).active


# -- through the real stack ------------------------------------------------------------
@dataclass
class Home:
    gateway: Gateway
    platform: Platform
    now: list[int]  # the linger's clock, moved by the test

    def positions(self, n: int) -> list[int]:
        """Commit *n* GNSS fixes; wait until the forwarder holds them. Their seqs."""
        first = self.gateway.sealer.last_seq + 1
        for i in range(n):
            self.gateway.writer.submit(Reading("gnss.fix", SRC, {"lat_e7": i},
                                               time.monotonic_ns()))
        assert self.gateway.writer.flush()
        wait_for(lambda: self.gateway.forwarder.stats.held >= n, 15, "the records held")
        return list(range(first, first + n))

    def look_again(self) -> None:
        """Let the forwarder look at what it holds once more (no sleep: its counter)."""
        stats = self.gateway.forwarder.stats
        checks = stats.hold_checks
        self.gateway.forwarder.notify()
        wait_for(lambda: stats.hold_checks > checks, 15, "another look at what is held")

    def arrived(self) -> list[int]:
        return [r.seq for r in self.platform.arrived]


@pytest.fixture
def home(tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity) -> Iterator[Home]:
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    config = Config(tmp_path / "data", client_config(mosquitto, pki, identity.gateway_id),
                    uplink=UplinkSection(linger_s=LINGER_S))
    gateway = Gateway(config, identity)
    now = [0]
    gateway.start()
    try:
        # nothing is held before the test commits its records: the clock may change here
        gateway.forwarder.linger_clock = lambda: now[0]
        # the start's records (key.session, gateway.boot) may not wait: they go at once
        wait_for(lambda: len(platform.arrived) >= gateway.writer.stats.committed >= 2, 15,
                 "the start's records")
        yield Home(gateway, platform, now)
    finally:
        gateway.stop(drain_s=10)
        platform.stop()


@pytest.mark.slow
def test_positions_wait_for_the_linger_then_go_in_one_message(home: Home) -> None:
    forwarder = home.gateway.forwarder
    messages = forwarder.stats.messages_published
    seqs = home.positions(5)
    home.now[0] = LINGER_NS - 1
    home.look_again()
    assert forwarder.stats.held == 5
    assert forwarder.stats.messages_published == messages  # nothing went out
    assert not set(seqs) & set(home.arrived())
    # the platform knows nothing of them yet, so they are no gap of its
    assert home.platform.client.verifier.gaps(home.gateway.identity.gateway_id) == []
    assert home.gateway.state()["uplink"]["held"] == 5  # state.json says so

    home.now[0] = LINGER_NS  # the oldest waited the linger
    home.gateway.forwarder.notify()
    wait_for(lambda: set(seqs) <= set(home.arrived()), 15, "the held records")
    assert forwarder.stats.messages_published == messages + 1  # one message, one head
    assert forwarder.stats.releases[LINGER] == 1
    assert forwarder.stats.held == 0
    summary = home.platform.summary()
    assert summary["chain_gaps"] == 0
    assert summary["bad_signature"] == 0


@pytest.mark.slow
def test_an_alarm_is_never_held_and_takes_the_held_records_behind_it(home: Home) -> None:
    forwarder = home.gateway.forwarder
    seqs = home.positions(4)
    alarm = home.gateway.sealer.last_seq + 1
    home.gateway.writer.submit(Reading("tag.tamper", SRC, {"strap_closed": False},
                                       time.monotonic_ns()))
    # the linger's clock never moves: only the alarm can have sent them
    wait_for(lambda: {alarm, *seqs} <= set(home.arrived()), 15, "the alarm and the positions")
    order = home.arrived()
    assert order.index(alarm) < min(order.index(s) for s in seqs)  # the alarm first
    assert forwarder.stats.releases["urgent"] == 1
    assert forwarder.stats.releases[LINGER] == 0
    assert home.platform.summary()["chain_gaps"] == 0


@pytest.mark.slow
def test_a_stop_sends_what_is_held(home: Home) -> None:
    seqs = home.positions(3)
    assert home.gateway.stop(drain_s=10)  # drained: everything committed was acknowledged
    wait_for(lambda: set(seqs) <= set(home.arrived()), 15, "the held records")
    assert home.gateway.forwarder.stats.releases["flush"] == 1


@pytest.mark.slow
def test_after_a_platform_message_nothing_is_held_for_a_while(
    home: Home, mosquitto: Mosquitto, pki: Pki
) -> None:
    """A command from the platform (an installer authorising a tag, an officer asking) means
    someone watches this gateway: its positions go out as they come for a while."""
    forwarder = home.gateway.forwarder
    held = home.positions(2)
    publisher = make_client(COMMAND_CN, client_config(mosquitto, pki, COMMAND_CN))
    publisher.connect(mosquitto.host, mosquitto.port)  # the platform's command publisher
    publisher.loop_start()
    try:
        publisher.publish(commands_topic(home.gateway.identity.gateway_id), b"{}",
                          qos=1).wait_for_publish(15)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    wait_for(lambda: forwarder.stats.releases[LIVE] == 1, 15, "the platform's message")
    wait_for(lambda: set(held) <= set(home.arrived()), 15, "the held records")
    first = home.gateway.sealer.last_seq + 1
    for i in range(3):  # the linger's clock has not moved: live, they go as they come
        home.gateway.writer.submit(Reading("gnss.fix", SRC, {"lat_e7": i}, time.monotonic_ns()))
    wait_for(lambda: set(range(first, first + 3)) <= set(home.arrived()), 15,
             "positions while live")
    home.now[0] = int(LIVE_AFTER_COMMAND_S * 1e9)  # the while is over: held again
    home.positions(2)
    home.look_again()
    assert forwarder.stats.held == 2


_HOLD_AND_WAIT = """
import json, sys, time
from pathlib import Path
from app.assembly import Gateway
from app.config import Config, UplinkSection
from core.mqtt import BrokerConfig
from core.record import Reading, Source
from provisioning.identity import load_identity

args = json.loads(sys.argv[1])
gateway = Gateway(Config(Path(args["data"]), BrokerConfig(**args["broker"]),
                         uplink=UplinkSection(linger_s=300.0)),
                  load_identity(Path(args["identity"])))
gateway.start()
assert gateway.forwarder.wait_idle(30)  # the start's records are out: what follows is held
src = Source("gnss", "GNSS-0001", "1.0.0")
for i in range(args["n"]):
    gateway.writer.submit(Reading("gnss.fix", src, {"lat_e7": i}, time.monotonic_ns()))
assert gateway.writer.flush()
while gateway.forwarder.stats.held < args["n"]:  # the forwarder counts them at the commit
    time.sleep(0.05)
print(json.dumps({"last_seq": gateway.sealer.last_seq}), flush=True)
time.sleep(600)  # killed here
"""


@pytest.mark.slow
def test_records_held_when_the_process_is_killed_go_out_at_the_next_start(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity
) -> None:
    broker = client_config(mosquitto, pki, identity.gateway_id)
    args = {"data": str(tmp_path / "data"), "identity": str(identity.directory), "n": 20,
            "broker": {"host": broker.host, "port": broker.port, "ca_file": broker.ca_file,
                       "cert_file": broker.cert_file, "key_file": broker.key_file}}
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    child = subprocess.Popen([sys.executable, "-c", _HOLD_AND_WAIT, json.dumps(args)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # printed once the 20 records are held
        assert line, "the child died before holding its records"
        last_seq = int(json.loads(line)["last_seq"])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    held = set(range(last_seq - 19, last_seq + 1))
    assert not held & {r.seq for r in platform.arrived}  # they were held, not sent
    gateway = Gateway(Config(tmp_path / "data", broker, uplink=UplinkSection(linger_s=300.0)),
                      identity)
    gateway.start()  # a start sends its backlog at once, held or not
    try:
        wait_for(lambda: held <= {r.seq for r in platform.arrived}, 20,
                 "the records held when the process was killed")
    finally:
        gateway.stop(drain_s=10)
        platform.stop()
    assert platform.summary()["chain_gaps"] == 0

