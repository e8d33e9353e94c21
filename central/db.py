"""The platform's storage: one small API over SQLite (embedded) and PostgreSQL (production).

``open_db("sqlite:///path/to/ingest.db")`` or ``open_db("postgresql://user@host/db")``
(psycopg 3) gives a :class:`Database`. Everything that belongs together is written in one
transaction (:meth:`Database.transaction`), with the SQL written once: ``?`` placeholders,
translated for psycopg. The schema is versioned (``schema_version``) and migrated by
:meth:`Database.migrate`, safe when many consumers start at once: PostgreSQL serialises it
with a transaction-scoped advisory lock, SQLite with ``BEGIN IMMEDIATE``.

Concurrency between consumers: every message of one gateway is ingested in a transaction
that first takes that gateway's lock (:meth:`Transaction.lock_gateway`: an advisory lock
on PostgreSQL; SQLite's single writer already serialises), so the trust state, the
chain links and the held records of a gateway change one message at a time whichever
consumer holds it, and different gateways proceed in parallel on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from core.errors import UserError

#: Advisory lock name spaces (PostgreSQL's two-int form: namespace, key).
_LOCK_MIGRATE = 0x5C01
_LOCK_GATEWAY = 0x5C02
_LOCK_ALARMS = 0x5C03
#: How long SQLite waits for another process's write transaction, ms.
SQLITE_BUSY_MS = 30_000

Param = int | str | bytes | None
Row = tuple[Any, ...]


class DatabaseError(UserError):
    """The database URL is unusable or the database cannot be opened or migrated."""


class NoDatabaseError(DatabaseError):
    """Opened without *migrate* (to read), and there is no ingest database at the URL:
    no file, or no schema in it. Nothing was created."""


def no_database_message(url: str) -> str:
    return (f"no ingest database at {url}: check the path, or enrol a gateway first "
            "(ingest enrol --db URL --registration signing.pub)")


class StorageError(Exception):
    """A read or a write failed in the database itself (connection lost, disk full,
    locked for too long): nothing of the transaction was committed; try again."""


# Migrations: each version a list of statements, per backend. Never edit a released
# version: add the next one.
_COMMON_V1 = [
    """CREATE TABLE gateways (
        gw TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('active', 'decommissioned')),
        registration TEXT NOT NULL,
        tls_fingerprint TEXT,
        enrolled_at BIGINT NOT NULL,
        decommissioned_at BIGINT
    )""",
    """CREATE TABLE identities (
        gw TEXT NOT NULL REFERENCES gateways (gw),
        from_seq BIGINT NOT NULL,
        kid TEXT NOT NULL,
        alg TEXT NOT NULL,
        pubkey {blob} NOT NULL,
        key_class TEXT NOT NULL,
        PRIMARY KEY (gw, from_seq)
    )""",
    """CREATE TABLE sessions (
        gw TEXT NOT NULL REFERENCES gateways (gw),
        from_seq BIGINT NOT NULL,
        kid TEXT NOT NULL,
        alg TEXT NOT NULL,
        pubkey {blob} NOT NULL,
        boot BIGINT NOT NULL,
        until_mono BIGINT NOT NULL,
        identity_kid TEXT NOT NULL,
        key_class TEXT NOT NULL,
        PRIMARY KEY (gw, from_seq)
    )""",
    "CREATE INDEX sessions_kid ON sessions (gw, kid, from_seq)",
    """CREATE TABLE records (
        gw TEXT NOT NULL REFERENCES gateways (gw),
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        prio TEXT NOT NULL,
        digest {blob} NOT NULL,
        prev {blob} NOT NULL,
        boot BIGINT NOT NULL,
        t BIGINT NOT NULL,
        kid TEXT NOT NULL,
        key_class TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (gw, seq)
    )""",
    "CREATE INDEX records_class ON records (gw, prio, seq)",
    """CREATE TABLE conflicts (
        id {serial},
        gw TEXT NOT NULL,
        seq BIGINT NOT NULL,
        stored_digest {blob} NOT NULL,
        digest {blob} NOT NULL,
        data {blob} NOT NULL,
        received_at BIGINT NOT NULL,
        UNIQUE (gw, seq, digest)
    )""",
    """CREATE TABLE quarantine (
        id {serial},
        gw TEXT,
        topic TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        size BIGINT NOT NULL,
        sha256 {blob} NOT NULL,
        payload {blob} NOT NULL,
        received_at BIGINT NOT NULL
    )""",
    "CREATE INDEX quarantine_gw ON quarantine (gw, reason)",
    """CREATE TABLE held (
        gw TEXT NOT NULL REFERENCES gateways (gw),
        seq BIGINT NOT NULL,
        sha256 {blob} NOT NULL,
        data {blob} NOT NULL,
        received_at BIGINT NOT NULL,
        PRIMARY KEY (gw, seq, sha256)
    )""",
    """CREATE TABLE chain_breaks (
        gw TEXT NOT NULL,
        seq BIGINT NOT NULL,
        found_at BIGINT NOT NULL,
        PRIMARY KEY (gw, seq)
    )""",
    """CREATE TABLE reorders (
        gw TEXT NOT NULL,
        seq BIGINT NOT NULL,
        prio TEXT NOT NULL,
        after_seq BIGINT NOT NULL,
        found_at BIGINT NOT NULL,
        PRIMARY KEY (gw, seq)
    )""",
    """CREATE TABLE gaps_explained (
        gw TEXT NOT NULL,
        by_seq BIGINT NOT NULL,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        PRIMARY KEY (gw, by_seq, first_seq)
    )""",
    """CREATE TABLE alarms (
        id {serial},
        gw TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        t BIGINT NOT NULL,
        stored_at BIGINT NOT NULL,
        UNIQUE (gw, seq)
    )""",
]
_TYPES = {
    "sqlite": {"blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"},
}
#: Version 2: the highest committed seq each gateway's verified head statements
#: announced (core/head.py), so a tail that never arrives is a gap.
_COMMON_V2 = [
    """CREATE TABLE heads (
        gw TEXT PRIMARY KEY REFERENCES gateways (gw),
        committed_seq BIGINT NOT NULL,
        boot BIGINT NOT NULL,
        kid TEXT NOT NULL,
        received_at BIGINT NOT NULL
    )""",
]
#: Version 3: alarms to the justice offices (central/routing.py, docs/alarms.md): the
#: offices (webhook and its secret), each gateway's case and office, and per (alarm,
#: office) a delivery row: the ``alarms`` table is the outbox, ``routing`` its cursor.
_COMMON_V3 = [
    """CREATE TABLE offices (
        office TEXT PRIMARY KEY,
        webhook TEXT,
        secret {blob} NOT NULL,
        added_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )""",
    """CREATE TABLE assignments (
        gw TEXT PRIMARY KEY REFERENCES gateways (gw),
        case_ref TEXT NOT NULL,
        office TEXT NOT NULL REFERENCES offices (office),
        assigned_at BIGINT NOT NULL
    )""",
    """CREATE TABLE routing (
        name TEXT PRIMARY KEY,
        last_alarm BIGINT NOT NULL
    )""",
    "INSERT INTO routing (name, last_alarm) VALUES ('alarms', 0)",
    """CREATE TABLE deliveries (
        id {serial},
        alarm_id BIGINT NOT NULL REFERENCES alarms (id),
        office TEXT NOT NULL REFERENCES offices (office),
        case_ref TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'pull')),
        routed_at BIGINT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at BIGINT NOT NULL,
        claimed_by TEXT,
        claim_until BIGINT,
        last_attempt_at BIGINT,
        last_status INTEGER,
        last_error TEXT,
        delivered_at BIGINT,
        UNIQUE (alarm_id, office)
    )""",
    "CREATE INDEX deliveries_due ON deliveries (state, next_at)",
    "CREATE INDEX deliveries_office ON deliveries (office, id)",
    """CREATE TABLE unrouted (
        alarm_id BIGINT PRIMARY KEY REFERENCES alarms (id),
        gw TEXT NOT NULL,
        found_at BIGINT NOT NULL
    )""",
]
#: The schema version that has the tables of central/routing.py.
ROUTING_SCHEMA_VERSION = 3
#: Version 4: retention (central/retention.py): when each gateway's case ended, until
#: when its records are kept, what was purged; and the hash-chained, signed log of the
#: platform's own actions (a purge is one).
_COMMON_V4 = [
    """CREATE TABLE retention (
        gw TEXT PRIMARY KEY REFERENCES gateways (gw),
        case_ref TEXT,
        reason TEXT NOT NULL CHECK (reason IN ('supervision_ended', 'authorisation_lapsed')),
        ended_at BIGINT NOT NULL,
        keep_days INTEGER NOT NULL,
        purge_after BIGINT NOT NULL,
        closed_at BIGINT NOT NULL,
        closed_by TEXT NOT NULL,
        purged_at BIGINT,
        purged_records BIGINT NOT NULL DEFAULT 0,
        last_action BIGINT
    )""",
    "CREATE INDEX retention_due ON retention (purge_after)",
    """CREATE TABLE platform_actions (
        n BIGINT PRIMARY KEY,
        action TEXT NOT NULL,
        gw TEXT,
        at BIGINT NOT NULL,
        kid TEXT NOT NULL,
        entry {blob} NOT NULL,
        sig {blob} NOT NULL
    )""",
]
#: The schema version that has the tables of central/retention.py.
RETENTION_SCHEMA_VERSION = 4
#: Version 5: enrolment and revocation (central/ca.py, docs/enrolment.md): a gateway's
#: status may be ``revoked`` (when, why); every certificate the platform's CA issued (the
#: CRL is made from it); the one-time claim tokens, stored hashed. SQLite cannot change a
#: CHECK: the gateways table is rebuilt, its rows copied, with foreign keys checked at
#: the commit (``defer_foreign_keys``: dropped and re-inserted parents leave none orphan).
_GATEWAYS_V5_STATUS = {
    "sqlite": [
        "PRAGMA defer_foreign_keys = ON",
        "CREATE TABLE gateways_v4 AS SELECT gw, status, registration, tls_fingerprint, "
        "enrolled_at, decommissioned_at FROM gateways",
        "DROP TABLE gateways",
        """CREATE TABLE gateways (
        gw TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('active', 'decommissioned', 'revoked')),
        registration TEXT NOT NULL,
        tls_fingerprint TEXT,
        enrolled_at BIGINT NOT NULL,
        decommissioned_at BIGINT,
        revoked_at BIGINT,
        revoke_reason TEXT
    )""",
        "INSERT INTO gateways (gw, status, registration, tls_fingerprint, enrolled_at, "
        "decommissioned_at) SELECT gw, status, registration, tls_fingerprint, enrolled_at, "
        "decommissioned_at FROM gateways_v4",
        "DROP TABLE gateways_v4",
    ],
    "postgresql": [
        "ALTER TABLE gateways DROP CONSTRAINT gateways_status_check",
        "ALTER TABLE gateways ADD CONSTRAINT gateways_status_check "
        "CHECK (status IN ('active', 'decommissioned', 'revoked'))",
        "ALTER TABLE gateways ADD COLUMN revoked_at BIGINT",
        "ALTER TABLE gateways ADD COLUMN revoke_reason TEXT",
    ],
}
_COMMON_V5 = [
    """CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        gw TEXT REFERENCES gateways (gw),
        cn TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        kid TEXT,
        request_sha256 TEXT,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        pem TEXT NOT NULL,
        revoked_at BIGINT,
        revoke_reason TEXT
    )""",
    "CREATE INDEX certificates_gw ON certificates (gw)",
    "CREATE INDEX certificates_request ON certificates (request_sha256)",
    """CREATE TABLE claims (
        hash {blob} PRIMARY KEY,
        claim_id TEXT NOT NULL,
        gw TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        used_at BIGINT,
        used_by TEXT,
        request_sha256 TEXT
    )""",
    "CREATE INDEX claims_open ON claims (used_at, expires_at)",
]
#: The schema version that has the tables of central/ca.py.
CA_SCHEMA_VERSION = 5
#: Version 6: the seq of a gateway's verified ``gateway.decommissioned`` record, its
#: chain's last (``provision decommission``): records after it are refused.
_COMMON_V6 = [
    "ALTER TABLE gateways ADD COLUMN final_seq BIGINT",
]
#: Version 7: the platform's signed commands (central/commands.py, docs/commands.md): each
#: command sent to a gateway, its per-gateway sequence number, its bytes (a device key in
#: it is encrypted to the gateway) and the gateway's answer once its record arrived. A
#: cseq may hold several rows: a command signed anew after its bytes expired unanswered.
_COMMON_V7 = [
    """CREATE TABLE commands (
        id {serial},
        gw TEXT NOT NULL REFERENCES gateways (gw),
        cseq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        sha256 TEXT NOT NULL UNIQUE,
        data {blob} NOT NULL,
        kid TEXT NOT NULL,
        issued_at BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        outcome TEXT,
        outcome_seq BIGINT,
        outcome_at BIGINT
    )""",
    "CREATE INDEX commands_gw ON commands (gw, cseq)",
    "CREATE INDEX commands_waiting ON commands (gw, outcome, not_after)",
]
MIGRATIONS: dict[str, list[list[str]]] = {
    backend: [[sql.format(**types) for sql in version]
              for version in (_COMMON_V1, _COMMON_V2, _COMMON_V3, _COMMON_V4,
                              _GATEWAYS_V5_STATUS[backend] + _COMMON_V5, _COMMON_V6,
                              _COMMON_V7)]
    for backend, types in _TYPES.items()
}
SCHEMA_VERSION = len(MIGRATIONS["sqlite"])


#: The values of one SQLite ``IN`` list at most (its limit on parameters is 999 in
#: builds before 3.32).
_SQLITE_IN_MAX = 900


def _key32(text: str) -> int:
    """A signed 32-bit key for an advisory lock on *text*."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)


class Transaction(Protocol):
    backend: str

    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        """Run *sql*; the number of rows it changed."""

    def one(self, sql: str, params: Sequence[Param] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Param] = ()) -> list[Row]: ...

    def lock_gateway(self, gw: str) -> None:
        """Until the end of this transaction, no other transaction ingests *gw*."""

    def lock_gateways(self, gateways: Iterable[str]) -> None:
        """:meth:`lock_gateway` of each, in the one order every transaction follows (so
        two transactions never wait on each other in a cycle)."""

    def try_lock_gateways(self, gateways: Iterable[str]) -> set[str]:
        """Lock those of *gateways* no other transaction holds, without waiting; the
        others (busy)."""

    def insert_rows(self, table: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Param]]) -> None:
        """Insert *rows* (values of *columns*) into *table*, all new (no conflict
        clause): SQLite's executemany, PostgreSQL's COPY (one statement however many)."""

    def in_list(self, column: str, values: Sequence[Param]) -> tuple[str, list[Param]]:
        """A condition "*column* is one of *values*" and its parameters: ``IN (?, …)``
        on SQLite (at most 900 values), ``= ANY(?)`` with one array on PostgreSQL (one
        statement text whatever the number, so the driver parses it once)."""

    #: rows :meth:`values` takes at most
    values_max: int

    def values(self, name: str, columns: Sequence[str], types: Sequence[str],
               rows: Sequence[Sequence[Param]]) -> tuple[str, list[Param]]:
        """A common table expression ``name(columns) AS (…)`` holding *rows* (PostgreSQL
        *types* name the columns' types), for ``WITH``, and its parameters: a VALUES list
        on SQLite, ``unnest`` of one array a column on PostgreSQL (one statement text
        whatever the number of rows)."""

    def execute_many(self, sql: str, rows: Sequence[Sequence[Param]]) -> None:
        """Run *sql* once for each of *rows* (PostgreSQL: in one pipeline)."""

    def lock_alarms(self) -> None:
        """Until the end of this transaction, no other one numbers alarms (so alarm ids
        become visible in their order: a follower's cursor never skips one)."""


class _SqliteTx:
    backend = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def one(self, sql: str, params: Sequence[Param] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())

    def lock_gateway(self, gw: str) -> None:
        del gw  # BEGIN IMMEDIATE: one writer at a time already

    def lock_gateways(self, gateways: Iterable[str]) -> None:
        del gateways

    def try_lock_gateways(self, gateways: Iterable[str]) -> set[str]:
        del gateways  # BEGIN IMMEDIATE: every gateway is this transaction's
        return set()

    def insert_rows(self, table: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Param]]) -> None:
        marks = ", ".join("?" * len(columns))
        self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 (names from the code)
                               f"VALUES ({marks})", rows)

    def in_list(self, column: str, values: Sequence[Param]) -> tuple[str, list[Param]]:
        if len(values) > _SQLITE_IN_MAX:
            raise ValueError(f"in_list: {len(values)} values (at most {_SQLITE_IN_MAX})")
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    values_max = 150  # up to 6 columns: within SQLite's 999 parameters

    def values(self, name: str, columns: Sequence[str], types: Sequence[str],
               rows: Sequence[Sequence[Param]]) -> tuple[str, list[Param]]:
        del types
        if not 0 < len(rows) <= self.values_max or len(columns) > 6:
            raise ValueError(f"values: {len(rows)} rows of {len(columns)} columns")
        row = f"({', '.join('?' * len(columns))})"
        return (f"{name}({', '.join(columns)}) AS (VALUES {', '.join([row] * len(rows))})",
                [p for r in rows for p in r])

    def execute_many(self, sql: str, rows: Sequence[Sequence[Param]]) -> None:
        self._conn.executemany(sql, rows)

    def lock_alarms(self) -> None:
        pass


class _PgTx:
    backend = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Param] = ()) -> int:
        cur = self._conn.execute(self._sql(sql), tuple(params))
        return int(cur.rowcount)

    def one(self, sql: str, params: Sequence[Param] = ()) -> Row | None:
        row = self._conn.execute(self._sql(sql), tuple(params)).fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Param] = ()) -> list[Row]:
        return [tuple(r) for r in self._conn.execute(self._sql(sql), tuple(params)).fetchall()]

    def lock_gateway(self, gw: str) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_GATEWAY, _key32(gw)))

    def lock_gateways(self, gateways: Iterable[str]) -> None:
        keys = sorted({_key32(gw) for gw in gateways})
        if keys:  # one round trip: a volatile function runs after ORDER BY (PostgreSQL 9.6+)
            self._conn.execute("SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int[]) "
                               "AS k ORDER BY k", (_LOCK_GATEWAY, keys)).fetchall()

    def try_lock_gateways(self, gateways: Iterable[str]) -> set[str]:
        by_key: dict[int, list[str]] = {}
        for gw in gateways:
            by_key.setdefault(_key32(gw), []).append(gw)
        if not by_key:
            return set()
        rows = self._conn.execute("SELECT k, pg_try_advisory_xact_lock(%s, k) FROM "
                                  "unnest(%s::int[]) AS k", (_LOCK_GATEWAY, list(by_key)))
        return {gw for k, got in rows.fetchall() if not got for gw in by_key[int(k)]}

    def insert_rows(self, table: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Param]]) -> None:
        with self._conn.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:  # names from the code
            for row in rows:
                copy.write_row(row)

    def in_list(self, column: str, values: Sequence[Param]) -> tuple[str, list[Param]]:
        return f"{column} = ANY(?)", [list(values)]  # type: ignore[list-item]

    values_max = 100_000

    def values(self, name: str, columns: Sequence[str], types: Sequence[str],
               rows: Sequence[Sequence[Param]]) -> tuple[str, list[Param]]:
        arrays = ", ".join(f"?::{kind}[]" for kind in types)
        return (f"{name}({', '.join(columns)}) AS (SELECT * FROM unnest({arrays}))",  # noqa: S608 (names from the code)
                [list(column) for column in zip(*rows, strict=True)])  # type: ignore[misc]

    def execute_many(self, sql: str, rows: Sequence[Sequence[Param]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), [tuple(r) for r in rows])

    def lock_alarms(self) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_ALARMS,))


class Database:
    """One connection (use one :class:`Database` per thread or process)."""

    def __init__(self, url: str, backend: str, conn: Any) -> None:
        self.url = url
        self.backend = backend
        self._conn = conn

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises.
        Errors of the database itself come out as :class:`StorageError`. With *write*
        false on SQLite, a reader's snapshot that does not wait for the writer."""
        if self.backend == "sqlite":
            with self._sqlite_errors():
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            with self._sqlite_errors():
                self._conn.execute("COMMIT")
            return
        import psycopg

        try:
            tx_context = self._conn.transaction()
            tx_context.__enter__()
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {exc}") from exc
        try:
            yield _PgTx(self._conn)
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                tx_context.__exit__(type(exc), exc, exc.__traceback__)
            raise StorageError(f"PostgreSQL: {exc}") from exc
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                tx_context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        try:
            tx_context.__exit__(None, None, None)
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {exc}") from exc

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite: {exc}") from exc

    def version(self, *, write: bool = True) -> int:
        """The schema version the database has (0: none yet)."""
        with self.transaction(write=write) as tx:
            return _version(tx)

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION` (idempotent; concurrent callers
        wait for each other); the version it has."""
        with self.transaction() as tx:
            if isinstance(tx, _PgTx):
                tx.execute(f"SELECT pg_advisory_xact_lock({_LOCK_MIGRATE}, 0)")
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                       " applied_at BIGINT NOT NULL)")
            current = _version(tx)
            if current > SCHEMA_VERSION:
                raise DatabaseError(f"the database {self.url} has schema version {current}, "
                                    f"newer than this software's {SCHEMA_VERSION}: upgrade "
                                    "the platform software")
            for version, statements in enumerate(MIGRATIONS[self.backend], start=1):
                if version <= current:
                    continue
                for sql in statements:
                    tx.execute(sql)
                tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                           (version, int(time.time() * 1000)))
            return SCHEMA_VERSION

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(tx: Transaction) -> int:
    exists = tx.one("SELECT 1 FROM information_schema.tables WHERE table_name = "
                    "'schema_version'") if tx.backend == "postgresql" else \
        tx.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if exists is None:
        return 0
    row = tx.one("SELECT MAX(version) FROM schema_version")
    return int(row[0]) if row and row[0] is not None else 0


_SQLITE_URL = re.compile(r"^sqlite:///(?P<path>.+)$")


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. Consumers opening a new file at once race for the switch, and SQLite
    answers 'locked' at once there (no busy handler): try again until the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def open_db(url: str, *, migrate: bool = True) -> Database:
    """Open the database at *url* (``sqlite:///PATH``, ``postgresql://…``) and, unless
    *migrate* is false, bring its schema up to date. With *migrate* false (a reader, or a
    consumer reconnecting) the database must exist with a schema: nothing is created, and
    :class:`NoDatabaseError` says so otherwise."""
    if (m := _SQLITE_URL.match(url)) is not None:
        path = Path(m["path"])
        if not migrate and not path.is_file():
            raise NoDatabaseError(no_database_message(url))
        if not path.parent.is_dir():
            raise DatabaseError(f"{url}: the directory {path.parent} does not exist: create "
                                "it, or give another sqlite:///PATH")
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_MS / 1000,
                                   check_same_thread=False)
            if migrate:  # WAL is kept in the file: a reader need not (and must not) write
                _wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise DatabaseError(f"{url}: cannot open the SQLite database ({exc}): check the "
                                "path and its permissions") from exc
        db = Database(url, "sqlite", conn)
    elif url.startswith(("postgresql://", "postgres://")):
        import psycopg

        try:
            # no server-side prepared statements: psycopg prepares a query after its fifth
            # run, and a plan made while the tables were empty scans them whole later
            pg_conn = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL ({exc}): check the URL "
                                "(postgresql://USER@HOST:PORT/DB), that the server runs and "
                                "lets this user in") from exc
        db = Database(url, "postgresql", pg_conn)
    else:
        raise DatabaseError(f"database URL {url!r} not understood: give sqlite:///PATH or "
                            "postgresql://USER@HOST:PORT/DB")
    if not migrate:
        try:
            version = db.version(write=False)
        except StorageError as exc:
            db.close()
            raise DatabaseError(f"{url}: cannot read the schema version ({exc})") from exc
        if version == 0:
            db.close()
            raise NoDatabaseError(no_database_message(url))
        return db
    if migrate:
        try:
            db.migrate()
        except StorageError as exc:
            db.close()
            raise DatabaseError(f"{url}: cannot migrate the schema ({exc})") from exc
        except DatabaseError:
            db.close()
            raise
    return db
