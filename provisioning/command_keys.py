"""The gateway's command keyring on disk: the root's public key and the command keys'
certificates, in the identity directory (docs/command-keys.md).

Two files beside the identity (:mod:`provisioning.identity`), both public (mode 0644),
written atomically and durably (:func:`core.durable.atomic_write`):

* ``command-root.pub`` - the root's public key: the only key that may certify a
  command key or revoke one. Written once, at enrolment; material of another root is
  refused (a new root means a new enrolment);
* ``command-keys.json`` - the certificates held and the newest revocation list.

Enrolment brings both (the platform's ``ingest command-key export``, carried in the
enrolment answer): :func:`offered_keyring` checks them, :func:`install_files` (or
:func:`install`, from a directory) merges them in, each document verified against the root
held; a revocation list older than the one held is refused (``rollback``), so writing
offered files over the installed ones as they are would lose that protection. Nothing
here reads a private key: the gateway verifies commands, it never signs one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.command_keys import (
    FILES,
    KEYS_FILE,
    ROOT_FILE,
    CommandKeyError,
    CommandKeyring,
    CommandRoot,
    Skipped,
)
from core.durable import atomic_write
from core.errors import UserError

PUBLIC_MODE = 0o644
#: ``provision check`` warns when a command key expires within this many days.
WARN_DAYS = 30
DAY_MS = 86_400_000


class CommandKeysError(UserError):
    """The command keys in the identity directory (or offered to it) are unusable; the
    message says which file and what to do."""


def installed(directory: Path) -> bool:
    return (directory / ROOT_FILE).exists() or (directory / KEYS_FILE).exists()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandKeysError(f"{path}: cannot read it ({exc.strerror})") from None


def load_keyring(directory: Path, *, region: str | None = None,
                 ) -> tuple[CommandKeyring, list[Skipped]] | None:
    """The keyring in *directory* and the certificates of its file that were not taken;
    None when no command keys are installed."""
    return _parse(_read(directory / ROOT_FILE), _read(directory / KEYS_FILE), directory,
                  region, "enrol the gateway again to receive the command keys")


def _parse(root: bytes | None, keys: bytes | None, where: Path, region: str | None,
           fix: str) -> tuple[CommandKeyring, list[Skipped]] | None:
    if root is None:
        if keys is None:
            return None
        raise CommandKeysError(f"{where / KEYS_FILE} is there without {ROOT_FILE}: {fix}")
    try:
        CommandRoot.from_bytes(root)
    except CommandKeyError as exc:
        raise CommandKeysError(f"{where / ROOT_FILE}: {exc}: {fix}") from None
    try:
        return CommandKeyring.from_files(root, keys, region=region)
    except CommandKeyError as exc:
        raise CommandKeysError(f"{where / KEYS_FILE}: {exc}: {fix}") from None


def save_keyring(directory: Path, ring: CommandKeyring) -> None:
    """Write *ring* to *directory*: the root's file once (never another root), then the
    keys file."""
    files = ring.files()
    held = _read(directory / ROOT_FILE)
    if held is None:
        atomic_write(directory / ROOT_FILE, files[ROOT_FILE], PUBLIC_MODE)
    elif held != files[ROOT_FILE]:
        raise CommandKeysError(f"{directory / ROOT_FILE} holds another command root: a new "
                               "root needs a new enrolment")
    atomic_write(directory / KEYS_FILE, files[KEYS_FILE], PUBLIC_MODE)


def install(directory: Path, source: Path, now_ms: int, *, region: str | None = None,
            expect_root: str | None = None) -> list[str]:
    """:func:`install_files` of the directory *source* (what ``ingest command-key export``
    wrote)."""
    return install_files(directory, {name: data for name in FILES
                                     if (data := _read(source / name)) is not None},
                         now_ms, region=region, expect_root=expect_root, where=source)


def offered_keyring(files: Mapping[str, bytes], *, region: str | None = None,
                    expect_root: str | None = None,
                    where: Path = Path("the command material")) -> CommandKeyring:
    """The keyring of the files *files* (by name: ``command-root.pub``,
    ``command-keys.json``, as an enrolment answer carries them), every document verified
    against its root; CommandKeysError when any is refused (certificates of other regions
    than *region* aside) or the root is not *expect_root* (a root key id)."""
    parsed = _parse(files.get(ROOT_FILE), files.get(KEYS_FILE), where, region,
                    "ask the platform for its current export")
    if parsed is None:
        raise CommandKeysError(f"{where} holds no {ROOT_FILE}: give the directory that "
                               "'ingest command-key export' wrote")
    ring, skipped = parsed
    if expect_root is not None and ring.root.kid != expect_root:
        raise CommandKeysError(f"{where / ROOT_FILE} is root {ring.root.kid}, not the "
                               f"expected {expect_root}: do not install it")
    refused = [s for s in skipped if s.error.reason != "wrong_region"]  # others' keys
    if refused:
        raise CommandKeysError(f"{where / KEYS_FILE}: certificate #{refused[0].index} "
                               f"refused ({refused[0].error})")
    return ring


def install_files(directory: Path, files: Mapping[str, bytes], now_ms: int, *,
                  region: str | None = None, expect_root: str | None = None,
                  where: Path = Path("the command material")) -> list[str]:
    """Merge the command keys of *files* (:func:`offered_keyring`) into *directory*; what
    changed, in words (for the record the caller writes). The first install takes the
    offered root (*expect_root*, when given, must match: the kid written down at the
    root's ceremony); later ones must be of the root held, and a revocation list older
    than the one held is refused (``rollback``). Nothing is written when anything is
    refused."""
    new = offered_keyring(files, region=region, expect_root=expect_root, where=where)
    held = load_keyring(directory, region=region)
    if held is None:
        ring = CommandKeyring(new.root, region=region)
        changes = [f"command root {new.root.kid}"]
    else:
        ring, changes = held[0].copy(), []
    try:
        changes += ring.merge(new, now_ms)
    except CommandKeyError as exc:
        raise CommandKeysError(f"{where}: {exc}") from None
    if changes:
        save_keyring(directory, ring)
    return changes


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(directory: Path, now_ms: int) -> dict[str, Any]:
    """What ``provision check`` says of the command keys: the root, each certificate with
    its state and expiry, ``warnings`` (expiry within :data:`WARN_DAYS`, no usable key)
    and ``problems`` (files that do not verify)."""
    try:
        loaded = load_keyring(directory)
    except CommandKeysError as exc:
        return {"installed": True, "warnings": [], "problems": [str(exc)]}
    if loaded is None:
        return {"installed": False, "warnings": [], "problems": [],
                "note": "no command keys installed (they come with enrolment): the gateway "
                        "accepts no command from the platform"}
    ring, skipped = loaded
    problems = [f"{directory / KEYS_FILE}: certificate #{s.index} refused ({s.error})"
                for s in skipped]
    warnings, certs = [], []
    for cert in ring.certificates:
        status = ring.status(cert, now_ms)
        days_left = (cert.not_after - now_ms) // DAY_MS
        certs.append({"serial": cert.serial, "kid": cert.kid, "alg": cert.alg,
                      "region": cert.region, "not_before": _iso(cert.not_before),
                      "not_after": _iso(cert.not_after), "status": status,
                      "days_left": max(days_left, 0)})
        if status in ("valid", "not_yet_valid") and cert.not_after - now_ms <= \
                WARN_DAYS * DAY_MS:
            warnings.append(f"command key {cert.kid} (serial {cert.serial}, region "
                            f"{cert.region}) expires {_iso(cert.not_after)}, in {days_left} "
                            "day(s): the platform must issue its successor (ingest "
                            "command-key issue, export) and send it to this gateway")
    if not any(c["status"] == "valid" for c in certs):
        warnings.append("no command key is valid now: the gateway refuses every command "
                        "from the platform until it receives a current certificate")
    return {"installed": True, "root_kid": ring.root.kid, "root_alg": ring.root.alg,
            "root_fingerprint": ring.root.fingerprint,
            "revocation_list": ring.revocations_number, "certificates": certs,
            "warnings": warnings, "problems": problems}
