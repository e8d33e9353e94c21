"""The court-ready export (central/export.py): a gateway's period in one zip, checked by the
platform's verifier (``ingest verify-export``) and by the standalone ``verify.py`` it
carries, and every kind of tampering refused and named."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import cryptography
import pytest

from central import export
from central.cli import main as cli_main
from central.db import Database, open_db
from central.export import check_export, file_entry, parse_time
from central.ingest import Ingest
from central.record import Registration
from core.record import JSON, SealedRecord, Timestamp, b64u, canonical
from core.suites import SoftwareKey, key_id
from core.topics import records_topic
from lab.chains import Chain

BASE_MS = 1_760_000_000_000
MINUTE = 60_000
GW = "gw-export-0001"


def ts(seq: int) -> Timestamp:
    """Record *seq* is sealed at BASE_MS + seq minutes."""
    return Timestamp(BASE_MS + seq * MINUTE, "ntp", 1_000 + seq)


def stream(*, lost: tuple[int, ...] = (), suite: str = "ed25519"
           ) -> tuple[Registration, list[SealedRecord]]:
    """A gateway's chain: key.session (1), readings (2-6), key.rotate (7), a key.session
    by the new identity (8), readings (9-14) of which 10 and 11 are evicted and named by
    the gap record 15, readings (16-18). Seqs in *lost* never reach the platform."""
    chain = Chain(gateway_id=GW, suite=suite)
    registration = chain.registration  # the identity at enrolment, before the rotation
    out = [chain.start_session(ts(1))]
    out += [chain.seal("tag.presence", {"n": s}, ts(s)) for s in range(2, 7)]
    out.append(chain.rotate_identity(ts(7), SoftwareKey.generate(registration.alg)))
    out.append(chain.start_session(ts(8)))
    out += [chain.seal("tag.presence", {"n": s}, ts(s)) for s in range(9, 15)]
    gap = {"by_class": {"position": 2}, "count": 2, "evicted": [[10, 11]], "reason": "quota"}
    out.append(chain.seal("gap", gap, ts(15)))
    out += [chain.seal("tag.presence", {"n": s}, ts(s)) for s in range(16, 19)]
    assert [r.seq for r in out] == list(range(1, 19))
    delivered = [r for r in out if r.seq not in {10, 11, *lost}]
    return registration, delivered


def ingest(db: Database, *, lost: tuple[int, ...] = (), suite: str = "ed25519"
           ) -> tuple[Registration, dict[int, bytes]]:
    """Enrol the gateway and ingest :func:`stream`; its registration and records sent."""
    registration, records = stream(lost=lost, suite=suite)
    platform = Ingest(db)
    platform.enrol(registration)
    result = platform.ingest_message(records_topic(GW), b"\n".join(r.data for r in records))
    assert result.stored == len(records), result.as_dict()
    return registration, {r.seq: r.data for r in records}


def make(db: Database, out: Path, first: int = 3, last: int = 17) -> dict[str, JSON]:
    """Export seqs *first*..*last* (by their t)."""
    return export.export(db, GW, ts(first).utc_ms, ts(last).utc_ms, out, by="Clerk Li",
                         now_ms=BASE_MS + 100 * MINUTE)


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rewrite(src: Path, dst: Path, change: Callable[[dict[str, bytes]], None], *,
            rehash: bool) -> Path:
    """A tamperer's copy of the export: *change* edits the files; with *rehash*, the
    manifest's entries are recomputed to match."""
    files = members(src)
    change(files)
    if rehash:
        manifest = json.loads(files["manifest.json"])
        manifest["files"] = [file_entry(e["name"], files[e["name"]]) for e in manifest["files"]]
        files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return dst


def lines(files: dict[str, bytes]) -> list[bytes]:
    return files["records.jsonl"].splitlines()


def by_seq(files: dict[str, bytes], seq: int) -> int:
    """The index in records.jsonl of the record *seq*."""
    return next(i for i, line in enumerate(lines(files)) if json.loads(line)["seq"] == seq)


def run_standalone(zip_path: Path, where: Path) -> subprocess.CompletedProcess[str]:
    """Unzip and run verify.py with only the standard library and cryptography (and
    gmssl-fast, for the sm suite) importable (``python -I -S``: no site-packages, none of
    our packages)."""
    where.mkdir()
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(where)
    lib = where.parent / f"{where.name}-lib"
    lib.mkdir()
    site = Path(cryptography.__file__).parents[1]
    for entry in site.iterdir():  # cryptography and what it loads (cffi's backend)
        if entry.name.startswith(("cryptography", "_cffi_backend", "cffi", "gmssl_fast")):
            (lib / entry.name).symlink_to(entry)
    launcher = (f"import sys, runpy; sys.path[:0] = [{str(lib)!r}]; "
                "assert __import__('importlib').util.find_spec('central') is None; "
                "sys.argv = ['verify.py']; runpy.run_path('verify.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-S", "-c", launcher], cwd=where,
                          capture_output=True, text=True, timeout=60, check=False)


# --- a clean export -------------------------------------------------------------------


def test_an_export_holds_the_period_and_verifies(db: Database, tmp_path: Path) -> None:
    registration, sent = ingest(db)
    out = tmp_path / "case.zip"
    summary = make(db, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".case")] == []
    files = members(out)
    assert sorted(files) == sorted(["records.jsonl", "keys.json", "manifest.json", "verify.py",
                                    "README.txt", "extraction-statement.zh.txt",
                                    "extraction-statement.en.txt"])
    assert summary["manifest_sha256"] == hashlib.sha256(files["manifest.json"]).hexdigest()
    # the period 3..17 (10, 11 evicted), with seq 2 for the first record's prev
    assert lines(files) == [sent[s] for s in sorted(sent) if 2 <= s <= 17]
    manifest = json.loads(files["manifest.json"])
    period = manifest["period"]
    assert period["records"] == 13
    assert period["seq_ranges"] == [[3, 9], [12, 17]]
    assert period["gaps_explained"] == [[10, 11]]
    assert period["gaps_unexplained"] == []
    assert period["context"] == [{"seq": 2, "why": "the record before the period's first: "
                                  "its digest is the first record's prev"}]
    assert period["sessions"] == [1, 8]
    assert period["rotations"] == [7]
    assert manifest["made"]["by"] == "Clerk Li"
    assert manifest["made"]["software"].startswith("smartcorr-gateway")
    listed = {e["name"]: e for e in manifest["files"]}
    assert set(listed) == set(files) - {"manifest.json"}
    for name, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256(files[name]).hexdigest()
    keys = json.loads(files["keys.json"])
    assert keys["registration"]["kid"] == registration.kid
    assert [i["from_seq"] for i in keys["identities"]] == [0, 7]
    assert [s["seq"] for s in keys["sessions"]] == [1, 8]
    assert keys["sessions"][0]["record"].encode() == sent[1]
    zh = files["extraction-statement.zh.txt"].decode()
    en = files["extraction-statement.en.txt"].decode()
    for text in (zh, en):
        assert GW in text
        assert listed["records.jsonl"]["sha256"] in text
        assert "Clerk Li" in text
    assert "提取说明" in zh
    assert "期间内记录\N{FULLWIDTH COLON}13 条" in zh
    check = check_export(out)
    assert check.problems == []
    assert check.limits == []


def test_the_bundled_verify_py_runs_alone(db: Database, tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")
    run = run_standalone(tmp_path / "case.zip", tmp_path / "unzipped")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "VERDICT: VALID" in run.stdout
    assert "PROBLEM" not in run.stdout


def test_the_sm_suite(tmp_path: Path) -> None:
    """SM2 signatures, SM3 chain digests and key ids, in both checkers."""
    with open_db(f"sqlite:///{tmp_path / 'ingest.db'}") as database:
        ingest(database, suite="sm")
        make(database, tmp_path / "case.zip")
    assert json.loads(members(tmp_path / "case.zip")["keys.json"])["registration"]["alg"] \
        == "sm2-sm3"
    assert check_export(tmp_path / "case.zip").problems == []
    run = run_standalone(tmp_path / "case.zip", tmp_path / "unzipped")
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_command_line_exports_and_verifies(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'ingest.db'}"
    with open_db(url) as database:
        ingest(database)
    out = tmp_path / "case.zip"
    assert cli_main(["export", "--db", url, "--gw", GW, "--from",
                     export.iso(ts(3).utc_ms), "--to", str(ts(17).utc_ms), "--out", str(out),
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 13
    assert summary["manifest_sha256"] == hashlib.sha256(members(out)["manifest.json"]).hexdigest()
    assert cli_main(["export", "--db", url, "--gw", GW, "--from", "0", "--to", "1",
                     "--out", str(tmp_path / "empty.zip")]) == 2  # nothing in the period
    assert cli_main(["export", "--db", url, "--gw", GW, "--from", "0",
                     "--to", str(ts(17).utc_ms), "--out", str(out)]) == 2  # never replaced
    capsys.readouterr()
    assert cli_main(["verify-export", str(out)]) == 0
    assert "VERDICT: VALID" in capsys.readouterr().out
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert cli_main(["verify-export", str(tmp_path / "junk.zip")]) == 2


def test_times_are_iso_8601_utc_or_milliseconds() -> None:
    assert parse_time("1760000000000") == 1_760_000_000_000
    assert parse_time("2025-10-09T08:53:20Z") == 1_760_000_000_000
    assert parse_time("2025-10-09T16:53:20+08:00") == 1_760_000_000_000
    with pytest.raises(export.ExportError, match="no offset"):
        parse_time("2025-10-09T08:53:20")
    with pytest.raises(export.ExportError, match="ISO 8601"):
        parse_time("yesterday")


# --- the period's edges and its gaps ------------------------------------------------------


def test_the_first_record_of_the_chain_and_a_missing_predecessor(db: Database,
                                                                   tmp_path: Path) -> None:
    ingest(db, lost=(12,))
    whole = tmp_path / "whole.zip"
    make(db, whole, first=1, last=18)  # from seq 1: the genesis prev, no context record
    manifest = json.loads(members(whole)["manifest.json"])
    assert manifest["period"]["context"] == []
    assert manifest["period"]["first_prev"] == "the genesis value (seq 1)"
    assert manifest["period"]["gaps_unexplained"] == [[12, 12]]
    check = check_export(whole)
    assert check.problems == []
    assert check.limits == ["seq 12: missing at the platform, no gap record names it "
                            "(declared in the manifest)"]
    run = run_standalone(whole, tmp_path / "whole")
    assert run.returncode == 0, run.stdout
    assert "LIMIT   seq 12: missing at the platform" in run.stdout
    # a period starting after the unexplained gap: seq 12 is not there to check 13's prev
    late = tmp_path / "late.zip"
    make(db, late, first=13, last=18)
    manifest = json.loads(members(late)["manifest.json"])
    assert manifest["period"]["first_prev"] == "not checkable: seq 12 is not at the platform"
    assert "not checkable" in members(late)["extraction-statement.en.txt"].decode()
    assert check_export(late).limits == ["seq 13: its prev is not checked (the record before "
                                         "it is not in the export: the platform does not "
                                         "hold it)"]
    run = run_standalone(late, tmp_path / "late")
    assert run.returncode == 0, run.stdout
    # outside the period, in keys.json: the key.session of seq 8 (the period's key) and
    # of seq 1 (the key of the key.rotate at 7, by which the identity of seq 8 is trusted)
    keys = json.loads(members(late)["keys.json"])
    assert [s["seq"] for s in keys["sessions"]] == [1, 8]
    assert [s["seq"] for s in keys["rotations"]] == [7]


def test_a_gap_record_sealed_after_the_period_comes_with_it(db: Database,
                                                            tmp_path: Path) -> None:
    ingest(db)
    out = tmp_path / "case.zip"
    make(db, out, first=9, last=14)
    period = json.loads(members(out)["manifest.json"])["period"]
    assert [c["seq"] for c in period["context"]] == [8, 15]  # before, and the gap record
    assert period["gaps_explained"] == [[10, 11]]
    assert check_export(out).problems == []
    assert run_standalone(out, tmp_path / "u").returncode == 0


# --- tampering ------------------------------------------------------------------------


def problems_of(path: Path, where: Path) -> tuple[list[str], str]:
    """(verify-export's problems, verify.py's output); both must refuse."""
    check = check_export(path)
    run = run_standalone(path, where)
    assert check.problems, "verify-export accepted a tampered export"
    assert run.returncode == 1, run.stdout + run.stderr
    assert "VERDICT: NOT VALID" in run.stdout
    return [str(p) for p in check.problems], run.stdout


def test_a_changed_byte_is_named_by_file_and_record(db: Database, tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")

    def change(files: dict[str, bytes]) -> None:
        rows = lines(files)
        i = by_seq(files, 5)
        rows[i] = rows[i].replace(b'"n":5', b'"n":6')
        files["records.jsonl"] = b"".join(r + b"\n" for r in rows)

    plain = rewrite(tmp_path / "case.zip", tmp_path / "t1.zip", change, rehash=False)
    found, out = problems_of(plain, tmp_path / "t1")
    assert "records.jsonl: size, SHA-256 or SM3 differs from the manifest: the file " \
           "changed" in found
    assert "records.jsonl seq 5: bad signature: the record changed or another key signed " \
           "it" in found
    assert "PROBLEM records.jsonl: SHA-256 differs from the manifest" in out
    assert "PROBLEM records.jsonl seq 5: bad signature" in out
    rehashed = rewrite(tmp_path / "case.zip", tmp_path / "t2.zip", change, rehash=True)
    found, out = problems_of(rehashed, tmp_path / "t2")
    assert found == ["records.jsonl seq 5: bad signature: the record changed or another key "
                     "signed it", "records.jsonl: 12 valid records in the period, the "
                     "manifest says 13"]
    assert "records.jsonl seq 5: bad signature" in out


def test_a_removed_record_shows_in_the_chain(db: Database, tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")

    def remove(files: dict[str, bytes]) -> None:
        rows = lines(files)
        del rows[by_seq(files, 13)]
        files["records.jsonl"] = b"".join(r + b"\n" for r in rows)

    tampered = rewrite(tmp_path / "case.zip", tmp_path / "t.zip", remove, rehash=True)
    found, out = problems_of(tampered, tmp_path / "t")
    assert "records.jsonl seq 13: missing: not in the export and no gap record names it (a " \
           "record was removed?)" in found
    assert "PROBLEM records.jsonl seq 13: missing" in out


def test_a_record_signed_by_another_key_fails_its_certificate_chain(db: Database,
                                                                    tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")
    intruder = SoftwareKey.generate("ed25519-sha256")

    def replace(files: dict[str, bytes]) -> None:
        rows = lines(files)
        i = by_seq(files, 12)
        rec = json.loads(rows[i])
        rec["body"] = {"n": "not there"}
        rec["kid"] = key_id(intruder.alg, intruder.public_raw)
        del rec["sig"]
        rec["sig"] = b64u(intruder.sign(canonical(rec)))
        rows[i] = canonical(rec)
        files["records.jsonl"] = b"".join(r + b"\n" for r in rows)

    tampered = rewrite(tmp_path / "case.zip", tmp_path / "t.zip", replace, rehash=True)
    found, out = problems_of(tampered, tmp_path / "t")
    assert "records.jsonl seq 12: certificate chain fails: no key.session in the export " \
           "certifies its key" in found
    assert "PROBLEM records.jsonl seq 12: no key.session in the export certifies key" in out
    assert "PROBLEM records.jsonl seq 13: chain broken" in out


def test_a_changed_identity_in_keys_json(db: Database, tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")
    other = SoftwareKey.generate("ed25519-sha256")

    def swap_registration(files: dict[str, bytes]) -> None:
        keys = json.loads(files["keys.json"])
        keys["registration"]["key"] = b64u(other.public_raw)
        keys["registration"]["kid"] = key_id(other.alg, other.public_raw)
        keys["identities"][0]["kid"] = keys["registration"]["kid"]
        files["keys.json"] = json.dumps(keys).encode()

    tampered = rewrite(tmp_path / "case.zip", tmp_path / "t1.zip", swap_registration,
                       rehash=True)
    found, out = problems_of(tampered, tmp_path / "t1")
    assert any(p.startswith("keys.json seq 1: certificate chain fails") for p in found), found
    assert "PROBLEM keys.json seq 1: key.session not certified by the gateway's identity" in out

    def swap_history(files: dict[str, bytes]) -> None:
        keys = json.loads(files["keys.json"])
        keys["identities"][1]["kid"] = key_id(other.alg, other.public_raw)
        files["keys.json"] = json.dumps(keys).encode()

    tampered = rewrite(tmp_path / "case.zip", tmp_path / "t2.zip", swap_history, rehash=True)
    found, out = problems_of(tampered, tmp_path / "t2")
    assert found == ["keys.json: the identity history listed differs from the one the "
                     "registration and the key.rotate records prove"]
    assert "PROBLEM keys.json: the identity history listed differs" in out


def test_a_changed_manifest_hash_names_the_file(db: Database, tmp_path: Path) -> None:
    ingest(db)
    make(db, tmp_path / "case.zip")

    def change(files: dict[str, bytes]) -> None:
        manifest = json.loads(files["manifest.json"])
        entry = next(e for e in manifest["files"] if e["name"] == "keys.json")
        entry["sha256"] = "0" * 64
        files["manifest.json"] = json.dumps(manifest).encode()

    tampered = rewrite(tmp_path / "case.zip", tmp_path / "t.zip", change, rehash=False)
    found, out = problems_of(tampered, tmp_path / "t")
    assert found == ["keys.json: size, SHA-256 or SM3 differs from the manifest: the file "
                     "changed"]
    assert "PROBLEM keys.json: SHA-256 differs from the manifest" in out
