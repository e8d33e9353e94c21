"""The service as packaging/ installs it: the unit verified and scored by systemd itself,
packaging/install.sh into a directory tree (modes, owners, idempotence, ownership fixes,
upgrades and rollbacks keeping the configuration, identity and data), the udev rule
parsed by udevadm."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from app.hardening import Status, hardening_findings

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
INSTALL = PACKAGING / "install.sh"
UNIT = PACKAGING / "smartcorr-gateway.service"
HARDENING_DOC = REPO / "docs" / "hardening.md"
#: `systemd-analyze security` may score the unit at most this (0 best, 10 worst; the
#: unit scored 6.6 before issue 13). docs/hardening.md explains every exposure left.
SECURITY_THRESHOLD = 2.0
AS_ROOT = os.geteuid() == 0
BASH = shutil.which("bash") or "/bin/bash"
GIT = shutil.which("git") or "/usr/bin/git"
SHA256SUM = shutil.which("sha256sum") or "/usr/bin/sha256sum"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is not installed "
                                          "(scripts/setup.sh --test installs package systemd)")


def _load_udev_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("udev_rules", PACKAGING / "udev_rules.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["udev_rules"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


udev_rules = _load_udev_rules()


# -- a tree to install into --------------------------------------------------------------------
GROUPS = {"root": 0, "dialout": 20, "tss": 106}


def fresh_root(tmp_path: Path, *, groups: dict[str, int] = GROUPS) -> Path:
    """A root directory with the account files of a fresh Debian: root, and the groups
    dialout and tss (no gpio: its membership must then be left out)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("".join(f"{g}:x:{n}:\n" for g, n in groups.items()))
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "gshadow").write_text("".join(f"{g}:*::\n" for g in groups))
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o640)
    return root


def install(root: Path, *args: str, source: Path = REPO, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([BASH, str(source / "packaging" / "install.sh"), "--root",
                           str(root), "--no-venv", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under *root* with its type, mode, owner, size, mtime and link target."""
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        target = str(path.readlink()) if path.is_symlink() else None
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                            st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                            target)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def account(root: Path, name: str, file: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def source_copy(tmp_path: Path) -> Path:
    """A copy of this checkout's files (no .git: install.sh lists files with find)."""
    src = tmp_path / "src"
    listed = subprocess.run([GIT, "-c", f"safe.directory={REPO}", "-C", str(REPO),
                             "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (r.decode() for r in listed)):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    return src


def findings(root: Path) -> dict[str, Status]:
    return {f.name: f.status for f in hardening_findings(root)}


# -- the unit -------------------------------------------------------------------------------
def unit_in(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at an interpreter that exists (verify checks it),
    in a directory of its own (its drop-ins beside it, as in /etc/systemd/system)."""
    app = tmp_path / "opt" / "current"
    (app / ".venv" / "bin").mkdir(parents=True)
    (app / ".venv" / "bin" / "python").symlink_to(sys.executable)
    units = tmp_path / "units"
    units.mkdir()
    body = (text if text is not None else UNIT.read_text()).replace("/opt/smartcorr/current",
                                                                    str(app))
    (units / UNIT.name).write_text(body)
    return units / UNIT.name


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd="/")


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    proc = analyze("verify", str(unit_in(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == ""


@needs_analyze
def test_verify_catches_a_bad_setting(tmp_path: Path) -> None:
    """The check bites: a misspelt directive is reported."""
    text = UNIT.read_text().replace("ProtectHostname=yes", "ProtectHostName=yes")
    proc = analyze("verify", str(unit_in(tmp_path, text)))
    assert "Unknown key 'ProtectHostName'" in proc.stderr


def _security(unit: Path) -> tuple[float, list[str], str]:
    """The overall exposure and the names of the settings counted against the unit."""
    proc = analyze("security", "--offline=yes", "--no-pager", str(unit))
    assert proc.returncode == 0, proc.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert score, proc.stdout
    exposed = [m.group(1) for m in re.finditer(r"^✗ (\S+?=)", proc.stdout, re.MULTILINE)]
    return float(score.group(1)), exposed, proc.stdout


def _offline_supported() -> bool:
    if SYSTEMD_ANALYZE is None:
        return False
    version = re.search(r"systemd (\d+)", analyze("--version").stdout)
    return version is not None and int(version.group(1)) >= 252


@pytest.mark.skipif(not _offline_supported(),
                    reason="systemd-analyze security --offline needs systemd 252 or later")
def test_security_exposure_at_most_threshold_and_each_exposure_explained(
        tmp_path: Path) -> None:
    score, exposed, report = _security(unit_in(tmp_path))
    assert score <= SECURITY_THRESHOLD, report
    doc = HARDENING_DOC.read_text()
    unexplained = [name for name in exposed if f"`{name}" not in doc]
    assert exposed
    assert not unexplained, f"docs/hardening.md does not explain {unexplained}"
    # the threshold documented is the one tested
    assert f"at most {SECURITY_THRESHOLD}" in doc


@pytest.mark.skipif(not _offline_supported(), reason="needs systemd-analyze --offline")
def test_allow_net_dropin_verifies_and_lowers_the_exposure(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    install(root, "--allow-net", "203.0.113.0/24,2001:db8::/32")
    dropin = root / "etc/systemd/system/smartcorr-gateway.service.d/50-allow-net.conf"
    assert "IPAddressDeny=any" in dropin.read_text()
    assert "IPAddressAllow=203.0.113.0/24 2001:db8::/32" in dropin.read_text()
    unit = unit_in(tmp_path)
    (unit.parent / f"{unit.name}.d").mkdir()
    shutil.copy(dropin, unit.parent / f"{unit.name}.d" / dropin.name)
    proc = analyze("verify", str(unit))
    assert proc.returncode == 0
    assert proc.stderr == ""
    with_list, _, report = _security(unit)
    without, _, plain = _security(unit_in(tmp_path / "plain"))
    assert with_list < without
    assert "does not define an IP address allow list" in plain
    assert "does not define an IP address allow list" not in report
    install(root, "--allow-net", "any")
    assert not dropin.exists()


# -- install.sh ---------------------------------------------------------------------------------
def test_install_makes_the_tree_with_its_modes_and_owners(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    proc = install(root)
    assert "next: sudo smartcorr provision init" in proc.stderr
    etc, identity, data = root / "etc/smartcorr", root / "etc/smartcorr/identity", \
        root / "var/lib/smartcorr"
    assert (mode(etc), mode(identity), mode(data)) == (0o750, 0o700, 0o700)
    assert mode(root / "etc/systemd/system/smartcorr-gateway.service") == 0o644
    assert (root / "etc/systemd/system/smartcorr-gateway.service").read_text() == \
        UNIT.read_text()
    assert mode(root / "usr/local/bin/smartcorr") == 0o755
    assert (root / "etc/smartcorr/devices.conf.example").exists()
    current = root / "opt/smartcorr/current"
    assert str(current.readlink()).startswith("releases/0.1.0-")
    assert (current / "gateway.py").read_bytes() == (REPO / "gateway.py").read_bytes()
    # the release's own manifest checks out, and nothing in it is writable but by root
    sums = subprocess.run([SHA256SUM, "--quiet", "-c", "SHA256SUMS"], cwd=current,
                          capture_output=True, text=True, check=False)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    assert not [p for p in current.resolve().rglob("*") if mode(p) & 0o022]
    user = account(root, "smartcorr")
    assert user is not None
    assert user[6] == "/usr/sbin/nologin"
    assert "smartcorr" in account(root, "dialout", "group")[3].split(",")  # type: ignore[index]
    assert "smartcorr" in account(root, "tss", "group")[3].split(",")  # type: ignore[index]
    assert account(root, "gpio", "group") is None  # not made up where there is none
    shadow = account(root, "smartcorr", "shadow")
    assert shadow is not None
    assert shadow[1].startswith(("!", "*"))
    if AS_ROOT:  # owners can be set only by root (CI runs as root)
        uid, gid = int(user[2]), int(user[3])
        assert (etc.stat().st_uid, etc.stat().st_gid) == (0, gid)
        assert (identity.stat().st_uid, identity.stat().st_gid) == (uid, gid)
        assert (data.stat().st_uid, data.stat().st_gid) == (uid, gid)
        assert all(p.lstat().st_uid == 0 for p in current.resolve().rglob("*"))
        status = findings(root)
        for name in ("service-user", "service-unit", "config-dir", "identity-files",
                     "data-dir", "code-integrity"):
            assert status[name] is Status.PASS, (name, hardening_findings(root))


def test_second_install_changes_nothing(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    install(root)
    before = snapshot(root)
    proc = install(root)
    assert "nothing to change" in proc.stderr
    assert snapshot(root) == before


def test_dry_run_changes_nothing_and_says_what_it_would_do(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    before = snapshot(root)
    proc = install(root, "--dry-run")
    assert snapshot(root) == before
    assert "would run: systemd-sysusers" in proc.stderr
    assert "would write" in proc.stderr
    assert "smartcorr-gateway.service" in proc.stderr
    assert "would copy" in proc.stderr
    assert "dry run: nothing was changed" in proc.stderr


@pytest.mark.skipif(not AS_ROOT, reason="changing a file's owner needs root (CI runs as root)")
def test_fix_ownership_hands_root_made_identity_files_to_the_service_user(
        tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    install(root)
    identity = root / "etc/smartcorr/identity"
    # what `provision init` run as root leaves: keys 0600 root, public files 0644 root
    (identity / "signing.key").write_bytes(b"secret")
    (identity / "signing.key").chmod(0o600)
    (identity / "signing.pub").write_bytes(b"public")
    (identity / "signing.pub").chmod(0o644)
    config = root / "etc/smartcorr/gateway.toml"
    config.write_text("[gateway]\n")
    config.chmod(0o600)
    assert findings(root)["identity-files"] is Status.FAIL
    assert findings(root)["config-dir"] is Status.FAIL  # 0600 root: the daemon cannot read it
    proc = install(root, "--fix-ownership")
    assert "gave 2 file(s)" in proc.stderr
    uid = int(account(root, "smartcorr")[2])  # type: ignore[index]
    gid = int(account(root, "smartcorr")[3])  # type: ignore[index]
    for name, wanted in (("signing.key", 0o600), ("signing.pub", 0o644)):
        st = (identity / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, wanted)
    st = config.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640)
    assert findings(root)["identity-files"] is Status.PASS
    assert findings(root)["config-dir"] is Status.PASS
    assert "nothing to change" in install(root, "--fix-ownership").stderr


def _digest_tree(path: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), mode(p))
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_upgrade_and_rollback_keep_configuration_identity_and_data(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    root = fresh_root(tmp_path)
    install(root, source=src)
    opt = root / "opt/smartcorr"
    first = str((opt / "current").readlink())
    # what an installed gateway holds
    (root / "etc/smartcorr/gateway.toml").write_text("[gateway]\nidentity_dir = 'x'\n")
    (root / "etc/smartcorr/gateway.toml").chmod(0o640)
    (root / "etc/smartcorr/identity/signing.key").write_bytes(b"k" * 32)
    (root / "etc/smartcorr/identity/signing.key").chmod(0o600)
    (root / "var/lib/smartcorr/records.db").write_bytes(b"store")
    kept = {d: _digest_tree(root / d) for d in ("etc/smartcorr", "var/lib/smartcorr")}

    # a plain install keeps the installed code even when the checkout moved on
    (src / "README.md").write_text((src / "README.md").read_text() + "\nrelease two\n")
    proc = install(root, source=src)
    assert str((opt / "current").readlink()) == first
    assert "--upgrade to switch" in proc.stderr

    install(root, "--upgrade", source=src)
    second = str((opt / "current").readlink())
    assert second != first
    assert str((opt / "previous").readlink()) == first
    assert (opt / "current/README.md").read_text().endswith("release two\n")
    assert {d: _digest_tree(root / d) for d in kept} == kept

    # the same code again: nothing to do
    before = snapshot(root)
    assert "nothing to upgrade" in install(root, "--upgrade", source=src).stderr
    assert snapshot(root) == before

    # a third release: only the current and the previous one are kept
    (src / "README.md").write_text((src / "README.md").read_text() + "release three\n")
    install(root, "--upgrade", source=src)
    third = str((opt / "current").readlink())
    assert sorted(p.name for p in (opt / "releases").iterdir()) == \
        sorted(Path(r).name for r in (second, third))

    install(root, "--rollback", source=src)
    assert str((opt / "current").readlink()) == second
    assert str((opt / "previous").readlink()) == third
    assert {d: _digest_tree(root / d) for d in kept} == kept


def test_a_failed_release_build_switches_nothing(tmp_path: Path) -> None:
    """An upgrade whose virtual env cannot be made leaves the running release alone."""
    src = source_copy(tmp_path)
    root = fresh_root(tmp_path)
    install(root, source=src)
    current = str((root / "opt/smartcorr/current").readlink())
    (src / "scripts/setup.sh").write_text("#!/bin/sh\necho 'setup: no network' >&2\nexit 1\n")
    proc = subprocess.run([BASH, str(src / "packaging/install.sh"), "--root", str(root),
                           "--upgrade"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1
    assert "nothing was switched" in proc.stderr
    assert str((root / "opt/smartcorr/current").readlink()) == current
    assert sorted(p.name for p in (root / "opt/smartcorr/releases").iterdir()) == \
        [Path(current).name]


@pytest.mark.parametrize(("args", "message"), [
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--upgrade", "--rollback"], "one action at a time"),
    (["--root", "/nonexistent/tree"], "no such directory"),
    (["--allow-net", "mqtt.example"], "not an IP address or network"),
    (["--root"], "--root needs a directory"),
])
def test_usage_errors_exit_2_with_one_clear_message(args: list[str], message: str) -> None:
    proc = subprocess.run([BASH, str(INSTALL), *args], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "see packaging/install.sh --help" in proc.stderr


def test_fix_ownership_before_any_install_is_refused(tmp_path: Path) -> None:
    proc = install(fresh_root(tmp_path), "--fix-ownership", check=False)
    assert proc.returncode == 2
    assert "run packaging/install.sh first" in proc.stderr


def test_rollback_without_a_previous_release_fails(tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    install(root)
    proc = install(root, "--rollback", check=False)
    assert proc.returncode == 1
    assert "no previous release" in proc.stderr


def test_help_describes_every_option() -> None:
    proc = subprocess.run([BASH, str(INSTALL), "--help"], capture_output=True, text=True,
                          timeout=30, check=True)
    for option in ("--upgrade", "--rollback", "--fix-ownership", "--root", "--dry-run",
                   "--no-venv", "--allow-net"):
        assert f"  {option}" in proc.stdout


def test_the_command_wrapper_says_what_is_missing() -> None:
    """/usr/local/bin/smartcorr before install.sh made /opt/smartcorr: one line, exit 2."""
    if Path("/opt/smartcorr/current").exists():
        pytest.skip("a gateway is installed on this machine")
    sh = shutil.which("sh") or "/bin/sh"
    proc = subprocess.run([sh, str(PACKAGING / "smartcorr"), "provision", "check"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("smartcorr: /opt/smartcorr/current/.venv/bin/python is missing: "
                           "run packaging/install.sh\n")


def test_polkit_rule_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node to parse the polkit rule with")
    script = tmp_path / "rule.js"  # node reads .js files only
    shutil.copy(PACKAGING / "smartcorr-poweroff.rules", script)
    proc = subprocess.run([node, "--check", str(script)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


# -- udev -----------------------------------------------------------------------------------------
DEVICES = """\
# name          vendor  product  serial      [interface]
tag-receiver    0403    6015     DK0AB1CD
kiosk           10C4    ea60     0001        00
gnss            1546    01a7     -
usb-allow       2c7c    0125     -           # the LTE modem
lock-usb        yes
"""

_UDEV_KEY = re.compile(r'\s*([A-Z_]+)(\{[A-Za-z0-9_]+\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*')
_UDEV_KEYS = {"ACTION", "SUBSYSTEM", "ENV", "ATTR", "SYMLINK", "GROUP", "MODE", "GOTO",
              "LABEL"}


def udev_syntax_errors(text: str) -> list[str]:
    """Our own reading of udev's syntax: each rule is comma-separated KEY[{attr}]OP"value"
    pairs with known keys, and every GOTO has its LABEL."""
    errors, gotos, labels = [], set(), set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for pair in line.split(", "):
            m = _UDEV_KEY.fullmatch(pair)
            if not m or m.group(1) not in _UDEV_KEYS:
                errors.append(f"{number}: {pair!r}")
                continue
            if m.group(1) == "GOTO":
                gotos.add(m.group(4))
            if m.group(1) == "LABEL":
                labels.add(m.group(4))
    return errors + [f"GOTO {g} has no LABEL" for g in gotos - labels]


def test_udev_rule_names_each_device_and_locks_the_rest() -> None:
    rules = udev_rules.render(udev_rules.parse(DEVICES))
    assert udev_syntax_errors(rules) == []
    assert ('ENV{ID_VENDOR_ID}=="0403", ENV{ID_MODEL_ID}=="6015", '
            'ENV{ID_SERIAL_SHORT}=="DK0AB1CD", SYMLINK+="smartcorr/tag-receiver"') in rules
    assert 'ENV{ID_USB_INTERFACE_NUM}=="00", SYMLINK+="smartcorr/kiosk"' in rules  # lowered
    gnss = next(line for line in rules.splitlines() if "smartcorr/gnss" in line)
    assert "ID_SERIAL_SHORT" not in gnss  # '-': any serial
    assert 'ATTR{idVendor}=="2c7c", ATTR{idProduct}=="0125", ATTR{authorized}="1"' in rules
    assert rules.rstrip().splitlines()[-3] == 'ATTR{authorized}="0"'
    assert 'ATTR{authorized}="0"' not in udev_rules.render(
        udev_rules.parse(DEVICES.replace("lock-usb        yes", "")))
    # the checker bites
    assert udev_syntax_errors('SUBSYSTEM="tty" BAD\nGOTO="nowhere"\n')


@pytest.mark.skipif(not AS_ROOT or shutil.which("udevadm") is None
                    or not Path(UNSHARE).exists(),
                    reason="udevadm reads rules only from /etc/udev/rules.d: mounting a "
                           "test directory there (a private mount namespace) needs root")
def test_udevadm_parses_the_rule_without_complaint(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "70-smartcorr.rules").write_text(
        udev_rules.render(udev_rules.parse(DEVICES)))
    (rules_dir / "71-broken.rules").write_text('SUBSYSTEM="tty" BAD\n')  # the check bites
    device = next((d for d in ("/sys/class/tty/tty0", "/sys/class/tty/console",
                               "/sys/class/mem/null") if Path(d).exists()), None)
    if device is None:
        pytest.skip("no device in /sys to run udevadm test on")
    script = (f"mount --bind {rules_dir} /etc/udev/rules.d && "
              f"udevadm test --action=add {device}")
    proc = subprocess.run([UNSHARE, "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, check=False)
    if "Reading rules file: /etc/udev/rules.d/70-smartcorr.rules" not in proc.stderr:
        pytest.skip(f"udevadm test did not read the rules here: {proc.stderr[-300:]}")
    ours = [line for line in proc.stderr.splitlines() if "70-smartcorr.rules:" in line]
    assert ours == []
    assert any("71-broken.rules:1" in line for line in proc.stderr.splitlines())


@pytest.mark.parametrize(("line", "message"), [
    ("tag-receiver 0403 6015", "4 or 5 fields"),
    ("Tag_Rx 0403 6015 A1", "lower-case letters"),
    ("tag-receiver 403 6015 A1", "four hex digits"),
    ("tag-receiver 0403 6015 A*1", "letters, digits"),
    ("tag-receiver 0403 6015 A1 0", "two hex digits"),
    ("lock-usb maybe", "lock-usb yes"),
])
def test_devices_conf_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    conf = tmp_path / "devices.conf"
    conf.write_text(f"# devices\n{line}\n")
    proc = subprocess.run([sys.executable, str(PACKAGING / "udev_rules.py"), str(conf)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert f"{conf}:2:" in proc.stderr
    assert message in proc.stderr


def test_devices_conf_bounds_and_duplicates() -> None:
    many = "".join(f"dev{i} 0403 6015 S{i}\n" for i in range(udev_rules.MAX_DEVICES + 1))
    with pytest.raises(udev_rules.DevicesError, match="more than 32 devices"):
        udev_rules.parse(many)
    with pytest.raises(udev_rules.DevicesError, match="given twice"):
        udev_rules.parse("gnss 1546 01a7 -\ngnss 1546 01a8 -\n")


def test_install_makes_the_rule_from_devices_conf_and_follows_its_changes(
        tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    install(root)
    rules = root / "etc/udev/rules.d/70-smartcorr.rules"
    assert not rules.exists()  # no devices.conf, no rule
    conf = root / "etc/smartcorr/devices.conf"
    conf.write_text("tag-receiver 0403 6015 DK0AB1CD\n")
    install(root)
    assert 'SYMLINK+="smartcorr/tag-receiver"' in rules.read_text()
    assert findings(root)["usb-devices"] is Status.PASS
    conf.write_text("tag-receiver 0403 6015 DK0AB1CD\ngnss 1546 01a7 -\nlock-usb yes\n")
    assert findings(root)["usb-devices"] is Status.FAIL  # the rule is behind its file
    install(root)
    assert 'SYMLINK+="smartcorr/gnss"' in rules.read_text()
    assert findings(root)["usb-devices"] is Status.PASS
    conf.write_text("gnss 1546 01a7 -\ngnss 1546 01a7 -\n")
    before = rules.read_text()
    proc = install(root, check=False)
    assert proc.returncode == 1
    assert "devices.conf:2: name 'gnss' is given twice" in proc.stderr
    assert rules.read_text() == before  # a bad file never replaces a good rule


def test_sysusers_and_tmpfiles_files_are_what_systemd_reads(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles take the shipped files as they are."""
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles not installed")
    root = fresh_root(tmp_path)
    proc = subprocess.run([sysusers, f"--root={root}", str(PACKAGING / "smartcorr.sysusers")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Failed" not in proc.stderr
    proc = subprocess.run([tmpfiles, f"--root={root}", "--create",
                           str(PACKAGING / "smartcorr.tmpfiles")],
                          capture_output=True, text=True, timeout=30, check=False)
    if AS_ROOT:
        assert proc.returncode == 0, proc.stderr
    assert "Failed to parse" not in proc.stderr
    assert "ignoring" not in proc.stderr



# -- the daemon under the unit's own system-call filter -------------------------------------
# systemd cannot run here (no init), so the filter the unit asks for is rebuilt with
# libseccomp, from the unit's SystemCallFilter= lines as `systemd-analyze syscall-filter`
# expands them, with MemoryDenyWriteExecute= and RestrictAddressFamilies= as systemd
# implements them, and applied to the real daemon (this file, run as a program, installs
# it and execs the command). A call outside the list kills the daemon here, where the unit
# would return EPERM: the test fails on any call the unit would refuse.
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
AF_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}


def unit_syscalls(unit_text: str) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow, in their order."""
    cache: dict[str, set[str]] = {}

    def expand(token: str) -> set[str]:
        if not token.startswith("@"):
            return {token}
        if token not in cache:
            listing = analyze("syscall-filter", token).stdout.splitlines()
            names: set[str] = set()
            for line in listing[1:]:
                word = line.strip()
                if word and not word.startswith("#"):
                    names |= expand(word) if word != token else set()
            cache[token] = names
        return cache[token]

    allowed: set[str] = set()
    for value in re.findall(r"^SystemCallFilter=(.*)$", unit_text, re.MULTILINE):
        deny = value.startswith("~")
        names = set().union(*(expand(t) for t in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def _seccomp_exec(allowed: list[str], families: list[str], argv: list[str]) -> None:
    import ctypes

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS)

    def allow(name: str, *conditions: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a call of this architecture
            return
        array = (ArgCmp * max(len(conditions), 1))(*(ArgCmp(*c) for c in conditions))
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, len(conditions), array)
        if rc != 0:
            raise OSError(-rc, f"seccomp_rule_add {name}")

    guarded = {"mmap", "mmap2", "mprotect", "pkey_mprotect", "socket"}
    for name in set(allowed) - guarded:
        allow(name)
    allow("execve")  # systemd's own last call before the service's first
    wx = PROT_WRITE | PROT_EXEC
    for name in ("mmap", "mmap2"):  # MemoryDenyWriteExecute=: never writable and executable
        for prot in (0, PROT_WRITE, PROT_EXEC):
            allow(name, (2, SCMP_CMP_MASKED_EQ, wx, prot))
    allow("mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0))  # nor made executable later
    allow("pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0))
    for family in families:  # RestrictAddressFamilies=
        allow("socket", (0, SCMP_CMP_EQ, AF_FAMILIES[family], 0))
    if lib.seccomp_load(ctx) != 0:
        raise OSError(ctypes.get_errno(), "seccomp_load")
    os.execv(argv[0], argv)  # noqa: S606 - the filtered program, as systemd execs it


def _seccomp_available() -> bool:
    import ctypes.util
    return SYSTEMD_ANALYZE is not None and ctypes.util.find_library("seccomp") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _seccomp_available(),
                    reason="needs libseccomp (package libseccomp2) and systemd-analyze")
@pytest.mark.parametrize("keys", ["file", "tpm"])
def test_daemon_runs_under_the_units_syscall_filter(
        tmp_path: Path, mosquitto: object, pki: object, keys: str,
        request: pytest.FixtureRequest) -> None:
    """READY, the watchdog, records delivered over TLS (a PUBACK) and a clean stop, with
    every call the unit's SystemCallFilter=, MemoryDenyWriteExecute= and
    RestrictAddressFamilies= would refuse killing the daemon; with key files, and with the
    identity in a TPM (tpm2-pytss goes through cffi, which W^X memory could break)."""
    import json
    import signal
    import socket

    from lab.mosquitto import Mosquitto, Pki, records_sink
    from provisioning.identity import create_identity
    from tests.helpers import wait_for

    assert isinstance(mosquitto, Mosquitto)
    assert isinstance(pki, Pki)
    unit_text = UNIT.read_text()
    allowed = unit_syscalls(unit_text)
    assert {"adjtimex", "clock_adjtime"} <= allowed  # core/clock.py: the NTP state
    assert "setuid" not in allowed
    assert "settimeofday" not in allowed
    families = re.search(r"^RestrictAddressFamilies=(.*)$", unit_text, re.MULTILINE)
    assert families is not None
    tcti = request.getfixturevalue("swtpm").tcti if keys == "tpm" else None
    # the platform's side subscribed: a record nobody subscribes to is not delivered
    sink = records_sink(mosquitto, pki)
    sink.__enter__()
    request.addfinalizer(lambda: sink.__exit__(None, None, None))
    identity = create_identity(tmp_path / "identity", "gw-seccomp-0001", tpm=tcti)
    assert identity.key_class == keys
    files = pki.client(identity.gateway_id)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
identity_dir = "{tmp_path / 'identity'}"
data_dir = "{tmp_path / 'data'}"
[paths]
runtime_dir = "{tmp_path / 'run'}"
[broker]
host = "{mosquitto.host}"
port = {mosquitto.port}
ca_file = "{pki.ca_file}"
cert_file = "{files.cert}"
key_file = "{files.key}"
""")
    if AS_ROOT:
        # SQLite gives its WAL and journal the database's owner when, and only when, it
        # runs as root (unixOpen's robustFchown); the unit's User=smartcorr never is, and
        # the interpreter here lives under /root, out of another user's reach
        allowed |= {"fchown", "fchown32"}
    spec = tmp_path / "filter.json"
    spec.write_text(json.dumps({"allowed": sorted(allowed),
                                "families": families.group(1).split()}))
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--seccomp-exec", str(spec), "--", sys.executable,
         str(REPO / "gateway.py"), "run", "--config", str(cfg)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_file = tmp_path / "run" / "state.json"

    def delivered() -> bool:
        assert proc.poll() is None, f"the daemon died (signal {-(proc.returncode or 0)}): " \
                                    "a call the unit refuses?"
        try:
            uplink = json.loads(state_file.read_text()).get("uplink") or {}
        except (OSError, ValueError):
            return False
        return uplink.get("state") == "connected" and uplink.get("last_ack_ms") is not None

    try:
        messages = [server.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        wait_for(delivered, 30, "records delivered over TLS (a PUBACK) under the filter")
        while "WATCHDOG=1" not in messages:
            messages.append(server.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(server.recv(4096).decode())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
        server.close()
    assert "Bad system call" not in stderr


def test_a_call_outside_the_filter_kills_under_the_harness(tmp_path: Path) -> None:
    """The harness bites: a process calling setuid (in @privileged) dies by SIGSYS."""
    if not _seccomp_available():
        pytest.skip("needs libseccomp and systemd-analyze")
    spec = tmp_path / "filter.json"
    import json
    spec.write_text(json.dumps({"allowed": sorted(unit_syscalls(UNIT.read_text())),
                                "families": ["AF_UNIX"]}))
    ok = subprocess.run([sys.executable, __file__, "--seccomp-exec", str(spec), "--",
                         sys.executable, "-c", "import os; os.getpid()"],
                        cwd=REPO, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    killed = subprocess.run([sys.executable, __file__, "--seccomp-exec", str(spec), "--",
                             sys.executable, "-c", "import os; os.setuid(os.getuid())"],
                            cwd=REPO, capture_output=True, timeout=30, check=False)
    assert killed.returncode == -31  # SIGSYS


if __name__ == "__main__" and sys.argv[1:2] == ["--seccomp-exec"]:
    import json as _json

    _spec = _json.loads(Path(sys.argv[2]).read_text())
    _seccomp_exec(_spec["allowed"], _spec["families"], sys.argv[sys.argv.index("--") + 1:])
