"""The supervision rules running in the gateway (docs/supervision.md, docs/commands.md).

One thread owns :class:`core.supervision.Supervision` (the sans-IO evaluator). It is fed:

* by the tag receivers (port threads) through :meth:`SupervisionService.presence`, a
  non-blocking call that also decides whether a tag's presence may be recorded at all:
  a tag the platform gave an authorisation (in force or not) has its ``tag.presence``,
  ``tag.present`` and ``tag.absent`` recorded only inside its authorised period (Art. 29
  para. 3); outside it they are counted (``gateway.health`` ``supervision.ignored``) and
  dropped. A tag never given an authorisation is treated the same way when the
  configuration requires one (``[supervision] require_authorisation``, the default: a
  pairing alone authorises nothing); with ``require_authorisation = false`` (a lab, a
  bench) it is recorded as before;
* by the clock: :meth:`tick` once a second, and each ``time.step`` record
  (:meth:`clock_stepped`, from the health loop);
* by the platform's commands (``app/commands.py``): :meth:`command_effect`.

**Exactly once.** The evaluator's state (``to_json()``) lives in ``data_dir/supervision.json``
with a generation number ``gen``; the store's ledger holds ``supervision:gen``, the
generation whose events are committed. To persist events, the new state is written to
``supervision.next.json`` (gen + 1, fsynced), the events are committed with
``supervision:gen`` = gen + 1 in one store transaction, then the next file replaces the
state file. At start, the next file is taken when its gen is the ledger's (the commit
happened, the rename did not), else dropped (its events were never committed: the
evaluator, from the state before, fires them again). So each event is one record. A
command's events commit in the transaction of its ``command.applied`` (whose ``state``
is ``supervision`` and the state's SHA-256), the same way, with the command's cseq in the
state file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.commands import Command
from core.durable import atomic_write, fsync_dir, remove
from core.errors import UserError
from core.record import JSON, Reading, SealedRecord, Source
from core.supervision import (
    Applied,
    Authorisation,
    EndAuthorisation,
    Event,
    Leave,
    PresenceRules,
    Refusal,
    RequestPresence,
    RevokeLeave,
    Supervision,
    SupervisionStateError,
)

log = logging.getLogger(__name__)

STATE_FILE = "supervision.json"
NEXT_FILE = "supervision.next.json"
#: The ledger key of the generation whose events are committed.
GEN_KEY = "supervision:gen"
#: What the ``command.applied`` record's ``state.of`` says.
ROLE = "supervision"
TICK_S = 1.0
#: How often the thread looks at the presence queue, seconds.
POLL_S = 0.2
#: Presence decisions waiting for the thread, at most; beyond, dropped and counted (a
#: tag's next beacon says it again).
MAX_WAITING = 1024
#: How long a commit may take before the thread looks whether it is stopping, s.
COMMIT_POLL_S = 0.5
PRESENCE_NOW = "presence.now"
SEEN, PRESENT, ABSENT, BEACON = "seen", "present", "absent", "beacon"


class Writer(Protocol):
    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None) -> None: ...
    def ledger_value(self, key: str) -> int | None: ...


class Clock(Protocol):
    def utc_now(self) -> tuple[int, bool]: ...
    def now_ns(self) -> int: ...


@dataclass
class SupervisionStats:
    #: presence records not written, by kind: outside the tag's authorised period
    ignored: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # presence decisions over MAX_WAITING
    commits: int = 0
    state_errors: int = 0


@dataclass(frozen=True)
class Effect:
    """What a command did to the evaluator: the records to commit with its answer, the
    ledger entry, the state's hash, and :attr:`done` to call once committed."""

    readings: list[Reading]
    ledger: list[tuple[str, int]]
    sha256: str
    changed: bool
    details: dict[str, JSON]
    done: Callable[[], None]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class SupervisionService:
    """The evaluator's thread (module docstring). :meth:`resume` once the writer runs and
    before the commands are recovered, then :meth:`start`; :meth:`stop`."""

    def __init__(self, data_dir: Path, writer: Writer, clock: Clock, *,
                 source: Source, require_authorisation: bool = True) -> None:
        self.data_dir = data_dir
        #: a tag never given an authorisation is not recorded either (module docstring)
        self.require_authorisation = require_authorisation
        self._writer = writer
        self._clock = clock
        self._source = source
        self._lock = threading.Lock()  # the evaluator, its files and gen
        self._inbox: queue.Queue[tuple[str, str, int, int | None]] = queue.Queue(MAX_WAITING)
        self._steps: queue.Queue[tuple[int, int, bool]] = queue.Queue(64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervision", daemon=True)
        self.stats = SupervisionStats()
        #: tags the platform gave an authorisation, and those authorised now: replaced
        #: whole (read by port threads without a lock)
        self._gated: frozenset[str] = frozenset()
        self._authorised: frozenset[str] = frozenset()
        self.sup, self.gen = self._load()

    # -- the state file ---------------------------------------------------------------------
    def _read(self, path: Path) -> tuple[int, Supervision] | None:
        try:
            doc = json.loads(path.read_bytes())
            return int(doc["gen"]), Supervision.from_json(doc["state"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, SupervisionStateError) as exc:
            self.stats.state_errors += 1
            log.error("%s is unreadable (%s): set aside; the platform must send the "  # noqa: TRY400
                      "authorisations, rules and leaves again", path, exc)
            path.replace(path.with_name(path.name + ".bad"))
            return None

    def _load(self) -> tuple[Supervision, int]:
        committed = self._writer.ledger_value(GEN_KEY) or 0
        nxt = self._read(self.data_dir / NEXT_FILE)
        if nxt is not None and nxt[0] == committed:
            (self.data_dir / NEXT_FILE).replace(self.data_dir / STATE_FILE)
            fsync_dir(self.data_dir)
            return nxt[1], nxt[0]
        if nxt is not None:
            remove(self.data_dir / NEXT_FILE)  # its events were never committed
        cur = self._read(self.data_dir / STATE_FILE)
        if cur is None:
            return Supervision(), committed
        if cur[0] != committed:
            log.error("%s is of generation %d, the store committed %d: it is used as it is",
                      STATE_FILE, cur[0], committed)
        return cur[1], committed

    def _write_next(self, cseq: int | None) -> str:
        text = self.sup.to_json()
        atomic_write(self.data_dir / NEXT_FILE, json.dumps(
            {"format": 1, "gen": self.gen + 1, "cseq": cseq, "state": text},
            sort_keys=True).encode())
        return text

    def _promote(self) -> None:
        (self.data_dir / NEXT_FILE).replace(self.data_dir / STATE_FILE)
        fsync_dir(self.data_dir)
        self.gen += 1
        self.stats.commits += 1

    def _readings(self, events: list[Event] | tuple[Event, ...]) -> list[Reading]:
        now = self._clock.now_ns()
        for e in events:
            self.stats.events[e.kind] += 1
        return [Reading(e.kind, self._source, e.body, now) for e in events]

    def _persist(self, events: list[Event]) -> bool:
        """Commit *events* with the state (the lock held); False when stopping first (the
        events fire again at the next start)."""
        self._write_next(None)
        readings = self._readings(events)
        last = readings[-1]
        readings[-1] = Reading(last.kind, last.source, last.body, last.mono_ns,
                               ledger=((GEN_KEY, self.gen + 1),))
        done = threading.Event()
        self._writer.submit_all(readings, lambda _rec: done.set())
        while not done.wait(COMMIT_POLL_S):
            if self._stop.is_set():
                return False
        self._promote()
        return True

    # -- at start ----------------------------------------------------------------------------
    def resume(self) -> None:
        now, trusted = self._clock.utc_now()
        with self._lock:
            events = self.sup.resume(now) + self.sup.tick(now, trusted)
            if events:
                self._persist(events)
            self._refresh(now)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the tag receivers' threads ----------------------------------------------------------
    def presence(self, tag: str, event: str, mono_ns: int, rssi_dbm: int | None) -> bool:
        """The tag receiver's decision on *tag* (:data:`SEEN` a beacon while present,
        :data:`PRESENT`, :data:`ABSENT`, :data:`BEACON` a beacon while still held absent);
        whether its record may be written. Never blocks."""
        if (self.require_authorisation or tag in self._gated) \
                and tag not in self._authorised:
            self.stats.ignored[{PRESENT: "tag.present", ABSENT: "tag.absent"}.get(
                event, "tag.presence")] += 1
            return False
        if event == BEACON:
            return True  # heard, still held absent: nothing for the evaluator yet
        try:
            self._inbox.put_nowait((event, tag, mono_ns, rssi_dbm))
        except queue.Full:
            self.stats.dropped += 1
        return True

    def clock_stepped(self, steps: list[Reading]) -> None:
        """``time.step`` records the health loop made: the evaluator is told."""
        for step in steps:
            body = step.body
            old, new = body.get("from_utc_ms"), body.get("to_utc_ms")
            if isinstance(old, int) and isinstance(new, int):
                try:
                    self._steps.put_nowait((old, new, body.get("to") in ("ntp", "gnss")))
                except queue.Full:
                    self.stats.dropped += 1

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.wait(POLL_S):
            try:
                if not self._lock.acquire(timeout=COMMIT_POLL_S):
                    continue  # a command is being committed
                try:
                    self._step(time.monotonic() >= next_tick)
                finally:
                    self._lock.release()
            except Exception:  # a bug: logged; the next round goes on
                log.exception("supervision: evaluation failed")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S

    def _step(self, tick: bool) -> None:
        events: list[Event] = []
        now_ns = self._clock.now_ns()
        now, trusted = self._clock.utc_now()
        while True:
            try:
                old, new, step_trusted = self._steps.get_nowait()
            except queue.Empty:
                break
            events += self.sup.time_step(old, new, step_trusted)
        while True:
            try:
                kind, tag, mono_ns, rssi = self._inbox.get_nowait()
            except queue.Empty:
                break
            at = now - max(0, now_ns - mono_ns) // 1_000_000
            events += (self.sup.tag_absent(tag, at) if kind == ABSENT
                       else self.sup.tag_seen(tag, at, rssi))
        if tick:
            events += self.sup.tick(now, trusted)
        if events:
            self._persist(events)
        if tick:
            self._refresh(now)

    def _refresh(self, now: int) -> None:
        gated, authorised = set(), set()
        for tag in self.sup.tags():
            if self.sup.presence_now(tag, now)["authorisation"] is not None:
                gated.add(tag)
            if self.sup.authorised(tag, now):
                authorised.add(tag)
        self._gated, self._authorised = frozenset(gated), frozenset(authorised)

    # -- the platform's commands (app/commands.py, on the commands thread) ----------------
    def command_effect(self, cmd: Command, *, dry_run: bool = False) -> Effect | Refusal:
        """Apply *cmd* (a supervision kind) to the evaluator. *dry_run*: on a copy, to know
        whether its state refuses it. Otherwise the lock stays held until the returned
        :attr:`Effect.done` (called once its records are committed): nothing else changes
        the evaluator meanwhile."""
        if dry_run:
            with self._lock:
                copy = Supervision.from_json(self.sup.to_json())
                now, trusted = self._clock.utc_now()
                copy.tick(now, trusted)
                result = _apply(copy, cmd.body, now)
                return result if isinstance(result, Refusal) else \
                    Effect([], [], "", False, {}, lambda: None)
        self._lock.acquire()
        try:
            now, trusted = self._clock.utc_now()
            events = self.sup.tick(now, trusted)
            result = _apply(self.sup, cmd.body, now)
            if isinstance(result, Refusal):
                raise UserError(f"{result.reason}: {result.detail}")  # noqa: TRY301
            events += result.events
            extra: list[Reading] = []
            if isinstance(cmd.body, RequestPresence):
                answer = self.sup.presence_now(cmd.body.tag, now)
                answer.update(cseq=cmd.cseq, command_sha256=cmd.sha256)
                extra.append(Reading(PRESENCE_NOW, self._source, answer, self._clock.now_ns()))
            text = self._write_next(cmd.cseq)
            readings = self._readings(events) + extra
            self.stats.events[PRESENCE_NOW] += len(extra)
            details: dict[str, JSON] = {"tag": cmd.body.tag,
                                        "events": [e.kind for e in events]}

            def done() -> None:
                try:
                    self._promote()
                    self._refresh(now)
                finally:
                    self._lock.release()

            return Effect(readings, [(GEN_KEY, self.gen + 1)], _sha(text),
                          bool(result.changed), details, done)
        except BaseException:
            self._lock.release()
            raise

    def forget(self, tag: str) -> None:
        """*tag* was unpaired: its rules go (kept in the state at the next commit)."""
        with self._lock:
            self.sup.forget(tag)

    def status(self) -> dict[str, JSON]:
        s = self.stats
        return {"tags": len(self.sup.tags()), "authorised": len(self._authorised),
                "require_authorisation": self.require_authorisation,
                "gen": self.gen, "ignored": dict(s.ignored), "events": dict(s.events),
                "dropped": s.dropped, "state_errors": s.state_errors}


def authorised_tags(data_dir: Path, now_ms: int) -> frozenset[str] | None:
    """The tags whose monitoring is authorised at *now_ms* by the saved state (the state
    file the daemon keeps, read without it: ``provision check``); None when there is no
    readable state (nothing was ever authorised, or the file is damaged)."""
    try:
        doc = json.loads((data_dir / STATE_FILE).read_bytes())
        sup = Supervision.from_json(doc["state"])
    except (OSError, ValueError, KeyError, TypeError, SupervisionStateError):
        return None
    return frozenset(t for t in sup.tags() if sup.authorised(t, now_ms))


Body = Authorisation | EndAuthorisation | PresenceRules | Leave | RevokeLeave | RequestPresence
_METHODS: Mapping[type, str] = {
    Authorisation: "set_authorisation", EndAuthorisation: "end_authorisation",
    PresenceRules: "set_presence_rules", Leave: "approve_leave", RevokeLeave: "revoke_leave",
}


def _apply(sup: Supervision, body: Any, now: int) -> Applied | Refusal:
    if isinstance(body, RequestPresence):
        return Applied((), changed=False)
    method: Callable[[Any, int], Applied | Refusal] = getattr(sup, _METHODS[type(body)])
    return method(body, now)
