#!/usr/bin/env bash
# Assembles .gpu/ (git-ignored) for checking `infer fit`'s GPU plan on a lent CUDA machine:
# the llama.cpp source that llama-cpp-python vendors (only what a CUDA build of libllama needs),
# the pure-Python packages that machine lacks, and scripts/gpu/{run.sh,measure.py}.
# Then, with the device tool: run `bash .gpu/run.sh` with carry [".gpu"] (builds libllama for
# sm_90 in ~190 s on 16 cores, writes synthetic Llama-8B / Gemma-27B-shaped models, loads them
# with partial offload and prints fit.plan's prediction beside llama.cpp's buffers; ~220 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
src=.cache/native/src
[ -f "$src/CMakeLists.txt" ] || scripts/native.sh >/dev/null  # fetches (and builds) the vendored tree
site=$(echo .venv/lib/python3*/site-packages)
rm -rf .gpu
mkdir -p .gpu/llama.cpp/ggml/src .gpu/py
cp -r "$src"/{CMakeLists.txt,LICENSE,cmake,include,licenses,src,vendor} .gpu/llama.cpp/
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} .gpu/llama.cpp/ggml/
for f in "$src"/ggml/src/*; do
  name=$(basename "$f")
  case "$name" in
    ggml-cpu|ggml-cuda|ggml-blas) cp -r "$f" .gpu/llama.cpp/ggml/src/ ;;
    ggml-*) [ -d "$f" ] || cp "$f" .gpu/llama.cpp/ggml/src/ ;;  # other backends are not built
    *) cp -r "$f" .gpu/llama.cpp/ggml/src/ ;;
  esac
done
cp -r "$site/llama_cpp" "$site/gguf" "$site/diskcache" .gpu/py/
rm -rf .gpu/py/llama_cpp/lib .gpu/py/llama_cpp/server  # the device builds its own libllama
find .gpu/py -name __pycache__ -prune -exec rm -rf {} +
cp scripts/gpu/run.sh scripts/gpu/measure.py .gpu/
du -sh .gpu
