"""The gateway's side of ``request-diag`` (docs/commands.md, "request-diag"): a redacted
diagnostic bundle built in memory and sent back in chunks.

* **plan** (before the pending file): the bundle is built in memory, always redacted
  (app/diag.py's rules: no key, no person's reference, no position; there is no way to ask
  for personal data here, core/diag_transfer.py refuses the field). Over
  :data:`~core.diag_transfer.MAX_BUNDLE_BYTES` the command is refused: ``conflict``, its
  detail starting ``too_large:`` (it uses up the cseq: ask again for fewer sections).
* **apply**: nothing on the gateway changes; the ``command.applied`` record names the
  bundle (``details.bundle``: SHA-256, size, chunks, topic). After a crash between the
  pending file and the record the bundle is built again (its content is of that moment:
  the record names the one sent).
* **after the record is committed**: the chunks are published at QoS 1 on
  ``smartcorr/v1/gw/<gw>/diag/<request>`` over the uplink's connection. A bundle lost
  (the uplink down at that moment, the process stopped) is not sent again: the platform
  asks again with a new request.

What the bundle is built from (the configuration, how to publish) is given by the
assembly (:func:`serve`); one entry per gateway id in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.commands import EFFECTS, Applied, Context, Effect, Plan
from app.config import Config
from app.diag import (
    DEFAULT_LOG_LINES,
    LOG_MEMBER,
    Personal,
    add_member,
    buffer_report,
    bundle_state,
    certificate_dates,
    ports_report,
    read_daemon_state,
    recent_logs,
    redact_log_line,
    redacted_config,
    versions,
)
from core.commands import Command
from core.diag_transfer import CHUNK_BYTES, KIND, MAX_BUNDLE_BYTES, RequestDiag, chunks_of
from core.record import JSON
from core.topics import diag_topic

log = logging.getLogger(__name__)

#: The state an applied ``request-diag`` names (``state.of``): the bundle sent.
ROLE = "diag"
#: Publish one message at QoS 1 (topic, payload); False when it could not be queued.
Publish = Callable[[str, bytes], bool]


@dataclass(frozen=True)
class Served:
    config: Config
    publish: Publish
    log_file: Path | None = None
    log_lines: int = DEFAULT_LOG_LINES


_lock = threading.Lock()
_served: dict[str, Served] = {}
#: The bundle built by the plan of the command being answered (one per gateway).
_built: dict[str, tuple[int, bytes]] = {}


def serve(gateway_id: str, config: Config, publish: Publish, *, log_file: Path | None = None,
          log_lines: int = DEFAULT_LOG_LINES) -> None:
    """Let ``request-diag`` build bundles from *config* and send them with *publish*
    (the assembly, once its uplink exists); *log_file*: the daemon's log when it is a file
    (None: journald)."""
    with _lock:
        _served[gateway_id] = Served(config, publish, log_file, log_lines)


def unserve(gateway_id: str) -> None:
    with _lock:
        _served.pop(gateway_id, None)
        _built.pop(gateway_id, None)


def build_bundle(served: Served, sections: tuple[str, ...]) -> bytes:
    """A redacted bundle (tar.gz) of *sections*, in memory: the members ``diag bundle``
    writes, never personal data (app/diag.py's redaction), never a key."""
    cfg = served.config
    now_ms = time.time_ns() // 1_000_000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if "reports" in sections:
            state, daemon = read_daemon_state(cfg)
            status = bundle_state(state if daemon.running else None, include_personal=False)
            reports: dict[str, Any] = {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000)),
                "personal_data": False, "requested_by": "platform (request-diag)",
                "version": versions(state), "daemon": daemon.summary,
                "uplink": status.pop("uplink", None), "status": status,
                "certificates": certificate_dates(cfg, now_ms),
                "buffer": buffer_report(cfg), "ports": ports_report(cfg)}
            add_member(tar, "reports.json", json.dumps(reports, indent=2, default=str).encode())
        if "config" in sections and cfg.source is not None:
            add_member(tar, "gateway.json", json.dumps(redacted_config(cfg.source), indent=2,
                                                 default=str).encode())
        if "logs" in sections:
            logs = recent_logs(served.log_file, served.log_lines)
            personal = Personal.of(cfg)
            text = "".join(f"{redact_log_line(line, personal)}\n" for line in logs.lines)
            add_member(tar, LOG_MEMBER, text.encode())
            add_member(tar, "logs.json", json.dumps({
                "source": logs.source, "lines": len(logs.lines), "redacted": True,
                "note": logs.note}).encode())
    return buf.getvalue()


def _served_for(gateway_id: str) -> Served | None:
    with _lock:
        return _served.get(gateway_id)


def _build(gw: str, cmd: Command) -> bytes:
    served = _served_for(gw)
    if served is None:
        raise RuntimeError("no diagnostic source")
    body: RequestDiag = cmd.body
    return build_bundle(served, body.sections)


def _plan(ctx: Context, cmd: Command) -> Plan:
    gw = ctx.identity.gateway_id
    if _served_for(gw) is None:
        return Plan("this gateway process does not serve diagnostic bundles (it is "
                    "decommissioning, or runs without an uplink)")
    data = _build(gw, cmd)
    if len(data) > MAX_BUNDLE_BYTES:
        return Plan(f"too_large: the bundle is {len(data)} bytes, at most {MAX_BUNDLE_BYTES}: "
                    "ask for fewer sections")
    with _lock:
        _built[gw] = (cmd.cseq, data)
    return Plan(None, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def _apply(ctx: Context, cmd: Command, _facts: Mapping[str, JSON]) -> Applied:
    gw = ctx.identity.gateway_id
    body: RequestDiag = cmd.body
    with _lock:
        built = _built.pop(gw, None)
    data = built[1] if built is not None and built[0] == cmd.cseq else None
    if data is None:  # completed after a crash: built again, of this moment
        if _served_for(gw) is None:
            raise ValueError("no diagnostic source in this process yet")
        data = _build(gw, cmd)
        if len(data) > MAX_BUNDLE_BYTES:
            raise ValueError(f"too_large: the bundle is {len(data)} bytes, at most "
                             f"{MAX_BUNDLE_BYTES}")
    sha = hashlib.sha256(data).hexdigest()
    chunks = chunks_of(data, gw=gw, request=body.request, cseq=cmd.cseq)
    topic = diag_topic(gw, body.request)
    details: dict[str, JSON] = {
        "request": body.request, "sections": list(body.sections), "personal_data": False,
        "bundle": {"sha256": sha, "size": len(data), "chunks": len(chunks),
                   "chunk_bytes": CHUNK_BYTES, "topic": topic}}

    def send(_devices: object) -> None:
        served = _served_for(gw)
        sent = 0
        if served is not None:
            for payload in chunks:
                try:
                    ok = served.publish(topic, payload)
                except (RuntimeError, OSError, ValueError) as exc:
                    log.warning("diagnostic bundle %s: chunk %d not sent: %s",
                                body.request, sent, exc)
                    ok = False
                if not ok:
                    break
                sent += 1
        if sent == len(chunks):
            log.info("diagnostic bundle %s sent: %d bytes in %d chunks on %s", body.request,
                     len(data), sent, topic)
        else:
            log.warning("diagnostic bundle %s: %d of %d chunks sent (the uplink is down): "
                        "the platform may ask again", body.request, sent, len(chunks))

    return Applied(ROLE, sha, details, False, [], send)


EFFECT = Effect(_plan, _apply)


EFFECTS[KIND] = EFFECT  # the kind's entry in app/commands.py's table (imported by assembly)
