"""The habits of every door of gateway.py: help text on every option, examples at the end
of every command's --help (and they parse), --version, -v/-vv before or after the
command, and --json printing exactly one JSON object on stdout, nothing else (everything
for people on stderr). The daemon's start and stop lines are in tests/test_status.py (its
daemon says them)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

import gateway
from lab.simulators.gnss import fix_sentences
from provisioning.identity import TPM_ENV, create_identity
from tests.conftest import REPO
from tests.helpers import plaintext_config

WHO = ("--operator", "Ann Installer")


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for path, parser in gateway.subcommands(gateway.build_parser()):
        yield " ".join(path), parser


def is_hidden(action: argparse.Action) -> bool:
    """-v and --trace-serial repeated after each command (documented at the top)."""
    return action.help == argparse.SUPPRESS and action.dest.startswith(
        (gateway.SUB_VERBOSE, gateway.SUB_TRACE))


def test_every_option_has_help() -> None:
    missing = [f"{path or 'gateway.py'}: {'/'.join(a.option_strings) or a.dest}"
               for path, parser in parsers() for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not is_hidden(a)
               and not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)]
    assert missing == []


def test_every_command_ends_its_help_with_examples_that_parse() -> None:
    parser = gateway.build_parser()
    for path, sub in parsers():
        assert sub.epilog, f"{path}: no examples"
        assert sub.epilog.startswith("examples:\n"), f"{path}: no examples"
        assert "examples:\n  python gateway.py " in sub.format_help()  # kept as written
        for line in sub.epilog.splitlines()[1:]:
            example = line.strip().removeprefix("python gateway.py ")
            argv = shlex.split(example.split("#")[0].split(">")[0])
            assert argv[:len(path.split())] == path.split(), f"{path}: {example}"
            if path in ("", "provision", "diag"):
                assert argv[0] in ("run", "status", "demo", "provision", "diag")
            args = parser.parse_args(argv)  # exits (a failure) when it does not parse
            assert callable(args.func)


def test_version() -> None:
    with (REPO / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    result = subprocess.run([sys.executable, str(REPO / "gateway.py"), "--version"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"gateway.py {version}\n", "")


def test_verbose_before_or_after_any_command() -> None:
    parser = gateway.build_parser()
    for path, sub in parsers():
        if not path or path in ("provision", "diag") or not sub.epilog:
            continue
        first = sub.epilog.splitlines()[1].strip().removeprefix("python gateway.py ")
        argv = shlex.split(first.split("#")[0].split(">")[0])
        for placed in (["-v", *argv, "-v"], [*argv, "-vv"], ["-vv", *argv],
                       [argv[0], "-v", *argv[1:], "-v"]):
            args = parser.parse_args(placed)
            assert gateway._global_options(args) == (2, False), (path, placed)


# -- --json: one JSON object on stdout, nothing else ------------------------------------------
def process(*args: str) -> tuple[list[str], int, str, str]:
    """*args* run as ``python gateway.py ...``: (argv, exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in (TPM_ENV, "TSS2_LOG")}
    result = subprocess.run([sys.executable, str(REPO / "gateway.py"), *args],
                            capture_output=True, text=True, timeout=120, check=False, env=env)
    return list(args), result.returncode, result.stdout, result.stderr


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[str], int, str,
                                                                         str]:
    """*args* through ``gateway.main`` here (no interpreter to start: quick): what it prints."""
    code = gateway.main(list(args))
    out, err = capsys.readouterr()
    return list(args), code, out, err


def test_json_prints_exactly_one_object(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every command with --json that runs without a network or a daemon (status: not
    running, exit 3), the demo among them: the demo, status and provision init as processes
    (what a script gets on its stdout), the others through gateway.main."""
    ident = str(tmp_path / "a" / "identity")
    b, d = tmp_path / "b", tmp_path / "d"
    for directory, gw in ((b, "gw-json-0002"), (d, "gw-json-0004")):
        directory.mkdir()
        create_identity(directory / "identity", gw).close()
    cfg_b = str(plaintext_config(b, b / "identity", port=9))
    cfg_d = str(plaintext_config(d, d / "identity", port=9))
    nmea = tmp_path / "capture.nmea"
    nmea.write_bytes(fix_sentences(dt.datetime.now(dt.UTC), 46.81, -71.21) * 3)
    (tmp_path / "usb").mkdir()
    (tmp_path / "by-id").mkdir()
    processes = [
        ("demo", "--duration", "2", "--no-tpm", "--no-gnss", "--json"),
        ("status", "--config", cfg_b, "--json"),
        ("provision", "init", "--identity-dir", ident, "--gateway-id", "gw-json-0001",
         "--no-tpm", "--json"),
    ]
    with ThreadPoolExecutor(len(processes)) as pool:
        running = [pool.submit(process, *argv) for argv in processes]
        wait([running[2]])  # the identity the commands below use
        results = [running[2].result()]
        for argv in (
            ("provision", "pair-tag", "--identity-dir", ident, "--tag", "0x1000", *WHO,
             "--json"),
            ("provision", "list-tags", "--identity-dir", ident, "--json"),
            ("provision", "unpair-tag", "--identity-dir", ident, "--tag", "0x1000", *WHO,
             "--json"),
            ("provision", "pair-kiosk", "--identity-dir", ident, "--serial", "KI-0001", *WHO,
             "--json"),
            ("provision", "list-kiosks", "--identity-dir", ident, "--json"),
            ("provision", "unpair-kiosk", "--identity-dir", ident, "--serial", "KI-0001",
             *WHO, "--json"),
            ("provision", "rotate-key", "--identity-dir", ident, *WHO, "--json"),
            ("provision", "enrol", "--identity-dir", ident, "--request-out",
             str(tmp_path / "usb"), *WHO, "--json"),
            ("provision", "config", "--out", str(tmp_path / "new.toml"), "--by-id",
             str(tmp_path / "by-id"), "--json"),
            ("diag", "buffer", "--config", cfg_b, "--json"),
            ("diag", "keys", "--config", cfg_b, "--json"),
            ("diag", "ports", "--config", cfg_b, "--json"),
            ("diag", "bundle", "--config", cfg_b, "--out", str(tmp_path / "b.tar.gz"),
             "--json"),
            ("diag", "nmea-replay", str(nmea), "--json"),
            ("provision", "check", "--config", cfg_b, "--json", *_no_broker()),
            ("provision", "decommission", "--config", cfg_d, *WHO, "--yes", "--force",
             "--timeout", "1", "--json"),
        ):
            results.append(in_process(capsys, *argv))
        results += [r.result() for r in running[:2]]
    for argv, code, out, err in results:
        what = f"{shlex.join(argv)} (exit {code}):\n{err}"
        assert "Traceback" not in err, what
        assert code in (0, 1, 3), what  # 1: a check found a problem; 3: not running
        try:
            value: Any = json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"{what}\nstdout is not one JSON document:\n{out}")
        assert isinstance(value, dict), what
    demo = results[-2]
    assert demo[1] == 0, demo[3]
    assert re.search(r"^demo summary: .* -> OK$", demo[3], re.M)  # for people: on stderr
    assert results[-1][1] == 3  # status: no daemon
    assert "no TPM" in results[0][3]  # provision init's warning: on stderr


def _no_broker() -> tuple[str, ...]:
    """provision check without its broker test, where it has one (the lab has no broker)."""
    check = dict(parsers())["provision check"]
    return ("--skip-broker",) if any("--skip-broker" in a.option_strings
                                     for a in check._actions) else ()
