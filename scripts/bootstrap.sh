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

# llama.cpp built for a CPU with AMX (GGML_NATIVE, llama-cpp-python's default) crashes with SIGSEGV on Q8_0 files
# (README, design notes). On such a CPU, build it for the same CPU minus AMX: AVX-512 kept, no AMX kernels.
NO_AMX="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON"
NO_AMX="$NO_AMX -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && [ -z "${CMAKE_ARGS:-}" ]; then
  export CMAKE_ARGS="$NO_AMX"
fi

stamp=.venv/.moetune-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/moetune ]; then
  echo "bootstrap: installing MoETune and its dependencies into .venv/"
  "${PIP[@]}" install -e ".[dev]"
  echo "$want" > "$stamp"
fi
if [ "${CMAKE_ARGS:-}" = "$NO_AMX" ] && .venv/bin/python -c 'import llama_cpp, sys
sys.exit("AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode())' 2>/dev/null; then
  echo "bootstrap: rebuilding llama-cpp-python without AMX (its AMX build crashes on Q8_0 files), ~5 min"
  version=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("llama_cpp_python"))')
  "${PIP[@]}" install --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$version"
fi
scripts/llama_converters.sh  # llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py into .venv/llama.cpp/ (tests run them)

# The browser test drives Debian's Chromium (never a browser downloaded by Playwright). Install it when
# it is missing and we can: as root, with apt-get. Otherwise skip quietly; that test then skips itself.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing chromium (apt-get) for the browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "bootstrap: could not install chromium; the browser test will be skipped" >&2
fi
