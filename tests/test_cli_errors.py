"""The installer's and technician's doors: a wrong argument or a fault is a clear message
and an exit status, never a traceback, a Python repr or a screen of tpm2-tss noise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from app.diag import render
from lab.swtpm import Swtpm, free_port_pair
from provisioning.identity import TPM_ENV, create_identity
from tests.helpers import plaintext_config

REPO = Path(__file__).resolve().parents[1]
TCTI_HELP = ("--tpm: give a TCTI such as device:/dev/tpmrm0 or "
             "swtpm:host=127.0.0.1,port=2321, or --no-tpm")
FILES_WARNING = "FILES on this disk"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (TPM_ENV, "TSS2_LOG")}
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=base | (env or {}))


def free_port() -> int:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, identity: Path, extra: str = "") -> Path:
    return plaintext_config(tmp_path, identity, extra=extra)


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "ERROR:tcti" not in result.stderr
    assert "WARNING:tcti" not in result.stderr


# --- provision init --tpm -------------------------------------------------------------


@pytest.mark.parametrize("tcti", ["", " ", ":xyz", "device:/dev/tpm rm0"])
def test_an_empty_or_malformed_tcti_is_refused(tmp_path: Path, tcti: str) -> None:
    ident = tmp_path / "identity"
    result = cli("provision", "init", "--identity-dir", str(ident), "--gateway-id",
                 "gw-cli-0001", "--tpm", tcti)
    assert result.returncode == 2, result.stderr
    assert TCTI_HELP in result.stderr
    assert FILES_WARNING not in result.stderr
    assert not ident.exists()  # nothing made, and no identity with "tpm": "" in it


def test_an_unknown_tcti_is_named(tmp_path: Path) -> None:
    result = cli("provision", "init", "--identity-dir", str(tmp_path / "identity"),
                 "--gateway-id", "gw-cli-0001", "--tpm", "bogus:xyz")
    assert result.returncode == 2
    assert "unknown TCTI 'bogus' (known: device, swtpm, mssim, tabrmd" in result.stderr
    assert "Functionality not supported" not in result.stderr
    assert_clean(result)


def test_the_key_file_warning_comes_only_once_the_identity_is_made(tmp_path: Path) -> None:
    ident = str(tmp_path / "identity")
    bad_id = cli("provision", "init", "--identity-dir", ident, "--gateway-id", "BAD",
                 "--no-tpm")
    assert bad_id.returncode == 2
    assert FILES_WARNING not in bad_id.stderr
    made = cli("provision", "init", "--identity-dir", ident, "--gateway-id", "gw-cli-0001",
               "--no-tpm")
    assert made.returncode == 0
    assert FILES_WARNING in made.stderr
    again = cli("provision", "init", "--identity-dir", ident, "--gateway-id", "gw-cli-0001",
                "--no-tpm")
    assert again.returncode == 2
    assert "already holds an identity" in again.stderr
    assert FILES_WARNING not in again.stderr


def test_a_tpm_that_does_not_answer_is_our_message_without_tss_noise(tmp_path: Path) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    args = ("provision", "init", "--identity-dir", str(tmp_path / "identity"),
            "--gateway-id", "gw-cli-0001", "--tpm", tcti)
    result = cli(*args)
    assert result.returncode == 2
    assert f"no TPM answers at {tcti}" in result.stderr
    assert_clean(result)
    assert all(line.startswith("provision: ") for line in result.stderr.splitlines())
    verbose = cli("-vv", *args)  # asked for: tpm2-tss says what it saw
    assert verbose.returncode == 2
    assert ":tcti:" in verbose.stderr


# --- the identity's TPM and SMARTCORR_TPM ------------------------------------------------


def test_a_moved_tpm_is_named_and_smartcorr_tpm_overrides_it(
        tmp_path: Path, swtpm_factory: Callable[[str], Swtpm]) -> None:
    tpm = swtpm_factory("tpm")
    ident = tmp_path / "identity"
    create_identity(ident, "gw-cli-0002", tpm=tpm.tcti).close()
    old = tpm.tcti
    tpm.stop()
    moved = Swtpm(tmp_path / "tpm", port=free_port_pair()).start()  # same TPM, another port
    try:
        assert moved.tcti != old
        for args in (("provision", "list-tags", "--identity-dir", str(ident)),
                     ("provision", "list-kiosks", "--identity-dir", str(ident))):
            lost = cli(*args)
            assert lost.returncode == 2
            assert f"This identity's TPM is {old}" in lost.stderr
            assert f"{TPM_ENV}=TCTI overrides it" in lost.stderr
            assert_clean(lost)
            found = cli(*args, env={TPM_ENV: moved.tcti})
            assert found.returncode == 0, found.stderr
        cfg = config(tmp_path, ident)
        keys = cli("diag", "keys", "--config", str(cfg), "--json")
        assert keys.returncode == 1  # as provision check: not ok
        assert json.loads(keys.stdout)["ok"] is False
        assert cli("provision", "check", "--config", str(cfg)).returncode == 1
        assert cli("diag", "keys", "--config", str(cfg),
                   env={TPM_ENV: moved.tcti}).returncode == 0
    finally:
        moved.stop()


def test_a_lab_tpm_keeps_its_port(tmp_path: Path) -> None:
    port = free_port_pair()  # swtpm's control channel is the port + 1
    with Swtpm(tmp_path / "tpm", port=port) as tpm:
        assert tpm.tcti == f"swtpm:host=127.0.0.1,port={port}"
    with Swtpm(tmp_path / "tpm", port=port) as tpm:  # restarted: the same address
        assert tpm.tcti == f"swtpm:host=127.0.0.1,port={port}"


def test_smartcorr_tpm_naming_an_unknown_tcti_is_named(
        tmp_path: Path, swtpm: Swtpm) -> None:
    ident = tmp_path / "identity"
    create_identity(ident, "gw-cli-0003", tpm=swtpm.tcti).close()
    result = cli("provision", "list-tags", "--identity-dir", str(ident),
                 env={TPM_ENV: "bogus:x"})
    assert result.returncode == 2
    assert f"${TPM_ENV}" in result.stderr
    assert "unknown TCTI 'bogus'" in result.stderr
    assert f"or unset {TPM_ENV}" in result.stderr
    assert_clean(result)
    files = tmp_path / "files"
    create_identity(files, "gw-cli-0008").close()  # file keys: the TPM is never opened
    assert cli("provision", "list-tags", "--identity-dir", str(files),
               env={TPM_ENV: "bogus:x"}).returncode == 0


# --- diag -------------------------------------------------------------------------------


def test_diag_bundle_out_errors_are_messages(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-cli-0004").close()
    cfg = str(config(tmp_path, tmp_path / "identity"))
    nodir = cli("diag", "bundle", "--config", cfg, "--out", str(tmp_path / "nodir" / "b.tgz"))
    assert nodir.returncode == 2
    assert f"the directory {tmp_path / 'nodir'} does not exist" in nodir.stderr
    isdir = cli("diag", "bundle", "--config", cfg, "--out", str(tmp_path))
    assert isdir.returncode == 2
    assert f"--out {tmp_path} is a directory: give a file path" in isdir.stderr
    personal = cli("diag", "bundle", "--config", cfg, "--out", str(tmp_path),
                   "--include-personal", "--operator", "Bo Tech")
    assert personal.returncode == 2  # refused before it is written down
    assert "is a directory" in personal.stderr
    for result in (nodir, isdir, personal):
        assert_clean(result)


def test_diag_ports_exits_1_when_a_port_is_missing(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-cli-0005").close()
    missing = config(tmp_path, tmp_path / "identity",
                     '[gnss]\npath = "/dev/serial/by-id/nothing-here"\n')
    result = cli("diag", "ports", "--config", str(missing))
    assert result.returncode == 1
    assert "MISSING: not present" in result.stdout
    not_a_tty = config(tmp_path, tmp_path / "identity", '[gnss]\npath = "/dev/null"\n')
    assert cli("diag", "ports", "--config", str(not_a_tty)).returncode == 1
    master, slave = os.openpty()  # a serial port nobody holds (not probed: nothing answers)
    try:
        present = config(tmp_path, tmp_path / "identity",
                         f'[gnss]\npath = "{os.ttyname(slave)}"\n')
        assert cli("diag", "ports", "--config", str(present), "--no-probe").returncode == 0
    finally:
        os.close(master)
        os.close(slave)


def test_human_reports_hold_no_python_reprs(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-cli-0006").close()
    result = cli("diag", "keys", "--config", str(config(tmp_path, tmp_path / "identity")))
    assert result.returncode == 0
    assert "staged_kid: none" in result.stdout
    assert "warnings:\n  - the identity key is a file" in result.stdout
    assert "None" not in result.stdout
    assert "['" not in result.stdout
    assert "problems: none" in result.stdout


def test_render_lists_none_and_booleans() -> None:
    text = render({"a": None, "b": ["x", "y"], "c": [], "d": {"e": True, "f": False},
                   "g": {}})
    assert text == "a: none\nb:\n  - x\n  - y\nc: none\nd:\n  e: yes\n  f: no\ng: none"


# --- global options after the subcommand ------------------------------------------------


def test_verbose_after_the_subcommand(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-cli-0007").close()
    cfg = str(config(tmp_path, tmp_path / "identity"))
    for args in (("provision", "check", "--config", cfg, "-v"),
                 ("-v", "provision", "check", "--config", cfg, "-vv"),
                 ("diag", "keys", "--config", cfg, "-vv", "--trace-serial")):
        result = cli(*args)
        # provision check fails here (no broker, no daemon: exit 1); a usage error is 2
        assert result.returncode in (0, 1), result.stderr
        assert "unrecognized arguments" not in result.stderr


def test_verbose_counts_wherever_given() -> None:
    import gateway

    parser = gateway.build_parser()
    assert gateway._global_options(parser.parse_args(
        ["run", "--config", "x", "-v"])) == (1, False)
    assert gateway._global_options(parser.parse_args(
        ["-v", "run", "--config", "x", "-vv"])) == (3, False)
    assert gateway._global_options(parser.parse_args(
        ["provision", "-v", "check", "--config", "x", "--trace-serial"])) == (1, True)
    assert gateway._global_options(parser.parse_args(
        ["--trace-serial", "diag", "ports", "--config", "x"])) == (0, True)
