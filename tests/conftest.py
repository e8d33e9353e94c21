"""Shared fixtures: a private PKI, a real mosquitto on loopback, identities."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.topics import PLATFORM_CN
from lab.mosquitto import Mosquitto, Pki, make_pki, start_mosquitto
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
