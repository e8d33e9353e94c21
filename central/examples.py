"""Examples at the end of every ``ingest`` command's ``--help`` (tests/test_ingest_cli.py
parses each one). ``$DB`` stands for the platform's database URL."""

from __future__ import annotations

import argparse

DB = "postgresql://ingest@127.0.0.1:5432/smartcorr"
_TLS = "--ca ca.crt --cert ingest-1.crt --key ingest-1.key"
_CMD = (f"command --db {DB} --gw gw-qc-0042 --key keys/region-qc "
        "--broker mqtt.example:8883 --ca ca.crt --tls-cert platform.crt --tls-key platform.key")

#: Command path (words after ``ingest``) -> example lines (without the program's name).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": (f"consume --db {DB} --broker mqtt.example:8883 {_TLS} --client-id ingest-1",
         f"report --db {DB} --gw gw-qc-0042"),
    "enrol": (f"enrol --db {DB} --registration gw-qc-0042/signing.pub",
              f"enrol --db {DB} --decommission gw-qc-0042 --json"),
    "consume": (f"consume --db {DB} --broker mqtt.example:8883 {_TLS} --client-id ingest-1",
                f"consume --db {DB} --broker 127.0.0.1:1883 --no-tls --client-id lab-1 --json"),
    "alarms": (f"alarms --db {DB} --follow",
               f"alarms --db {DB} --office qc-montreal --since 120 --json"),
    "report": (f"report --db {DB} --gw gw-qc-0042",
               f"report --db {DB} --gw gw-qc-0042 --json"),
    "gateways": (f"gateways --db {DB}", f"gateways --db {DB} --json"),
    "presence": (f"presence --db {DB} --gw gw-qc-0042 --tag T0000C001",
                 f"presence --db {DB} --gw gw-qc-0042 --tag T0000C001 "
                 "--from 2026-11-01T00:00:00Z --to 2026-11-30T23:59:59Z --json"),
    "export": (f"export --db {DB} --gw gw-qc-0042 --from 2026-11-01T00:00:00Z "
               "--to 2026-11-30T23:59:59Z --out case-1234.zip --by 'A. Clerk'",),
    "verify-export": ("verify-export case-1234.zip", "verify-export case-1234.zip --json"),
    "assign": (f"assign --db {DB} --gw gw-qc-0042 --case C-2026-1234 --office qc-montreal",),
    "office": (f"office --db {DB} --add qc-montreal --webhook https://office.example/alarms "
               "--secret-file qc-montreal.secret",
               f"office --db {DB} --add qc-laval --secret-file qc-laval.secret  # pulls"),
    "offices": (f"offices --db {DB}", f"offices --db {DB} --json"),
    "deliver": (f"deliver --db {DB} --worker-id deliver-1",
                f"deliver --db {DB} --once --json"),
    "deliveries": (f"deliveries --db {DB}", f"deliveries --db {DB} --office qc-montreal --json"),
    "close-case": (f"close-case --db {DB} --gw gw-qc-0042 --ended 2026-11-30T12:00:00Z "
                   "--reason supervision_ended --by 'A. Clerk'",),
    "purge": (f"purge --db {DB} --key action.key", f"purge --db {DB} --key action.key "
              "--now 2027-06-01T00:00:00Z --limit 50 --json"),
    "actions": (f"actions --db {DB}", f"actions --db {DB} --verify --key-pub action.key.pub"),
    "action-key": ("action-key --out action.key",),
    "command-root": ("command-root init --out /media/offline/root",),
    "command-root init": ("command-root init --out /media/offline/root",
                          "command-root init --out root-sm --alg sm2-sm3 --json"),
    "command-key": ("command-key issue --root /media/offline/root --region qc --days 365 "
                    "--out keys/region-qc",
                    "command-key list --root /media/offline/root"),
    "command-key issue": ("command-key issue --root /media/offline/root --region qc "
                          "--days 365 --out keys/region-qc",),
    "command-key revoke": ("command-key revoke --root /media/offline/root --kid 3f9a2c "
                           "--reason compromised",),
    "command-key list": ("command-key list --root /media/offline/root --json",),
    "command-key export": ("command-key export --root /media/offline/root --out kit/",
                           "command-key export --root /media/offline/root --out kit/ "
                           "--region qc"),
    "ca": ("ca init --ca-dir ca/ --name 'Province QC gateways'",
           f"ca claim --db {DB} --gw gw-qc-0042 --ttl 15m --out token.txt"),
    "ca init": ("ca init --ca-dir ca/ --name 'Province QC gateways'",),
    "ca sign": (f"ca sign usb/request --ca-dir ca/ --db {DB} --command-keys kit/",),
    "ca claim": (f"ca claim --db {DB} --gw gw-qc-0042 --ttl 15m --out token.txt",
                 f"ca claim --db {DB} --cancel-open"),
    "ca revoke": (f"ca revoke --db {DB} --gw gw-qc-0042 --reason key_compromise",),
    "ca crl": (f"ca crl --ca-dir ca/ --db {DB} --out /etc/mosquitto/crl.pem",),
    "ca list": (f"ca list --db {DB}", f"ca list --db {DB} --gw gw-qc-0042 --json"),
    "ca issue": (f"ca issue --ca-dir ca/ --db {DB} --cn mqtt.example --server "
                 "--san mqtt.example --out broker/",
                 f"ca issue --ca-dir ca/ --db {DB} --cn ingest-1 --out ingest-1/"),
    "enrol-service": (f"enrol-service --db {DB} --ca-dir ca/ --broker mqtt.example:8884 "
                      f"{_TLS} --command-keys kit/ --renew-only-after 30d",),
    "command": (f"{_CMD} request-presence --tag T0000C001",
                f"{_CMD} --no-wait unpair-tag --tag T0000C001"),
    "command pair-tag": (f"{_CMD} pair-tag --tag T0000C001 --tag-key-file tag.key",),
    "command unpair-tag": (f"{_CMD} unpair-tag --tag T0000C001",),
    "command pair-kiosk": (f"{_CMD} pair-kiosk --serial KI-0001 --kiosk-key-file -",),
    "command unpair-kiosk": (f"{_CMD} unpair-kiosk --serial KI-0001",),
    "command set-config": (f"{_CMD} set-config --setting absent_after_s --value 120 "
                           "--tag T0000C001",),
    "command set-authorisation": (
        f"{_CMD} set-authorisation --tag T0000C001 --basis prohibition_order "
        "--document 'QC-2026-0042' --approver 'Head, county justice bureau' "
        "--start 2026-12-01 --end 2027-02-28 --zone Asia/Shanghai",),
    "command end-authorisation": (
        f"{_CMD} end-authorisation --tag T0000C001 --document 'QC-2026-0099' "
        "--approver 'Head, county justice bureau' --reason no_longer_needed",),
    "command set-presence-rules": (
        f"{_CMD} set-presence-rules --tag T0000C001 --zone Asia/Shanghai --grace-min 15 "
        "--window mon-fri=22:00-06:00 --skip 2026-12-25",),
    "command approve-leave": (
        f"{_CMD} approve-leave --tag T0000C001 --leave-id L-17 --document 'QC-L-17' "
        "--approver 'Officer B' --start 2026-12-24T08:00:00Z --end 2026-12-26T20:00:00Z "
        "--grace-min 30",),
    "command revoke-leave": (f"{_CMD} revoke-leave --tag T0000C001 --leave-id L-17",),
    "command request-presence": (f"{_CMD} request-presence --tag T0000C001",),
    "command request-diag": (f"{_CMD} request-diag --out gw-qc-0042-diag.tar.gz",),
    "command resend": (f"{_CMD} resend --cseq 41",),
    "verify": ("verify capture.ndjson --key gw-qc-0042=gw-qc-0042/signing.pub",
               f"verify capture.ndjson --db {DB} --json"),
}


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command of *parser*, with its path (words after the program's name)."""
    out = [(" ".join(path), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, (*path, name))
    return out


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Put each command's examples at the end of its help, as written."""
    prog = parser.prog
    for path, sub in commands(parser):
        lines = EXAMPLES.get(path)
        if lines:
            sub.epilog = "examples:\n" + "\n".join(f"  {prog} {line}" for line in lines)
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
