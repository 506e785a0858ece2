#!/usr/bin/env bash
# Create .venv (if missing) and install myvlm into it. Installs torch 2.13.0 (CPU wheel) only where no torch is
# present, so users keep their own CUDA build. `--test` adds the test tools (and Chromium for the browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$py" -m pip install -q -e ".${extra}"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The browser test of `myvlm serve` drives Debian's Chromium (Playwright never downloads a browser).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: the browser test needs Chromium: sudo apt-get install chromium" >&2
  fi
fi
