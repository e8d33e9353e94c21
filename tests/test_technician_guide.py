"""The technician's guide (docs/technician-guide.md) is a real run: ``python -m
lab.technician_guide`` run here, each command it shows exiting as it says, its sections and
what a technician meets there (the uplink down, a port unplugged, the live view, the
bundle without the tag's id); the committed guide has the generator's shape; a guide that
would hold a key, a position or a person reference is not written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lab import technician_guide as tg
from tests.conftest import REPO
from tests.helpers import plaintext_config

COMMITTED = REPO / "docs" / "technician-guide.md"
#: The generator's run (45 s on a quiet machine of 2 cores, 91 s under a load of 7) sits in
#: the first test's setup: that test gets longer than the suite's per-test bound.
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """The generator run once as typed: its JSON summary, the guide, the kept site."""
    if shutil.which("tmux") is None or not tg.CAPTURE.is_file():
        pytest.skip("needs tmux and ../shared/data (scripts/setup.sh --test)")
    tmp = tmp_path_factory.mktemp("guide")
    out, site = tmp / "guide.md", tmp / "site"
    done = subprocess.run([sys.executable, "-m", "lab.technician_guide", "--out", str(out),
                           "--keep", str(site), "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=360, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    print(f"technician guide generated in {summary['elapsed_s']} s")
    return summary, out.read_text(), site


def step_at(markdown: str, command: str, start: int = 0) -> tuple[str, int]:
    """What the guide shows after ``$ command`` (its first from *start*) up to the next
    step, and where that ends."""
    start = markdown.index(f"$ {command}\n", start)
    end = markdown.find("\n### ", start)
    end = end if end >= 0 else len(markdown)
    return markdown[start:end], end


def blocks_after(markdown: str, command: str) -> str:
    return step_at(markdown, command)[0]


@pytest.mark.slow
def test_each_command_exits_as_the_guide_says(
        generated: tuple[dict[str, Any], str, Path]) -> None:
    summary, guide, _ = generated
    assert summary["ok"] is True
    assert summary["elapsed_s"] < 90  # about 40 s on the development machine
    headings = [line[3:] for line in guide.splitlines() if line.startswith("## ")]
    assert headings == [h for _, h, _ in tg.SECTIONS] + ["Needs hardware", "This run"]
    shown = [s for s in summary["steps"] if s["kind"] in ("command", "screen")]
    assert len(shown) >= 25
    at = 0
    for step in shown:  # in the guide's order
        assert step["exit"] == step["expected"], step
        block, at = step_at(guide, step["command"], at)
        assert f"Exit status {step['exit']} (" in block, step
    # what a technician meets, each as it happened
    exits = {(s["section"], s["title"]): s["exit"] for s in shown}
    assert exits[("ports", "the ports, the GNSS receiver unplugged")] == 1
    assert exits[("uplink", "check the installation, the broker down")] == 1
    assert exits[("support", "the tag's id is not in it")] == 1
    assert exits[("leaves", "status afterwards")] == 3
    assert re.search(r"^Uplink   DOWN since \d\d:\d\d \(refused\), \d+ queued", guide,
                     re.MULTILINE)
    down = summary["facts"]["queued_while_down"]
    assert down[1] > down[0] >= 0
    assert "uplink lost the broker 127.0.0.1:" in guide
    assert "(connection closed: the broker stopped or the network failed)" in guide
    assert "Unspecified error" not in guide
    assert "uplink cannot connect: nothing accepts connections at 127.0.0.1:" in guide
    assert "uplink connected again to 127.0.0.1:" in guide
    assert "FAIL broker TCP" in guide
    # the by-id name gone with its simulator, or still there (a link to nothing) when the
    # simulator had not removed it yet: the port is missing either way
    assert re.search(r"^  - gnss: missing( \(a link to nothing\))?: ", guide, re.MULTILINE)
    screen = blocks_after(guide, "python gateway.py status --config $SITE/gateway.toml "
                                 "--watch")
    assert "every 1 s; q quits" in screen
    assert "Uplink   connected to 127.0.0.1:" in screen
    bundle = blocks_after(guide, "tar -tzvf $SITE/support.tar.gz")
    assert all(name in bundle for name in ("reports.json", "gateway.json", "logs.txt"))
    assert "```\n0\n```" in blocks_after(guide, "tar -xzOf $SITE/support.tar.gz | grep -c "
                                                f"{tg.TAG}")
    assert "coverage: GOOD" in guide
    for needs in ("walking a real home", "a real USB", "fresh Raspberry Pi OS",
                  "TPM 2.0"):
        assert needs in guide, needs
    assert guide.count("**Needs hardware**") >= 5
    assert "--no-tpm" in guide
    assert "../shared/data/nmea/ublox-8.log" in guide


@pytest.mark.slow
def test_the_guide_holds_no_key_position_or_person(
        generated: tuple[dict[str, Any], str, Path]) -> None:
    _, guide, site = generated
    # the keys that outlive the decommission (the identity's are destroyed by it; the
    # generator searched for them before): the tag's and kiosk's, the lab PKI's
    keys = [site / "tag.key", site / "kiosk.key", *(site / "pki").glob("*.key")]
    assert len(keys) >= 3
    forms = [form for key in keys for form in tg.key_forms(key.read_bytes())]
    fix = tg.first_fix(tg.CAPTURE)
    forms += tg.position_forms(fix.lat_e7, fix.lon_e7)
    forms += [f"{fix.lat_e7 / 1e7:.4f}", f"{abs(fix.lon_e7) / 1e7:.4f}", str(fix.lat_e7),
              tg.KIOSK_PERSON]
    for form in forms:
        assert form.lower() not in guide.lower(), form
    assert tg.personal_findings(guide, []) == []


@pytest.mark.slow
def test_the_committed_guide_is_the_generators_output_in_shape(
        generated: tuple[dict[str, Any], str, Path]) -> None:
    _, guide, _ = generated
    committed = COMMITTED.read_text()
    assert tg.shape(committed) == tg.shape(guide), (
        "docs/technician-guide.md is out of date: run python -m lab.technician_guide "
        "--out docs/technician-guide.md")
    assert "technician-guide.md" in (REPO / "README.md").read_text()


def test_a_guide_holding_a_key_a_position_or_a_person_is_not_written(tmp_path: Path) -> None:
    key = bytes(range(16))
    guide = tg.Guide(tmp_path, forbidden=[("key tag.key", form) for form in
                                          tg.key_forms(key.hex().encode() + b"\n")])
    step = tg.Step("recording", "a step", "python gateway.py status", output="fine",
                   returncode=0)
    guide.steps.append(step)
    assert "fine" in tg.checked_markdown(guide)  # nothing forbidden: written
    for leak in (f"the key is {key.hex()}", "home at 46.81234, -71.21456",
                 "$GNGGA,000941.00,4404.13387,N", "person=P-000042",
                 "7e 01 00 42 " * 6):
        step.output = leak
        with pytest.raises(tg.GuideError, match="personal data or a key, not written"):
            tg.checked_markdown(guide)
    step.output = f"tag {tg.TAG} present"  # a tag id is what a technician types
    assert tg.TAG in tg.checked_markdown(guide)


def test_status_says_whether_a_daemon_runs_when_the_config_is_wrong_elsewhere(
        tmp_path: Path) -> None:
    """After a decommission the TLS files are gone: the configuration no longer loads, but
    ``status`` needs only its runtime directory (a note says what is wrong)."""
    (tmp_path / "identity").mkdir()
    cfg = plaintext_config(tmp_path, tmp_path / "identity", extra=(
        f'[[devices]]\nname = "tags"\nkind = "tag_receiver"\npath = "{tmp_path}/tty"\n'))
    text = cfg.read_text().replace("tls = false\ninsecure_plaintext = true\n",
                                   f'ca_file = "{tmp_path}/gone/ca.crt"\n')
    cfg.write_text(text)
    done = subprocess.run([sys.executable, str(REPO / "gateway.py"), "status", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"status: note: {cfg}: [broker] ca_file: "), lines
    assert lines[1] == (f"status: the daemon is not running (no state in {tmp_path / 'run'}; "
                        "systemctl status smartcorr-gateway)")
    cfg.write_text("[paths]\nruntime_dir = 'relative'\n[broker\n")  # no usable runtime_dir
    done = subprocess.run([sys.executable, str(REPO / "gateway.py"), "status", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done.stderr
