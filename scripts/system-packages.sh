#!/usr/bin/env bash
# The real programs some tests drive: the chat page's headless browser (Debian's chromium, its driver,
# Japanese fonts) and nginx in front of two servers (tests/test_deploy.py). Installed with apt-get where this
# user may (root, or sudo without a password); elsewhere those tests skip and say which packages to install.
# policy-rc.d keeps apt from starting nginx as a service: the test runs its own on a loopback port.
set -euo pipefail
packages=(chromium chromium-driver fonts-noto-cjk nginx-light)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || { echo "setup: no apt-get; the browser and nginx tests will skip (need ${missing[*]})" >&2; exit 0; }
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "setup: cannot install ${missing[*]} without root; the browser and nginx tests will skip" >&2; exit 0; fi
log=$(mktemp)
export RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get install -y -q "${missing[@]}" || { "${sudo[@]}" apt-get update -q &&
       "${sudo[@]}" apt-get install -y -q "${missing[@]}"; }; } >"$log" 2>&1; then
  tail -20 "$log" >&2; echo "setup: installing ${missing[*]} failed; the browser and nginx tests will skip" >&2
fi
rm -f "$log"
