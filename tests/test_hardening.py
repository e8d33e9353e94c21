"""app/hardening.py against directory trees: each finding passes on a hardened device and
fails, naming what is wrong and how to fix it, on one that is not."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest

from app.hardening import (
    SHIPPED_UNIT,
    Finding,
    Status,
    hardening_findings,
    serial_consoles,
    sshd_settings,
    unit_problems,
    unit_settings,
)

AS_ROOT = os.geteuid() == 0
#: The smartcorr user of the trees: a made-up uid as root (files can be given to it), the
#: tester's own otherwise (the files are theirs already).
UID = 4242 if AS_ROOT else os.geteuid()
needs_root = pytest.mark.skipif(not AS_ROOT, reason="files owned by root need root")

DEBIAN_SSHD = """\
# Debian's /etc/ssh/sshd_config: the drop-ins first, so that they win
Include /etc/ssh/sshd_config.d/*.conf
KbdInteractiveAuthentication no
UsePAM yes
"""


def sha512_crypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))


def write(root: Path, rel: str, text: str, mode: int = 0o644, uid: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    if uid is not None and AS_ROOT:
        os.chown(path, uid, UID)
    return path


def make_dir(root: Path, rel: str, mode: int, uid: int, gid: int) -> Path:
    path = root / rel
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if AS_ROOT:
        os.chown(path, uid, gid)
    return path


def hardened(tmp_path: Path) -> Path:
    """A device as docs/hardening.md wants it."""
    root = tmp_path / "root"
    root.mkdir(parents=True)
    write(root, "etc/passwd", f"root:x:0:0:root:/root:/bin/bash\n"
                              f"smartcorr:x:{UID}:{UID}:SmartCorr:/var/lib/smartcorr:"
                              "/usr/sbin/nologin\n"
                              "tech:x:1000:1000::/home/tech:/bin/bash\n")
    write(root, "etc/group", f"root:x:0:\ndialout:x:20:smartcorr\ntss:x:106:smartcorr\n"
                             f"smartcorr:x:{UID}:\n")
    write(root, "etc/shadow", f"root:*:19000::::::\nsmartcorr:!*:19000::::::\n"
                              f"tech:{sha512_crypt('a long and unique one')}:19000::::::\n",
          0o640)
    write(root, "etc/ssh/sshd_config", DEBIAN_SSHD)
    write(root, "etc/ssh/sshd_config.d/10-smartcorr.conf",
          "PasswordAuthentication no\nPermitRootLogin no\n")
    write(root, "boot/firmware/cmdline.txt",
          "console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait\n")
    write(root, "etc/systemd/system/smartcorr-gateway.service", SHIPPED_UNIT.read_text())
    make_dir(root, "etc/smartcorr", 0o750, 0, UID)
    write(root, "etc/smartcorr/gateway.toml", "[gateway]\n", 0o640)
    if AS_ROOT:
        os.chown(root / "etc/smartcorr/gateway.toml", 0, UID)
    identity = make_dir(root, "etc/smartcorr/identity", 0o700, UID, UID)
    for name, mode in (("signing.key", 0o600), ("signing.pub", 0o644),
                       ("tls.key", 0o600), ("gateway.json", 0o644), ("tags.json", 0o600)):
        write(identity, name, name, mode, UID)
    make_dir(root, "var/lib/smartcorr", 0o700, UID, UID)
    release = make_dir(root, "opt/smartcorr/releases/0.1.0-abc", 0o755, 0, 0)
    files = {"gateway.py": "print('gateway')\n", "app/__init__.py": ""}
    for rel, text in files.items():
        write(release, rel, text)
    (release / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(t.encode()).hexdigest()}  {rel}\n" for rel, t in files.items()))
    (root / "opt/smartcorr/current").symlink_to("releases/0.1.0-abc")
    return root


def by_name(root: Path) -> dict[str, Finding]:
    return {f.name: f for f in hardening_findings(root)}


@needs_root
def test_a_hardened_device_passes_everything(tmp_path: Path) -> None:
    found = by_name(hardened(tmp_path))
    assert list(found) == ["ssh-passwords", "ssh-root-login", "serial-console",
                           "default-passwords", "service-user", "service-unit", "config-dir",
                           "identity-files", "data-dir", "code-integrity", "usb-devices"]
    failing = {n: (f.status, f.detail) for n, f in found.items() if f.status is not Status.PASS}
    assert failing == {}
    assert all(f.ok and f.fix is None for f in found.values())
    assert "(1 account(s) with a password)" in found["default-passwords"].detail


def test_finding_json_shape() -> None:
    finding = Finding("ssh-passwords", Status.FAIL, "sshd accepts passwords", "do this")
    assert finding.to_json() == {"name": "ssh-passwords", "status": "fail",
                                 "detail": "sshd accepts passwords", "fix": "do this"}
    assert not finding.ok
    assert Finding("x", Status.WARN, "advice", "fix").ok


# -- sshd -------------------------------------------------------------------------------------
def _ssh(tmp_path: Path, main: str, dropins: dict[str, str] | None = None) -> dict[str, Finding]:
    root = tmp_path / "ssh"
    write(root, "etc/ssh/sshd_config", main)
    for name, text in (dropins or {}).items():
        write(root, f"etc/ssh/sshd_config.d/{name}", text)
    return by_name(root)


def test_ssh_defaults_accept_passwords(tmp_path: Path) -> None:
    found = _ssh(tmp_path, "UsePAM yes\n")
    assert found["ssh-passwords"].status is Status.FAIL
    assert "PasswordAuthentication yes" in found["ssh-passwords"].detail
    assert "KbdInteractiveAuthentication yes" in found["ssh-passwords"].detail
    assert "10-smartcorr.conf" in (found["ssh-passwords"].fix or "")
    assert found["ssh-root-login"].status is Status.WARN  # prohibit-password, sshd's default


def test_ssh_first_value_wins_so_an_included_drop_in_beats_the_main_file(
        tmp_path: Path) -> None:
    found = _ssh(tmp_path, DEBIAN_SSHD + "PasswordAuthentication no\n",
                 {"50-cloud-init.conf": "PasswordAuthentication yes\n"})
    assert found["ssh-passwords"].status is Status.FAIL
    found = _ssh(tmp_path / "b", DEBIAN_SSHD + "PasswordAuthentication yes\n",
                 {"10-smartcorr.conf": "passwordauthentication=no\n"})
    assert found["ssh-passwords"].status is Status.PASS


def test_ssh_match_block_turning_passwords_on_fails(tmp_path: Path) -> None:
    found = _ssh(tmp_path, "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                           "PermitRootLogin no\nMatch Address 10.0.0.0/8\n"
                           "    PasswordAuthentication yes\n")
    assert found["ssh-passwords"].status is Status.FAIL
    assert "in a Match block" in found["ssh-passwords"].detail
    assert found["ssh-root-login"].status is Status.PASS


def test_ssh_old_names_and_empty_passwords(tmp_path: Path) -> None:
    found = _ssh(tmp_path, "PasswordAuthentication no\nChallengeResponseAuthentication no\n"
                           "PermitRootLogin yes\n")
    assert found["ssh-passwords"].status is Status.PASS
    assert found["ssh-root-login"].status is Status.FAIL
    found = _ssh(tmp_path / "b", "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                                 "PermitEmptyPasswords yes\n")
    assert "PermitEmptyPasswords yes" in found["ssh-passwords"].detail


def test_no_ssh_server_passes(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = by_name(tmp_path / "empty")
    assert found["ssh-passwords"].status is Status.PASS
    assert "no SSH server" in found["ssh-passwords"].detail


def test_sshd_settings_include_loop_ends() -> None:
    settings = sshd_settings("Include self\nPermitRootLogin no\n",
                             lambda _pattern: ["Include self\n"])
    assert settings.get("PermitRootLogin", "yes") == "no"


# -- the serial console -----------------------------------------------------------------------
def test_serial_consoles_on_the_command_line() -> None:
    assert serial_consoles("console=serial0,115200 console=tty1 root=/dev/mmcblk0p2") == \
        ["console=serial0,115200"]
    assert serial_consoles("console=ttyAMA0,115200 console=ttyS0") == \
        ["console=ttyAMA0,115200", "console=ttyS0"]
    assert serial_consoles("console=tty1 quiet") == []


def test_serial_console_fails_on_cmdline_or_getty(tmp_path: Path) -> None:
    root = tmp_path / "a"
    write(root, "boot/firmware/cmdline.txt", "console=serial0,115200 console=tty1 rootwait\n")
    finding = by_name(root)["serial-console"]
    assert finding.status is Status.FAIL
    assert "console=serial0,115200 in /boot/firmware/cmdline.txt" in finding.detail
    assert "raspi-config nonint do_serial_cons 1" in (finding.fix or "")
    root = tmp_path / "b"
    write(root, "boot/cmdline.txt", "console=tty1\n")  # before bookworm
    (root / "etc/systemd/system/getty.target.wants").mkdir(parents=True)
    (root / "etc/systemd/system/getty.target.wants/serial-getty@ttyAMA0.service").symlink_to(
        "/lib/systemd/system/serial-getty@.service")
    finding = by_name(root)["serial-console"]
    assert finding.status is Status.FAIL
    assert "serial-getty@ttyAMA0.service" in finding.detail
    root = tmp_path / "c"
    root.mkdir()
    assert by_name(root)["serial-console"].status is Status.WARN  # not a Pi: unchecked


# -- accounts ---------------------------------------------------------------------------------
def test_default_and_empty_passwords_fail(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write(root, "etc/shadow", f"root:*:1::::::\npi:{sha512_crypt('raspberry')}:1::::::\n"
                              f"guest::1::::::\ntech:{sha512_crypt('Kx9-unique')}:1::::::\n")
    finding = by_name(root)["default-passwords"]
    assert finding.status is Status.FAIL
    assert "no password: guest" in finding.detail
    assert "a well-known default password: pi" in finding.detail
    assert "tech" not in finding.detail


def test_unreadable_shadow_is_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    finding = by_name(root)["default-passwords"]
    assert finding.status is Status.WARN
    assert "sudo" in (finding.fix or "")


@needs_root
def test_service_user_must_not_log_in_and_must_reach_the_devices(tmp_path: Path) -> None:
    root = hardened(tmp_path)
    write(root, "etc/passwd", (root / "etc/passwd").read_text().replace(
        "/var/lib/smartcorr:/usr/sbin/nologin", "/var/lib/smartcorr:/bin/bash"))
    write(root, "etc/group", (root / "etc/group").read_text().replace(
        "tss:x:106:smartcorr", "tss:x:106:"))
    finding = by_name(root)["service-user"]
    assert finding.status is Status.FAIL
    assert "login shell /bin/bash" in finding.detail
    assert "not in tss" in finding.detail


# -- the unit ---------------------------------------------------------------------------------
def test_shipped_unit_has_every_required_setting() -> None:
    assert unit_problems(unit_settings([SHIPPED_UNIT.read_text()])) == []


@pytest.mark.parametrize(("dropin", "problem"), [
    ("[Service]\nProtectSystem=full\n", "ProtectSystem=full (wanted strict)"),
    ("[Service]\nCapabilityBoundingSet=CAP_NET_ADMIN\n", "CapabilityBoundingSet=CAP_NET_ADMIN"),
    ("[Service]\nSystemCallFilter=\n", "SystemCallFilter= does not start from @system-service"),
    ("[Service]\nUser=root\n", "User=root (wanted smartcorr)"),
    ("[Service]\nNoNewPrivileges=false\n", "NoNewPrivileges=no (wanted yes)"),
])
def test_a_drop_in_that_weakens_the_unit_fails(tmp_path: Path, dropin: str,
                                               problem: str) -> None:
    root = tmp_path / "r"
    write(root, "etc/systemd/system/smartcorr-gateway.service", SHIPPED_UNIT.read_text())
    write(root, "etc/systemd/system/smartcorr-gateway.service.d/override.conf", dropin)
    finding = by_name(root)["service-unit"]
    assert finding.status is Status.FAIL
    assert problem in finding.detail
    assert "override.conf" in finding.detail


def test_unit_settings_follow_systemd_rules() -> None:
    settings = unit_settings(["[Service]\nNoNewPrivileges=true\nCapabilityBoundingSet=\n"
                              "DeviceAllow=a\n[Install]\nUser=nobody\n",
                              "[Service]\nDeviceAllow=\nDeviceAllow=b\n"])
    assert settings["NoNewPrivileges"] == ["true"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["DeviceAllow"] == ["b"]  # the empty assignment reset the list
    assert "User" not in settings  # [Install] is not [Service]


def test_an_edited_unit_keeping_the_settings_warns(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write(root, "etc/systemd/system/smartcorr-gateway.service",
          SHIPPED_UNIT.read_text().replace("RestartSec=2", "RestartSec=5"))
    finding = by_name(root)["service-unit"]
    assert finding.status is Status.WARN
    assert "differs from the one shipped" in finding.detail


def test_missing_unit_fails(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    finding = by_name(tmp_path / "r")["service-unit"]
    assert finding.status is Status.FAIL
    assert "packaging/install.sh" in (finding.fix or "")


# -- files ------------------------------------------------------------------------------------
@needs_root
def test_root_owned_identity_file_fails_with_the_fix(tmp_path: Path) -> None:
    root = hardened(tmp_path)
    write(root, "etc/smartcorr/identity/storage.key", "k", 0o600, uid=0)  # provision as root
    finding = by_name(root)["identity-files"]
    assert finding.status is Status.FAIL
    assert "storage.key" in finding.detail
    assert "restarts in a loop" in finding.detail
    assert "install.sh --fix-ownership" in (finding.fix or "")


@needs_root
@pytest.mark.parametrize(("rel", "mode"), [("signing.key", 0o640), ("tags.json", 0o644),
                                           ("gateway.json", 0o666)])
def test_loose_identity_modes_fail(tmp_path: Path, rel: str, mode: int) -> None:
    root = hardened(tmp_path)
    (root / "etc/smartcorr/identity" / rel).chmod(mode)
    finding = by_name(root)["identity-files"]
    assert finding.status is Status.FAIL
    assert f"{rel} {mode:04o}" in finding.detail


@needs_root
def test_world_readable_config_and_open_data_dir_fail(tmp_path: Path) -> None:
    root = hardened(tmp_path)
    (root / "etc/smartcorr/gateway.toml").chmod(0o644)
    (root / "var/lib/smartcorr").chmod(0o755)
    found = by_name(root)
    assert found["config-dir"].status is Status.FAIL
    assert "readable by others" in found["config-dir"].detail
    assert found["data-dir"].status is Status.FAIL


@needs_root
def test_changed_or_writable_code_fails(tmp_path: Path) -> None:
    root = hardened(tmp_path)
    release = root / "opt/smartcorr/current"
    (release / "gateway.py").write_text("print('something else')\n")
    finding = by_name(root)["code-integrity"]
    assert finding.status is Status.FAIL
    assert "gateway.py" in finding.detail
    root = hardened(tmp_path / "b")
    (root / "opt/smartcorr/current/app").chmod(0o777)
    finding = by_name(root)["code-integrity"]
    assert finding.status is Status.FAIL
    assert "writable by someone other than root" in \
        finding.detail
    root = hardened(tmp_path / "c")
    (root / "opt/smartcorr/current/SHA256SUMS").unlink()
    assert by_name(root)["code-integrity"].status is Status.FAIL


def test_many_named_files_are_summarised(tmp_path: Path) -> None:
    root = tmp_path / "r"
    release = root / "opt/smartcorr/releases/x"
    release.mkdir(parents=True)
    (release / "SHA256SUMS").write_text("".join(f"{'0' * 64}  f{i}.py\n" for i in range(9)))
    (root / "opt/smartcorr/current").symlink_to("releases/x")
    finding = by_name(root)["code-integrity"]
    assert "9 file(s) differ" in finding.detail
    assert "and 4 more" in finding.detail
