"""The platform's signed commands, applied exactly once (docs/commands.md).

The uplink subscribes to ``smartcorr/v1/gw/<gw>/cmd`` at QoS 1 on its persistent session
(uplink/forwarder.py ``listen``: what is queued while the gateway is away waits for it)
with manual acknowledgement, and hands each message to :class:`CommandService` (paho's
thread only queues it). One worker thread answers the commands one at a time, in order:

1. :func:`core.commands.check_command` (signature, gateway, sequence, time, body);
2. a refusal is a ``command.rejected`` record (alarm class); a duplicate (the broker sent
   a command again whose answer is committed) is acknowledged and nothing more;
3. an accepted command is **planned** against the gateway's state (a tag paired with
   another key and no ``replace``: refused, ``conflict``), then written down in the
   pending file ``data_dir/commands.pending`` (fsynced: the commit point of the decision),
   then its **effect** is applied: an atomic write of the file it changes (``tags.json``,
   ``kiosks.json``, ``settings.json``), made idempotent (applying it twice leaves what once
   does);
4. the ``command.applied`` record (the file's SHA-256 after) and the store ledger's
   ``cmd:last`` = cseq (with the command's digest, ``cmd:sha:<cseq>``) commit in one store
   transaction; then the live change (the drivers take the new pairing), the pending file
   is removed, and only then is the message acknowledged (PUBACK).

A SIGKILL anywhere in between: before the pending file, nothing happened and the broker
sends the command again (not acknowledged); after it, :meth:`CommandService.recover` at
the next start finds ``cseq`` above ``cmd:last``, applies the effect again (idempotent:
once) and commits ``command.applied`` (``recovered: true``); after the commit, the pending
file is only removed, and the broker's copy is a :class:`~core.commands.Duplicate`. So
each command has one answer record, and its effect happened once.

Test hook (fault injection, never set in production): :data:`KILL_ENV` = ``pending`` or
``effect`` SIGKILLs the process right after the pending file, or right after the effect.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.actions import COMMAND_LAST_KEY, COMMAND_TOUCHED_KEY, KIOSKS, TAGS
from app.removals import KIOSK, TAG, pending_key
from app.supervision import ROLE as SUPERVISION_ROLE
from app.supervision import SupervisionService
from core.command_keys import CommandKeyring
from core.commands import (
    BoxKey,
    Command,
    Duplicate,
    PairKiosk,
    PairTag,
    Refusal,
    SetConfig,
    UnpairKiosk,
    UnpairTag,
    check_command,
    command_digest,
    digest_value,
    reopen,
)
from core.devices import DEFAULT_ABSENT_AFTER_S, PairedKiosk, PairedTag
from core.durable import atomic_write, remove
from core.errors import UserError
from core.record import JSON, Reading, SealedRecord, Source
from core.supervision import Refusal as SupervisionRefusal
from core.topics import commands_topic
from provisioning.actions import file_sha256, locked
from provisioning.box import ensure_box_key
from provisioning.command_keys import CommandKeysError, load_keyring
from provisioning.identity import Identity
from provisioning.kiosks import KIOSKS_FILE, open_kiosks
from provisioning.registry import REGISTRY_FILE, device_key_id, open_registry
from uplink.forwarder import RECEIVE_MAXIMUM, MessageHandler

log = logging.getLogger(__name__)

APPLIED_KIND = "command.applied"
REJECTED_KIND = "command.rejected"
BOX_KIND = "key.encryption"
#: The decision written down before an effect (data_dir): the commit point.
PENDING_FILE = "commands.pending"
#: The settings the platform set (``set-config``), with the cseq that set them (data_dir).
SETTINGS_FILE = "settings.json"
#: Ledger keys: the digest of the command answered at a cseq (the last :data:`HISTORY`
#: of them: a command the broker sends again is told from a replay); the encryption key
#: announced (its kid's digest).
SHA_KEY = "cmd:sha:"
ANNOUNCED_KEY = "cmd:box_announced"
HISTORY = 64
#: Commands received and not yet answered, at most (the broker sends no more than its
#: Receive Maximum unacknowledged; beyond this one is dropped, unacknowledged: the broker
#: sends it again on the next connection).
MAX_WAITING = RECEIVE_MAXIMUM
#: Refusals that do not use up a cseq (unsigned, forged, replayed…: anyone's noise) are
#: recorded at most this many per :data:`NOISE_WINDOW_S`; the others are counted and the
#: next record says how many (``suppressed``).
NOISE_RECORDS = 30
NOISE_WINDOW_S = 60.0
#: The test hook (module docstring).
KILL_ENV = "SMARTCORR_TEST_COMMAND_KILL_AT"
#: How long the worker waits for a commit before it looks whether it is stopping, s.
COMMIT_POLL_S = 0.5
DETAIL_CHARS = 300


class Writer(Protocol):
    """What this needs of the store writer."""

    def submit(self, reading: Reading,
               on_committed: Callable[[SealedRecord], None] | None = None) -> None: ...
    def forget(self, keys: tuple[str, ...], reading: Reading | None = None,
               on_committed: Callable[[SealedRecord], None] | None = None, *,
               more: tuple[Reading, ...] = ()) -> None: ...
    def ledger_value(self, key: str) -> int | None: ...
    @property
    def final_seq(self) -> int | None: ...


class Devices(Protocol):
    """The live side of an effect (app/assembly.py): the drivers and the health loop."""

    def tag_paired(self, tag: str, paired: PairedTag | None) -> None: ...
    def kiosk_paired(self, serial: str, paired: PairedKiosk | None) -> None: ...
    def setting_changed(self, key: str, value: int) -> None: ...


class Clock(Protocol):
    def utc_now(self) -> tuple[int, bool]: ...
    def floor_ms(self) -> int: ...
    def now_ns(self) -> int: ...


class Listener(Protocol):
    def listen(self, topic: str, handler: MessageHandler) -> None: ...


@dataclass(frozen=True)
class Context:
    """What an effect may use."""

    identity: Identity
    data_dir: Path
    ledger: Callable[[str], int | None]
    #: the supervision rules' thread (app/supervision.py); None: those kinds are refused
    supervision: SupervisionService | None = None


@dataclass(frozen=True)
class Plan:
    """An effect's decision against the state now: a conflict (refused), or the facts the
    effect needs once written down (kept in the pending file: the same after a crash)."""

    conflict: str | None = None
    facts: dict[str, JSON] = field(default_factory=dict)


@dataclass
class Applied:
    """What an effect did: the state after (file role and SHA-256), the record's details,
    ledger entries to commit with the record, and the live change once committed."""

    role: str
    sha256: str | None
    details: dict[str, JSON]
    changed: bool
    ledger: list[tuple[str, int]] = field(default_factory=list)
    live: Callable[[Devices], None] | None = None
    #: more records committed in the answer's transaction (the supervision's events)
    readings: list[Reading] = field(default_factory=list)
    #: called once the answer is committed, or when it is not (stopping): a lock released
    after: Callable[[], None] | None = None


PlanFn = Callable[[Context, Command], Plan]
ApplyFn = Callable[[Context, Command, Mapping[str, JSON]], Applied]


@dataclass(frozen=True)
class Effect:
    """A kind's effect on the gateway (docs/commands.md, "The kinds")."""

    plan: PlanFn
    apply: ApplyFn


# --- the effects -----------------------------------------------------------------------------

def _tag_plan(ctx: Context, cmd: Command) -> Plan:
    body: PairTag | UnpairTag = cmd.body
    reg = open_registry(ctx.identity)
    try:
        old = reg.get(body.tag)
    finally:
        reg.close()
    facts: dict[str, JSON] = {"was_paired": old is not None,
                              "old_kid": None if old is None else device_key_id(old.key)}
    if isinstance(body, PairTag) and old is not None and old.key != body.plain \
            and not body.replace:
        return Plan(f"tag {body.tag} is paired with another key ({facts['old_kid']}): it "
                    "would refuse the tag's beacons as spoofs; once the tag holds the new "
                    "key, send pair-tag with replace true", facts)
    return Plan(None, facts)


def _pair_tag(ctx: Context, cmd: Command, facts: Mapping[str, JSON]) -> Applied:
    body: PairTag = cmd.body
    if body.plain is None:
        raise ValueError("the tag key was not decrypted")
    with locked(ctx.identity.directory):  # not while a provisioning command writes
        reg = open_registry(ctx.identity)
        try:
            old = reg.get(body.tag)
            absent = body.absent_after_s if body.absent_after_s is not None else \
                old.absent_after_s if old is not None else DEFAULT_ABSENT_AFTER_S
            changed = old is None or old.key != body.plain or old.absent_after_s != absent
            paired = old if old is not None and not changed else reg.pair(
                body.tag, body.plain, absent_after_s=absent, replace=old is not None)
        finally:
            reg.close()
    ledger = []
    mark = pending_key(TAG, body.tag)
    if ctx.ledger(mark) is not None:  # unpaired before, its data not yet removed: kept
        ledger.append((mark, 0))
    details: dict[str, JSON] = {"tag": body.tag, "kid": device_key_id(body.plain),
                                "old_kid": facts.get("old_kid"), "absent_after_s": absent,
                                "replaced": bool(facts.get("was_paired"))}
    return Applied(TAGS, file_sha256(ctx.identity.directory / REGISTRY_FILE), details,
                   changed, ledger, lambda devices: devices.tag_paired(body.tag, paired))


def _unpair_tag(ctx: Context, cmd: Command, facts: Mapping[str, JSON]) -> Applied:
    body: UnpairTag = cmd.body
    with locked(ctx.identity.directory):
        reg = open_registry(ctx.identity)
        try:
            changed = reg.unpair(body.tag)
        finally:
            reg.close()
    # what the gateway keeps of it goes once delivered (app/removals.py): decided by the
    # plan, so a repeat after a crash (nothing left to unpair) still marks it
    ledger = [(pending_key(TAG, body.tag), 1)] if facts.get("was_paired") else []
    details: dict[str, JSON] = {"tag": body.tag, "old_kid": facts.get("old_kid"),
                                "was_paired": bool(facts.get("was_paired"))}
    return Applied(TAGS, file_sha256(ctx.identity.directory / REGISTRY_FILE), details,
                   changed, ledger, lambda devices: devices.tag_paired(body.tag, None))


def _kiosk_plan(ctx: Context, cmd: Command) -> Plan:
    body: PairKiosk | UnpairKiosk = cmd.body
    reg = open_kiosks(ctx.identity)
    try:
        old = reg.get(body.serial)
    finally:
        reg.close()
    facts: dict[str, JSON] = {"was_paired": old is not None,
                              "old_kid": None if old is None else device_key_id(old.key)}
    if isinstance(body, PairKiosk) and old is not None and old.key != body.plain \
            and not body.replace:
        return Plan(f"kiosk {body.serial} is paired with another key ({facts['old_kid']}): "
                    "once the kiosk holds the new key, send pair-kiosk with replace true",
                    facts)
    return Plan(None, facts)


def _pair_kiosk(ctx: Context, cmd: Command, facts: Mapping[str, JSON]) -> Applied:
    body: PairKiosk = cmd.body
    if body.plain is None:
        raise ValueError("the kiosk key was not decrypted")
    with locked(ctx.identity.directory):
        reg = open_kiosks(ctx.identity)
        try:
            old = reg.get(body.serial)
            changed = old is None or old.key != body.plain
            paired = old if old is not None and not changed else reg.pair(
                body.serial, body.plain, replace=old is not None)
        finally:
            reg.close()
    ledger = []
    mark = pending_key(KIOSK, body.serial)
    if ctx.ledger(mark) is not None:
        ledger.append((mark, 0))
    details: dict[str, JSON] = {"serial": body.serial, "kid": device_key_id(body.plain),
                                "old_kid": facts.get("old_kid"),
                                "replaced": bool(facts.get("was_paired"))}
    return Applied(KIOSKS, file_sha256(ctx.identity.directory / KIOSKS_FILE), details,
                   changed, ledger, lambda devices: devices.kiosk_paired(body.serial, paired))


def _unpair_kiosk(ctx: Context, cmd: Command, facts: Mapping[str, JSON]) -> Applied:
    body: UnpairKiosk = cmd.body
    with locked(ctx.identity.directory):
        reg = open_kiosks(ctx.identity)
        try:
            changed = reg.unpair(body.serial)
        finally:
            reg.close()
    ledger = [(pending_key(KIOSK, body.serial), 1)] if facts.get("was_paired") else []
    details: dict[str, JSON] = {"serial": body.serial, "old_kid": facts.get("old_kid"),
                                "was_paired": bool(facts.get("was_paired"))}
    return Applied(KIOSKS, file_sha256(ctx.identity.directory / KIOSKS_FILE), details,
                   changed, ledger, lambda devices: devices.kiosk_paired(body.serial, None))


def _config_plan(ctx: Context, cmd: Command) -> Plan:
    body: SetConfig = cmd.body
    if body.tag is None:
        return Plan()
    reg = open_registry(ctx.identity)
    try:
        paired = reg.get(body.tag) is not None
    finally:
        reg.close()
    if not paired:
        return Plan(f"tag {body.tag} is not paired: pair it first (pair-tag)")
    return Plan()


def _set_config(ctx: Context, cmd: Command, _facts: Mapping[str, JSON]) -> Applied:
    body: SetConfig = cmd.body
    details: dict[str, JSON] = {"key": body.key, "value": body.value, "tag": body.tag}
    if body.tag is not None:  # a tag's setting: its pairing in the registry
        with locked(ctx.identity.directory):
            reg = open_registry(ctx.identity)
            try:
                old = reg.get(body.tag)
                if old is None:
                    raise UserError(f"tag {body.tag} is not paired any more")
                changed = old.absent_after_s != body.value
                paired = reg.pair(body.tag, old.key, absent_after_s=body.value,
                                  replace=True) if changed else old
            finally:
                reg.close()
        details["before"] = old.absent_after_s
        tag = body.tag
        return Applied(TAGS, file_sha256(ctx.identity.directory / REGISTRY_FILE), details,
                       changed, [], lambda devices: devices.tag_paired(tag, paired))
    path = ctx.data_dir / SETTINGS_FILE
    settings = load_settings(ctx.data_dir)
    details["before"] = settings.get(body.key)
    changed = settings.get(body.key) != body.value
    if changed:
        settings[body.key] = body.value
        atomic_write(path, json.dumps({"format": 1, "settings": settings, "cseq": cmd.cseq},
                                      sort_keys=True).encode())
    key, value = body.key, body.value
    return Applied("settings", file_sha256(path), details, changed, [],
                   lambda devices: devices.setting_changed(key, value))


def _supervision_plan(ctx: Context, cmd: Command) -> Plan:
    """A supervision command against the evaluator's state, tried on a copy: its refusal
    (``document_reused``, ``gap_after_current``…) is a ``conflict``."""
    if ctx.supervision is None:
        return Plan("the supervision rules do not run on this gateway now (decommissioning)")
    tried = ctx.supervision.command_effect(cmd, dry_run=True)
    if isinstance(tried, SupervisionRefusal):
        return Plan(f"{tried.reason}: {tried.detail}"
                    + (f" (field {tried.field})" if tried.field else ""))
    return Plan()


def _supervision_apply(ctx: Context, cmd: Command, _facts: Mapping[str, JSON]) -> Applied:
    """The evaluator takes the command; its events and the state file's generation commit
    with the answer (app/supervision.py: exactly once across a crash)."""
    if ctx.supervision is None:
        raise UserError("the supervision rules do not run on this gateway now")
    done = ctx.supervision.command_effect(cmd)
    if isinstance(done, SupervisionRefusal):  # only a dry run returns one
        raise UserError(done.reason)
    return Applied(SUPERVISION_ROLE, done.sha256, done.details, done.changed, done.ledger,
                   readings=done.readings, after=done.done)


#: Each kind's effect: adding a kind is an entry here, its body validator in
#: core/commands.py (``KINDS``) and its effect functions.
EFFECTS: dict[str, Effect] = {
    "pair-tag": Effect(_tag_plan, _pair_tag),
    "unpair-tag": Effect(_tag_plan, _unpair_tag),
    "pair-kiosk": Effect(_kiosk_plan, _pair_kiosk),
    "unpair-kiosk": Effect(_kiosk_plan, _unpair_kiosk),
    "set-config": Effect(_config_plan, _set_config),
    **{kind: Effect(_supervision_plan, _supervision_apply) for kind in (
        "set-authorisation", "end-authorisation", "set-presence-rules", "approve-leave",
        "revoke-leave", "request-presence")},
}


def load_settings(data_dir: Path) -> dict[str, int]:
    """The settings the platform set (``settings.json``); empty without (or unreadable:
    logged, the defaults then hold)."""
    path = data_dir / SETTINGS_FILE
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        obj = str(exc)
    settings = obj.get("settings") if isinstance(obj, dict) else None
    if not isinstance(settings, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in settings.values()):
        log.error("%s is unreadable (%s): the default settings hold until the platform sets "
                  "them again", path, obj if isinstance(obj, str) else "not a table of "
                  "integers")
        return {}
    return {str(k): int(v) for k, v in settings.items()}


# --- the service -----------------------------------------------------------------------------

@dataclass
class CommandStats:
    received: int = 0
    applied: int = 0
    rejected: int = 0
    duplicates: int = 0  # sent again by the broker, answered before: acknowledged only
    dropped: int = 0  # over MAX_WAITING: not acknowledged (the broker sends it again)
    recovered: int = 0  # completed at a start after a crash
    suppressed: int = 0  # noise refusals not recorded (rate bound), reported later
    errors: int = 0  # the worker failed on a message (logged; not acknowledged)


@dataclass(frozen=True)
class _Arrival:
    payload: bytes
    ack: Callable[[], None]
    at_ns: int


def _kill_at(point: str) -> None:
    """The test hook: die here, as a power cut would (module docstring)."""
    if os.environ.get(KILL_ENV) == point:
        log.warning("%s=%s: killing this process now (a test's fault injection)",
                    KILL_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


class CommandService:
    """Receives, checks and applies the platform's commands (module docstring).
    :meth:`recover` at start (before the pairings are read), :meth:`announce`,
    :meth:`listen` on the uplink before it starts, then :meth:`start`; :meth:`stop`."""

    def __init__(self, identity: Identity, data_dir: Path, writer: Writer, clock: Clock, *,
                 source: Source, devices: Devices, region: str | None = None,
                 supervision: SupervisionService | None = None) -> None:
        self.identity = identity
        self.gateway_id = identity.gateway_id
        self.data_dir = data_dir
        self._writer = writer
        self._clock = clock
        self._source = source
        self._devices = devices
        self.region = region
        self._ctx = Context(identity, data_dir, writer.ledger_value, supervision)
        self._inbox: queue.Queue[_Arrival] = queue.Queue(maxsize=MAX_WAITING)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._box: BoxKey | None = None
        self._noise: list[float] = []  # when noise refusals were recorded (monotonic s)
        self.stats = CommandStats()

    @property
    def topic(self) -> str:
        return commands_topic(self.gateway_id)

    # -- at start --------------------------------------------------------------------------
    def box(self) -> BoxKey | None:
        """The gateway's encryption key (made when missing: an identity from before it)."""
        if self._box is None:
            try:
                self._box = ensure_box_key(self.identity)[0]
            except UserError as exc:
                log.error("the encryption key is unusable (%s): pair-tag and pair-kiosk "  # noqa: TRY400
                          "commands are refused until it is fixed", exc)
        return self._box

    def announce(self) -> None:
        """Seal ``key.encryption`` (the signed public document) unless this key was
        announced already: the platform encrypts device keys to it."""
        try:
            box, doc, _made = ensure_box_key(self.identity)
        except UserError as exc:
            log.error("the encryption key is unusable: %s", exc)  # noqa: TRY400
            return
        self._box = box
        value = digest_value(command_digest(box.kid.encode()))
        if self._writer.ledger_value(ANNOUNCED_KEY) == value:
            return
        self._writer.submit(Reading(BOX_KIND, self._source, doc, self._clock.now_ns(),
                                    ledger=((ANNOUNCED_KEY, value),)))
        log.info("encryption key %s announced (key.encryption)", box.kid)

    def recover(self, timeout_s: float = 30.0) -> bool:
        """Complete a command whose decision was written down before a crash (module
        docstring); True when nothing was left or it is committed now."""
        path = self.data_dir / PENDING_FILE
        try:
            pending = json.loads(path.read_bytes())
            data = str(pending["command"]).encode()
            facts = pending.get("facts") or {}
        except FileNotFoundError:
            return True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s is unreadable (%s): removed; the platform will see no answer to "  # noqa: TRY400
                      "that command and may send it again", path, exc)
            remove(path)
            return True
        last = self._writer.ledger_value(COMMAND_LAST_KEY) or 0
        try:
            cmd = reopen(data, gateway_id=self.gateway_id, box=self.box())
        except ValueError as exc:
            log.error("the pending command cannot be read again (%s): removed", exc)  # noqa: TRY400
            remove(path)
            return True
        if cmd.cseq <= last:  # answered and committed: only the file was left
            remove(path)
            return True
        log.warning("completing command %d (%s) interrupted by a stop: its effect is applied "
                    "again (idempotent) and recorded", cmd.cseq, cmd.kind)
        self.stats.recovered += 1
        return self._apply(cmd, facts, recovered=True, ack=None, timeout_s=timeout_s)

    def listen(self, uplink: Listener) -> None:
        uplink.listen(self.topic, self._arrived)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- paho's thread ---------------------------------------------------------------------
    def _arrived(self, payload: bytes, ack: Callable[[], None]) -> None:
        try:
            self._inbox.put_nowait(_Arrival(payload, ack, self._clock.now_ns()))
        except queue.Full:
            self.stats.dropped += 1  # unacknowledged: the broker sends it again

    # -- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=COMMIT_POLL_S)
            except queue.Empty:
                continue
            self.stats.received += 1
            try:
                self._handle(item)
            except Exception:  # a bug: the message stays unacknowledged, the next goes on
                self.stats.errors += 1
                log.exception("a command could not be handled (left unacknowledged)")

    def _keyring(self) -> CommandKeyring | None:
        try:
            loaded = load_keyring(self.identity.directory, region=self.region)
        except CommandKeysError as exc:
            log.error("the command keys are unusable (%s): every command is refused", exc)  # noqa: TRY400
            return None
        return None if loaded is None else loaded[0]

    def _handle(self, item: _Arrival) -> None:
        if self._writer.final_seq is not None:
            return  # decommissioned: nothing is sealed any more
        now_ms, trusted = self._clock.utc_now()
        ledger = self._writer.ledger_value
        last = ledger(COMMAND_LAST_KEY) or 0
        outcome = check_command(item.payload, gateway_id=self.gateway_id,
                                keyring=self._keyring(), region=self.region,
                                now_ms=now_ms if trusted else None,
                                floor_ms=self._clock.floor_ms(), last_cseq=last,
                                applied=lambda cseq: ledger(f"{SHA_KEY}{cseq}"),
                                box=self.box())
        if isinstance(outcome, Duplicate):
            self.stats.duplicates += 1
            log.info("command %d again (answered before): acknowledged", outcome.cseq)
            item.ack()
            return
        if isinstance(outcome, Refusal):
            self._reject(outcome, item.ack)
            return
        effect = EFFECTS.get(outcome.kind)
        if effect is None:  # a kind whose body is known here, its effect not (yet)
            self._reject(Refusal("unknown_kind", f"{outcome.kind} has no effect on this "
                                 "gateway yet", outcome.sha256, outcome.cseq, outcome.kind,
                                 outcome.kid), item.ack)
            return
        try:
            plan = effect.plan(self._ctx, outcome)
        except (OSError, UserError) as exc:
            self._reject(self._failed(outcome, exc), item.ack)
            return
        if plan.conflict is not None:
            self._reject(Refusal("conflict", plan.conflict, outcome.sha256, outcome.cseq,
                                 outcome.kind, outcome.kid), item.ack)
            return
        atomic_write(self.data_dir / PENDING_FILE, json.dumps({
            "format": 1, "cseq": outcome.cseq, "sha256": outcome.sha256,
            "command": outcome.data.decode(), "facts": plan.facts}).encode())
        _kill_at("pending")
        self._apply(outcome, plan.facts, recovered=False, ack=item.ack,
                    received_ns=item.at_ns)

    def _failed(self, cmd: Command, exc: BaseException) -> Refusal:
        log.error("command %d (%s) could not be applied: %s", cmd.cseq, cmd.kind, exc)
        return Refusal("failed", f"could not be applied: {str(exc)[:200]}", cmd.sha256,
                       cmd.cseq, cmd.kind, cmd.kid)

    def _apply(self, cmd: Command, facts: Mapping[str, JSON], *, recovered: bool,
               ack: Callable[[], None] | None, received_ns: int | None = None,
               timeout_s: float | None = None) -> bool:
        pending = self.data_dir / PENDING_FILE
        try:
            done = EFFECTS[cmd.kind].apply(self._ctx, cmd, facts)
        except (OSError, UserError, ValueError) as exc:
            ok = self._reject(self._failed(cmd, exc), ack, timeout_s=timeout_s)
            if ok:
                remove(pending)
            return ok
        if not recovered:
            _kill_at("effect")
        body: dict[str, JSON] = {
            "cseq": cmd.cseq, "kind": cmd.kind, "kid": cmd.kid, "command_sha256": cmd.sha256,
            "issued_at_ms": cmd.issued_at_ms, "changed": done.changed,
            "state": {"of": done.role, "sha256": done.sha256},
            "details": done.details, "recovered": recovered}
        if received_ns is not None:
            body["answer_ms"] = (self._clock.now_ns() - received_ns) // 1_000_000
        ledger = [(COMMAND_LAST_KEY, cmd.cseq), (f"{SHA_KEY}{cmd.cseq}",
                                                 digest_value(cmd.sha256)),
                  (COMMAND_TOUCHED_KEY + done.role, cmd.cseq), *done.ledger]
        reading = Reading(APPLIED_KIND, self._source, body, self._clock.now_ns(),
                          ledger=tuple(ledger))
        try:
            committed = self._commit(reading, cmd.cseq, timeout_s, done.readings)
        finally:
            if done.after is not None:
                done.after()  # e.g. the supervision state promoted, its lock released
        if not committed:
            return False  # stopping: the pending file completes it at the next start
        self.stats.applied += 1
        log.info("command %d (%s) applied%s", cmd.cseq, cmd.kind,
                 " (recovered)" if recovered else "")
        if done.live is not None:
            try:
                done.live(self._devices)
            except Exception:
                log.exception("command %d: the live change failed (it takes effect at the "
                              "next start)", cmd.cseq)
        remove(pending)
        if ack is not None:
            ack()
        return True

    def _reject(self, refusal: Refusal, ack: Callable[[], None] | None, *,
                timeout_s: float | None = None) -> bool:
        """A ``command.rejected`` record (rate-bounded for noise), committed before the
        acknowledgement; True once committed (or suppressed)."""
        self.stats.rejected += 1
        if not refusal.consumes and not self._noise_allowed():
            self.stats.suppressed += 1  # neither recorded nor logged: counted
            if ack is not None:
                ack()
            return True
        log.warning("command %s (%s) refused: %s: %s", refusal.cseq, refusal.kind,
                    refusal.reason, refusal.detail)
        body: dict[str, JSON] = {
            "cseq": refusal.cseq, "kind": refusal.kind, "kid": refusal.kid,
            "reason": refusal.reason, "detail": refusal.detail[:DETAIL_CHARS],
            "command_sha256": refusal.sha256, "field": refusal.field,
            "expected_cseq": refusal.expected_cseq, "consumed": refusal.consumes,
            "suppressed": self.stats.suppressed}
        ledger: tuple[tuple[str, int], ...] = ()
        if refusal.consumes and refusal.cseq is not None:
            ledger = ((COMMAND_LAST_KEY, refusal.cseq),
                      (f"{SHA_KEY}{refusal.cseq}", digest_value(refusal.sha256)))
        reading = Reading(REJECTED_KIND, self._source, body, self._clock.now_ns(),
                          ledger=ledger)
        if not self._commit(reading, refusal.cseq if refusal.consumes else None, timeout_s):
            return False
        self.stats.suppressed = 0
        if ack is not None:
            ack()
        return True

    def _noise_allowed(self) -> bool:
        now = time.monotonic()
        self._noise = [t for t in self._noise if now - t < NOISE_WINDOW_S]
        if len(self._noise) >= NOISE_RECORDS:
            return False
        self._noise.append(now)
        return True

    def _commit(self, reading: Reading, cseq: int | None, timeout_s: float | None,
                more: list[Reading] | None = None) -> bool:
        """Submit *reading* and *more* (with the old digest of the history forgotten in the
        same transaction) and wait until it is committed; False when stopping first."""
        done = threading.Event()
        forget = (f"{SHA_KEY}{cseq - HISTORY}",) if cseq is not None and cseq > HISTORY \
            else ()
        self._writer.forget(forget, reading, lambda _rec: done.set(), more=tuple(more or ()))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done.wait(COMMIT_POLL_S):
            if self._stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                log.warning("stopping before a command's record was committed: it is "
                            "answered at the next start")
                return False
        return True

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {"last_cseq": self._writer.ledger_value(COMMAND_LAST_KEY) or 0,
                "received": s.received, "applied": s.applied, "rejected": s.rejected,
                "duplicates": s.duplicates, "dropped": s.dropped, "recovered": s.recovered,
                "errors": s.errors, "waiting": self._inbox.qsize()}
