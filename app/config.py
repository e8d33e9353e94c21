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

    [inputs]                    # optional: enclosure switch, mains, UPS (GPIO lines)
    chip = "/dev/gpiochip0"
    enclosure_line = 17
    enclosure_active = "high"   # the level that means "open"
    mains_line = 27
    mains_active = "high"       # the level that means "mains present"
    ups_runtime_s = 900         # power off cleanly before the UPS runs out

    [enrolment]                 # optional: the certificate renews itself (docs/enrolment.md)
    renew = true
    renew_before_days = 30      # renew from 30 days before expiry ...
    renew_life_share = 0.33     # ... or over the last third of a short certificate's life

    [paths]                     # optional
    runtime_dir = "/run/smartcorr"  # the daemon's state.json for 'gateway.py status' (tmpfs)

    [supervision]               # optional (docs/supervision.md)
    require_authorisation = true  # a tag's presence is recorded only in an authorised period
    [tags]                      # optional: presence intervals (docs/records.md tag.interval)
    interval_max_s = 300        # a presence interval is closed at most this old (10-900 s)
    interval_checkpoint_s = 20  # a windowed receiver's beacons share one commit (1-30 s)
    [uplink]                    # optional (docs/records.md "Transport")
    linger_s = 120              # positions and health wait up to this to share a message (0-300)
    deflate = false             # compress messages: only once the platform reads them
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.state import DEFAULT_RUNTIME_DIR
from buffer.store import MIN_QUOTA_BYTES
from core.command_keys import CommandKeyError, check_region
from core.errors import UserError
from core.mqtt import BrokerConfig
from drivers.gnss import Installed
from drivers.inputs import (
    DEFAULT_ENCLOSURE_DEBOUNCE_MS,
    DEFAULT_MAINS_DEBOUNCE_MS,
    DEFAULT_SHUTDOWN_MARGIN_S,
    DEFAULT_UPS_LOW_DEBOUNCE_MS,
    MAX_DEBOUNCE_MS,
    InputsSpec,
    LineSpec,
)
from drivers.tag_receiver import DEFAULT_INTERVAL_MAX_S
from firmware_bridge.framed import LEDGER_CHECKPOINT_S
from firmware_bridge.messages import DeviceClass
from provisioning.renewal import DEFAULT_LIFE_SHARE, DEFAULT_RENEW_BEFORE_DAYS, RenewalPolicy

T = TypeVar("T")
SECTIONS = ("gateway", "broker", "devices", "gnss", "inputs", "enrolment", "paths",
            "supervision", "tags", "uplink")
#: ``[supervision] require_authorisation``'s default: a tag never given an authorisation
#: has nothing of its presence recorded (Art. 29; docs/supervision.md says why).
DEFAULT_REQUIRE_AUTHORISATION = True
#: Device kinds a ``[[devices]]`` table may name: the framed device classes.
DEVICE_KINDS = {c.label: c for c in DeviceClass}
DEFAULT_DEVICE_BAUD = 115200
DEFAULT_GNSS_BAUD = 9600
DEFAULT_FIX_INTERVAL_S = 60.0
DEFAULT_MOVE_RADIUS_M = 200
MIN_MOVE_RADIUS_M = 10  # GNSS error is metres
DEFAULT_MOVE_AFTER_S = 120.0
MAX_PORT = 65535
#: Serial speeds a port may be opened at (termios goes from 50 to 4 000 000 baud).
MIN_BAUD, MAX_BAUD = 50, 4_000_000
DEFAULT_MQTTS_PORT = 8883


#: ``[tags]``: defaults and bounds (seconds) of the presence intervals' keys.
INTERVAL_MAX_RANGE = (10.0, 900.0)
DEFAULT_INTERVAL_CHECKPOINT_S = LEDGER_CHECKPOINT_S
INTERVAL_CHECKPOINT_RANGE = (1.0, 30.0)


#: ``[uplink] linger_s``: how long records of the position and heartbeat classes may wait
#: in the store so that one message (one signed head, one PUBACK) carries several
#: (uplink/linger.py); alarms, check-ins, status changes and answers never wait. The
#: default from a file; 0 sends every record at once. At most 300 s: a position is never
#: staler at the platform than a presence interval is long (``[tags] interval_max_s``'s
#: default), and the figures (bench/README.md) gain little beyond.
DEFAULT_UPLINK_LINGER_S = 120.0
UPLINK_LINGER_RANGE = (0.0, 300.0)


class ConfigError(UserError):
    """The configuration is wrong; the message says where and how to fix it."""


DEFAULT_GPIO_CHIP = "/dev/gpiochip0"
DEFAULT_SHUTDOWN_COMMAND = ("systemctl", "poweroff")
#: Highest line offset accepted (a Raspberry Pi's chip has 54 lines; expanders fewer).
MAX_GPIO_LINE = 1023


@dataclass(frozen=True)
class InputsSection:
    """``[inputs]``: the GPIO chip, its lines (drivers/inputs.py) and how to power off."""

    chip: str
    spec: InputsSpec
    shutdown_command: tuple[str, ...] = DEFAULT_SHUTDOWN_COMMAND


@dataclass(frozen=True)
class DeviceSection:
    name: str
    kind: DeviceClass
    path: str
    baudrate: int = DEFAULT_DEVICE_BAUD


@dataclass(frozen=True)
class GnssSection:
    path: str
    baudrate: int = DEFAULT_GNSS_BAUD
    fix_interval_s: float = DEFAULT_FIX_INTERVAL_S
    #: Where the unit was installed; leaving it is the ``gateway.moved`` alarm.
    installed: Installed | None = None


@dataclass(frozen=True)
class TagsSection:
    """``[tags]``: how a tag's presence goes out as intervals (docs/records.md)."""

    #: An open presence interval is closed (``max_age``) once its first beacon is this old.
    interval_max_s: float = DEFAULT_INTERVAL_MAX_S
    #: A receiver that may defer its ACKs (a window of frames) has a beacon that only
    #: extends an interval committed within this many seconds, sharing one fsync.
    interval_checkpoint_s: float = DEFAULT_INTERVAL_CHECKPOINT_S


@dataclass(frozen=True)
class UplinkSection:
    """``[uplink]``: how the records go out (uplink/forwarder.py)."""

    #: Records of the position and heartbeat classes wait up to this many seconds to share
    #: a message. Built in code (the lab, tests, the demo) it is 0, every record going out
    #: at once; a configuration file without the key gets :data:`DEFAULT_UPLINK_LINGER_S`.
    linger_s: float = 0.0
    #: Send records messages compressed (core/deflate.py): only once the platform reads
    #: them (a platform from before quarantines them). Off unless set, from a file too.
    deflate: bool = False


@dataclass(frozen=True)
class Config:
    """What the gateway runs with: read from TOML by :func:`load_config`, or built in code
    (the demo, tests) with the same types."""

    data_dir: Path
    broker: BrokerConfig
    devices: list[DeviceSection] = field(default_factory=list)
    gnss: GnssSection | None = None
    identity_dir: Path | None = None
    source: Path | None = None  # the file it was read from
    #: The record store's disk quota (``[gateway] quota_bytes``); None: derived from the
    #: filesystem of data_dir (``buffer.store.default_quota``).
    quota_bytes: int | None = None
    #: ``[inputs]``: enclosure switch, mains, UPS; None: no such inputs.
    inputs: InputsSection | None = None
    #: ``[enrolment]``: when the certificate renews itself (provisioning/renewal.py).
    renewal: RenewalPolicy = field(default_factory=RenewalPolicy)
    #: ``[gateway] region``: the region whose command keys this gateway accepts besides the
    #: province-wide ones (docs/command-keys.md); None: only those.
    region: str | None = None
    #: ``[paths] runtime_dir``: where the running gateway writes its state.json every second
    #: (app/state.py; tmpfs, never the SD card). From a file it defaults to
    #: :data:`app.state.DEFAULT_RUNTIME_DIR`; None (built in code): no state file.
    runtime_dir: Path | None = None
    #: ``[supervision] require_authorisation``: a paired tag's presence is recorded only
    #: inside a period the platform authorised (``set-authorisation``), never on a pairing
    #: alone; false only on a bench or in a lab (docs/supervision.md). The same default
    #: from a file and in code: a forgotten setting fails closed.
    require_authorisation: bool = DEFAULT_REQUIRE_AUTHORISATION
    #: ``[tags]``: presence intervals.
    tags: TagsSection = field(default_factory=TagsSection)
    #: ``[uplink]``: the linger of the non-urgent classes.
    uplink: UplinkSection = field(default_factory=UplinkSection)

    @property
    def identity_path(self) -> Path:
        """The identity directory (``[gateway] identity_dir``)."""
        if self.identity_dir is None:
            raise ConfigError(f"{self.source or 'configuration'}: [gateway] identity_dir is "
                              "required: the directory 'provision init' made")
        return self.identity_dir


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
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value!r}")
        return value

    def baudrate(self, default: int) -> int:
        baud = self.get("baudrate", int, default)
        if not MIN_BAUD <= baud <= MAX_BAUD:
            raise self.error("baudrate", f"must be {MIN_BAUD}-{MAX_BAUD} (the device's serial "
                                         f"speed, e.g. {default}), got {baud}")
        return baud

    def path(self, key: str, *, required: bool = False, must_exist: bool = False) -> Path | None:
        """A file or directory path: never empty (Path("") is the current directory)."""
        text = self.get(key, str, required=required)
        if text is None:
            return None
        path = Path(self.checked_path(key, text))
        if must_exist and not path.exists():
            raise self.error(key, f"file {path} does not exist")
        return path

    def device(self, key: str = "path", example: str = "/dev/serial/by-id/...") -> str:
        """A required device path (a serial port, a GPIO chip): never empty."""
        return self.checked_path(key, self.get(key, str, required=True), example)

    def checked_path(self, key: str, text: str, example: str = "") -> str:
        """*text* when it can name a file: not empty nor blank, no NUL byte."""
        hint = f", e.g. {example}" if example else ""
        if not text.strip():
            raise self.error(key, f"is empty: give a path{hint}")
        if "\0" in text:
            raise self.error(key, f"holds a NUL character: give a path{hint}")
        return text

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
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}]: unknown section")
    gw = _Section(path, "gateway", raw.get("gateway", {}))
    identity_dir = gw.path("identity_dir", required=True)
    data_dir = gw.path("data_dir", required=True)
    quota_bytes = gw.get("quota_bytes", int, None)
    region = gw.get("region", str, None)
    if region is not None:
        try:
            check_region(region, allow_any=False)
        except CommandKeyError:
            raise gw.error("region", f"{region!r} is not a region name: 1-63 lower-case "
                                     "letters, digits and '-', as the platform's command keys "
                                     "name it (leave it out: province-wide keys only)") from None
    if quota_bytes is not None and quota_bytes < MIN_QUOTA_BYTES:
        raise gw.error("quota_bytes", f"must be at least {MIN_QUOTA_BYTES} (256 KiB), got "
                                      f"{quota_bytes}; leave it out to derive it from the disk")
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise gw.error("data_dir", f"{data_dir} is not a directory: give a directory (the "
                                   "gateway creates it when missing)")
    gw.done()
    if identity_dir is None or data_dir is None:  # pragma: no cover - required=True above
        raise gw.error(None, "identity_dir and data_dir are required")
    if "broker" not in raw:
        raise ConfigError(f"{path}: [broker]: section is required (host, port, TLS files)")
    return Config(
        data_dir=data_dir,
        broker=_broker(_Section(path, "broker", raw["broker"])),
        devices=_devices(path, raw.get("devices", [])),
        gnss=_gnss(_Section(path, "gnss", raw["gnss"])) if "gnss" in raw else None,
        identity_dir=identity_dir,
        source=path,
        quota_bytes=quota_bytes,
        region=region,
        inputs=_inputs(_Section(path, "inputs", raw["inputs"])) if "inputs" in raw else None,
        renewal=_renewal(_Section(path, "enrolment", raw.get("enrolment", {}))),
        runtime_dir=_runtime_dir(_Section(path, "paths", raw.get("paths", {})), data_dir),
        require_authorisation=_supervision(_Section(path, "supervision",
                                                    raw.get("supervision", {}))),
        tags=_tags(_Section(path, "tags", raw.get("tags", {}))),
        uplink=_uplink(_Section(path, "uplink", raw.get("uplink", {}))),
    )


def _uplink(sec: _Section) -> UplinkSection:
    linger = sec.get("linger_s", float, DEFAULT_UPLINK_LINGER_S)
    low, high = UPLINK_LINGER_RANGE
    if not low <= linger <= high:
        raise sec.error("linger_s", f"must be {low:g}-{high:g} seconds (how long positions "
                                    "and health records may wait to share one message; 0 "
                                    f"sends each at once; default "
                                    f"{DEFAULT_UPLINK_LINGER_S:g}), got {linger:g}")
    deflate = sec.get("deflate", bool, False)
    sec.done()
    return UplinkSection(linger, deflate)


def _supervision(sec: _Section) -> bool:
    """``[supervision] require_authorisation`` (a boolean)."""
    required = sec.get("require_authorisation", bool, DEFAULT_REQUIRE_AUTHORISATION)
    sec.done()
    return required


def _tags(sec: _Section) -> TagsSection:
    max_s = sec.get("interval_max_s", float, DEFAULT_INTERVAL_MAX_S)
    checkpoint_s = sec.get("interval_checkpoint_s", float, DEFAULT_INTERVAL_CHECKPOINT_S)
    low, high = INTERVAL_MAX_RANGE
    if not low <= max_s <= high:
        raise sec.error("interval_max_s", f"must be {low:g}-{high:g} seconds (a tag's "
                                          "presence interval is closed at most this old; "
                                          f"default {DEFAULT_INTERVAL_MAX_S:g}), got {max_s:g}")
    low, high = INTERVAL_CHECKPOINT_RANGE
    if not low <= checkpoint_s <= high:
        raise sec.error("interval_checkpoint_s", f"must be {low:g}-{high:g} seconds (how long "
                                                 "a windowed receiver's beacons wait to share "
                                                 "a commit; default "
                                                 f"{DEFAULT_INTERVAL_CHECKPOINT_S:g}), got "
                                                 f"{checkpoint_s:g}")
    sec.done()
    return TagsSection(max_s, checkpoint_s)


def _runtime_dir(sec: _Section, data_dir: Path) -> Path:
    """``[paths] runtime_dir``: an absolute directory on tmpfs, outside data_dir."""
    runtime = sec.path("runtime_dir") or DEFAULT_RUNTIME_DIR
    sec.done()
    if not runtime.is_absolute():
        raise sec.error("runtime_dir", f"{runtime} is relative: give an absolute directory on "
                                       f"tmpfs, e.g. {DEFAULT_RUNTIME_DIR} (systemd "
                                       "RuntimeDirectory=smartcorr)")
    if runtime.exists() and not runtime.is_dir():
        raise sec.error("runtime_dir", f"{runtime} is not a directory: give a directory (the "
                                       "gateway creates it when missing)")
    inside = runtime.absolute()
    if inside == data_dir.absolute() or data_dir.absolute() in inside.parents:
        raise sec.error("runtime_dir", f"{runtime} is inside data_dir {data_dir}: the state "
                                       "is rewritten every second, so give a directory on "
                                       f"tmpfs, e.g. {DEFAULT_RUNTIME_DIR}, never the SD card")
    return runtime


def _broker(sec: _Section) -> BrokerConfig:
    tls = sec.get("tls", bool, True)
    plaintext = sec.get("insecure_plaintext", bool, False)
    if not tls and not plaintext:
        raise sec.error("tls", "false sends every record unencrypted: set tls = true with "
                               "ca_file, cert_file and key_file, or opt in with "
                               "insecure_plaintext = true (test benches only)")
    if plaintext and tls:
        raise sec.error("insecure_plaintext", "applies only with tls = false: remove it")
    host = sec.get("host", str, required=True)
    if not host.strip():
        raise sec.error("host", "is empty: give the broker's host name or address")
    port = sec.get("port", int, DEFAULT_MQTTS_PORT)
    ca, cert, key = (sec.path(name, required=tls, must_exist=True)
                     for name in ("ca_file", "cert_file", "key_file"))
    broker = BrokerConfig(host, port, _text(ca), _text(cert), _text(key), tls=tls)
    if not 1 <= broker.port <= MAX_PORT:
        raise sec.error("port", f"must be 1-{MAX_PORT}, got {broker.port}")
    sec.done()
    return broker


#: The bounds of ``[enrolment]``'s keys.
RENEW_BEFORE_DAYS_RANGE = (1.0, 365.0)
LIFE_SHARE_RANGE = (0.05, 1.0)


def _renewal(sec: _Section) -> RenewalPolicy:
    enabled = sec.get("renew", bool, True)
    before = sec.get("renew_before_days", float, DEFAULT_RENEW_BEFORE_DAYS)
    share = sec.get("renew_life_share", float, DEFAULT_LIFE_SHARE)
    low, high = RENEW_BEFORE_DAYS_RANGE
    if not low <= before <= high:
        raise sec.error("renew_before_days", f"must be {low:g}-{high:g} days (how long before "
                                             f"its expiry the certificate is renewed; default "
                                             f"{DEFAULT_RENEW_BEFORE_DAYS:g}), got {before:g}")
    low, high = LIFE_SHARE_RANGE
    if not low <= share <= high:
        raise sec.error("renew_life_share", f"must be {low:g}-{high:g} (the last share of a "
                                            "short certificate's life over which it is "
                                            f"renewed; default 0.33), got {share:g}")
    sec.done()
    return RenewalPolicy(enabled, before, share)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _devices(path: Path, tables: Any) -> list[DeviceSection]:
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: devices: use [[devices]] tables")
    devices: list[DeviceSection] = []
    for index, table in enumerate(tables):
        sec = _Section(path, f"devices.{index}", table)
        name = sec.get("name", str, required=True)
        kind = sec.get("kind", str, required=True)
        if kind not in DEVICE_KINDS:
            raise sec.error("kind", f"must be one of {', '.join(DEVICE_KINDS)}, got {kind!r}")
        if any(d.name == name for d in devices):
            raise sec.error("name", f"{name!r} is used by another device")
        devices.append(DeviceSection(name, DEVICE_KINDS[kind], sec.device(),
                                     sec.baudrate(DEFAULT_DEVICE_BAUD)))
        sec.done()
    return devices


def _gnss(sec: _Section) -> GnssSection:
    path = sec.device("path", "/dev/ttyACM0")
    baudrate = sec.baudrate(DEFAULT_GNSS_BAUD)
    fix_interval_s = sec.get("fix_interval_s", float, DEFAULT_FIX_INTERVAL_S)
    if fix_interval_s <= 0:
        raise sec.error("fix_interval_s", "must be positive")
    lat = sec.get("installed_lat", float, None)
    lon = sec.get("installed_lon", float, None)
    radius_m = sec.get("move_radius_m", int, DEFAULT_MOVE_RADIUS_M)
    after_s = sec.get("move_after_s", float, DEFAULT_MOVE_AFTER_S)
    if (lat is None) != (lon is None):
        raise sec.error("installed_lat", "give installed_lat and installed_lon together")
    if lat is not None and not -90 <= lat <= 90:
        raise sec.error("installed_lat", f"must be -90..90, got {lat}")
    if lon is not None and not -180 <= lon <= 180:
        raise sec.error("installed_lon", f"must be -180..180, got {lon}")
    if after_s < 0:
        raise sec.error("move_after_s", f"must be 0 or more seconds, got {after_s}")
    if radius_m < MIN_MOVE_RADIUS_M:
        raise sec.error("move_radius_m", f"must be at least {MIN_MOVE_RADIUS_M} "
                                         "(GNSS error is metres)")
    installed = None
    if lat is not None and lon is not None:
        installed = Installed(round(lat * 1e7), round(lon * 1e7), radius_m, after_s)
    gnss = GnssSection(path, baudrate, fix_interval_s, installed)
    sec.done()
    return gnss


def _inputs(sec: _Section) -> InputsSection:
    chip = sec.checked_path("chip", sec.get("chip", str, DEFAULT_GPIO_CHIP), DEFAULT_GPIO_CHIP)
    defaults = {"enclosure": DEFAULT_ENCLOSURE_DEBOUNCE_MS, "mains": DEFAULT_MAINS_DEBOUNCE_MS,
                "ups_low": DEFAULT_UPS_LOW_DEBOUNCE_MS}
    lines: dict[str, LineSpec | None] = {}
    used: dict[int, str] = {}
    for name, default_ms in defaults.items():
        offset = sec.get(f"{name}_line", int, None)
        active = sec.get(f"{name}_active", str, "high")
        debounce_ms = sec.get(f"{name}_debounce_ms", int, default_ms)
        if active not in ("high", "low"):
            raise sec.error(f"{name}_active", f'must be "high" or "low" (the level the line '
                                              f"reads when it is {_MEANING[name]}), got {active!r}")
        if not 0 <= debounce_ms <= MAX_DEBOUNCE_MS:
            raise sec.error(f"{name}_debounce_ms", f"must be 0-{MAX_DEBOUNCE_MS} ms (default "
                                                   f"{default_ms}), got {debounce_ms}")
        if offset is None:
            lines[name] = None
            continue
        if not 0 <= offset <= MAX_GPIO_LINE:
            raise sec.error(f"{name}_line", f"must be a line offset 0-{MAX_GPIO_LINE} on {chip} "
                                            f"(gpioinfo lists them), got {offset}")
        if offset in used:
            raise sec.error(f"{name}_line", f"line {offset} is already {used[offset]}_line: "
                                            "give each input its own line")
        used[offset] = name
        lines[name] = LineSpec(offset, active == "high", debounce_ms)
    if not used:
        raise sec.error(None, "names no line: give enclosure_line, mains_line or ups_low_line "
                              "(or remove the table)")
    runtime_s = sec.get("ups_runtime_s", float, None)
    margin_s = sec.get("shutdown_margin_s", float, DEFAULT_SHUTDOWN_MARGIN_S)
    if margin_s < 0:
        raise sec.error("shutdown_margin_s", f"must be 0 or more seconds, got {margin_s}")
    if runtime_s is not None:
        if lines["mains"] is None:
            raise sec.error("ups_runtime_s", "needs mains_line: the budget starts when mains "
                                             "is lost")
        if runtime_s <= margin_s:
            raise sec.error("ups_runtime_s", f"must exceed shutdown_margin_s ({margin_s:g} s): "
                                             "the UPS's runtime on battery, seconds")
    command = sec.get("shutdown_command", list, list(DEFAULT_SHUTDOWN_COMMAND))
    if not command or not all(isinstance(arg, str) and arg for arg in command):
        raise sec.error("shutdown_command", 'must be a non-empty list of strings (argv, no '
                                            'shell), e.g. ["systemctl", "poweroff"]')
    spec = InputsSpec(lines["enclosure"], lines["mains"], lines["ups_low"], runtime_s, margin_s)
    section = InputsSection(chip, spec, tuple(command))
    sec.done()
    return section


_MEANING = {"enclosure": "open", "mains": "powered", "ups_low": "low on battery"}
