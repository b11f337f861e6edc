#!/usr/bin/env bash
# Installs what the dashboard's browser test (tests/browser.rs) needs:
# Debian's chromium and chromedriver. A no-op when both are there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-browser: need root to apt-get install chromium chromium-driver" >&2
  exit 1
fi
echo "install-browser: installing Debian's chromium and chromium-driver ..." >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
