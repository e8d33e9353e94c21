#!/usr/bin/env bash
# Prepare this checkout on Debian 12 / Raspberry Pi OS: system packages (python3-venv,
# mosquitto, the TPM's libtss2-dev and swtpm) when missing, a virtual env in .venv, and
# the project with its dependencies.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   and the test tools (pytest, hypothesis, ruff, mypy), a
#                             PostgreSQL server, mosquitto_sub and tmux for the tests
#   scripts/setup.sh --service what the installed service needs, no more: no broker and
#                             no software TPM (packaging/install.sh, docs/hardening.md)
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
service=0
[ "${1:-}" = "--test" ] && extra="[test]"
[ "${1:-}" = "--service" ] && service=1

say() { printf 'setup: %s\n' "$*" >&2; }

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else sudo_cmd=(); fi
fi

missing=()
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "$service" -eq 0 ] && ! command -v mosquitto >/dev/null 2>&1 && \
        [ ! -x /usr/sbin/mosquitto ]; then
    missing+=(mosquitto)
fi
# the TPM 2.0 (provisioning/tpm.py): tpm2-pytss has no wheels and builds against the
# TCG TSS (libtss2-dev, found with pkg-config) with a C compiler and Python's headers;
# swtpm is the software TPM of the tests, the bench and the demo (lab/swtpm.py)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists tss2-esys; then
    missing+=(libtss2-dev)
fi
command -v cc >/dev/null 2>&1 || missing+=(gcc)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    >/dev/null 2>&1 || missing+=(python3-dev)
[ "$service" -eq 1 ] || command -v swtpm >/dev/null 2>&1 || missing+=(swtpm swtpm-tools)
if [ -n "$extra" ]; then
    # the tests' own PostgreSQL server (lab/postgres.py: initdb, pg_ctl; the demo needs
    # none) and mosquitto_sub, which records the captures of tests/test_capture.py
    pg_bindir="$(pg_config --bindir 2>/dev/null || true)"
    if [ ! -x "${pg_bindir:-/nonexistent}/initdb" ] && \
            ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        missing+=(postgresql)
    fi
    command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    # a real terminal for 'gateway.py status --watch' (tests/test_status.py)
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    # tests/test_packaging.py: systemd-analyze verify/security, systemd-sysusers and
    # systemd-tmpfiles on the unit and the install tree; udevadm parses the udev rule
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    command -v udevadm >/dev/null 2>&1 || missing+=(udev)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "please install: ${missing[*]} (no apt-get on this machine)"; exit 1
    fi
    if [ "$(id -u)" -ne 0 ] && [ "${#sudo_cmd[@]}" -eq 0 ]; then
        say "need root to install ${missing[*]}: run as root or install sudo"; exit 1
    fi
    say "installing ${missing[*]} with apt-get"
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    say "creating the virtual env in .venv"
    rm -rf .venv
    python3 -m venv .venv
fi

hash="$(sha256sum < pyproject.toml | cut -c1-16)"
stamp=".venv/.installed-${hash}${extra:+-test}"
# an install with the test tools also serves the demo
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-${hash}-test" ]; then
    say "installing the project and its dependencies${extra:+ with test tools}"
    say "(the first install compiles tpm2-pytss against libtss2: about a minute)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
