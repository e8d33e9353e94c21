# ruff: noqa: RUF001 - the law's words are quoted with their full-width punctuation
"""The supervision rules as a sans-IO core: authorisation periods, presence windows, leave
(issue 14 items 3 and 4; the specification is docs/supervision.md).

Three kinds of facts come from the platform, each as the body of a signed command
(``set-authorisation`` / ``end-authorisation``, ``set-presence-rules``, ``approve-leave`` /
``revoke-leave``, ``request-presence``), checked here by a ``parse_*`` function that returns
the value or a :class:`Refusal` naming the reason and the field:

* an :class:`Authorisation` (Community Corrections Law of the PRC, Art. 29): the legal case
  (:class:`LegalBasis`), the decision's document number, the approver, and a period of
  dates in the person's zone, at most :data:`AUTHORISATION_MONTHS` calendar months long;
* the :class:`PresenceRules` of a tag: weekly windows in which the person must be home, in
  an IANA zone, dated exceptions and grace minutes;
* a :class:`Leave`: approved absence between two instants, which suspends the rules.

:class:`Supervision` is the evaluator: a state machine fed with the time (:meth:`~Supervision.
tick`, :meth:`~Supervision.time_step`, :meth:`~Supervision.resume`), the tags' presence
(:meth:`~Supervision.tag_seen`, :meth:`~Supervision.tag_absent`) and the commands, returning
the :class:`Event` s to seal as records. It reads no clock and opens nothing: every instant
is the caller's (UTC milliseconds since 1970). Each event fires once; the state, with
what has fired, is JSON (:meth:`~Supervision.to_json` / :meth:`~Supervision.from_json`) so
that the gateway resumes after a restart without firing anything again. Everything it
holds is bounded (:data:`MAX_TAGS`, :data:`MAX_WINDOWS`, :data:`MAX_EXCEPTIONS`,
:data:`MAX_LEAVES`), and a command that would pass a bound is refused.

Instants and wall-clock times: a wall-clock time on a date (a window's start, a period's
first day) is the **first instant at which the zone's clock shows at least that time**
(:func:`wall_instant`). A time inside a spring-forward gap therefore falls at the jump
(02:30 on the day Berlin goes from 02:00 to 03:00 is 03:00 CEST); a time repeated by the
fall-back hour is its first occurrence.
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.devices import TAG_REF_RE
from core.record import JSON

__all__ = [
    "AUTHORISATION_MONTHS",
    "BODY_PARSERS",
    "EVENT_KINDS",
    "EXPIRING_DAYS",
    "LEGAL_BASIS_TEXT",
    "MAX_EXCEPTIONS",
    "MAX_GRACE_MIN",
    "MAX_LEAVES",
    "MAX_LEAVE_DAYS",
    "MAX_TAGS",
    "MAX_WINDOWS",
    "REFUSALS",
    "STATE_FORMAT",
    "Applied",
    "Authorisation",
    "EndAuthorisation",
    "EndReason",
    "Event",
    "Extra",
    "Leave",
    "LegalBasis",
    "PresenceRules",
    "Refusal",
    "RequestPresence",
    "RevokeLeave",
    "Supervision",
    "SupervisionStateError",
    "Window",
    "add_months",
    "last_allowed_day",
    "local_date",
    "parse_authorisation",
    "parse_end_authorisation",
    "parse_leave",
    "parse_presence_rules",
    "parse_request_presence",
    "parse_revoke_leave",
    "wall_instant",
]

# -- bounds and constants (docs/supervision.md, "Bounds") ---------------------------------
#: Tags the evaluator holds state for (a gateway serves one home: a few tags).
MAX_TAGS: Final = 32
#: Weekly windows of one tag's rules (entries; each names one or more weekdays).
MAX_WINDOWS: Final = 28
#: Dated exceptions (days skipped and one-off windows together) of one tag's rules.
MAX_EXCEPTIONS: Final = 64
#: Leaves of one tag held at once (pending, in progress, or ended less than a day ago).
MAX_LEAVES: Final = 16
#: Grace minutes, at most (rules and leave).
MAX_GRACE_MIN: Final = 240
#: One leave lasts at most this many days (the Implementing Measures of the Community
#: Corrections Law allow at most thirty days away at a time).
MAX_LEAVE_DAYS: Final = 30
#: Art. 29 para. 2: each approval and each renewal covers at most three months.
AUTHORISATION_MONTHS: Final = 3
#: ``authorisation.expiring`` fires when this many days of the period are left.
EXPIRING_DAYS: Final = 7
#: Document numbers remembered per tag (a number used once is refused afterwards).
MAX_DOCUMENTS: Final = 16
#: Longest text field (document numbers, approver), characters.
MAX_TEXT: Final = 64
#: Deadlines further back than this in an unannounced gap between two calls are not
#: evaluated (a caller that stopped ticking for weeks does not get weeks of alarms).
MAX_CATCH_UP_MS: Final = 8 * 86_400_000
#: A leave over and settled is dropped this long after its end.
LEAVE_KEEP_MS: Final = 86_400_000
#: Events one call may return per tag, at most (a guard: each fires once anyway).
MAX_EVENTS_PER_CALL: Final = 256
#: Dates accepted anywhere in the bodies.
MIN_DATE: Final = dt.date(2000, 1, 1)
MAX_DATE: Final = dt.date(2099, 12, 31)
MS_PER_MIN: Final = 60_000
MS_PER_DAY: Final = 86_400_000
MIN_INSTANT_MS: Final = 946_684_800_000  # 2000-01-01T00:00Z
MAX_INSTANT_MS: Final = 4_102_444_800_000  # 2100-01-01T00:00Z
STATE_FORMAT: Final = "smartcorr-supervision/1"

#: The records this module makes (core/kinds.py lists their delivery classes).
EVENT_KINDS: Final = (
    "authorisation.started", "authorisation.expiring", "authorisation.expired",
    "authorisation.renewed", "authorisation.ended",
    "presence.violation", "presence.failed_to_return", "presence.returned", "presence.now",
    "leave.started", "leave.ended", "leave.late_return",
)

#: Every reason a :class:`Refusal` may carry (docs/supervision.md, "Refusals").
REFUSALS: Final = (
    "not_an_object", "missing_field", "unknown_field", "bad_type", "bad_tag", "bad_text",
    "bad_basis", "bad_reason", "bad_date", "bad_time", "bad_zone", "bad_days", "bad_grace",
    "bad_instant", "bad_leave_id", "bad_exception", "end_before_start", "period_too_long",
    "empty_window", "overlapping_windows", "duplicate_exception", "too_many_windows",
    "too_many_exceptions", "leave_too_long",
    # refused by the evaluator, against its state
    "too_many_tags", "too_many_leaves", "period_over", "document_reused", "zone_mismatch",
    "starts_before_current", "gap_after_current", "does_not_extend", "not_authorised",
    "leave_id_reused", "overlapping_leave", "leave_over", "unknown_leave",
)


class LegalBasis(enum.Enum):
    """The cases in which the Community Corrections Law of the PRC (2019), Art. 29 para. 1,
    allows electronic monitoring, in the law's order (items 一 to 五). The one list of them:
    :data:`LEGAL_BASIS_TEXT` holds the law's words."""

    PROHIBITION_ORDER = "prohibition_order"
    LEFT_AREA = "left_area_without_approval"
    REFUSED_TO_REPORT = "refused_to_report_after_warning"
    PUBLIC_SECURITY_PENALTY = "public_security_penalty"
    REVOCATION_PROPOSED = "revocation_proposed"

    @property
    def item(self) -> int:
        """The item's number in Art. 29 para. 1 (1 to 5)."""
        return list(LegalBasis).index(self) + 1


LEGAL_BASIS_TEXT: Final[Mapping[LegalBasis, tuple[str, str]]] = {
    LegalBasis.PROHIBITION_ORDER: ("违反人民法院禁止令的", "violated a prohibition order of a "
                                   "people's court"),
    LegalBasis.LEFT_AREA: ("无正当理由，未经批准离开所居住的市、县的", "left the city or county "
                           "of residence without approval and without a legitimate reason"),
    LegalBasis.REFUSED_TO_REPORT: ("拒不按照规定报告自己的活动情况，被给予警告的", "refused to "
                                   "report on their activities as required and was warned"),
    LegalBasis.PUBLIC_SECURITY_PENALTY: ("违反监督管理规定，被给予治安管理处罚的", "violated "
                                         "the supervision rules and received a public-security "
                                         "administrative penalty"),
    LegalBasis.REVOCATION_PROPOSED: ("拟提请撤销缓刑、假释或者暂予监外执行收监执行的",
                                     "revocation of probation, parole or temporary execution "
                                     "outside prison is to be requested"),
}


class EndReason(enum.Enum):
    """Why an authorisation ends before its period does (``end-authorisation``)."""

    #: Art. 29 para. 2: monitoring no longer needed is lifted at once (应当及时解除)
    NO_LONGER_NEEDED = "no_longer_needed"
    #: the community correction itself ended (term served, or terminated)
    CORRECTION_ENDED = "correction_ended"
    #: the person was committed to prison (收监执行)
    COMMITTED = "committed"
    #: the decision was made in error and is withdrawn
    ERROR = "error"


# -- refusals and values --------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """A body or a command refused: ``reason`` one of :data:`REFUSALS`, ``field`` the path of
    the offending field (``windows[1].start``) or None, ``detail`` what is wrong in words."""

    reason: str
    field: str | None
    detail: str

    def __bool__(self) -> bool:
        return False


class _Refused(Exception):  # noqa: N818 - internal: a Refusal at the public boundary
    def __init__(self, reason: str, where: str | None, detail: str) -> None:
        super().__init__(detail)
        self.refusal = Refusal(reason, where, detail)


class SupervisionStateError(ValueError):
    """A persisted state that cannot be read back (damaged or of another format)."""


@dataclass(frozen=True)
class Event:
    """A record to seal: its kind (:data:`EVENT_KINDS`) and body (integers, strings, booleans,
    null; ``due_ms`` is the instant the event was due)."""

    kind: str
    body: dict[str, JSON]


@dataclass(frozen=True)
class Applied:
    """A command the evaluator took: *changed* False when it changed nothing (the same body
    again); *events* are the records it produced, those that fell due first included."""

    events: tuple[Event, ...]
    changed: bool = True

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Authorisation:
    """``set-authorisation``: monitoring of *tag* approved from the first instant of *start* to
    the last of *end* (dates in *zone*, both included)."""

    tag: str
    basis: LegalBasis
    document: str
    approver: str
    start: dt.date
    end: dt.date
    zone: str

    @cached_property
    def start_ms(self) -> int:
        return wall_instant(self.start, 0, _zone(self.zone))

    @cached_property
    def end_ms(self) -> int:
        """The first instant after the period: midnight at the end of its last day."""
        return wall_instant(self.end + dt.timedelta(days=1), 0, _zone(self.zone))

    @cached_property
    def expiring_ms(self) -> int:
        """When :data:`EXPIRING_DAYS` days of the period are left."""
        return wall_instant(self.end - dt.timedelta(days=EXPIRING_DAYS - 1), 0, _zone(self.zone))

    def to_body(self) -> dict[str, JSON]:
        return {"tag": self.tag, "basis": self.basis.value, "document": self.document,
                "approver": self.approver, "start": self.start.isoformat(),
                "end": self.end.isoformat(), "zone": self.zone}


@dataclass(frozen=True)
class EndAuthorisation:
    """``end-authorisation``: the decision *document* by *approver* ends *tag*'s monitoring."""

    tag: str
    document: str
    approver: str
    reason: EndReason

    def to_body(self) -> dict[str, JSON]:
        return {"tag": self.tag, "document": self.document, "approver": self.approver,
                "reason": self.reason.value}


@dataclass(frozen=True)
class Window:
    """A weekly window: on each of *days* (0 Monday … 6 Sunday) it opens at *start_min*
    (minutes after local midnight) and closes at *end_min*; an end at or before the start
    is on the next day, 1440 is ``24:00``."""

    days: tuple[int, ...]
    start_min: int
    end_min: int

    def to_body(self) -> dict[str, JSON]:
        return {"days": [_DAY_NAMES[d] for d in self.days], "start": _hhmm(self.start_min),
                "end": _hhmm(self.end_min)}


@dataclass(frozen=True)
class Extra:
    """A one-off window opening on *date* (same times as :class:`Window`)."""

    date: dt.date
    start_min: int
    end_min: int

    def to_body(self) -> dict[str, JSON]:
        return {"date": self.date.isoformat(), "start": _hhmm(self.start_min),
                "end": _hhmm(self.end_min)}


@dataclass(frozen=True)
class PresenceRules:
    """``set-presence-rules``: *tag*'s weekly windows in *zone*, the dates on which no weekly
    window opens (*skips*), the one-off windows (*extras*), and the grace minutes."""

    tag: str
    zone: str
    grace_min: int
    windows: tuple[Window, ...]
    skips: tuple[dt.date, ...] = ()
    extras: tuple[Extra, ...] = ()

    def to_body(self) -> dict[str, JSON]:
        exceptions: list[JSON] = [{"date": d.isoformat(), "skip": True} for d in self.skips]
        exceptions += [x.to_body() for x in self.extras]
        return {"tag": self.tag, "zone": self.zone, "grace_min": self.grace_min,
                "windows": [w.to_body() for w in self.windows], "exceptions": exceptions}


@dataclass(frozen=True)
class Leave:
    """``approve-leave``: *tag* may be away from *start_ms* to *end_ms* (UTC ms), and must be
    back by *end_ms* plus *grace_min*."""

    tag: str
    leave_id: str
    document: str
    approver: str
    start_ms: int
    end_ms: int
    grace_min: int

    def to_body(self) -> dict[str, JSON]:
        return {"tag": self.tag, "leave_id": self.leave_id, "document": self.document,
                "approver": self.approver, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "grace_min": self.grace_min}


@dataclass(frozen=True)
class RevokeLeave:
    """``revoke-leave``: the leave *leave_id* of *tag* ends now (or never starts)."""

    tag: str
    leave_id: str

    def to_body(self) -> dict[str, JSON]:
        return {"tag": self.tag, "leave_id": self.leave_id}


@dataclass(frozen=True)
class RequestPresence:
    """``request-presence``: answer with a ``presence.now`` record for *tag*."""

    tag: str

    def to_body(self) -> dict[str, JSON]:
        return {"tag": self.tag}


# -- calendar and zones ---------------------------------------------------------------------
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MS = dt.timedelta(milliseconds=1)
_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def add_months(day: dt.date, months: int) -> dt.date:
    """*day* moved by *months* calendar months; a day the target month lacks becomes its
    last day (31 March + 3 months = 30 June)."""
    years, month0 = divmod(day.month - 1 + months, 12)
    year, month = day.year + years, month0 + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def last_allowed_day(start: dt.date) -> dt.date:
    """The last day an approval starting on *start* may cover: the day with the same number
    :data:`AUTHORISATION_MONTHS` months later, or that month's last day when it has none
    (the computation of month periods of the Civil Code, Art. 201-202)."""
    return add_months(start, AUTHORISATION_MONTHS)


def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)  # ZoneInfo caches its instances


def _to_ms(t: dt.datetime) -> int:
    return (t - _EPOCH) // _ONE_MS


def _wall(ms: int, zone: ZoneInfo) -> dt.datetime:
    """The naive wall-clock time of *zone* at instant *ms*."""
    return (_EPOCH + dt.timedelta(milliseconds=ms)).astimezone(zone).replace(tzinfo=None)


def local_date(ms: int, zone: ZoneInfo) -> dt.date:
    """The date the zone's calendar shows at instant *ms*."""
    return _wall(ms, zone).date()


def wall_instant(day: dt.date, minute: int, zone: ZoneInfo) -> int:
    """The first instant (UTC ms) at which the clock of *zone* shows at least *minute*
    minutes after midnight of *day* (*minute* up to 1440, the next midnight).

    A wall time that exists once is that instant; one that the fall-back hour repeats is
    its first occurrence; one that a spring-forward gap skips is the instant of the jump
    (the first instant whose wall time is later)."""
    naive = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minute)
    candidates = []
    for fold in (0, 1):
        instant = naive.replace(tzinfo=zone, fold=fold).astimezone(dt.UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == naive:
            candidates.append(_to_ms(instant))
    if candidates:
        return min(candidates)
    # in a gap: the offsets before and after the jump bracket it; search the first instant
    # whose wall time is at least *naive*
    lo, hi = sorted(_to_ms(naive.replace(tzinfo=zone, fold=f).astimezone(dt.UTC))
                    for f in (0, 1))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(mid, zone) >= naive:
            hi = mid
        else:
            lo = mid
    return hi


# -- parsing the six bodies ------------------------------------------------------------------
_LEAVE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])\Z")
_ZONE_RE = re.compile(r"(UTC|[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){1,2})\Z")


class _Body:
    """One object of a body, read field by field; every error is a :class:`_Refused`."""

    def __init__(self, value: object, where: str, required: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
        if not isinstance(value, dict):
            raise _Refused("not_an_object", where or None, f"{where or 'the body'} must be a "
                           "JSON object")
        self.value: dict[str, Any] = value
        self.where = where
        for key in value:
            if key not in required and key not in optional:
                raise _Refused("unknown_field", self.path(str(key)), f"unknown field {key!r}: "
                               f"the fields are {', '.join(required + optional)}")
        for key in required:
            if key not in value:
                raise _Refused("missing_field", self.path(key), f"field {key!r} is missing")

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, what: str) -> Any:
        value = self.value[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _Refused("bad_type", self.path(key), f"{key!r} must be {what}")
        return value

    def tag(self) -> str:
        tag = self.get("tag", str, "a tag id")
        if not TAG_REF_RE.fullmatch(tag):
            raise _Refused("bad_tag", self.path("tag"), "'tag' must be 'T' and 8 upper-case "
                           "hex digits, as in the tag's records")
        return str(tag)

    def text(self, key: str) -> str:
        value = str(self.get(key, str, "a string"))
        if not value or len(value) > MAX_TEXT or value != value.strip() or any(
                unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
            raise _Refused("bad_text", self.path(key), f"{key!r} must be 1 to {MAX_TEXT} "
                           "characters, without control characters or outer spaces")
        return value

    def date(self, key: str) -> dt.date:
        value = self.get(key, str, "a date YYYY-MM-DD")
        bad = _Refused("bad_date", self.path(key), f"{key!r} must be a date YYYY-MM-DD")
        if not _DATE_RE.match(value):
            raise bad
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise bad from None
        if not MIN_DATE <= day <= MAX_DATE:
            raise _Refused("bad_date", self.path(key), f"{key!r} must be within "
                           f"{MIN_DATE.year}-{MAX_DATE.year}")
        return day

    def time(self, key: str, *, end: bool) -> int:
        value = self.get(key, str, "a time HH:MM")
        if end and value == "24:00":
            return 1440
        match = _TIME_RE.match(value)
        if not match:
            raise _Refused("bad_time", self.path(key), f"{key!r} must be HH:MM from 00:00 to "
                           "23:59" + (" or 24:00" if end else ""))
        return int(match.group(1)) * 60 + int(match.group(2))

    def zone(self) -> str:
        value = str(self.get("zone", str, "an IANA time zone name"))
        bad = _Refused("bad_zone", self.path("zone"), f"{value!r} is not an IANA time zone "
                       "this gateway knows (e.g. Asia/Shanghai)")
        if not _ZONE_RE.match(value):
            raise bad
        try:
            _zone(value)
        except (ValueError, OSError, ZoneInfoNotFoundError):
            raise bad from None
        return value

    def grace(self) -> int:
        value = int(self.get("grace_min", int, "an integer"))
        if not 0 <= value <= MAX_GRACE_MIN:
            raise _Refused("bad_grace", self.path("grace_min"), "'grace_min' must be 0 to "
                           f"{MAX_GRACE_MIN}")
        return value

    def instant(self, key: str) -> int:
        value = int(self.get(key, int, "an integer, UTC milliseconds since 1970"))
        if not MIN_INSTANT_MS <= value < MAX_INSTANT_MS:
            raise _Refused("bad_instant", self.path(key), f"{key!r} must be UTC milliseconds "
                           "within 2000-2099")
        return value

    def leave_id(self) -> str:
        value = str(self.get("leave_id", str, "a string"))
        if not _LEAVE_ID_RE.match(value):
            raise _Refused("bad_leave_id", self.path("leave_id"), "'leave_id' must be 1 to 64 "
                           "of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
        return value


def _run(fn: Callable[[object], Any], body: object) -> Any:
    try:
        return fn(body)
    except _Refused as refused:
        return refused.refusal


def _parse_authorisation(body: object) -> Authorisation:
    b = _Body(body, "", ("tag", "basis", "document", "approver", "start", "end", "zone"))
    basis_value = b.get("basis", str, "a string")
    try:
        basis = LegalBasis(basis_value)
    except ValueError:
        raise _Refused("bad_basis", "basis", "'basis' must be one of the cases of Art. 29: "
                       + ", ".join(x.value for x in LegalBasis)) from None
    start, end = b.date("start"), b.date("end")
    if end < start:
        raise _Refused("end_before_start", "end", "'end' (the last day) is before 'start'")
    if end > last_allowed_day(start):
        raise _Refused("period_too_long", "end", f"a period starting {start} may end on "
                       f"{last_allowed_day(start)} at the latest: at most "
                       f"{AUTHORISATION_MONTHS} months per approval or renewal (Community "
                       "Corrections Law, Art. 29)")
    return Authorisation(b.tag(), basis, b.text("document"), b.text("approver"), start, end,
                         b.zone())


def _parse_end_authorisation(body: object) -> EndAuthorisation:
    b = _Body(body, "", ("tag", "document", "approver", "reason"))
    value = b.get("reason", str, "a string")
    try:
        reason = EndReason(value)
    except ValueError:
        raise _Refused("bad_reason", "reason", "'reason' must be one of "
                       + ", ".join(x.value for x in EndReason)) from None
    return EndAuthorisation(b.tag(), b.text("document"), b.text("approver"), reason)


def _window_length(start: int, end: int) -> int:
    return end - start if end > start else end + 1440 - start


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _parse_presence_rules(body: object) -> PresenceRules:
    b = _Body(body, "", ("tag", "zone", "grace_min", "windows"), ("exceptions",))
    tag, zone, grace = b.tag(), b.zone(), b.grace()
    raw_windows = b.get("windows", list, "a list")
    if len(raw_windows) > MAX_WINDOWS:
        raise _Refused("too_many_windows", "windows", f"at most {MAX_WINDOWS} windows")
    windows = []
    for i, raw in enumerate(raw_windows):
        w = _Body(raw, f"windows[{i}]", ("days", "start", "end"))
        days = w.get("days", list, "a list of weekdays")
        if not days or any(d not in _DAY_NAMES for d in days) or len(set(days)) != len(days):
            raise _Refused("bad_days", w.path("days"), "'days' must list distinct weekdays "
                           "among " + ", ".join(_DAY_NAMES))
        start, end = w.time("start", end=False), w.time("end", end=True)
        if start == end:
            raise _Refused("empty_window", w.path("end"), "a window ending when it starts is "
                           "empty (00:00 to 24:00 is a whole day)")
        windows.append(Window(tuple(sorted(_DAY_NAMES.index(d) for d in days)), start, end))
    week = 7 * 1440  # weekly windows as minutes of the week, compared across the week's end
    spans = [(d * 1440 + w.start_min, d * 1440 + w.start_min
              + _window_length(w.start_min, w.end_min), i)
             for i, w in enumerate(windows) for d in w.days]
    for x, (a0, a1, ai) in enumerate(spans):
        for b0, b1, bi in spans[x + 1:]:
            if any(_overlap((a0, a1), (b0 + k * week, b1 + k * week)) for k in (-1, 0, 1)):
                raise _Refused("overlapping_windows", f"windows[{max(ai, bi)}]",
                               f"windows[{min(ai, bi)}] and windows[{max(ai, bi)}] overlap")
    raw_exceptions = b.get("exceptions", list, "a list") if "exceptions" in b.value else []
    if len(raw_exceptions) > MAX_EXCEPTIONS:
        raise _Refused("too_many_exceptions", "exceptions",
                       f"at most {MAX_EXCEPTIONS} exceptions")
    skips: list[dt.date] = []
    extras: list[tuple[int, Extra]] = []
    for i, raw in enumerate(raw_exceptions):
        where = f"exceptions[{i}]"
        if isinstance(raw, dict) and "skip" in raw:
            e = _Body(raw, where, ("date", "skip"))
            if e.get("skip", bool, "true") is not True:
                raise _Refused("bad_exception", e.path("skip"), "'skip' must be true (leave "
                               "the entry out to keep that day's windows)")
            day = e.date("date")
            if day in skips:
                raise _Refused("duplicate_exception", e.path("date"), f"{day} is skipped twice")
            skips.append(day)
        elif isinstance(raw, dict) and ("start" in raw or "end" in raw):
            e = _Body(raw, where, ("date", "start", "end"))
            day, start, end = e.date("date"), e.time("start", end=False), e.time("end", end=True)
            if start == end:
                raise _Refused("empty_window", e.path("end"), "an extra window ending when it "
                               "starts is empty")
            extras.append((i, Extra(day, start, end)))
        else:
            raise _Refused("bad_exception", where, "an exception is {date, skip: true} (no "
                           "weekly window opens that day) or {date, start, end} (a one-off "
                           "window)")
    _check_extras(windows, skips, extras)
    return PresenceRules(tag, zone, grace, tuple(windows), tuple(sorted(skips)),
                         tuple(sorted((x for _, x in extras),
                                      key=lambda x: (x.date, x.start_min))))


def _check_extras(windows: list[Window], skips: list[dt.date],
                  extras: list[tuple[int, Extra]]) -> None:
    """One-off windows overlap neither each other nor the weekly windows of their days
    (compared on the wall clock, in minutes from the previous day's midnight)."""
    for index, x in extras:
        mine = (1440 + x.start_min, 1440 + x.start_min + _window_length(x.start_min, x.end_min))
        for k in (0, 1, 2):
            day = x.date + dt.timedelta(days=k - 1)
            others = [] if day in skips else [
                (w.start_min, w.end_min) for w in windows if day.weekday() in w.days]
            others += [(y.start_min, y.end_min) for j, y in extras
                       if j != index and y.date == day]
            for start, end in others:
                span = (k * 1440 + start, k * 1440 + start + _window_length(start, end))
                if _overlap(mine, span):
                    raise _Refused("overlapping_windows", f"exceptions[{index}]",
                                   f"the one-off window of {x.date} overlaps another window")


def _parse_leave(body: object) -> Leave:
    b = _Body(body, "", ("tag", "leave_id", "document", "approver", "start_ms", "end_ms",
                         "grace_min"))
    start, end = b.instant("start_ms"), b.instant("end_ms")
    if end <= start:
        raise _Refused("end_before_start", "end_ms", "'end_ms' must be after 'start_ms'")
    if end - start > MAX_LEAVE_DAYS * MS_PER_DAY:
        raise _Refused("leave_too_long", "end_ms", f"a leave lasts at most {MAX_LEAVE_DAYS} "
                       "days")
    return Leave(b.tag(), b.leave_id(), b.text("document"), b.text("approver"), start, end,
                 b.grace())


def _parse_revoke_leave(body: object) -> RevokeLeave:
    b = _Body(body, "", ("tag", "leave_id"))
    return RevokeLeave(b.tag(), b.leave_id())


def _parse_request_presence(body: object) -> RequestPresence:
    return RequestPresence(_Body(body, "", ("tag",)).tag())


def parse_authorisation(body: object) -> Authorisation | Refusal:
    """The body of ``set-authorisation``, or why it is refused (``period_too_long``: the
    period ends after :func:`last_allowed_day`)."""
    result: Authorisation | Refusal = _run(_parse_authorisation, body)
    return result


def parse_end_authorisation(body: object) -> EndAuthorisation | Refusal:
    """The body of ``end-authorisation``, or why it is refused."""
    result: EndAuthorisation | Refusal = _run(_parse_end_authorisation, body)
    return result


def parse_presence_rules(body: object) -> PresenceRules | Refusal:
    """The body of ``set-presence-rules``, or why it is refused."""
    result: PresenceRules | Refusal = _run(_parse_presence_rules, body)
    return result


def parse_leave(body: object) -> Leave | Refusal:
    """The body of ``approve-leave``, or why it is refused."""
    result: Leave | Refusal = _run(_parse_leave, body)
    return result


def parse_revoke_leave(body: object) -> RevokeLeave | Refusal:
    """The body of ``revoke-leave``, or why it is refused."""
    result: RevokeLeave | Refusal = _run(_parse_revoke_leave, body)
    return result


def parse_request_presence(body: object) -> RequestPresence | Refusal:
    """The body of ``request-presence``, or why it is refused."""
    result: RequestPresence | Refusal = _run(_parse_request_presence, body)
    return result


#: The parser of each command kind's body, by the command's name (docs/commands.md).
BODY_PARSERS: Final[Mapping[str, Callable[[object], Any]]] = {
    "set-authorisation": parse_authorisation,
    "end-authorisation": parse_end_authorisation,
    "set-presence-rules": parse_presence_rules,
    "approve-leave": parse_leave,
    "revoke-leave": parse_revoke_leave,
    "request-presence": parse_request_presence,
}


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# -- the evaluator's state ---------------------------------------------------------------------
_PENDING, _LIVE, _EXPIRED, _ENDED = "pending", "live", "expired", "ended"
_ACTIVE, _OVER = "active", "over"
_FIRED, _SETTLED = "fired", "settled"
_VIOLATION, _FAILED, _LATE = "presence.violation", "presence.failed_to_return", "leave.late_return"


@dataclass
class _Auth:
    current: Authorisation
    span_start_ms: int  # the start of the first approval of this span (renewals extend it)
    first_document: str
    applied_ms: int  # when the first approval of the span was applied (gateway clock)
    status: str = _PENDING
    started_ms: int | None = None
    expiring_fired: bool = False  # for current.end
    closed_ms: int | None = None


@dataclass
class _LeaveState:
    leave: Leave
    applied_ms: int
    end_ms: int  # the leave's end, or when it was revoked
    phase: str = _PENDING
    revoked: bool = False
    late: str = _PENDING


@dataclass
class _Presence:
    """What the evaluator knows of a tag's presence; instants of the gateway's clock. Kept
    only while the tag is authorised."""

    home: bool | None = None  # None: not known (nothing heard since observation began)
    since_ms: int | None = None  # when the current home / not-home state began
    last_heard_ms: int | None = None
    rssi_dbm: int | None = None
    observed_from_ms: int | None = None  # obligations are evaluated from here
    observed_via: str = "clock"  # what set observed_from: clock, time.step, restart
    episode: int = 0  # absences, counted per tag
    breaches: int = 0  # of the current absence
    first_breach: str | None = None
    last_breach_open_ms: int | None = None  # of the current absence
    ftr_last_open_ms: int | None = None  # the last obligation with a failed_to_return
    scan_from_ms: int | None = None  # obligations ending before this are settled


@dataclass
class _TagState:
    auth: _Auth | None = None
    documents: list[str] = field(default_factory=list)
    rules: PresenceRules | None = None
    rules_from_ms: int | None = None
    leaves: list[_LeaveState] = field(default_factory=list)
    presence: _Presence = field(default_factory=_Presence)

    @property
    def live(self) -> bool:
        return self.auth is not None and self.auth.status == _LIVE

    def remember(self, document: str) -> None:
        if document not in self.documents:
            self.documents.append(document)
            del self.documents[:-MAX_DOCUMENTS]


@dataclass(frozen=True)
class _Occurrence:
    open_ms: int
    close_ms: int
    date: dt.date
    start_min: int
    end_min: int
    source: str  # weekly | extra

    def describe(self) -> dict[str, JSON]:
        return {"date": self.date.isoformat(), "start": _hhmm(self.start_min),
                "end": _hhmm(self.end_min), "source": self.source}


@dataclass(frozen=True)
class _Piece:
    """An obligation: an occurrence clipped to the authorisation and cut by leaves."""

    open_ms: int
    close_ms: int
    opener: str  # window | authorisation | leave_end
    occurrence: _Occurrence


#: Days of windows kept converted to instants (a tick a second reads the same day again).
OCCURRENCE_CACHE_DAYS: Final = 512


@lru_cache(maxsize=OCCURRENCE_CACHE_DAYS)
def _day_occurrences(rules: PresenceRules, day: dt.date) -> tuple[_Occurrence, ...]:
    """The windows of *rules* opening on *day* (those daylight saving empties left out)."""
    zone = _zone(rules.zone)
    spans = [] if day in rules.skips else [
        (w.start_min, w.end_min, "weekly") for w in rules.windows if day.weekday() in w.days]
    spans += [(x.start_min, x.end_min, "extra") for x in rules.extras if x.date == day]
    out = []
    for start, end, source in spans:
        opens = wall_instant(day, start, zone)
        closes = (wall_instant(day, end, zone) if end > start
                  else wall_instant(day + dt.timedelta(days=1), end, zone))
        if opens < closes:
            out.append(_Occurrence(opens, closes, day, start, end, source))
    return tuple(out)


def _occurrences(rules: PresenceRules, lo: int, hi: int) -> list[_Occurrence]:
    """The windows of *rules* that overlap [lo, hi], in time order."""
    if lo > hi:
        return []
    zone = _zone(rules.zone)
    day, last = local_date(lo, zone) - dt.timedelta(days=1), local_date(hi, zone)
    out = []
    while day <= last:
        out += [o for o in _day_occurrences(rules, day) if o.close_ms > lo and o.open_ms <= hi]
        day += dt.timedelta(days=1)
    out.sort(key=lambda o: o.open_ms)
    return out


def _pieces(state: _TagState, lo: int, hi: int) -> list[_Piece]:
    auth, rules = state.auth, state.rules
    if auth is None or rules is None:
        return []
    span = (auth.span_start_ms, auth.current.end_ms)
    leaves = sorted((lv.leave.start_ms, lv.end_ms) for lv in state.leaves
                    if lv.end_ms > lv.leave.start_ms)
    out = []
    for occ in _occurrences(rules, lo, hi):
        start, end = max(occ.open_ms, span[0]), min(occ.close_ms, span[1])
        if start >= end:
            continue
        parts = [(start, end, "window" if start == occ.open_ms else "authorisation")]
        for leave_start, leave_end in leaves:
            cut = []
            for a, b, opener in parts:
                if leave_start < b and a < leave_end:
                    if a < leave_start:
                        cut.append((a, leave_start, opener))
                    if leave_end < b:
                        cut.append((leave_end, b, "leave_end"))
                else:
                    cut.append((a, b, opener))
            parts = cut
        out += [_Piece(a, b, opener, occ) for a, b, opener in parts]
    return out


# -- the evaluator -------------------------------------------------------------------------------
class Supervision:
    """The rules of every tag of this gateway and what has fired (docs/supervision.md).

    Every method taking *now_ms* first lets the time run to *now_ms* (firing what fell due,
    in the order it fell due), then applies itself. Time never runs backwards but through
    :meth:`time_step`: an earlier *now_ms* is taken as the last instant seen (and counted in
    :attr:`clock_regressions`)."""

    def __init__(self) -> None:
        self._tags: dict[str, _TagState] = {}
        self._outbox: list[Event] = []  # fell due during a refused command: next answer
        self._now: int | None = None
        self._trusted = False
        self.clock_regressions = 0

    # -- time ----------------------------------------------------------------------------
    def tick(self, now_ms: int, clock_trusted: bool) -> list[Event]:
        """The time is *now_ms* (the gateway's best UTC; *clock_trusted* False when its
        source is ``rtc`` or ``unsynced``: every event then says so)."""
        self._trusted = clock_trusted
        return self._drain() + self._advance(self._clamp(now_ms), "clock")

    def time_step(self, old_ms: int, new_ms: int,
                  clock_trusted: bool | None = None) -> list[Event]:
        """The clock stepped from *old_ms* to *new_ms* (a ``time.step`` record). What fell due
        up to *old_ms* fires first; instants the gateway took from its own clock (when a tag
        was heard or went absent, when a command was applied) move with the step; instants
        of the rules (windows, leaves, periods) do not. Obligations in force at *new_ms*
        start there with their full grace (``via`` ``time.step``); nothing is evaluated for
        a span skipped forward, and nothing fired before a step backward fires again."""
        out = self._drain() + (self._advance(old_ms, "clock")
                               if self._now is not None and old_ms > self._now else [])
        if clock_trusted is not None:
            self._trusted = clock_trusted
        delta = new_ms - old_ms
        for state in self._tags.values():
            self._rebase(state, delta, new_ms)
        self._now = new_ms
        return out + self._advance(new_ms, "time.step")

    def resume(self, now_ms: int) -> list[Event]:
        """The gateway starts again (after :meth:`from_json`): what happened while it was
        down was not observed. Presence is unknown from *now_ms*; obligations in force start
        there with their full grace (``via`` ``restart``); periods and leaves that began or
        ended meanwhile fire their events now. An absence whose breach fired stays open, so
        its return is still reported."""
        now = self._clamp(now_ms)
        for state in self._tags.values():
            p = state.presence
            if not state.live or p.observed_from_ms is None:
                continue
            if p.home is True:
                self._new_episode(p, now, home=None)
            p.observed_from_ms, p.observed_via, p.scan_from_ms = now, "restart", now
        return self._drain() + self._advance(now, "restart")

    # -- presence ---------------------------------------------------------------------------
    def tag_seen(self, tag: str, now_ms: int, rssi_dbm: int | None = None) -> list[Event]:
        """The gateway holds *tag* present at *now_ms*: call it for each beacon the tag
        receiver accepts while it holds the tag present, and at its ``tag.present``. Ignored
        (nothing kept) outside the tag's authorised period."""
        now = self._clamp(now_ms)
        out = self._drain() + self._advance(now, "clock")
        state = self._tags.get(tag)
        if state is None or not state.live:
            return out
        p = state.presence
        p.last_heard_ms, p.rssi_dbm = now, rssi_dbm
        if p.home is not True:
            if p.breaches:
                out.append(self._event("presence.returned", tag, now, "presence", {
                    "episode": p.episode, "absent_since_ms": p.since_ms,
                    "absent_ms": now - (p.since_ms if p.since_ms is not None else now),
                    "breaches": p.breaches, "first_breach": p.first_breach}))
            p.home, p.since_ms = True, now
            p.breaches, p.first_breach, p.last_breach_open_ms = 0, None, None
            for lv in state.leaves:
                if lv.phase == _OVER and lv.late == _PENDING:
                    lv.late = _SETTLED
        return out

    def tag_absent(self, tag: str, now_ms: int) -> list[Event]:
        """The gateway holds *tag* absent from *now_ms* (the tag receiver's ``tag.absent``:
        not heard for the tag's ``absent_after_s``). Grace counts from here."""
        now = self._clamp(now_ms)
        out = self._drain() + self._advance(now, "clock")
        state = self._tags.get(tag)
        if state is None or not state.live:
            return out
        p = state.presence
        if p.home is True:
            self._new_episode(p, now, home=False)
        elif p.home is None:
            p.home = False
        return out

    def authorised(self, tag: str, at_ms: int) -> bool:
        """Whether *tag*'s monitoring is authorised at *at_ms*: inside its period, neither
        ended nor found expired. Outside, record nothing of its presence."""
        state = self._tags.get(tag)
        auth = state.auth if state else None
        return (auth is not None and auth.status in (_PENDING, _LIVE)
                and auth.span_start_ms <= at_ms < auth.current.end_ms)

    def presence_now(self, tag: str, now_ms: int) -> dict[str, JSON]:
        """The body of a ``presence.now`` record (call :meth:`tick` first: this reads, it does
        not let the time run). Presence fields are null outside the authorised period."""
        state = self._tags.get(tag) or _TagState()
        auth, p, rules = state.auth, state.presence, state.rules
        live = state.live and self.authorised(tag, now_ms)
        window = None
        if rules is not None:
            occ = next((o for o in _occurrences(rules, now_ms, now_ms)
                        if o.open_ms <= now_ms < o.close_ms), None)
            if occ is not None:
                window = {**occ.describe(), "open_ms": occ.open_ms, "close_ms": occ.close_ms}
        leave = next((lv for lv in state.leaves
                      if lv.leave.start_ms <= now_ms < lv.end_ms), None)
        must = live and any(pc.open_ms <= now_ms < pc.close_ms
                            for pc in _pieces(state, now_ms, now_ms))
        return {
            "tag": tag, "now_ms": now_ms, "clock_trusted": self._trusted, "authorised": live,
            "authorisation": None if auth is None else {
                "document": auth.current.document, "basis": auth.current.basis.value,
                "start": auth.current.start.isoformat(), "end": auth.current.end.isoformat(),
                "zone": auth.current.zone, "status": auth.status},
            "present": p.home if live else None,
            "last_heard_ms": p.last_heard_ms if live else None,
            "rssi_dbm": p.rssi_dbm if live else None,
            "since_ms": p.since_ms if live else None,
            "breach_open": bool(live and p.breaches),
            "window": window, "must_be_home": must,
            "grace_min": None if rules is None else rules.grace_min,
            "leave": None if leave is None else {
                "leave_id": leave.leave.leave_id, "document": leave.leave.document,
                "start_ms": leave.leave.start_ms, "end_ms": leave.end_ms},
        }

    # -- commands ---------------------------------------------------------------------------------
    # Each lets the time run to *now_ms* first, then applies itself at *now_ms*. The events
    # that fell due come in the Applied; when the command is refused they are kept, and
    # come first in the answer of the next call (nothing fired is ever lost).
    def set_authorisation(self, auth: Authorisation, now_ms: int) -> Applied | Refusal:
        """Apply ``set-authorisation``: a first approval, a new one after the last ended or
        expired, or a renewal (its period starts at the latest the day after the current
        one ends, and ends later; ``authorisation.renewed``)."""
        return self._command(partial(self._set_authorisation, auth), now_ms)

    def end_authorisation(self, end: EndAuthorisation, now_ms: int) -> Applied | Refusal:
        """Apply ``end-authorisation``: monitoring ends now (``authorisation.ended``)."""
        return self._command(partial(self._end_authorisation, end), now_ms)

    def set_presence_rules(self, rules: PresenceRules, now_ms: int) -> Applied | Refusal:
        """Apply ``set-presence-rules`` (replacing the tag's rules). A change applies from
        *now_ms*: an obligation in force gets its grace from then."""
        return self._command(partial(self._set_presence_rules, rules), now_ms)

    def approve_leave(self, leave: Leave, now_ms: int) -> Applied | Refusal:
        """Apply ``approve-leave``."""
        return self._command(partial(self._approve_leave, leave), now_ms)

    def revoke_leave(self, revoke: RevokeLeave, now_ms: int) -> Applied | Refusal:
        """Apply ``revoke-leave``: a leave not started is withdrawn; one in progress ends now
        (``leave.ended`` with reason ``revoked``), and the person must be back within its
        grace."""
        return self._command(partial(self._revoke_leave, revoke), now_ms)

    def _command(self, apply: Callable[[int], Applied | Refusal],
                 now_ms: int) -> Applied | Refusal:
        now = self._clamp(now_ms)
        due = self._drain() + self._advance(now, "clock")
        result = apply(now)
        if isinstance(result, Refusal):
            self._outbox = due
            return result
        return Applied((*due, *result.events, *self._advance(now, "clock")), result.changed)

    def _set_authorisation(  # noqa: PLR0911 - one return per outcome
            self, auth: Authorisation, now: int) -> Applied | Refusal:
        state = self._tags.get(auth.tag)
        current = state.auth if state else None
        if state is not None and current is not None and current.status in (_PENDING, _LIVE):
            if auth == current.current:
                return Applied((), changed=False)
            refusal = _renewal_refusal(current.current, auth, state)
            if refusal is not None:
                return refusal
            previous = current.current
            current.current, current.expiring_fired = auth, False
            state.remember(auth.document)
            return Applied((self._event("authorisation.renewed", auth.tag, now, "command", {
                **_auth_fields(auth), "previous": previous.document,
                "previous_end": previous.end.isoformat()}),))
        if state is not None and auth.document in state.documents:
            return Refusal("document_reused", "document", f"document {auth.document!r} was "
                           f"used already for tag {auth.tag}")
        if auth.end_ms <= now:
            return Refusal("period_over", "end", f"the period ended on {auth.end}: nothing to "
                           "authorise")
        state = self._state_for(auth.tag)
        if state is None:
            return _too_many_tags()
        state.auth = _Auth(auth, auth.start_ms, auth.document, now)
        state.remember(auth.document)
        return Applied(())

    def _end_authorisation(self, end: EndAuthorisation, now: int) -> Applied | Refusal:
        state = self._tags.get(end.tag)
        auth = state.auth if state else None
        if state is None or auth is None or auth.status not in (_PENDING, _LIVE):
            return Refusal("not_authorised", "tag", f"tag {end.tag} has no authorisation in "
                           "force to end")
        open_breach = bool(state.live and state.presence.breaches)
        auth.status, auth.closed_ms = _ENDED, now
        state.presence = _Presence(episode=state.presence.episode,
                                   ftr_last_open_ms=state.presence.ftr_last_open_ms)
        return Applied((self._event("authorisation.ended", end.tag, now, "command", {
            "document": end.document, "approver": end.approver, "reason": end.reason.value,
            "authorisation": auth.current.document, "end": auth.current.end.isoformat(),
            "open_breach": open_breach}),))

    def _set_presence_rules(self, rules: PresenceRules, now: int) -> Applied | Refusal:
        state = self._tags.get(rules.tag)
        if state is not None and state.rules == rules:
            return Applied((), changed=False)
        state = self._state_for(rules.tag)
        if state is None:
            return _too_many_tags()
        state.rules, state.rules_from_ms = rules, now
        return Applied(())

    def _approve_leave(self, leave: Leave, now: int) -> Applied | Refusal:
        state = self._tags.get(leave.tag)
        held = next((lv for lv in state.leaves if lv.leave.leave_id == leave.leave_id),
                    None) if state else None
        if held is not None:
            if held.leave == leave:
                return Applied((), changed=False)
            return Refusal("leave_id_reused", "leave_id", f"leave {leave.leave_id!r} of tag "
                           f"{leave.tag} exists with other terms: revoke it, or use a new id")
        refusal = _leave_refusal(leave, state, now)
        if refusal is not None:
            return refusal
        state = self._state_for(leave.tag)
        if state is None:
            return _too_many_tags()
        state.leaves.append(_LeaveState(leave, now, leave.end_ms))
        state.leaves.sort(key=lambda lv: lv.leave.start_ms)
        return Applied(())

    def _revoke_leave(self, revoke: RevokeLeave, now: int) -> Applied | Refusal:
        state = self._tags.get(revoke.tag)
        held = next((lv for lv in state.leaves if lv.leave.leave_id == revoke.leave_id),
                    None) if state else None
        if state is None or held is None:
            return Refusal("unknown_leave", "leave_id", f"tag {revoke.tag} has no leave "
                           f"{revoke.leave_id!r}")
        if held.phase == _OVER or held.end_ms <= now:
            return Refusal("leave_over", "leave_id", f"leave {revoke.leave_id!r} is over")
        if held.phase == _PENDING:
            state.leaves.remove(held)
            return Applied(())
        held.end_ms, held.revoked = now, True
        if state.live:
            return Applied(tuple(self._leave_ended(revoke.tag, state, held, now, "command")))
        held.phase, held.late = _OVER, _SETTLED
        return Applied(())

    def forget(self, tag: str) -> bool:
        """Drop everything held for *tag* (the tag was unpaired); whether anything was."""
        return self._tags.pop(tag, None) is not None

    def tags(self) -> list[str]:
        return sorted(self._tags)

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> str:
        """The whole state, canonical JSON (sorted keys, no spaces, UTF-8 text)."""
        doc = {"format": STATE_FORMAT, "now_ms": self._now, "clock_trusted": self._trusted,
               "clock_regressions": self.clock_regressions,
               "outbox": [{"kind": e.kind, "body": e.body} for e in self._outbox],
               "tags": {tag: _dump_tag(state) for tag, state in self._tags.items()}}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Supervision:
        """The evaluator :meth:`to_json` wrote; :class:`SupervisionStateError` when the text
        is not one. After a restart, call :meth:`resume` before anything else."""
        try:
            doc = json.loads(text)
            reader = _Reader(doc, "state")
            if reader.get("format", str) != STATE_FORMAT:
                raise SupervisionStateError(f"state: format is not {STATE_FORMAT!r}")
            sup = cls()
            sup._now = reader.opt("now_ms", int)
            sup._trusted = reader.get("clock_trusted", bool)
            sup.clock_regressions = reader.get("clock_regressions", int)
            for i, raw in enumerate(reader.get("outbox", list)):
                item = _Reader(raw, f"state.outbox[{i}]")
                kind = item.one_of("kind", EVENT_KINDS)
                sup._outbox.append(Event(kind, dict(item.get("body", dict))))
            if len(sup._outbox) > MAX_TAGS * MAX_EVENTS_PER_CALL:
                raise SupervisionStateError("state.outbox: too long")
            tags = reader.get("tags", dict)
            if len(tags) > MAX_TAGS:
                raise SupervisionStateError(f"state: more than {MAX_TAGS} tags")
            for tag, raw in tags.items():
                if not TAG_REF_RE.fullmatch(tag):
                    raise SupervisionStateError(f"state.tags: {tag!r} is not a tag id")
                sup._tags[tag] = _load_tag(_Reader(raw, f"state.tags.{tag}"), tag)
        except (ValueError, TypeError, KeyError) as exc:
            if isinstance(exc, SupervisionStateError):
                raise
            raise SupervisionStateError(f"supervision state unreadable: {exc}") from None
        return sup

    # -- internals --------------------------------------------------------------------------------
    def _drain(self) -> list[Event]:
        out, self._outbox = self._outbox, []
        return out

    def _clamp(self, now: int) -> int:
        if self._now is not None and now < self._now:
            self.clock_regressions += 1
            return self._now
        return now

    def _state_for(self, tag: str) -> _TagState | None:
        state = self._tags.get(tag)
        if state is None:
            if len(self._tags) >= MAX_TAGS:
                return None
            state = self._tags[tag] = _TagState()
        return state

    def _event(self, kind: str, tag: str, due: int, via: str,
               body: dict[str, JSON]) -> Event:
        return Event(kind, {"tag": tag, **body, "due_ms": due, "via": via,
                            "clock_trusted": self._trusted})

    @staticmethod
    def _new_episode(p: _Presence, at: int, *, home: bool | None) -> None:
        p.home, p.since_ms, p.episode = home, at, p.episode + 1
        p.breaches, p.first_breach, p.last_breach_open_ms = 0, None, None
        p.scan_from_ms = at

    @staticmethod
    def _rebase(state: _TagState, delta: int, new: int) -> None:
        p = state.presence
        if p.observed_from_ms is not None:
            if p.since_ms is not None:
                p.since_ms = min(p.since_ms + delta, new)
            if p.last_heard_ms is not None:
                p.last_heard_ms = min(p.last_heard_ms + delta, new)
            p.observed_from_ms, p.observed_via, p.scan_from_ms = new, "time.step", new
        if state.rules_from_ms is not None:
            state.rules_from_ms = min(state.rules_from_ms + delta, new)
        if state.auth is not None:
            state.auth.applied_ms = min(state.auth.applied_ms + delta, new)
            if state.auth.started_ms is not None:
                state.auth.started_ms = min(state.auth.started_ms + delta, new)
        for lv in state.leaves:
            lv.applied_ms = min(lv.applied_ms + delta, new)

    def _advance(self, now: int, via: str) -> list[Event]:
        out: list[Event] = []
        for tag in sorted(self._tags):
            out += self._advance_tag(tag, self._tags[tag], now, via)
        self._now = now if self._now is None else max(self._now, now)
        out.sort(key=lambda e: int(e.body["due_ms"]))  # stable: each tag's order kept
        return out

    def _advance_tag(self, tag: str, state: _TagState, now: int, via: str) -> list[Event]:
        out: list[Event] = []
        p = state.presence
        if p.scan_from_ms is not None and now - p.scan_from_ms > MAX_CATCH_UP_MS:
            p.scan_from_ms = now - MAX_CATCH_UP_MS
        for _ in range(MAX_EVENTS_PER_CALL):
            step = self._next_due(tag, state, now, via)
            if step is None:
                break
            out += step()
        if not state.live:  # leaves pass unrecorded outside the period
            for lv in state.leaves:
                if lv.end_ms <= now:
                    lv.phase = _OVER
                    if lv.late == _PENDING:
                        lv.late = _SETTLED
        state.leaves = [lv for lv in state.leaves if not (
            lv.phase == _OVER and lv.late != _PENDING and lv.end_ms + LEAVE_KEEP_MS <= now)]
        if p.scan_from_ms is not None:
            p.scan_from_ms = max(p.scan_from_ms, now)
        return out

    def _next_due(self, tag: str, state: _TagState, now: int,
                  via: str) -> Callable[[], list[Event]] | None:
        """The action of the earliest deadline at or before *now*, or None. Ties go in the
        order: period starts, leave ends, leave starts, breaches, late returns, expiring,
        period ends."""
        auth = state.auth
        if auth is None or auth.status in (_EXPIRED, _ENDED):
            return None
        found: list[tuple[int, int, Callable[[], list[Event]]]] = []
        if auth.status == _PENDING:
            start = max(auth.span_start_ms, auth.applied_ms)
            found.append((start, 0, partial(self._started, tag, state, start, via, now)))
            found.append((auth.current.end_ms, 6, partial(self._expired, tag, state, via)))
        else:
            found.append((auth.current.end_ms, 6, partial(self._expired, tag, state, via)))
            if not auth.expiring_fired:
                at = max(auth.current.expiring_ms, auth.started_ms or 0)
                found.append((at, 5, partial(self._expiring, tag, state, at, via)))
            found += [d for lv in state.leaves
                      if (d := self._leave_deadline(tag, state, lv, via)) is not None]
            breach = self._next_breach(state, now)
            if breach is not None:
                at, kind, piece = breach
                found.append((at, 3, partial(self._breach, tag, state, kind, piece, at)))
        found = [f for f in found if f[0] <= now]
        if not found:
            return None
        return min(found, key=lambda f: (f[0], f[1]))[2]

    def _leave_deadline(self, tag: str, state: _TagState, lv: _LeaveState,
                        via: str) -> tuple[int, int, Callable[[], list[Event]]] | None:
        p = state.presence
        if lv.phase == _PENDING:
            started = state.auth.started_ms if state.auth is not None else None
            start = max(lv.leave.start_ms, lv.applied_ms, started or 0)
            if start < lv.end_ms:
                return (start, 2, partial(self._leave_started, tag, state, lv, start, via))
            return (lv.end_ms, 1, partial(self._leave_skipped, lv))  # over before monitoring
        if lv.phase == _ACTIVE:
            return (lv.end_ms, 1, partial(self._leave_ended, tag, state, lv, lv.end_ms, via))
        if lv.late == _PENDING:
            base = max(lv.end_ms, p.observed_from_ms or lv.end_ms)
            at = base + lv.leave.grace_min * MS_PER_MIN
            late_via = p.observed_via if base > lv.end_ms else "clock"
            return (at, 4, partial(self._late, tag, state, lv, base, at, late_via))
        return None

    def _next_breach(self, state: _TagState,
                     now: int) -> tuple[int, str, _Piece] | None:
        """The earliest breach of the current absence due by *now*: (due, kind, piece)."""
        p, rules = state.presence, state.rules
        if (rules is None or p.home is True or p.observed_from_ms is None
                or p.since_ms is None):
            return None
        begin = max(p.observed_from_ms, state.rules_from_ms or 0)
        since = p.since_ms
        lower = max(since, begin, p.scan_from_ms if p.scan_from_ms is not None else since)
        grace = rules.grace_min * MS_PER_MIN
        best: tuple[int, str, _Piece] | None = None
        for piece in _pieces(state, lower, now):
            start = max(piece.open_ms, begin)
            if start >= piece.close_ms:
                continue
            at = max(since, start) + grace
            if at >= piece.close_ms or at > now:
                continue
            if p.last_breach_open_ms is not None and piece.open_ms <= p.last_breach_open_ms:
                continue
            if since <= start:  # not home when the obligation began
                if piece.opener == "leave_end":
                    continue  # leave.late_return speaks for it
                if p.ftr_last_open_ms is not None and piece.open_ms <= p.ftr_last_open_ms:
                    continue
                kind = _FAILED
            else:
                kind = _VIOLATION
            if best is None or at < best[0]:
                best = (at, kind, piece)
        return best

    # -- what fires ---------------------------------------------------------------------
    def _started(self, tag: str, state: _TagState, at: int, via: str,
                 now: int) -> list[Event]:
        auth = state.auth
        assert auth is not None  # noqa: S101 - set by the caller's branch
        auth.status, auth.started_ms = _LIVE, at
        p = state.presence
        # observed from its start; but a start within a span the gateway did not live on
        # this clock (skipped by a step, or down) is observed from now
        begin = at if via == "clock" else now
        self._new_episode(p, begin, home=None)
        p.last_heard_ms = p.rssi_dbm = None
        p.observed_from_ms, p.observed_via = begin, via if via != "clock" else "clock"
        return [self._event("authorisation.started", tag, at, via, {
            **_auth_fields(auth.current), "start_ms": auth.span_start_ms})]

    def _expiring(self, tag: str, state: _TagState, at: int, via: str) -> list[Event]:
        auth = state.auth
        assert auth is not None  # noqa: S101 - set by the caller's branch
        auth.expiring_fired = True
        zone = _zone(auth.current.zone)
        days_left = (auth.current.end - local_date(at, zone)).days + 1
        return [self._event("authorisation.expiring", tag, at, via, {
            **_auth_fields(auth.current), "days_left": days_left})]

    def _expired(self, tag: str, state: _TagState, via: str) -> list[Event]:
        auth = state.auth
        assert auth is not None  # noqa: S101 - set by the caller's branch
        at = auth.current.end_ms
        open_breach = bool(state.live and state.presence.breaches)
        auth.status, auth.closed_ms = _EXPIRED, at
        state.presence = _Presence(episode=state.presence.episode,
                                   ftr_last_open_ms=state.presence.ftr_last_open_ms)
        return [self._event("authorisation.expired", tag, at, via, {
            **_auth_fields(auth.current), "open_breach": open_breach})]

    def _leave_started(self, tag: str, state: _TagState, lv: _LeaveState, at: int,
                       via: str) -> list[Event]:
        lv.phase = _ACTIVE
        return [self._event("leave.started", tag, at, via, _leave_fields(lv))]

    @staticmethod
    def _leave_skipped(lv: _LeaveState) -> list[Event]:
        lv.phase, lv.late = _OVER, _SETTLED
        return []

    def _leave_ended(self, tag: str, state: _TagState, lv: _LeaveState, at: int,
                     via: str) -> list[Event]:
        lv.phase = _OVER
        home = state.presence.home
        if home is True:
            lv.late = _SETTLED
        return [self._event("leave.ended", tag, at, via, {
            **_leave_fields(lv), "reason": "revoked" if lv.revoked else "end", "home": home})]

    def _late(self, tag: str, state: _TagState, lv: _LeaveState, base: int, at: int,  # noqa: PLR0917
              via: str) -> list[Event]:
        p = state.presence
        if (p.home is True or p.since_ms is None or p.since_ms > base
                or any(o.leave.start_ms <= at < o.end_ms for o in state.leaves)):
            # back by then (and maybe away again: not this leave's matter), or away on the
            # next leave
            lv.late = _SETTLED
            return []
        lv.late = _FIRED
        p.breaches += 1
        p.first_breach = p.first_breach or _LATE
        return [self._event(_LATE, tag, at, via, {
            **_leave_fields(lv), "grace_min": lv.leave.grace_min,
            "absent_since_ms": p.since_ms, "episode": p.episode})]

    def _breach(self, tag: str, state: _TagState, kind: str, piece: _Piece,
                at: int) -> list[Event]:
        p, rules = state.presence, state.rules
        assert rules is not None  # noqa: S101 - set by the caller's branch
        assert p.since_ms is not None  # noqa: S101 - set by the caller's branch
        p.breaches += 1
        p.first_breach = p.first_breach or kind
        p.last_breach_open_ms = piece.open_ms
        via = "clock"
        if kind == _FAILED:
            p.ftr_last_open_ms = piece.open_ms
            begin = max(p.observed_from_ms or 0, state.rules_from_ms or 0)
            if begin > piece.open_ms:  # the obligation began before it was observed
                via = ("command" if state.rules_from_ms is not None
                       and state.rules_from_ms > (p.observed_from_ms or 0) else p.observed_via)
        return [self._event(kind, tag, at, via, {
            "episode": p.episode, "window": piece.occurrence.describe(),
            "open_ms": piece.open_ms, "close_ms": piece.close_ms, "opened_by": piece.opener,
            "absent_since_ms": p.since_ms, "grace_min": rules.grace_min})]


def _too_many_tags() -> Refusal:
    return Refusal("too_many_tags", "tag", f"this gateway holds rules for {MAX_TAGS} tags "
                   "already: unpair one first")


def _renewal_refusal(current: Authorisation, new: Authorisation,
                     state: _TagState | None) -> Refusal | None:
    if state is not None and new.document in state.documents:
        return Refusal("document_reused", "document", f"document {new.document!r} was used "
                       f"already for tag {new.tag}")
    if new.zone != current.zone:
        return Refusal("zone_mismatch", "zone", f"the authorisation in force is in "
                       f"{current.zone}: a renewal keeps the zone (end it and start anew)")
    if new.start < current.start:
        return Refusal("starts_before_current", "start", f"a renewal starts on or after "
                       f"{current.start}, the start of the authorisation in force")
    if new.start > current.end + dt.timedelta(days=1):
        return Refusal("gap_after_current", "start", f"a renewal starts at the latest on "
                       f"{current.end + dt.timedelta(days=1)}, the day after the authorisation "
                       "in force ends; set a new one once it has ended")
    if new.end <= current.end:
        return Refusal("does_not_extend", "end", f"a renewal ends after {current.end}, the "
                       "end of the authorisation in force")
    return None


def _leave_refusal(leave: Leave, state: _TagState | None, now: int) -> Refusal | None:
    if leave.end_ms <= now:
        return Refusal("leave_over", "end_ms", "the leave ended already")
    if state is None:
        return None
    for lv in state.leaves:
        if lv.leave.start_ms < leave.end_ms and leave.start_ms < lv.end_ms:
            return Refusal("overlapping_leave", "start_ms", f"the leave overlaps leave "
                           f"{lv.leave.leave_id!r}")
    if len(state.leaves) >= MAX_LEAVES:
        return Refusal("too_many_leaves", "leave_id", f"tag {leave.tag} holds {MAX_LEAVES} "
                       "leaves: revoke one, or wait until one has ended")
    return None


def _auth_fields(auth: Authorisation) -> dict[str, JSON]:
    return {"document": auth.document, "basis": auth.basis.value, "article": "29",
            "item": auth.basis.item, "approver": auth.approver, "start": auth.start.isoformat(),
            "end": auth.end.isoformat(), "zone": auth.zone, "end_ms": auth.end_ms}


def _leave_fields(lv: _LeaveState) -> dict[str, JSON]:
    return {"leave_id": lv.leave.leave_id, "document": lv.leave.document,
            "start_ms": lv.leave.start_ms, "end_ms": lv.end_ms}


# -- persistence ----------------------------------------------------------------------------------
def _dump_tag(state: _TagState) -> dict[str, JSON]:
    auth = state.auth
    p = state.presence
    return {
        "auth": None if auth is None else {
            "current": auth.current.to_body(), "span_start_ms": auth.span_start_ms,
            "first_document": auth.first_document, "applied_ms": auth.applied_ms,
            "status": auth.status, "started_ms": auth.started_ms,
            "expiring_fired": auth.expiring_fired, "closed_ms": auth.closed_ms},
        "documents": list(state.documents),
        "rules": None if state.rules is None else state.rules.to_body(),
        "rules_from_ms": state.rules_from_ms,
        "leaves": [{"leave": lv.leave.to_body(), "applied_ms": lv.applied_ms,
                    "end_ms": lv.end_ms, "phase": lv.phase, "revoked": lv.revoked,
                    "late": lv.late} for lv in state.leaves],
        "presence": {
            "home": p.home, "since_ms": p.since_ms, "last_heard_ms": p.last_heard_ms,
            "rssi_dbm": p.rssi_dbm, "observed_from_ms": p.observed_from_ms,
            "observed_via": p.observed_via, "episode": p.episode, "breaches": p.breaches,
            "first_breach": p.first_breach, "last_breach_open_ms": p.last_breach_open_ms,
            "ftr_last_open_ms": p.ftr_last_open_ms, "scan_from_ms": p.scan_from_ms},
    }


class _Reader:
    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise SupervisionStateError(f"{where}: not an object")
        self.value: dict[str, Any] = value
        self.where = where

    def get(self, key: str, kind: type) -> Any:
        if key not in self.value:
            raise SupervisionStateError(f"{self.where}.{key}: missing")
        value = self.value[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SupervisionStateError(f"{self.where}.{key}: not a {kind.__name__}")
        return value

    def opt(self, key: str, kind: type) -> Any:
        return None if self.value.get(key, 0) is None else self.get(key, kind)

    def one_of(self, key: str, values: tuple[str, ...]) -> str:
        value = str(self.get(key, str))
        if value not in values:
            raise SupervisionStateError(f"{self.where}.{key}: {value!r} is not one of {values}")
        return value


def _parsed(value: Any, where: str) -> Any:
    if isinstance(value, Refusal):
        raise SupervisionStateError(f"{where}: {value.reason} ({value.field}): {value.detail}")
    return value


def _load_tag(r: _Reader, tag: str) -> _TagState:
    state = _TagState()
    raw_auth = r.opt("auth", dict)
    if raw_auth is not None:
        a = _Reader(raw_auth, f"{r.where}.auth")
        state.auth = _Auth(
            _parsed(parse_authorisation(a.get("current", dict)), f"{a.where}.current"),
            a.get("span_start_ms", int), a.get("first_document", str), a.get("applied_ms", int),
            a.one_of("status", (_PENDING, _LIVE, _EXPIRED, _ENDED)), a.opt("started_ms", int),
            a.get("expiring_fired", bool), a.opt("closed_ms", int))
    documents = r.get("documents", list)
    if len(documents) > MAX_DOCUMENTS or not all(isinstance(d, str) for d in documents):
        raise SupervisionStateError(f"{r.where}.documents: not a list of at most "
                                    f"{MAX_DOCUMENTS} strings")
    state.documents = list(documents)
    raw_rules = r.opt("rules", dict)
    if raw_rules is not None:
        state.rules = _parsed(parse_presence_rules(raw_rules), f"{r.where}.rules")
    state.rules_from_ms = r.opt("rules_from_ms", int)
    leaves = r.get("leaves", list)
    if len(leaves) > MAX_LEAVES:
        raise SupervisionStateError(f"{r.where}.leaves: more than {MAX_LEAVES}")
    for i, raw in enumerate(leaves):
        lr = _Reader(raw, f"{r.where}.leaves[{i}]")
        state.leaves.append(_LeaveState(
            _parsed(parse_leave(lr.get("leave", dict)), f"{lr.where}.leave"),
            lr.get("applied_ms", int), lr.get("end_ms", int),
            lr.one_of("phase", (_PENDING, _ACTIVE, _OVER)), lr.get("revoked", bool),
            lr.one_of("late", (_PENDING, _FIRED, _SETTLED))))
    pr = _Reader(r.get("presence", dict), f"{r.where}.presence")
    home = pr.value.get("home")
    if home is not None and not isinstance(home, bool):
        raise SupervisionStateError(f"{pr.where}.home: not a boolean or null")
    first = pr.value.get("first_breach")
    if first not in (None, _VIOLATION, _FAILED, _LATE):
        raise SupervisionStateError(f"{pr.where}.first_breach: {first!r}")
    state.presence = _Presence(
        home, pr.opt("since_ms", int), pr.opt("last_heard_ms", int), pr.opt("rssi_dbm", int),
        pr.opt("observed_from_ms", int),
        pr.one_of("observed_via", ("clock", "time.step", "restart")), pr.get("episode", int),
        pr.get("breaches", int), first, pr.opt("last_breach_open_ms", int),
        pr.opt("ftr_last_open_ms", int), pr.opt("scan_from_ms", int))
    for value, what in ((state.auth and state.auth.current.tag, "auth"),
                        (state.rules and state.rules.tag, "rules")):
        if value not in (None, tag):
            raise SupervisionStateError(f"{r.where}.{what}: for tag {value}, not {tag}")
    if any(lv.leave.tag != tag for lv in state.leaves):
        raise SupervisionStateError(f"{r.where}.leaves: a leave of another tag")
    return state
