#!/usr/bin/env bash
# The browser the console's tests drive (tests/integration/test_console_browser.py): Debian's chromium,
# installed with apt-get when missing and this runs as root (no prompt). Playwright's own browser
# download is never used. Without root or apt-get it says so and exits 0: those tests then skip,
# naming the reason.
set -euo pipefail

CHROMIUM="${MAAS_CHROMIUM:-/usr/bin/chromium}"
if [[ -x "$CHROMIUM" ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "installing chromium (Debian package) for the console's browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends -qq chromium >/dev/null ||
    { apt-get update -qq && apt-get install -y --no-install-recommends -qq chromium >/dev/null; }
else
  echo "warning: no $CHROMIUM and no root apt-get: the console's browser tests will be skipped" \
       "(Debian: apt-get install chromium)" >&2
fi
