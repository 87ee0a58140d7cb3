#!/usr/bin/env bash
# Create .venv and install kataru into it (idempotent). `scripts/setup.sh test` adds the test tools.
# A stamp keyed on pyproject.toml skips pip when nothing changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""; [ "${1:-}" = "test" ] && extras="[test,bench,train,eval,cluster]"
if [ "${1:-}" = "test" ]; then scripts/system-packages.sh; fi
stamp=".venv/.kataru-$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
# torch pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
# pip's output (setuptools' editable-install banner) goes to a log that is shown only when pip fails.
log=.venv/pip-install.log
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 &&
       .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"; } >"$log" 2>&1; then
  cat "$log" >&2; exit 1
fi
rm -f .venv/.kataru-*  # a stamp of another pyproject.toml no longer describes what is installed
touch "$stamp"
