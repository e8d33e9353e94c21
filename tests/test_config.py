"""Configuration errors name the file, the key and what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import DEFAULT_UPLINK_LINGER_S, ConfigError, UplinkSection, load_config
from provisioning.identity import create_identity

REPO = Path(__file__).resolve().parents[1]
GOOD = """
[gateway]
identity_dir = "{ident}"
data_dir = "{data}"

[broker]
host = "127.0.0.1"
port = 8883
tls = false
insecure_plaintext = true

[[devices]]
name = "tags"
kind = "tag_receiver"
path = "/dev/serial/by-id/usb-SmartCorr_TagRx_0001-if00"

[gnss]
path = "/dev/ttyACM0"
fix_interval_s = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text.format(ident=tmp_path / "identity", data=tmp_path / "data"))
    return path


def test_a_good_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.broker.port == 8883
    assert cfg.devices[0].baudrate == 115200
    assert cfg.gnss is not None
    assert cfg.gnss.fix_interval_s == 30.0
    assert (cfg.tags.interval_max_s, cfg.tags.interval_checkpoint_s) == (300.0, 20.0)
    cfg = load_config(write(tmp_path, GOOD.replace(
        "[gnss]", "[tags]\ninterval_max_s = 10\ninterval_checkpoint_s = 30\n[gnss]")))
    assert (cfg.tags.interval_max_s, cfg.tags.interval_checkpoint_s) == (10.0, 30.0)
    assert cfg.require_authorisation is True  # production: a pairing authorises nothing


def test_uplink_linger(tmp_path: Path) -> None:
    """[uplink] linger_s: from a file 120 s unless given (0: nothing waits); built in code,
    0 (the lab and tests send every record at once)."""
    assert load_config(write(tmp_path, GOOD)).uplink.linger_s == DEFAULT_UPLINK_LINGER_S == 120
    assert load_config(write(tmp_path, GOOD + "[uplink]\nlinger_s = 0\n")).uplink.linger_s == 0
    assert load_config(write(tmp_path, GOOD + "[uplink]\nlinger_s = 300\n")).uplink.linger_s \
        == 300
    assert UplinkSection().linger_s == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linger_s = 301", r"\[uplink\] linger_s: must be 0-300 seconds .*got 301"),
        ("linger_s = -1", r"\[uplink\] linger_s: must be 0-300 seconds .*got -1"),
        ("linger_s = inf", r"\[uplink\] linger_s: must be a finite number"),
        ('linger_s = "2m"', r"\[uplink\] linger_s: expected float, got '2m'"),
        ("linger = 60", r"\[uplink\] linger: unknown key"),
    ],
)
def test_bad_uplink_linger_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD + f"[uplink]\n{text}\n"))


def test_supervision_require_authorisation(tmp_path: Path) -> None:
    """[supervision] require_authorisation: a boolean, true by default (Art. 29)."""
    cfg = load_config(write(tmp_path, GOOD + "[supervision]\nrequire_authorisation = false\n"))
    assert cfg.require_authorisation is False
    with pytest.raises(ConfigError, match=r"\[supervision\] require_authorisation: expected "
                                          r"bool, got 'no'"):
        load_config(write(tmp_path, GOOD + '[supervision]\nrequire_authorisation = "no"\n'))
    with pytest.raises(ConfigError, match=r"\[supervision\] require: unknown key"):
        load_config(write(tmp_path, GOOD + "[supervision]\nrequire = true\n"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("port = 8883", 'port = "x"'), r"\[broker\] port: expected int, got 'x'"),
        (("port = 8883", "port = 70000"), r"\[broker\] port: must be 1-65535"),
        (('kind = "tag_receiver"', 'kind = "toaster"'), r"\[devices.0\] kind: must be one of"),
        (("fix_interval_s = 30", "fix_intervall_s = 30"),
         r"\[gnss\] fix_intervall_s: unknown key"),
        (("tls = false\ninsecure_plaintext = true", "tls = true"),
         r"\[broker\] ca_file: is required"),
        (("fix_interval_s = 30", "fix_interval_s = nan"),
         r"\[gnss\] fix_interval_s: must be a finite number, got nan"),
        (("fix_interval_s = 30", "fix_interval_s = inf"),
         r"\[gnss\] fix_interval_s: must be a finite number, got inf"),
        (("fix_interval_s = 30", "move_after_s = nan"), r"\[gnss\] move_after_s: must be a finite"),
        (("fix_interval_s = 30", "move_after_s = -10"), r"\[gnss\] move_after_s: must be 0 or"),
        (("fix_interval_s = 30", "installed_lat = nan\ninstalled_lon = 1.0"),
         r"\[gnss\] installed_lat: must be a finite"),
        (("fix_interval_s = 30", "baudrate = 0"), r"\[gnss\] baudrate: must be 50-4000000"),
        (('kind = "tag_receiver"', 'kind = "tag_receiver"\nbaudrate = -5'),
         r"\[devices.0\] baudrate: must be 50-4000000 .*got -5"),
        (("insecure_plaintext = true\n", ""), r"\[broker\] tls: false sends every record "
                                              r"unencrypted.*insecure_plaintext = true"),
        (("tls = false\n", ""), r"\[broker\] insecure_plaintext: applies only with tls = false"),
        (('host = "127.0.0.1"', 'host = " "'), r"\[broker\] host: is empty"),
        (('data_dir = "{data}"', 'data_dir = ""'), r"\[gateway\] data_dir: is empty"),
        (('identity_dir = "{ident}"', 'identity_dir = ""'),
         r"\[gateway\] identity_dir: is empty"),
        (('host = "127.0.0.1"', ""), r"\[broker\] host: is required"),
        (("[gnss]", "[gnss"), r"not valid TOML"),
        (("[gnss]", "[tags]\ninterval_max_s = 5\n[gnss]"),
         r"\[tags\] interval_max_s: must be 10-900 seconds .*got 5"),
        (("[gnss]", "[tags]\ninterval_max_s = 901\n[gnss]"),
         r"\[tags\] interval_max_s: must be 10-900"),
        (("[gnss]", "[tags]\ninterval_checkpoint_s = 0.5\n[gnss]"),
         r"\[tags\] interval_checkpoint_s: must be 1-30 seconds .*got 0.5"),
        (("[gnss]", "[tags]\ninterval_checkpoint_s = 31\n[gnss]"),
         r"\[tags\] interval_checkpoint_s: must be 1-30"),
        (("[gnss]", "[tags]\ninterval_max = 60\n[gnss]"), r"\[tags\] interval_max: unknown key"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('data_dir = "{data}"', f'data_dir = "{tmp_path}/f"'))
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"\[gateway\] data_dir: .*/f is not a directory"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(write(tmp_path, GOOD.replace("port = 8883",
                                                                          "port = -1"))))
    assert result.returncode == 2
    assert "[broker] port: must be 1-65535" in result.stderr


def test_run_without_identity_says_how_to_provision(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 2
    assert "provision init" in result.stderr


def test_provision_init_then_refuses_to_overwrite(tmp_path: Path) -> None:
    ident = tmp_path / "identity"
    first = run_cli("provision", "init", "--identity-dir", str(ident), "--gateway-id",
                    "gw-qc-0042", "--json")
    assert first.returncode == 0, first.stderr
    assert '"gateway_id": "gw-qc-0042"' in first.stdout
    assert (ident / "signing.key").stat().st_mode & 0o077 == 0
    again = run_cli("provision", "init", "--identity-dir", str(ident), "--gateway-id",
                    "gw-qc-0042")
    assert again.returncode == 2
    assert "already holds an identity" in again.stderr


def test_bad_gateway_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not valid"):
        create_identity(tmp_path / "i", "Bad ID!")


def test_pair_list_unpair_tags(tmp_path: Path) -> None:
    import json

    ident = str(tmp_path / "identity")
    assert run_cli("provision", "init", "--identity-dir", ident, "--gateway-id",
                   "gw-qc-0042").returncode == 0
    paired = run_cli("provision", "pair-tag", "--operator", "Ann Installer",
                     "--identity-dir", ident, "--tag", "0x1000",
                     "--json")
    assert paired.returncode == 0, paired.stderr
    key = json.loads(paired.stdout)["key"]
    assert len(bytes.fromhex(key)) == 16
    assert key not in (tmp_path / "identity" / "tags.json").read_text()  # encrypted at rest
    listed = json.loads(run_cli("provision", "list-tags", "--identity-dir", ident,
                                "--json").stdout)
    assert [t["tag"] for t in listed["tags"]] == ["T00001000"]
    assert "key" not in listed["tags"][0]
    bad = run_cli("provision", "pair-tag", "--operator", "Ann Installer",
                  "--identity-dir", ident, "--tag", "zz")
    assert bad.returncode == 2
    assert "give T + 8 hex digits" in bad.stderr
    assert run_cli("provision", "unpair-tag", "--operator", "Ann Installer",
                   "--identity-dir", ident, "--tag",
                   "T00001000").returncode == 0
    again = run_cli("provision", "unpair-tag", "--operator", "Ann Installer",
                    "--identity-dir", ident, "--tag", "T00001000")
    assert again.returncode == 2
    assert "not paired" in again.stderr


def test_demo_refuses_a_bad_broker_address() -> None:
    result = run_cli("demo", "--duration", "1", "--broker", "nonsense")
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr


@pytest.mark.parametrize("name", ["signing.key", "storage.key", "tls.key"])
def test_run_refuses_a_key_readable_by_others(tmp_path: Path, name: str) -> None:
    create_identity(tmp_path / "identity", "gw-qc-0042")
    text = GOOD
    if name == "tls.key":
        for tls_file in ("ca.crt", "gw.crt", "tls.key"):
            (tmp_path / tls_file).write_text("-----BEGIN placeholder-----\n")
        text = GOOD.replace("tls = false\ninsecure_plaintext = true",
                            f'ca_file = "{tmp_path}/ca.crt"\ncert_file = "{tmp_path}/gw.crt"\n'
                            f'key_file = "{tmp_path}/tls.key"')
    key = tmp_path / name if name == "tls.key" else tmp_path / "identity" / name
    key.chmod(0o644)
    result = run_cli("run", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    assert f"{key} is readable by group or others (mode 0644): 'chmod 600 {key}'" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_run_names_a_data_dir_it_cannot_create(tmp_path: Path) -> None:
    create_identity(tmp_path / "identity", "gw-qc-0042")
    (tmp_path / "file").write_text("")
    path = write(tmp_path, GOOD.replace('data_dir = "{data}"', f'data_dir = "{tmp_path}/file/d"'))
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}: [gateway] data_dir: cannot create {tmp_path}/file/d" in result.stderr


TAMPERED = {
    "no key_enc": lambda e: e.pop("key_enc"),
    "key_enc not hex": lambda e: e.update(key_enc="zz"),
    "key_enc too short": lambda e: e.update(key_enc="00"),
    "no tag": lambda e: e.pop("tag"),
    "tag a number": lambda e: e.update(tag=4096),
    "absent_after_s a string": lambda e: e.update(absent_after_s="60"),
    "absent_after_s huge": lambda e: e.update(absent_after_s=10**30),
    "paired_at null": lambda e: e.update(paired_at=None),
}


@pytest.mark.parametrize("how", [*TAMPERED, "entry a list", "table a list", "doc id a word"])
def test_a_tampered_registry_is_a_clear_error(tmp_path: Path, how: str) -> None:
    import json

    ident = tmp_path / "identity"
    create_identity(ident, "gw-qc-0042")
    key_file = tmp_path / "tag.key"
    key_file.write_text(bytes(range(16)).hex())
    assert run_cli("provision", "pair-tag", "--operator", "Ann Installer",
                   "--identity-dir", str(ident), "--tag", "0x1000",
                   "--key-file", str(key_file)).returncode == 0
    registry = ident / "tags.json"
    doc = json.loads(registry.read_text())
    if how in TAMPERED:
        TAMPERED[how](doc["tags"]["1"])
    elif how == "entry a list":
        doc["tags"]["1"] = []
    elif how == "table a list":
        doc["tags"] = []
    else:
        doc["tags"]["one"] = doc["tags"].pop("1")
    registry.write_text(json.dumps(doc))
    listed = run_cli("provision", "list-tags", "--identity-dir", str(ident))
    started = run_cli("run", "--config", str(write(tmp_path, GOOD)))
    for result in (listed, started):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"{registry}:" in result.stderr
        assert "restore the file from backup" in result.stderr


def test_absent_after_is_bounded(tmp_path: Path) -> None:
    ident = str(tmp_path / "identity")
    create_identity(tmp_path / "identity", "gw-qc-0042")
    result = run_cli("provision", "pair-tag", "--operator", "Ann Installer",
                     "--identity-dir", ident, "--tag", "0x1000",
                     "--absent-after", str(10**30))
    assert result.returncode == 2
    assert "--absent-after must be 10-86400 seconds" in result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('path = "/dev/serial/by-id/usb-SmartCorr_TagRx_0001-if00"', 'path = ""'),
         r"\[devices.0\] path: is empty"),
        (('path = "/dev/serial/by-id/usb-SmartCorr_TagRx_0001-if00"', 'path = "  "'),
         r"\[devices.0\] path: is empty"),
        (('path = "/dev/ttyACM0"', 'path = ""'), r"\[gnss\] path: is empty"),
        (('path = "/dev/ttyACM0"', 'path = "/dev/tty\\u0000"'), r"\[gnss\] path: holds a NUL"),
        (('data_dir = "{data}"', 'data_dir = " "'), r"\[gateway\] data_dir: is empty"),
        (("tls = false\ninsecure_plaintext = true",
          'tls = true\nca_file = ""\ncert_file = "/x"\nkey_file = "/y"'),
         r"\[broker\] ca_file: is empty"),
        (("fix_interval_s = 30", 'fix_interval_s = 30\n[inputs]\nchip = ""\nmains_line = 1'),
         r"\[inputs\] chip: is empty"),
    ],
)
def test_every_path_must_be_non_empty(tmp_path: Path, change: tuple[str, str],
                                      message: str) -> None:
    """An empty path is the current directory to the OS: refused, naming file and key."""
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)
