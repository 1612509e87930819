#!/usr/bin/env bash
# Installs what Vigil needs on a fresh Debian machine: system packages (apt) and a venv in .venv.
# Usage: scripts/bootstrap.sh [run|test]   ("test" adds the servers the test suite starts by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

pkgs="python3-venv curl autoconf automake libtool"  # DTLSSocket (CoAPS) builds tinydtls from source
if [ "$mode" = test ]; then
  pkgs="$pkgs mosquitto mosquitto-clients redis-server postgresql libcoap3-bin chromium victoria-metrics influxdb docker-compose"
fi
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "bootstrap: installing$missing" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

py="${PYTHON:-python3.11}"; command -v "$py" >/dev/null || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python packages into .venv (log: .venv/install.log)" >&2
  if ! { .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[scaled,test]'; } >.venv/install.log 2>&1; then
    tail -n 20 .venv/install.log >&2
    exit 1
  fi
  touch "$stamp"
fi
