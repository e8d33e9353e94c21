"""The device's hardening, checked: what ``provision check`` can verify of the profile in
docs/hardening.md (ETSI EN 303 645), by reading files under a root directory.

API (for ``app/check.py``)::

    hardening_findings(root: Path = Path("/")) -> list[Finding]

Each :class:`Finding` has ``name`` (a stable identifier, below), ``status`` (``"pass"``,
``"warn"`` or ``"fail"``), ``ok`` (False only for ``fail``), ``detail`` (what was found,
one line, no personal data, no key material) and ``fix`` (what to do, None on a pass);
``to_json()`` gives ``{"name", "status", "detail", "fix"}``. The findings, in order:

- ``ssh-passwords``: sshd takes no password (PasswordAuthentication and
  KbdInteractiveAuthentication ``no``, no Match block turning them on, no empty
  passwords), read from ``etc/ssh/sshd_config`` and what it includes, as sshd does (the
  first value obtained wins). No sshd_config: no SSH server, a pass.
- ``ssh-root-login``: PermitRootLogin ``no`` (a warning for key-only root logins: the
  journal of local actions would name root, not the technician).
- ``serial-console``: no ``console=`` on a serial port in the Raspberry Pi's
  ``boot/firmware/cmdline.txt`` (or ``boot/cmdline.txt``), in the running kernel's
  ``/proc/cmdline`` when *root* is ``/``, and no ``serial-getty@`` enabled.
- ``default-passwords``: no account with an empty password, nor one of
  :data:`DEFAULT_PASSWORDS` (checked against ``etc/shadow``'s hashes; needs root to read
  it, a warning otherwise).
- ``service-user``: the ``smartcorr`` user exists, cannot log in (no shell, locked
  password) and is in ``dialout`` (and ``tss``, ``gpio`` where they exist).
- ``service-unit``: the unit is installed and, with its drop-ins, keeps every setting of
  :data:`REQUIRED_UNIT_SETTINGS`; a warning when it differs from the one shipped.
- ``config-dir``: ``etc/smartcorr`` 0750 root:smartcorr, ``gateway.toml`` not readable
  by others.
- ``identity-files``: ``etc/smartcorr/identity`` and everything in it owned by
  ``smartcorr`` (files made by ``provision`` run as root make the daemon fail), the
  directory 0700, secrets (``*.key``, the pairings, the journal) 0600, nothing writable
  by group or others.
- ``data-dir``: ``var/lib/smartcorr`` 0700, owned by ``smartcorr``.
- ``code-integrity``: every file of the installed release (``opt/smartcorr/current``)
  matches its ``SHA256SUMS`` (written by packaging/install.sh), and nothing in it, its
  virtual env included, is writable by anyone but root.
- ``usb-devices``: with ``etc/smartcorr/devices.conf``, its udev rule is installed and
  names each device; says whether unknown USB devices are locked out.

Reading files is the only I/O; the parsers (:func:`sshd_settings`,
:func:`serial_consoles`, :func:`unit_settings`, :func:`unit_problems`) take text.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_PASSWORDS", "REQUIRED_UNIT_SETTINGS", "Finding", "Status",
           "hardening_findings", "serial_consoles", "sshd_settings", "unit_problems",
           "unit_settings"]

SERVICE_USER = "smartcorr"
UNIT = "smartcorr-gateway.service"
#: Passwords no account may have: Raspberry Pi OS's former default, the product's name,
#: and the commonest factory defaults (ETSI EN 303 645 provision 5.1-1).
DEFAULT_PASSWORDS = ("raspberry", "smartcorr", "password", "changeme", "admin", "root")
#: At most this many accounts are tried against :data:`DEFAULT_PASSWORDS` (a hash takes
#: up to 0.1 s on a Raspberry Pi): those able to log in, root first.
MAX_ACCOUNTS_TRIED = 8
#: At most this many files are named in a finding's detail.
MAX_NAMED = 5
#: Files of the release hashed for ``code-integrity``; more is not a release.
MAX_RELEASE_FILES = 5000
#: The shipped unit, beside this code.
SHIPPED_UNIT = Path(__file__).resolve().parents[1] / "packaging" / UNIT

SSH_NO_PASSWORDS = ("PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "PermitEmptyPasswords no\nPermitRootLogin no")
#: ``[Service]`` settings the unit must keep (docs/hardening.md explains each): the
#: value wanted, compared after normalisation (booleans as yes/no). ``""`` for a list
#: setting means "assigned, and empty" (CapabilityBoundingSet=: no capability).
REQUIRED_UNIT_SETTINGS: Mapping[str, str] = {
    "User": SERVICE_USER,
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectProc": "invisible",
    "DevicePolicy": "closed",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "RuntimeDirectoryMode": "0700",
    "StateDirectoryMode": "0700",
}
_LIST_SETTINGS = frozenset({"CapabilityBoundingSet", "SystemCallFilter", "DeviceAllow",
                            "ReadWritePaths", "RestrictAddressFamilies", "IPAddressAllow",
                            "IPAddressDeny"})
_BOOLEAN = {"1": "yes", "true": "yes", "on": "yes", "yes": "yes",
            "0": "no", "false": "no", "off": "no", "no": "no"}
_SERIAL_CONSOLE_RE = re.compile(r"^(serial\d*|ttyAMA\d+|ttyS\d+|ttyUSB\d+|ttyACM\d+)(,.*)?$")
_NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false")
_SECRET_SUFFIXES = (".key", ".journal")
_SECRET_NAMES = frozenset({"tags.json", "kiosks.json"})
_MAX_INCLUDE_DEPTH = 8  # sshd's own limit is 16; a loop ends here
_MAX_CONFIG_BYTES = 1 << 20  # a configuration file longer than this is not read whole


class Status(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - an outcome, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One verifiable item of the hardening profile."""

    name: str
    status: Status
    detail: str
    #: What to do (a warning or a failure); None on a pass.
    fix: str | None = None

    @property
    def ok(self) -> bool:
        """False only for a failure (a warning is advice)."""
        return self.status is not Status.FAIL

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "status": str(self.status), "detail": self.detail,
                "fix": self.fix}


def _pass(name: str, detail: str) -> Finding:
    return Finding(name, Status.PASS, detail)


def _warn(name: str, detail: str, fix: str) -> Finding:
    return Finding(name, Status.WARN, detail, fix)


def _fail(name: str, detail: str, fix: str) -> Finding:
    return Finding(name, Status.FAIL, detail, fix)


def _named(paths: Iterable[str]) -> str:
    items = list(paths)
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


# -- reading under the root ---------------------------------------------------------------------
class _Root:
    """Paths under the inspected root; reads that fail are None."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def text(self, absolute: str | Path) -> str | None:
        path = absolute if isinstance(absolute, Path) else self.path(absolute)
        try:
            with path.open("rb") as f:
                return f.read(_MAX_CONFIG_BYTES).decode("utf-8", "replace")
        except OSError:
            return None

    def readable(self, absolute: str) -> bool:
        return os.access(self.path(absolute), os.R_OK)

    def glob(self, pattern: str) -> list[Path]:
        """An absolute glob pattern, matched under the root, sorted (as sshd and systemd)."""
        parent = self.path(str(Path(pattern).parent))
        try:
            names = sorted(p.name for p in parent.iterdir())
        except OSError:
            return []
        return [parent / n for n in names if fnmatch.fnmatchcase(n, Path(pattern).name)]

    def passwd(self) -> dict[str, tuple[int, int, str]]:
        """name -> (uid, gid, shell)."""
        out: dict[str, tuple[int, int, str]] = {}
        for fields in _colon_file(self.text("/etc/passwd")):
            if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
                out[fields[0]] = (int(fields[2]), int(fields[3]), fields[6])
        return out

    def groups(self) -> dict[str, tuple[int, list[str]]]:
        """name -> (gid, members)."""
        out: dict[str, tuple[int, list[str]]] = {}
        for fields in _colon_file(self.text("/etc/group")):
            if len(fields) >= 4 and fields[2].isdigit():
                out[fields[0]] = (int(fields[2]), [m for m in fields[3].split(",") if m])
        return out


def _colon_file(text: str | None) -> Iterator[list[str]]:
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            yield line.split(":")


# -- sshd ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SshdSettings:
    """The values sshd would use (keywords lower-case), and those set inside Match blocks."""

    values: dict[str, str]
    in_match: dict[str, list[str]]

    def get(self, keyword: str, default: str) -> str:
        return self.values.get(keyword.lower(), default).lower()


def sshd_settings(text: str, include: Callable[[str], list[str]] | None = None) -> SshdSettings:
    """sshd_config's effective values: the first value obtained for a keyword wins,
    ``Include`` is read in place (*include* returns the texts a pattern names, relative
    patterns under /etc/ssh), and what follows a ``Match`` line applies only to some
    connections (kept apart in ``in_match``)."""
    values: dict[str, str] = {}
    in_match: dict[str, list[str]] = {}

    def walk(text: str, depth: int, matching: bool) -> bool:
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"\s*=\s*|\s+", line, maxsplit=1)
            keyword = parts[0].lower()
            argument = parts[1].strip() if len(parts) > 1 else ""
            if keyword == "match":
                matching = argument.lower() != "all"
                continue
            if keyword == "include" and include is not None and depth < _MAX_INCLUDE_DEPTH:
                for pattern in argument.split():
                    for included in include(pattern):
                        matching = walk(included, depth + 1, matching)
                continue
            first = argument.split()[0] if argument else ""
            if matching:
                in_match.setdefault(keyword, []).append(first)
            else:
                values.setdefault(keyword, first)
        return matching

    walk(text, 0, False)
    return SshdSettings(values, in_match)


def _ssh_findings(root: _Root) -> list[Finding]:
    text = root.text("/etc/ssh/sshd_config")
    if text is None:
        detail = "no SSH server (no /etc/ssh/sshd_config)"
        return [_pass("ssh-passwords", detail), _pass("ssh-root-login", detail)]

    def include(pattern: str) -> list[str]:
        absolute = pattern if pattern.startswith("/") else f"/etc/ssh/{pattern}"
        return [t for p in root.glob(absolute) if (t := root.text(p)) is not None]

    cfg = sshd_settings(text, include)
    snippet = f"/etc/ssh/sshd_config.d/10-smartcorr.conf: {SSH_NO_PASSWORDS!r}, then " \
              "sudo systemctl reload ssh (docs/hardening.md, 5.1)"
    problems = []
    for keyword in ("PasswordAuthentication", "KbdInteractiveAuthentication"):
        # ChallengeResponseAuthentication is KbdInteractiveAuthentication's old name
        value = cfg.get(keyword, "") or (cfg.get("ChallengeResponseAuthentication", "yes")
                                         if keyword.startswith("Kbd") else "yes")
        if value != "no":
            problems.append(f"{keyword} {value}")
        if "yes" in (v.lower() for v in cfg.in_match.get(keyword.lower(), [])):
            problems.append(f"{keyword} yes in a Match block")
    if cfg.get("PermitEmptyPasswords", "no") != "no":
        problems.append("PermitEmptyPasswords yes")
    out = [_fail("ssh-passwords", "sshd accepts passwords: " + ", ".join(problems), snippet)
           if problems else _pass("ssh-passwords", "sshd takes keys only")]
    root_login = cfg.get("PermitRootLogin", "prohibit-password")
    if root_login == "no":
        out.append(_pass("ssh-root-login", "PermitRootLogin no"))
    elif root_login in ("prohibit-password", "without-password", "forced-commands-only"):
        out.append(_warn("ssh-root-login", f"root may log in with a key (PermitRootLogin "
                                           f"{root_login}): the journal of local actions "
                                           "then names root, not the technician",
                         "PermitRootLogin no; technicians log in as themselves and use sudo"))
    else:
        out.append(_fail("ssh-root-login", f"PermitRootLogin {root_login}", snippet))
    return out


# -- the serial console ----------------------------------------------------------------------
def serial_consoles(cmdline: str) -> list[str]:
    """The ``console=`` arguments of a kernel command line that name a serial port."""
    return [arg for arg in cmdline.split()
            if arg.startswith("console=") and _SERIAL_CONSOLE_RE.match(arg[len("console="):])]


def _serial_finding(root: _Root) -> Finding:
    name = "serial-console"
    fix = ("sudo raspi-config nonint do_serial_cons 1 (or remove console=serial0,... from "
           "/boot/firmware/cmdline.txt), sudo systemctl disable --now serial-getty@ttyAMA0, "
           "reboot (docs/hardening.md)")
    problems = []
    where = None
    for candidate in ("/boot/firmware/cmdline.txt", "/boot/cmdline.txt"):
        text = root.text(candidate)
        if text is not None:
            where = candidate
            problems += [f"{c} in {candidate}" for c in serial_consoles(text)]
            break
    if root.root == Path("/"):
        running = root.text("/proc/cmdline")
        if running is not None:
            problems += [f"{c} in the running kernel's command line"
                         for c in serial_consoles(running)]
    for wants in ("getty.target.wants", "multi-user.target.wants"):
        problems += [f"{p.name} enabled" for p in
                     root.glob(f"/etc/systemd/system/{wants}/serial-getty@*.service")]
    if problems:
        return _fail(name, "a login console on a serial port: " + _named(problems), fix)
    if where is None:
        return _warn(name, "no /boot/firmware/cmdline.txt: not a Raspberry Pi boot partition, "
                           "so the next boot's console could not be checked",
                     "check the kernel command line of this board for console=ttyS*/ttyAMA*")
    return _pass(name, f"no serial console ({where}, no serial-getty enabled)")


# -- accounts ------------------------------------------------------------------------------------
def _crypt() -> Callable[[str, str], str | None] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
    except ImportError:  # Python 3.13 dropped it
        return None
    return crypt.crypt


def _password_finding(root: _Root) -> Finding:
    name = "default-passwords"
    text = root.text("/etc/shadow")
    if text is None:
        return _warn(name, "cannot read /etc/shadow: account passwords not checked",
                     "run the check as root (sudo)")
    empty, defaults, hashed = [], [], []
    for fields in _colon_file(text):
        if len(fields) < 2:
            continue
        account, hash_ = fields[0], fields[1]
        if hash_ == "":
            empty.append(account)
        elif hash_.startswith("$"):  # a usable hash ('!', '*': locked)
            hashed.append((account, hash_))
    hashed.sort(key=lambda a: a[0] != "root")
    crypt = _crypt()
    tried = hashed[:MAX_ACCOUNTS_TRIED] if crypt is not None else []
    if crypt is not None:
        defaults = [account for account, hash_ in tried
                    if any(crypt(word, hash_) == hash_ for word in DEFAULT_PASSWORDS)]
    fix = "sudo passwd -l ACCOUNT (keys only) or set a unique password; sudo passwd -d " \
          "never (docs/hardening.md, 5.1)"
    if empty or defaults:
        parts = ([f"no password: {_named(empty)}"] if empty else []) + \
                ([f"a well-known default password: {_named(defaults)}"] if defaults else [])
        return _fail(name, "; ".join(parts), fix)
    checked = f"{len(tried)} account(s) with a password" if crypt is not None else \
        "no crypt module: default passwords not tried"
    return _pass(name, f"no empty password; none of the {len(DEFAULT_PASSWORDS)} well-known "
                       f"defaults ({checked})")


def _user_finding(root: _Root) -> Finding:
    name = "service-user"
    fix = "sudo packaging/install.sh (it makes the user and its groups)"
    users = root.passwd()
    if SERVICE_USER not in users:
        return _fail(name, f"no {SERVICE_USER} user", fix)
    problems = []
    _, _, shell = users[SERVICE_USER]
    if shell not in _NOLOGIN_SHELLS:
        problems.append(f"login shell {shell}")
    shadow = root.text("/etc/shadow")
    for fields in _colon_file(shadow):
        if fields[0] == SERVICE_USER and len(fields) > 1 and not fields[1].startswith(("!", "*")):
            problems.append("a usable password")
    groups = root.groups()
    for group in ("dialout", "tss", "gpio"):
        if group in groups and SERVICE_USER not in groups[group][1]:
            problems.append(f"not in {group}")
    if problems:
        return _fail(name, f"{SERVICE_USER}: " + ", ".join(problems), fix)
    member = [g for g in ("dialout", "tss", "gpio") if g in groups]
    return _pass(name, f"{SERVICE_USER}: no login, in {', '.join(member)}")


# -- the unit ------------------------------------------------------------------------------------
def unit_settings(texts: Iterable[str], section: str = "Service") -> dict[str, list[str]]:
    """Each key of *section* in a unit file and its drop-ins (in order) with its
    assignments, an empty assignment resetting the list before it (as systemd does)."""
    out: dict[str, list[str]] = {}
    for text in texts:
        current = None
        for raw in text.replace("\\\n", " ").splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            if current != section or "=" not in line:
                continue
            key, value = (s.strip() for s in line.split("=", 1))
            if value == "":
                out[key] = [""]
            else:
                out.setdefault(key, [])
                out[key] = [v for v in out[key] if v != ""] + [value]
    return out


def _effective(key: str, assignments: list[str]) -> str:
    if key in _LIST_SETTINGS:
        return " ".join(a for a in assignments if a)
    value = assignments[-1]
    return _BOOLEAN.get(value.lower(), value)


def unit_problems(settings: Mapping[str, list[str]]) -> list[str]:
    """The required settings a unit's effective settings lack or weaken."""
    problems = []
    for key, wanted in REQUIRED_UNIT_SETTINGS.items():
        if key not in settings:
            problems.append(f"{key}= missing")
            continue
        have = _effective(key, settings[key])
        if key == "SystemCallFilter":
            first = settings[key][0] if settings[key] else ""
            if wanted not in first.split() or first.startswith("~"):
                problems.append(f"SystemCallFilter= does not start from {wanted}")
        elif have != wanted:
            problems.append(f"{key}={have or '(empty)'} (wanted {wanted or 'empty'})")
    return problems


def _unit_finding(root: _Root) -> Finding:
    name = "service-unit"
    fix = "sudo packaging/install.sh, and remove the drop-ins that weaken it"
    unit_path = f"/etc/systemd/system/{UNIT}"
    text = root.text(unit_path)
    if text is None:
        return _fail(name, f"{unit_path} is not installed",
                     "sudo packaging/install.sh (docs/installing.md)")
    dropins = [p for d in ("/etc/systemd/system", "/run/systemd/system")
               for p in root.glob(f"{d}/{UNIT}.d/*.conf")]
    texts = [text] + [t for p in dropins if (t := root.text(p)) is not None]
    problems = unit_problems(unit_settings(texts))
    extra = f" with drop-ins {_named(p.name for p in dropins)}" if dropins else ""
    if problems:
        return _fail(name, f"the unit{extra} is weakened: {_named(problems)}", fix)
    shipped = _read_bytes(SHIPPED_UNIT)
    if shipped is not None and shipped.decode("utf-8", "replace") != text:
        return _warn(name, f"every required setting in force{extra}, but {unit_path} differs "
                           "from the one shipped with this code",
                     "sudo packaging/install.sh (re-installs the shipped unit)")
    return _pass(name, f"{len(REQUIRED_UNIT_SETTINGS)} required settings in force{extra}")


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# -- directories and files -----------------------------------------------------------------------
def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _config_finding(root: _Root) -> Finding:
    name = "config-dir"
    fix = "sudo packaging/install.sh --fix-ownership (0750 root:smartcorr; gateway.toml 0640)"
    etc = root.path("/etc/smartcorr")
    st = _lstat(etc)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return _fail(name, "no /etc/smartcorr", "sudo packaging/install.sh")
    gid = root.groups().get(SERVICE_USER, (None, []))[0]
    problems = []
    if stat.S_IMODE(st.st_mode) & 0o027 or st.st_uid != 0 or st.st_gid != gid:
        problems.append(f"/etc/smartcorr is {_mode(st)} {st.st_uid}:{st.st_gid}")
    cfg = _lstat(etc / "gateway.toml")
    if cfg is not None:
        if stat.S_IMODE(cfg.st_mode) & 0o007:
            problems.append(f"gateway.toml is {_mode(cfg)}: readable by others (it holds the "
                            "installed position)")
        if cfg.st_gid != gid and cfg.st_uid != root.passwd().get(SERVICE_USER, (-1,))[0]:
            problems.append("gateway.toml is not readable by the smartcorr group")
    if problems:
        return _fail(name, "; ".join(problems), fix)
    return _pass(name, "/etc/smartcorr 0750 root:smartcorr" +
                 (f", gateway.toml {_mode(cfg)}" if cfg is not None else ""))


def _secret(name: str) -> bool:
    return name.endswith(_SECRET_SUFFIXES) or name in _SECRET_NAMES


def _identity_finding(root: _Root) -> Finding:
    name = "identity-files"
    directory = root.path("/etc/smartcorr/identity")
    st = _lstat(directory)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return _fail(name, "no /etc/smartcorr/identity",
                     "sudo packaging/install.sh, then sudo smartcorr provision init "
                     "(docs/installing.md)")
    uid = root.passwd().get(SERVICE_USER, (-1, -1, ""))[0]
    foreign, loose = [], []
    if st.st_uid != uid:
        foreign.append("identity/")
    if stat.S_IMODE(st.st_mode) & 0o077:
        loose.append(f"identity/ {_mode(st)}")
    count = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        for entry in sorted(dirnames + filenames):
            path = Path(dirpath) / entry
            est = _lstat(path)
            if est is None or stat.S_ISLNK(est.st_mode):
                continue
            count += 1
            rel = str(path.relative_to(directory))
            if est.st_uid != uid:
                foreign.append(rel)
            bits = stat.S_IMODE(est.st_mode)
            if bits & 0o022 or (_secret(entry) and bits & 0o077):
                loose.append(f"{rel} {_mode(est)}")
    if foreign:
        return _fail(name, f"not owned by {SERVICE_USER} (made as root?): {_named(foreign)}: "
                           "the daemon cannot read them and restarts in a loop",
                     "sudo packaging/install.sh --fix-ownership; then run provision "
                     "commands as sudo smartcorr provision ...")
    if loose:
        return _fail(name, f"modes too open: {_named(loose)}",
                     "chmod 700 the directory, 600 the keys (*.key, tags.json, kiosks.json)")
    if count == 0:
        return _pass(name, "empty, 0700 smartcorr: no identity yet (provision init)")
    return _pass(name, f"{count} file(s), all {SERVICE_USER}'s, secrets 0600, directory 0700")


def _data_finding(root: _Root) -> Finding:
    name = "data-dir"
    st = _lstat(root.path("/var/lib/smartcorr"))
    uid = root.passwd().get(SERVICE_USER, (-1, -1, ""))[0]
    if st is None:
        return _fail(name, "no /var/lib/smartcorr", "sudo packaging/install.sh")
    if st.st_uid != uid or stat.S_IMODE(st.st_mode) & 0o077:
        return _fail(name, f"/var/lib/smartcorr is {_mode(st)}, owner uid {st.st_uid}",
                     "sudo packaging/install.sh --fix-ownership (0700 smartcorr)")
    return _pass(name, "/var/lib/smartcorr 0700 smartcorr")


# -- the code --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _code_finding(root: _Root) -> Finding:
    name = "code-integrity"
    current = root.path("/opt/smartcorr/current")
    sums = root.text(current / "SHA256SUMS")
    if sums is None:
        return _fail(name, "no /opt/smartcorr/current/SHA256SUMS: not installed by "
                           "packaging/install.sh", "sudo packaging/install.sh")
    fix = "sudo packaging/install.sh --upgrade from a trusted checkout (a new release), " \
          "then find out who changed the code"
    changed = []
    entries = [line.split(None, 1) for line in sums.splitlines() if line.strip()]
    if len(entries) > MAX_RELEASE_FILES:
        return _fail(name, f"SHA256SUMS lists {len(entries)} files (at most "
                           f"{MAX_RELEASE_FILES}): not a release", fix)
    for digest, listed in (e for e in entries if len(e) == 2):
        rel = listed.lstrip("*")  # sha256sum's binary-mode mark
        outside = ".." in Path(rel).parts or rel.startswith("/")
        if outside or _sha256(current / rel) != digest:
            changed.append(rel)
    writable = []
    release = current.resolve()
    for dirpath, dirnames, filenames in os.walk(release):
        for entry in dirnames + filenames:
            est = _lstat(Path(dirpath) / entry)
            if est is not None and not stat.S_ISLNK(est.st_mode) and \
                    (est.st_uid != 0 or stat.S_IMODE(est.st_mode) & 0o022):
                writable.append(str((Path(dirpath) / entry).relative_to(release)))
    if changed:
        return _fail(name, f"{len(changed)} file(s) differ from the release's SHA256SUMS: "
                           f"{_named(changed)}", fix)
    if writable:
        return _fail(name, f"writable by someone other than root: {_named(writable)}",
                     f"sudo chown -R root:root {release} && sudo chmod -R go-w {release}")
    return _pass(name, f"release {release.name}: {len(entries)} files as installed, "
                       "writable by root only")


# -- USB devices -----------------------------------------------------------------------------------
_DEVICE_NAME_RE = re.compile(r"^([a-z][a-z0-9-]{0,31})\s")


def _usb_finding(root: _Root) -> Finding:
    name = "usb-devices"
    conf = root.text("/etc/smartcorr/devices.conf")
    if conf is None:
        return _pass(name, "no devices.conf: devices by their gateway.toml paths (use "
                           "/dev/serial/by-id/... or stable names, docs/installing.md); "
                           "USB not locked (optional)")
    lines = [line.split("#", 1)[0].strip() for line in conf.splitlines()]
    names = [m.group(1) for line in lines if (m := _DEVICE_NAME_RE.match(line + " "))
             and m.group(1) not in ("usb-allow", "lock-usb")]
    locked = any(line.split()[:2] == ["lock-usb", "yes"] for line in lines)
    rules = root.text("/etc/udev/rules.d/70-smartcorr.rules")
    fix = "sudo packaging/install.sh (it makes the rule from devices.conf)"
    if rules is None:
        return _fail(name, "devices.conf has no udev rule installed", fix)
    missing = [n for n in names if f'SYMLINK+="smartcorr/{n}"' not in rules]
    if missing or (locked and 'ATTR{authorized}="0"' not in rules):
        return _fail(name, "the udev rule is older than devices.conf" +
                     (f" (no {_named(missing)})" if missing else ""), fix)
    parts = [f"/dev/smartcorr/{{{','.join(names)}}}" if names else "no named device"]
    parts.append("unknown USB devices are de-authorized" if locked
                 else "USB not locked (optional)")
    return _pass(name, "; ".join(parts))


def hardening_findings(root: Path = Path("/")) -> list[Finding]:
    """What can be verified of the hardening profile under *root* (module docstring)."""
    r = _Root(root)
    return [*_ssh_findings(r), _serial_finding(r), _password_finding(r), _user_finding(r),
            _unit_finding(r), _config_finding(r), _identity_finding(r), _data_finding(r),
            _code_finding(r), _usb_finding(r)]
