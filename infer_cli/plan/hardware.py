"""What this machine has for running a model: CPU, RAM, GPUs, and whether llama.cpp can use them.

``detect()`` asks psutil, llama.cpp (``llama_print_system_info``, ``llama_supports_gpu_offload``,
the ``ggml_backend_dev_*`` device list), NVML (nvidia-ml-py, the optional ``nvidia`` extra) or
``nvidia-smi``, and on macOS sysctl. ``PROFILES`` describes common hardware for what-if plans.
Every probe is optional: a missing tool gives fewer facts, never an error.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from infer_cli import PINNED_LLAMA_CPP
from infer_cli.errors import BadOption

GIB = 1 << 30
REINSTALL_CUDA = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
                  f'llama-cpp-python=={PINNED_LLAMA_CPP}')


@dataclass
class GPU:
    name: str
    vram_total: int
    vram_free: int | None = None
    backend: str = "cuda"            # cuda | metal
    compute_capability: str | None = None
    driver: str | None = None
    source: str = ""                 # nvml | nvidia-smi | llama.cpp | sysctl


@dataclass
class MachineInfo:
    cpu_model: str
    physical_cores: int | None
    logical_cores: int | None
    simd: list[str]
    ram_total: int
    ram_available: int
    gpus: list[GPU] = field(default_factory=list)
    llama_devices: list[str] = field(default_factory=list)
    gpu_offload: bool = False        # the installed llama.cpp build can offload
    fix: str | None = None           # how to get a build that can use the GPU that is there

    def hardware(self):
        """This machine as a ``fit.Hardware`` (the first GPU, if llama.cpp can use it)."""
        from infer_cli.plan.fit import Hardware

        gpu = self.gpus[0] if self.gpus and self.gpu_offload else None
        if gpu is None:
            return Hardware("this machine (CPU)", ram=self.ram_available)
        vram = gpu.vram_free if gpu.vram_free is not None else gpu.vram_total
        return Hardware(f"this machine ({gpu.name})", ram=self.ram_available, vram=vram,
                        backend=gpu.backend, unified=gpu.backend == "metal")


def detect(*, llama: bool = True) -> MachineInfo:
    """Probe this machine. ``llama=False`` skips llama.cpp (it costs ~0.1 s to import)."""
    import psutil

    vm = psutil.virtual_memory()
    info = MachineInfo(cpu_model=_cpu_model(), physical_cores=psutil.cpu_count(logical=False),
                       logical_cores=psutil.cpu_count(logical=True), simd=[],
                       ram_total=vm.total, ram_available=vm.available)
    info.gpus = _nvml() or _nvidia_smi() or _apple()
    if llama:
        try:
            import llama_cpp
        except ImportError:
            llama_cpp = None
        if llama_cpp is not None:
            from infer_cli.engine import binding  # (the engine package: only with llama.cpp)

            info.simd = _simd(llama_cpp.llama_print_system_info().decode(errors="replace"))
            info.gpu_offload = binding.gpu_offload(llama_cpp)
            info.llama_devices = binding.llama_devices(llama_cpp)
    if info.gpus and not info.gpu_offload and any(g.backend == "cuda" for g in info.gpus):
        info.fix = REINSTALL_CUDA
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out.strip()
    return platform.processor() or platform.machine()


def _simd(system_info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | ...' -> the features that are on."""
    return sorted({m.group(1) for m in re.finditer(r"([A-Z][A-Z0-9_]+) = 1", system_info)})


def _nvml() -> list[GPU]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no GPU: NVML raises its own error classes
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(GPU(name.decode() if isinstance(name, bytes) else name, mem.total,
                            mem.free, "cuda", f"{major}.{minor}", driver, "nvml"))
        return gpus
    except Exception:  # noqa: BLE001
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _nvidia_smi() -> list[GPU]:
    if not shutil.which("nvidia-smi"):
        return []
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free,compute_cap,driver_version",
                "--format=csv,noheader,nounits"])
    return parse_nvidia_smi(out or "")


def parse_nvidia_smi(text: str) -> list[GPU]:
    """Rows of 'name, total MiB, free MiB, compute capability, driver'."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            total, free = int(float(parts[1])) << 20, int(float(parts[2])) << 20
        except ValueError:
            continue
        gpus.append(GPU(parts[0], total, free, "cuda", parts[3], parts[4], "nvidia-smi"))
    return gpus


def _apple() -> list[GPU]:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    chip = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple silicon").strip()
    mem = int((_run(["sysctl", "-n", "hw.memsize"]) or "0").strip() or 0)
    wired = (_run(["sysctl", "-n", "iogpu.wired_limit_mb"]) or "0").strip()
    # Metal's recommendedMaxWorkingSetSize is ~75% of RAM on machines over 36 GB, ~67% below
    # (what llama.cpp logs as "recommendedMaxWorkingSetSize"); a set wired limit replaces it.
    limit = int(wired) << 20 if wired.isdigit() and int(wired) > 0 else int(mem * (0.75 if mem > 36 * GIB else 0.67))
    return [GPU(chip, limit, None, "metal", None, None, "sysctl")]


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------
# What-if hardware


# name -> (VRAM or GPU working set, RAM, backend); Apple: unified memory.
PROFILES: dict[str, tuple[int, int, str]] = {
    "H100 80GB": (80 * GIB, 256 * GIB, "cuda"),
    "A100 80GB": (80 * GIB, 256 * GIB, "cuda"),
    "A100 40GB": (40 * GIB, 128 * GIB, "cuda"),
    "RTX 4090": (24 * GIB, 64 * GIB, "cuda"),
    "RTX 3060": (12 * GIB, 32 * GIB, "cuda"),
    "M2 16GB": (int(16 * GIB * 0.67), 16 * GIB, "metal"),
    "M3 Pro 36GB": (int(36 * GIB * 0.67), 36 * GIB, "metal"),
    "M3 Max 64GB": (int(64 * GIB * 0.75), 64 * GIB, "metal"),
    "M2 Ultra 192GB": (int(192 * GIB * 0.75), 192 * GIB, "metal"),
    "CPU 16GB": (0, 16 * GIB, ""),
}


def profile(name: str):
    """The ``fit.Hardware`` of a profile, matched loosely ('rtx4090', 'h100', 'm3 max')."""
    from infer_cli.plan.fit import Hardware

    key = _norm(name)
    matches = [p for p in PROFILES if _norm(p) == key] or [p for p in PROFILES if key in _norm(p)]
    if not matches:
        raise BadOption("--gpu", name, "one of " + ", ".join(f"'{p}'" for p in PROFILES))
    p = matches[0]
    vram, ram, backend = PROFILES[p]
    return Hardware(p, ram=ram, vram=vram, backend=backend, unified=backend == "metal")


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def parse_size(text: str, option: str = "--vram") -> int:
    """'24G', '24GB', '24 GiB', '512M', '1.5T' -> bytes (binary units, as the GPU vendors' GB)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise BadOption(option, text, "a size such as 24G, 16GB or 512M")
    try:
        value = float(m.group(1))
    except ValueError:
        raise BadOption(option, text, "a size such as 24G, 16GB or 512M") from None
    scale = {"": GIB, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}[m.group(2)]
    return int(value * scale)
