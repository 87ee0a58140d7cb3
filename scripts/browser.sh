#!/usr/bin/env bash
# The headless browser the chat page's tests drive: Debian's chromium, its driver and Japanese fonts.
# Installed with apt-get where this user may (root, or sudo without a password); elsewhere the page's tests
# skip and say which packages to install.
set -euo pipefail
packages=(chromium chromium-driver fonts-noto-cjk)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || { echo "setup: no apt-get; the page tests will skip (need ${missing[*]})" >&2; exit 0; }
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "setup: cannot install ${missing[*]} without root; the page tests will skip" >&2; exit 0; fi
log=$(mktemp)
if ! { "${sudo[@]}" apt-get install -y -q "${missing[@]}" || { "${sudo[@]}" apt-get update -q &&
       "${sudo[@]}" apt-get install -y -q "${missing[@]}"; }; } >"$log" 2>&1; then
  tail -20 "$log" >&2; echo "setup: installing ${missing[*]} failed; the page tests will skip" >&2
fi
rm -f "$log"
