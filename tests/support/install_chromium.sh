#!/bin/sh
# Installs headless Chromium and its WebDriver from Debian's packages when absent;
# tests/unit/test_report.py opens the evaluation page in it. Run by `make test` (as root).
set -e
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "tests/support/install_chromium.sh: Chromium is missing; run 'sudo apt-get install -y chromium chromium-driver' (needs root)." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium chromium-driver
