"""Shared fixtures: a private PKI, a real mosquitto on loopback, identities."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Daemons started by tests write their state.json (app/state.py) into a directory of
# this session, never the machine's /run/smartcorr (CI runs as root): set before any
# test imports app.state, and inherited by every daemon process the tests start.
# Under pytest-xdist each worker has its own (the controller's would be inherited by
# every worker: two tests' daemons would share one state.json).
# (This module is imported twice, as conftest and as tests.conftest: the second import
# keeps the first one's directory.)
if "SMARTCORR_RUNTIME_DIR" not in os.environ or os.environ.get(
        "SMARTCORR_RUNTIME_DIR_OF", "") != os.environ.get("PYTEST_XDIST_WORKER", ""):
    _RUNTIME = tempfile.mkdtemp(
        prefix=f"smartcorr-test-run-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    os.environ["SMARTCORR_RUNTIME_DIR"] = _RUNTIME
    os.environ["SMARTCORR_RUNTIME_DIR_OF"] = os.environ.get("PYTEST_XDIST_WORKER", "")
    atexit.register(shutil.rmtree, _RUNTIME, ignore_errors=True)

from core.topics import PLATFORM_CN
from lab.mosquitto import Mosquitto, Pki, make_pki, start_mosquitto
from lab.swtpm import Swtpm
from provisioning.identity import Identity, create_identity

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mosquitto(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    broker = start_mosquitto(tmp_path / "mosquitto", pki)
    yield broker
    broker.stop()


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return create_identity(tmp_path / "identity", "gw-test-0001")


@pytest.fixture
def platform_cn() -> str:
    return PLATFORM_CN


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[[str], Swtpm]]:
    """Start software TPMs by name: each name is its own state directory under tmp_path,
    so another name is another TPM (another gateway). All are stopped after the test."""
    started: list[Swtpm] = []

    def start(name: str) -> Swtpm:
        tpm = Swtpm(tmp_path / name).start()
        started.append(tpm)
        return tpm

    yield start
    for tpm in started:
        tpm.stop()


@pytest.fixture
def swtpm(swtpm_factory: Callable[[str], Swtpm]) -> Swtpm:
    """A fresh software TPM 2.0 on loopback (state in tmp_path/swtpm)."""
    return swtpm_factory("swtpm")


# A real PostgreSQL (lab/postgres.py): one server for the session, a database per test.
from central.db import Database, open_db  # noqa: E402
from lab.postgres import Postgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on a free port of 127.0.0.1 for the whole run."""
    with Postgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres: Postgres) -> Iterator[str]:
    """The DSN of a fresh database on :func:`postgres`, dropped after the test."""
    import secrets
    name = f"test_{secrets.token_hex(6)}"
    dsn = postgres.create_database(name)
    yield dsn
    postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The platform's database, once on SQLite (a file in tmp_path) and once on the real
    PostgreSQL (a fresh database, :func:`postgres_dsn`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ingest.db'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """:func:`db_url` opened (and migrated)."""
    with open_db(db_url) as database:
        yield database
