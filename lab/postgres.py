"""A private PostgreSQL server on a loopback port, for tests and benchmarks.

:class:`Postgres` makes a cluster with ``initdb`` in a directory, starts it with
``pg_ctl`` on a free port of 127.0.0.1 (its unix socket in the data directory, nothing
in /var/run), waits until it accepts connections, creates a role and a database and
gives their :attr:`~Postgres.dsn`; on exit it stops the server (``pg_ctl stop -m fast``).
The server refuses to run as root: as root, every server program runs as the
``postgres`` OS user (``runuser``) and the directory is handed to it.

The server binaries come from Debian's ``postgresql`` package (``scripts/setup.sh
--test`` installs it): found with ``pg_config --bindir`` or in
``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import psycopg
from psycopg import sql

from core.errors import UserError
from lab.mosquitto import free_port

#: How long the server may take to accept connections after ``pg_ctl start``, seconds.
STARTUP_TIMEOUT_S = 30.0
#: Ports tried when the one picked is taken before the server binds it.
PORT_ATTEMPTS = 3
#: Between two ``pg_isready`` probes while it starts, seconds.
PROBE_INTERVAL_S = 0.05
#: How long ``pg_ctl stop -m fast`` may take, seconds.
STOP_TIMEOUT_S = 30
#: The OS user that runs the server when we are root (Debian's package makes it).
SERVER_OS_USER = "postgres"
#: The cluster's superuser (local connections over the unix socket only, ``trust``).
SUPERUSER = "postgres"
_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


#: FATAL lines a starting server writes about a client that came too early (our own
#: ``pg_isready`` probes): the server is alive.
_STARTING = ("the database system is starting up", "not yet accepting connections")


def _fatal(log_tail: str) -> bool:
    """Whether *log_tail* says the server died (a FATAL line other than "starting up")."""
    return any("FATAL:" in line and not any(text in line for text in _STARTING)
               for line in log_tail.splitlines())


class PostgresError(UserError):
    """The PostgreSQL server binaries are missing or the server did not start."""


def server_bindir() -> Path:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``: ``pg_config --bindir``,
    else the newest ``/usr/lib/postgresql/*/bin`` that has them."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres",
                                                      "pg_isready")):
            return bindir
    raise PostgresError("the PostgreSQL server is not installed (no initdb/pg_ctl in "
                        "'pg_config --bindir' nor /usr/lib/postgresql/*/bin): run "
                        "'bash scripts/setup.sh --test'")


def _runuser() -> str:
    found = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), None)
    if found is None:
        raise PostgresError("running as root, the server is started with runuser "
                            "(util-linux), which is not installed")
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


class Postgres:
    """A PostgreSQL cluster in *directory* (a fresh temporary one, removed at the end,
    when None), served on 127.0.0.1 while the context is open.

    Use ``with Postgres() as pg: connect(pg.dsn)``; :meth:`create_database` and
    :meth:`drop_database` make more databases owned by the same role."""

    def __init__(self, directory: Path | None = None, *, database: str = "smartcorr",
                 user: str = "smartcorr", host: str = "127.0.0.1") -> None:
        for name in (database, user):
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r}: use lower-case letters, digits and '_'")
        self.bindir = server_bindir()
        self._own_dir = directory is None
        # as root the server's user must reach the directory: under /tmp, not pytest's 0700
        self.directory = Path(tempfile.mkdtemp(prefix="smartcorr-pg-")) if directory is None \
            else directory
        self.data = self.directory / "data"
        self.logfile = self.directory / "server.log"
        self.host = host
        self.port = 0
        self.database = database
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self._as_root = os.geteuid() == 0
        self._running = False

    # -- the server's processes ------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bindir / tool), *args]
        if self._as_root:  # the server refuses root; so does initdb
            return [_runuser(), "-u", SERVER_OS_USER, "--", *argv]
        return argv

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> str:
        argv = self._command(tool, *args)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.directory, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError(f"{tool} failed: {exc}") from None
        if done.returncode != 0:
            raise PostgresError(f"{tool} failed (exit {done.returncode}):\n"
                                f"{done.stderr.strip() or done.stdout.strip()}"
                                f"{self._log_tail()}")
        return done.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(tail) if tail else ""

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._as_root:
            return
        try:
            owner = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise PostgresError(f"running as root, the server needs the OS user "
                                f"{SERVER_OS_USER!r} (made by Debian's postgresql package): "
                                "run 'bash scripts/setup.sh --test'") from None
        shutil.chown(self.directory, owner.pw_uid, owner.pw_gid)
        self.directory.chmod(0o700)
        probe = subprocess.run([_runuser(), "-u", SERVER_OS_USER, "--", "test", "-w",
                                str(self.directory), "-a", "-x", str(self.directory)],
                               check=False, capture_output=True)
        if probe.returncode != 0:
            raise PostgresError(f"the {SERVER_OS_USER!r} OS user cannot reach "
                                f"{self.directory} (a parent directory is not searchable by "
                                "it): give a directory under /tmp, or none")

    def start(self) -> Self:
        """initdb (once), start the server, wait for it, create the role and database."""
        self._prepare_directory()
        if not (self.data / "PG_VERSION").exists():
            pwfile = self.directory / "superuser.pw"  # initdb wants one for scram
            pwfile.write_text(secrets.token_urlsafe(18) + "\n")
            if self._as_root:
                shutil.chown(pwfile, SERVER_OS_USER)
            try:
                self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
                          "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256",
                          f"--pwfile={pwfile}")
            finally:
                pwfile.unlink(missing_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # free_port's port may be taken before the server binds it (another process
            # picking ports at the same time): then another port
            self.port = free_port(self.host)
            with (self.data / "postgresql.conf").open("a") as conf:  # the last one counts
                conf.write(f"\n# lab/postgres.py\nlisten_addresses = '{self.host}'\n"
                           f"port = {self.port}\nunix_socket_directories = '{self.data}'\n")
            if self.logfile.exists():
                self.logfile.write_text("")  # this attempt's FATAL lines only
            self._run("pg_ctl", "start", "-W", "-D", str(self.data), "-l", str(self.logfile))
            self._running = True
            try:
                self._wait_ready()
                break
            except PostgresError as exc:
                taken = "could not bind" in str(exc) or "already in use" in str(exc)
                if attempt == PORT_ATTEMPTS or not taken:
                    self.stop()
                    raise
                self._running = False  # it exited: try another port
        try:
            self._create_role()
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll ``pg_isready`` on the TCP port until it answers, the server died, or the
        deadline passed."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        isready = [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p",
                   str(self.port), "-t", "1"]
        seen_running = False
        while time.monotonic() < deadline:
            if subprocess.run(isready, check=False).returncode == 0:
                return
            # pg_ctl -W returns before the postmaster writes its pid file: dead is a FATAL
            # in the log, or not running after it was
            running = subprocess.run(self._command("pg_ctl", "status", "-D", str(self.data)),
                                     capture_output=True, check=False,
                                     cwd=self.directory).returncode == 0
            seen_running = seen_running or running
            if (seen_running and not running) or _fatal(self._log_tail()):
                raise PostgresError(f"PostgreSQL exited while starting{self._log_tail()}")
            time.sleep(PROBE_INTERVAL_S)
        raise PostgresError(f"PostgreSQL did not accept connections on {self.host}:"
                            f"{self.port} within {STARTUP_TIMEOUT_S:.0f} s{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server (fast: connections are closed, no wait for clients)."""
        if self._running:
            self._running = False
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w",
                      "-t", str(STOP_TIMEOUT_S), timeout=STOP_TIMEOUT_S + 10)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- roles and databases ---------------------------------------------------------

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection over the unix socket (autocommit)."""
        return psycopg.connect(host=str(self.data), port=self.port, user=SUPERUSER,
                               dbname=dbname, autocommit=True)

    def _create_role(self) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(self.user), sql.Literal(self.password)))

    def dsn_for(self, database: str) -> str:
        return (f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/"
                f"{database}")

    @property
    def dsn(self) -> str:
        """``postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE`` of the main database."""
        return self.dsn_for(self.database)

    def create_database(self, name: str) -> str:
        """A new empty database owned by the role; its DSN."""
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits, '_'")
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(self.user)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop *name*, closing whatever connections are still open on it."""
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
