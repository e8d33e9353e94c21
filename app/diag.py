"""``gateway.py diag``: what a technician on site asks, answered without personal data.

Every command reads the same configuration as the daemon, may run while the
daemon runs (the store is opened read-only), prints a readable report, and with
``--json`` one JSON object. Nothing here prints a key, a tag id, a person
reference or a position; the support bundle includes records only when asked
(``--include-personal``), and then only the ones still queued.

What the bundle holds without ``--include-personal``: ``reports.json`` (buffer, keys
and ports reports: counts, key ids, paths) and ``gateway.json``, the configuration
re-encoded from its parsed values with every key of :data:`PERSONAL_KEYS` replaced by
:data:`REDACTED` (comments are dropped: they may say anything). Personal: the
installed position (``[gnss] installed_lat``/``installed_lon``), which is the
supervised person's home. Not personal, kept: device paths (by-id names carry the
devices' serial numbers, not a person), the broker, directories, intervals, radius.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

from app.config import Config
from buffer.store import StoreReader, inspect_store, store_path
from core.errors import UserError
from provisioning.identity import load_identity
from provisioning.registry import REGISTRY_FILE, RegistryError, open_registry

#: Configuration keys whose values are personal data, by section: never in a bundle.
PERSONAL_KEYS: dict[str, frozenset[str]] = {
    "gnss": frozenset({"installed_lat", "installed_lon"}),
}
REDACTED = "<redacted: personal data>"


def buffer_report(cfg: Config) -> dict[str, Any]:
    db = store_path(cfg.data_dir)
    if not db.exists():
        return {"store": str(db), "exists": False}
    return {"store": str(db), "exists": True} | inspect_store(db)


def keys_report(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"identity_dir": str(cfg.identity_dir)}
    try:
        ident = load_identity(cfg.identity_path, repair=False)  # the daemon repairs
    except UserError as exc:  # IdentityError; TpmError: the TPM does not answer, or another
        return out | {"ok": False, "error": str(exc)}
    staged = ident.next_key
    problems = []
    for name in ("signing.key", "storage.key", "signing.next.key", REGISTRY_FILE):
        path = cfg.identity_path / name
        if path.exists() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"{path} is readable by others: chmod 600 {path}")
    try:
        registry = open_registry(ident)
        tags = sum(1 for _ in registry)
        registry.close()
    except RegistryError as exc:
        problems.append(str(exc))
        tags = None
    from core.suites import key_id

    warnings = []
    if ident.key_class != "tpm":
        warnings.append("the identity key is a file on this disk (no TPM): a copy of the "
                        "disk can sign as this gateway; provision with a TPM outside the lab")
    if ident.storage_class != "tpm":
        warnings.append("the storage key is a file on this disk (no TPM): a copy of the "
                        "disk decrypts the stored records")
    ident.close()
    return out | {
        "ok": not problems, "gateway_id": ident.gateway_id, "kid": ident.kid,
        "alg": ident.key.alg, "key_class": ident.key_class,
        "storage_class": ident.storage_class, "suite": ident.suite.name,
        "warnings": warnings,
        "staged_kid": key_id(staged.alg, staged.public_raw) if staged else None,
        "paired_tags": tags, "problems": problems,
    }


def ports_report(cfg: Config) -> dict[str, Any]:
    ports = [(d.name, d.path) for d in cfg.devices]
    if cfg.gnss is not None:
        ports.append(("gnss", cfg.gnss.path))
    out: dict[str, Any] = {}
    for name, path in ports:
        p = Path(path)
        entry: dict[str, Any] = {"path": path, "exists": p.exists()}
        if p.exists():
            entry["device"] = os.path.realpath(path)
            entry["char_device"] = stat.S_ISCHR(p.stat().st_mode)
            entry["read_write"] = os.access(path, os.R_OK | os.W_OK)
        else:
            entry["hint"] = ("not present: check the cable and `ls -l /dev/serial/by-id/`"
                             if "/by-id/" in path else "not present: check the cable")
        out[name] = entry
    return out


class DiagError(UserError):
    """A diagnostic cannot be made as asked (e.g. where the bundle goes); the message says why."""


def check_out(out: Path) -> None:
    """Refuse a bundle path that cannot be a new file, before anything is done or recorded."""
    if out.is_dir():
        raise DiagError(f"--out {out} is a directory: give a file path, e.g. "
                        f"{out / 'smartcorr-bundle.tar.gz'}")
    parent = out.parent
    if not parent.is_dir():
        raise DiagError(f"--out {out}: the directory {parent} does not exist: create it or "
                        "give a file path in an existing directory")


def missing_ports(report: dict[str, Any]) -> list[str]:
    """The configured ports of a :func:`ports_report` that are not present."""
    return [name for name, entry in report.items() if not entry.get("exists")]


def bundle(cfg: Config, out: Path, *, include_personal: bool = False) -> dict[str, Any]:
    """A support bundle (tar.gz): reports, configuration, no secrets, no personal data
    unless *include_personal* (then the queued records too, decrypted)."""
    check_out(out)
    reports = {
        "created": int(time.time()), "buffer": buffer_report(cfg), "keys": keys_report(cfg),
        "ports": ports_report(cfg), "personal_data": include_personal,
    }
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise DiagError(f"--out {out}: cannot write it ({exc.strerror or exc}): give a file "
                        "path in a directory you may write") from None
    os.fchmod(fd, 0o600)  # never readable by others, not even while it is written
    with os.fdopen(fd, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as tar:
        _add(tar, "reports.json", json.dumps(reports, indent=2).encode())
        if cfg.source is not None:
            _add(tar, "gateway.json", json.dumps(redacted_config(cfg.source), indent=2).encode())
        if include_personal:
            _add(tar, "records.ndjson", _queued_records(cfg))
    return {"bundle": str(out), "size": out.stat().st_size, "personal_data": include_personal}


def redacted_config(source: Path) -> dict[str, Any]:
    """The configuration's values (already checked by load_config) without personal data."""
    raw = tomllib.loads(source.read_text(encoding="utf-8"))
    for section, keys in PERSONAL_KEYS.items():
        tables = raw.get(section)
        for table in tables if isinstance(tables, list) else [tables]:
            if isinstance(table, dict):
                table.update(dict.fromkeys(keys & table.keys(), REDACTED))
    return raw


def _queued_records(cfg: Config) -> bytes:
    identity = load_identity(cfg.identity_path, repair=False)
    identity.close()  # the storage key is unsealed: the TPM is not needed any more
    reader = StoreReader(store_path(cfg.data_dir), identity.storage_key)
    try:
        return b"\n".join(reader.queued())
    finally:
        reader.close()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def render(report: dict[str, Any], indent: str = "") -> str:
    """A report for people: one ``key: value`` a line, nested tables indented, lists as
    ``- item`` lines, None as ``none``, booleans as yes/no (no Python reprs)."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(render(value, indent + "  "))
        elif isinstance(value, list | tuple) and value:
            lines.append(f"{indent}{key}:")
            for item in value:
                if isinstance(item, dict):
                    lines.append(f"{indent}  -")
                    lines.append(render(item, indent + "    "))
                else:
                    lines.append(f"{indent}  - {_text(item)}")
        else:
            lines.append(f"{indent}{key}: {_text(value)}")
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, dict | list | tuple) and not value):
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
