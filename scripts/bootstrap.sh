#!/usr/bin/env bash
# Set up .venv/ in the project root: torch first (the CPU wheel 2.13.0 where it lies on disk; set
# TORCH_SPEC to choose another), then MoETune and its dependencies. Quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: MoETune needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "bootstrap: installing torch (${TORCH_SPEC:-torch==2.13.0})"
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi

stamp=.venv/.moetune-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/moetune ]; then
  echo "bootstrap: installing MoETune and its dependencies into .venv/"
  "${PIP[@]}" install -e ".[dev]"
  echo "$want" > "$stamp"
fi
scripts/llama_converters.sh  # llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py into .venv/llama.cpp/ (tests run them)

# The browser test drives Debian's Chromium (never a browser downloaded by Playwright). Install it when
# it is missing and we can: as root, with apt-get. Otherwise skip quietly; that test then skips itself.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing chromium (apt-get) for the browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "bootstrap: could not install chromium; the browser test will be skipped" >&2
fi
