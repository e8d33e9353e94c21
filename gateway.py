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
from core.topics import BOOTSTRAP_USER

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
           "public_key": str(ident.directory / "signing.pub"),
           "tls_key": str(ident.directory / "tls.key"), "csr": str(ident.directory / "tls.csr")}
    ident.close()
    print(json.dumps(out) if args.json else
          f"gateway {ident.gateway_id} provisioned; identity key {ident.kid} "
          f"({ident.key.alg}, {'in the TPM ' + tcti if tcti else 'in a file'}), suite "
          f"{ident.suite.name}; TLS key {out['tls_key']} (a file, mode 600) and its CSR; "
          "enrol it: 'provision enrol' (docs/enrolment.md)")
    return 0


def cmd_provision_enrol(args: argparse.Namespace) -> int:
    """enrol: offline (--request-out, then --answer) or online (--claim); docs/enrolment.md."""
    from provisioning import enrol
    from provisioning.identity import load_identity

    operator = _operator(args)  # who acts: every step is written down with it
    if args.claim == "-" == args.bootstrap_password_file:
        raise UserError("--claim - and --bootstrap-password-file - both read stdin: give "
                        "one of them as a file")
    online = None
    if args.claim is not None:  # both read before anything is written down
        online = (enrol.bootstrap_of(args.broker, args.ca, args.bootstrap_user,
                                     args.bootstrap_password_file, sys.stdin.read),
                  enrol.read_secret(args.claim, "--claim", sys.stdin.read))
    out: dict[str, Any] = {}
    identity = load_identity(Path(args.identity_dir))
    try:
        if args.request_out is not None:
            out = enrol.write_request(identity, Path(args.request_out), operator)
        elif args.answer is not None:
            out = enrol.complete(identity, enrol.read_answer(Path(args.answer)), operator,
                                 mode="offline", ca_fingerprint=args.ca_fingerprint)
        elif online is not None:
            bootstrap, token = online
            out = enrol.claim(identity, token, bootstrap, operator, timeout_s=args.timeout,
                              ca_fingerprint=args.ca_fingerprint, progress=lambda text: print(
                                  f"provision enrol: {text}", file=sys.stderr, flush=True))
        out = enrol.with_config(identity, out, None if args.config is None
                                else Path(args.config))
    except enrol.EnrolFailed as exc:
        print(json.dumps({"status": "failed", "reason": exc.reason, "detail": str(exc)})
              if args.json else f"provision enrol: FAILED ({exc.reason}): {exc}",
              file=sys.stdout if args.json else sys.stderr)
        return 1
    finally:
        identity.close()
    print(json.dumps(out, sort_keys=True) if args.json else enrol.render(out))
    return 0


def cmd_provision_renew(args: argparse.Namespace) -> int:
    """renew: the certificate now, by the running daemon or by this command (docs/enrolment.md)."""
    from app.config import load_config
    from app.daemon import DataDirInUseError, lock_data_dir, prepare_data_dir
    from app.renewal import files_are_the_identity
    from provisioning import renewal
    from provisioning.enrol import EnrolFailed
    from provisioning.identity import load_identity

    operator = _operator(args, default_role="technician")
    if not 0 < args.timeout <= 3600:
        raise UserError(f"--timeout {args.timeout:g}: give a number of seconds, at most 3600")
    cfg = load_config(Path(args.config))
    identity = load_identity(cfg.identity_path)

    def progress(text: str) -> None:
        print(f"provision renew: {text}", file=sys.stderr, flush=True)

    try:
        why = files_are_the_identity(cfg.broker, identity)
        if why is not None:
            raise UserError(f"{args.config}: {why}")
        prepare_data_dir(cfg)
        try:
            held: int | None = lock_data_dir(cfg.data_dir)  # no daemon: it cannot start now
        except DataDirInUseError:
            held = None
        try:
            if held is None:
                trigger = renewal.ask_daemon(cfg.data_dir, operator)
                progress("the gateway is running: asked it to renew now, over its uplink")
                out = renewal.wait_for_daemon(cfg.data_dir, trigger, timeout_s=args.timeout,
                                              progress=progress)
            else:
                progress("the gateway is not running: renewing over a connection of this "
                         "command")
                out = renewal.renew_direct(identity, cfg.broker, operator,
                                           timeout_s=args.timeout, progress=progress)
        finally:
            if held is not None:
                os.close(held)
    except EnrolFailed as exc:
        print(json.dumps({"status": "failed", "reason": exc.reason, "detail": str(exc)})
              if args.json else f"provision renew: FAILED ({exc.reason}): {exc}",
              file=sys.stdout if args.json else sys.stderr)
        return 1
    finally:
        identity.close()
    print(json.dumps(out, sort_keys=True) if args.json else
          f"renewed{' by the running gateway' if out['via'] == 'daemon' else ''}: "
          f"certificate {out.get('serial')} until {out.get('not_after')}; "
          + ("the uplink reconnects with it" if out["via"] == "daemon" else
             "the gateway uses it from its next start"))
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
    from contextlib import nullcontext

    from provisioning.actions import locked
    from provisioning.identity import load_identity
    from provisioning.registry import (
        MAX_ABSENT_AFTER_S,
        MIN_ABSENT_AFTER_S,
        RegistryError,
        already_paired,
        device_key_id,
        new_device_key,
        open_registry,
        parse_tag,
    )

    operator = _operator(args) if args.action != "list-tags" else None
    key = _tag_key(args) if args.action == "pair-tag" else None
    generated = key is None
    identity = load_identity(Path(args.identity_dir))
    # the journal's lock from the registry's check to its change: a platform's command
    # (app/commands.py) changes the registry under it too, so the two never interleave
    with locked(identity.directory) if args.action != "list-tags" else nullcontext():
        registry = open_registry(identity)
        old = None
        if operator is not None:  # written down before anything changes (a refusal is not)
            ref = parse_tag(args.tag)
            old = registry.get(ref)
            if args.action == "pair-tag" and old is not None and not args.replace:
                raise already_paired(old)
            if args.action == "pair-tag" and args.absent_after is not None and not \
                    MIN_ABSENT_AFTER_S <= args.absent_after <= MAX_ABSENT_AFTER_S:
                raise RegistryError(f"tag {ref}: --absent-after must be {MIN_ABSENT_AFTER_S}-"
                                    f"{MAX_ABSENT_AFTER_S} seconds, got {args.absent_after}")
            if args.action == "unpair-tag" and old is None:
                raise RegistryError(f"tag {ref} is not paired")
            details: dict[str, Any] = {"tag": ref, **_file_details(registry.path)}
            action = "tag.unpaired"
            if args.action == "pair-tag":  # the key is made before it is written down: its id
                key = key if key is not None else new_device_key()
                action = "tag.replaced" if old is not None else "tag.paired"
                absent = args.absent_after if args.absent_after is not None else \
                    old.absent_after_s if old is not None else DEFAULT_ABSENT_AFTER_S
                details.update(kid=device_key_id(key), absent_after_s=absent)
                if old is not None:  # key ids, never the keys
                    details["old_kid"] = device_key_id(old.key)
            _write_down(identity, action, details, operator)
        if args.action == "pair-tag":
            tag = registry.pair(args.tag, key, absent_after_s=args.absent_after,
                                replace=args.replace)
            out: object = {"tag": tag.tag, "absent_after_s": tag.absent_after_s,
                           "kid": device_key_id(tag.key), "replaced": old is not None}
            if old is not None:
                out = {**out, "old_kid": device_key_id(old.key)}  # type: ignore[dict-item]
            if generated:  # generated here: the installer programs it into the tag
                out = {**out, "key": tag.key.hex()}  # type: ignore[dict-item]
            text = (f"tag {tag.tag} {'key replaced' if old else 'paired'} (key "
                    f"{device_key_id(tag.key)}, absent after {tag.absent_after_s} s)"
                    + (f"; key {tag.key.hex()} (shown once: load it into the tag now)"
                       if generated else ""))
        elif args.action == "unpair-tag":
            if not registry.unpair(args.tag):
                raise RegistryError(f"tag {parse_tag(args.tag)} is not paired")
            out = {"unpaired": args.tag}
            text = (f"tag {args.tag} unpaired; what the gateway keeps of it is removed once every "
                    "record about it is delivered")
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
    from contextlib import nullcontext

    from provisioning.actions import locked
    from provisioning.identity import load_identity
    from provisioning.kiosks import already_paired, open_kiosks, parse_key, parse_serial
    from provisioning.registry import RegistryError, device_key_id, new_device_key

    operator = _operator(args) if args.action != "list-kiosks" else None
    key = None
    if args.action == "pair-kiosk" and args.key_file is not None:
        key = parse_key(_read_key_file(args.key_file))
    generated = key is None
    identity = load_identity(Path(args.identity_dir))
    # the journal's lock, as for the tags (cmd_provision_tags)
    with locked(identity.directory) if args.action != "list-kiosks" else nullcontext():
        registry = open_kiosks(identity)
        old = None
        try:
            if operator is not None:  # written down before anything changes (a refusal is not)
                serial = parse_serial(args.serial)
                old = registry.get(serial)
                if args.action == "pair-kiosk" and old is not None and not args.replace:
                    raise already_paired(old)
                if args.action == "unpair-kiosk" and old is None:
                    raise RegistryError(f"kiosk {serial} is not paired")
                details: dict[str, Any] = {"serial": serial, **_file_details(registry.path)}
                action = "kiosk.unpaired"
                if args.action == "pair-kiosk":  # made before it is written down: its id
                    key = key if key is not None else new_device_key()
                    action = "kiosk.replaced" if old is not None else "kiosk.paired"
                    details["kid"] = device_key_id(key)
                    if old is not None:  # key ids, never the keys
                        details["old_kid"] = device_key_id(old.key)
                _write_down(identity, action, details, operator)
            if args.action == "pair-kiosk":
                kiosk = registry.pair(args.serial, key, replace=args.replace)
                out: dict[str, object] = {"serial": kiosk.serial, "paired_at": kiosk.paired_at,
                                          "kid": device_key_id(kiosk.key),
                                          "replaced": old is not None}
                if old is not None:
                    out["old_kid"] = device_key_id(old.key)
                text = (f"kiosk {kiosk.serial} {'key replaced' if old else 'paired'} (key "
                        f"{device_key_id(kiosk.key)})")
                if generated:  # generated here, shown this once: the installer loads it
                    out["key"] = kiosk.key.hex()
                    text += f"; key {kiosk.key.hex()} (shown once: load it into the kiosk now)"
            elif args.action == "unpair-kiosk":
                serial = parse_serial(args.serial)
                if not registry.unpair(serial):
                    raise RegistryError(f"kiosk {serial} is not paired")
                out = {"unpaired": serial}
                text = (f"kiosk {serial} unpaired; what the gateway keeps of it is removed once "
                        "every record about it is delivered")
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


def cmd_provision_decommission(args: argparse.Namespace) -> int:
    """The final record delivered, then the keys, pairings and store destroyed
    (app/decommission.py); exit 1 when not delivered (the keys are kept)."""
    from app.config import load_config
    from app.decommission import Request, check_timeout, decommission

    operator = _operator(args)  # who: in the journal, and in the final record
    check_timeout(args.timeout)
    cfg = load_config(Path(args.config))
    code, report = decommission(
        cfg, operator, Request(args.timeout, args.force, clear_tpm=not args.keep_tpm),
        confirm=lambda summary: _confirm_decommission(summary, args.yes),
        progress=lambda text: print(f"decommission: {text}", file=sys.stderr, flush=True))
    print(json.dumps(report, sort_keys=True) if args.json else _decommission_text(report))
    if report.get("error"):
        print(f"provision: {report['error']}", file=sys.stderr)
    elif report.get("forced"):
        print("WARNING: the keys were destroyed WITHOUT delivery (--force): "
              f"{report.get('undelivered')} record(s) not delivered are lost"
              + ("" if report.get("platform_told") else
                 f"; the platform was NOT told: decommission {report.get('gateway_id')} there "
                 "(ingest enrol --decommission)"), file=sys.stderr)
    return code


def _confirm_decommission(summary: Any, yes: bool) -> None:
    """Irreversible: the gateway id typed on a terminal, or --yes."""
    from app.decommission import DecommissionError

    if yes:
        return
    what = (f"gateway {summary.gateway_id} (identity key {summary.kid}, class "
            f"{summary.key_class}; "
            + ("no store" if summary.queued is None else
               f"{summary.queued} record(s) not yet delivered")
            + f"; the daemon {'runs' if summary.daemon else 'is stopped'})")
    if not sys.stdin.isatty():
        raise DecommissionError(f"decommissioning {what} destroys its keys and cannot be "
                                "undone: confirm on a terminal, or give --yes")
    sys.stderr.write(f"Decommission {what}: its final record is sent, then its keys, its "
                     "pairings and its record store are destroyed. This cannot be undone.\n"
                     f"Type the gateway id ({summary.gateway_id}) to go on: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip() != summary.gateway_id:
        raise DecommissionError("not confirmed: nothing was done")


def _decommission_text(report: dict[str, Any]) -> str:
    gw = report.get("gateway_id")
    if not report.get("destroyed"):
        return f"gateway {gw}: NOT decommissioned; its keys are kept"
    how = ("its final record (seq {}) and everything before it were delivered".format(
        report.get("final_seq")) if report.get("delivered") else
        "forced: not everything was delivered")
    tpm = {"cleared": "; the TPM's owner hierarchy was cleared",
           "kept": "; the TPM was NOT cleared (--keep-tpm)"}.get(str(report.get("tpm")), "")
    return (f"gateway {gw} decommissioned: {how}; {len(report.get('files', []))} files "
            f"destroyed (keys, pairings, journal, store){tpm}")


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
        if not 1 <= args.log_lines <= diag.MAX_LOG_LINES:
            raise UserError(f"--log-lines {args.log_lines}: give 1-{diag.MAX_LOG_LINES}")
        report = diag.bundle(cfg, Path(args.out), include_personal=args.include_personal,
                             log_file=None if args.log_file is None else Path(args.log_file),
                             log_lines=args.log_lines)
        text = diag.render_bundle(report)
    elif args.action == "ports":
        if not 0 < args.timeout <= diag.MAX_PROBE_TIMEOUT_S:
            raise UserError(f"--timeout {args.timeout:g}: give a number of seconds above 0, "
                            f"at most {diag.MAX_PROBE_TIMEOUT_S:g}")
        report = diag.ports_report(cfg, probe=not args.no_probe, timeout_s=args.timeout,
                                   by_id_dir=Path(args.by_id))
        text = diag.render_ports(report)
    elif args.action == "buffer":
        report = diag.buffer_report(cfg)
        text = diag.render_buffer(report)
    else:
        report = diag.keys_report(cfg)
        text = diag.render(report)
    print(json.dumps(report, sort_keys=True) if args.json else text)
    if args.action == "keys" and not report.get("ok"):
        return 1  # as 'provision check': a problem with the keys
    if args.action == "ports" and report.get("problems"):
        print(f"diag: {len(report['problems'])} port problem(s)"
              + (": " + "; ".join(report["problems"]) if args.json else " (above)"),
              file=sys.stderr)
        return 1
    return 0


def cmd_provision_config(args: argparse.Namespace) -> int:
    """A commented configuration with the ports of /dev/serial/by-id (app/config_template.py)."""
    from app import config_template as template

    by_id_dir = Path(args.by_id)
    answers = template.answers_from(args.identity_dir, args.data_dir, args.broker,
                                    template.find_ports(Path(args.names), by_id_dir), by_id_dir)
    text = template.render(answers)
    if args.out == "-":
        sys.stdout.write(json.dumps({"out": "-", "template": text, **template.summary(answers)})
                         + "\n" if args.json else text)
        return 0
    template.write(text, Path(args.out), force=args.force)
    roles = [f"{p.path.name} ({p.role or 'role unknown: commented'})" for p in answers.ports]
    print(json.dumps({"out": args.out, **template.summary(answers)}) if args.json else
          f"wrote {args.out} (mode 600) with "
          + (f"the ports found: {', '.join(roles)}" if roles else
             f"no port found in {args.names} or {by_id_dir} (commented examples)")
          + f"; fill it in, then 'provision check --config {args.out}'")
    return 0


def cmd_provision_check(args: argparse.Namespace) -> int:
    """The whole installation, one line per item (app/check.py): exit 1 on any failure."""
    from app import check

    if not 0 < args.timeout <= 300:
        raise UserError(f"--timeout {args.timeout:g}: give a number of seconds, at most 300")
    if not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: no such file: give the gateway's "
                        "configuration (/etc/smartcorr/gateway.toml)")
    items = check.check_installation(Path(args.config), check.CheckOptions(
        skip_broker=args.skip_broker, timeout_s=args.timeout, before_start=args.before_start,
        skip_hardening=args.skip_hardening))
    if args.json:
        print(json.dumps(check.summary(items), sort_keys=True))
    else:
        print(check.render(items, unicode=_utf8_terminal(sys.stdout)))
    return check.exit_code(items)


def _utf8_terminal(stream: Any) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return bool(stream.isatty()) and encoding == "utf8"


def cmd_provision_range_test(args: argparse.Namespace) -> int:
    """A live view of a tag's beacons while the installer walks (app/range_test.py)."""
    from app import range_test
    from app.config import load_config

    operator = _operator(args)  # who walked: asked before the walk, not after it
    cfg = load_config(Path(args.config))
    return range_test.run(cfg, args.tag, args.duration, operator, out=sys.stdout,
                          err=sys.stderr, stdin=sys.stdin, as_json=args.json)


def cmd_diag_nmea(args: argparse.Namespace) -> int:
    from app import nmea_replay

    argv = [args.file] + (["--json"] if args.json else [])
    result: int = nmea_replay.main(argv)
    return result


def cmd_status(args: argparse.Namespace) -> int:
    """The running daemon's state (app/state.py): once, or live with --watch (app/
    status_view.py); exit 3 when no daemon runs."""
    import shutil

    from app import status_view as view

    problem = view.check_interval(args.interval)
    if problem is not None:
        raise UserError(problem)
    if args.watch and args.json:
        raise UserError("--watch is a live view for people and --json one JSON object, "
                        "once: give one of them")
    runtime = _runtime_dir(args)
    if args.watch:
        if not (sys.stdout.isatty() and sys.stdin.isatty()):
            raise UserError("--watch needs a terminal (it redraws the screen): without one, "
                            "run 'status' or 'status --json'")
        return view.watch(runtime, args.interval)
    state, why = view.snapshot(runtime)
    if why is not None or state is None:
        assert why is not None  # noqa: S101 - snapshot says why when there is no state
        if args.json:
            print(json.dumps(why.as_json(runtime), sort_keys=True))
        print(f"status: {why.message}", file=sys.stderr)
        return view.EXIT_NOT_RUNNING
    if args.config is not None and isinstance(state.get("config"), str) and \
            Path(state["config"]).resolve() != Path(args.config).resolve():
        print(f"status: note: the daemon writing {runtime} runs with {state['config']}, "
              f"not {args.config}", file=sys.stderr)
    note = view.stale_note(state)
    if note is not None:
        print(f"status: note: {note}", file=sys.stderr)
    if args.json:
        from app.state import state_age_ms

        print(json.dumps({**state, "running": True, "age_ms": state_age_ms(state)},
                         sort_keys=True))
        return 0
    size = tuple(shutil.get_terminal_size()) if sys.stdout.isatty() else None
    print("\n".join(view.lines_for_terminal(state, size)))
    return 0


def _runtime_dir(args: argparse.Namespace) -> Path:
    """Where the daemon writes its state: --runtime-dir, else [paths] runtime_dir of
    --config, else /run/smartcorr."""
    from app.state import DEFAULT_RUNTIME_DIR

    if args.runtime_dir is not None:
        return Path(args.runtime_dir)
    if args.config is not None:
        from app.config import ConfigError, load_config

        try:
            runtime = load_config(Path(args.config)).runtime_dir
        except ConfigError as exc:
            # status needs [paths] runtime_dir only: a configuration wrong elsewhere (its TLS
            # files gone after a decommission, a mistake the daemon refused to start on) must
            # not hide whether a daemon runs; the problem is said as a note
            runtime = _configured_runtime_dir(Path(args.config))
            if runtime is None:
                raise
            print(f"status: note: {exc}", file=sys.stderr)
        return runtime if runtime is not None else DEFAULT_RUNTIME_DIR
    return DEFAULT_RUNTIME_DIR


def _configured_runtime_dir(path: Path) -> Path | None:
    """``[paths] runtime_dir`` as the file *path* gives it (the default when it gives none),
    the rest of the configuration unread; None when the file gives no usable one."""
    import tomllib

    from app.state import DEFAULT_RUNTIME_DIR

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    paths = raw.get("paths", {})
    value = paths.get("runtime_dir") if isinstance(paths, dict) else None
    if value is None:
        return DEFAULT_RUNTIME_DIR
    return Path(value) if isinstance(value, str) and Path(value).is_absolute() else None


def _status_parser(sub: Any) -> None:
    from app.status_view import DEFAULT_INTERVAL_S, MAX_INTERVAL_S, MIN_INTERVAL_S

    st = sub.add_parser("status", help="the running gateway now: uplink, queue, devices, "
                                       "tags, alarms, time (exit 3 when it does not run)")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE",
                       help="the gateway's TOML configuration: its [paths] runtime_dir says "
                            "where the daemon writes its state (default /run/smartcorr)")
    where.add_argument("--runtime-dir", metavar="DIR",
                       help="the directory the daemon writes its state.json in (the demo "
                            "prints its own)")
    st.add_argument("--json", action="store_true",
                    help="print the state as one JSON object (\"running\": false and why, "
                         "exit 3, when no daemon runs)")
    st.add_argument("--watch", action="store_true",
                    help="a live view, redrawn in place, until q or Ctrl-C (a terminal of "
                         "80x24 or more)")
    st.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                    help=f"with --watch: redraw every S seconds (default "
                         f"{DEFAULT_INTERVAL_S:g}, {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g})")
    st.set_defaults(func=cmd_status)


def _version() -> str:
    """The package's version (its metadata, else pyproject.toml of this checkout)."""
    from importlib import metadata

    try:
        return metadata.version("smartcorr-gateway")
    except metadata.PackageNotFoundError:
        import tomllib

        try:
            with (Path(__file__).resolve().parent / "pyproject.toml").open("rb") as file:
                return str(tomllib.load(file)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway.py", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the gateway's version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug; never raw frames); "
                             "before or after the command")
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
    _status_parser(sub)
    _provision_parsers(sub.add_parser("provision", help="installers: identity and enrolment"))
    _diag_parsers(sub.add_parser("diag", help="technicians: diagnostics"))
    _help_everywhere(parser)
    _global_options_everywhere(parser)
    return parser


#: Help for the options many commands share, where one has none of its own.
COMMON_HELP = {
    "--json": "print one JSON object on stdout (messages go to stderr)",
    "--config": "the gateway's TOML configuration, e.g. /etc/smartcorr/gateway.toml",
    "--identity-dir": "the gateway's identity directory ('provision init' makes it), e.g. "
                      "/etc/smartcorr/identity",
    "--gateway-id": "this gateway's id, as the platform knows it, e.g. gw-qc-0042",
    "--tag": "the tag's id: T00001000, 0x1000 or 4096",
    "--serial": "the kiosk's serial, as the kiosk reports it, e.g. KI-0001",
}
#: The examples at the end of each command's --help (each line parses: tests check it).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": ("run --config /etc/smartcorr/gateway.toml",
         "status --watch",
         "demo --duration 20",
         "provision check --config /etc/smartcorr/gateway.toml",
         "diag ports --config /etc/smartcorr/gateway.toml -v"),
    "run": ("run --config /etc/smartcorr/gateway.toml",
            "run --config /etc/smartcorr/gateway.toml -v   # and INFO lines"),
    "demo": ("demo --duration 20",
             "demo --duration 10 --json > summary.json",
             "demo --broker 127.0.0.1:1883 --tags 5 --rate 100 --no-gnss"),
    "status": ("status",
               "status --watch",
               "status --json",
               "status --config /etc/smartcorr/gateway.toml --watch --interval 2",
               "status --runtime-dir /tmp/smartcorr-demo-1a2b/run"),
    "provision": ("provision init --identity-dir /etc/smartcorr/identity --gateway-id "
                  "gw-qc-0042",
                  "provision pair-tag --identity-dir /etc/smartcorr/identity --tag 0x1000 "
                  "--operator 'Ann Installer'",
                  "provision check --config /etc/smartcorr/gateway.toml"),
    "provision init": ("provision init --identity-dir /etc/smartcorr/identity --gateway-id "
                       "gw-qc-0042",
                       "provision init --identity-dir ./identity --gateway-id gw-lab-0001 "
                       "--no-tpm"),
    "provision config": ("provision config --out /etc/smartcorr/gateway.toml --broker "
                         "mqtt.platform.example:8883",
                         "provision config --out -   # print it"),
    "provision check": ("provision check --config /etc/smartcorr/gateway.toml",
                        "provision check --config /etc/smartcorr/gateway.toml --json"),
    "provision enrol": ("provision enrol --identity-dir /etc/smartcorr/identity --request-out "
                        "/media/usb --operator 'Ann Installer'",
                        "provision enrol --identity-dir /etc/smartcorr/identity --answer "
                        "/media/usb --operator 'Ann Installer'",
                        "provision enrol --identity-dir /etc/smartcorr/identity --claim "
                        "claim.txt --broker mqtt.platform.example:8884 --ca ca.crt "
                        "--bootstrap-password-file bootstrap.txt --operator 'Ann Installer'"),
    "provision renew": ("provision renew --config /etc/smartcorr/gateway.toml --operator "
                        "'Tom Technician'",),
    "provision rotate-key": ("provision rotate-key --identity-dir /etc/smartcorr/identity "
                             "--operator 'Ann Installer'",),
    "provision pair-tag": ("provision pair-tag --identity-dir /etc/smartcorr/identity --tag "
                           "0x1000 --operator 'Ann Installer'",
                           "provision pair-tag --identity-dir /etc/smartcorr/identity --tag "
                           "T00001000 --key-file tag.key --absent-after 600 --operator "
                           "'Ann Installer'"),
    "provision unpair-tag": ("provision unpair-tag --identity-dir /etc/smartcorr/identity "
                             "--tag 0x1000 --operator 'Ann Installer'",),
    "provision list-tags": ("provision list-tags --identity-dir /etc/smartcorr/identity",
                            "provision list-tags --identity-dir /etc/smartcorr/identity "
                            "--json"),
    "provision pair-kiosk": ("provision pair-kiosk --identity-dir /etc/smartcorr/identity "
                             "--serial KI-0001 --operator 'Ann Installer'",
                             "provision pair-kiosk --identity-dir /etc/smartcorr/identity "
                             "--serial KI-0001 --key-file kiosk.key --replace --operator "
                             "'Ann Installer'"),
    "provision unpair-kiosk": ("provision unpair-kiosk --identity-dir /etc/smartcorr/identity "
                               "--serial KI-0001 --operator 'Ann Installer'",),
    "provision list-kiosks": ("provision list-kiosks --identity-dir /etc/smartcorr/identity "
                              "--json",),
    "provision decommission": ("provision decommission --config /etc/smartcorr/gateway.toml "
                               "--operator 'Ann Installer'",
                               "provision decommission --config /etc/smartcorr/gateway.toml "
                               "--operator 'Ann Installer' --yes --json"),
    "provision range-test": ("provision range-test --config /etc/smartcorr/gateway.toml "
                             "--tag 0x1000 --operator 'Ann Installer'",),
    "diag": ("diag ports --config /etc/smartcorr/gateway.toml",
             "diag bundle --config /etc/smartcorr/gateway.toml --out /tmp/support.tar.gz"),
    "diag buffer": ("diag buffer --config /etc/smartcorr/gateway.toml --json",),
    "diag keys": ("diag keys --config /etc/smartcorr/gateway.toml",),
    "diag ports": ("diag ports --config /etc/smartcorr/gateway.toml",
                   "diag ports --config /etc/smartcorr/gateway.toml --json"),
    "diag bundle": ("diag bundle --config /etc/smartcorr/gateway.toml --out "
                    "/tmp/support.tar.gz",
                    "diag bundle --config /etc/smartcorr/gateway.toml --out "
                    "/tmp/support.tar.gz --include-personal --operator 'Tom Technician'"),
    "diag nmea-replay": ("diag nmea-replay capture.nmea",
                         "diag nmea-replay capture.nmea --json"),
}


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under *parser* with its command path (``("provision", "init")``)."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases: each parser once
                    seen.add(id(sub))
                    out += subcommands(sub, (*path, name))
    return out


def _help_everywhere(parser: argparse.ArgumentParser) -> None:
    """The shared options' help (:data:`COMMON_HELP`) where an option has none, and each
    command's examples (:data:`EXAMPLES`) as the end of its --help."""
    for path, sub in subcommands(parser):
        for action in sub._actions:
            if action.help is None:
                action.help = next((COMMON_HELP[o] for o in action.option_strings
                                    if o in COMMON_HELP), None)
        examples = EXAMPLES.get(" ".join(path))
        if examples:
            sub.epilog = "examples:\n" + "\n".join(f"  python gateway.py {e}"
                                                     for e in examples)
            sub.formatter_class = argparse.RawDescriptionHelpFormatter


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
    init.add_argument("--force", action="store_true",
                      help="replace an existing identity (refused while the directory holds "
                           "paired devices or local actions not yet recorded, which only "
                           "that identity can read: decommission it first)")
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

    _config_parser(psub)

    chk = psub.add_parser("check", help="check the whole installation, one line per item: "
                                        "identity, file modes, certificate, broker, clock, "
                                        "devices and tags, GNSS, disk, daemon (exit 1 on any "
                                        "failure; docs/provision-check.md)")
    chk.add_argument("--config", required=True, help="the gateway's TOML configuration")
    chk.add_argument("--json", action="store_true",
                     help="print one JSON object: ok, failed, warnings, items (each name, ok: "
                          "pass|warn|fail, detail, fix)")
    chk.add_argument("--skip-broker", action="store_true",
                     help="do not try the broker (no network yet): its line is a warning")
    chk.add_argument("--timeout", type=float, default=10.0, metavar="S",
                     help="how long each network step may take (default 10 s)")
    chk.add_argument("--before-start", action="store_true",
                     help="the daemon is not started yet: its absence is a warning, not a "
                          "failure (the items it answers for are warnings either way)")
    chk.add_argument("--skip-hardening", action="store_true",
                     help="leave out the unit's hardening (sshd, consoles, the service's "
                          "user, modes and owners of /etc/smartcorr, the code's integrity: "
                          "docs/hardening.md): a lab or development install; its line is a "
                          "warning")
    chk.set_defaults(func=cmd_provision_check)

    _enrol_parser(psub)
    _renew_parser(psub)
    _range_test_parser(psub)

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
    pair.add_argument("--absent-after", type=int, default=None, metavar="S",
                      help="report the tag absent after S seconds unheard "
                           f"(default {DEFAULT_ABSENT_AFTER_S}; with --replace, the tag's own)")
    pair.add_argument("--replace", action="store_true",
                      help="the tag is paired already: replace its key (load the new one "
                           "into the tag), keeping its settings unless given; without it a "
                           "paired tag is refused")
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
    _decommission_parser(psub)


def _range_test_parser(psub: Any) -> None:
    from app.range_test import DEFAULT_DURATION_S, MAX_DURATION_S

    rng = psub.add_parser(
        "range-test", help="walk the home with a tag: live beacon reception and RSSI, then "
                           "a coverage verdict and the recommended --absent-after, written "
                           "down as a record (the daemon must run)")
    rng.add_argument("--config", required=True, help="the gateway's TOML configuration")
    rng.add_argument("--tag", required=True, help="the paired tag: T00001000, 0x1000 or 4096")
    rng.add_argument("--duration", type=float, default=float(DEFAULT_DURATION_S), metavar="S",
                     help=f"how long the walk lasts (default {DEFAULT_DURATION_S} s, at most "
                          f"{MAX_DURATION_S}); q or Ctrl-C ends it sooner")
    _operator_arguments(rng)
    rng.add_argument("--json", action="store_true",
                     help="print the result as one JSON object (the live line goes to stderr)")
    rng.set_defaults(func=cmd_provision_range_test)


def _config_parser(psub: Any) -> None:
    from app.config_template import DEFAULT_DATA_DIR, DEFAULT_IDENTITY_DIR, NAMES_DIR
    from app.state import BY_ID_DIR

    cfg = psub.add_parser("config", help="write a commented configuration template with the "
                                         "serial ports found (/dev/smartcorr, "
                                         "/dev/serial/by-id)")
    cfg.add_argument("--out", required=True, metavar="FILE",
                     help="where to write it (mode 600), e.g. /etc/smartcorr/gateway.toml; "
                          "'-' prints it")
    cfg.add_argument("--force", action="store_true", help="replace FILE if it exists")
    cfg.add_argument("--identity-dir", metavar="DIR",
                     help=f"the identity directory (default {DEFAULT_IDENTITY_DIR}); the TLS "
                          "files enrolment installs there are filled in")
    cfg.add_argument("--data-dir", metavar="DIR",
                     help=f"the record store's directory (default {DEFAULT_DATA_DIR})")
    cfg.add_argument("--broker", metavar="HOST[:PORT]",
                     help="the platform's broker (default: a placeholder to change)")
    cfg.add_argument("--names", default=str(NAMES_DIR), metavar="DIR",
                     help=f"the stable names devices.conf gave (default {NAMES_DIR}; "
                          "docs/installing.md): looked at first")
    cfg.add_argument("--by-id", default=str(BY_ID_DIR), metavar="DIR",
                     help=f"then the serial ports udev lists (default {BY_ID_DIR})")
    cfg.add_argument("--json", action="store_true",
                     help="print what was written as one JSON object")
    cfg.set_defaults(func=cmd_provision_config)


def _decommission_parser(psub: Any) -> None:
    from provisioning.decommission import DEFAULT_TIMEOUT_S

    dec = psub.add_parser(
        "decommission", allow_abbrev=False,
        help="send the gateway's final record, then destroy its keys, pairings and store "
             "(irreversible)")
    dec.add_argument("--config", required=True,
                     help="the gateway's TOML configuration (identity, data directory, broker)")
    dec.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                     help="wait up to S seconds for the broker to acknowledge the final record "
                          f"and everything before it (default {DEFAULT_TIMEOUT_S:.0f})")
    dec.add_argument("--force", action="store_true",
                     help="destroy the keys even if that did not happen (undelivered records "
                          "are lost; the platform may not be told)")
    dec.add_argument("--keep-tpm", action="store_true",
                     help="do not clear the TPM's owner hierarchy (default: cleared, so no "
                          "copy of the key files ever loads again; clear it yourself if "
                          "something else uses the TPM)")
    dec.add_argument("--yes", action="store_true",
                     help="do not ask to type the gateway id (scripts)")
    _operator_arguments(dec)
    dec.add_argument("--json", action="store_true",
                     help="print the outcome as one JSON object (progress goes to stderr)")
    dec.set_defaults(func=cmd_provision_decommission)


def _enrol_parser(psub: Any) -> None:
    enr = psub.add_parser("enrol", help="get this gateway's certificate from the platform: "
                                        "offline (USB stick) or online by claim token "
                                        "(docs/enrolment.md)")
    enr.add_argument("--identity-dir", required=True,
                     help="the identity directory 'provision init' made")
    how = enr.add_mutually_exclusive_group(required=True)
    how.add_argument("--request-out", metavar="DIR",
                     help="offline, step 1: write request.json (CSR + registration, signed) "
                          "into DIR (a USB stick)")
    how.add_argument("--answer", metavar="DIR",
                     help="offline, step 2: check and install DIR/answer.json (or a file)")
    how.add_argument("--claim", metavar="FILE",
                     help="online: the one-time claim token from FILE, or '-' for stdin "
                          "(never on the command line, where ps shows it)")
    enr.add_argument("--broker", metavar="HOST:PORT",
                     help="with --claim: the platform broker's enrolment listener")
    enr.add_argument("--ca", metavar="FILE",
                     help="with --claim: the CA of the broker's server certificate")
    enr.add_argument("--bootstrap-user", default=BOOTSTRAP_USER,
                     help=f"with --claim: the broker's bootstrap user (default {BOOTSTRAP_USER})")
    enr.add_argument("--bootstrap-password-file", metavar="FILE",
                     help="with --claim: its password, from the installer's kit ('-': stdin)")
    enr.add_argument("--timeout", type=float, default=120.0, metavar="S",
                     help="with --claim: how long to wait for the answer (default 120 s)")
    enr.add_argument("--ca-fingerprint", metavar="SHA256",
                     help="the SHA-256 fingerprint the platform published for its CA: an "
                          "answer from another CA is refused")
    enr.add_argument("--config", metavar="FILE",
                     help="gateway.toml: say whether its [broker] uses the installed files")
    _operator_arguments(enr)
    enr.add_argument("--json", action="store_true", help="print one JSON object")
    enr.set_defaults(func=cmd_provision_enrol)


def _renew_parser(psub: Any) -> None:
    ren = psub.add_parser("renew", help="renew this gateway's certificate now over the "
                                        "enrolment channel: the running gateway does it, or "
                                        "this command when none runs (docs/enrolment.md)")
    ren.add_argument("--config", required=True,
                     help="gateway.toml: the broker, the identity and the data directory")
    ren.add_argument("--timeout", type=float, default=180.0, metavar="S",
                     help="how long to wait for the outcome (default 180 s, at most 3600)")
    _operator_arguments(ren)
    ren.add_argument("--json", action="store_true",
                     help="print the outcome as one JSON object (progress goes to stderr)")
    ren.set_defaults(func=cmd_provision_renew)


def _kiosk_parsers(psub: Any) -> None:
    # no abbreviations: "--key HEX" must not pass for "--key-file" (and echo the key)
    pair = psub.add_parser("pair-kiosk", help="pair a check-in kiosk (its serial and key)",
                           allow_abbrev=False)
    pair.add_argument("--identity-dir", required=True)
    pair.add_argument("--serial", required=True, help="the serial the kiosk reports")
    pair.add_argument("--key-file", metavar="FILE",
                      help="read the kiosk's AES-128 key (32 hex digits) from FILE, or from "
                           "stdin with '-' (default: generate one and print it once)")
    pair.add_argument("--replace", action="store_true",
                      help="the kiosk is paired already: replace its key (load the new one "
                           "into the kiosk); without it a paired kiosk is refused")
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
                       ("ports", "/dev/serial/by-id and each configured port: present, a tty, "
                                 "held by the gateway, handshake, serial, firmware, frames and "
                                 "errors (exit 1 when one is missing or unusable)")):
        cmd = dsub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="the gateway's TOML configuration")
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "ports":
            _diag_ports_arguments(cmd)
        cmd.set_defaults(func=cmd_diag)
    bun = dsub.add_parser("bundle", help="a support bundle: versions, uplink, certificate "
                                         "dates, reports, recent logs; no key, no personal data")
    bun.add_argument("--config", required=True, help="the gateway's TOML configuration")
    bun.add_argument("--out", required=True, help="file to write (tar.gz, mode 600)")
    bun.add_argument("--include-personal", action="store_true",
                     help="also the queued records, decrypted, and the logs unredacted "
                          "(personal data: only on request, recorded with who asked: "
                          "--operator or an operator file)")
    bun.add_argument("--log-file", metavar="FILE",
                     help="take the recent logs from FILE (the daemon's stderr sent to a file) "
                          "instead of journald (journalctl -u smartcorr-gateway)")
    bun.add_argument("--log-lines", type=int, default=500, metavar="N",
                     help="recent log lines to include (default 500, at most 10000)")
    _operator_arguments(bun)
    bun.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    bun.set_defaults(func=cmd_diag)
    nmea = dsub.add_parser("nmea-replay", help="replay an NMEA capture through the GNSS driver")
    nmea.add_argument("file", help="the capture: a raw dump of the GNSS port, or a gpsd "
                                   ".log")
    nmea.add_argument("--json", action="store_true")
    nmea.set_defaults(func=cmd_diag_nmea)


def _diag_ports_arguments(cmd: argparse.ArgumentParser) -> None:
    from app.ports import PROBE_TIMEOUT_S
    from app.state import BY_ID_DIR

    cmd.add_argument("--no-probe", action="store_true",
                     help="do not open the ports nobody holds (by default each is asked for "
                          "its device's HELLO, or listened to for NMEA, then closed; a port "
                          "the running gateway holds is reported from its state)")
    cmd.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S, metavar="S",
                     help=f"how long to wait for each device (default {PROBE_TIMEOUT_S:g} s, "
                          "ports probed at once)")
    cmd.add_argument("--by-id", default=str(BY_ID_DIR), metavar="DIR",
                     help=f"where udev's by-id links are (default {BY_ID_DIR})")


#: The status of a command whose reader went away (128 + SIGPIPE, as a shell tool's).
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose, args.trace_serial = _global_options(args)
    _logging(args.verbose, args.trace_serial)
    try:
        result: int = args.func(args)
    except UserError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        code: int = getattr(exc, "exit_code", EXIT_USER_ERROR)  # e.g. 3: decommissioned
        return code
    except BrokenPipeError:  # '... | head' read enough: no traceback, as a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return result


if __name__ == "__main__":
    sys.exit(main())
