"""The installer's flow end to end (issue 12), driven through the command lines only.

``python -m lab.installer_flow --out docs/installer-transcript.md`` runs, in a temporary
directory on loopback, what a province's operator and two installers do, each step as a
user types it (``ingest …`` for the platform, ``python gateway.py …`` for the gateway)
in a process of its own, and writes the transcript: every command line, its real
standard output and error (abbreviated only where long), its time, and the checks the
flow made of what it did.

* **The platform**: ``ingest ca init``, the command root, a command key and its export,
  the broker's and the platform clients' certificates (``ingest ca issue``), a real
  mosquitto (the gateways' mTLS listener with the ACL of :func:`core.topics.broker_acl`
  and the CRL; the bootstrap listener with the bootstrap user's password), the
  enrolment service and an ingest consumer on SQLite (``ingest enrol-service``,
  ``ingest consume``), one claim token (``ingest ca claim``).
* **Gateway A** enrols online by claim; **gateway B** offline (a USB stick: ``provision
  enrol --request-out``, ``ingest ca sign``, ``provision enrol --answer``), after trying
  the token A already used (refused ``claim_used``). Each gets a tag receiver (the tag
  simulator on a pseudo-terminal, its tag's key from a file), a configuration from
  ``provision config``, its tag paired, ``provision check``, then ``gateway.py run``.
* The platform's ``ingest report`` shows the records verified; ``provision renew`` renews
  A's certificate while its daemon runs (the serial changes, the uplink reconnects with it,
  records keep arriving); ``ingest command`` sends A a command signed by the platform's
  command key (applied) and one signed by a key of another root (refused ``unknown_key``);
  ``ingest ca revoke`` + ``ingest ca crl`` + a broker reload (SIGHUP) revoke B: its later
  records are quarantined, and once it reconnects the broker refuses it at TLS while its
  store keeps committing readings; ``provision decommission --yes`` ends A (the final
  record delivered, the keys destroyed) and ``--force`` ends B (the platform could not be
  told).

Secrets never go on a command line: the claim token goes to stdin, the bootstrap
password and the tag keys are files of mode 0600. The flow stops at the first step that
does not do what it should (:class:`FlowError`, with the transcript so far).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from core.errors import UserError
from core.topics import BOOTSTRAP_USER, COMMAND_CN, ENROL_CN, PLATFORM_CN, broker_acl
from lab import background
from lab.markdown import Cut, fence, keep_dir_problem, write_private
from lab.mosquitto import free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[1]
#: The gateways of the flow.
GW_A, GW_B = "gw-qc-0101", "gw-qc-0102"
TAG_A, TAG_B = "T00001000", "T00002000"
INSTALLER, TECHNICIAN = "Ann Installer", "Tom Li"
#: A tag's presence interval is sealed at most this old in the flow (``[tags]
#: interval_max_s``, the least allowed; a unit: 300 s).
LAB_INTERVAL_MAX_S = 10
#: How often each tag beacons in the flow, seconds (a real tag: every few seconds).
BEACON_INTERVAL_S = 0.25
#: Bounds on what is awaited (events are awaited, never slept on), seconds.
STEP_TIMEOUT_S = 60.0
WAIT_S = 20.0
#: Output longer than 24 lines is shown as its head and tail; lines longer than 600
#: characters (a JSON report, a PEM) are cut.
CUT = Cut(lines=24, chars=600, head=10, tail=8)
#: What ``$FLOW`` stands for in the transcript.
FLOW_VAR = "$FLOW"


class FlowError(UserError):
    """A step did not do what it should; :attr:`transcript` holds the steps so far."""

    def __init__(self, message: str, transcript: Transcript) -> None:
        super().__init__(message)
        self.transcript = transcript


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Step:
    """One command, as typed, with what it printed."""

    section: str
    title: str
    command: str
    started: dt.datetime
    note: str = ""
    stdin: str | None = None  # what was typed on stdin (described, never a secret)
    elapsed_s: float | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    background: bool = False
    full: bool = False  # shown whole, however long
    checks: list[Check] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, content) shown


@dataclass
class Transcript:
    root: Path
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    elapsed_s: float = 0.0
    error: str | None = None

    @property
    def checks(self) -> list[Check]:
        return [c for s in self.steps for c in s.checks]

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)

    def step(self, title: str) -> Step:
        """The step titled *title* (KeyError if none)."""
        for s in self.steps:
            if s.title == title:
                return s
        raise KeyError(title)

    def markdown(self) -> str:
        return render(self)


class Background(background.Background):
    """A process that runs while the flow goes on (a daemon, the broker, a simulator),
    whose output goes into its step when it ends."""

    def __init__(self, step: Step, argv: Sequence[str], env: dict[str, str],
                 cwd: Path, stdin: int | None = subprocess.DEVNULL) -> None:
        self.step = step
        super().__init__(argv, env, cwd, stdin)

    def finish(self, code: int | None = None) -> int:
        """The process ended (by itself, or :meth:`stop`): record its output."""
        return self.ended(code)

    def ended(self, code: int | None = None) -> int:
        code = super().ended(code)
        self.step.returncode = code
        self.step.elapsed_s = time.monotonic() - self.started
        self.step.stdout = "\n".join(self.text("stdout"))
        self.step.stderr = "\n".join(self.text("stderr"))
        return code


_env = background.isolated_env


def _ingest_argv() -> tuple[list[str], str]:
    """The platform's command line: the installed ``ingest`` script beside this Python,
    else ``python -m central``; and how the transcript shows it."""
    script = Path(sys.executable).parent / "ingest"
    if script.is_file():
        return [str(script)], "ingest"
    return [sys.executable, "-m", "central"], "python -m central"


def serial_of(cert_file: Path) -> str:
    """The serial (hex) of the certificate in *cert_file*."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return format(cert.serial_number, "x")


def parse_report(text: str) -> dict[str, Any]:
    """``ingest report``'s human output (``key: JSON`` a line) as a dict."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key] = json.loads(value)
    return out


class Flow:
    """The flow's steps, run in *root*; :meth:`run` returns the transcript."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.t = Transcript(root)
        self.env = _env()
        self.ingest_argv, self.ingest_shown = _ingest_argv()
        self.section = ""
        self.background: list[Background] = []
        self.db_url = f"sqlite:///{root / 'platform' / 'ingest.db'}"
        self.bootstrap_password = secrets.token_urlsafe(18)  # the installers' kits'
        self._ended: dict[int, float] = {}  # id(step): when its command ended (monotonic)

    # -- how a step is run and shown --------------------------------------------------

    def shown(self, argv: Sequence[str]) -> str:
        return shlex.join(argv).replace(str(self.root), FLOW_VAR)

    def _step(self, title: str, shown: Sequence[str], note: str, stdin: str | None,
              background: bool = False) -> Step:
        step = Step(self.section, title, self.shown(shown), dt.datetime.now(dt.UTC),
                    note=note, stdin=stdin, background=background)
        self.t.steps.append(step)
        return step

    def cmd(self, title: str, shown: Sequence[str], real: Sequence[str], *, note: str = "",
            stdin: str | None = None, stdin_note: str | None = None, expect: int | None = 0,
            timeout: float = STEP_TIMEOUT_S) -> Step:
        """Run a command to its end; FlowError unless it exits with *expect*."""
        step = self._step(title, shown, note, stdin_note)
        started = time.monotonic()
        try:
            done = subprocess.run(list(real), input=stdin, capture_output=True, text=True,
                                  env=self.env, cwd=REPO, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            step.elapsed_s = time.monotonic() - started
            step.stdout = _text(exc.stdout)
            step.stderr = _text(exc.stderr)
            raise self.fail(f"{title}: no end within {timeout:g} s") from None
        step.elapsed_s = time.monotonic() - started
        self._ended[id(step)] = time.monotonic()
        step.returncode, step.stdout, step.stderr = done.returncode, done.stdout, done.stderr
        if expect is not None and done.returncode != expect:
            raise self.fail(f"{title}: exit status {done.returncode}, expected {expect}:\n"
                            f"{done.stdout}{done.stderr}")
        return step

    def gateway(self, title: str, *args: str, **kw: Any) -> Step:
        return self.cmd(title, ["python", "gateway.py", *args],
                        [sys.executable, str(REPO / "gateway.py"), *args], **kw)

    def ingest(self, title: str, *args: str, **kw: Any) -> Step:
        return self.cmd(title, [*self.ingest_shown.split(), *args],
                        [*self.ingest_argv, *args], **kw)

    def start(self, title: str, shown: Sequence[str], real: Sequence[str], *,
              ready: str | None, note: str = "", timeout: float = WAIT_S) -> Background:
        """Start a process that keeps running; wait for a line matching *ready*."""
        step = self._step(title, shown, note, None, background=True)
        proc = Background(step, real, self.env, REPO)
        self.background.append(proc)
        if ready is not None and proc.wait_line(ready, timeout) is None:
            proc.stop()
            raise self.fail(f"{title}: it did not say {ready!r} within {timeout:g} s")
        return proc

    def check(self, what: str, ok: bool, detail: str = "", *, step: Step | None = None
              ) -> bool:
        """A check of *step* (default: the last one); FlowError when it fails."""
        (step or self.t.steps[-1]).checks.append(Check(what, ok, detail))
        if not ok:
            raise self.fail(f"check failed: {what}: {detail}")
        return ok

    def show_file(self, path: Path, content: str | None = None) -> None:
        """Show a file the last step wrote or read (its content as it is)."""
        text = path.read_text() if content is None else content
        self.t.steps[-1].files.append((self.shown([str(path)]), text))

    def fail(self, message: str) -> FlowError:
        self.t.error = message
        return FlowError(message, self.t)

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = WAIT_S) -> float:
        """Wait until *condition()* holds (the state of another process); seconds it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise self.fail(f"timed out after {timeout:g} s waiting for {what}")
            threading.Event().wait(0.1)
        return time.monotonic() - started

    def report(self, gw: str) -> dict[str, Any]:
        """What the platform holds of *gw* now (read directly: the flow's own look)."""
        from central.db import open_db
        from central.ingest import report

        with open_db(self.db_url, migrate=False) as db:
            return dict(report(db, gw))

    def stop_all(self) -> None:
        for proc in reversed(self.background):
            if proc.proc.poll() is None:
                proc.stop()
            elif proc.step.returncode is None:
                proc.finish()

    # -- the flow ----------------------------------------------------------------------

    def run(self) -> Transcript:
        started = time.monotonic()
        try:
            self.platform()
            self.gateway_a()
            self.gateway_b()
            self.operate()
            self.decommission()
        except UserError:  # a step failed (FlowError), or mosquitto is missing (exit 2)
            raise
        except Exception as exc:  # the transcript so far says where it stopped
            raise self.fail(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.stop_all()
            self.t.elapsed_s = time.monotonic() - started
        return self.t

    def platform(self) -> None:
        self.section = "The platform (its operator, once)"
        p = self.root / "platform"
        ca_dir = p / "ca"
        made = self.ingest("make the gateways' CA", "ca", "init", "--ca-dir", str(ca_dir),
                           "--name", "Flow Province CA")
        fingerprint = re.search(r"SHA-256 fingerprint ([0-9a-f]{64})", made.stdout)
        self.check("the CA's fingerprint is printed (installers check answers with it)",
                   fingerprint is not None, fingerprint.group(1) if fingerprint else "")
        assert fingerprint is not None  # noqa: S101 (checked above)
        self.t.facts["ca_fingerprint"] = fingerprint.group(1)
        self.check("ca.key is readable by its owner only",
                   (ca_dir / "ca.key").stat().st_mode & 0o077 == 0,
                   oct((ca_dir / "ca.key").stat().st_mode & 0o777))

        root = p / "command-root"  # on a USB key in a safe, in production
        self.ingest("make the command root (offline)", "command-root", "init", "--out",
                    str(root), note="On an offline machine: the root's private key stays on "
                    "its USB key (docs/command-keys.md).")
        self.ingest("certify a command key for the whole province", "command-key", "issue",
                    "--root", str(root), "--region", "*", "--days", "365", "--out",
                    str(p / "command-key"))
        export = p / "command-export"
        self.ingest("export what gateways install", "command-key", "export", "--root",
                    str(root), "--out", str(export))
        self.check("the export holds no private key",
                   sorted(f.name for f in export.iterdir()) == ["command-keys.json",
                                                                 "command-root.pub"],
                   ", ".join(sorted(f.name for f in export.iterdir())))

        broker_dir = p / "broker"
        self.ingest("the broker's server certificate", "ca", "issue", "--ca-dir", str(ca_dir),
                    "--db", self.db_url, "--cn", "mqtt.flow.example", "--server", "--san",
                    "127.0.0.1", "--san", "localhost", "--out", str(broker_dir))
        self.ingest("the enrolment service's certificate", "ca", "issue", "--ca-dir",
                    str(ca_dir), "--db", self.db_url, "--cn", ENROL_CN, "--out",
                    str(p / "enrol"))
        self.ingest("the ingest consumer's certificate", "ca", "issue", "--ca-dir",
                    str(ca_dir), "--db", self.db_url, "--cn", PLATFORM_CN, "--out",
                    str(p / "consumer"))
        self.ingest("the command publisher's certificate", "ca", "issue", "--ca-dir",
                    str(ca_dir), "--db", self.db_url, "--cn", COMMAND_CN, "--out",
                    str(p / "commands"))
        crl = ca_dir / "crl.pem"  # empty: 'ca init' wrote it for the broker's crlfile

        self.broker_port, self.bootstrap_port = free_port(), free_port()
        conf = self.broker_conf(broker_dir, ca_dir / "ca.crt", crl)
        self.broker = self.start(
            "start the broker", ["mosquitto", "-c", str(conf)],
            [mosquitto_binary(), "-c", str(conf)], ready=r" running$",
            note="mosquitto with the gateways' mTLS listener (client id bound to the "
                 "certificate's CN, the ACL of core.topics.broker_acl(), the CRL) and the "
                 "bootstrap listener (TLS, no client certificate, the bootstrap user's "
                 "password hashed by mosquitto_passwd) — docs/broker.md.")
        self.show_file(conf)
        self.show_file(broker_dir / "smartcorr.acl")

        enrol, consumer = p / "enrol", p / "consumer"
        self.enrol_service = self.start(
            "start the enrolment service",
            [*self.ingest_shown.split(), "enrol-service", "--db", self.db_url, "--ca-dir",
             str(ca_dir), "--broker", f"127.0.0.1:{self.broker_port}", "--ca",
             str(ca_dir / "ca.crt"), "--cert", str(enrol / f"{ENROL_CN}.crt"), "--key",
             str(enrol / f"{ENROL_CN}.key"), "--command-keys", str(export),
             "--renew-only-after", "0", "--json"],
            [*self.ingest_argv, "enrol-service", "--db", self.db_url, "--ca-dir",
             str(ca_dir), "--broker", f"127.0.0.1:{self.broker_port}", "--ca",
             str(ca_dir / "ca.crt"), "--cert", str(enrol / f"{ENROL_CN}.crt"), "--key",
             str(enrol / f"{ENROL_CN}.key"), "--command-keys", str(export),
             "--renew-only-after", "0", "--json"],
            ready='"event": "subscribed"',
            note="It answers claims and renewals. --renew-only-after 0: this flow renews a "
                 "certificate minutes after issuing it (the default, 1h, would refuse "
                 "too_soon).")
        consume_args = ["consume", "--db", self.db_url, "--broker",
                        f"127.0.0.1:{self.broker_port}", "--ca", str(ca_dir / "ca.crt"),
                        "--cert", str(consumer / f"{PLATFORM_CN}.crt"), "--key",
                        str(consumer / f"{PLATFORM_CN}.key"), "--client-id", PLATFORM_CN,
                        "--json"]
        self.consumer = self.start(
            "start an ingest consumer", [*self.ingest_shown.split(), *consume_args],
            [*self.ingest_argv, *consume_args], ready='"event": "subscribed"',
            note="Verifies every record and stores each once by (gateway, seq) in SQLite "
                 "(PostgreSQL in a province).")

        kit = self.root / "kit"  # the installer's kit
        kit.mkdir()
        (kit / "broker-ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
        write_private(kit / "bootstrap.pass", self.bootstrap_password + "\n")
        self.token_file = p / "claim-1.token"
        self.ingest("a one-time claim token for the installer", "ca", "claim", "--db",
                    self.db_url, "--ttl", "15m", "--out", str(self.token_file))
        self.check("the token is in a file of mode 600, not on the screen",
                   self.token_file.stat().st_mode & 0o077 == 0
                   and self.token() not in self.t.steps[-1].stdout
                   + self.t.steps[-1].stderr, oct(self.token_file.stat().st_mode & 0o777))

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def broker_conf(self, directory: Path, ca_file: Path, crl: Path) -> Path:
        """mosquitto.conf, the ACL and the bootstrap password file (docs/broker.md)."""
        acl = directory / "smartcorr.acl"
        acl.write_text(broker_acl(PLATFORM_CN))
        passwd = directory / "bootstrap.passwd"
        write_private(passwd, f"{BOOTSTRAP_USER}:{self.bootstrap_password}\n")
        tool = mosquitto_binary().replace("/sbin/mosquitto", "/bin/mosquitto_passwd")
        subprocess.run([tool if Path(tool).exists() else "mosquitto_passwd", "-U",
                        str(passwd)], check=True, capture_output=True)
        server = directory / "mqtt.flow.example"
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {acl}",
            f"password_file {passwd}",
            "persistence false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "max_inflight_messages 100",
            "max_queued_messages 10000",
            *(["user root"] if os.geteuid() == 0 else []),
            "",
            "# gateways and the platform's clients: mTLS, user = client id = the CN",
            f"listener {self.broker_port} 127.0.0.1",
            f"cafile {ca_file}",
            f"certfile {server}.crt",
            f"keyfile {server}.key",
            f"crlfile {crl}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "",
            "# unenrolled gateways: TLS, no client certificate, the bootstrap user",
            f"listener {self.bootstrap_port} 127.0.0.1",
            f"certfile {server}.crt",
            f"keyfile {server}.key",
            "require_certificate false",
            "use_identity_as_username false",
            "use_username_as_clientid false",
        ]
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    # -- the gateways ---------------------------------------------------------------------

    def gw_dir(self, gw: str) -> Path:
        return self.root / gw

    def identity(self, gw: str) -> Path:
        return self.gw_dir(gw) / "identity"

    def config(self, gw: str) -> Path:
        return self.gw_dir(gw) / "gateway.toml"

    def init(self, gw: str) -> None:
        self.gateway(f"{gw}: make its identity", "provision", "init", "--identity-dir",
                     str(self.identity(gw)), "--gateway-id", gw, "--no-tpm",
                     note="--no-tpm: this lab machine has no TPM. A real unit makes its "
                          "identity key in its TPM 2.0 (found by default, or --tpm "
                          "device:/dev/tpmrm0), where it never leaves; the warning below "
                          "says what a file key costs.")
        self.check("tls.key (mode 600) and its CSR are made",
                   (self.identity(gw) / "tls.key").stat().st_mode & 0o077 == 0
                   and (self.identity(gw) / "tls.csr").is_file())

    def plug_tag_receiver(self, gw: str, tag: str) -> Background:
        """The tag receiver (the simulator on a pty, under a by-id name) and its tag's key."""
        d = self.gw_dir(gw)
        key = d / f"tag-{tag}.key"  # delivered with the tag
        write_private(key, secrets.token_bytes(16).hex() + "\n")
        link = d / "by-id" / "usb-SmartCorr_TagRx_0001-if00"
        link.parent.mkdir(parents=True, exist_ok=True)
        args = ["tag", "--pty", "--link", str(link), "--key-file", str(key), "--tag", tag,
                "--serial", f"TR-{gw[-4:]}", "--interval", str(BEACON_INTERVAL_S)]
        return self.start(f"{gw}: plug in the tag receiver",
                          ["python", "-m", "lab.simulators", *args],
                          [sys.executable, "-m", "lab.simulators", *args], ready=r"^/",
                          note=f"The lab's stand-in for the tag receiver: a simulator on a "
                               f"pseudo-terminal under a /dev/serial/by-id name, its tag "
                               f"{tag} beaconing every {BEACON_INTERVAL_S:g} s with AES-CMAC "
                               f"under the tag's key (the file {self.shown([str(key)])}, "
                               "mode 600, as it came with the tag).")

    def configure(self, gw: str) -> None:
        cfg = self.config(gw)
        self.gateway(f"{gw}: write its configuration", "provision", "config", "--out",
                     str(cfg), "--identity-dir", str(self.identity(gw)), "--data-dir",
                     str(self.gw_dir(gw) / "data"), "--broker",
                     f"127.0.0.1:{self.broker_port}", "--by-id",
                     str(self.gw_dir(gw) / "by-id"),
                     note="--by-id: where this lab's ports are named (on a unit, "
                          "/dev/serial/by-id, the default).")
        text = cfg.read_text()
        self.check("the tag receiver found is configured",
                   re.search(r'^\[\[devices\]\]\s*\n(?:#.*\n)*name = "tags"', text,
                             re.MULTILINE) is not None)
        runtime = self.gw_dir(gw) / "run"
        runtime.mkdir(mode=0o700)
        extra = (f'\n[paths]\nruntime_dir = "{runtime}"\n\n[tags]\n'
                 f"interval_max_s = {LAB_INTERVAL_MAX_S}\n")
        with cfg.open("a") as file:  # the lab has no /run/smartcorr
            file.write(extra)
        self.t.steps[-1].note += (f" Then the lab's runtime directory (no /run/smartcorr "
                                  f"here), and presence intervals of {LAB_INTERVAL_MAX_S} s "
                                  f"(the platform sees the tag within seconds), are appended "
                                  f"to it:{extra.rstrip()}")

    def pair(self, gw: str, tag: str) -> None:
        self.gateway(f"{gw}: pair the tag", "provision", "pair-tag", "--identity-dir",
                     str(self.identity(gw)), "--tag", tag, "--key-file",
                     str(self.gw_dir(gw) / f"tag-{tag}.key"), "--operator", INSTALLER)
        self.check("the key is not printed",
                   (self.gw_dir(gw) / f"tag-{tag}.key").read_text().strip()
                   not in self.t.steps[-1].stdout + self.t.steps[-1].stderr)

    def authorise(self, gw: str, tag: str, document: str) -> None:
        """The platform authorises the tag's monitoring (Art. 29): until then the gateway
        records nothing of its presence ([supervision] require_authorisation, the
        default; docs/supervision.md)."""
        today = dt.datetime.now(dt.UTC).date()
        step = self.command(
            f"{gw}: the platform authorises the tag's monitoring",
            self.root / "platform" / "command-key", "set-authorisation", "--tag", tag,
            "--basis", "left_area_without_approval", "--document", document, "--approver",
            "county justice bureau head", "--start", today.isoformat(), "--end",
            (today + dt.timedelta(days=30)).isoformat(), "--zone", "Asia/Shanghai", gw=gw,
            note="At the platform, once the county bureau approved the monitoring: a signed "
                 "set-authorisation (at most three months). Until it is applied the gateway "
                 "hears the tag but records nothing of its presence (the check above warned "
                 "so).")
        self.check("applied", f"applied by {gw}" in step.stdout,
                   step.stdout.strip().splitlines()[0] if step.stdout.strip() else "")

    def provision_check(self, gw: str) -> None:
        step = self.gateway(f"{gw}: check the installation", "provision", "check", "--config",
                            str(self.config(gw)), "--before-start", "--skip-hardening",
                            expect=None,
                            note="Before the daemon's first start (--before-start); "
                                 "--skip-hardening: this lab machine is not a unit set up by "
                                 "packaging/install.sh. Its output as it is today (the check "
                                 "is being extended); exit 1 means an item failed.")
        step.full = True
        failed = [line.split()[1] for line in step.stdout.splitlines()
                  if line.startswith("FAIL ")]
        if failed:
            step.note += f" Here it failed on: {', '.join(failed)}."
        self.t.facts[f"{gw}.check_exit"] = step.returncode
        self.t.facts[f"{gw}.check_failed"] = failed

    def run_daemon(self, gw: str, title: str | None = None) -> Background:
        return self.start(title or f"{gw}: start the gateway",
                          ["python", "gateway.py", "run", "--config", str(self.config(gw))],
                          [sys.executable, str(REPO / "gateway.py"), "run", "--config",
                           str(self.config(gw))], ready=r"running \(version",
                          note="The daemon (systemd runs it as smartcorr-gateway.service). "
                               "Its output until it stops is shown here.")

    def gateway_a(self) -> None:
        gw = GW_A
        self.section = f"Gateway A ({gw}): online, by claim"
        self.init(gw)
        self.sim_a = self.plug_tag_receiver(gw, TAG_A)
        self.configure(gw)
        step = self.gateway(
            f"{gw}: enrol by claim", "provision", "enrol", "--identity-dir",
            str(self.identity(gw)), "--claim", "-", "--broker",
            f"127.0.0.1:{self.bootstrap_port}", "--ca", str(self.root / "kit" / "broker-ca.crt"),
            "--bootstrap-password-file", str(self.root / "kit" / "bootstrap.pass"),
            "--ca-fingerprint", self.t.facts["ca_fingerprint"], "--config",
            str(self.config(gw)), "--operator", INSTALLER, "--timeout", "30",
            stdin=self.token() + "\n", stdin_note="the claim token the operator gave "
            "(pasted, then Ctrl-D)")
        self.check("the token is not echoed", self.token() not in step.stdout + step.stderr)
        self.check("the certificate, the CA and the command keys are installed", all(
            (self.identity(gw) / f).is_file() for f in
            ("tls.crt", "ca.crt", "command-root.pub", "command-keys.json")))
        self.t.facts["a.serial_enrolled"] = serial_of(self.identity(gw) / "tls.crt")
        issued = self.enrol_service.wait_line(f'"event": "issued".*"gw": "{gw}"', 5)
        self.check("the enrolment service says it issued it", issued is not None,
                   issued[1] if issued else "")
        self.pair(gw, TAG_A)
        self.provision_check(gw)
        self.daemon_a = self.run_daemon(gw)
        self.authorise(gw, TAG_A, "SJ-QC-0101")
        self.wait(f"{gw}'s tag readings at the platform",
                  lambda: self.report(gw)["kinds"].get("tag.interval", 0) >= 1)
        rep = parse_report(self.ingest(f"{gw}: what the platform holds", "report", "--db",
                                       self.db_url, "--gw", gw).stdout)
        self.t.facts["a.report_running"] = rep
        self.check("records stored, each verified (no chain gap, nothing quarantined)",
                   rep["records"] > 0 and rep["gaps_unexplained"] == []
                   and rep["chain_breaks"] == [] and rep["quarantined"] == {},
                   f"{rep['records']} records, seqs {rep['stored_ranges']}")
        self.check("its enrolment is a record at the platform",
                   rep["kinds"].get("enrol.completed") == 1, json.dumps(rep["kinds"]))

    def gateway_b(self) -> None:
        gw = GW_B
        self.section = f"Gateway B ({gw}): offline, by USB stick"
        self.init(gw)
        self.sim_b = self.plug_tag_receiver(gw, TAG_B)
        self.configure(gw)
        step = self.gateway(
            f"{gw}: the token already used is refused", "provision", "enrol",
            "--identity-dir", str(self.identity(gw)), "--claim", "-", "--broker",
            f"127.0.0.1:{self.bootstrap_port}", "--ca", str(self.root / "kit" / "broker-ca.crt"),
            "--bootstrap-password-file", str(self.root / "kit" / "bootstrap.pass"),
            "--operator", INSTALLER, "--timeout", "30", stdin=self.token() + "\n",
            stdin_note=f"the token {GW_A} was enrolled with (the wrong work order)", expect=1)
        self.check("refused claim_used", "FAILED (claim_used)" in step.stderr,
                   step.stderr.strip().splitlines()[-1] if step.stderr.strip() else "")
        self.check("nothing is installed", not (self.identity(gw) / "tls.crt").exists())
        usb = self.root / "usb" / gw
        self.gateway(f"{gw}: write the request to the USB stick", "provision", "enrol",
                     "--identity-dir", str(self.identity(gw)), "--request-out", str(usb),
                     "--operator", INSTALLER)
        self.section = f"Gateway B ({gw}): the USB stick at the platform"
        self.ingest(f"{gw}: answer the request", "ca", "sign", str(usb), "--ca-dir",
                    str(self.root / "platform" / "ca"), "--db", self.db_url,
                    "--command-keys", str(self.root / "platform" / "command-export"))
        self.section = f"Gateway B ({gw}): back on site"
        self.gateway(f"{gw}: install the answer", "provision", "enrol", "--identity-dir",
                     str(self.identity(gw)), "--answer", str(usb), "--ca-fingerprint",
                     self.t.facts["ca_fingerprint"], "--config", str(self.config(gw)),
                     "--operator", INSTALLER)
        self.check("the certificate is installed", (self.identity(gw) / "tls.crt").is_file())
        self.t.facts["b.serial"] = serial_of(self.identity(gw) / "tls.crt")
        self.pair(gw, TAG_B)
        self.provision_check(gw)
        self.daemon_b = self.run_daemon(gw)
        self.authorise(gw, TAG_B, "SJ-QC-0102")
        self.wait(f"{gw}'s tag readings at the platform",
                  lambda: self.report(gw)["kinds"].get("tag.interval", 0) >= 1)
        rep = parse_report(self.ingest(f"{gw}: what the platform holds", "report", "--db",
                                       self.db_url, "--gw", gw).stdout)
        self.t.facts["b.report_running"] = rep
        self.check("records stored, each verified", rep["records"] > 0
                   and rep["gaps_unexplained"] == [] and rep["quarantined"] == {},
                   f"{rep['records']} records")

    def operate(self) -> None:
        a, b = GW_A, GW_B
        self.section = "Operations: renewal"
        since = len(self.daemon_a.lines)
        renewed = self.gateway(
            f"{a}: renew the certificate now", "provision", "renew", "--config",
            str(self.config(a)), "--operator", TECHNICIAN,
            note="With the daemon running: the command asks it, and it renews over its own "
                 "uplink (it renews by itself from 30 days before expiry anyway).")
        after = serial_of(self.identity(a) / "tls.crt")
        self.t.facts["a.serial_renewed"] = after
        self.check("the certificate's serial changed",
                   after != self.t.facts["a.serial_enrolled"],
                   f"{self.t.facts['a.serial_enrolled']} -> {after}")
        # the uplink looks at its files at once after a renewal (then every 15 s), and
        # reconnects with them once they stayed still for 2 s
        took = self.daemon_a.wait_line("the TLS files changed and check clean", WAIT_S,
                                       since=since)
        self.check("the uplink reconnected with the renewed certificate", took is not None,
                   took[1] if took else "")
        assert took is not None  # noqa: S101 (checked above)
        self.t.facts["a.reconnect_after_renewal_s"] = round(
            took[0] - (self._ended[id(renewed)]), 2)
        before = self.report(a)["records"]
        self.wait(f"{a}'s records after its reconnection (its tag's next interval)",
                  lambda: self.report(a)["records"] >= before + 1,
                  timeout=max(WAIT_S, 3 * LAB_INTERVAL_MAX_S))
        self.t.facts["a.records_after_renewal"] = (before, self.report(a)["records"])
        self.check("records keep arriving over the new connection", True,
                   f"{before} -> {self.t.facts['a.records_after_renewal'][1]} records at "
                   "the platform")
        listed = self.ingest(f"{a}: its certificates", "ca", "list", "--db", self.db_url,
                             "--gw", a)
        self.check("both certificates are listed", self.t.facts["a.serial_enrolled"]
                   in listed.stdout and after in listed.stdout)

        self.commands()

        # B is revoked (a unit reported stolen)
        self.section = "Operations: revocation"
        crl = self.root / "platform" / "ca" / "crl.pem"  # the broker's crlfile
        self.ingest(f"{b}: revoke it", "ca", "revoke", "--db", self.db_url, "--gw", b,
                    "--reason", "key_compromise")
        self.ingest("write the broker's CRL (daily, and after each revocation)", "ca", "crl",
                    "--ca-dir", str(self.root / "platform" / "ca"), "--db", self.db_url,
                    "--out", str(crl))
        since_broker = len(self.broker.lines)
        self._signal_step("reload the broker (systemctl reload mosquitto)", self.broker,
                          signal.SIGHUP)
        reloaded = self.broker.wait_line("Reloading config", 5, since=since_broker)
        self.check("mosquitto reloaded its configuration and the CRL", reloaded is not None,
                   reloaded[1] if reloaded else "")
        self.wait(f"{b}'s records quarantined as revoked",
                  lambda: self.report(b)["quarantined"].get("revoked", 0) > 0)
        rep = parse_report(self.ingest(f"{b}: what the platform holds now", "report", "--db",
                                       self.db_url, "--gw", b).stdout)
        self.t.facts["b.report_revoked"] = rep
        self.check("its records sent since are quarantined 'revoked', not stored",
                   rep["status"] == "revoked" and rep["quarantined"].get("revoked", 0) > 0,
                   f"status {rep['status']}, quarantined {rep['quarantined']}, "
                   f"{rep['records']} stored (from before)")
        # its open connection stays open: the unit restarts (a power cut, a reboot)
        restart = self._signal_step(f"{b}: the unit restarts (systemctl restart "
                                    "smartcorr-gateway)", self.daemon_b, signal.SIGTERM,
                                    wait=True)
        restart.note = ("The broker's reload cut no connection (mosquitto does not): what B "
                        "sent over its open one since the revocation was quarantined above. "
                        "Once it connects again (a reboot, a network drop), the broker "
                        "refuses its certificate.")
        since_broker = len(self.broker.lines)
        self.daemon_b2 = self.run_daemon(b, f"{b}: the gateway after its restart")
        # the refusal's words: under TLS 1.3 one attempt may see only the broker's close
        # (its alert lost as the close crossed the CONNECT), said first as a close
        refused = self.daemon_b2.wait_line(
            "uplink cannot connect: .*refused this gateway's certificate", 15)
        self.check("its uplink is refused by the broker, said at once", refused is not None,
                   refused[1] if refused else "")
        tls = self.broker.wait_line("certificate verify failed|certificate revoked", 5,
                                    since=since_broker)
        self.check("the broker refused its certificate at the TLS handshake", tls is not None,
                   tls[1] if tls else "")
        self.t.facts["b.tls_refused"] = tls is not None
        self.t.facts["b.refused_line"] = refused[1] if refused else ""
        self.wait(f"{b}'s state file", lambda: self.state(b) is not None, 10)
        state = self.state(b)
        assert state is not None  # noqa: S101 (awaited above)
        first = state["records"]  # the daemon's state file, as 'status' reads it
        self.wait(f"{b} committing more readings (its tag's next interval)",
                  lambda: self.sealed(b) >= first["sealed"] + 1,
                  timeout=max(WAIT_S, 3 * LAB_INTERVAL_MAX_S))
        second = self.status(b, "its state, refused")["records"]
        self.t.facts["b.records_while_refused"] = (first, second)
        self.check("its store keeps committing readings, none forwarded",
                   second["sealed"] > first["sealed"] and second["forwarded"] == 0,
                   f"sealed {first['sealed']} -> {second['sealed']}, forwarded "
                   f"{second['forwarded']}")

    def command(self, title: str, key: Path, *args: str, gw: str = GW_A, **kw: Any) -> Step:
        p = self.root / "platform"
        return self.ingest(title, "command", "--db", self.db_url, "--gw", gw, "--key",
                           str(key), "--broker", f"127.0.0.1:{self.broker_port}", "--ca",
                           str(p / "ca" / "ca.crt"), "--tls-cert",
                           str(p / "commands" / f"{COMMAND_CN}.crt"), "--tls-key",
                           str(p / "commands" / f"{COMMAND_CN}.key"), "--timeout", "20",
                           *args, **kw)

    def commands(self) -> None:
        """A command signed by the platform's command key is applied; one signed by a key
        the root never certified is refused, with a record saying why."""
        a = GW_A
        self.section = "Operations: a command from the platform"
        ok = self.command(f"{a}: a signed command", self.root / "platform" / "command-key",
                          "set-config", "--setting", "health_interval_s", "--value", "600",
                          note="Signed by the command key the root certified (step 3), "
                               "published with the command publisher's certificate.")
        self.check("applied", "applied" in ok.stdout, ok.stdout.strip().splitlines()[0]
                   if ok.stdout.strip() else "")
        thief = self.root / "thief"
        self.ingest("someone makes a root of their own", "command-root", "init", "--out",
                    str(thief / "command-root"),
                    note="Someone with access to the command publisher (an insider, a "
                         "stolen certificate) but not to the offline root.")
        self.ingest("and certifies a command key with it", "command-key", "issue", "--root",
                    str(thief / "command-root"), "--region", "*", "--days", "30", "--out",
                    str(thief / "command-key"))
        bad = self.command(f"{a}: a command signed by a key the root did not certify",
                           thief / "command-key", "set-config", "--setting",
                           "health_interval_s", "--value", "60", expect=1)
        self.check("refused unknown_key, with a record", "unknown_key" in bad.stdout
                   + bad.stderr, (bad.stdout + bad.stderr).strip().splitlines()[0]
                   if (bad.stdout + bad.stderr).strip() else "")

    def status(self, gw: str, what: str) -> dict[str, Any]:
        """``gateway.py status`` shown; the numbers from the same state file, as it stood."""
        self.wait(f"{gw}'s state file", lambda: self.state(gw) is not None, 10)
        self.gateway(f"{gw}: {what}", "status", "--config", str(self.config(gw)))
        state = self.state(gw)
        assert state is not None  # noqa: S101 (awaited above)
        return state

    def state(self, gw: str) -> dict[str, Any] | None:
        """The running daemon's state file (app/state.py), or None."""
        try:
            state: dict[str, Any] = json.loads(
                (self.gw_dir(gw) / "run" / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return state

    def sealed(self, gw: str) -> int:
        state = self.state(gw)
        return 0 if state is None else int(state["records"]["sealed"])

    def _signal_step(self, title: str, proc: Background, sig: int, *, wait: bool = False
                     ) -> Step:
        step = self._step(title, ["kill", f"-{signal.Signals(sig).name[3:]}",
                                  str(proc.pid)], "", None)
        started = time.monotonic()
        if wait:
            proc.stop(sig)
        else:
            proc.proc.send_signal(sig)
        step.elapsed_s = time.monotonic() - started
        step.returncode = 0
        return step

    def decommission(self) -> None:
        a, b = GW_A, GW_B
        self.section = "Decommissioning"
        # B first leaves its home: stopped now (it drains for 5 s, in vain), decommissioned
        # below once it has stopped
        stop_b = self._signal_step(f"{b}: stop the gateway (systemctl stop "
                                   "smartcorr-gateway)", self.daemon_b2, signal.SIGTERM)
        step = self.gateway(f"{a}: decommission it", "provision", "decommission", "--config",
                            str(self.config(a)), "--operator", INSTALLER, "--yes",
                            "--timeout", "30",
                            note="--yes: a script's answer to the question (on a terminal "
                                 "it asks for the gateway id).")
        final = re.search(r"final record \(seq (\d+)\)", step.stdout)
        self.check("its final record and everything before it were delivered",
                   final is not None, step.stdout.strip())
        assert final is not None  # noqa: S101 (checked above)
        self.t.facts["a.final_seq"] = int(final.group(1))
        code = self.daemon_a.proc.wait(WAIT_S)
        self.daemon_a.finish(code)
        self.check("the daemon stopped by itself with status 3", code == 3, str(code))
        left = sorted(f.name for f in self.identity(a).iterdir())
        self.t.facts["a.identity_left"] = left
        self.check("its keys are gone", not any(
            (self.identity(a) / f).exists() for f in
            ("signing.key", "storage.key", "tls.key", "tags.json")), ", ".join(left))
        rep = parse_report(self.ingest(f"{a}: what the platform holds at the end", "report",
                                       "--db", self.db_url, "--gw", a).stdout)
        self.t.facts["a.report_final"] = rep
        self.check("the platform holds its final record as the end of its chain",
                   rep["final_seq"] == self.t.facts["a.final_seq"]
                   and rep["kinds"].get("gateway.decommissioned") == 1
                   and rep["gaps_unexplained"] == [],
                   f"final_seq {rep['final_seq']}, highest seq {rep['highest_seq']}, "
                   f"status {rep['status']}")

        code = self.daemon_b2.finish(self.daemon_b2.proc.wait(WAIT_S))
        last = self.daemon_b2.text("stderr")[-1:]
        self.check(f"{b}'s daemon stopped, its readings kept in its store", code == 0
                   and " 0 forwarded" in "".join(last), "".join(last), step=stop_b)
        step = self.gateway(f"{b}: decommission it anyway", "provision", "decommission",
                            "--config", str(self.config(b)), "--operator", INSTALLER, "--yes",
                            "--force", "--timeout", "2",
                            note="Revoked, it cannot deliver its final record: --force "
                                 "destroys the keys anyway and says the platform was not "
                                 "told.")
        told = [line for line in step.stderr.splitlines() if "platform was NOT told" in line]
        self.check("forced, the platform not told", told != [], told[0] if told else "")
        left = sorted(f.name for f in self.identity(b).iterdir())
        self.t.facts["b.identity_left"] = left
        self.check("its keys are gone", not any(
            (self.identity(b) / f).exists() for f in
            ("signing.key", "storage.key", "tls.key", "tags.json")), ", ".join(left))
        self.ingest(f"{b}: the platform's side", "enrol", "--db", self.db_url,
                    "--decommission", b, expect=None,
                    note="What the warning above asks the platform's operator to do (a "
                         "revoked gateway stays revoked: its records are refused either "
                         "way).")
        self.t.facts["b.report_final"] = self.report(b)

        self.section = "The end"
        for proc in (self.sim_a, self.sim_b):
            self._signal_step(f"unplug {proc.step.title.split(':')[0]}'s tag receiver", proc,
                              signal.SIGTERM, wait=True)
        self._signal_step("stop the ingest consumer", self.consumer, signal.SIGTERM,
                          wait=True)
        self._signal_step("stop the enrolment service", self.enrol_service, signal.SIGTERM,
                          wait=True)
        self._signal_step("stop the broker", self.broker, signal.SIGTERM, wait=True)




def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# -- the transcript ------------------------------------------------------------------------





def render(t: Transcript) -> str:
    when = t.started.strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [
        "# The installer's flow, end to end: a real run",
        "",
        f"Written by `python -m lab.installer_flow --out docs/installer-transcript.md` on "
        f"{when}, in {t.elapsed_s:.0f} s; `tests/test_installer_flow.py` runs the same flow "
        "and checks each step. Every command below ran as shown, in a process of its own, "
        "on loopback; what follows each is its real output (long outputs abbreviated, "
        "marked `[…]`). `$FLOW` is the run's temporary directory "
        f"(`{t.root}`); times are UTC; ids, serials and fingerprints are those of the run.",
        "",
        "A process that keeps running (the broker, the platform's services, the tag "
        "receivers, the gateways' daemons) shows under the step that started it everything "
        "it printed until it was stopped; `kill` stands for what systemd does "
        "(`systemctl reload`, `restart`, `stop`). The ✔ lines are the checks the flow made "
        "of each step (files, the platform's database, the processes' output).",
        "",
        "The lab stands in for the hardware only: the tag receivers are simulators on "
        "pseudo-terminals, and the identity keys are files (`--no-tpm`) where a real "
        "unit uses its TPM. Everything else is the product: the platform's `ingest` "
        "commands, a real mosquitto with TLS, the ACL, the bootstrap listener and the CRL, "
        "the gateway's `gateway.py` commands and its daemon.",
        "",
    ]
    if t.error:
        out += [f"**The flow stopped: {t.error}**", ""]
    section = None
    for n, step in enumerate(t.steps, 1):
        if step.section != section:
            section = step.section
            out += [f"## {section}", ""]
        out += [f"### {n}. {step.title}", ""]
        if step.note:
            out += [step.note.replace(str(t.root), FLOW_VAR), ""]
        meta = [step.started.strftime("%H:%M:%S")]
        if step.background:
            meta.append("runs in the background" + (
                "" if step.returncode is None else
                f"; stopped after {step.elapsed_s:.1f} s, exit status {step.returncode}"))
        elif step.elapsed_s is not None:
            meta.append(f"{step.elapsed_s:.1f} s, exit status {step.returncode}")
        shown = f"$ {step.command}"
        if step.stdin:
            shown += f"\n[stdin: {step.stdin}]"
        out += [" · ".join(meta), "", fence(shown, "console"), ""]
        for name, text in (("output", step.stdout), ("standard error", step.stderr)):
            if text.strip():
                out += [f"{name}:" if step.stdout.strip() and step.stderr.strip() else "",
                        fence(CUT.apply(text.replace(str(t.root), FLOW_VAR),
                                            whole=step.full)), ""]
        for path, content in step.files:
            out += [f"`{path}`:", "", fence(content.replace(str(t.root), FLOW_VAR).rstrip()),
                    ""]
        for check in step.checks:
            mark = "✔" if check.ok else "✘"
            detail = check.detail.replace(str(t.root), FLOW_VAR)
            out.append(f"- {mark} {check.what}" + (f": `{detail}`" if detail else ""))
        if step.checks:
            out.append("")
    out += ["## Summary", "",
            f"{len(t.steps)} steps, {len(t.checks)} checks, "
            f"{sum(not c.ok for c in t.checks)} failed; {t.elapsed_s:.0f} s in all.", ""]
    return "\n".join(line for line in out if line is not None).replace("\n\n\n", "\n\n")


def run_flow(root: Path | None = None) -> Transcript:
    """Run the flow in *root* (a new temporary directory if None, removed after)."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        return Flow(root).run()
    with tempfile.TemporaryDirectory(prefix="installer-flow-") as tmp:
        return Flow(Path(tmp)).run()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.installer_flow",
        description="Run the installer's flow end to end (a platform, a real mosquitto, two "
                    "gateways) in a temporary directory and print its transcript (Markdown).")
    ap.add_argument("--out", type=Path, metavar="FILE",
                    help="write the transcript to FILE instead of standard output")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="run in DIR (kept afterwards) instead of a temporary directory")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (ok, error, elapsed_s, steps, checks, facts) "
                         "instead of the transcript (with --out, the transcript still goes "
                         "to FILE)")
    args = ap.parse_args(argv)
    problem = keep_dir_problem(args.keep)
    if problem is not None:
        print(f"{ap.prog}: {problem}", file=sys.stderr)
        return 2
    try:
        transcript = run_flow(args.keep)
    except FlowError as exc:
        transcript = exc.transcript
    except UserError as exc:
        print(f"{ap.prog}: {exc}", file=sys.stderr)
        return 2
    text = transcript.markdown()
    if args.out is not None:
        args.out.write_text(text)
    if args.json:
        print(json.dumps({"ok": transcript.ok, "error": transcript.error,
                          "elapsed_s": round(transcript.elapsed_s, 1),
                          "steps": len(transcript.steps), "checks": len(transcript.checks),
                          "facts": transcript.facts}, sort_keys=True, default=str))
    elif args.out is None:
        print(text)
    if transcript.error:
        print(f"{ap.prog}: FAILED: {transcript.error}", file=sys.stderr)
    return 0 if transcript.ok else 1


if __name__ == "__main__":
    sys.exit(main())
