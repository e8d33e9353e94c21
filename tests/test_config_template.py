"""``provision config``: a commented template holding every key app/config.py reads, the
ports of /dev/serial/by-id filled in, that loads as it is and whose commented defaults are
the defaults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import config as config_module
from app import config_template as template
from app.config import Config, load_config
from provisioning.identity import CA_CERT, TLS_CERT, TLS_KEY

REPO = Path(__file__).resolve().parents[1]
#: Keys whose template line is an example, not a default (none, or derived at start).
NO_FIXED_DEFAULT = {"quota_bytes", "region", "installed_lat", "installed_lon", "enclosure_line",
                    "mains_line", "ups_low_line", "ups_runtime_s"}


def provision_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "gateway.py"), "provision", "config",
                           *args], capture_output=True, text=True, timeout=60, check=False)


def by_id_dir(tmp_path: Path) -> Path:
    """A /dev/serial/by-id of a unit: a tag receiver, a kiosk, a u-blox receiver and an
    adapter whose name says nothing."""
    links = tmp_path / "by-id"
    links.mkdir()
    (tmp_path / "dev").mkdir()
    for name, target in (("usb-SmartCorr_TagRx_0042-if00", "ttyUSB0"),
                         ("usb-SmartCorr_Kiosk_0007-if00", "ttyUSB1"),
                         ("usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00",
                          "ttyACM0"),
                         ("usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0", "ttyUSB2")):
        (tmp_path / "dev" / target).touch()  # stands for the device node it points to
        (links / name).symlink_to(tmp_path / "dev" / target)
    return links


def identity_with_tls_files(tmp_path: Path) -> Path:
    """The identity directory as enrolment leaves it: the TLS files [broker] names."""
    identity = tmp_path / "identity"
    identity.mkdir()
    for name in (CA_CERT, TLS_CERT, TLS_KEY):
        (identity / name).write_text("placeholder\n")
    return identity


def written(tmp_path: Path) -> tuple[Path, str]:
    """The template of a unit (by_id_dir), written as the command writes it."""
    identity = identity_with_tls_files(tmp_path)
    out = tmp_path / "gateway.toml"
    links = by_id_dir(tmp_path)
    answers = template.answers_from(str(identity), str(tmp_path / "data"),
                                    "mqtt.qc.example:8884",
                                    template.find_ports(tmp_path / "no-names", links), links)
    template.write(template.render(answers), out, force=False)
    return out, out.read_text()


def test_the_template_fills_in_the_ports_found_and_loads(tmp_path: Path) -> None:
    out, text = written(tmp_path)
    assert out.stat().st_mode & 0o777 == 0o600  # once filled in, it holds the home
    cfg = load_config(out)
    links = tmp_path / "by-id"
    assert [(d.name, d.kind.label, d.path) for d in cfg.devices] == [
        ("tags", "tag_receiver", str(links / "usb-SmartCorr_TagRx_0042-if00")),
        ("kiosk", "kiosk", str(links / "usb-SmartCorr_Kiosk_0007-if00"))]
    assert cfg.gnss is not None
    assert cfg.gnss.path == str(links / "usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_receiver-if00")
    assert cfg.gnss.installed is None  # the installer sets the home on site
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("mqtt.qc.example", 8884, True)
    assert cfg.broker.cert_file == str(tmp_path / "identity" / TLS_CERT)
    # the adapter whose name says nothing is offered, commented, with the choices
    assert "#path = \"" + str(links / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0") in text
    assert "does not say what it is" in text


def test_without_ports_the_examples_are_commented_and_it_still_loads(tmp_path: Path) -> None:
    identity = identity_with_tls_files(tmp_path)
    empty = tmp_path / "no-by-id"
    text = template.render(template.answers_from(
        str(identity), str(tmp_path / "data"), None, template.find_ports(empty, empty), empty))
    assert "#[[devices]]" in text
    assert "#kind = \"kiosk\"" in text
    assert "#[gnss]" in text
    assert "CHANGE IT" in text
    cfg_file = tmp_path / "printed.toml"
    cfg_file.write_text(text)
    cfg = load_config(cfg_file)
    assert (cfg.devices, cfg.gnss) == ([], None)


def test_the_command_writes_prints_and_replaces_only_with_force(tmp_path: Path) -> None:
    links = by_id_dir(tmp_path)
    out = tmp_path / "gateway.toml"
    out.write_text("# the installer's own\n")
    where = ("--names", str(tmp_path / "no-names"), "--by-id", str(links))
    refused = provision_config("--out", str(out), *where)
    assert refused.returncode == 2
    assert f"--out {out} exists: give another path, or --force" in refused.stderr
    assert out.read_text() == "# the installer's own\n"
    forced = provision_config("--out", str(out), *where, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "usb-SmartCorr_TagRx_0042-if00 (tag_receiver)" in forced.stdout
    assert "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0 (role unknown: commented)" in \
        forced.stdout
    assert out.read_text().startswith("# SmartCorr gateway configuration")
    assert out.stat().st_mode & 0o777 == 0o600
    printed = provision_config("--out", "-", *where)
    assert printed.returncode == 0
    assert printed.stdout == out.read_text()
    assert not (tmp_path / "-").exists()
    with pytest.raises(template.TemplateError, match="give HOST or HOST:PORT"):
        template.answers_from(None, None, "host:notaport", [], links)


def template_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) of every line of *text* that sets a key, commented out or not."""
    keys: set[tuple[str, str]] = set()
    section = ""
    for line in text.splitlines():
        bare = line.removeprefix("#")
        header = re.match(r"\[\[?(\w+)\]\]?$", bare)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"(\w+) = ", bare)
        if key:
            keys.add((section, key.group(1)))
    return keys


def uncommented(text: str, keys: set[str]) -> str:
    """*text* with the optional tables set ([inputs], [enrolment], [paths], [supervision]),
    and in each
    table that is set, the commented keys named in *keys* (a commented [[devices]] example
    stays commented whole)."""
    out = []
    active = True
    for original in text.splitlines():
        line = original
        if re.match(r"#\[(inputs|enrolment|paths|supervision)\]$", line):
            line = line[1:]
        if re.match(r"#?\[\[?\w+\]\]?$", line):
            active = not line.startswith("#")
        key = re.match(r"#(\w+) = ", line)
        if key and active and key.group(1) in keys:
            line = line[1:]
        out.append(line)
    return "\n".join(out) + "\n"


def loaded(tmp_path: Path, name: str, text: str) -> Config:
    path = tmp_path / name
    path.write_text(text)
    return dataclasses.replace(load_config(path), source=None)


def test_every_key_the_configuration_reads_is_in_the_template(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, text = written(tmp_path)
    full = uncommented(text, NO_FIXED_DEFAULT - {"quota_bytes", "installed_lat",
                                                 "installed_lon"})
    read: set[tuple[str, str]] = set()
    get = config_module._Section.get

    def spy(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        read.add((self.name.split(".")[0], key))  # "devices.0" -> "devices"
        return get(self, key, *args, **kwargs)

    monkeypatch.setattr(config_module._Section, "get", spy)
    loaded(tmp_path, "full.toml", full)
    assert read  # the loader asks for each key, given or not
    assert read == template_keys(text)


def test_uncommenting_a_default_changes_nothing(tmp_path: Path) -> None:
    _, text = written(tmp_path)
    wired = NO_FIXED_DEFAULT - {"quota_bytes", "installed_lat", "installed_lon"}
    only_needed = loaded(tmp_path, "needed.toml", uncommented(text, wired))
    everything = loaded(tmp_path, "all.toml", uncommented(
        text, {k for _, k in template_keys(text)} - {"quota_bytes", "installed_lat",
                                                     "installed_lon"}))
    assert everything == only_needed
    assert loaded(tmp_path, "as-written.toml", text).renewal == everything.renewal


def test_the_installers_stable_names_come_first(tmp_path: Path) -> None:
    links = by_id_dir(tmp_path)
    names = tmp_path / "smartcorr"
    names.mkdir()
    (names / "tag-receiver").symlink_to(tmp_path / "dev" / "ttyUSB0")  # TagRx's device
    (names / "gnss").symlink_to(tmp_path / "dev" / "ttyACM0")
    found = template.find_ports(names, links)
    assert [(f.path, f.role) for f in found] == [
        (names / "gnss", "gnss"), (names / "tag-receiver", "tag_receiver"),
        (links / "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0", None),
        (links / "usb-SmartCorr_Kiosk_0007-if00", "kiosk")]
    text = template.render(template.answers_from(None, None, None, found, links))
    assert f'path = "{names / "tag-receiver"}"' in text
    assert "usb-SmartCorr_TagRx_0042-if00" not in text
