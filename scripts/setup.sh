#!/usr/bin/env bash
# Prepare this checkout on Debian 12 / Raspberry Pi OS: system packages (python3-venv,
# mosquitto) when missing, a virtual env in .venv, and the project with its dependencies.
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   and the test tools (pytest, hypothesis, ruff, mypy)
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

say() { printf 'setup: %s\n' "$*" >&2; }

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else sudo_cmd=(); fi
fi

missing=()
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing+=(mosquitto)
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
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
