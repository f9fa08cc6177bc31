#!/usr/bin/env bash
# The statistics page is checked in a real headless browser (tests/test_statistics.py); install
# Debian's chromium when it is missing (unless another binary is given in CB_CHROMIUM).
set -euo pipefail
if [ -n "${CB_CHROMIUM:-}" ] && [ -x "${CB_CHROMIUM}" ]; then
  exit 0
fi
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "chromium not found; installing Debian's chromium" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
