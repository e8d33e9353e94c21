"""``provision decommission``: the gateway's final record delivered, then its keys destroyed.

The final record, ``gateway.decommissioned`` (alarm class: it goes out first), is the
decommission's journal entry sealed as the chain's last record: the store writer seals
nothing after it, at this start or any later one (``StoreWriter.submit_final``). The
keys are destroyed (:mod:`provisioning.decommission`) only once the broker acknowledged
it **and every record before it** (the store holds nothing at or below its seq), or with
``--force``. Otherwise the command exits 1 and the keys stay.

One writer per store, so who seals the final record depends on whether the daemon runs
(it holds ``data_dir/gateway.lock``):

* **the daemon runs**: the command writes the decommission down in the action journal;
  the daemon looks at the journal twice a second, seals the final record, stops reading
  devices, keeps forwarding, and exits with status 3 (the systemd unit does not restart
  it) once everything is delivered. The command watches the store read-only and the
  lock; once the daemon is gone it takes the lock and destroys the keys.
* **it does not**: the command takes the lock and runs the uplink itself, the product's
  own :class:`app.assembly.Pipeline` without any device port: ``key.session``,
  ``gateway.boot``, the journal's pending entries, the final record; it forwards until
  they are delivered, then destroys the keys. We chose this over telling the installer
  to start the daemon: at a decommission the devices are often unplugged already and
  the daemon would open their ports, record their loss and, if a tag still beacons,
  keep recording a person who is no longer supervised here; the uplink alone is all
  the final record needs, and the command can say, while it waits, how far delivery is.

A gateway whose final record was sealed but not delivered (the command timed out) seals
nothing more: a daemon started on it forwards what is left and exits with status 3; the
command run again waits for the delivery (it writes nothing more down) and destroys.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.actions import LocalActions
from app.assembly import VERSION, Pipeline
from app.config import Config
from app.daemon import LOCK_FILE, DataDirInUseError, lock_data_dir, prepare_data_dir
from buffer.store import Undelivered, default_quota, store_path, undelivered
from buffer.writer import FINAL_LEDGER_KEY
from core.clock import Clock
from core.errors import UserError
from core.record import Source
from provisioning.actions import record
from provisioning.decommission import (
    DEFAULT_TIMEOUT_S,
    DESTROYING,
    Destroyed,
    DestroyError,
    check_not_decommissioned,
    destroy,
    read_tombstone,
)
from provisioning.identity import Identity, load_identity
from provisioning.operator import Operator

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: How often the store and the lock are looked at while waiting (s).
POLL_S = 0.2
#: A progress line at least this often while nothing changes (s).
PROGRESS_EVERY_S = 10.0
ACTION = "decommission"


class DecommissionError(UserError):
    """The decommission cannot start: the message says why and what to do."""


@dataclass(frozen=True)
class Request:
    timeout_s: float = DEFAULT_TIMEOUT_S
    force: bool = False
    clear_tpm: bool = True


@dataclass(frozen=True)
class Summary:
    """What the confirmation shows."""

    gateway_id: str
    kid: str | None
    key_class: str | None
    queued: int | None  # records not yet delivered (None: no store)
    daemon: bool


Confirm = Callable[[Summary], None]
Progress = Callable[[str], None]


def check_timeout(value: float) -> float:
    if not 0 < value <= MAX_TIMEOUT_S:  # nan too
        raise DecommissionError(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S:g}"
                                f" seconds, got {value:g}")
    return value


def decommission(cfg: Config, operator: Operator, request: Request, *, confirm: Confirm,
                 progress: Progress) -> tuple[int, dict[str, Any]]:
    """Decommission the gateway of *cfg* (module docstring): the exit status (0: the keys
    are destroyed; 1: they are kept, ``error`` says why) and the report."""
    check_timeout(request.timeout_s)
    directory = cfg.identity_path
    tomb = read_tombstone(directory)
    if tomb is not None and tomb["state"] == DESTROYING:
        return _resume(cfg, tomb, request, confirm)
    try:
        check_not_decommissioned(directory)
    except UserError as exc:
        raise DecommissionError(f"nothing to decommission: {exc}") from None
    prepare_data_dir(cfg)
    identity = load_identity(directory)
    lock: int | None = None
    try:
        store = store_path(cfg.data_dir)
        before = undelivered(store, ledger_key=FINAL_LEDGER_KEY) if store.exists() else None
        lock, holder = _try_lock(cfg.data_dir)
        confirm(Summary(identity.gateway_id, identity.kid, identity.key_class,
                        None if before is None else before.count, lock is None))
        if before is None or before.ledger is None:  # written down before anything changes
            record(identity, ACTION, {"gateway_id": identity.gateway_id, "kid": identity.kid,
                                      "timeout_s": int(request.timeout_s),
                                      "force": request.force,
                                      "clear_tpm": request.clear_tpm}, operator)
        deadline = time.monotonic() + request.timeout_s
        report: dict[str, Any] = {"gateway_id": identity.gateway_id, "daemon": lock is None,
                                  "forced": False, "destroyed": False, "tpm": None,
                                  "files": [], "error": None}
        if lock is None:
            progress(f"the gateway daemon ({holder}) runs: it seals the final record within "
                     "a second, forwards, and stops once everything is delivered")
            state = _wait_delivery(store, deadline, progress, daemon=True)
            lock = _wait_lock(cfg.data_dir, deadline, progress) if _delivered(state) else None
        else:
            state = _forward(cfg, identity, store, deadline, progress)
        _describe(report, state)
        if not _delivered(state) and not request.force:
            report["error"] = _not_delivered(state, request.timeout_s) + (
                "; meanwhile the gateway daemon keeps forwarding and stops once everything is "
                "delivered" if lock is None else "")
            return 1, report
        if lock is None:
            report["error"] = (
                ("nothing was destroyed: the gateway daemon still holds the data directory "
                 "(with --force, stop it first: systemctl stop smartcorr-gateway)")
                if request.force else
                "everything is delivered, but the gateway daemon did not stop: stop it "
                "(systemctl stop smartcorr-gateway) and run 'provision decommission' again; "
                "the keys are kept")
            return 1, report
        report["forced"] = not _delivered(state)
        facts = {"gateway_id": identity.gateway_id, "kid": identity.kid,
                 "key_class": identity.key_class, "storage_class": identity.storage_class,
                 "tpm": identity.keys.tcti, "final_seq": report["final_seq"],
                 "platform_told": report["platform_told"],
                 "undelivered": report["undelivered"], "forced": report["forced"]}
        return _destroy(cfg, report, facts, identity, request)
    finally:
        identity.close()
        if lock is not None:
            os.close(lock)  # releases the data directory


def _destroy(cfg: Config, report: dict[str, Any], facts: dict[str, Any],
             identity: Identity | None, request: Request) -> tuple[int, dict[str, Any]]:
    try:
        outside = () if cfg.broker.key_file is None else (Path(cfg.broker.key_file),)
        done: Destroyed = destroy(cfg.identity_path, cfg.data_dir, facts, identity=identity,
                                  clear_tpm=request.clear_tpm, outside=outside)
    except DestroyError as exc:  # half done: the tombstone says so, a second run finishes
        report["error"] = str(exc)
        return 1, report
    except UserError as exc:  # the TPM refused to clear: nothing destroyed
        report["error"] = (f"{exc}; nothing was destroyed. Or give --keep-tpm: the key files "
                           "are then deleted, but a copy of them made before still loads in "
                           "this TPM")
        return 1, report
    report.update(destroyed=True, tpm=done.tpm, files=done.files)
    return 0, report


def _resume(cfg: Config, tomb: dict[str, Any], request: Request,
            confirm: Confirm) -> tuple[int, dict[str, Any]]:
    """Finish a destruction a power cut interrupted (the tombstone says ``destroying``)."""
    lock, holder = _try_lock(cfg.data_dir)
    if lock is None:
        raise DecommissionError(f"data_dir {cfg.data_dir} is in use by {holder}: stop it, "
                                "then run 'provision decommission' again")
    try:
        confirm(Summary(str(tomb.get("gateway_id")), tomb.get("kid"), tomb.get("key_class"),
                        None, False))
        report: dict[str, Any] = {
            "gateway_id": tomb.get("gateway_id"), "daemon": False, "resumed": True,
            "final_seq": tomb.get("final_seq"), "platform_told": tomb.get("platform_told"),
            "delivered": not tomb.get("forced"), "undelivered": tomb.get("undelivered"),
            "forced": tomb.get("forced"), "destroyed": False, "tpm": None, "files": [],
            "error": None}
        return _destroy(cfg, report, {}, None, request)
    finally:
        os.close(lock)


def _try_lock(data_dir: Path) -> tuple[int | None, str]:
    """The data directory's lock (its fd), or None and who holds it (the daemon)."""
    try:
        return lock_data_dir(data_dir), ""
    except DataDirInUseError:
        try:
            pid = (data_dir / LOCK_FILE).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            pid = ""
        return None, f"process {pid}" if pid.isdigit() else "another process"


def _wait_lock(data_dir: Path, deadline: float, progress: Progress) -> int | None:
    """The lock, once the daemon released it (it exits once everything is delivered)."""
    said = False
    while True:
        lock, _ = _try_lock(data_dir)
        if lock is not None or time.monotonic() >= deadline:
            return lock
        if not said:
            progress("everything is delivered: waiting for the gateway daemon to stop")
            said = True
        threading.Event().wait(POLL_S)


def _forward(cfg: Config, identity: Identity, store: Path, deadline: float,
             progress: Progress) -> Undelivered | None:
    """The daemon does not run: the uplink alone (no device port), until delivered."""
    clock = Clock()
    source = Source("gateway", identity.gateway_id, VERSION)
    quota = cfg.quota_bytes or default_quota(cfg.data_dir)
    pipeline = Pipeline(cfg.data_dir, identity, cfg.broker, clock=clock, source=source,
                        quota_bytes=quota)
    try:
        if pipeline.writer.final_seq is None:
            pipeline.start()
            actions = LocalActions(pipeline.writer, identity, cfg.source, source,
                                   clock.now_ns)
            actions.start()  # the journal's entries, the decommission last
            while not actions.final and time.monotonic() < deadline:
                threading.Event().wait(POLL_S)  # the journal was busy (a command writing)
                actions.poll()
        else:
            progress("the final record is already sealed: forwarding what is left")
            pipeline.start_forwarding()
        pipeline.writer.flush()
        return _wait_delivery(store, deadline, progress, daemon=False)
    finally:
        pipeline.stop(drain_s=0)


def _wait_delivery(store: Path, deadline: float, progress: Progress, *,
                   daemon: bool) -> Undelivered | None:
    """Watch the store (read-only) until the final record and everything before it left
    it, or the deadline; the last state seen (None: no final record yet)."""
    said, said_at = "", 0.0
    state: Undelivered | None = None
    while True:
        if store.exists():
            seen = undelivered(store, ledger_key=FINAL_LEDGER_KEY)
            state = seen if seen.ledger is None else \
                undelivered(store, seen.ledger, ledger_key=FINAL_LEDGER_KEY)
        if _delivered(state) or time.monotonic() >= deadline:
            return state
        if state is None or state.ledger is None:
            text = ("waiting for the gateway daemon to seal the final record (it reads the "
                    "action journal twice a second)" if daemon else
                    "sealing the final record")
        else:
            classes = ", ".join(f"{n} {label}" for label, n in sorted(state.by_class.items()))
            text = (f"{state.count} record(s) to deliver, the final one (seq {state.ledger}) "
                    f"{'still queued' if state.ledger_queued else 'delivered'} ({classes})")
        now = time.monotonic()
        if text != said or now - said_at >= PROGRESS_EVERY_S:  # a change, or now and then
            progress(f"{text}; {max(0, int(deadline - now))} s left")
            said, said_at = text, now
        threading.Event().wait(POLL_S)


def _delivered(state: Undelivered | None) -> bool:
    return state is not None and state.ledger is not None and state.count == 0


def _describe(report: dict[str, Any], state: Undelivered | None) -> None:
    final = None if state is None else state.ledger
    report.update(final_seq=final, delivered=_delivered(state),
                  platform_told=final is not None and state is not None
                  and state.ledger_queued is False,
                  undelivered=0 if state is None else state.count,
                  undelivered_by_class={} if state is None else state.by_class)


def _not_delivered(state: Undelivered | None, timeout_s: float) -> str:
    if state is None or state.ledger is None:
        what = "the final record was not sealed"
    elif state.ledger_queued:
        what = (f"the broker did not acknowledge the final record (seq {state.ledger}); "
                f"{state.count} record(s) wait")
    else:
        what = (f"the final record was delivered, but {state.count} record(s) before it were "
                "not")
    return (f"not delivered within {timeout_s:g} s: {what}. The keys are kept. Check the "
            "uplink (broker address, network, certificate: 'diag buffer', the daemon's log) "
            "and run 'provision decommission' again, or give --force to destroy the keys "
            "anyway (what was not delivered is lost, and the platform is not told if the "
            "final record was not delivered)")
