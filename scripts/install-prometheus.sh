#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package (for the dashboard and
# alert-rule checks in the test suite and for `make prometheus`). Idempotent.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The package's service is not needed (and cannot start without systemd): keep it stopped.
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
$SUDO pkill -x prometheus 2>/dev/null || true
echo "installed: $(prometheus --version 2>&1 | head -1)"
