#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with infer installed (editable) and
# llama.cpp compiled through llama-cpp-python. Seconds when already done; about ten minutes on
# two cores the first time (pip then keeps the built wheel in its cache).
#
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/setup.sh    # a CUDA build (after `rm -rf .venv`)
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
echo "Installing infer and building llama.cpp (about 10 minutes the first time)..." >&2
# No multimodal library: infer runs text models only.
CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "$want" > "$stamp"
