#!/usr/bin/env python3
"""SmartCorr edge gateway: the one entry point for the daemon, the demo, installers and technicians.

    python gateway.py run --config /etc/smartcorr/gateway.toml
    python gateway.py demo [--duration S] [--json]
    python gateway.py provision init --identity-dir DIR --gateway-id ID
    python gateway.py diag nmea-replay FILE [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from core.devices import DEFAULT_ABSENT_AFTER_S
from core.errors import EXIT_USER_ERROR, UserError

#: Raw serial frames (hex; person references and positions in clear): only with
#: --trace-serial, never with -v/-vv alone.
SERIAL_TRACE_LOGGER = "smartcorr.trace.serial"
#: Every trace logger is off unless its own option turns it on.
TRACE_LOGGERS = "smartcorr.trace"
#: tpm2-tss's log levels (e.g. all+none); provisioning.tpm silences it unless set.
TSS2_LOG_ENV = "TSS2_LOG"
#: Largest key file read (a tag key is 32 hex digits).
MAX_KEY_FILE_BYTES = 4096


def _logging(verbose: int, trace_serial: bool = False) -> None:
    level = logging.WARNING - 10 * verbose
    if verbose >= 2:  # -vv: tpm2-tss's own warnings too (provisioning.tpm silences them)
        os.environ.setdefault(TSS2_LOG_ENV, "all+warning")
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger().setLevel(max(level, logging.DEBUG))  # also when handlers existed
    logging.getLogger(TRACE_LOGGERS).setLevel(logging.CRITICAL + 1)
    if trace_serial:
        logging.getLogger(SERIAL_TRACE_LOGGER).setLevel(logging.DEBUG)
        logging.getLogger(SERIAL_TRACE_LOGGER).warning(
            "--trace-serial: raw serial frames are logged; they hold personal data")


def cmd_run(args: argparse.Namespace) -> int:
    from app import daemon

    return daemon.run(Path(args.config))


def cmd_demo(args: argparse.Namespace) -> int:
    from lab import demo
    return demo.run(args)


def cmd_provision_init(args: argparse.Namespace) -> int:
    from provisioning.identity import create_identity, find_tpm

    tcti = None if args.no_tpm else find_tpm(args.tpm)
    ident = create_identity(Path(args.identity_dir), args.gateway_id, force=args.force,
                            suite_name=args.suite, tpm=tcti)
    if tcti is None:  # once the identity is made: a refusal wrote nothing to warn about
        print("WARNING: no TPM: the identity key and the storage key are FILES on this "
              "disk; whoever copies it can sign as this gateway and read its records. "
              "Every session certificate says class 'file' and 'provision check' warns. "
              "Use a TPM (--tpm device:/dev/tpmrm0) outside the lab.", file=sys.stderr)
    out = {"gateway_id": ident.gateway_id, "kid": ident.kid, "alg": ident.key.alg,
           "key_class": ident.key_class, "suite": ident.suite.name, "tpm": tcti,
           "public_key": str(ident.directory / "signing.pub")}
    ident.close()
    print(json.dumps(out) if args.json else
          f"gateway {ident.gateway_id} provisioned; identity key {ident.kid} "
          f"({ident.key.alg}, {'in the TPM ' + tcti if tcti else 'in a file'}), suite "
          f"{ident.suite.name}; enrol {out['public_key']} at the platform")
    return 0


def cmd_provision_rotate(args: argparse.Namespace) -> int:
    from core.suites import key_id
    from provisioning.identity import load_identity, stage_next_key

    operator = _operator(args)  # who acts: written down before anything changes
    identity = load_identity(Path(args.identity_dir))
    try:
        _write_down(identity, "key.staged", {"kid": identity.kid}, operator)
    finally:
        identity.close()
    key = stage_next_key(Path(args.identity_dir))
    kid = key_id(key.alg, key.public_raw)
    print(json.dumps({"next_kid": kid}) if args.json else
          f"next signing key {kid} staged; the gateway announces it (signed by the current "
          f"key) and switches to it at its next start")
    return 0


def cmd_provision_tags(args: argparse.Namespace) -> int:
    """pair-tag, unpair-tag, list-tags: the tag registry beside the identity."""
    from provisioning.identity import load_identity
    from provisioning.registry import (
        MAX_ABSENT_AFTER_S,
        MIN_ABSENT_AFTER_S,
        RegistryError,
        open_registry,
        parse_tag,
    )

    operator = _operator(args) if args.action != "list-tags" else None
    key = _tag_key(args) if args.action == "pair-tag" else None
    identity = load_identity(Path(args.identity_dir))
    registry = open_registry(identity)
    if operator is not None:  # written down before anything changes (a refusal is not)
        ref = parse_tag(args.tag)
        if args.action == "pair-tag" and not \
                MIN_ABSENT_AFTER_S <= args.absent_after <= MAX_ABSENT_AFTER_S:
            raise RegistryError(f"tag {ref}: --absent-after must be {MIN_ABSENT_AFTER_S}-"
                                f"{MAX_ABSENT_AFTER_S} seconds, got {args.absent_after}")
        if args.action == "unpair-tag" and all(t.tag != ref for t in registry):
            raise RegistryError(f"tag {ref} is not paired")
        _write_down(identity, "tag.paired" if args.action == "pair-tag" else "tag.unpaired",
                    {"tag": ref, **_file_details(registry.path)}, operator)
    if args.action == "pair-tag":
        tag = registry.pair(args.tag, key, absent_after_s=args.absent_after)
        out: object = {"tag": tag.tag, "absent_after_s": tag.absent_after_s}
        if key is None:  # generated here: the installer programs it into the tag
            out = {**out, "key": tag.key.hex()}  # type: ignore[dict-item]
        text = f"tag {tag.tag} paired" + ("" if key else f"; key {tag.key.hex()}")
    elif args.action == "unpair-tag":
        if not registry.unpair(args.tag):
            raise RegistryError(f"tag {parse_tag(args.tag)} is not paired")
        out, text = {"unpaired": args.tag}, f"tag {args.tag} unpaired"
    else:
        tags = [{"tag": t.tag, "absent_after_s": t.absent_after_s, "paired_at": t.paired_at}
                for t in registry]
        out = {"tags": tags}
        text = "\n".join(f"{t['tag']}  absent after {t['absent_after_s']} s" for t in tags) \
            or "no tag paired"
    print(json.dumps(out) if args.json else text)
    if args.action != "list-tags":
        print("provision: restart the gateway to apply the change", file=sys.stderr)
    return 0


def _tag_key(args: argparse.Namespace) -> bytes | None:
    """The tag key from --key-file FILE or --key - (stdin); never from argv, where ps shows it."""
    from provisioning.registry import RegistryError

    if args.key is not None and args.key != "-":
        raise RegistryError("--key on the command line shows in 'ps': put the key in a file "
                            "(--key-file FILE, mode 600) or pipe it in with --key -")
    name = "-" if args.key == "-" else args.key_file
    if name is None:
        return None
    where = "--key - (stdin)" if name == "-" else f"--key-file {name}"
    text = _read_key_file(name)
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise RegistryError(f"{where}: the key must be 32 hex digits") from None


def cmd_provision_kiosks(args: argparse.Namespace) -> int:
    """pair-kiosk, unpair-kiosk, list-kiosks: the kiosks whose check-ins this gateway takes."""
    from provisioning.identity import load_identity
    from provisioning.kiosks import open_kiosks, parse_key, parse_serial
    from provisioning.registry import RegistryError

    operator = _operator(args) if args.action != "list-kiosks" else None
    key = None
    if args.action == "pair-kiosk" and args.key_file is not None:
        key = parse_key(_read_key_file(args.key_file))
    identity = load_identity(Path(args.identity_dir))
    registry = open_kiosks(identity)
    try:
        if operator is not None:  # written down before anything changes (a refusal is not)
            serial = parse_serial(args.serial)
            if args.action == "unpair-kiosk" and all(k.serial != serial for k in registry):
                raise RegistryError(f"kiosk {serial} is not paired")
            _write_down(identity, "kiosk.paired" if args.action == "pair-kiosk"
                        else "kiosk.unpaired", {"serial": serial,
                                                **_file_details(registry.path)}, operator)
        if args.action == "pair-kiosk":
            kiosk = registry.pair(args.serial, key)
            out: dict[str, object] = {"serial": kiosk.serial, "paired_at": kiosk.paired_at}
            text = f"kiosk {kiosk.serial} paired"
            if key is None:  # generated here, shown this once: the installer loads it
                out["key"] = kiosk.key.hex()
                text += f"; key {kiosk.key.hex()} (shown once: load it into the kiosk now)"
        elif args.action == "unpair-kiosk":
            serial = parse_serial(args.serial)
            if not registry.unpair(serial):
                raise RegistryError(f"kiosk {serial} is not paired")
            out, text = {"unpaired": serial}, f"kiosk {serial} unpaired"
        else:
            kiosks = [{"serial": k.serial, "paired_at": k.paired_at} for k in registry]
            out = {"kiosks": kiosks}
            text = "\n".join(f"{k['serial']}  paired at {k['paired_at']}" for k in kiosks) \
                or "no kiosk paired"
    finally:
        registry.close()
    print(json.dumps(out) if args.json else text)
    if args.action != "list-kiosks":
        print("provision: restart the gateway to apply the change", file=sys.stderr)
    return 0


def _operator(args: argparse.Namespace, default_role: str = "installer") -> Any:
    """Who acts (--operator, --role, --operator-file or the default operator file):
    an OperatorError (exit 2) when nobody says."""
    from provisioning.operator import resolve_operator

    return resolve_operator(args.operator, args.role, args.operator_file,
                            default_role=default_role)


def _write_down(identity: Any, action: str, details: dict[str, Any], operator: Any) -> None:
    """The action in the journal, durably, before it is done (the gateway records it)."""
    from provisioning.actions import record

    number = record(identity, action, details, operator)
    logging.getLogger("gateway").info("%s written down as action %d", action, number)


def _file_details(path: Path) -> dict[str, Any]:
    from provisioning.actions import file_sha256

    return {"file": path.name, "sha256_before": file_sha256(path)}


def _operator_arguments(parser: argparse.ArgumentParser) -> None:
    """Who acts: recorded with the action (a name is no secret; never put a key here)."""
    parser.add_argument("--operator", metavar="NAME",
                        help="your name: the action is recorded, and sent, with it")
    parser.add_argument("--role", choices=("installer", "technician"),
                        help="your role (default: installer for provision, technician for "
                             "diag)")
    parser.add_argument("--operator-file", metavar="PATH",
                        help="a JSON file naming you ({\"name\", \"role\", \"badge\"}; not "
                             "writable by others); default $SMARTCORR_OPERATOR_FILE, else "
                             "/etc/smartcorr/operator.json")


def _read_key_file(name: str) -> str:
    """A key from a file, or from stdin for ``-``: never from argv, where ps shows it."""
    from provisioning.registry import RegistryError

    if name == "-":
        return sys.stdin.read(MAX_KEY_FILE_BYTES)
    try:
        with Path(name).open(encoding="ascii") as file:
            return file.read(MAX_KEY_FILE_BYTES)
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"--key-file {name}: cannot read the key ({exc})") from None


def cmd_diag(args: argparse.Namespace) -> int:
    from app import diag
    from app.config import load_config
    from provisioning.actions import file_sha256

    cfg = load_config(Path(args.config))
    if args.action == "bundle":
        diag.check_out(Path(args.out))  # before anything is written down
    if args.action == "bundle" and args.include_personal:
        from provisioning.identity import load_identity

        operator = _operator(args, "technician")  # personal data leaves: who took it
        identity = load_identity(cfg.identity_path, repair=False)
        try:
            _write_down(identity, "bundle.personal", {
                "out": str(Path(args.out).absolute()), "config": str(cfg.source),
                "config_sha256": None if cfg.source is None else file_sha256(cfg.source),
            }, operator)
        finally:
            identity.close()
    if args.action == "bundle":
        report = diag.bundle(cfg, Path(args.out), include_personal=args.include_personal)
    else:
        report = {"buffer": diag.buffer_report, "keys": diag.keys_report,
                  "ports": diag.ports_report}[args.action](cfg)
    print(json.dumps(report, sort_keys=True) if args.json else diag.render(report))
    if args.action == "keys" and not report.get("ok"):
        return 1  # as 'provision check': a problem with the keys
    if args.action == "ports" and diag.missing_ports(report):
        print(f"diag: configured port(s) not present: {', '.join(diag.missing_ports(report))}",
              file=sys.stderr)
        return 1
    return 0


def cmd_provision_check(args: argparse.Namespace) -> int:
    """The identity as installed: keys, their class (TPM or file), permissions. Exit 1 on
    a problem; a key in a file is a warning (the demo, hardware without a TPM)."""
    from app import diag
    from app.config import load_config

    report = diag.keys_report(load_config(Path(args.config)))
    for warning in report.get("warnings", []):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(json.dumps(report, sort_keys=True) if args.json else diag.render(report))
    return 0 if report.get("ok") else 1


def cmd_diag_nmea(args: argparse.Namespace) -> int:
    from app import nmea_replay

    argv = [args.file] + (["--json"] if args.json else [])
    result: int = nmea_replay.main(argv)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway.py", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug; never raw frames)")
    parser.add_argument("--trace-serial", action="store_true",
                        help="also log raw serial frames in hex (personal data: only on "
                             "request, for a technician)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="everything on this machine: broker, devices, verifier")
    from lab.demo import add_arguments
    add_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    _provision_parsers(sub.add_parser("provision", help="installers: identity and enrolment"))
    _diag_parsers(sub.add_parser("diag", help="technicians: diagnostics"))
    _global_options_everywhere(parser)
    return parser


#: Where the global options given after a subcommand land (one attribute per depth, so
#: "-v run -v" counts 2 and a deeper parser's value never hides a shallower one's).
SUB_VERBOSE, SUB_TRACE = "sub_verbose_", "sub_trace_serial_"


def _global_options_everywhere(parser: argparse.ArgumentParser, depth: int = 0) -> None:
    """-v/-vv and --trace-serial are accepted after every subcommand too, not only before."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases: each parser once
            sub.add_argument("-v", "--verbose", action="count", default=0,
                             dest=f"{SUB_VERBOSE}{depth}", help=argparse.SUPPRESS)
            sub.add_argument("--trace-serial", action="store_true",
                             dest=f"{SUB_TRACE}{depth}", help=argparse.SUPPRESS)
            _global_options_everywhere(sub, depth + 1)


def _global_options(args: argparse.Namespace) -> tuple[int, bool]:
    """-v count and --trace-serial, wherever on the command line they were given."""
    extra = vars(args)
    verbose = args.verbose + sum(v for k, v in extra.items() if k.startswith(SUB_VERBOSE))
    trace = args.trace_serial or any(v for k, v in extra.items() if k.startswith(SUB_TRACE))
    return verbose, trace


def _provision_parsers(prov: argparse.ArgumentParser) -> None:
    psub = prov.add_subparsers(dest="action", required=True)
    init = psub.add_parser("init", help="create this gateway's identity and keys")
    init.add_argument("--identity-dir", required=True)
    init.add_argument("--gateway-id", required=True)
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.add_argument("--suite", choices=("ed25519", "sm"), default="ed25519",
                      help="signatures, hash and cipher: Ed25519/SHA-256/AES-256-GCM (default) "
                           "or SM2/SM3/SM4-GCM (GB/T 39786 deployments)")
    init.add_argument("--tpm", metavar="TCTI", default="auto",
                      help="the TPM that holds the identity key and seals the storage key: "
                           "'auto' (default: $SMARTCORR_TPM, else device:/dev/tpmrm0 if "
                           "present), or a TCTI such as device:/dev/tpmrm0, "
                           "swtpm:host=127.0.0.1,port=2321")
    init.add_argument("--no-tpm", action="store_true",
                      help="keys in files (the demo, hardware without a TPM): loudly weaker")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=cmd_provision_init)

    chk = psub.add_parser("check", help="check the installed identity: keys, TPM or file, "
                                        "permissions (exit 1 on a problem)")
    chk.add_argument("--config", required=True)
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=cmd_provision_check)

    rot = psub.add_parser("rotate-key", help="stage a new signing key (used from next start)")
    rot.add_argument("--identity-dir", required=True)
    _operator_arguments(rot)
    rot.add_argument("--json", action="store_true")
    rot.set_defaults(func=cmd_provision_rotate)

    pair = psub.add_parser("pair-tag", help="pair an ankle tag with this gateway")
    pair.add_argument("--identity-dir", required=True)
    pair.add_argument("--tag", required=True, help="T00001000, 0x1000 or 4096")
    source = pair.add_mutually_exclusive_group()
    source.add_argument("--key-file", metavar="FILE",
                        help="read the tag's AES-128 key (32 hex digits) from FILE "
                             "(default: generate one)")
    source.add_argument("--key", metavar="-",
                        help="'-': read the key from stdin (a key in argv shows in 'ps')")
    pair.add_argument("--absent-after", type=int, default=DEFAULT_ABSENT_AFTER_S, metavar="S",
                      help="report the tag absent after S seconds unheard "
                           f"(default {DEFAULT_ABSENT_AFTER_S})")
    _operator_arguments(pair)
    pair.add_argument("--json", action="store_true")
    pair.set_defaults(func=cmd_provision_tags)
    unpair = psub.add_parser("unpair-tag", help="unpair an ankle tag")
    unpair.add_argument("--identity-dir", required=True)
    unpair.add_argument("--tag", required=True)
    _operator_arguments(unpair)
    unpair.add_argument("--json", action="store_true")
    unpair.set_defaults(func=cmd_provision_tags)
    lst = psub.add_parser("list-tags", help="list the paired tags (never their keys)")
    lst.add_argument("--identity-dir", required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_provision_tags)
    _kiosk_parsers(psub)


def _kiosk_parsers(psub: Any) -> None:
    # no abbreviations: "--key HEX" must not pass for "--key-file" (and echo the key)
    pair = psub.add_parser("pair-kiosk", help="pair a check-in kiosk (its serial and key)",
                           allow_abbrev=False)
    pair.add_argument("--identity-dir", required=True)
    pair.add_argument("--serial", required=True, help="the serial the kiosk reports")
    pair.add_argument("--key-file", metavar="FILE",
                      help="read the kiosk's AES-128 key (32 hex digits) from FILE, or from "
                           "stdin with '-' (default: generate one and print it once)")
    _operator_arguments(pair)
    pair.add_argument("--json", action="store_true")
    pair.set_defaults(func=cmd_provision_kiosks)
    unpair = psub.add_parser("unpair-kiosk", help="unpair a check-in kiosk")
    unpair.add_argument("--identity-dir", required=True)
    unpair.add_argument("--serial", required=True)
    _operator_arguments(unpair)
    unpair.add_argument("--json", action="store_true")
    unpair.set_defaults(func=cmd_provision_kiosks)
    lst = psub.add_parser("list-kiosks", help="list the paired kiosks (never their keys)")
    lst.add_argument("--identity-dir", required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_provision_kiosks)


def _diag_parsers(diag: argparse.ArgumentParser) -> None:
    dsub = diag.add_subparsers(dest="action", required=True)
    for name, text in (("buffer", "queued records per class, oldest age, store integrity"),
                       ("keys", "identity, key ids, staged key, permissions (never a key; "
                                "exit 1 on a problem)"),
                       ("ports", "configured serial ports: present, device, access (exit 1 "
                                 "when one is missing)")):
        cmd = dsub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True)
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(func=cmd_diag)
    bun = dsub.add_parser("bundle", help="a support bundle without secrets or personal data")
    bun.add_argument("--config", required=True)
    bun.add_argument("--out", required=True, help="file to write (tar.gz)")
    bun.add_argument("--include-personal", action="store_true",
                     help="also the queued records, decrypted (personal data: only on request,"
                          " recorded with who asked: --operator or an operator file)")
    _operator_arguments(bun)
    bun.add_argument("--json", action="store_true")
    bun.set_defaults(func=cmd_diag)
    nmea = dsub.add_parser("nmea-replay", help="replay an NMEA capture through the GNSS driver")
    nmea.add_argument("file")
    nmea.add_argument("--json", action="store_true")
    nmea.set_defaults(func=cmd_diag_nmea)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose, args.trace_serial = _global_options(args)
    _logging(args.verbose, args.trace_serial)
    try:
        result: int = args.func(args)
    except UserError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return result


if __name__ == "__main__":
    sys.exit(main())
