# ruff: noqa: RUF001 -- the Chinese statement is written with full-width punctuation
"""A court-ready export of one gateway's records over a period, and its check.

``ingest export --db URL --gw ID --from T --to T --out F.zip`` writes one zip file
(atomically, mode 0600: it holds personal data) holding:

* ``records.jsonl``: the records of the gateway whose ``t`` is in the period, the bytes
  exactly as received (the ``records`` table), one a line, in seq order; with them the
  *context* records the chain needs at its edges, each named in the manifest: the record
  before the period's first (its digest is that record's ``prev``), records inside the
  period's seq span whose ``t`` falls outside it (a clock step), and the signed ``gap``
  records, sealed after the period, that name seqs missing in it;
* ``keys.json``: the registration at enrolment, the identity history (the
  ``identities`` table and every ``key.rotate`` record), every ``key.session`` record
  that certifies a key used by an exported record (and the next one, which ends that
  key's validity);
* ``verify.py``: a standalone check (Python 3 and ``cryptography``; ``gmssl-fast`` for
  the ``sm`` suite) that imports nothing of ours;
* ``README.txt``, ``extraction-statement.zh.txt``, ``extraction-statement.en.txt``;
* ``manifest.json``: every other file's size, SHA-256 and SM3, the export's parameters,
  its counts, when, where and by whom it was made.

The manifest cannot hold its own hash: the command prints it, to be written down outside
the zip (on the transmittal form). ``ingest verify-export F.zip`` checks a zip again with
the platform's own verifier (:class:`central.verifier.Verifier`), independently of the
bundled ``verify.py``, and names each changed file and each record that fails.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import tempfile
import textwrap
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from central.db import Database
from central.ingest import gaps
from central.record import RecordError, Registration, VerifiedRecord, parse_record
from central.verifier import Verifier
from core.durable import fsync_dir
from core.errors import UserError
from core.record import JSON, b64u
from core.session import ROTATE_KIND, CertificateError, parse_identity
from core.suites import SM2, digest

EXPORT_FORMAT = "smartcorr-export/1"
RECORDS, KEYS, MANIFEST, VERIFY, README = (
    "records.jsonl", "keys.json", "manifest.json", "verify.py", "README.txt")
STATEMENT_ZH, STATEMENT_EN = "extraction-statement.zh.txt", "extraction-statement.en.txt"
EXIT_OK, EXIT_PROBLEM, EXIT_BAD_INPUT = 0, 1, 2
#: The largest zip member verify-export reads (a zip bomb is unreadable input).
MAX_MEMBER_BYTES = 1 << 30
_GENESIS = bytes(32)
Range = tuple[int, int]


class ExportError(UserError):
    """The export cannot be made as asked (unknown gateway, empty period, bad time)."""


class UnreadableExportError(Exception):
    """The zip (or its manifest) cannot be read at all: exit 2."""


def parse_time(text: str) -> int:
    """Milliseconds since 1970 (UTC) from ``1760000000000`` or an ISO 8601 time with its
    offset (``2025-10-09T08:00:00Z``)."""
    if re.fullmatch(r"-?\d+", text.strip()):
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ExportError(f"time {text!r}: give ISO 8601 UTC (2025-10-09T08:00:00Z) or "
                          "milliseconds since 1970") from None
    if when.tzinfo is None:
        raise ExportError(f"time {text!r} has no offset: add Z for UTC "
                          "(2025-10-09T08:00:00Z)")
    return int(when.timestamp() * 1000)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def software_version() -> str:
    try:
        return f"smartcorr-gateway {importlib.metadata.version('smartcorr-gateway')}"
    except importlib.metadata.PackageNotFoundError:
        return "smartcorr-gateway (version unknown: not installed as a package)"


def os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name, no passwd entry (a container)
        return f"uid {os.getuid()}"


def redacted(url: str) -> str:
    """The database URL without a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc))


def ranges(seqs: Iterable[int]) -> list[Range]:
    """Sorted seqs as (first, last) ranges, both included."""
    out: list[Range] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


def _clip(found: list[Range], lo: int, hi: int) -> list[list[int]]:
    return [[max(a, lo), min(b, hi)] for a, b in found if a <= hi and b >= lo]


# --- collecting --------------------------------------------------------------------


@dataclass
class Collected:
    """What the database holds for one export."""

    gw: str
    from_ms: int
    to_ms: int
    registration: dict[str, JSON]
    enrolled_at: int
    records: dict[int, bytes] = field(default_factory=dict)  # records.jsonl, by seq
    in_period: list[int] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # of the period's records
    context: list[dict[str, JSON]] = field(default_factory=list)
    sessions: dict[int, bytes] = field(default_factory=dict)
    rotations: dict[int, bytes] = field(default_factory=dict)
    identities: list[dict[str, JSON]] = field(default_factory=list)
    gaps_explained: list[list[int]] = field(default_factory=list)
    gaps_unexplained: list[list[int]] = field(default_factory=list)
    conflicts: list[dict[str, JSON]] = field(default_factory=list)
    chain_breaks: list[int] = field(default_factory=list)
    first_prev: str = ""

    @property
    def first(self) -> int:
        return self.in_period[0]

    @property
    def last(self) -> int:
        return self.in_period[-1]


def collect(db: Database, gw: str, from_ms: int, to_ms: int) -> Collected:
    """Read everything the export of *gw* over [*from_ms*, *to_ms*] needs."""
    if to_ms < from_ms:
        raise ExportError(f"the period ends ({iso(to_ms)}) before it starts ({iso(from_ms)})")
    explained, unexplained = gaps(db, gw)
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT registration, enrolled_at FROM gateways WHERE gw = ?", (gw,))
        if row is None:
            raise ExportError(f"gateway {gw!r} is not enrolled in this database: see "
                              "'report --gw' for its id")
        out = Collected(gw, from_ms, to_ms, json.loads(row[0]), int(row[1]))
        span = tx.one("SELECT MIN(seq), MAX(seq) FROM records WHERE gw = ? AND t >= ? "
                      "AND t <= ?", (gw, from_ms, to_ms))
        if span is None or span[0] is None:
            raise ExportError(f"gateway {gw} has no record with t in {iso(from_ms)} .. "
                              f"{iso(to_ms)}: nothing to export")
        first, last = int(span[0]), int(span[1])
        kinds: dict[str, int] = {}
        for seq, t, kind, data in tx.all(
                "SELECT seq, t, kind, data FROM records WHERE gw = ? AND seq >= ? AND "
                "seq <= ? ORDER BY seq", (gw, first - 1, last)):
            out.records[int(seq)] = bytes(data)
            if from_ms <= int(t) <= to_ms:
                out.in_period.append(int(seq))
                kinds[str(kind)] = kinds.get(str(kind), 0) + 1
            elif int(seq) == first - 1:
                out.context.append({"seq": int(seq), "why": "the record before the period's "
                                    "first: its digest is the first record's prev"})
            else:
                out.context.append({"seq": int(seq), "why": "inside the period's seqs, its t "
                                    "outside the period (the gateway's clock stepped)"})
        out.kinds = dict(sorted(kinds.items()))
        out.gaps_explained = _clip(explained, first, last)
        out.gaps_unexplained = _clip(unexplained, first, last)
        for (by_seq,) in tx.all("SELECT DISTINCT by_seq FROM gaps_explained WHERE gw = ? "
                                "AND first_seq <= ? AND last_seq >= ? ORDER BY by_seq",
                                (gw, last, first)):
            gap = tx.one("SELECT data FROM records WHERE gw = ? AND seq = ?", (gw, by_seq))
            if gap is not None and int(by_seq) not in out.records:
                out.records[int(by_seq)] = bytes(gap[0])
                out.context.append({"seq": int(by_seq), "why": "a gap record naming seqs "
                                    "missing in the period"})
        out.rotations = {int(s): bytes(d) for s, d in tx.all(
            "SELECT seq, data FROM records WHERE gw = ? AND kind = ? ORDER BY seq",
            (gw, ROTATE_KIND))}
        starts = [(int(s), str(k)) for s, k in tx.all(
            "SELECT from_seq, kid FROM sessions WHERE gw = ? ORDER BY from_seq", (gw,))]
        # the key id of every exported record: the gap records (after the span) and the
        # rotations are few, one query each
        kids = {int(s): str(k) for s, k in tx.all(
            "SELECT seq, kid FROM records WHERE gw = ? AND seq >= ? AND seq <= ?",
            (gw, first - 1, last))}
        for seq in set(out.records) | set(out.rotations):
            if seq not in kids:
                kid = tx.one("SELECT kid FROM records WHERE gw = ? AND seq = ?", (gw, seq))
                kids[seq] = "" if kid is None else str(kid[0])
        for seq in _needed_sessions(starts, kids, set(out.records) | set(out.rotations)):
            data = tx.one("SELECT data FROM records WHERE gw = ? AND seq = ?", (gw, seq))
            if data is not None:
                out.sessions[seq] = bytes(data[0])
        out.identities = [
            {"from_seq": int(r[0]), "kid": r[1], "alg": r[2], "key": b64u(bytes(r[3])),
             "class": r[4]}
            for r in tx.all("SELECT from_seq, kid, alg, pubkey, key_class FROM identities "
                            "WHERE gw = ? ORDER BY from_seq", (gw,))]
        out.conflicts = [
            {"seq": int(r[0]), "stored_digest": b64u(bytes(r[1])), "digest": b64u(bytes(r[2])),
             "received_at": iso(int(r[3]))}
            for r in tx.all("SELECT seq, stored_digest, digest, received_at FROM conflicts "
                            "WHERE gw = ? AND seq >= ? AND seq <= ? ORDER BY seq, id",
                            (gw, first, last))]
        out.chain_breaks = [int(r[0]) for r in tx.all(
            "SELECT seq FROM chain_breaks WHERE gw = ? AND seq >= ? AND seq <= ? ORDER BY seq",
            (gw, first, last))]
    out.records = dict(sorted(out.records.items()))
    out.context.sort(key=lambda c: int(c["seq"]))
    out.first_prev = ("the genesis value (seq 1)" if first == 1 else
                      f"checked against seq {first - 1} (in {RECORDS})" if first - 1 in
                      out.records else f"not checkable: seq {first - 1} is not at the platform")
    return out


def _needed_sessions(starts: list[tuple[int, str]], kids: dict[int, str],
                     seqs: set[int]) -> list[int]:
    """The key.session seqs that certify the keys of *seqs* (their kid at *kids*), and
    for each the next key.session, which ends its validity."""
    needed: set[int] = set()
    for seq in seqs:
        certifying = [s for s, kid in starts if s <= seq and kid == kids.get(seq)]
        if certifying:
            needed.add(certifying[-1])
    following = [next((s for s, _ in starts if s > f), None) for f in needed]
    needed.update(s for s in following if s is not None)
    return sorted(needed)


# --- the files ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Made:
    """When, where and by whom an export was made."""

    at_ms: int
    by: str
    by_source: str  # "--by" or "os user"
    host: str
    software: str
    database: str


def file_entry(name: str, data: bytes) -> dict[str, JSON]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "sm3": digest(SM2, data).hex()}


def build(c: Collected, made: Made) -> dict[str, bytes]:
    """Every file of the zip, by name (the manifest last)."""
    files: dict[str, bytes] = {}
    files[RECORDS] = b"".join(data + b"\n" for data in c.records.values())
    keys = {
        "gw": c.gw, "registration": c.registration, "enrolled_at": iso(c.enrolled_at),
        "identities": c.identities,
        "rotations": [{"seq": s, "record": d.decode("utf-8")} for s, d in c.rotations.items()],
        "sessions": [{"seq": s, "record": d.decode("utf-8")} for s, d in c.sessions.items()],
    }
    files[KEYS] = (json.dumps(keys, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    files[VERIFY] = VERIFY_PY.encode("utf-8")
    files[README] = README_TXT.encode("utf-8")
    period: dict[str, JSON] = {
        "from": iso(c.from_ms), "to": iso(c.to_ms), "from_ms": c.from_ms, "to_ms": c.to_ms,
        "selection": "every record of the gateway whose t (the gateway's clock, ms since "
                     "1970 UTC) is in [from_ms, to_ms], both included",
        "records": len(c.in_period), "first_seq": c.first, "last_seq": c.last,
        "seq_ranges": [list(r) for r in ranges(c.in_period)], "kinds": c.kinds,
        "context": c.context, "first_prev": c.first_prev,
        "gaps_explained": c.gaps_explained, "gaps_unexplained": c.gaps_unexplained,
        "conflicts": c.conflicts, "chain_breaks": c.chain_breaks,
        "sessions": sorted(c.sessions), "rotations": sorted(c.rotations),
    }
    hashed = {name: file_entry(name, data) for name, data in files.items()}
    files[STATEMENT_EN] = statement_en(c, made, hashed).encode("utf-8")
    files[STATEMENT_ZH] = statement_zh(c, made, hashed).encode("utf-8")
    manifest = {
        "format": EXPORT_FORMAT,
        "files": [file_entry(name, data) for name, data in files.items()],
        "export": {"gw": c.gw, "from": iso(c.from_ms), "to": iso(c.to_ms)},
        "period": period,
        "made": {"at": iso(made.at_ms), "at_ms": made.at_ms, "by": made.by,
                 "by_source": made.by_source, "host": made.host, "software": made.software,
                 "database": made.database},
    }
    files[MANIFEST] = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    return files


def _limits_en(c: Collected) -> list[str]:
    """The statement's limits, each wrapped as a list item."""
    items = [f"- Seqs missing in the period and named by a signed gap record (evicted by the "
           f"gateway under its storage quota): {_text(c.gaps_explained)}.",
           f"- Seqs missing in the period that no gap record names (never received by the "
           f"platform: lost, still on their way, or withheld): {_text(c.gaps_unexplained)}.",
           f"- The first record's prev: {c.first_prev}.",
           f"- Other records the platform received for these seqs, validly signed "
           f"(conflicts, kept aside, not exported): {len(c.conflicts)}.",
           f"- Chain breaks the platform recorded in these seqs: "
           f"{_text(ranges(c.chain_breaks))}."]
    return [textwrap.fill(item, 88, subsequent_indent="  ") for item in items]


def _text(found: Iterable[Iterable[int]], none: str = "none") -> str:
    """Seq ranges as text: ``3-9, 12``."""
    items = [f"{a}" if a == b else f"{a}-{b}" for a, b in found]
    return ", ".join(items) if items else none


_BY_EN = {"--by": "as given to the export command", "os user": "the operating system user"}


def statement_en(c: Collected, made: Made, hashed: dict[str, dict[str, JSON]]) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in c.kinds.items())
    files = "\n".join(f"  {e['name']}: {e['size']} bytes\n    SHA-256 {e['sha256']}\n"
                      f"    SM3     {e['sm3']}" for e in hashed.values())
    return f"""EXTRACTION STATEMENT

1. What was extracted
Gateway: {c.gw}
Period: {iso(c.from_ms)} to {iso(c.to_ms)} (UTC, both included).
  Over each record's t: the time the gateway's clock gave when it sealed the record.
Records in the period: {len(c.in_period)}, seqs {_text(ranges(c.in_period))}.
Kinds: {kinds}.
Also included, to check the chain and the keys (listed in manifest.json):
  context records in {RECORDS}: {len(c.context)};
  key.session records in {KEYS}: {len(c.sessions)}, key.rotate records: {len(c.rotations)}.
The records are the bytes the platform received and stored, unchanged.

2. From which system
Host {made.host}, software {made.software}, database {made.database}.

3. By whom and when
Extracted by {made.by} ({_BY_EN[made.by_source]}) at {iso(made.at_ms)} (UTC).

4. Files (SHA-256 and SM3 of each)
{files}
manifest.json lists these and this statement; its own hashes were printed when the export
was made and are recorded outside this file.

5. Limits
{chr(10).join(_limits_en(c))}
- The signatures show that each record was made by a key the gateway's registered
  identity certified, and has not changed since. They do not show that what the record
  says (a position, a tag's presence, the time) is true in the world, nor who carried the
  device.
"""


def statement_zh(c: Collected, made: Made, hashed: dict[str, dict[str, JSON]]) -> str:
    kinds = "，".join(f"{k} {n} 条" for k, n in c.kinds.items())
    files = "\n".join(f"  {e['name']}：{e['size']} 字节\n    SHA-256 {e['sha256']}\n"
                      f"    SM3     {e['sm3']}" for e in hashed.values())
    return f"""提取说明

一、提取内容
网关编号：{c.gw}
时间范围：{iso(c.from_ms)} 至 {iso(c.to_ms)}（UTC，含起止时刻）。
  以每条记录的 t 字段为准，即网关封存该记录时其时钟给出的时间。
期间内记录：{len(c.in_period)} 条，序号 {_text(ranges(c.in_period))}。
记录类型：{kinds}。
为校验哈希链和密钥而一并提供（清单见 manifest.json）：
  {RECORDS} 中的上下文记录 {len(c.context)} 条；
  {KEYS} 中的 key.session 记录 {len(c.sessions)} 条、key.rotate 记录 {len(c.rotations)} 条。
所有记录均为平台接收并存储的原始字节，未作任何改动。

二、提取来源
主机 {made.host}，软件 {made.software}，数据库 {made.database}。

三、提取人及提取时间
提取人：{made.by}（{_BY_ZH[made.by_source]}），提取时间：{iso(made.at_ms)}（UTC）。

四、文件及其哈希值（SHA-256 与 SM3）
{files}
manifest.json 列出上述文件及本说明的哈希值；manifest.json 自身的哈希值在导出时由程序输出，
记录于本文件之外。

五、局限
- 期间内缺失、但有网关签名的 gap 记录说明的序号（网关因存储配额删除）：
  {_text(c.gaps_explained, "无")}。
- 期间内缺失、且无任何 gap 记录说明的序号（平台未收到：丢失、尚在传输或被扣留）：
  {_text(c.gaps_unexplained, "无")}。
- 第一条记录的 prev 字段：{_first_prev_zh(c)}。
- 平台就这些序号收到的其他有效签名记录（冲突记录，另行保存，未导出）：{len(c.conflicts)} 条。
- 平台在这些序号中记录的哈希链断裂：{_text(ranges(c.chain_breaks), "无")}。
- 签名只能证明每条记录由网关注册身份密钥所认证的密钥生成，且此后未被改动；不能证明记录
  内容（位置、电子标签在场、时间等）与实际情况相符，也不能证明设备由何人佩戴或携带。
"""


_BY_ZH = {"--by": "由导出命令的 --by 参数给出", "os user": "导出时的操作系统用户名"}


def _first_prev_zh(c: Collected) -> str:
    if c.first == 1:
        return "序号 1，为初始值"
    if c.first - 1 in c.records:
        return f"可用序号 {c.first - 1} 的记录（在 {RECORDS} 中）核对"
    return f"无法核对：平台未存有序号 {c.first - 1} 的记录"


# --- writing -----------------------------------------------------------------------


def write_zip(out: Path, files: dict[str, bytes], at_ms: int) -> None:
    """Write *files* into the zip *out*: a temporary file in its directory, mode 0600,
    fsynced, renamed; an existing *out* is never replaced."""
    if out.exists():
        raise ExportError(f"{out} exists: give another --out (an export is never replaced)")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a directory: create it first")
    stamp = dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).timetuple()[:6]
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    info = zipfile.ZipInfo(name, date_time=stamp)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o600 << 16
                    zf.writestr(info, data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def export(db: Database, gw: str, from_ms: int, to_ms: int, out: Path, *,
           by: str | None = None, now_ms: int | None = None) -> dict[str, JSON]:
    """Write the export zip *out*; a summary with the manifest's hashes (to be recorded
    outside the zip)."""
    made = Made(
        at_ms=now_ms if now_ms is not None else int(dt.datetime.now(dt.UTC).timestamp() * 1000),
        by=by or os_user(), by_source="--by" if by else "os user",
        host=socket.gethostname(), software=software_version(),
        database=f"{db.backend} {redacted(db.url)}")
    c = collect(db, gw, from_ms, to_ms)
    files = build(c, made)
    write_zip(out, files, made.at_ms)
    manifest = file_entry(MANIFEST, files[MANIFEST])
    return {"out": str(out), "gw": gw, "records": len(c.in_period),
            "seq_ranges": [list(r) for r in ranges(c.in_period)],
            "context_records": len(c.context), "sessions": len(c.sessions),
            "gaps_unexplained": c.gaps_unexplained,
            "manifest_sha256": manifest["sha256"], "manifest_sm3": manifest["sm3"]}


# --- checking ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    seq: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}" + (f" seq {self.seq}" if self.seq is not None else "") + \
            f": {self.reason}"


@dataclass
class Check:
    """What :func:`check_export` found."""

    gw: str = ""
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)

    def problem(self, file: str, seq: int | None, reason: str) -> None:
        self.problems.append(Problem(file, seq, reason))

    def as_json(self) -> dict[str, JSON]:
        return {"gw": self.gw, "records": self.records, "valid": not self.problems,
                "problems": [{"file": p.file, "seq": p.seq, "reason": p.reason}
                             for p in self.problems], "limits": self.limits}


#: Verifier counters that name why a record failed, as diffs of one record's ingest.
_REASONS = ("malformed", "non_canonical", "wrong_gateway", "unknown_gateway", "bad_signature",
            "forged_certificate", "out_of_validity", "conflicts", "chain_breaks")
_WHY = {
    "bad_signature": "bad signature: the record changed or another key signed it",
    "forged_certificate": "certificate chain fails: not certified by the gateway's identity",
    "out_of_validity": "signed outside its session key's validity",
    "conflicts": "another record of this seq is in the export",
    "chain_breaks": "chain broken: its prev is not the hash of the record before it",
    "unknown_key": "certificate chain fails: no key.session in the export certifies its key",
}


def _read(zf: zipfile.ZipFile, name: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > MAX_MEMBER_BYTES:
        raise UnreadableExportError(f"{name}: {info.file_size} bytes, more than an export "
                                    "holds")
    return zf.read(info)


def check_export(path: Path) -> Check:
    """Check the export zip *path* with the platform's verifier (UnreadableExportError
    when it cannot be read at all)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name: _read(zf, name) for name in zf.namelist()}
        manifest = json.loads(members[MANIFEST])
        gw, period = str(manifest["export"]["gw"]), manifest["period"]
        listed = {str(e["name"]): e for e in manifest["files"]}
    except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError) as exc:
        raise UnreadableExportError(f"{path}: not a readable export ({exc!r})") from None
    check = Check(gw, int(period["records"]))
    for name, entry in listed.items():
        data = members.get(name)
        if data is None:
            check.problem(name, None, "missing from the zip")
        elif file_entry(name, data) != {**entry, "name": name}:
            check.problem(name, None, "size, SHA-256 or SM3 differs from the manifest: the "
                          "file changed")
    for name in sorted(set(members) - set(listed) - {MANIFEST}):
        check.problem(name, None, "not listed in the manifest")
    if members.get(VERIFY, VERIFY_PY.encode()) != VERIFY_PY.encode():
        same = manifest.get("made", {}).get("software") == software_version()
        (check.problem(VERIFY, None, "not the program this software writes") if same else
         check.limits.append(f"{VERIFY} differs from the one {software_version()} writes "
                             "(the export was made by another version)"))
    try:
        keys = json.loads(members[KEYS])
        reg = Registration.from_json(keys["registration"])
        lines = members[RECORDS].split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        items = [(RECORDS, line) for line in lines] + [
            (KEYS, str(e["record"]).encode("utf-8"))
            for e in [*keys["rotations"], *keys["sessions"]]]
    except (KeyError, TypeError, ValueError) as exc:
        check.problem(KEYS if RECORDS in members else RECORDS, None,
                      f"cannot be read ({exc})")
        return check
    if reg.gateway_id != gw:
        check.problem(KEYS, None, f"the registration is of gateway {reg.gateway_id}")
    try:
        _check_records(check, reg, items, period, keys)
    except (KeyError, TypeError, ValueError) as exc:  # a manifest or keys.json field
        raise UnreadableExportError(f"{path}: the manifest or {KEYS} lacks a field or has "
                                    f"one of another type ({exc!r})") from None
    return check


def _check_records(check: Check, reg: Registration, items: list[tuple[str, bytes]],
                   period: dict[str, JSON], keys: dict[str, JSON]) -> None:
    found: dict[int, tuple[str, bytes]] = {}
    parsed: dict[int, dict[str, JSON]] = {}
    for file, data in items:
        try:
            rec = parse_record(data)
        except RecordError as exc:
            named = re.search(rb'"seq":(\d+)', data)  # to name the record, if it can be
            check.problem(file, int(named[1]) if named else None, f"not a valid record: {exc}")
            continue
        seq = int(rec["seq"])
        if seq in found and found[seq][1] != data:
            check.problem(file, seq, f"differs from the record of seq {seq} in "
                          f"{found[seq][0]}")
            continue
        found.setdefault(seq, (file, data))
        parsed[seq] = rec
    verified: dict[int, VerifiedRecord] = {}
    verifier = Verifier({reg.gateway_id: reg},
                        on_record=lambda r: verified.__setitem__(r.seq, r))
    identities = [(0, reg.kid)]
    for seq in sorted(found):
        file, data = found[seq]
        before = verifier.stats.as_dict()
        verifier.ingest_record(data, gateway=check.gw)
        after = verifier.stats.as_dict()
        failed = [name for name in _REASONS if after[name] > before[name]]
        for name in failed:
            check.problem(file, seq, _WHY.get(name, name))
        if parsed[seq]["kind"] == ROTATE_KIND and seq in verified and not failed:
            with contextlib.suppress(CertificateError):
                identities.append((seq, parse_identity(parsed[seq]["body"])[0].kid))
    for seq in sorted(set(found) - set(verified)):
        if not any(p.seq == seq for p in check.problems):
            check.problem(found[seq][0], seq, _WHY["unknown_key"])
    listed = [(int(i["from_seq"]), str(i["kid"])) for i in keys["identities"]]
    if listed != identities:
        check.problem(KEYS, None, "the identity history listed differs from the one the "
                      "registration and the key.rotate records prove")
    one = verified.get(1)
    if one is not None and one.prev != _GENESIS:
        check.problem(found[1][0], 1, "seq 1 does not carry the zero prev")
    _check_period(check, found, verified, period)


def _check_period(check: Check, found: dict[int, tuple[str, bytes]],
                  verified: dict[int, VerifiedRecord], period: dict[str, JSON]) -> None:
    explained: set[int] = set()
    for rec in verified.values():
        if rec.kind == "gap":
            for item in rec.record["body"].get("evicted", []):
                explained.update(range(int(item[0]), int(item[1]) + 1))
    first, last = int(period["first_seq"]), int(period["last_seq"])
    if first > 1 and first - 1 not in found:
        check.limits.append(f"seq {first}: its prev is not checked (the record before it is "
                            "not in the export: the platform does not hold it)")
    declared = {s for lo, hi in period["gaps_unexplained"] for s in range(lo, hi + 1)}
    for seq in range(first, last + 1):
        if seq in found or seq in explained:
            continue
        if seq in declared:
            check.limits.append(f"seq {seq}: missing at the platform, no gap record names it "
                                "(declared in the manifest)")
        else:
            check.problem(RECORDS, seq, "missing: not in the export and no gap record names "
                          "it (a record was removed?)")
    lo_ms, hi_ms = int(period["from_ms"]), int(period["to_ms"])
    in_period = sum(1 for s, (file, _d) in found.items() if file == RECORDS and s in verified
                    and lo_ms <= int(verified[s].record["t"]) <= hi_ms)
    if in_period != check.records:
        check.problem(RECORDS, None, f"{in_period} valid records in the period, the "
                      f"manifest says {check.records}")


def report_text(check: Check) -> str:
    lines = [f"LIMIT   {text}" for text in check.limits]
    lines += [f"PROBLEM {p}" for p in check.problems]
    lines.append(f"gateway {check.gw}, {check.records} records of the period")
    lines.append(f"VERDICT: NOT VALID ({len(check.problems)} problems above)" if check.problems
                 else "VERDICT: VALID: files as listed, every record authentic and chained")
    return "\n".join(lines)


#: The standalone check written into every export (it imports nothing of ours).
#: The bundled verification program: central/export_verify.py, a standalone script (the
#: standard library and cryptography only), copied into every export as verify.py.
VERIFY_PY = (Path(__file__).with_name("export_verify.py")).read_text(encoding="utf-8")
#: README.txt of every export: the steps for someone who uses neither Python nor
#: cryptography.
README_TXT = '''SMARTCORR RECORDS EXPORT: HOW TO CHECK IT

This zip holds the records one monitoring gateway sent to the SmartCorr platform over
one period, exactly as the platform received them, and everything needed to check them
without the platform.

THE FILES
  records.jsonl     The records, one a line, in order of their number ("seq"). Each line
                    is a small text object: which gateway ("gw"), its number ("seq"),
                    the gateway's time ("t", milliseconds since 1970 UTC), what happened
                    ("kind", "body"), the fingerprint of the record before it ("prev")
                    and the gateway's signature ("sig"). A few lines outside the period
                    are there to check the first one and the gaps; manifest.json names
                    them under "context".
  keys.json         The gateway's public key as registered when it was enrolled, later
                    keys it announced ("key.rotate" records), and the certificates of
                    the short-lived keys that signed the records ("key.session" records).
  manifest.json     The list of the other files with their size and fingerprints
                    (SHA-256 and SM3), the period, the counts (records, missing numbers),
                    when, on which system and by whom the export was made.
  verify.py         A short program that repeats every check below. It can be read: it
                    is plain text.
  extraction-statement.en.txt, extraction-statement.zh.txt
                    The statement of what was extracted, in English and in Chinese.
  README.txt        This file.

STEP 1: IS manifest.json THE ONE THAT WAS MADE?
The export program printed the SHA-256 of manifest.json when the export was made; it is
written on the transmittal form (or wherever the export was handed over). Compute the
SHA-256 of manifest.json yourself and compare all 64 characters:
  Windows (Command Prompt):   certutil -hashfile manifest.json SHA256
  Windows (PowerShell):       Get-FileHash manifest.json -Algorithm SHA256
  macOS:                      shasum -a 256 manifest.json
  Linux:                      sha256sum manifest.json
(upper or lower case letters make no difference). If they differ, the manifest is not
the one that was made, and nothing below can be relied on.

STEP 2: ARE THE OTHER FILES THE ONES THE MANIFEST LISTS?
Open manifest.json with any text editor. Under "files", each file has a "sha256". Compute
each file's SHA-256 the same way and compare. A single changed byte anywhere in a file
gives a completely different value.

STEP 3: ARE THE RECORDS AUTHENTIC AND COMPLETE?
This needs a computer with Python 3 and the "cryptography" package, or someone who has
one. In the directory where the zip was unpacked:
  python3 verify.py
It checks steps 2 and 3 itself and ends with "VERDICT: VALID" or "VERDICT: NOT VALID",
each problem named by file and record number. Gateways of the "sm" suite (records whose
"alg" is "sm2-sm3") also need the "gmssl-fast" package. The platform's own software
checks the zip too: "ingest verify-export FILE.zip".

WHAT THE SIGNATURES PROVE
- Each record was signed by a key that the gateway's registered key (keys.json) vouched
  for, for that gateway and that record number, and not a byte of it changed since.
- Each record carries the fingerprint of the record before it, so a record taken out,
  put in, or swapped shows as a break or a missing number. A number the gateway itself
  deleted to free space is named in a signed "gap" record.

WHAT THEY DO NOT PROVE
- That what a record says is true in the world: a position, a tag's presence, the time
  ("t" is the gateway's clock; "tq" says where that time came from).
- Who wore or carried a device, or who was near the gateway.
- That the registered key was in the right hands: a key kept in a file (class "file" in
  keys.json) can be copied from the gateway's disk; a key in a TPM chip ("tpm") cannot.
- Anything about numbers missing at the platform that no gap record names: those
  records never arrived; the statement lists them under its limits.
'''
