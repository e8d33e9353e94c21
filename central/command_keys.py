"""The platform's command keys, the root side: an offline root, the certificates it issues,
its revocation lists, and the export gateways receive (docs/command-keys.md).

``ingest command-root init --out DIR`` makes the root in a new directory, meant for an
offline machine or a USB key kept in a safe:

* ``command-root.key`` - the root's private key (mode 0600; JSON: format, alg, private,
  public), read only by ``issue`` and ``revoke``;
* ``command-root.pub`` - its public key (:class:`core.command_keys.CommandRoot`): the
  gateways' trust anchor;
* ``command-keys.json`` - every certificate the root issued that has not expired, and
  its newest revocation list: the file gateways hold (``export`` filters it);
* ``root-state.json`` - the next certificate serial (never reused).

``ingest command-key issue --root DIR --region R --days N --out KEYDIR`` makes a command
key and its certificate: ``KEYDIR/command-key-<serial>.key`` (mode 0600, the private key
with its certificate, for the platform's command signer: :func:`load_command_signer`) and
``KEYDIR/command-key-<serial>.cert`` (the certificate's canonical bytes). The serial is
taken (``root-state.json``) before the key is written, so a crash never reuses one.

``ingest command-key revoke --root DIR --kid K --reason R`` signs the next revocation list:
the previous entries whose certificates have not expired, and every certificate of key
*K*. ``ingest command-key list --root DIR`` shows the root, the certificates and their
state. ``ingest command-key export --root DIR --out DIR`` writes exactly the two files a
gateway installs (:data:`core.command_keys.FILES`): the root's public key and the
certificates still usable (not expired, not revoked; of ``--region`` and ``*`` if given)
with the revocation list. It reads no private key: the export may be made on the offline
machine and carried to the platform, whose enrolment hands it to each gateway.

Private keys are never printed nor logged; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import durable
from core.command_keys import (
    ANY_REGION,
    FILES,
    KEYS_FILE,
    REASONS,
    ROOT_FILE,
    CommandKeyCert,
    CommandKeyError,
    CommandKeyring,
    CommandRoot,
    Revoked,
    check_region,
    make_certificate,
    make_revocations,
    parse_certificate,
)
from core.errors import UserError
from core.record import JSON, b64u, canonical, unb64u
from core.suites import ED25519, SIGNATURE_ALGS, SoftwareKey, UnknownAlgorithmError

ROOT_KEY_FILE = "command-root.key"
STATE_FILE = "root-state.json"
ROOT_KEY_FORMAT = "smartcorr-command-root-key/1"
SIGNING_KEY_FORMAT = "smartcorr-command-signing-key/1"
STATE_FORMAT = "smartcorr-command-root-state/1"
DAY_MS = 86_400_000
#: The longest validity ``issue`` gives, days (a command key is meant to be rotated
#: yearly; docs/command-keys.md).
MAX_DAYS = 3 * 366
PUBLIC_MODE = 0o644


class CommandKeysError(UserError):
    """A root or command-key operation that cannot be done as asked; the message says why
    and how to fix it."""


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


# --- files --------------------------------------------------------------------------------

def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write *path*, which must not exist (O_EXCL), durably, with *mode* from the start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CommandKeysError(f"{path} exists: never replaced (give another directory)"
                               ) from None
    try:
        os.fchmod(fd, mode)
        durable.write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    durable.fsync_dir(path.parent)


def _key_json(fmt: str, key: SoftwareKey, **more: JSON) -> bytes:
    return json.dumps({"format": fmt, "alg": key.alg, "private": b64u(key.private_bytes()),
                       "public": b64u(key.public_raw), **more}, indent=2,
                      sort_keys=True).encode() + b"\n"


def _read_private(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """The JSON of a private key file, refused when others may read or write it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CommandKeysError(f"{path} is missing: {what}") from None
    except OSError as exc:
        raise CommandKeysError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CommandKeysError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise CommandKeysError(f"{path} is accessible to others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}, and "
                               "consider the key exposed")
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CommandKeysError(f"{path} is not a key file ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise CommandKeysError(f"{path} is not a {fmt} file")
    return obj


def _software_key(obj: dict[str, Any], path: Path) -> SoftwareKey:
    try:
        return SoftwareKey(str(obj["alg"]), unb64u(str(obj["private"])),
                           unb64u(str(obj["public"])))
    except (KeyError, ValueError, UnknownAlgorithmError) as exc:
        raise CommandKeysError(f"{path} is not a usable key file ({exc})") from None


def load_root_key(root_dir: Path) -> SoftwareKey:
    """The root's private key, checked against ``command-root.pub`` beside it."""
    path = root_dir / ROOT_KEY_FILE
    key = _software_key(_read_private(path, ROOT_KEY_FORMAT, "give the root's directory "
                                      "(--root, made by 'command-root init')"), path)
    if CommandRoot.of(key) != _root(root_dir):
        raise CommandKeysError(f"{path} is not the key of {root_dir / ROOT_FILE}: restore "
                               "the root's directory from its backup")
    return key


def _root(directory: Path) -> CommandRoot:
    path = directory / ROOT_FILE
    try:
        return CommandRoot.from_bytes(path.read_bytes())
    except FileNotFoundError:
        raise CommandKeysError(f"{path} is missing: give a root directory made by "
                               "'command-root init' (or an export)") from None
    except OSError as exc:
        raise CommandKeysError(f"{path}: cannot read it ({exc.strerror})") from None
    except CommandKeyError as exc:
        raise CommandKeysError(f"{path}: {exc}") from None


def load_ring(directory: Path) -> CommandKeyring:
    """The keyring of a root directory or of an export (its two public files), every
    document verified against the root; a certificate that does not verify is an error."""
    root = _root(directory)
    path = directory / KEYS_FILE
    try:
        data: bytes | None = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise CommandKeysError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        ring, skipped = CommandKeyring.from_files(root.to_bytes(), data)
    except CommandKeyError as exc:
        raise CommandKeysError(f"{path}: {exc}: restore it from the root's backup") from None
    if skipped:
        raise CommandKeysError(f"{path}: certificate #{skipped[0].index} refused "
                               f"({skipped[0].error}): restore it from the root's backup")
    return ring


def _save_ring(directory: Path, ring: CommandKeyring) -> None:
    durable.atomic_write(directory / KEYS_FILE, ring.files()[KEYS_FILE], PUBLIC_MODE)


def _next_serial(root_dir: Path) -> int:
    path = root_dir / STATE_FILE
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CommandKeysError(f"{path} cannot be read ({exc}): restore the root's "
                               "directory from its backup") from None
    serial = obj.get("next_serial") if isinstance(obj, dict) else None
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1 or \
            obj.get("format") != STATE_FORMAT:
        raise CommandKeysError(f"{path} is corrupt: restore the root's directory from its "
                               "backup")
    return serial


def _write_state(root_dir: Path, next_serial: int) -> None:
    durable.atomic_write(root_dir / STATE_FILE, json.dumps(
        {"format": STATE_FORMAT, "next_serial": next_serial}).encode() + b"\n", PUBLIC_MODE)


# --- the ceremonies -----------------------------------------------------------------------

def init_root(out: Path, alg: str = ED25519) -> CommandRoot:
    """A new root in *out* (a new or empty directory, made 0700)."""
    if alg not in SIGNATURE_ALGS:
        raise CommandKeysError(f"--alg {alg!r}: one of {', '.join(SIGNATURE_ALGS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandKeysError(f"--out {out} exists and is not an empty directory: a root "
                               "is never replaced (give a new directory)")
    try:
        durable.make_dirs(out, 0o700)
        out.chmod(0o700)
    except OSError as exc:
        raise CommandKeysError(f"--out {out}: cannot create it ({exc.strerror or exc})"
                               ) from None
    key = SoftwareKey.generate(alg)
    root = CommandRoot.of(key)
    _write_new(out / ROOT_KEY_FILE, _key_json(ROOT_KEY_FORMAT, key), 0o600)
    _write_new(out / ROOT_FILE, root.to_bytes(), PUBLIC_MODE)
    _write_state(out, 1)
    _save_ring(out, CommandKeyring(root))
    return root


def issue(root_dir: Path, region: str, days: int, out: Path, *, alg: str | None = None,
          not_before: int | None = None, at_ms: int | None = None) -> dict[str, JSON]:
    """A new command key for *region* (``*``: every region), valid *days* from
    *not_before* (default now), certified by the root in *root_dir*; its key file and
    certificate in *out*."""
    try:
        check_region(region)
    except CommandKeyError as exc:
        raise CommandKeysError(f"--region: {exc.detail}") from None
    if not 1 <= days <= MAX_DAYS:
        raise CommandKeysError(f"--days {days}: 1 to {MAX_DAYS} (rotate command keys "
                               "yearly; docs/command-keys.md)")
    if out.resolve() == root_dir.resolve():
        raise CommandKeysError(f"--out {out} is the root's directory: the command key goes "
                               "to the platform, the root stays offline; give another "
                               "directory")
    root_key = load_root_key(root_dir)
    alg = alg or root_key.alg
    if alg not in SIGNATURE_ALGS:
        raise CommandKeysError(f"--alg {alg!r}: one of {', '.join(SIGNATURE_ALGS)}")
    ring = load_ring(root_dir)
    now = now_ms() if at_ms is None else at_ms
    start = now if not_before is None else not_before
    serial = _next_serial(root_dir)
    try:
        durable.make_dirs(out, 0o700)
    except OSError as exc:
        raise CommandKeysError(f"--out {out}: cannot create it ({exc.strerror or exc})"
                               ) from None
    key_path, cert_path = out / f"command-key-{serial}.key", out / f"command-key-{serial}.cert"
    for path in (key_path, cert_path):
        if path.exists():
            raise CommandKeysError(f"{path} exists: never replaced (give another --out)")
    key = SoftwareKey.generate(alg)
    cert = make_certificate(root_key, alg, key.public_raw, region=region, serial=serial,
                            not_before=start, not_after=start + days * DAY_MS,
                            issued_at=now)
    ring.prune(now)
    try:
        ring.add_certificate(cert, now)  # in memory: a full set refuses before any write
    except CommandKeyError as exc:
        raise CommandKeysError(f"{exc}: the root holds {len(ring.certificates)} usable "
                               "certificates; revoke (retired) the ones no longer used"
                               ) from None
    _write_state(root_dir, serial + 1)  # the serial is spent before anything is written
    _write_new(key_path, _key_json(SIGNING_KEY_FORMAT, key, kid=key.kid, serial=serial,
                                   certificate=json.loads(cert)), 0o600)
    _write_new(cert_path, cert, PUBLIC_MODE)
    _save_ring(root_dir, ring)
    parsed = parse_certificate(cert)
    return {"serial": serial, "kid": key.kid, "alg": alg, "region": region,
            "not_before": iso(parsed.not_before), "not_after": iso(parsed.not_after),
            "key_file": str(key_path), "certificate": str(cert_path),
            "root_kid": CommandRoot.of(root_key).kid}


def revoke(root_dir: Path, kid: str, reason: str, *, at_ms: int | None = None,
           ) -> dict[str, JSON]:
    """The next revocation list: every certificate of *kid* added to the entries still
    needed (their certificates not expired)."""
    if reason not in REASONS:
        raise CommandKeysError(f"--reason {reason!r}: one of {', '.join(REASONS)}")
    root_key = load_root_key(root_dir)
    ring = load_ring(root_dir)
    now = now_ms() if at_ms is None else at_ms
    certs = [c for c in ring.certificates if c.kid == kid]
    if not certs:
        raise CommandKeysError(f"--kid {kid!r}: no certificate of that key is held (expired "
                               "ones need no revocation): 'command-key list --root DIR' "
                               "shows the kids")
    held = ring.revocations.revoked if ring.revocations else ()
    entries = {(e.serial, e.kid): e for e in held if now < e.not_after}
    new = [c for c in certs if (c.serial, c.kid) not in entries]
    if not new:
        raise CommandKeysError(f"--kid {kid}: already revoked (list "
                               f"{ring.revocations_number})")
    for cert in new:
        entries[(cert.serial, cert.kid)] = Revoked.of(cert, reason, now)
    number = ring.revocations_number + 1
    try:
        data = make_revocations(root_key, number=number, issued_at=now,
                                revoked=entries.values())
    except CommandKeyError as exc:
        raise CommandKeysError(str(exc)) from None
    ring.add_revocations(data)
    ring.prune(now)
    _save_ring(root_dir, ring)
    return {"list": number, "kid": kid, "reason": reason,
            "serials": [c.serial for c in new], "entries": len(entries),
            "root_kid": ring.root.kid}


def listing(directory: Path, *, at_ms: int | None = None) -> dict[str, JSON]:
    """The root and its certificates with their state, from a root directory or an
    export."""
    ring = load_ring(directory)
    now = now_ms() if at_ms is None else at_ms
    return {"root_kid": ring.root.kid, "root_alg": ring.root.alg,
            "fingerprint": ring.root.fingerprint,
            "revocation_list": ring.revocations_number,
            "revoked": [e.to_json() for e in ring.revocations.revoked]
            if ring.revocations else [],
            "certificates": [_cert_json(c, ring.status(c, now)) for c in ring.certificates]}


def _cert_json(cert: CommandKeyCert, status: str) -> dict[str, JSON]:
    return {"serial": cert.serial, "kid": cert.kid, "alg": cert.alg, "region": cert.region,
            "not_before": iso(cert.not_before), "not_after": iso(cert.not_after),
            "status": status}


def export(root_dir: Path, out: Path, *, region: str | None = None,
           at_ms: int | None = None) -> dict[str, JSON]:
    """Write to *out* exactly the files a gateway installs: the root's public key, the
    usable certificates (of *region* and ``*``, when given) and the revocation list."""
    if region is not None:
        try:
            check_region(region, allow_any=False)
        except CommandKeyError as exc:
            raise CommandKeysError(f"--region: {exc.detail}") from None
    ring = load_ring(root_dir)
    now = now_ms() if at_ms is None else at_ms
    if out.exists():
        if not out.is_dir():
            raise CommandKeysError(f"--out {out} is not a directory")
        extra = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if extra:
            raise CommandKeysError(f"--out {out} holds other files ({', '.join(extra[:3])}): "
                                   "an export directory holds only "
                                   f"{' and '.join(FILES)} (enrolment hands all of it to "
                                   "gateways); give a new or empty directory")
        _check_previous(out, ring)
    out_ring = CommandKeyring(ring.root, region=region, max_certificates=ring.max_certificates)
    if ring.revocations is not None:
        out_ring.add_revocations(ring.revocations.data)
    for cert in ring.certificates:
        if ring.status(cert, now) in ("valid", "not_yet_valid") and \
                (region is None or cert.covers(region)):
            try:
                out_ring.add_certificate(cert.data, now)
            except CommandKeyError as exc:
                raise CommandKeysError(f"{exc}: export one region at a time (--region R)"
                                       ) from None
    try:
        durable.make_dirs(out, 0o755)
    except OSError as exc:
        raise CommandKeysError(f"--out {out}: cannot create it ({exc.strerror or exc})"
                               ) from None
    for name, data in out_ring.files().items():
        durable.atomic_write(out / name, data, PUBLIC_MODE)
    return {"out": str(out), "files": list(FILES), "root_kid": ring.root.kid,
            "fingerprint": ring.root.fingerprint, "region": region or ANY_REGION,
            "certificates": [c.serial for c in out_ring.certificates],
            "revocation_list": out_ring.revocations_number}


def _check_previous(out: Path, ring: CommandKeyring) -> None:
    """A previous export in *out* must be of the same root and not newer (no rollback)."""
    if not (out / ROOT_FILE).exists():
        return
    try:
        previous = load_ring(out)
    except CommandKeysError as exc:
        raise CommandKeysError(f"--out {out} holds an unreadable export ({exc}): give a new "
                               "or empty directory") from None
    if previous.root != ring.root:
        raise CommandKeysError(f"--out {out} holds the export of another root "
                               f"({previous.root.kid}, not {ring.root.kid}): give a new or "
                               "empty directory")
    if previous.revocations_number > ring.revocations_number:
        raise CommandKeysError(f"--out {out} holds revocation list "
                               f"{previous.revocations_number}, newer than the root's "
                               f"({ring.revocations_number}): this root directory is an old "
                               "copy; use the current one")


def load_command_signer(path: Path) -> tuple[SoftwareKey, CommandKeyCert]:
    """A command key made by ``issue`` and its certificate (for the platform's command
    signer); refused when others may read the file or the certificate is not its key's."""
    obj = _read_private(path, SIGNING_KEY_FORMAT, "give a key file made by 'command-key "
                                                  "issue'")
    key = _software_key(obj, path)
    try:
        cert = parse_certificate(canonical(obj.get("certificate") or {}))
    except (CommandKeyError, TypeError, ValueError) as exc:
        raise CommandKeysError(f"{path}: its certificate is unreadable ({exc})") from None
    if cert.kid != key.kid:
        raise CommandKeysError(f"{path}: the certificate is not for this key")
    return key, cert


# --- the command line (central/cli.py adds these) -----------------------------------------

def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``command-root init``; ``command-key issue|revoke|list|export``."""
    root = sub.add_parser("command-root", help="the offline root that certifies the "
                                               "platform's command keys")
    rsub = root.add_subparsers(dest="action", required=True)
    init = rsub.add_parser("init", help="make the root in a new directory (keep it offline); "
                                        "prints its kid and fingerprint to write down")
    init.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="a new or empty directory (an offline machine, a USB key)")
    init.add_argument("--alg", choices=SIGNATURE_ALGS, default=ED25519,
                      help=f"the root's algorithm (default {ED25519}; sm2-sm3 for the SM "
                           "suite)")
    init.add_argument("--json", action="store_true", help="print one JSON object")

    key = sub.add_parser("command-key", help="issue, revoke, list and export the platform's "
                                             "command keys (root-signed)")
    ksub = key.add_subparsers(dest="action", required=True)
    iss = ksub.add_parser("issue", help="a new command key and its certificate signed by "
                                        "the root")
    _root_arg(iss)
    iss.add_argument("--region", required=True, metavar="R",
                     help="the region whose gateways accept it, or '*' for all")
    iss.add_argument("--days", required=True, type=int, metavar="N",
                     help=f"how long it is valid, days (1 to {MAX_DAYS})")
    iss.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="where the key (mode 0600) and its certificate go: the "
                          "platform's command signer, not the root's directory")
    iss.add_argument("--alg", choices=SIGNATURE_ALGS,
                     help="the command key's algorithm (default: the root's)")
    iss.add_argument("--not-before", metavar="T",
                     help="valid from (ISO 8601 UTC or ms since 1970; default now): a "
                          "successor issued ahead of a rotation")
    iss.add_argument("--json", action="store_true", help="print one JSON object")

    rev = ksub.add_parser("revoke", help="sign the next revocation list, adding a key")
    _root_arg(rev)
    rev.add_argument("--kid", required=True, metavar="K",
                     help="the command key's id (write --kid=K: a key id may begin with '-')")
    rev.add_argument("--reason", required=True, choices=REASONS,
                     help="compromised (its private key may be known), superseded (a "
                          "successor replaced it), retired")
    rev.add_argument("--json", action="store_true", help="print one JSON object")

    lst = ksub.add_parser("list", help="the root, its certificates and their state")
    lst.add_argument("--root", required=True, type=Path, metavar="DIR",
                     help="the root's directory, or an export")
    lst.add_argument("--json", action="store_true", help="print one JSON object")

    exp = ksub.add_parser("export", help="write the files gateways install (command-root.pub, "
                                         "command-keys.json) to a directory")
    exp.add_argument("--root", required=True, type=Path, metavar="DIR",
                     help="the root's directory (only its public files are read)")
    exp.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="the export directory (new, or a previous export of this root): "
                          "what enrolment's --command-keys names")
    exp.add_argument("--region", metavar="R",
                     help="only this region's certificates and those for all regions")
    exp.add_argument("--json", action="store_true", help="print one JSON object")


def _root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path, metavar="DIR",
                        help="the root's directory (made by 'command-root init'; holds its "
                             "private key)")


def _emit(args: argparse.Namespace, out: dict[str, JSON], text: str) -> None:
    print(json.dumps(out, sort_keys=True) if args.json else text, flush=True)


def _command_root(args: argparse.Namespace) -> int:
    root = init_root(args.out, args.alg)
    out: dict[str, JSON] = {"root": str(args.out), "kid": root.kid, "alg": root.alg,
                            "fingerprint": root.fingerprint,
                            "private_key": str(args.out / ROOT_KEY_FILE)}
    _emit(args, out, f"made the command root in {args.out} ({root.alg})\n"
                     f"  kid:         {root.kid}\n"
                     f"  fingerprint: {root.fingerprint}\n"
                     "Write the kid and fingerprint down and keep them apart from the key. "
                     f"{args.out / ROOT_KEY_FILE} (mode 0600) is the root's private key: "
                     "keep this directory offline (a USB key in a safe), with a backup.")
    return 0


def _command_key(args: argparse.Namespace) -> int:
    try:
        return _key_action(args)
    except CommandKeyError as exc:  # a document of the root's directory
        raise CommandKeysError(f"{exc}: restore the root's directory from its backup"
                               ) from None


def _key_action(args: argparse.Namespace) -> int:
    if args.action == "issue":
        start = None
        if args.not_before:
            from central.export import parse_time

            start = parse_time(args.not_before)
        out = issue(args.root, args.region, args.days, args.out, alg=args.alg,
                    not_before=start)
        _emit(args, out, f"issued command key {out['kid']} (serial {out['serial']}, region "
                         f"{out['region']}, {out['alg']}), valid {out['not_before']} to "
                         f"{out['not_after']}\n  key (mode 0600, for the command signer): "
                         f"{out['key_file']}\n  certificate: {out['certificate']}\n"
                         "Export the root's material (command-key export) so gateways "
                         "receive the certificate.")
    elif args.action == "revoke":
        out = revoke(args.root, args.kid, args.reason)
        _emit(args, out, f"revocation list {out['list']}: key {out['kid']} revoked "
                         f"({out['reason']}), serial(s) {out['serials']}; {out['entries']} "
                         "entries. Export it (command-key export) and send it to the "
                         "gateways.")
    elif args.action == "list":
        out = listing(args.root)
        lines = [f"root {out['root_kid']} ({out['root_alg']}), fingerprint "
                 f"{out['fingerprint']}", f"revocation list: {out['revocation_list']}"]
        lines += [f"  serial {c['serial']}  {c['kid']}  region {c['region']}  {c['alg']}  "
                  f"{c['not_before']} to {c['not_after']}  {c['status']}"
                  for c in out["certificates"]] or ["  no certificate"]
        _emit(args, out, "\n".join(lines))
    else:
        out = export(args.root, args.out, region=args.region)
        _emit(args, out, f"wrote {' and '.join(FILES)} to {out['out']}: root "
                         f"{out['root_kid']}, certificates {out['certificates']}, revocation "
                         f"list {out['revocation_list']}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "command-root": _command_root, "command-key": _command_key}
