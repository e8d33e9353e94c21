"""The end of a gateway's identity: its keys, pairings and store destroyed, a tombstone left.

``provision decommission`` (``app/decommission.py``) first has the gateway's final
record, ``gateway.decommissioned``, delivered to the broker; then :func:`destroy`:

1. writes the tombstone ``decommissioned.json`` in the identity directory (state
   ``destroying``): from here the daemon refuses to start (:func:`check_not_decommissioned`),
   and a command interrupted by a power cut finishes the destruction when run again;
2. with the identity in a TPM (unless told to keep it), clears the TPM's owner
   hierarchy (``TPM2_Clear``): the TPM gets a new storage seed, so the key blobs on the
   card, and any copy of them (a backup, a copied card, a block the flash kept after the
   file was deleted), never load again. A refusal rolls back the tombstone: nothing is
   destroyed, and the command says how to clear the TPM or go without;
3. overwrites (zeros, fsync) and deletes every file of the identity directory but the
   tombstone: the key files (``signing.key``, ``signing.next.key``, ``storage.key``, the
   TLS key), the registries (``tags.json``, ``kiosks.json``: their keys are encrypted
   under the storage key), the action journal, the public files and certificates, and
   ``gateway.json`` last (``provision init`` then makes a new identity without
   ``--force``); and the TLS client key the configuration names outside it;
4. deletes the record store (``records.db`` and its ``-wal``, ``-shm``, reserve): its
   rows are encrypted under the destroyed storage key, and its ledger names tags;
5. rewrites the tombstone (state ``destroyed``).

Without a TPM the overwrite is the whole destruction: on flash storage (an SD card)
wear levelling may keep old blocks, so a key file is destroyed only as far as the card
forgets it (docs/threat-model.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.store import STORE_FILE, STORE_SUFFIXES
from core import durable
from core.errors import UserError
from provisioning.identity import META, Identity

TOMBSTONE = "decommissioned.json"
#: How long ``provision decommission`` waits, by default, for the broker to acknowledge
#: the final record and everything before it (s): an uplink that reconnects with
#: backoff (at most a minute between attempts) and a backlog on a slow mobile link.
DEFAULT_TIMEOUT_S = 300.0
FORMAT = 1
DESTROYING, DESTROYED = "destroying", "destroyed"
#: Exit status of a daemon whose gateway is decommissioned (the systemd unit does not
#: restart it: RestartPreventExitStatus).
EXIT_DECOMMISSIONED = 3
_CHUNK = 64 * 1024


class DestroyError(UserError):
    """A file could not be destroyed: the tombstone says ``destroying``; run again."""


class DecommissionedError(UserError):
    """This gateway was decommissioned: its keys are gone (or going)."""

    exit_code = EXIT_DECOMMISSIONED


@dataclass
class Destroyed:
    """What :func:`destroy` did."""

    files: list[str] = field(default_factory=list)
    tpm: str | None = None  # "cleared", "kept" (told to), None (no TPM)


def read_tombstone(directory: Path) -> dict[str, Any] | None:
    """The tombstone of *directory*, when there is one (an unreadable one is a
    DecommissionedError: something was destroyed)."""
    path = directory / TOMBSTONE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DecommissionedError(f"{path} cannot be read ({exc}): this gateway was being "
                                  "decommissioned; run 'provision decommission' again to "
                                  "finish, or 'provision init --force' for a new identity") \
            from None
    if not isinstance(doc, dict) or doc.get("state") not in (DESTROYING, DESTROYED):
        raise DecommissionedError(f"{path} is not a tombstone this software wrote: run "
                                  "'provision decommission' again to finish, or 'provision "
                                  "init --force' for a new identity")
    return doc


def check_not_decommissioned(directory: Path) -> None:
    """DecommissionedError when *directory*'s identity was decommissioned (a tombstone and
    no new identity beside it) or its destruction was interrupted."""
    doc = read_tombstone(directory)
    if doc is None:
        return
    if doc["state"] == DESTROYING:
        raise DecommissionedError(
            f"{directory}: a decommission was interrupted while destroying the keys "
            f"({directory / TOMBSTONE}): run 'provision decommission' again to finish it")
    if (directory / META).exists():
        return  # a new identity was provisioned since: the tombstone is history
    raise DecommissionedError(
        f"gateway {doc.get('gateway_id')} was decommissioned at {doc.get('at')} "
        f"({directory / TOMBSTONE}): its keys are destroyed; give this unit a new identity "
        "with 'provision init' (and enrol it), or take it out of service")


def _tombstone(directory: Path, doc: dict[str, Any]) -> None:
    # no secret in it; readable by the gateway's user when a command run as root wrote it
    durable.atomic_write(directory / TOMBSTONE,
                         json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", 0o644)


def _shred(path: Path) -> bool:
    """Overwrite *path* with zeros (fsynced), then delete it (a symbolic link: only the
    link); False when absent. DestroyError when it cannot."""
    try:
        return _overwrite_and_delete(path)
    except OSError as exc:
        raise DestroyError(f"cannot destroy {path} ({exc.strerror or exc}): fix that (is it "
                           "yours? a read-only filesystem?) and run 'provision decommission' "
                           "again to finish; the daemon refuses to start meanwhile") from None


def _overwrite_and_delete(path: Path) -> bool:
    if path.is_symlink():
        path.unlink()
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, _CHUNK))
        for offset in range(0, size, _CHUNK):
            os.pwrite(fd, zeros[: size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    return True


def store_files(data_dir: Path) -> list[Path]:
    return [data_dir / f"{STORE_FILE}{suffix}" for suffix in STORE_SUFFIXES]


def destroy(directory: Path, data_dir: Path, facts: dict[str, Any], *,
            identity: Identity | None, clear_tpm: bool,
            outside: tuple[Path, ...] = ()) -> Destroyed:
    """Destroy the identity in *directory*, the secrets *outside* it (the TLS client key)
    and the store in *data_dir* (module docstring).
    *facts* go in the tombstone (gateway id, key id, the final record's seq, whether it
    was delivered); *identity* (None when resuming an interrupted destruction) gives the
    TPM connection. The caller holds the data directory's lock (no daemon runs).
    TpmError when the TPM refuses to clear: then nothing was destroyed."""
    before = read_tombstone(directory)
    doc = {**(before or {}), **facts, "format": FORMAT, "state": DESTROYING,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    in_tpm = doc.get("key_class") == "tpm" or doc.get("storage_class") == "tpm"
    _tombstone(directory, doc)
    done = Destroyed()
    if in_tpm and clear_tpm:
        try:
            _clear_tpm(identity, doc.get("tpm"))
        except UserError:
            if before is None:  # nothing destroyed: as before the command
                durable.remove(directory / TOMBSTONE)
            raise
        done.tpm = "cleared"
    elif in_tpm:
        done.tpm = "kept"
    # every file of the identity (whatever later versions add), gateway.json last
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and TOMBSTONE not in p.name)
    for name in sorted(names, key=lambda n: n == META):
        if _shred(directory / name):
            done.files.append(str(directory / name))
    durable.fsync_dir(directory)
    for path in outside:
        if _shred(path):
            done.files.append(str(path))
            durable.fsync_dir(path.parent)
    for path in store_files(data_dir):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DestroyError(f"cannot delete {path} ({exc.strerror or exc}): fix that and "
                               "run 'provision decommission' again to finish") from None
        done.files.append(str(path))
    if data_dir.is_dir():
        durable.fsync_dir(data_dir)
    _tombstone(directory, {**doc, "state": DESTROYED, "tpm_cleared": done.tpm == "cleared"})
    return done


def _clear_tpm(identity: Identity | None, tcti: object) -> None:
    """Clear the identity's TPM (its own connection), or the one the tombstone names."""
    if identity is not None:
        tpm = identity.keys.tpm()
        try:
            tpm.clear()
        finally:
            identity.close()  # its objects' contexts died with the hierarchy
        return
    from provisioning.identity import TPM_ENV
    from provisioning.tpm import TpmError, open_tpm

    name = os.environ.get(TPM_ENV) or tcti
    if not isinstance(name, str) or not name:
        raise TpmError(f"the identity was in a TPM that no file names any more: set "
                       f"{TPM_ENV}=TCTI and run 'provision decommission' again")
    with open_tpm(name) as tpm:
        tpm.clear()
