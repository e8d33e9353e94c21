"""``ingest verify``: a third party's check of a real capture (central/capture.py).

The capture is made once for the module, the way a third party would tap the broker:
a real mosquitto with mTLS and the production ACL, the gateway of a :class:`~lab.site.Site`
(gateway A, then B, then A again with a staged identity rotation: two starts, a
``key.rotate``), and a real ``mosquitto_sub -v -F '%t\\t%x'`` process holding the
platform's certificate. Then each way of tampering with it is caught by its count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from central.capture import COUNTS, add_arguments, run
from core.head import is_head
from core.record import b64u, canonical
from core.suites import SoftwareKey, key_id
from core.topics import PLATFORM_CN, TOPIC_ROOT, records_topic
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki, client_config, start_mosquitto
from lab.simulators.tag import SimTag
from lab.site import Site
from provisioning.identity import Identity, create_identity, load_identity, stage_next_key
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

GW_A, GW_B = "gw-cap-a001", "gw-cap-b001"
TOPICS = f"{TOPIC_ROOT}/+/records"
BEACONS = 24
#: How long the gateway, the broker and mosquitto_sub may take, seconds.
SETTLE_S = 30.0

@dataclass
class Captured:
    path: Path
    keys: dict[str, Path]  # gateway id -> its signing.pub
    #: the session keys each gateway made, in order (RAM only on a gateway: kept by the test)
    sessions: dict[str, list[SoftwareKey]] = field(default_factory=dict)

    def lines(self) -> list[tuple[str, list[bytes]]]:
        """(topic, records) of each message; its head statement left out."""
        return [(topic, [r for r in recs if not is_head(r)]) for topic, recs in self.raw()]

    def raw(self) -> list[tuple[str, list[bytes]]]:
        """(topic, lines) of each message, its head statement last."""
        out = []
        for raw in self.path.read_bytes().splitlines():
            topic, _, hexed = raw.decode().rpartition("\t")
            out.append((topic, bytes.fromhex(hexed).split(b"\n")))
        return out


def write_capture(path: Path, messages: list[tuple[str, list[bytes]]]) -> Path:
    newline = b"\n"
    path.write_text("".join(f"{t}\t{newline.join(recs).hex()}\n" for t, recs in messages))
    return path


def verify(captured: Captured, path: Path | None = None) -> tuple[int, dict[str, int]]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [str(path or captured.path), "--json",
            *(f"--key={gw}={file}" for gw, file in captured.keys.items())]
    args = parser.parse_args(argv)
    out = path or captured.path
    report_file = out.with_suffix(".report")
    code = _run_capturing(args, report_file)
    report = json.loads(report_file.read_text().splitlines()[-1]) if code != 2 else {}
    return code, report


def _run_capturing(args: argparse.Namespace, out: Path) -> int:
    with out.open("w") as f, contextlib.redirect_stdout(f):
        return run(args)


def _sub(broker: Mosquitto, pki: Pki, *extra: str) -> list[str]:
    files = pki.client(PLATFORM_CN)
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.fail("mosquitto_sub is missing: run 'bash scripts/setup.sh --test' "
                    "(Debian's mosquitto-clients)")
    return [binary, "-h", broker.host, "-p", str(broker.port), "--cafile", str(pki.ca_file),
            "--cert", str(files.cert), "--key", str(files.key), "-i", PLATFORM_CN, "-c",
            "-q", "1", "-t", TOPICS, *extra]


def _run_site(workdir: Path, identity: Identity, broker: Mosquitto, pki: Pki, *,
              beacons: int) -> int:
    """Start the gateway of a site, have it ack *beacons* beacons, stop it drained; the
    records the broker acknowledged."""
    workdir.mkdir(exist_ok=True)
    acked = AckedCounter()
    site = Site(workdir, identity, client_config(broker, pki, identity.gateway_id),
                on_acked=acked)
    with site:
        tags = [SimTag(secrets.randbits(31), secrets.token_bytes(16)) for _ in range(2)]
        sim = site.tag_receiver(tags, f"TR-{identity.gateway_id}") if beacons else None
        site.start()
        if sim is not None:
            for i in range(beacons):
                if i % 4 == 0:  # the strap of the first tag opens, closes...: presence
                    tags[0].strap_closed = not tags[0].strap_closed  # intervals mid-chain
                sim.send_beacon(tags[i % 2])
            wait_for(lambda: len(sim.acked()) == beacons, SETTLE_S, "every beacon acked")
        assert site.close(drain_s=SETTLE_S), "the gateway did not forward everything"
    return acked.count


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Captured]:
    tmp = tmp_path_factory.mktemp("capture")
    broker = start_mosquitto(tmp / "mosquitto", pki)
    sub: subprocess.Popen[bytes] | None = None
    try:
        # a persistent session first (-c, -E: exits once subscribed): the broker queues
        # every record for the tap from now on, so nothing is missed while it starts
        subprocess.run(_sub(broker, pki, "-E"), check=True, timeout=SETTLE_S)
        path = tmp / "records.capture"
        with path.open("wb") as out:
            sub = subprocess.Popen(_sub(broker, pki, "-v", "-F", r"%t\t%x"), stdout=out)
        sessions: dict[str, list[SoftwareKey]] = {GW_A: [], GW_B: []}
        a = create_identity(tmp / "id-a", GW_A)
        b = create_identity(tmp / "id-b", GW_B)
        keys = {GW_A: tmp / "a.pub", GW_B: tmp / "b.pub"}
        keys[GW_A].write_text(json.dumps(a.registration()))
        keys[GW_B].write_text(json.dumps(b.registration()))
        with pytest.MonkeyPatch.context() as mp:
            made = Identity.session_key

            def recording(self: Identity) -> SoftwareKey:
                key = made(self)
                sessions[self.gateway_id].append(key)
                return key

            mp.setattr(Identity, "session_key", recording)
            published = _run_site(tmp / "site-a", a, broker, pki, beacons=BEACONS)
            published += _run_site(tmp / "site-b", b, broker, pki, beacons=BEACONS // 2)
            stage_next_key(a.directory)  # A's next start certifies and switches to it
            published += _run_site(tmp / "site-a", load_identity(a.directory), broker, pki,
                                   beacons=BEACONS // 2)
        for ident in (a, b):
            ident.close()
        cap = Captured(path, keys, sessions)

        def records() -> int:
            return sum(len(recs) for _, recs in cap.lines()) if path.stat().st_size else 0

        wait_for(lambda: records() >= published, SETTLE_S, "the capture to hold every "
                 "record the broker acknowledged")
        sub.terminate()
        sub.wait(SETTLE_S)
        sub = None
        assert records() == published
        yield cap
    finally:
        if sub is not None:
            sub.kill()
            sub.wait()
        broker.stop()


# -- tampering helpers ---------------------------------------------------------------


def parsed(line: bytes) -> dict[str, object]:
    out: dict[str, object] = json.loads(line)
    return out


def resign(line: bytes, key: SoftwareKey, **changes: object) -> bytes:
    """*line* with *changes*, signed by *key* (its kid)."""
    rec = {**parsed(line), **changes, "kid": key_id(key.alg, key.public_raw)}
    del rec["sig"]
    rec["sig"] = b64u(key.sign(canonical(rec)))  # type: ignore[arg-type]
    return canonical(rec)  # type: ignore[arg-type]


def find(messages: list[tuple[str, list[bytes]]], gw: str,
         pick: Callable[[dict[str, object]], bool]) -> tuple[int, int]:
    """(message index, line index) of the record of *gw* in the middle of its chain for
    which *pick* holds."""
    found = [(m, i) for m, (_, recs) in enumerate(messages) for i, r in enumerate(recs)
             if parsed(r)["gw"] == gw and pick(parsed(r))]
    assert found, f"no record of {gw} to tamper with"
    return found[len(found) // 2]


def last_seq(messages: list[tuple[str, list[bytes]]], gw: str) -> int:
    return max(int(parsed(r)["seq"]) for _, recs in messages for r in recs  # type: ignore[call-overload]
               if parsed(r)["gw"] == gw)


def mid_chain(gw: str, messages: list[tuple[str, list[bytes]]],
              kind: str = "tag.interval") -> tuple[int, int]:
    top = last_seq(messages, gw)
    return find(messages, gw, lambda r: r["kind"] == kind and r["seq"] != top)


def expect(report: dict[str, int], **nonzero: int) -> None:
    """Every count but records/verified zero, but those in *nonzero*."""
    wrong = {k: report.get(k) for k in COUNTS
             if k not in ("records", "verified") and report.get(k, 0) != nonzero.get(k, 0)}
    assert not wrong, (wrong, report)


# -- the untampered capture ----------------------------------------------------------


def test_the_capture_is_what_mosquitto_sub_writes(captured: Captured) -> None:
    raw = captured.path.read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.splitlines():
        topic, tab, hexed = line.partition(b"\t")
        assert tab
        assert topic.decode() in (records_topic(GW_A), records_topic(GW_B))
        assert hexed == hexed.lower()
        assert json.loads(bytes.fromhex(hexed.decode()).split(b"\n")[0])["gw"] in (GW_A, GW_B)


def test_the_untampered_capture_passes(captured: Captured) -> None:
    code, report = verify(captured)
    assert code == 0, report
    expect(report)
    assert report["records"] == report["verified"] > BEACONS
    kinds = [parsed(r)["kind"] for _, recs in captured.lines() for r in recs]
    assert kinds.count("key.session") == 4  # A, B, and A's second start: old and new identity
    assert kinds.count("key.rotate") == 1


def test_a_bad_line_is_counted_with_its_number_and_the_rest_verified(
        captured: Captured, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.capture"
    lines = captured.path.read_bytes().splitlines()
    bad.write_bytes(b"\n".join([lines[0], b"smartcorr/v1/gw/x/records 7b7d", *lines[1:]]))
    code, report = verify(captured, bad)
    assert code == 1
    assert f"{bad}:2:" in capsys.readouterr().err
    expect(report, bad_lines=1)
    assert report["records"] == report["verified"] > BEACONS  # the rest, all verified
    # an odd number of hex digits, and a line of garbage: each counted, the first named
    bad.write_bytes(lines[0] + b"\n" + lines[1][:-1] + b"\n\x00garbage\n" + lines[2] + b"\n")
    code, report = verify(captured, bad)
    assert code == 1
    assert report["bad_lines"] == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err
    assert f"{bad}:3:" not in err
    assert verify(captured, tmp_path / "absent.capture")[0] == 2


def test_a_capture_without_records_is_not_a_pass(captured: Captured, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An empty capture, or one of another topic only (a wrong mosquitto_sub -t): exit 1."""
    empty = tmp_path / "empty.capture"
    empty.write_bytes(b"")
    code, report = verify(captured, empty)
    assert code == 1
    assert report["records"] == 0
    assert "no records in the capture" in empty.with_suffix(".report").read_text()
    status = tmp_path / "status.capture"
    status.write_text(f"{TOPIC_ROOT}/{GW_A}/status\t{b'{}'.hex()}\n")
    code, report = verify(captured, status)
    assert code == 1
    assert report["other_topics"] == 1
    assert "no records in the capture" in status.with_suffix(".report").read_text()
    capsys.readouterr()


def test_records_of_a_gateway_without_a_key_counted_once_each_quietly(
        captured: Captured, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only A's key: each record of B is one unknown_gateway (its messages' head statements
    are not more), the verifier's log stays quiet and one line names B."""
    only_a = Captured(captured.path, {GW_A: captured.keys[GW_A]})
    b_records = sum(1 for _, recs in captured.lines() for r in recs if parsed(r)["gw"] == GW_B)
    assert any(is_head(line) for t, lines in captured.raw() if GW_B in t for line in lines)
    with caplog.at_level("INFO"):
        code, report = verify(only_a)
    assert code == 1
    expect(report, unknown_gateway=b_records)
    assert not [r for r in caplog.records if r.name == "central.verifier"]
    out = captured.path.with_suffix(".report").read_text()
    assert f"unknown_gateway {b_records}:" in out
    assert f"{GW_B} ({b_records})" in out


# -- each tampering, caught ------------------------------------------------------------


def test_a_flipped_byte(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_A, messages)
    line = messages[m][1][i]
    at = line.index(b",", line.index(b'"mono":')) - 1  # mono's last digit: flipping its
    messages[m][1][i] = line[:at] + bytes([line[at] ^ 1]) + line[at + 1:]  # low bit: a digit
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, bad_signature=1, unexplained_gaps=1)


def test_a_dropped_record(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_A, messages)
    del messages[m][1][i]
    messages = [(t, recs) for t, recs in messages if recs]
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, unexplained_gaps=1)


def test_a_duplicate_message(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, _ = mid_chain(GW_A, messages)
    messages.append(messages[m])
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, duplicates=len(messages[m][1]))


def test_a_conflicting_record_for_a_seq(captured: Captured, tmp_path: Path) -> None:
    """The same (gateway, seq) twice, both validly signed, other contents: equivocation
    (only with the session key, so it is taken from the gateway's RAM here)."""
    messages = captured.lines()
    m, i = mid_chain(GW_B, messages)
    other = resign(messages[m][1][i], captured.sessions[GW_B][0],
                   body={**parsed(messages[m][1][i])["body"], "rssi_dbm": -1})  # type: ignore[dict-item]
    messages.append((records_topic(GW_B), [other]))
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, conflicts=1)


def test_two_records_swapped_within_a_class(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = find(messages, GW_A, lambda r: r["prio"] == "position")
    recs = messages[m][1]
    if len(recs) < 2:  # the beacons went one a message: swap two messages of the class
        later = next(n for n in range(m + 1, len(messages))
                     if parsed(messages[n][1][0])["prio"] == "position"
                     and parsed(messages[n][1][0])["gw"] == GW_A)
        messages[m], messages[later] = messages[later], messages[m]
    else:
        j = i + 1 if i + 1 < len(recs) else i - 1
        recs[i], recs[j] = recs[j], recs[i]
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, reordered=1)


def test_a_replaced_signature(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_A, messages)
    original = messages[m][1][i]
    # a donor signature from another record of A's: never the tampered record's own
    donor = next(parsed(r)["sig"] for _, recs in messages for r in recs
                 if parsed(r)["gw"] == GW_A and parsed(r)["sig"] != parsed(original)["sig"])
    messages[m][1][i] = canonical({**parsed(original), "sig": donor})  # type: ignore[dict-item]
    assert messages[m][1][i] != original
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, bad_signature=1, unexplained_gaps=1)


def test_a_non_canonical_re_encoding(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_A, messages)
    messages[m][1][i] = json.dumps(parsed(messages[m][1][i])).encode()  # ", " and ": "
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, non_canonical=1, unexplained_gaps=1)


def test_a_record_of_b_signed_with_a_session_key_of_a(captured: Captured,
                                                      tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_B, messages)
    messages[m][1][i] = resign(messages[m][1][i], captured.sessions[GW_A][0])
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, wrong_key=1, unexplained_gaps=1)


def test_a_record_of_a_on_the_topic_of_b(captured: Captured, tmp_path: Path) -> None:
    messages = captured.lines()
    m, i = mid_chain(GW_A, messages)
    moved = messages[m][1].pop(i)
    messages = [(t, recs) for t, recs in messages if recs]
    messages.append((records_topic(GW_B), [moved]))
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, wrong_gateway=1, unexplained_gaps=1)


def test_the_old_session_key_after_a_new_key_session(captured: Captured,
                                                      tmp_path: Path) -> None:
    """A's second start certified two session keys (its old identity's, then the new
    identity's): a record after the second signed with the first is refused."""
    messages = captured.lines()
    first, second = captured.sessions[GW_A][1:3]
    new_kid = key_id(second.alg, second.public_raw)
    m, i = find(messages, GW_A, lambda r: r["kid"] == new_kid and r["kind"] != "key.session"
                and r["seq"] != last_seq(messages, GW_A))
    messages[m][1][i] = resign(messages[m][1][i], first)
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    expect(report, wrong_key=1, unexplained_gaps=1)


def test_a_dropped_key_rotate(captured: Captured, tmp_path: Path) -> None:
    """Without the rotation the new identity's certificates, and every record signed by
    the session keys they certify, are trusted by nobody."""
    messages = captured.lines()
    m, i = find(messages, GW_A, lambda r: r["kind"] == "key.rotate")
    rotate_seq = parsed(messages[m][1][i])["seq"]
    del messages[m][1][i]
    messages = [(t, recs) for t, recs in messages if recs]
    new_ident = json.loads(
        (captured.keys[GW_A].parent / "id-a" / "signing.pub").read_text())["kid"]
    orphans = [parsed(r) for _, recs in messages for r in recs if parsed(r)["gw"] == GW_A
               and int(parsed(r)["seq"]) > int(rotate_seq)]  # type: ignore[call-overload]
    sessions = {r["kid"] for r in orphans if r["kind"] == "key.session"
                and r["body"]["cert"]["identity"]["kid"] == new_ident}  # type: ignore[index]
    assert sessions, "no session certified by the new identity in the capture"
    untrusted = sum(1 for r in orphans if r["kid"] in sessions)
    code, report = verify(captured, write_capture(tmp_path / "t.capture", messages))
    assert code == 1
    gaps = 1 if any(int(r["seq"]) > int(rotate_seq) and r["kid"] not in sessions  # type: ignore[call-overload]
                    for r in orphans) else 0
    expect(report, wrong_key=untrusted, unexplained_gaps=gaps)



# -- the command line and the platform's registry ------------------------------------


def test_the_command_line_verifies_a_capture(captured: Captured) -> None:
    """``python -m central verify`` (the ``ingest`` console script) as a third party runs
    it: exit 0 and one JSON object on the last line."""
    keys = [f"--key={gw}={file}" for gw, file in captured.keys.items()]
    done = subprocess.run([sys.executable, "-m", "central", "verify", str(captured.path),
                           *keys, "--json"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["records"] == report["verified"] > 0


def test_keys_from_the_platform_registry(captured: Captured, tmp_path: Path) -> None:
    """``--db``: the registrations the platform enrolled (central/db.py) instead of files."""
    from central.db import open_db
    from central.ingest import Ingest
    from central.record import load_registrations

    url = f"sqlite:///{tmp_path}/platform.db"
    with open_db(url) as db:
        ingest = Ingest(db)
        for reg in load_registrations(list(captured.keys.values())).values():
            ingest.enrol(reg)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    report_file = tmp_path / "report"
    assert _run_capturing(parser.parse_args([str(captured.path), "--db", url, "--json"]),
                          report_file) == 0
    report = json.loads(report_file.read_text().splitlines()[-1])
    expect(report)
    assert report["records"] == report["verified"] > 0
