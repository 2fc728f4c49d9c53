#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with infer installed (editable) and
# llama.cpp compiled through llama-cpp-python. Seconds when already done; about ten minutes on
# two cores the first time (the built wheel is kept in .cache/wheels).
#
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/setup.sh    # a CUDA build (after `rm -rf .venv .cache/wheels`)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.infer-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-64)"
if [ -x .venv/bin/infer ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "infer needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
pin=$(sed -n 's/^ *"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)
# No multimodal library: infer runs text models only. On x86-64, no AMX kernels: -march=native
# turns them on wherever the CPU advertises AMX, and on virtual machines whose hypervisor does
# not really provide the tile state, the first AMX matrix multiply (Q4_0/Q4_1/Q8_0 weights)
# kills the process with a general protection fault.
# GGML_RPC=ON adds llama.cpp's RPC backend (libggml-rpc.so): `infer worker` and `--rpc`.
flags="-DLLAVA_BUILD=OFF -DGGML_RPC=ON"
if [ "$(uname -m)" = x86_64 ]; then
  flags="$flags -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
  flags="$flags -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
fi
mkdir -p .cache/wheels
# A wheel cached by an older set-up may lack the RPC backend: build it again then.
for whl in .cache/wheels/llama_cpp_python-*.whl; do
  [ -f "$whl" ] || continue
  if ! "$python" -m zipfile -l "$whl" | grep -q 'libggml-rpc\.so'; then
    echo "The cached $whl has no RPC backend (libggml-rpc.so); rebuilding it." >&2
    rm -f "$whl"
  fi
done
if ! ls .cache/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "Building llama.cpp through $pin (about 10 minutes the first time)..." >&2
  # Built here, never from pip's cache: a cached wheel may carry other build flags.
  CMAKE_ARGS="$flags ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
    .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    -w .cache/wheels "$pin"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --find-links .cache/wheels \
  --force-reinstall --no-deps .cache/wheels/llama_cpp_python-*.whl
.venv/bin/python -m pip install --quiet --disable-pip-version-check --find-links .cache/wheels -e ".[test]"
echo "$want" > "$stamp"
