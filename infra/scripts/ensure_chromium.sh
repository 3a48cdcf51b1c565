#!/usr/bin/env bash
# Make a headless Chromium available for the web-page test (tests/test_serving_v1.py).
# Prints the browser's path on success; exits non-zero with a reason on stderr otherwise.
# Debian package only (no browser download by a tool of its own): apt-get install chromium.
set -euo pipefail

find_browser() {
  for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

if path=$(find_browser); then echo "$path"; exit 0; fi

. "$(dirname "$0")/apt_lib.sh"
apt_ready chromium chromium
apt_install chromium fonts-dejavu-core || { echo "apt-get install chromium failed" >&2; exit 3; }
find_browser || { echo "chromium installed but not on PATH" >&2; exit 4; }
