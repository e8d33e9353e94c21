"""Who is acting: the installer or technician behind a local action (issue 9, item 6).

Every command that changes the pairings, stages a key or exports personal data names
its operator: ``--operator NAME [--role ROLE]`` on the command line, or a local
operator file (``--operator-file PATH``; by default ``$SMARTCORR_OPERATOR_FILE``, else
:data:`DEFAULT_OPERATOR_FILE`), JSON ``{"name": …, "role": …, "badge": …}``. The
operating system adds what it knows: the user running the command, the user behind
``sudo`` and the SSH client's address. A name is not a secret (it may be in argv); the
file must not be writable by group or others (anyone could then act in its name).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

ROLES = ("installer", "technician")
#: The operator file when neither ``--operator-file`` nor the environment names one.
DEFAULT_OPERATOR_FILE = Path("/etc/smartcorr/operator.json")
OPERATOR_FILE_ENV = "SMARTCORR_OPERATOR_FILE"
#: Longest name or badge kept (characters), and largest operator file read (bytes).
MAX_FIELD_CHARS = 80
MAX_OPERATOR_FILE_BYTES = 4096
#: Permission bits an operator file must not have: writable by group or others.
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_HOW = ("say who you are: --operator NAME [--role installer|technician], or an operator "
        "file (--operator-file PATH, ${env}, or {default}) holding "
        '{{"name": "…", "role": "installer", "badge": "…"}}')


class OperatorError(UserError):
    """No operator, or an operator file that cannot be trusted; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Operator:
    """A person acting on this gateway, and what the system knows of the session."""

    name: str
    role: str
    badge: str | None
    os_user: str
    sudo_user: str | None = None
    ssh_client: str | None = None
    #: Where the name came from: ``argv`` or the operator file's path.
    origin: str = "argv"

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "role": self.role, "badge": self.badge,
                "os_user": self.os_user, "sudo_user": self.sudo_user,
                "ssh_client": self.ssh_client, "origin": self.origin}


def _optional(value: object, what: str, where: str) -> str | None:
    return None if value is None else _text(value, what, where)


def _text(value: object, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OperatorError(f"{where}: {what} must be a non-empty text")
    text = value.strip()
    if len(text) > MAX_FIELD_CHARS or not text.isprintable():
        raise OperatorError(f"{where}: {what} must be at most {MAX_FIELD_CHARS} printable "
                            "characters")
    return text


def _session(name: str, role: str, badge: str | None, origin: str) -> Operator:
    uid = os.getuid()
    try:
        os_user = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (a container)
        os_user = f"uid:{uid}"
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return Operator(name, role, badge, os_user, os.environ.get("SUDO_USER") or None,
                    ssh[0] if ssh else None, origin)


def _role(value: object, where: str) -> str:
    if value not in ROLES:
        raise OperatorError(f"{where}: role must be one of {', '.join(ROLES)}, got {value!r}")
    return str(value)


def operator_file_path(explicit: str | None) -> tuple[Path, bool]:
    """The operator file to read, and whether it was named (a named file must exist)."""
    if explicit is not None:
        return Path(explicit), True
    env = os.environ.get(OPERATOR_FILE_ENV)
    if env:
        return Path(env), True
    return DEFAULT_OPERATOR_FILE, False


def load_operator_file(path: Path) -> Operator:
    """The operator a file names; refused when group or others may write it."""
    where = f"operator file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise OperatorError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)  # the file opened, not the name: no swap between check and read
        if not stat.S_ISREG(st.st_mode):
            raise OperatorError(f"{where}: not a regular file")
        if st.st_mode & WRITABLE_BY_OTHERS:
            raise OperatorError(
                f"{where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}):"
                f" anyone could act in its name; 'chmod 644 {path}' (or 600) and check it")
        raw = os.read(fd, MAX_OPERATOR_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_OPERATOR_FILE_BYTES:
        raise OperatorError(f"{where}: larger than {MAX_OPERATOR_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OperatorError(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise OperatorError(f'{where}: must be a JSON object {{"name": …, "role": …}}')
    name = _text(doc.get("name"), "'name'", where)
    badge = _optional(doc.get("badge"), "'badge'", where)
    return _session(name, _role(doc.get("role"), where), badge, str(path))


def resolve_operator(name: str | None, role: str | None, operator_file: str | None,
                     *, default_role: str = "installer") -> Operator:
    """The operator of a command: ``--operator NAME`` (with ``--role``, else
    *default_role*), else the operator file. :class:`OperatorError` when there is none."""
    if name is not None:
        return _session(_text(name, "--operator", "command line"),
                        _role(role or default_role, "--role"), None, "argv")
    path, named = operator_file_path(operator_file)
    if not named and not path.exists():
        raise OperatorError(_HOW.format(env=OPERATOR_FILE_ENV, default=DEFAULT_OPERATOR_FILE))
    if named and not path.exists():
        raise OperatorError(f"operator file {path} does not exist; "
                            + _HOW.format(env=OPERATOR_FILE_ENV, default=DEFAULT_OPERATOR_FILE))
    found = load_operator_file(path)
    if role is not None and role != found.role:
        raise OperatorError(f"--role {role} disagrees with operator file {path} (role "
                            f"{found.role}): fix the file or give --operator")
    return found
