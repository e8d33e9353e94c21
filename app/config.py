"""Typed configuration from TOML. Every error names the file, the key and the fix.

Example (docs/configuration.md has the full reference)::

    [gateway]
    identity_dir = "/etc/smartcorr/identity"
    data_dir = "/var/lib/smartcorr"

    [broker]
    host = "mqtt.platform.example"
    port = 8883
    ca_file = "/etc/smartcorr/tls/ca.crt"
    cert_file = "/etc/smartcorr/tls/gateway.crt"
    key_file = "/etc/smartcorr/tls/gateway.key"

    [[devices]]
    name = "tags"
    kind = "tag_receiver"
    path = "/dev/serial/by-id/usb-SmartCorr_TagRx_0001-if00"

    [gnss]
    path = "/dev/ttyACM0"
    baudrate = 9600
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import UserError

T = TypeVar("T")
DEVICE_KINDS = ("tag_receiver", "kiosk")


class ConfigError(UserError):
    """The configuration is wrong; the message says where and how to fix it."""


@dataclass(frozen=True)
class BrokerSection:
    host: str
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True


@dataclass(frozen=True)
class DeviceSection:
    name: str
    kind: str
    path: str
    baudrate: int = 115200


@dataclass(frozen=True)
class GnssSection:
    path: str
    baudrate: int = 9600
    fix_interval_s: float = 60.0
    installed_lat: float | None = None  # degrees, WGS84: where the unit was installed
    installed_lon: float | None = None
    move_radius_m: int = 200
    move_after_s: float = 120.0


@dataclass(frozen=True)
class Config:
    source: Path
    identity_dir: Path
    data_dir: Path
    broker: BrokerSection
    devices: list[DeviceSection] = field(default_factory=list)
    gnss: GnssSection | None = None


class _Section:
    def __init__(self, source: Path, name: str, table: Any) -> None:
        self.source, self.name = source, name
        if not isinstance(table, dict):
            raise self.error(None, "must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def error(self, key: str | None, what: str) -> ConfigError:
        where = f"[{self.name}]" + (f" {key}" if key else "")
        return ConfigError(f"{self.source}: {where}: {what}")

    def get(self, key: str, kind: type[T], default: T | None = None, *,
            required: bool = False) -> T:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.error(key, f"is required ({kind.__name__})")
            return default  # type: ignore[return-value]
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"expected {kind.__name__}, got {value!r}")
        return value

    def path(self, key: str, *, required: bool = False, must_exist: bool = False) -> Path | None:
        text = self.get(key, str, required=required)
        if text is None:
            return None
        path = Path(text)
        if must_exist and not path.exists():
            raise self.error(key, f"file {path} does not exist")
        return path

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (check its spelling)")


def load_config(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"gateway", "broker", "devices", "gnss"})
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}]: unknown section")

    gw = _Section(path, "gateway", raw.get("gateway", {}))
    identity_dir = gw.path("identity_dir", required=True)
    data_dir = gw.path("data_dir", required=True)
    gw.done()

    if "broker" not in raw:
        raise ConfigError(f"{path}: [broker]: section is required (host, port, TLS files)")
    br = _Section(path, "broker", raw["broker"])
    tls = br.get("tls", bool, True)
    broker = BrokerSection(
        host=br.get("host", str, required=True),
        port=br.get("port", int, 8883),
        ca_file=br.path("ca_file", required=tls, must_exist=True),
        cert_file=br.path("cert_file", required=tls, must_exist=True),
        key_file=br.path("key_file", required=tls, must_exist=True),
        tls=tls,
    )
    if not 1 <= broker.port <= 65535:
        raise br.error("port", f"must be 1-65535, got {broker.port}")
    br.done()

    devices: list[DeviceSection] = []
    tables = raw.get("devices", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: devices: use [[devices]] tables")
    for index, table in enumerate(tables):
        sec = _Section(path, f"devices.{index}", table)
        dev = DeviceSection(
            name=sec.get("name", str, required=True),
            kind=sec.get("kind", str, required=True),
            path=sec.get("path", str, required=True),
            baudrate=sec.get("baudrate", int, 115200),
        )
        if dev.kind not in DEVICE_KINDS:
            raise sec.error("kind", f"must be one of {', '.join(DEVICE_KINDS)}, got {dev.kind!r}")
        if any(d.name == dev.name for d in devices):
            raise sec.error("name", f"{dev.name!r} is used by another device")
        sec.done()
        devices.append(dev)

    gnss = None
    if "gnss" in raw:
        sec = _Section(path, "gnss", raw["gnss"])
        gnss = GnssSection(
            path=sec.get("path", str, required=True),
            baudrate=sec.get("baudrate", int, 9600),
            fix_interval_s=sec.get("fix_interval_s", float, 60.0),
            installed_lat=sec.get("installed_lat", float, None),
            installed_lon=sec.get("installed_lon", float, None),
            move_radius_m=sec.get("move_radius_m", int, 200),
            move_after_s=sec.get("move_after_s", float, 120.0),
        )
        if gnss.fix_interval_s <= 0:
            raise sec.error("fix_interval_s", "must be positive")
        if (gnss.installed_lat is None) != (gnss.installed_lon is None):
            raise sec.error("installed_lat", "give installed_lat and installed_lon together")
        if gnss.installed_lat is not None and not -90 <= gnss.installed_lat <= 90:
            raise sec.error("installed_lat", f"must be -90..90, got {gnss.installed_lat}")
        if gnss.installed_lon is not None and not -180 <= gnss.installed_lon <= 180:
            raise sec.error("installed_lon", f"must be -180..180, got {gnss.installed_lon}")
        if gnss.move_radius_m < 10:
            raise sec.error("move_radius_m", "must be at least 10 (GNSS error is metres)")
        sec.done()
    if identity_dir is None or data_dir is None:  # pragma: no cover - required=True above
        raise gw.error(None, "identity_dir and data_dir are required")
    return Config(path, identity_dir, data_dir, broker, devices, gnss)
