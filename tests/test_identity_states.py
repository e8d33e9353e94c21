"""Every intermediate state of a multi-file identity change, made on disk and restarted from.

A power cut keeps exactly what was fsynced: each step of a rotation is durable on its
own (the file fsynced, then its directory), so the states a cut can leave are "the
first *i* steps done" (plus, maybe, the temporary file of step *i + 1*). For each one
the gateway restarts and must end with one consistent identity (signing.key,
signing.pub and gateway.json agreeing) and a store whose every record verifies for a
platform that registered only the old identity (the rest it learns from key.rotate
records certified by it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config
from buffer.store import store_path
from central.record import load_registrations
from central.verifier import Verifier
from core import durable
from core.suites import key_id
from lab.site import NOWHERE, registrations
from provisioning.identity import (
    IDENTITY_FILES,
    Identity,
    IdentityError,
    create_identity,
    load_identity,
    promotion_steps,
    stage_next_key,
    staging_steps,
)
from tests.helpers import stored_records

PROMOTION_STEPS = 6  # intent, adopt the key, signing.pub, drop next.pub, gateway.json, intent
STAGING_STEPS = 2  # signing.next.pub, signing.next.key (the commit point)


@dataclass(frozen=True)
class CutIdentity(Identity):
    """An identity whose promotion loses power after *cut* of its steps."""

    cut: int = 0

    def promote_next_key(self) -> None:
        for step in promotion_steps(self.directory)[: self.cut]:
            step()


def run_once(ident: Identity, data: Path) -> None:
    gateway = Gateway(Config(data, NOWHERE), ident)  # the records stay queued
    gateway.start()
    assert gateway.writer.flush()
    gateway.stop(drain_s=0.1)


def litter(directory: Path) -> None:
    """The half-written temporary file a cut can leave beside any step."""
    for name in IDENTITY_FILES:
        (directory / f".{name}.tmp").write_bytes(b"-----BEGIN half")


def assert_consistent(directory: Path) -> Identity:
    ident = load_identity(directory)
    assert json.loads((directory / "gateway.json").read_text())["kid"] == ident.kid
    registered = load_registrations([directory / "signing.pub"])
    assert list(registered) == [ident.gateway_id]
    assert registered[ident.gateway_id].kid == ident.kid
    assert registered[ident.gateway_id].public_raw == ident.key.public_raw
    assert not (directory / "rotation.json").exists()
    assert not list(directory.glob(".*.tmp"))
    staged = ident.next_key
    if staged is None:
        assert not (directory / "signing.next.pub").exists()
    else:
        staged_pub = load_registrations([directory / "signing.next.pub"])
        assert list(staged_pub) == [ident.gateway_id]
        assert staged_pub[ident.gateway_id].kid == key_id(staged.alg, staged.public_raw)
    return ident


def assert_every_record_verifies(data: Path, ident: Identity, told: Identity) -> None:
    records = stored_records(store_path(data), ident.storage_key)
    verifier = Verifier(registrations(told))
    verifier.ingest(b"\n".join(records))
    summary = verifier.summary()
    assert summary["unknown_key"] == 0
    assert summary["bad_signature"] == 0
    assert summary["forged_certificate"] == summary["out_of_validity"] == 0
    assert summary["verified"] == len(records)


@pytest.mark.parametrize("junk", [False, True], ids=["clean", "tmp-files"])
@pytest.mark.parametrize("cut", range(PROMOTION_STEPS + 1))
def test_a_promotion_cut_after_any_step_completes_at_the_next_start(
    tmp_path: Path, identity: Identity, cut: int, junk: bool
) -> None:
    assert len(promotion_steps(identity.directory)) == 0  # nothing staged, nothing to do
    staged = stage_next_key(identity.directory)
    new_kid = key_id(staged.alg, staged.public_raw)
    assert len(promotion_steps(identity.directory)) == PROMOTION_STEPS
    data = tmp_path / "data"
    run_once(CutIdentity(identity.gateway_id, identity.suite, identity.key,
                         identity.storage_key, identity.directory, identity.storage_class,
                         identity.keys, cut=cut), data)  # key.rotate committed, then the cut
    if junk:
        litter(identity.directory)
    run_once(load_identity(identity.directory), data)  # the restart
    final = assert_consistent(identity.directory)
    assert final.kid == new_kid
    assert final.next_key is None
    assert_every_record_verifies(data, final, told=identity)


@pytest.mark.parametrize("junk", [False, True], ids=["clean", "tmp-files"])
@pytest.mark.parametrize("cut", range(STAGING_STEPS + 1))
def test_a_staging_cut_after_any_step_rolls_back_or_rotates(
    tmp_path: Path, identity: Identity, cut: int, junk: bool
) -> None:
    steps = staging_steps(identity.directory)
    assert len(steps) == STAGING_STEPS
    for step in steps[:cut]:
        step()
    if junk:
        litter(identity.directory)
    data = tmp_path / "data"
    run_once(load_identity(identity.directory), data)
    final = assert_consistent(identity.directory)
    assert (final.kid == identity.kid) == (cut < STAGING_STEPS)  # rolled back, or rotated
    assert_every_record_verifies(data, final, told=identity)


def test_the_wedged_rotation_of_the_issue_restarts(tmp_path: Path, identity: Identity) -> None:
    """The old promotion renamed signing.next.pub over signing.pub, then lost power: every
    restart failed with FileNotFoundError on signing.next.pub."""
    staged = stage_next_key(identity.directory)
    new_kid = key_id(staged.alg, staged.public_raw)
    (identity.directory / "signing.next.pub").replace(identity.directory / "signing.pub")
    data = tmp_path / "data"
    run_once(load_identity(identity.directory), data)
    final = assert_consistent(identity.directory)
    assert final.kid == new_kid
    assert_every_record_verifies(data, final, told=identity)


def test_a_restaged_key_over_a_staged_one_keeps_a_matching_pair(identity: Identity) -> None:
    staged = stage_next_key(identity.directory)
    first = key_id(staged.alg, staged.public_raw)
    steps = staging_steps(identity.directory)
    steps[0]()  # the second key's public half written, its private half not: a cut
    ident = assert_consistent(identity.directory)
    assert ident.next_key is not None
    assert key_id(ident.next_key.alg, ident.next_key.public_raw) == first


def test_a_signing_key_that_is_not_the_identitys_is_refused(identity: Identity) -> None:
    """No rotation under way and signing.key is another key (copied in, mixed up): refused,
    never adopted, since the platform was told nothing of it."""
    other = create_identity(identity.directory.parent / "other", "gw-test-0002")
    (other.directory / "signing.key").replace(identity.directory / "signing.key")
    with pytest.raises(IdentityError, match=r"signing.key .* is not the key .*gateway.json"):
        load_identity(identity.directory)


def test_an_interrupted_init_is_not_an_identity_until_provisioned_again(
    identity: Identity
) -> None:
    """provision init --force removes gateway.json first and writes it last."""
    directory = identity.directory
    durable.remove(directory / "gateway.json")
    (directory / "signing.key").write_bytes(b"")
    with pytest.raises(IdentityError, match="provision init"):
        load_identity(directory)
    again = create_identity(directory, "gw-test-0001")  # no --force needed
    assert assert_consistent(directory).kid == again.kid


def test_a_half_done_rotation_is_an_error_for_read_only_tools(identity: Identity) -> None:
    stage_next_key(identity.directory)
    promotion_steps(identity.directory)[0]()
    with pytest.raises(IdentityError, match="half done"):
        load_identity(identity.directory, repair=False)


# -- durability: every new name reaches the disk --------------------------------------
@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths fsynced (the real fsync still runs)."""
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_created_directories_fsync_their_parents(tmp_path: Path, fsynced: list[Path]) -> None:
    durable.make_dirs(tmp_path / "a" / "b" / "c")
    assert {tmp_path, tmp_path / "a", tmp_path / "a" / "b"} <= set(fsynced)


def test_provisioning_fsyncs_the_identity_directory_and_its_parent(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    ident = create_identity(tmp_path / "etc" / "identity", "gw-test-0003")
    assert tmp_path / "etc" in fsynced
    assert tmp_path in fsynced
    # every file written, then the directory holding its new name
    names = [p.name for p in fsynced]
    for name in ("signing.key", "signing.pub", "storage.key", "gateway.json"):
        written = names.index(f".{name}.tmp")
        assert ident.directory in fsynced[written + 1:]
    stage_next_key(ident.directory)
    fsynced.clear()
    ident.promote_next_key()
    assert fsynced[-1] == ident.directory  # the last change (the intent removed) is durable


def test_the_gateway_fsyncs_the_parent_of_the_data_dir_it_creates(
    tmp_path: Path, identity: Identity, fsynced: list[Path]
) -> None:
    data = tmp_path / "var" / "lib" / "smartcorr"
    run_once(identity, data)
    assert {tmp_path, tmp_path / "var", tmp_path / "var" / "lib"} <= set(fsynced)
