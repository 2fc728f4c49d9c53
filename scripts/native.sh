#!/usr/bin/env bash
# Builds llama.cpp's own native tools (llama-bench, llama-completion, ...) from exactly the
# llama.cpp source that llama-cpp-python vendors, so benchmarks compare infer against the same
# code, built the same way. Cached under .cache/native; a second run returns at once.
# Prints the folder that holds the binaries as its last line on stdout (all else goes to stderr).
#
#   scripts/native.sh                          # build (about 8-10 minutes on two cores)
#   NATIVE_CMAKE_ARGS="-DGGML_CUDA=on" scripts/native.sh   # extra CMake flags (changes the stamp)
set -euo pipefail
cd "$(dirname "$0")/.."

version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
root=$PWD/.cache/native
sdists=$root/sdist
src=$root/src
build=$src/build
bin=$build/bin
targets=(llama-bench llama-completion llama-speculative-simple llama-quantize llama-perplexity
         llama-batched-bench llama-server ggml-rpc-server llama-imatrix)

# The same ggml configuration as llama-cpp-python's own build. Its CMakeLists.txt, on Linux/x86,
# only forces BUILD_SHARED_LIBS=ON, LLAMA_BUILD_COMMON=ON and LLAMA_CURL=OFF; scikit-build-core
# builds Release; every GGML_* option keeps its default: GGML_NATIVE=ON (-march=native), OpenMP,
# llamafile sgemm, CPU repacking. So ggml-cpu compiles here with the same -O3 -march=native
# -fopenmp and defines; the only difference is static linking (the wheel's .so files are -fPIC).
# ggml turns GGML_NATIVE's default OFF when SOURCE_DATE_EPOCH is set (reproducible builds):
# leave it unset for both builds, or the comparison is not like for like.
cmake_args=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_EXAMPLES=ON
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_COMMON=ON
  -DGGML_RPC=ON
)
# GGML_RPC=ON as in scripts/setup.sh: the RPC backend in every tool (llama-completion --rpc,
# llama-bench --rpc) and llama.cpp's own worker, ggml-rpc-server, for the comparisons of
# scripts/bench_rpc.py. It defines GGML_USE_RPC for everything that links ggml, so turning it on
# in an existing build tree recompiles the tools.
# As scripts/setup.sh builds the wheel: no AMX kernels on x86-64 (a hypervisor that advertises
# AMX without providing its tile state kills the process at the first AMX matrix multiply).
if [ "$(uname -m)" = x86_64 ]; then
  cmake_args+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
               "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
# shellcheck disable=SC2206
extra=(${NATIVE_CMAKE_ARGS:-})

# One build at a time: a second caller waits here, then finds the stamp written.
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
stamp=$root/.stamp
want="$version ${cmake_args[*]} ${extra[*]} ${targets[*]} $(sha256sum "$0" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$bin/llama-bench" ]; then
  echo "$bin"
  exit 0
fi

log() { echo "native.sh: $*" >&2; }
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  log "warning: SOURCE_DATE_EPOCH is set, so ggml builds without -march=native (GGML_NATIVE=OFF)"
fi
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
# cmake from the system, else from the package index into the Python in use (as the wheel's
# own build gets it), so a machine with only Python and a compiler can build the tools.
if ! command -v cmake >/dev/null; then
  pybin=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
  if [ ! -x "$pybin/cmake" ]; then
    log "no cmake on PATH: installing it from the package index..."
    "$py" -m pip install --quiet --disable-pip-version-check cmake >&2 \
      || { log "cmake is needed (pip install cmake, or apt-get install cmake)"; exit 1; }
  fi
  PATH=$pybin:$PATH
fi
jobs=$(nproc 2>/dev/null || echo 2)
start=$(date +%s)

# 1. The sdist (pip keeps it; --no-binary so pip never hands back a wheel).
mkdir -p "$sdists"
tarball=$(ls "$sdists"/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)
if [ -z "$tarball" ]; then
  log "downloading the llama-cpp-python $version sdist..."
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: "llama-cpp-python==$version" -d "$sdists" >&2
  tarball=$(ls "$sdists"/llama_cpp_python-"$version".tar.gz)
fi

# 2. Extract vendor/llama.cpp only (fresh, unless this exact tarball was extracted before).
tar_id=$(sha256sum "$tarball" | cut -c1-64)
if [ "$(cat "$src/.tarball" 2>/dev/null)" != "$tar_id" ]; then
  log "extracting vendor/llama.cpp..."
  rm -rf "$src"
  mkdir -p "$src"
  tar -xzf "$tarball" -C "$src" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp"
  echo "$tar_id" > "$src/.tarball"
fi

# 3. Configure and build.
log "configuring (${cmake_args[*]} ${extra[*]})..."
cmake -S "$src" -B "$build" "${cmake_args[@]}" "${extra[@]}" >&2

# Drop any target this tree does not have (names change between llama.cpp versions).
known=$(cmake --build "$build" --target help 2>/dev/null || true)
have=()
for t in "${targets[@]}"; do
  if grep -qE "(^|[ .:])$t(\$|[ :])" <<<"$known"; then
    have+=("$t")
  else
    log "no target $t in this llama.cpp tree; skipped"
  fi
done
[ ${#have[@]} -gt 0 ] || { log "none of the targets exist"; exit 1; }

log "building ${have[*]} with $jobs jobs (about 8-10 minutes on two cores the first time)..."
cmake --build "$build" -j"$jobs" --target "${have[@]}" >&2
# The llama.cpp commit the sdist vendors (a submodule: its HEAD sits in the sdist's .git).
tar -xzOf "$tarball" "llama_cpp_python-$version/.git/modules/vendor/llama.cpp/HEAD" \
  > "$bin/LLAMA_CPP_COMMIT" 2>/dev/null || echo unknown > "$bin/LLAMA_CPP_COMMIT"
log "built in $(( $(date +%s) - start )) s"
echo "$want" > "$stamp"
echo "$bin"
