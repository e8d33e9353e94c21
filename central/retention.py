"""Retention: a closed case's records are kept for the configured period, then purged,
and each purge is a signed entry in the platform's own hash-chained action log.

``ingest close-case --db URL --gw ID --ended T [--reason supervision_ended|
authorisation_lapsed] [--keep-days N]`` records when the person's supervision ended
(解矫) or the authorisation lapsed, and the deadline: *ended* + *keep days*
(:data:`DEFAULT_KEEP_DAYS` is a placeholder until the law's figure is set).

``ingest purge --db URL --key FILE [--now T] [--limit N]`` purges, for each gateway past
its deadline (at most *limit* a run), in one transaction per gateway, every row that holds
the person's data: its records, held records, quarantined payloads, the bytes of its
conflicting records, its alarms, their deliveries and unrouted rows, and the bytes of
every command the platform sent it (``commands.data``: the tags, authorisation decisions,
presence rules, leaves and sealed device keys of the case, docs/commands.md). It keeps
the registration, the key history (identities, sessions), the seq bookkeeping (chain
breaks, reorders, gaps, heads), the conflicts' digests, each command's bookkeeping (cseq,
kind, digest, key, dates, outcome: what was commanded when, and how it was answered,
without what it said) and the counts; the gateway is decommissioned (a device handed out
again needs a new gateway id; a decommissioned gateway takes no command, so its command
numbering never restarts). It appends one entry to ``platform_actions``::

    {"format": "smartcorr-platform-action/1", "n": 7, "action": "purge", "gw": …,
     "case": …, "reason": …, "ended_at": …, "keep_days": …, "purge_after": …,
     "at": …, "by": …, "records": 1234, "first_seq": 1, "last_seq": 1240,
     "seq_ranges": [[1, 9], [12, 1240]], "records_sha256": b64u(SHA-256 of the records'
     digests concatenated in seq order), "removed": {…counts…, "commands": 12},
     "commands_sha256": b64u(SHA-256 of the purged commands' digests (hex, as
     ``commands.sha256`` keeps them) concatenated in (cseq, id) order),
     "prev": b64u(SHA-256 of entry n-1's canonical bytes; 32 zero bytes for n = 1),
     "alg": "ed25519-sha256", "kid": …}

stored as its canonical bytes (:func:`core.record.canonical`) with an Ed25519 signature
over them by the platform's action key (``--key``: a PKCS#8 PEM or a raw 32-byte seed,
mode 0600). ``records_sha256`` lets anyone holding an export made before the purge show
that its records are the ones purged (:func:`records_sha256`). A gateway with nothing
left to purge logs nothing; a second run is a no-op.

``ingest actions --db URL [--verify --key-pub FILE]`` lists the log and checks it: each
entry canonical, its columns equal to what it signs, ``n`` without holes, each ``prev``
the hash of the entry before, each signature good, and every purge a gateway's retention
row points to present. Removing the *last* entries cannot be seen from the log alone: the
command prints the head (``n`` and the SHA-256 of the last entry) to be noted outside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from central.db import (
    RETENTION_SCHEMA_VERSION,
    Database,
    DatabaseError,
    Transaction,
    open_db,
)
from core.errors import UserError
from core.record import JSON, b64u, canonical, unb64u
from core.suites import ED25519, SoftwareKey, Verifier

ACTION_FORMAT = "smartcorr-platform-action/1"
REASONS = ("supervision_ended", "authorisation_lapsed")
#: PLACEHOLDER: how long a closed case's records are kept, days (5 years). The figure
#: the law or the authorisation sets replaces it; ``--keep-days`` overrides it per case.
DEFAULT_KEEP_DAYS = 5 * 365
#: Gateways purged at most per ``purge`` run (each in its own transaction).
DEFAULT_LIMIT = 100
DAY_MS = 86_400_000
GENESIS = bytes(32)
_LOCK_ACTIONS = 0x5C04  # PostgreSQL advisory lock name space (central/db.py has 0x5C01-3)
EXIT_OK, EXIT_PROBLEM = 0, 1


class RetentionError(UserError):
    """A close-case or purge that cannot be done as asked; the message says why."""


def _now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def _os_user() -> str:
    from central.export import os_user

    return os_user()


# --- the action key -------------------------------------------------------------------


def load_action_key(path: Path) -> SoftwareKey:
    """The platform's Ed25519 action key from *path* (a PKCS#8 PEM, unencrypted, or the raw
    32-byte seed); refused when the file is readable or writable by anyone but its owner."""
    try:
        st = path.stat()
    except OSError as exc:
        raise RetentionError(f"--key {path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise RetentionError(f"--key {path}: not a regular file")
    if st.st_mode & 0o077:
        raise RetentionError(f"--key {path} is accessible to others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}, and "
                             "consider the key exposed")
    data = path.read_bytes()
    if len(data) == 32:
        return SoftwareKey(ED25519, data)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise RetentionError(f"--key {path}: not an unencrypted PKCS#8 PEM private key "
                                 f"({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise RetentionError(f"--key {path}: not an Ed25519 key")
        return SoftwareKey(ED25519, key.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                      NoEncryption()))
    raise RetentionError(f"--key {path}: expected a PKCS#8 PEM Ed25519 private key or a "
                         f"raw 32-byte seed ({len(data)} bytes found)")


def load_action_public(path: Path) -> Verifier:
    """The action key's public half from *path*: a PEM ``PUBLIC KEY``, the raw 32 bytes,
    or their base64url text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RetentionError(f"--key-pub {path}: cannot read it ({exc.strerror})") from None
    raw: bytes | None = None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(data)
        except ValueError as exc:
            raise RetentionError(f"--key-pub {path}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise RetentionError(f"--key-pub {path}: not an Ed25519 public key")
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    elif len(data) == 32:
        raw = data
    else:
        try:
            raw = unb64u(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise RetentionError(f"--key-pub {path}: expected a PEM Ed25519 public key, its "
                             "raw 32 bytes or their base64url")
    return Verifier(ED25519, raw)


def write_action_key(path: Path) -> Verifier:
    """A new action key: the PKCS#8 PEM at *path* (mode 0600, never replaced) and its
    public key at *path*.pub."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise RetentionError(f"--out {path} exists: never replaced (choose another "
                             "path)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    Path(f"{path}.pub").write_bytes(pub)
    return Verifier(ED25519, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


# --- closing a case -------------------------------------------------------------------


def close_case(db: Database, gw: str, ended_ms: int, *, reason: str = "supervision_ended",
               keep_days: int = DEFAULT_KEEP_DAYS, by: str | None = None,
               now_ms: int | None = None) -> dict[str, JSON]:
    """Record that *gw*'s case ended at *ended_ms* for *reason*: its data is purged after
    *ended_ms* + *keep_days*. Closing again changes the dates (the last word counts)."""
    if reason not in REASONS:
        raise RetentionError(f"--reason {reason!r}: one of {', '.join(REASONS)}")
    if keep_days < 0:
        raise RetentionError(f"--keep-days {keep_days}: 0 or more")
    now = _now_ms() if now_ms is None else now_ms
    purge_after = ended_ms + keep_days * DAY_MS
    by = by or _os_user()
    with db.transaction() as tx:
        tx.lock_gateway(gw)
        if tx.one("SELECT 1 FROM gateways WHERE gw = ?", (gw,)) is None:
            raise RetentionError(f"gateway {gw!r} is not enrolled: 'ingest gateways --db URL' "
                                 "lists the ids")
        row = tx.one("SELECT case_ref FROM assignments WHERE gw = ?", (gw,))
        case_ref = None if row is None else str(row[0])
        tx.execute("INSERT INTO retention (gw, case_ref, reason, ended_at, keep_days, "
                   "purge_after, closed_at, closed_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT (gw) DO UPDATE SET case_ref = excluded.case_ref, "
                   "reason = excluded.reason, ended_at = excluded.ended_at, "
                   "keep_days = excluded.keep_days, purge_after = excluded.purge_after, "
                   "closed_at = excluded.closed_at, closed_by = excluded.closed_by",
                   (gw, case_ref, reason, ended_ms, keep_days, purge_after, now, by))
    return {"gw": gw, "case": case_ref, "reason": reason, "ended_at": ended_ms,
            "keep_days": keep_days, "purge_after": purge_after, "closed_at": now, "by": by}


# --- purging --------------------------------------------------------------------------


def records_sha256(digests: Iterable[bytes]) -> bytes:
    """SHA-256 of the records' digests concatenated in seq order (give them in order)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.digest()


def _ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _lock_actions(tx: Transaction) -> None:
    """Until the end of the transaction, no other one appends to the action log (SQLite:
    its single writer already serialises)."""
    if tx.backend == "postgresql":
        tx.execute(f"SELECT pg_advisory_xact_lock({_LOCK_ACTIONS}, 0)")


def _head(tx: Transaction) -> tuple[int, bytes]:
    """The last action's n and the SHA-256 of its entry (0 and :data:`GENESIS`: none)."""
    row = tx.one("SELECT n, entry FROM platform_actions ORDER BY n DESC LIMIT 1")
    if row is None:
        return 0, GENESIS
    return int(row[0]), hashlib.sha256(bytes(row[1])).digest()


def append_action(tx: Transaction, key: SoftwareKey, body: dict[str, JSON]) -> dict[str, JSON]:
    """Append *body* (``action``, ``at``, …) to the action log, chained and signed; the
    entry. The caller's transaction holds the log's lock (:func:`_lock_actions`)."""
    n, prev = _head(tx)
    at = body["at"]
    if not isinstance(at, int):
        raise TypeError("an action's 'at' is ms since 1970")
    entry: dict[str, JSON] = {**body, "format": ACTION_FORMAT, "n": n + 1, "prev": b64u(prev),
                              "alg": key.alg, "kid": key.kid}
    data = canonical(entry)
    gw = entry.get("gw")
    tx.execute("INSERT INTO platform_actions (n, action, gw, at, kid, entry, sig) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)",
               (n + 1, str(entry["action"]), None if gw is None else str(gw),
                at, key.kid, data, key.sign(data)))
    return entry


_DUE = ("SELECT r.gw FROM retention r WHERE r.purge_after <= ? AND (r.purged_at IS NULL "
        "OR EXISTS (SELECT 1 FROM records x WHERE x.gw = r.gw) "
        "OR EXISTS (SELECT 1 FROM held x WHERE x.gw = r.gw) "
        "OR EXISTS (SELECT 1 FROM quarantine x WHERE x.gw = r.gw) "
        "OR EXISTS (SELECT 1 FROM alarms x WHERE x.gw = r.gw) "
        "OR EXISTS (SELECT 1 FROM commands x WHERE x.gw = r.gw AND length(x.data) > 0)) "
        "ORDER BY r.purge_after, r.gw LIMIT ?")


def due(db: Database, now_ms: int, limit: int = DEFAULT_LIMIT) -> list[str]:
    """The gateways past their deadline with personal data left (or never purged)."""
    with db.transaction(write=False) as tx:
        return [str(r[0]) for r in tx.all(_DUE, (now_ms, limit))]


def purge(db: Database, key: SoftwareKey, *, now_ms: int | None = None,
          limit: int = DEFAULT_LIMIT, by: str | None = None) -> list[dict[str, JSON]]:
    """Purge up to *limit* gateways past their deadline, one transaction each; the action
    entries appended (none when there was nothing to purge)."""
    if key.alg != ED25519:
        raise RetentionError("the action key must be Ed25519")
    now = _now_ms() if now_ms is None else now_ms
    by = by or _os_user()
    done: list[dict[str, JSON]] = []
    for gw in due(db, now, limit):
        entry = purge_gateway(db, key, gw, now_ms=now, by=by)
        if entry is not None:
            done.append(entry)
    return done


def purge_gateway(db: Database, key: SoftwareKey, gw: str, *, now_ms: int,
                  by: str) -> dict[str, JSON] | None:
    """Purge *gw* if it is past its deadline, in one transaction; its action entry, or
    None if there was nothing to purge (nothing is logged then)."""
    with db.transaction() as tx:
        tx.lock_gateway(gw)  # no message of gw is ingested meanwhile
        _lock_actions(tx)
        if tx.backend == "postgresql":  # the routing lock: no delivery routed meanwhile
            tx.one("SELECT last_alarm FROM routing WHERE name = 'alarms' FOR UPDATE")
        row = tx.one("SELECT case_ref, reason, ended_at, keep_days, purge_after, purged_at "
                     "FROM retention WHERE gw = ?", (gw,))
        if row is None or int(row[4]) > now_ms:
            return None
        case_ref, reason, ended_at, keep_days, purge_after, purged_at = row
        recs = tx.all("SELECT seq, digest FROM records WHERE gw = ? ORDER BY seq", (gw,))
        sent = [str(r[0]) for r in tx.all(
            "SELECT sha256 FROM commands WHERE gw = ? AND length(data) > 0 ORDER BY cseq, id",
            (gw,))]
        alarm_of_gw = "SELECT id FROM alarms WHERE gw = ?"
        removed: dict[str, JSON] = {
            "held": tx.execute("DELETE FROM held WHERE gw = ?", (gw,)),
            "quarantine": tx.execute("DELETE FROM quarantine WHERE gw = ?", (gw,)),
            "conflicts": tx.execute("UPDATE conflicts SET data = ? WHERE gw = ? AND "
                                    "data <> ?", (b"", gw, b"")),
            "deliveries": tx.execute(f"DELETE FROM deliveries WHERE alarm_id IN "  # noqa: S608
                                     f"({alarm_of_gw})", (gw,)),
            "unrouted": tx.execute(f"DELETE FROM unrouted WHERE gw = ? OR alarm_id IN "  # noqa: S608
                                   f"({alarm_of_gw})", (gw, gw)),
            "alarms": tx.execute("DELETE FROM alarms WHERE gw = ?", (gw,)),
            # what the platform commanded: the bytes go, the bookkeeping stays
            "commands": tx.execute("UPDATE commands SET data = ? WHERE gw = ? AND "
                                   "length(data) > 0", (b"", gw)),
        }
        tx.execute("DELETE FROM records WHERE gw = ?", (gw,))
        tx.execute("UPDATE gateways SET status = 'decommissioned', decommissioned_at = ? "
                   "WHERE gw = ? AND status = 'active'", (now_ms, gw))
        if not recs and not any(removed.values()):
            if purged_at is None:  # nothing was ever stored: done, nothing to log
                tx.execute("UPDATE retention SET purged_at = ? WHERE gw = ?", (now_ms, gw))
            return None
        seqs = [int(r[0]) for r in recs]
        entry = append_action(tx, key, {
            "action": "purge", "gw": gw, "case": case_ref, "reason": str(reason),
            "ended_at": int(ended_at), "keep_days": int(keep_days),
            "purge_after": int(purge_after), "at": now_ms, "by": by,
            "records": len(recs), "first_seq": seqs[0] if seqs else None,
            "last_seq": seqs[-1] if seqs else None, "seq_ranges": list(_ranges(seqs)),
            "records_sha256": b64u(records_sha256(bytes(r[1]) for r in recs)),
            "removed": removed,
            "commands_sha256": b64u(records_sha256(d.encode() for d in sent))})
        tx.execute("UPDATE retention SET purged_at = ?, purged_records = purged_records + ?, "
                   "last_action = ? WHERE gw = ?", (now_ms, len(recs), entry["n"], gw))
    return entry


# --- the action log -------------------------------------------------------------------


@dataclass
class ActionCheck:
    """The log read back: its entries, and each problem found, naming the entry."""

    entries: list[dict[str, JSON]] = field(default_factory=list)
    problems: list[dict[str, JSON]] = field(default_factory=list)
    head: dict[str, JSON] = field(default_factory=dict)
    verified: bool = False  # signatures checked (a public key was given)

    def problem(self, n: int | None, text: str) -> None:
        self.problems.append({"n": n, "problem": text})

    def as_json(self) -> dict[str, JSON]:
        return {"entries": list(self.entries), "problems": list(self.problems),
                "head": dict(self.head), "signatures_checked": self.verified,
                "valid": not self.problems if self.verified else None}


def read_actions(db: Database, public: Verifier | None = None) -> ActionCheck:
    """The action log, checked: the chain always, the signatures with *public*."""
    check = ActionCheck(verified=public is not None)
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT n, action, gw, at, kid, entry, sig FROM platform_actions "
                      "ORDER BY n")
        pointers = [(str(r[0]), int(r[1])) for r in tx.all(
            "SELECT gw, last_action FROM retention WHERE last_action IS NOT NULL "
            "ORDER BY gw")]
    prev, expect = GENESIS, 1
    for n_, action, gw, at, kid, raw, sig in rows:
        n, data = int(n_), bytes(raw)
        if n != expect:
            missing = f"{expect}" if n == expect + 1 else f"{expect} to {n - 1}"
            check.problem(expect, f"action {missing} removed from the log (the log jumps "
                                  f"to {n})")
        try:
            entry = json.loads(data)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            check.problem(n, f"action {n}: its entry is not a JSON object: changed")
            prev, expect = hashlib.sha256(data).digest(), n + 1
            continue
        check.entries.append({**entry, "sig": b64u(bytes(sig))})
        if canonical(entry) != data:
            check.problem(n, f"action {n}: its entry is not canonical JSON: changed")
        stored = {"n": n, "action": action, "gw": gw, "at": int(at), "kid": kid}
        for name, value in stored.items():
            if entry.get(name) != value:
                check.problem(n, f"action {n}: the column {name} ({value!r}) is not what "
                                 f"the entry signs ({entry.get(name)!r}): changed")
        if entry.get("prev") != b64u(prev):
            check.problem(n, f"action {n}: prev is not the SHA-256 of action {n - 1}'s "
                             f"entry: action {n - 1} was changed or removed" if n > 1 else
                             f"action {n}: prev is not the genesis (32 zero bytes)")
        if public is not None:
            if kid != public.kid or entry.get("kid") != public.kid:
                check.problem(n, f"action {n}: signed by key {kid}, not by the action key "
                                 f"{public.kid} given")
            elif not public.verify(bytes(sig), data):
                check.problem(n, f"action {n}: bad signature: its entry or signature was "
                                 "changed")
        prev, expect = hashlib.sha256(data).digest(), n + 1
    present = {int(r[0]) for r in rows}
    for gw, n in pointers:
        if n not in present:
            check.problem(n, f"action {n} (the purge of {gw}, per its retention row) is "
                             "missing from the log: removed")
    check.head = {"n": expect - 1, "sha256": b64u(prev)}
    return check


# --- the command line (central/cli.py adds these) -------------------------------------


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """``close-case``, ``purge``, ``actions``, ``action-key``."""
    close = sub.add_parser("close-case", help="record that a gateway's case ended "
                                              "(supervision ended, authorisation lapsed) "
                                              "and when its data is purged")
    db_arg(close)
    close.add_argument("--gw", required=True, metavar="ID", help="the gateway's id")
    close.add_argument("--ended", required=True, metavar="T",
                       help="when it ended: ISO 8601 UTC or ms since 1970")
    close.add_argument("--reason", choices=REASONS, default="supervision_ended",
                       help="why the case ended (default supervision_ended)")
    close.add_argument("--keep-days", type=int, default=DEFAULT_KEEP_DAYS, metavar="N",
                       help=f"keep the data this long after --ended (default "
                            f"{DEFAULT_KEEP_DAYS}: a placeholder for the legal period)")
    close.add_argument("--by", metavar="NAME", help="who closes it (default: the OS user)")
    close.add_argument("--json", action="store_true", help="print one JSON object")

    prg = sub.add_parser("purge", help="purge the personal data of the gateways past their "
                                       "retention deadline; each purge a signed action")
    db_arg(prg)
    prg.add_argument("--key", required=True, type=Path, metavar="FILE",
                     help="the platform's Ed25519 action key (PKCS#8 PEM or raw 32-byte "
                          "seed, mode 0600)")
    prg.add_argument("--now", metavar="T", help="the time to compare deadlines with "
                                                "(default: now)")
    prg.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                     help=f"gateways purged at most this run (default {DEFAULT_LIMIT})")
    prg.add_argument("--by", metavar="NAME", help="who purges (default: the OS user)")
    prg.add_argument("--json", action="store_true", help="print one JSON object")

    act = sub.add_parser("actions", help="the platform's signed action log (purges); "
                                         "--verify checks it: exit 0 valid, 1 problems")
    db_arg(act)
    act.add_argument("--verify", action="store_true",
                     help="check every action's signature and the chain between them")
    act.add_argument("--key-pub", type=Path, metavar="FILE",
                     help="the action key's public key (PEM, raw 32 bytes or base64url)")
    act.add_argument("--json", action="store_true", help="print one JSON object")

    key = sub.add_parser("action-key", help="make the platform's action key (FILE, mode "
                                            "0600) and its public key (FILE.pub)")
    key.add_argument("--out", required=True, type=Path, metavar="FILE",
                     help="where the private key goes (never replaced; the public key "
                          "goes to FILE.pub)")
    key.add_argument("--json", action="store_true", help="print one JSON object")


def _open(url: str, *, write: bool) -> Database:
    """The database at *url* (it must exist); migrated to the retention tables when
    *write*."""
    try:
        db = open_db(url, migrate=False)
        if write and db.version() < RETENTION_SCHEMA_VERSION:
            db.migrate()
    except DatabaseError as exc:
        raise RetentionError(str(exc)) from None
    return db


def _emit(args: argparse.Namespace, out: dict[str, JSON], text: str) -> None:
    print(json.dumps(out, sort_keys=True) if args.json else text, flush=True)


def _close_case(args: argparse.Namespace) -> int:
    from central.export import iso, parse_time

    with _open(args.db, write=True) as db:
        out = close_case(db, args.gw, parse_time(args.ended), reason=args.reason,
                         keep_days=args.keep_days, by=args.by)
    _emit(args, out, f"gw={out['gw']} case={out['case']} reason={out['reason']} ended "
                     f"{iso(args_int(out['ended_at']))}; data kept until "
                     f"{iso(args_int(out['purge_after']))}, then purged")
    return 0


def args_int(value: JSON) -> int:
    return int(value) if isinstance(value, int) else 0


def _purge(args: argparse.Namespace) -> int:
    from central.export import parse_time

    if args.limit < 1:
        raise RetentionError(f"--limit {args.limit}: 1 or more")
    key = load_action_key(args.key)
    now = parse_time(args.now) if args.now else None
    with _open(args.db, write=True) as db:
        entries = purge(db, key, now_ms=now, limit=args.limit, by=args.by)
    for entry in entries:
        _emit(args, entry, f"action {entry['n']}: purged {entry['gw']} (case "
                           f"{entry['case']}, {entry['reason']}): {entry['records']} records, "
                           f"seqs {entry['seq_ranges']}, removed {entry['removed']}")
    if not entries and not args.json:
        print("nothing to purge")
    return 0


def _actions(args: argparse.Namespace) -> int:
    if args.verify and args.key_pub is None:
        raise RetentionError("--verify needs --key-pub FILE (the action key's public key)")
    public = load_action_public(args.key_pub) if args.key_pub else None
    with _open(args.db, write=False) as db:
        if db.version(write=False) < RETENTION_SCHEMA_VERSION:
            check = ActionCheck(verified=public is not None, head={"n": 0,
                                                                   "sha256": b64u(GENESIS)})
        else:
            check = read_actions(db, public)
    if args.json:
        print(json.dumps(check.as_json(), sort_keys=True))
    else:
        for e in check.entries:
            print(f"#{e.get('n')} {e.get('action')} {e.get('gw')} at {e.get('at')} by "
                  f"{e.get('by')}: {e.get('records')} records {e.get('seq_ranges')}")
        for p in check.problems:
            print(f"PROBLEM {p['problem']}")
        print(f"head: action {check.head['n']}, SHA-256 {check.head['sha256']} (note it "
              "outside the database)")
        if public is not None and not check.problems:
            print(f"valid: {len(check.entries)} action(s), chained and signed by "
                  f"{public.kid}")
    return EXIT_PROBLEM if args.verify and check.problems else EXIT_OK


def _action_key(args: argparse.Namespace) -> int:
    public = write_action_key(args.out)
    _emit(args, {"key": str(args.out), "public": f"{args.out}.pub", "kid": public.kid},
          f"wrote {args.out} (mode 0600) and {args.out}.pub; kid {public.kid}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "close-case": _close_case, "purge": _purge, "actions": _actions,
    "action-key": _action_key}
