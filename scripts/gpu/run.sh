#!/bin/bash
# Device run: build llama.cpp (libllama + CUDA) from .gpu/llama.cpp, then .gpu/measure.py.
# Usage (repo root): bash .gpu/run.sh   [env: OUT, BUILD_LIMIT (s), TOTAL_LIMIT (s), CASES]
set -u
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
BUILD_LIMIT=${BUILD_LIMIT:-420}   # seconds from start by which the build must be done
TOTAL_LIMIT=${TOTAL_LIMIT:-540}   # seconds from start by which measuring must be done
CASES=${CASES:-llama8b-ngl12,gemma27b-ngl20,llama8b-ngl0,llama8b-ngl33,llama8b-ngl12-ctx32k,llama8b-ngl12-fa-off,llama8b-ngl1-ctx64k}
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/.gpu/py"

echo "== env ($(el)s)"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | head -3
echo "nproc=$(nproc)  $(python3 --version 2>&1)  $(cmake --version | head -1)  $(nvcc --version | tail -1)"
free -g | head -2

# the synthetic models, written while the build runs (sparse files)
( python3 .gpu/measure.py --out "$OUT" --models /tmp/gguf --cases "$CASES" --write-only \
    > "$OUT/write.log" 2>&1; echo "write rc=$?" >> "$OUT/write.log"
  python3 .gpu/measure.py --out "$OUT" --probe-only /tmp/gpu-probe.json >> "$OUT/write.log" 2>&1 ) &
WRITER=$!

# --- cuBLAS / driver library: the toolkit's if it has them, else pip's nvidia-* wheels
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
EXTRA=()
LIBDIRS=""
has_tk_cublas=0
for d in "$CUDA_HOME/lib64" "$CUDA_HOME/targets/x86_64-linux/lib" "$CUDA_HOME/lib"; do
  ls "$d"/libcublas.so* >/dev/null 2>&1 && [ -e "$CUDA_HOME/include/cublas_v2.h" -o -e "$CUDA_HOME/targets/x86_64-linux/include/cublas_v2.h" ] && has_tk_cublas=1
done
if [ $has_tk_cublas = 0 ]; then
  SP=$(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+[p for p in sys.path if p.endswith("site-packages")]))')
  CUBLAS=$(find ${CUBLAS_SEARCH:-} $SP /usr/lib/x86_64-linux-gnu /usr/local -name 'libcublas.so*' 2>/dev/null | grep -v Lt | sort | head -1)
  CUBLASLT=$(find ${CUBLAS_SEARCH:-} $SP /usr/lib/x86_64-linux-gnu /usr/local -name 'libcublasLt.so*' 2>/dev/null | sort | head -1)
  HDR=$(find ${CUBLAS_SEARCH:-} $SP /usr/include /usr/local -name cublas_v2.h 2>/dev/null | head -1)
  echo "cuBLAS not in the toolkit; using lib=$CUBLAS lt=$CUBLASLT header=$HDR"
  if [ -n "$CUBLAS" ] && [ -n "$CUBLASLT" ] && [ -n "$HDR" ]; then
    INC=$(dirname "$HDR")
    EXTRA+=("-DCUDA_cublas_LIBRARY=$CUBLAS" "-DCUDA_cublasLt_LIBRARY=$CUBLASLT"
            "-DCMAKE_CUDA_FLAGS=-I$INC" "-DCMAKE_CXX_FLAGS=-I$INC")
    LIBDIRS="$(dirname "$CUBLAS"):$(dirname "$CUBLASLT")"
  else
    echo "!! no cuBLAS found"; find / -name 'libcublas*' -not -path '/proc/*' 2>/dev/null | head
  fi
else
  echo "cuBLAS: toolkit ($CUDA_HOME)"
fi
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib64/libcuda.so* "$CUDA_HOME"/targets/x86_64-linux/lib/stubs/libcuda.so >/dev/null 2>&1; then
  DRV=${CUDA_DRIVER_LIB:-}
  [ -z "$DRV" ] && DRV=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF; exit}')
  [ -z "$DRV" ] && DRV=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 -name 'libcuda.so*' 2>/dev/null | head -1)
  echo "driver lib for linking: $DRV"
  [ -n "$DRV" ] && EXTRA+=("-DCUDA_cuda_driver_LIBRARY=$DRV")
fi
[ -n "$LIBDIRS" ] && export LD_LIBRARY_PATH="$LIBDIRS:${LD_LIBRARY_PATH:-}"

# --- build
B=/tmp/lcpp-build
echo "== configure ($(el)s)"
timeout $((BUILD_LIMIT - $(el))) cmake -S .gpu/llama.cpp -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DGGML_CCACHE=OFF \
  -DGGML_CUDA_COMPRESSION_MODE=none -DGGML_CUDA_FA_ALL_QUANTS=OFF ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
if [ $rc != 0 ]; then echo "!! configure failed rc=$rc ($(el)s)"; grep -i -B2 -A8 "error" "$OUT/build.log" | head -60; exit 2; fi
echo "== build ($(el)s)"
TB=$(date +%s)
timeout $((BUILD_LIMIT - $(el))) cmake --build $B --target llama -j${JOBS:-16} >> "$OUT/build.log" 2>&1
rc=$?
BUILD_S=$(( $(date +%s) - TB ))
echo "build rc=$rc in ${BUILD_S}s (configure+build done at $(el)s)"
grep -c "Building CUDA object" "$OUT/build.log" | sed 's/^/CUDA objects built: /'
if [ $rc != 0 ]; then
  echo "!! build failed or timed out"; grep -E "error|FAILED" "$OUT/build.log" | head -40; tail -3 "$OUT/build.log"
  exit 3
fi
ls -la $B/bin/*.so* | head -20
export LLAMA_CPP_LIB_PATH=$B/bin
ldd $B/bin/libggml-cuda.so | grep -E "cublas|cudart|cuda\.so|not found"

wait $WRITER; cat "$OUT/write.log"
echo "== measure ($(el)s)"
python3 .gpu/measure.py --out "$OUT" --models /tmp/gguf --cases "$CASES" --deadline $((T0 + TOTAL_LIMIT)) --threads 16 --probe-file /tmp/gpu-probe.json
echo "== done ($(el)s); build ${BUILD_S}s"
