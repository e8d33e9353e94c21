"""Detect that another client took this gateway's MQTT session (sans-IO).

A second client that connects with our client id makes the broker drop us. A
broker that binds the client id to the certificate's CN (docs/broker.md) leaves
only a clone of this gateway's own certificate able to do it; a broker that
does not bind it lets any valid certificate do it. Either way we want a trace:
an alarm-class ``uplink.takeover`` record, counted by the platform.

Two signs, both fed in by the forwarder's thread with the time:

- the broker's DISCONNECT says *session taken over* (MQTT v5 reason 0x8E): a
  takeover, for certain (EMQX sends it; mosquitto 2.0.11 over TLS closes the
  socket without it);
- repeated **session loss**: the uplink resumes its session on every connect
  (never ``clean_start``, a session expiry interval: the session holds the commands
  queued for the gateway); when the broker, reached again before that interval ran out, says
  it has no session for us, someone else started a clean one under our id. A
  broker restart without persistence or a cluster node lost without session
  replication does that once, too: :data:`SESSION_LOSSES_FOR_ALARM` losses within
  :data:`SESSION_LOSS_WINDOW_NS` make an alarm, not one.

An ordinary network drop, or a broker restart that keeps its sessions, shows
neither sign. Reports are at most one per :data:`REPORT_INTERVAL_NS` (a client
fighting us for the id could otherwise make us write an alarm every second);
what happened meanwhile is added up into the next report. Only counters and
a few instants are kept: the state is bounded whatever the broker does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: MQTT v5 DISCONNECT reason code "Session taken over".
SESSION_TAKEN_OVER = 0x8E
#: Session losses (the broker had no session for us) that make an alarm ...
SESSION_LOSSES_FOR_ALARM = 2
#: ... when they fall within this span, nanoseconds (one hour).
SESSION_LOSS_WINDOW_NS = 3600 * 1_000_000_000
#: At most one report in this span, nanoseconds (one minute).
REPORT_INTERVAL_NS = 60 * 1_000_000_000
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Takeover:
    """What to report: *taken_over* DISCONNECTs saying 0x8E, *sessions_lost* session
    losses (counted once :data:`SESSION_LOSSES_FOR_ALARM` of them came close together)."""

    taken_over: int
    sessions_lost: int


class TakeoverWatch:
    """One per uplink; it outlives reconnects (not restarts of the process)."""

    def __init__(self, *, losses_for_alarm: int = SESSION_LOSSES_FOR_ALARM,
                 loss_window_ns: int = SESSION_LOSS_WINDOW_NS,
                 report_interval_ns: int = REPORT_INTERVAL_NS) -> None:
        if losses_for_alarm < 1:
            raise ValueError(f"losses_for_alarm must be at least 1, not {losses_for_alarm}")
        self._loss_window_ns = loss_window_ns
        self._report_interval_ns = report_interval_ns
        self._losses: deque[int] = deque(maxlen=losses_for_alarm)  # instants, ns
        self._connected_before = False
        self._lost_at: int | None = None  # when the last connection went down
        self._last_report: int | None = None
        self._taken_over = 0  # not yet reported
        self._sessions_lost = 0  # not yet reported
        #: Every session loss seen (alarm or not); for the uplink's statistics.
        self.losses_seen = 0

    def disconnected(self, reason_code: int | None, now_ns: int) -> bool:
        """The connection went down; *reason_code* is the broker's DISCONNECT reason, or
        None when the socket just closed. Returns whether it says *session taken over*."""
        self._lost_at = now_ns
        if reason_code == SESSION_TAKEN_OVER:
            self._taken_over += 1
            return True
        return False

    def connected(self, *, session_present: bool, session_expiry_s: int, now_ns: int) -> bool:
        """The broker accepted a connection; returns whether our session was lost."""
        first = not self._connected_before
        self._connected_before = True
        if first or session_present or self._lost_at is None:
            return False  # the first connect of the process: nothing to compare with
        if now_ns - self._lost_at >= session_expiry_s * _NS_PER_S:
            return False  # away longer than the session lives: expired, as agreed
        self.losses_seen += 1
        self._losses.append(now_ns)
        if (len(self._losses) == self._losses.maxlen
                and now_ns - self._losses[0] <= self._loss_window_ns):
            self._sessions_lost += len(self._losses)
            self._losses.clear()
        return True

    def report(self, now_ns: int) -> Takeover | None:
        """A takeover to write down now, if any is pending and the last report is old
        enough; what it reports is then forgotten here."""
        if not (self._taken_over or self._sessions_lost):
            return None
        if (self._last_report is not None
                and now_ns - self._last_report < self._report_interval_ns):
            return None
        out = Takeover(self._taken_over, self._sessions_lost)
        self._taken_over = self._sessions_lost = 0
        self._last_report = now_ns
        return out
