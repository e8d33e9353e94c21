"""Personal data stays out of logs, argv and files others can read (issue 8, finding 5),
and the daemon says at start what it can check itself (finding 4)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway
from drivers.tag_receiver import Beacon
from provisioning.identity import create_identity
from tests.helpers import plaintext_config, wait_for
from tests.test_tag_driver import Feed, driver

REPO = Path(__file__).resolve().parents[1]
UNPAIRED = 0x0000DEAD  # reference T0000DEAD


def test_an_unpaired_tag_id_is_not_logged_even_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    feed = Feed(driver())
    assert feed(Beacon(UNPAIRED, 1, 90, 0, -60, bytes(8))) == []
    assert "unpaired tag are ignored" in caplog.text
    assert "DEAD" not in caplog.text.upper()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = (gateway.TRACE_LOGGERS, gateway.SERIAL_TRACE_LOGGER)
    levels = {name: logging.getLogger(name).level for name in names}
    root.handlers.clear()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.mark.usefixtures("restore_logging")
def test_vv_does_not_dump_serial_frames_only_trace_serial_does() -> None:
    trace = logging.getLogger(gateway.SERIAL_TRACE_LOGGER)  # firmware_bridge/port.py's
    gateway._logging(2)
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    assert not trace.isEnabledFor(logging.DEBUG)
    gateway._logging(0, trace_serial=True)
    assert trace.isEnabledFor(logging.DEBUG)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_tag_key_comes_from_a_file_or_stdin_never_argv(tmp_path: Path) -> None:
    ident = str(tmp_path / "identity")
    create_identity(tmp_path / "identity", "gw-privacy-0001")
    key = bytes(range(16)).hex()
    argv = cli("provision", "pair-tag", "--operator", "Ann Installer",
               "--identity-dir", ident, "--tag", "0x1000", "--key", key)
    assert argv.returncode == 2
    assert "--key-file FILE" in argv.stderr
    piped = cli("provision", "pair-tag", "--operator", "Ann Installer",
                "--identity-dir", ident, "--tag", "0x1000", "--key",
                "-", stdin=key + "\n")
    assert piped.returncode == 0, piped.stderr
    assert key not in piped.stdout  # the installer's own key is not echoed
    key_file = tmp_path / "tag.key"
    key_file.write_text(key)
    from_file = cli("provision", "pair-tag", "--operator", "Ann Installer",
                    "--identity-dir", ident, "--tag", "0x1001",
                    "--key-file", str(key_file), "--json")
    assert from_file.returncode == 0, from_file.stderr
    bad = cli("provision", "pair-tag", "--operator", "Ann Installer",
              "--identity-dir", ident, "--tag", "0x1002", "--key", "-",
              stdin="not hex")
    assert bad.returncode == 2
    assert "--key - (stdin): the key must be 32 hex digits" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip for a network namespace of its own")
def test_the_daemon_keeps_its_files_private_and_says_what_it_checked(tmp_path: Path) -> None:
    """Started under umask 022 (as from a shell): the store and its -wal/-shm are 0600;
    plaintext MQTT is warned about; a broker host that does not resolve is named."""
    create_identity(tmp_path / "identity", "gw-privacy-0002")
    cfg = plaintext_config(tmp_path, tmp_path / "identity", host="broker.smartcorr.invalid")
    command = shlex.join([sys.executable, str(REPO / "gateway.py"), "run", "--config", str(cfg)])
    # In a network namespace of its own (loopback only): the lookup fails on this machine
    # and no query leaves it.
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    assert unshare is not None  # the skipif below
    assert ip is not None
    proc = subprocess.Popen([unshare, "--net", "--", "/bin/sh", "-c",
                             f"{ip} link set lo up && umask 022 && exec {command}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("running" in line for line in lines), 30, "the daemon running")
        wait_for(lambda: any("does not resolve" in line for line in lines), 30,
                 "the warning about the broker host")
        text = "".join(lines)
        assert "[broker] host 'broker.smartcorr.invalid' does not resolve" in text
        assert "PLAINTEXT MQTT" in text
        assert "insecure_plaintext = true" in text
        files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("records.db")]
        assert len(files) >= 2, files  # the store and its WAL at least
        for path in [tmp_path / "data", *files]:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        reader.join(5)
        proc.stderr.close()


def test_the_health_record_says_plaintext(tmp_path: Path) -> None:
    from app.assembly import Gateway
    from app.config import Config
    from buffer.store import store_path
    from lab.site import NOWHERE
    from tests.helpers import stored_records

    ident = create_identity(tmp_path / "identity", "gw-privacy-0003")
    gw = Gateway(Config(tmp_path / "data", NOWHERE), ident, health_interval_s=0.05)
    gw.start()
    try:
        wait_for(lambda: gw.writer.stats.by_kind["gateway.health"] >= 1, 30,
                 "a gateway.health record")
        assert gw.writer.flush()
    finally:
        gw.stop(drain_s=0.1)
    records = [json.loads(r)
               for r in stored_records(store_path(tmp_path / "data"), ident.storage_key)]
    health = [r for r in records if r["kind"] == "gateway.health"]
    assert health
    assert health[0]["body"]["uplink"]["tls"] is False
    assert {"taken_over", "sessions_lost"} <= health[0]["body"]["uplink"].keys()
