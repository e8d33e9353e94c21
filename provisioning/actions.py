"""The action journal: every local human action, written down before it changes anything.

The command line (which may run while the daemon is stopped or running) appends one
entry per action to ``actions.journal`` in the identity directory, beside the
registries it changes, and fsyncs it **before** it acts: a crash in between leaves a
record of an attempted action, never a silent change. The daemon (``app/actions.py``)
seals each entry into a ``local.action`` record (alarm class), keeps the number of the
last one recorded in the store's ledger in the same transaction, and then compacts the
journal. Issue 9, item 6; docs/records.md.

Format: one JSON object per line (``\\n``-terminated).

* line 1, the header: ``{"journal": 1, "id": ID, "last": N}``: a random id (a journal
  deleted and made again gets another, so its numbers are never taken for ones already
  recorded) and the highest entry number compacted away;
* each entry: ``{"n": N, "nonce": B64, "ct": B64}``: numbers strictly increasing, the
  content (action, details, operator, wall time) encrypted with the storage key's AEAD
  (it names a person and a tag), the number bound as associated data.

Writers and the compaction hold an exclusive ``flock`` on ``.actions.journal.lock``
(the journal itself is replaced by the compaction, so it cannot carry the lock). At
most :data:`MAX_PENDING` entries wait: beyond, an action is refused (the daemon is not
consuming the journal).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag

from core import durable
from core.errors import UserError
from core.suites import storage_aead
from provisioning.identity import Identity
from provisioning.operator import Operator

JOURNAL_FILE = "actions.journal"
LOCK_FILE = ".actions.journal.lock"
FORMAT = 1
#: Entries waiting for the daemon beyond which an action is refused.
MAX_PENDING = 10_000
#: The longest journal line read (an entry is a few hundred bytes).
MAX_LINE_BYTES = 64 * 1024
NONCE_BYTES = 12
#: The actions a journal entry may name.
ACTIONS = frozenset({"tag.paired", "tag.unpaired", "kiosk.paired", "kiosk.unpaired",
                     "tag.replaced", "kiosk.replaced",
                     "bundle.personal", "key.staged", "decommission",
                     "enrol.requested", "enrol.completed", "enrol.failed",
                     "tag.range_test"})
#: Actions sealed under a record kind of their own (the action's name, core/kinds.py)
#: instead of ``local.action``; same body.
OWN_KINDS = frozenset({"enrol.requested", "enrol.completed", "enrol.failed",
                       "tag.range_test"})
_AAD_PREFIX = b"smartcorr.action\x00"


class JournalError(UserError):
    """The journal cannot take the action; the message says why and what to do."""


class Aead(Protocol):
    """What the journal needs of an AEAD (``core.suites.Aead``, cryptography's ``AESGCM``)."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


def journal_aead(identity: Identity) -> Aead:
    """The AEAD the journal is encrypted with: the storage key's, as the registries' (the
    one place to change it)."""
    return storage_aead(identity.storage_key)


def journal_path(directory: Path) -> Path:
    return directory / JOURNAL_FILE


def file_sha256(path: Path) -> str | None:
    """SHA-256 (hex) of the bytes of *path* on disk; None when it does not exist."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One action, decrypted."""

    number: int
    action: str
    details: Mapping[str, Any]
    operator: Mapping[str, Any]
    at_ms: int


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not a readable entry: reported, never skipped silently."""

    index: int  # 0-based line of the file
    number: int | None  # its entry number, when that much could be read
    error: str
    raw: bytes


@dataclass
class Journal:
    """What the journal holds: its id (0: no valid header), the highest number compacted
    away, readable entries in file order, and the lines that are not."""

    journal_id: int = 0
    last: int = 0
    entries: list[Entry] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)

    @property
    def highest(self) -> int:
        numbers = [e.number for e in self.entries]
        numbers += [b.number for b in self.bad if b.number is not None]
        return max([self.last, *numbers])


#: The journal locks this thread holds, by directory, and how deeply: a holder may take
#: it again (the command line holds it across a pairing, whose journal entry takes it).
_HELD = threading.local()


@contextlib.contextmanager
def locked(directory: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the journal's lock; yields False (not held) when *wait* is false and another
    holds it. Re-entrant within a thread (another thread of this process, as another
    process, waits: each holder has its own open file, and flock locks an open file).

    Whoever changes the registries holds it: ``provision pair-tag`` and its kin from
    their check of the registry to the change (app/commands.py applies a platform's
    pairing under it too), so a command and a command line never interleave."""
    held: dict[str, int] = _HELD.__dict__.setdefault("depth", {})
    key = os.path.realpath(directory)
    if held.get(key):
        held[key] += 1
        try:
            yield True
        finally:
            held[key] -= 1
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        held[key] = 1
        try:
            yield True
        finally:
            held.pop(key, None)
    finally:
        os.close(fd)  # releases the lock


def _aad(number: int) -> bytes:
    return _AAD_PREFIX + number.to_bytes(8, "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _header(journal_id: int, last: int) -> bytes:
    return _line({"journal": FORMAT, "id": journal_id, "last": last})


def _read_lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    # a last line without its newline (a crash while it was written) is kept: it is bad
    return lines[:-1] if lines[-1] == b"" else lines


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse(lines: list[bytes], aead: Aead | None) -> Journal:
    """The journal in *lines*; entries decrypted with *aead* (None: numbers only)."""
    out = Journal()
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw) if len(raw) <= MAX_LINE_BYTES else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if index == 0 and isinstance(obj, dict) and "journal" in obj:
            if obj.get("journal") == FORMAT and _whole(obj.get("id")) \
                    and _whole(obj.get("last")):
                out.journal_id, out.last = obj["id"], obj["last"]
            else:
                out.bad.append(BadLine(index, None, "unreadable header", raw))
            continue
        number = _number(obj)
        if number is None or not isinstance(obj, dict):
            out.bad.append(BadLine(index, None, "not a journal entry", raw))
            continue
        if aead is None:
            out.entries.append(Entry(number, "", {}, {}, 0))
            continue
        entry = _decrypt(aead, number, obj)
        if isinstance(entry, str):
            out.bad.append(BadLine(index, number, entry, raw))
        else:
            out.entries.append(entry)
    return out


def _decrypt(aead: Aead, number: int, obj: Mapping[str, Any]) -> Entry | str:
    """The entry, or why it cannot be read."""
    try:
        nonce = base64.b64decode(obj["nonce"], validate=True)
        sealed = base64.b64decode(obj["ct"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        return "nonce or ciphertext missing or not base64"
    try:
        content = json.loads(aead.decrypt(nonce, sealed, _aad(number)))
    except (InvalidTag, ValueError):
        return "does not decrypt (altered, moved, or another gateway's storage key)"
    if not (isinstance(content, dict) and content.get("action") in ACTIONS
            and isinstance(content.get("details"), dict)
            and isinstance(content.get("operator"), dict) and _whole(content.get("at_ms"))):
        return "decrypted, but not an action"
    return Entry(number, content["action"], content["details"], content["operator"],
                 content["at_ms"])


def read(directory: Path, aead: Aead) -> Journal:
    """The journal in *directory* (the caller holds the lock, or accepts a torn read)."""
    return parse(_read_lines(journal_path(directory)), aead)


def append(directory: Path, aead: Aead, action: str, details: Mapping[str, Any],
           operator: Operator, *, now_ms: int | None = None) -> int:
    """Write down *action* durably (fsynced, its directory too when created) before it is
    done; its entry number. :class:`JournalError` when :data:`MAX_PENDING` entries wait."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    path = journal_path(directory)
    content = {"action": action, "details": dict(details), "operator": operator.to_json(),
               "at_ms": int(time.time() * 1000) if now_ms is None else now_ms}
    try:
        with locked(directory):
            lines = _read_lines(path)
            journal = parse(lines, None)
            pending = len(journal.entries) + len(journal.bad)
            if pending >= MAX_PENDING:
                raise JournalError(
                    f"{path} holds {pending} actions the gateway has not recorded yet (at "
                    f"most {MAX_PENDING}): is the gateway running? Start it "
                    "(systemctl start smartcorr-gateway) so that it records them, then try "
                    "again")
            number = journal.highest + 1
            nonce = os.urandom(NONCE_BYTES)
            sealed = aead.encrypt(nonce, json.dumps(content, sort_keys=True).encode(),
                                  _aad(number))
            line = _line({"n": number, "nonce": _b64(nonce), "ct": _b64(sealed)})
            if not lines:
                durable.atomic_write(path, _header(secrets.randbits(62) or 1, 0))
            _append_line(path, line)
    except OSError as exc:
        raise JournalError(f"{path}: cannot write down the action ({exc.strerror or exc}); "
                           "nothing was changed") from None
    return number


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a torn last line stays a line of its own (reported bad)
        durable.write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def line_digest(raw: bytes) -> bytes:
    """How a bad line is named once reported (:func:`compact` drops it then)."""
    return hashlib.sha256(raw).digest()


def compact(directory: Path, recorded: int, journal_id: int,
            reported: set[bytes] | frozenset[bytes]) -> int:
    """Drop what the daemon has recorded: entries of journal *journal_id* numbered up to
    *recorded*, and the bad lines whose :func:`line_digest` is in *reported*; atomically.
    The caller holds the lock. How many lines were dropped."""
    path = journal_path(directory)
    lines = _read_lines(path)
    old = parse(lines, None)
    if old.journal_id != journal_id:
        return 0  # replaced since it was read: nothing of it is known to be recorded
    keep: list[bytes] = []
    last = max(recorded, old.last)
    dropped = 0
    for index, raw in enumerate(lines):
        obj = _loads(raw)
        if not raw.strip() or (index == 0 and isinstance(obj, dict) and "journal" in obj):
            continue  # the header is written anew
        number = _number(obj)
        if line_digest(raw) in reported or (number is not None and number <= recorded):
            dropped += 1
            last = max(last, number or 0)
            continue
        keep.append(raw + b"\n")
    if dropped:
        # a journal without a readable header gets an id now: what it keeps is unrecorded
        new_id = journal_id or secrets.randbits(62) or 1
        durable.atomic_write(path, _header(new_id, last) + b"".join(keep))
    return dropped


def _number(obj: object) -> int | None:
    """An entry's number, when *obj* is a JSON object with a valid one."""
    number = obj.get("n") if isinstance(obj, dict) else None
    return number if isinstance(number, int) and _whole(number) else None


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def record(identity: Identity, action: str, details: Mapping[str, Any],
           operator: Operator) -> int:
    """The command line's door: write down *action* in *identity*'s journal."""
    return append(identity.directory, journal_aead(identity), action, details, operator)
