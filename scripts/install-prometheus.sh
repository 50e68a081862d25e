#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package (for the dashboard and
# alert-rule checks in the test suite and for `make prometheus`). Idempotent. Needs root or
# sudo (apt); `make demo` does not run it.
#
# The package's service is not wanted: the tests start their own Prometheus on a free port,
# `make prometheus` one on 127.0.0.1:9090. Its install starts the service (through
# invoke-rc.d, or systemd) unless /usr/sbin/policy-rc.d refuses; so while installing, a
# policy-rc.d that refuses every start is put in place if there is none, and removed after.
# Nothing already running is stopped. With systemd, Debian still enables the unit for the
# next boot: the script says so.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# scripts/install-prometheus.sh: no service starts while it installs.\nexit 101\n' |
    $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "installed: $(prometheus --version 2>&1 | head -1)"
if [ -d /run/systemd/system ]; then
  echo "note: prometheus.service was not started but is enabled at boot;" \
    "'sudo systemctl disable prometheus' turns that off"
fi
