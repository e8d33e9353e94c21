"""``gateway.py provision config``: a commented configuration to start from.

Every key :mod:`app.config` reads is in it, with its default and what it is for: the keys
an installation must give are set (paths filled in from the options), the others
commented out at their defaults, so that uncommenting a line changes nothing until its
value is changed. The serial ports found in ``/dev/serial/by-id`` are filled in: a port
whose name says what it is (a tag receiver, a kiosk, a GNSS receiver, see
:data:`app.ports.ROLE_PATTERNS`) becomes its ``[[devices]]`` table or ``[gnss]``; any
other is listed, commented, with the choices. A role nobody was found for keeps a
commented example.

The installed position (``[gnss] installed_lat``/``installed_lon``) is personal data (the
supervised person's home): it is left for the installer to fill in on site, and the file
is written with mode 0600.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config import (
    DEFAULT_DEVICE_BAUD,
    DEFAULT_FIX_INTERVAL_S,
    DEFAULT_GNSS_BAUD,
    DEFAULT_GPIO_CHIP,
    DEFAULT_INTERVAL_CHECKPOINT_S,
    DEFAULT_MOVE_AFTER_S,
    DEFAULT_MOVE_RADIUS_M,
    DEFAULT_MQTTS_PORT,
    DEFAULT_REQUIRE_AUTHORISATION,
    DEFAULT_SHUTDOWN_COMMAND,
    DEFAULT_UPLINK_LINGER_S,
    MIN_MOVE_RADIUS_M,
)
from app.ports import list_by_id
from app.state import BY_ID_DIR, DEFAULT_RUNTIME_DIR
from core import durable
from core.errors import UserError
from drivers.inputs import (
    DEFAULT_ENCLOSURE_DEBOUNCE_MS,
    DEFAULT_MAINS_DEBOUNCE_MS,
    DEFAULT_SHUTDOWN_MARGIN_S,
    DEFAULT_UPS_LOW_DEBOUNCE_MS,
)
from drivers.tag_receiver import DEFAULT_INTERVAL_MAX_S
from provisioning.identity import CA_CERT, TLS_CERT, TLS_KEY
from provisioning.renewal import DEFAULT_LIFE_SHARE, DEFAULT_RENEW_BEFORE_DAYS

DEFAULT_IDENTITY_DIR = Path("/etc/smartcorr/identity")
#: The stable names packaging/udev_rules.py makes from /etc/smartcorr/devices.conf.
NAMES_DIR = Path("/dev/smartcorr")
DEFAULT_DATA_DIR = Path("/var/lib/smartcorr")
#: The broker's host until the installer gives the platform's (``provision check`` fails
#: on it: it does not resolve).
PLACEHOLDER_HOST = "mqtt.platform.example"
#: The file's mode: once filled in, it holds the installed position (personal data).
TEMPLATE_MODE = 0o600
#: ``[[devices]]`` names given to the ports found, by role (a second one gets "2", ...).
DEVICE_NAMES = {"tag_receiver": "tags", "kiosk": "kiosk"}


class TemplateError(UserError):
    """The template cannot be written as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Found:
    """A serial port found: its stable path (``/dev/smartcorr/<name>`` or a by-id link),
    the device it points to now, and the role its name suggests (None: unknown)."""

    path: Path
    device: str | None
    role: str | None


def find_ports(names_dir: Path = NAMES_DIR, by_id_dir: Path = BY_ID_DIR) -> list[Found]:
    """The ports of *names_dir* (the names the installer gave in devices.conf), then those
    of *by_id_dir* that point to another device."""
    found: list[Found] = []
    for directory in (names_dir, by_id_dir):
        for entry in list_by_id(directory) or []:
            if entry.device is not None and any(f.device == entry.device for f in found):
                continue  # named already
            found.append(Found(directory / entry.name, entry.device, entry.role))
    return found


@dataclass(frozen=True)
class Answers:
    """What the template is made with: the directories, the broker, the ports found."""

    identity_dir: Path = DEFAULT_IDENTITY_DIR
    data_dir: Path = DEFAULT_DATA_DIR
    host: str = PLACEHOLDER_HOST
    port: int = DEFAULT_MQTTS_PORT
    ports: tuple[Found, ...] = ()
    by_id_dir: Path = BY_ID_DIR


def _toml(value: object) -> str:
    """A TOML value: strings as basic strings (JSON's escapes are TOML's), lists of them,
    booleans, numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # exact: uncommenting a default changes nothing
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _key(name: str, value: object, comment: str, *, commented: bool = False) -> str:
    """``# comment`` above ``key = value``; a key left at its default is ``#key = value``
    (delete the ``#`` to set it)."""
    line = f"{'#' if commented else ''}{name} = {_toml(value)}"
    return f"# {comment}.\n{line}" if comment else line


def render(answers: Answers) -> str:
    """The whole template, as text."""
    found = {role: [p for p in answers.ports if p.role == role]
             for role in ("tag_receiver", "kiosk", "gnss")}
    unknown = [p for p in answers.ports if p.role is None]
    identity = answers.identity_dir
    change = ": CHANGE IT" if answers.host == PLACEHOLDER_HOST else ""
    out: list[str] = [
        "# SmartCorr gateway configuration (gateway.py provision config).",
        "# Every key the gateway reads is here: the ones an installation must give are set;",
        "# the others are commented out (#key = ...) at their default. Check it with",
        "#   gateway.py provision check --config THIS_FILE",
        "# and after a change restart the gateway. Mode 600: once filled in, [gnss] holds",
        "# the installed position, which is personal data.",
        "",
        "[gateway]",
        _key("identity_dir", str(identity), "The directory 'provision init' made"),
        _key("data_dir", str(answers.data_dir),
             "The record store's directory (created when missing)"),
        _key("quota_bytes", 2_000_000_000, "The store's disk quota, bytes (at least 262144; "
             "default: half the filesystem, less what others use)", commented=True),
        _key("region", "north", "The region whose command keys it accepts besides the "
             "province-wide ones (default: those only)", commented=True),
        "",
        "# The platform's MQTT broker: TLS with this gateway's certificate.",
        "[broker]",
        _key("host", answers.host, f"The broker's host name{change}"),
        _key("port", answers.port, "Its port (8883: MQTT over TLS)"),
        _key("ca_file", str(identity / CA_CERT),
             "The platform's CA ('provision enrol' installs it)"),
        _key("cert_file", str(identity / TLS_CERT),
             "This gateway's certificate (enrolment installs it)"),
        _key("key_file", str(identity / TLS_KEY), "Its key (mode 600; 'provision init' made it)"),
        _key("tls", True, "Plain MQTT (a test bench only): tls = false with "
             "insecure_plaintext = true", commented=True),
        _key("insecure_plaintext", False, "With tls = false: every record goes unencrypted",
             commented=True),
        "",
    ]
    out += _devices("tag_receiver", found["tag_receiver"], answers.by_id_dir,
                    "usb-SmartCorr_TagRx_0001-if00")
    out += _devices("kiosk", found["kiosk"], answers.by_id_dir, "usb-SmartCorr_Kiosk_0001-if00")
    out += _gnss(found["gnss"], answers.by_id_dir)
    out += _unknown(unknown)
    out += _optional_sections()
    return "\n".join(out) + "\n"


_NAME = "A name of your choice (logs, diag)"
_KIND = "What it is: tag_receiver or kiosk"
_SPEED = "Its serial speed"


def _devices(role: str, ports: list[Found], by_id_dir: Path, example: str) -> list[str]:
    what = {"tag_receiver": "The ankle-tag receiver", "kiosk": "The check-in kiosk"}[role]
    if not ports:
        return [f"# {what}: none found; plug it in and give its path.",
                "#[[devices]]",
                _key("name", DEVICE_NAMES[role], _NAME, commented=True),
                _key("kind", role, _KIND, commented=True),
                _key("path", str(by_id_dir / example),
                     "Its port (a by-id name stays put when USB devices move)", commented=True),
                _key("baudrate", DEFAULT_DEVICE_BAUD, _SPEED, commented=True),
                ""]
    out: list[str] = []
    for number, port in enumerate(ports, 1):
        name = DEVICE_NAMES[role] + (str(number) if number > 1 else "")
        out += [f"# {what}, found in {port.path.parent}.", "[[devices]]",
                _key("name", name, _NAME),
                _key("kind", role, _KIND),
                _key("path", str(port.path), f"Its port (now {port.device or 'unplugged'})"),
                _key("baudrate", DEFAULT_DEVICE_BAUD, _SPEED, commented=True),
                ""]
    return out


def _gnss(ports: list[Found], by_id_dir: Path) -> list[str]:
    first = ports[0] if ports else None
    if first is None:
        head = ["# The GNSS receiver: none found; plug it in and give its path.", "#[gnss]",
                _key("path", str(by_id_dir / "usb-u-blox_AG_-_www.u-blox.com_u-blox_GNSS_"
                                              "receiver-if00"), "Its port", commented=True)]
    else:
        head = [f"# The GNSS receiver, found in {first.path.parent}.", "[gnss]",
                _key("path", str(first.path), f"Its port (now {first.device or 'unplugged'})")]
    head += [f"# Another GNSS receiver found: {other.path} (one is used)."
             for other in ports[1:]]
    return [*head,
            _key("baudrate", DEFAULT_GNSS_BAUD, _SPEED, commented=True),
            _key("fix_interval_s", DEFAULT_FIX_INTERVAL_S,
                 "A gnss.fix record at most this often, seconds", commented=True),
            "# Where the unit is installed (personal data: the supervised person's home),",
            "# both set on site; leaving the place is the gateway.moved alarm.",
            _key("installed_lat", 0.0, "Latitude, degrees, -90..90 (no default: without it, "
                 "no moved alarm)", commented=True),
            _key("installed_lon", 0.0, "Longitude, degrees, -180..180 (no default)",
                 commented=True),
            _key("move_radius_m", DEFAULT_MOVE_RADIUS_M,
                 f"Moved: beyond this many metres (at least {MIN_MOVE_RADIUS_M}) ...",
                 commented=True),
            _key("move_after_s", DEFAULT_MOVE_AFTER_S, "... for this long, seconds",
                 commented=True),
            ""]


def _unknown(ports: list[Found]) -> list[str]:
    out: list[str] = []
    for port in ports:
        out += [f"# Found {port.path} (now {port.device or 'unplugged'}): its name",
                "# does not say what it is. If it is a tag receiver or a kiosk:",
                "#[[devices]]",
                _key("name", "a-name", "", commented=True),
                _key("kind", "tag_receiver", "", commented=True),
                _key("path", str(port.path), "", commented=True),
                "# If it is the GNSS receiver, give this path to [gnss] above.",
                ""]
    return out


_DEBOUNCE = "Changes shorter than this are ignored, ms"


def _optional_sections() -> list[str]:
    high = "high"
    return [
        "# GPIO lines: enclosure switch, mains, UPS (uncomment the table and what is wired).",
        "#[inputs]",
        _key("chip", DEFAULT_GPIO_CHIP, "The GPIO chip ('gpioinfo' lists its lines)",
             commented=True),
        _key("enclosure_line", 17, "The enclosure's tamper switch: its line (no default)",
             commented=True),
        _key("enclosure_active", high, "The level that means open: high or low",
             commented=True),
        _key("enclosure_debounce_ms", DEFAULT_ENCLOSURE_DEBOUNCE_MS, _DEBOUNCE,
             commented=True),
        _key("mains_line", 27, "Mains presence: its line (no default)", commented=True),
        _key("mains_active", high, "The level that means mains present: high or low",
             commented=True),
        _key("mains_debounce_ms", DEFAULT_MAINS_DEBOUNCE_MS, _DEBOUNCE, commented=True),
        _key("ups_low_line", 22, "The UPS's low-battery line (no default)", commented=True),
        _key("ups_low_active", high, "The level that means low on battery: high or low",
             commented=True),
        _key("ups_low_debounce_ms", DEFAULT_UPS_LOW_DEBOUNCE_MS, _DEBOUNCE, commented=True),
        _key("ups_runtime_s", 900.0, "The UPS's runtime on battery, seconds (needs "
             "mains_line; no default: no planned power-off)", commented=True),
        _key("shutdown_margin_s", DEFAULT_SHUTDOWN_MARGIN_S,
             "Power off this long before it runs out, seconds", commented=True),
        _key("shutdown_command", list(DEFAULT_SHUTDOWN_COMMAND),
             "The command that powers off, as a list (no shell)", commented=True),
        "",
        "# The certificate renews itself over the enrolment channel.",
        "#[enrolment]",
        _key("renew", True, "False: renew by hand ('provision renew')", commented=True),
        _key("renew_before_days", DEFAULT_RENEW_BEFORE_DAYS,
             "From this many days before its expiry (1-365) ...", commented=True),
        _key("renew_life_share", DEFAULT_LIFE_SHARE,
             "... or over this last share of a short certificate's life (0.05-1)",
             commented=True),
        "",
        "# A tag's presence goes out as signed intervals (docs/records.md tag.interval).",
        "#[tags]",
        _key("interval_max_s", DEFAULT_INTERVAL_MAX_S,
             "An interval is closed at most this old, seconds (10-900)", commented=True),
        _key("interval_checkpoint_s", DEFAULT_INTERVAL_CHECKPOINT_S,
             "A windowed receiver's beacons share one commit within this, seconds (1-30)",
             commented=True),
        "",
        "# Positions and health records wait up to linger_s in the store so one message",
        "# carries several (docs/records.md Transport); alarms, check-ins, status never wait.",
        "#[uplink]",
        _key("linger_s", DEFAULT_UPLINK_LINGER_S,
             "Seconds (0-300); 0 sends every record at once", commented=True),
        _key("deflate", False, "Compress each message (docs/records.md): only once the "
             "platform reads compressed messages", commented=True),
        "",
        "#[paths]",
        _key("runtime_dir", str(DEFAULT_RUNTIME_DIR), "Where the running gateway writes its "
             "state for 'gateway.py status' (tmpfs, never the SD card)", commented=True),
        "",
        "# The supervision rules the platform sets (docs/supervision.md).",
        "#[supervision]",
        _key("require_authorisation", DEFAULT_REQUIRE_AUTHORISATION,
             "A tag's presence is recorded only in a period the platform authorised "
             "(Art. 29); false: also a tag never authorised (a test bench only)",
             commented=True),
    ]


def write(text: str, out: Path, *, force: bool) -> None:
    """Write *text* to *out* (mode 0600, atomically); an existing file only with *force*."""
    if out.is_dir():
        raise TemplateError(f"--out {out} is a directory: give a file path, e.g. "
                            f"{out / 'gateway.toml'}")
    if not out.parent.is_dir():
        raise TemplateError(f"--out {out}: the directory {out.parent} does not exist: "
                            "create it first")
    if out.exists() and not force:
        raise TemplateError(f"--out {out} exists: give another path, or --force to replace "
                            "it (its content is lost)")
    try:
        durable.atomic_write(out, text.encode(), TEMPLATE_MODE)
    except OSError as exc:
        raise TemplateError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None


def summary(answers: Answers) -> dict[str, object]:
    """What was filled in, for ``--json`` and the human line."""
    return {"ports": [{"path": str(p.path), "device": p.device, "role": p.role}
                      for p in answers.ports],
            "by_id_dir": str(answers.by_id_dir)}


def answers_from(identity_dir: str | None, data_dir: str | None, broker: str | None,
                 ports: Sequence[Found], by_id_dir: Path = BY_ID_DIR) -> Answers:
    """The template's answers from the command's options (``--broker HOST[:PORT]``)."""
    host, port = PLACEHOLDER_HOST, DEFAULT_MQTTS_PORT
    if broker is not None:
        host, sep, port_text = broker.rpartition(":")
        if not sep:
            host, port_text = broker, str(DEFAULT_MQTTS_PORT)
        if not host.strip() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise TemplateError(f"--broker {broker}: give HOST or HOST:PORT, e.g. "
                                "mqtt.platform.example:8883")
        port = int(port_text)
    return Answers(
        identity_dir=Path(identity_dir).absolute() if identity_dir else DEFAULT_IDENTITY_DIR,
        data_dir=Path(data_dir).absolute() if data_dir else DEFAULT_DATA_DIR,
        host=host, port=port, ports=tuple(ports), by_id_dir=by_id_dir)
