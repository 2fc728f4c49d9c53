"""The llama-cpp-python binding: is the installed one the release infer is written against, and
what llama.cpp build does it carry: versions, ggml backends and devices (for `infer --version`
and the hardware probe).

The engine calls llama.cpp through the binding's low-level ctypes API, whose functions and
structs change between releases; another release fails deep inside a load with an
AttributeError or a crash. ``require()`` turns that into one line that names the fix, and costs
one string comparison once llama_cpp is imported.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from infer_cli import PINNED_LLAMA_CPP
from infer_cli.errors import BrokenInstall

FIX = f"pip install llama-cpp-python=={PINNED_LLAMA_CPP}"

# The RPC protocol version of the pinned llama.cpp build (ggml-rpc.h RPC_PROTO_*_VERSION): the
# library does not export it, and a worker of another major version is refused.
RPC_PROTOCOL = (7, 0, 0)
# ggml backends that run on the host processor; any other registered backend drives a GPU or
# an accelerator (CUDA, Metal, Vulkan, SYCL, HIP, ...).
HOST_BACKENDS = frozenset({"CPU", "BLAS", "RPC", "AMX"})


def check_version(version: str | None) -> None:
    """BrokenInstall unless ``version`` is the pinned llama-cpp-python release."""
    if version != PINNED_LLAMA_CPP:
        raise BrokenInstall(
            f"llama-cpp-python {version or '(unknown version)'} is installed, but infer needs "
            f"{PINNED_LLAMA_CPP} (its low-level API changes between releases)", FIX)


def require():
    """The ``llama_cpp`` module, if it imports and is the pinned release; BrokenInstall if not."""
    try:
        import llama_cpp
    except ImportError as e:
        raise BrokenInstall(f"llama-cpp-python {PINNED_LLAMA_CPP} is not installed ({e})", FIX) from None
    except (OSError, RuntimeError) as e:  # the binding is there, its shared library is not usable
        raise BrokenInstall(f"llama-cpp-python's llama.cpp library does not load: {e}", FIX) from None
    check_version(getattr(llama_cpp, "__version__", None))
    return llama_cpp


@dataclass
class BuildInfo:
    """What the installed binding carries. None: the library does not say."""

    binding: str                  # llama-cpp-python's version
    llama: str | None             # libllama's version string (llama_version)
    ggml: str | None              # libggml's version (ggml_version)
    commit: str | None            # the llama.cpp/ggml commit it was built from (ggml_commit)
    backends: list[str] = field(default_factory=list)  # registered ggml backends
    gpu_offload: bool = False     # llama_supports_gpu_offload

    @property
    def gpu_backends(self) -> list[str]:
        return [b for b in self.backends if b.upper() not in HOST_BACKENDS]


def native_library(llama_cpp, stem: str) -> ctypes.CDLL | None:
    """One of the native libraries ``llama_cpp`` ships in its ``lib`` folder (``stem`` as in
    "libllama", "libggml", "libggml-base", "libggml-rpc"), for calls the binding does not wrap
    or wraps with other types; the process already has it loaded, so this is the same copy.
    None when it is not there or does not load."""
    import os

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    bare = stem[3:] if stem.startswith("lib") else stem
    for name in (stem + ".so", stem + ".dylib", bare + ".dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _ggml_objects(llama_cpp, kind: str, *texts: str) -> list[tuple[str, ...]]:
    """For each ggml object of one kind that libggml lists ('reg': registered backends, 'dev':
    devices), the strings ``ggml_backend_<kind>_<text>`` returns for it ('' for NULL); empty
    when libggml cannot be asked (absent, or a build without these calls)."""
    lib = native_library(llama_cpp, "libggml")
    if lib is None:
        return []
    try:
        count = getattr(lib, f"ggml_backend_{kind}_count")
        count.restype = ctypes.c_size_t
        get = getattr(lib, f"ggml_backend_{kind}_get")
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        getters = [getattr(lib, f"ggml_backend_{kind}_{text}") for text in texts]
        for getter in getters:
            getter.restype, getter.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        handles = [get(i) for i in range(count())]
    except AttributeError:
        return []
    return [tuple((getter(h) or b"").decode(errors="replace") for getter in getters) for h in handles]


def llama_backends(llama_cpp) -> list[str]:
    """The ggml backends this llama.cpp build registered ('CPU', 'CUDA', 'Metal', ...), whether
    or not a device for them is present; empty when libggml cannot be asked."""
    return [name or "?" for (name,) in _ggml_objects(llama_cpp, "reg", "name")]


def llama_devices(llama_cpp) -> list[str]:
    """llama.cpp's own device list ('CPU', 'CUDA0 (NVIDIA H100)', ...) through libggml."""
    return [f"{name} ({desc})" if desc and desc != name else name
            for name, desc in _ggml_objects(llama_cpp, "dev", "name", "description")]


def gpu_offload(llama_cpp) -> bool:
    """Whether this build can offload to a local GPU. llama.cpp says yes for any build with the
    RPC backend (its layers can go to workers); that alone is no GPU here."""
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    backends = llama_backends(llama_cpp)
    return not backends or any(b.upper() not in HOST_BACKENDS for b in backends)


def build_info(llama_cpp) -> BuildInfo:
    """The versions and backends of the llama.cpp build that ``llama_cpp`` loaded.

    llama.cpp's LLAMA_BUILD_NUMBER / LLAMA_COMMIT live in its `common` library, which the binding
    does not ship; the commit comes from libggml (``ggml_commit``), built from the same tree."""
    lib = native_library(llama_cpp, "libggml")
    try:
        llama = llama_cpp.llama_version().decode(errors="replace")
    except AttributeError:  # a binding without llama_version
        llama = None
    return BuildInfo(binding=getattr(llama_cpp, "__version__", "unknown"), llama=llama,
                     ggml=_ggml_string(lib, "ggml_version"), commit=_ggml_string(lib, "ggml_commit"),
                     backends=llama_backends(llama_cpp),
                     gpu_offload=gpu_offload(llama_cpp))


def _ggml_string(lib, name: str) -> str | None:
    """A ``const char * name(void)`` of libggml, or None when the library lacks it."""
    if lib is None:
        return None
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    value = fn()
    return value.decode(errors="replace") if value else None


def version_lines(infer_version: str) -> list[str]:
    """`infer --version`: infer, the binding, the llama.cpp build and its GPU backends."""
    llama_cpp = require()
    b = build_info(llama_cpp)
    lines = [f"infer {infer_version}", f"llama-cpp-python {b.binding}"]
    build = ", ".join(x for x in (f"libllama {b.llama}" if b.llama else "",
                                  f"ggml {b.ggml}" if b.ggml else "") if x)
    lines.append(f"llama.cpp commit {b.commit or 'not recorded'}" + (f" ({build})" if build else ""))
    backends = ", ".join(b.backends) if b.backends else "unknown"
    if b.gpu_backends:
        gpu = ", ".join(b.gpu_backends)
    elif b.gpu_offload:
        gpu = "yes (backend not named)"
    else:
        gpu = "none (this build runs on the CPU only)"
    lines += [f"ggml backends: {backends}", f"GPU backends: {gpu}"]
    if any(x.upper() == "RPC" for x in b.backends):
        lines.append(f"RPC: available (protocol {'.'.join(map(str, RPC_PROTOCOL))}; `infer worker`, --rpc)")
    else:
        lines.append("RPC: not in this build (scripts/setup.sh builds it with GGML_RPC=ON)")
    return lines
