#!/usr/bin/env bash
# Install headless Chromium + chromedriver from Debian's packages for the browser test
# (tests/test_browser_*.py). Does nothing when /usr/bin/chromium is already there.
# Needs root (or sudo). Playwright drives this system Chromium: never run `playwright install`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install_browser.sh: /usr/bin/chromium is missing and this user is not root; run as root:" >&2
    echo "  apt-get install -y chromium chromium-driver" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
test -x /usr/bin/chromium
