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

if ! command -v apt-get >/dev/null 2>&1; then
  echo "no chromium and no apt-get on this machine" >&2; exit 2
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "no chromium, and installing it needs root (run: apt-get install -y chromium)" >&2; exit 2
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# An update first: on a fresh machine the package lists may be empty or stale.
$SUDO apt-get update -qq >&2 || echo "apt-get update failed; trying the install anyway" >&2
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2 || {
  echo "apt-get install chromium failed" >&2; exit 3; }
find_browser || { echo "chromium installed but not on PATH" >&2; exit 4; }
