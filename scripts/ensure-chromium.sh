#!/usr/bin/env bash
# Make sure a headless browser and its WebDriver are installed, for the dashboard's browser tests
# (tests/test_dashboard.py): Debian's chromium and chromium-driver. Idempotent: a no-op (a few ms) when
# both are there. Nothing is downloaded but Debian packages (no browser build of its own, no driver
# fetched at run time: selenium is pointed at /usr/bin/chromedriver).
set -euo pipefail

say() { echo "ensure-chromium: $*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "ERROR: chromium and chromedriver are needed for the dashboard tests; install them"
    say "  (Debian: apt-get install chromium chromium-driver) and retry."
    exit 1
fi
say "apt-get install chromium chromium-driver"
DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver </dev/null >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null || { say "ERROR: install finished without chromium/chromedriver"; exit 1; }
say "chromium $(chromium --version 2>/dev/null | awk '{print $2}') installed"
