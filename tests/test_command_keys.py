"""The platform's command keys: an offline root certifies them, a root-signed list revokes
them, and the gateway's keyring believes nothing else (core/command_keys.py,
docs/command-keys.md)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central import command_keys as root_side
from central.cli import main as ingest
from core.command_keys import (
    KEYS_FILE,
    MAX_DOCUMENT_BYTES,
    ROOT_FILE,
    CommandKey,
    CommandKeyError,
    CommandKeyring,
    CommandRoot,
    Refusal,
    Revoked,
    make_certificate,
    make_revocations,
    parse_certificate,
    parse_revocations,
)
from core.record import b64u, canonical
from core.suites import ECDSA_P256, ED25519, SM2, SoftwareKey, key_id
from provisioning import command_keys as gateway_side
from tests.helpers import plaintext_config

T0 = 1_760_000_000_000
DAY = 86_400_000
YEAR = 365 * DAY
REPO = Path(__file__).resolve().parents[1]


def certify(root: SoftwareKey, key: SoftwareKey, *, region: str = "*", serial: int = 1,
            not_before: int = T0, not_after: int = T0 + YEAR) -> bytes:
    return make_certificate(root, key.alg, key.public_raw, region=region, serial=serial,
                            not_before=not_before, not_after=not_after, issued_at=not_before)


def revocations(root: SoftwareKey, number: int, *revoked: tuple[int, SoftwareKey],
                reason: str = "compromised") -> bytes:
    return make_revocations(root, number=number, issued_at=T0 + DAY, revoked=[
        Revoked(serial, key.kid, reason, T0 + DAY, T0 + YEAR) for serial, key in revoked])


class Impostor:
    """Signs with one key while naming another (the root's public key, say)."""

    def __init__(self, signs: SoftwareKey, claims: SoftwareKey) -> None:
        self.alg, self.public_raw, self._signs = claims.alg, claims.public_raw, signs

    def sign(self, data: bytes) -> bytes:
        return self._signs.sign(data)


@pytest.fixture(scope="module")
def root() -> SoftwareKey:
    return SoftwareKey.generate(ED25519)


@pytest.fixture(scope="module")
def keys() -> list[SoftwareKey]:
    return [SoftwareKey.generate(ED25519) for _ in range(5)]


def ring_of(root: SoftwareKey, **kwargs: object) -> CommandKeyring:
    return CommandKeyring(CommandRoot.of(root), **kwargs)  # type: ignore[arg-type]


# --- the chain -----------------------------------------------------------------------------

@pytest.mark.parametrize(("root_alg", "key_alg"), [
    (ED25519, ED25519), (ECDSA_P256, ECDSA_P256), (SM2, SM2), (SM2, ED25519)])
def test_a_certified_key_verifies_commands_in_every_suite(root_alg: str, key_alg: str) -> None:
    root, key = SoftwareKey.generate(root_alg), SoftwareKey.generate(key_alg)
    ring = ring_of(root)
    cert = certify(root, key, region="north")
    added = ring.add_certificate(cert, T0)
    assert added.new
    assert added.cert.kid == key.kid == key_id(key_alg, key.public_raw)
    found = ring.key_for(key.kid, "north", T0 + DAY)
    assert isinstance(found, CommandKey)
    command = b'{"cmd":"pair"}'
    assert found.verifier.verify(key.sign(command), command)
    assert not found.verifier.verify(key.sign(command), command + b" ")
    assert not ring.add_certificate(cert, T0).new  # the same again: nothing changes
    if root_alg != ED25519:  # randomised signatures: another certificate, the same serial
        with pytest.raises(CommandKeyError) as exc:
            ring.add_certificate(certify(root, key, region="north"), T0)
        assert exc.value.reason == "serial_conflict"


def test_a_certificate_signed_by_a_command_key_is_refused(root: SoftwareKey,
                                                          keys: list[SoftwareKey]) -> None:
    stolen, successor = keys[0], keys[1]
    ring = ring_of(root)
    ring.add_certificate(certify(root, stolen), T0)
    # the stolen command key certifies a key of the thief's, honestly naming itself ...
    with pytest.raises(CommandKeyError) as exc:
        ring.add_certificate(certify(stolen, successor, serial=2), T0)
    assert exc.value.reason == "wrong_root"
    # ... or naming the root
    with pytest.raises(CommandKeyError) as exc:
        ring.add_certificate(certify(Impostor(stolen, root), successor,  # type: ignore[arg-type]
                                     serial=2), T0)
    assert exc.value.reason == "bad_signature"
    assert ring.key_for(successor.kid, "north", T0) == Refusal(
        "unknown_key", f"no certificate of command key {successor.kid!r} is held")


def test_a_revoked_key_is_refused_once_the_list_arrives(root: SoftwareKey,
                                                        keys: list[SoftwareKey]) -> None:
    ring = ring_of(root)
    ring.add_certificate(certify(root, keys[0], serial=1), T0)
    ring.add_certificate(certify(root, keys[1], serial=2), T0)
    assert isinstance(ring.key_for(keys[0].kid, "north", T0), CommandKey)
    assert ring.add_revocations(revocations(root, 1, (1, keys[0])))
    refusal = ring.key_for(keys[0].kid, "north", T0)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "revoked"
    assert isinstance(ring.key_for(keys[1].kid, "north", T0), CommandKey)  # others stand
    # neither the same certificate again nor a fresh one for the same key gets it back
    for serial in (1, 9):
        with pytest.raises(CommandKeyError) as exc:
            ring.add_certificate(certify(root, keys[0], serial=serial), T0)
        assert exc.value.reason == "revoked"


def test_no_rollback_of_the_revocation_list(root: SoftwareKey, keys: list[SoftwareKey]) -> None:
    stolen = keys[0]
    ring = ring_of(root)
    ring.add_certificate(certify(root, stolen), T0)
    ring.add_revocations(revocations(root, 1))
    assert ring.add_revocations(revocations(root, 2, (1, stolen)))
    assert not ring.add_revocations(ring.revocations.data if ring.revocations else b"")
    for older in (revocations(root, 1), revocations(root, 2)):  # older; same number, other list
        with pytest.raises(CommandKeyError) as exc:
            ring.add_revocations(older)
        assert exc.value.reason == "rollback"
    # the revoked key cannot take itself off the list, however high the number
    with pytest.raises(CommandKeyError) as exc:
        ring.add_revocations(revocations(stolen, 99))
    assert exc.value.reason == "wrong_root"
    with pytest.raises(CommandKeyError) as exc:
        ring.add_revocations(revocations(Impostor(stolen, root), 99))  # type: ignore[arg-type]
    assert exc.value.reason == "bad_signature"
    assert ring.revocations_number == 2
    assert ring.key_for(stolen.kid, "north", T0 + 2 * DAY).reason == "revoked"  # type: ignore[union-attr]


def test_region_and_validity_are_refused_with_their_reasons(root: SoftwareKey,
                                                            keys: list[SoftwareKey]) -> None:
    north = ring_of(root, region="north")
    with pytest.raises(CommandKeyError) as exc:
        north.add_certificate(certify(root, keys[0], region="south"), T0)
    assert exc.value.reason == "wrong_region"
    north.add_certificate(certify(root, keys[1], region="*", serial=2), T0)  # every region

    ring = ring_of(root)  # the platform's, or a gateway without a region yet
    ring.add_certificate(certify(root, keys[0], region="south", serial=1), T0)
    ring.add_certificate(certify(root, keys[2], region="north", serial=3,
                                 not_before=T0 + DAY, not_after=T0 + 2 * DAY), T0)
    with pytest.raises(CommandKeyError) as exc:
        ring.add_certificate(certify(root, keys[3], serial=4, not_before=T0 - DAY,
                                     not_after=T0), T0)
    assert exc.value.reason == "expired"

    def reason(kid: str, region: str, at: int) -> str:
        found = ring.key_for(kid, region, at)
        return found.reason if isinstance(found, Refusal) else "ok"

    assert reason(keys[0].kid, "south", T0) == "ok"
    assert reason(keys[0].kid, "north", T0) == "wrong_region"
    assert reason(keys[2].kid, "north", T0) == "not_yet_valid"
    assert reason(keys[2].kid, "north", T0 + DAY) == "ok"
    assert reason(keys[2].kid, "north", T0 + 2 * DAY) == "expired"
    assert reason(keys[4].kid, "north", T0) == "unknown_key"


def test_the_keyring_is_bounded(root: SoftwareKey) -> None:
    ring = ring_of(root, max_certificates=3)
    k = [SoftwareKey.generate(ED25519) for _ in range(6)]
    ring.add_certificate(certify(root, k[0], serial=1, not_after=T0 + 2 * DAY), T0)
    ring.add_certificate(certify(root, k[1], serial=2, not_after=T0 + 3 * DAY), T0)
    ring.add_certificate(certify(root, k[2], serial=3), T0)
    with pytest.raises(CommandKeyError) as exc:  # full, nothing expired or revoked
        ring.add_certificate(certify(root, k[3], serial=4), T0)
    assert exc.value.reason == "full"
    later = T0 + 10 * DAY  # 1 and 2 have expired: 1 first
    assert ring.add_certificate(certify(root, k[3], serial=4), later).evicted == (1,)
    assert ring.add_certificate(certify(root, k[4], serial=5), later).evicted == (2,)
    assert [c.serial for c in ring.certificates] == [3, 4, 5]
    ring.add_revocations(revocations(root, 1, (4, k[3])))  # a revoked one goes too
    assert ring.add_certificate(certify(root, k[5], serial=6), later).evicted == (4,)
    assert [c.serial for c in ring.certificates] == [3, 5, 6]


def test_round_trip_through_the_identity_directory(tmp_path: Path, root: SoftwareKey,
                                                   keys: list[SoftwareKey]) -> None:
    ring = ring_of(root)
    ring.add_certificate(certify(root, keys[0], serial=1, region="north"), T0)
    ring.add_certificate(certify(root, keys[1], serial=2), T0)
    ring.add_revocations(revocations(root, 3, (2, keys[1])))
    directory = tmp_path / "identity"
    directory.mkdir()
    assert gateway_side.load_keyring(directory) is None  # none installed
    gateway_side.save_keyring(directory, ring)
    for name in (ROOT_FILE, KEYS_FILE):
        assert (directory / name).stat().st_mode & 0o777 == 0o644  # public material
    loaded = gateway_side.load_keyring(directory)
    assert loaded is not None
    back, skipped = loaded
    assert skipped == []
    assert back.root == ring.root
    assert [c.data for c in back.certificates] == [c.data for c in ring.certificates]
    assert back.revocations_number == 3
    assert isinstance(back.key_for(keys[0].kid, "north", T0), CommandKey)
    assert back.key_for(keys[1].kid, "north", T0).reason == "revoked"  # type: ignore[union-attr]
    assert back.files() == ring.files()

    # an altered certificate in the file is skipped (and reported); the others stand
    doc = json.loads((directory / KEYS_FILE).read_bytes())
    doc["certificates"][0]["region"] = "*"
    (directory / KEYS_FILE).write_text(json.dumps(doc))
    loaded = gateway_side.load_keyring(directory)
    assert loaded is not None
    assert [s.error.reason for s in loaded[1]] == ["bad_signature"]
    assert [c.serial for c in loaded[0].certificates] == [2]
    # an altered revocation list refuses the whole file: it could un-revoke a key
    doc["revocations"]["revoked"] = []
    (directory / KEYS_FILE).write_text(json.dumps(doc))
    with pytest.raises(gateway_side.CommandKeysError, match="bad_signature"):
        gateway_side.load_keyring(directory)
    # another root is never written over the installed one
    with pytest.raises(gateway_side.CommandKeysError, match="another command root"):
        gateway_side.save_keyring(directory, ring_of(SoftwareKey.generate(ED25519)))


def test_a_gateway_of_one_region_installs_only_its_keys(tmp_path: Path, root: SoftwareKey,
                                                       keys: list[SoftwareKey]) -> None:
    province = ring_of(root)
    for serial, region in ((1, "north"), (2, "south"), (3, "*")):
        province.add_certificate(certify(root, keys[serial], region=region, serial=serial), T0)
    export, identity = tmp_path / "export", tmp_path / "identity"
    export.mkdir()
    identity.mkdir()
    gateway_side.save_keyring(export, province)
    with pytest.raises(gateway_side.CommandKeysError, match="is root"):
        gateway_side.install(identity, export, T0, expect_root="someone-else")
    assert not gateway_side.installed(identity)
    assert gateway_side.install(identity, export, T0, region="north",
                                expect_root=province.root.kid)[1:] == [
        f"certificate 1 (key {keys[1].kid}, region north)",
        f"certificate 3 (key {keys[3].kid}, region *)"]
    loaded = gateway_side.load_keyring(identity, region="north")
    assert loaded is not None
    assert [c.serial for c in loaded[0].certificates] == [1, 3]
    assert loaded[0].key_for(keys[2].kid, "north", T0).reason == "unknown_key"  # type: ignore[union-attr]


# --- the command line, root to gateway ------------------------------------------------------

def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ingest(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("alg", [ED25519, SM2])
def test_cli_init_issue_export_then_the_gateway_installs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str
) -> None:
    root_dir, key_dir, export_dir = tmp_path / "usb" / "root", tmp_path / "signer", \
        tmp_path / "export"
    code, out, _ = run(capsys, "command-root", "init", "--out", str(root_dir), "--alg", alg,
                       "--json")
    assert code == 0
    made = json.loads(out)
    assert (root_dir / "command-root.key").stat().st_mode & 0o777 == 0o600
    assert root_dir.stat().st_mode & 0o777 == 0o700
    root_key = json.loads((root_dir / "command-root.key").read_bytes())
    assert root_key["private"] not in out

    code, out, _ = run(capsys, "command-key", "issue", "--root", str(root_dir), "--region",
                       "north", "--days", "365", "--out", str(key_dir), "--json")
    assert code == 0
    issued = json.loads(out)
    key_file = Path(issued["key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(key_file.read_bytes())["private"] not in out
    signer, cert = root_side.load_command_signer(key_file)
    assert (cert.kid, cert.serial, cert.region, signer.alg) == (issued["kid"], 1, "north", alg)

    code, out, _ = run(capsys, "command-key", "export", "--root", str(root_dir), "--out",
                       str(export_dir))
    assert code == 0
    assert sorted(p.name for p in export_dir.iterdir()) == sorted([ROOT_FILE, KEYS_FILE])

    identity = tmp_path / "identity"
    identity.mkdir()
    now = root_side.now_ms()
    changes = gateway_side.install(identity, export_dir, now, expect_root=made["kid"])
    assert changes == [f"command root {made['kid']}",
                       f"certificate 1 (key {issued['kid']}, region north)"]
    loaded = gateway_side.load_keyring(identity, region="north")
    assert loaded is not None
    ring = loaded[0]
    assert ring.root.fingerprint == made["fingerprint"]
    found = ring.key_for(issued["kid"], "north", now)
    assert isinstance(found, CommandKey)
    assert found.verifier.verify(signer.sign(b"command"), b"command")
    assert gateway_side.install(identity, export_dir, now) == []  # nothing new

    # revoke (the key leaked), export again: the gateway takes the newer list
    old_export = tmp_path / "old-export"
    shutil.copytree(export_dir, old_export)
    code, out, _ = run(capsys, "command-key", "revoke", "--root", str(root_dir),
                       f"--kid={issued['kid']}", "--reason", "compromised")
    assert code == 0
    assert run(capsys, "command-key", "export", "--root", str(root_dir), "--out",
               str(export_dir))[0] == 0
    assert gateway_side.install(identity, export_dir, now) == ["revocation list 1"]
    loaded = gateway_side.load_keyring(identity)
    assert loaded is not None
    assert loaded[0].key_for(issued["kid"], "north", now).reason == "revoked"  # type: ignore[union-attr]
    # the export of before the revocation brings nothing back
    assert gateway_side.install(identity, old_export, now) == []
    loaded = gateway_side.load_keyring(identity)
    assert loaded is not None
    assert loaded[0].key_for(issued["kid"], "north", now).reason == "revoked"  # type: ignore[union-attr]

    # a successor, then the next list; list 1 offered again is a rollback
    list1_export, old_root = tmp_path / "list1-export", tmp_path / "old-root"
    shutil.copytree(export_dir, list1_export)
    shutil.copytree(root_dir, old_root)
    code, out, _ = run(capsys, "command-key", "issue", "--root", str(root_dir), "--region",
                       "*", "--days", "30", "--out", str(key_dir), "--json")
    successor = json.loads(out)
    assert successor["serial"] == 2
    assert run(capsys, "command-key", "revoke", "--root", str(root_dir),
               f"--kid={successor['kid']}", "--reason", "retired")[0] == 0
    assert run(capsys, "command-key", "export", "--root", str(root_dir), "--out",
               str(export_dir))[0] == 0
    assert gateway_side.install(identity, export_dir, now) == ["revocation list 2"]
    with pytest.raises(gateway_side.CommandKeysError, match="rollback"):
        gateway_side.install(identity, list1_export, now)
    code, _, err = run(capsys, "command-key", "export", "--root", str(old_root), "--out",
                       str(export_dir))  # nor does an old copy of the root's directory
    assert code == 2
    assert "revocation list 2, newer than the root's (1)" in err
    code, out, _ = run(capsys, "command-key", "list", "--root", str(root_dir), "--json")
    listed = json.loads(out)
    assert [c["status"] for c in listed["certificates"]] == ["revoked", "revoked"]
    assert [(e["serial"], e["reason"]) for e in listed["revoked"]] == [
        (1, "compromised"), (2, "retired")]


def test_cli_refusals_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_dir = tmp_path / "root"
    assert run(capsys, "command-root", "init", "--out", str(root_dir))[0] == 0
    code, _, err = run(capsys, "command-root", "init", "--out", str(root_dir))
    assert code == 2
    assert "never replaced" in err
    code, _, err = run(capsys, "command-key", "export", "--root", str(root_dir), "--out",
                       str(root_dir))  # would hand the root's private key to gateways
    assert code == 2
    assert "holds other files (command-root.key" in err
    code, _, err = run(capsys, "command-key", "issue", "--root", str(root_dir), "--region",
                       "North!", "--days", "30", "--out", str(tmp_path / "k"))
    assert code == 2
    assert "--region: region 'North!'" in err
    code, _, err = run(capsys, "command-key", "issue", "--root", str(root_dir), "--region",
                       "north", "--days", "0", "--out", str(tmp_path / "k"))
    assert code == 2
    assert "--days 0" in err
    code, _, err = run(capsys, "command-key", "revoke", "--root", str(root_dir), "--kid",
                       "nope", "--reason", "retired")
    assert code == 2
    assert "command-key list" in err
    (root_dir / "command-root.key").chmod(0o644)
    code, _, err = run(capsys, "command-key", "issue", "--root", str(root_dir), "--region",
                       "north", "--days", "30", "--out", str(tmp_path / "k"))
    assert code == 2
    assert "chmod 600" in err
    assert not (tmp_path / "k").exists()


def test_provision_check_reports_the_command_keys(tmp_path: Path, root: SoftwareKey,
                                                  keys: list[SoftwareKey]) -> None:
    from provisioning.identity import create_identity

    identity = create_identity(tmp_path / "identity", "gw-cmdkeys-01")
    identity.close()
    cfg = plaintext_config(tmp_path, identity.directory)

    def check() -> tuple[int, dict[str, object], str]:
        # the keys report (provision check's identity lines come from it: app/check.py)
        done = subprocess.run([sys.executable, "gateway.py", "diag", "keys",
                               "--config", str(cfg), "--json"], capture_output=True,
                              text=True, check=False, cwd=REPO, timeout=60)
        return done.returncode, json.loads(done.stdout), done.stderr

    code, report, _ = check()
    assert code == 0
    assert report["command_keys"] == {
        "installed": False, "note": "no command keys installed (they come with enrolment): "
                                    "the gateway accepts no command from the platform"}
    now = root_side.now_ms()
    ring = ring_of(root)
    ring.add_certificate(certify(root, keys[0], serial=1, not_before=now - DAY,
                                 not_after=now + 10 * DAY + DAY // 2), now)
    ring.add_certificate(certify(root, keys[1], serial=2, region="north",
                                 not_before=now - DAY, not_after=now + YEAR), now)
    gateway_side.save_keyring(identity.directory, ring)
    code, report, err = check()
    assert code == 0, err
    commands = report["command_keys"]
    assert isinstance(commands, dict)
    assert commands["root_kid"] == CommandRoot.of(root).kid
    assert [(c["serial"], c["status"], c["days_left"]) for c in commands["certificates"]] == [
        (1, "valid", 10), (2, "valid", 364)]
    warned = " ".join(report["warnings"])  # type: ignore[arg-type]
    assert f"command key {keys[0].kid} (serial 1, region *) expires" in warned
    assert keys[1].kid not in warned
    # a keys file that does not verify is a problem: exit 1
    doc = json.loads((identity.directory / KEYS_FILE).read_bytes())
    doc["certificates"][1]["not_after"] += YEAR
    (identity.directory / KEYS_FILE).write_text(json.dumps(doc))
    code, report, _ = check()
    assert code == 1
    assert any("certificate #1 refused (bad_signature" in p
               for p in report["problems"])  # type: ignore[attr-defined]


# --- parsers never crash ------------------------------------------------------------------

def _valid_documents() -> tuple[SoftwareKey, bytes, bytes]:
    root = SoftwareKey(ED25519, bytes(range(32)))
    key = SoftwareKey(ED25519, bytes(range(1, 33)))
    return root, certify(root, key, serial=7), revocations(root, 2, (7, key))


ROOT_KEY, CERT, RLIST = _valid_documents()


def _refused_or_parsed(data: bytes) -> None:
    """Every reader of the module, fed *data*: a result or a CommandKeyError, nothing
    else (the parsers' refusals are all ``malformed``)."""
    reasons = []
    for parse in (parse_certificate, parse_revocations, CommandRoot.from_bytes):
        try:
            parse(data)
        except CommandKeyError as exc:
            reasons.append(exc.reason)
    assert set(reasons) <= {"malformed"}
    ring = ring_of(ROOT_KEY)
    with contextlib.suppress(CommandKeyError):
        ring.add_certificate(data, T0)
    with contextlib.suppress(CommandKeyError):
        ring.add_revocations(data)
    with contextlib.suppress(CommandKeyError):
        CommandKeyring.from_files(CommandRoot.of(ROOT_KEY).to_bytes(), data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_garbage_is_refused_never_a_crash(data: bytes) -> None:
    _refused_or_parsed(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([CERT, RLIST]), st.integers(min_value=0), st.binary(min_size=1,
                                                                           max_size=4),
       st.sampled_from(["replace", "insert", "delete"]))
def test_every_altered_document_is_refused(doc: bytes, at: int, junk: bytes, how: str) -> None:
    i = at % len(doc)
    altered = {"replace": doc[:i] + junk + doc[i + len(junk):],
               "insert": doc[:i] + junk + doc[i:],
               "delete": doc[:i] + doc[i + len(junk):]}[how]
    if altered == doc:
        return
    with pytest.raises(CommandKeyError) as exc:
        add(doc, altered)
    assert exc.value.reason in ("malformed", "bad_signature", "wrong_root")


def add(kind: bytes, data: bytes) -> None:
    """Offer *data* to a new keyring as a document of *kind*'s sort."""
    ring = ring_of(ROOT_KEY)
    if kind is CERT:
        ring.add_certificate(data, T0)
    else:
        ring.add_revocations(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=True), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([CERT, RLIST]), st.data())
def test_well_formed_json_with_wrong_values_is_refused(doc: bytes, data: st.DataObject) -> None:
    obj = json.loads(doc)
    field = data.draw(st.sampled_from(sorted(obj)))
    obj[field] = data.draw(JSON_VALUES)
    try:
        altered = canonical(obj)
    except ValueError:  # NaN: no canonical form
        altered = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if altered == doc:
        return
    _refused_or_parsed(altered)
    with pytest.raises(CommandKeyError):
        add(doc, altered)


def test_documents_past_the_size_bound_are_refused() -> None:
    big = b'{"pad":"' + b"x" * MAX_DOCUMENT_BYTES + b'"}'
    with pytest.raises(CommandKeyError, match="more than"):
        parse_certificate(big)
    with pytest.raises(CommandKeyError, match="not JSON"):
        parse_revocations(b"[" * 100_000)
    assert b64u(parse_certificate(CERT).sig) in CERT.decode()
