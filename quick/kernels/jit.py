"""Compile CUDA sources with ``nvcc`` at first use, cache the cubin, launch through the driver API.

Why not a PyTorch C++ extension: building against torch's headers takes minutes per variant, while a
plain ``nvcc -cubin`` of one kernel takes seconds, needs no compiler ABI match with torch, and the cubin
is cached on disk (``$QUICK_CACHE_DIR`` or ``~/.cache/quick/kernels``) keyed by a hash of the sources,
the flags and the compiler version. Kernels are launched with ``cuLaunchKernel`` on torch's current
stream (so CUDA graph capture works) through ``ctypes`` on ``libcuda``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from quick import settings

CSRC = Path(__file__).with_name("csrc")
_LOCK = threading.Lock()


class KernelUnavailable(RuntimeError):
    """No GPU, no nvcc, or the kernel failed to compile: callers fall back to the reference path."""


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed (the message carries the driver's error name)."""


def cache_dir() -> Path:
    path = settings.cache_dir() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_nvcc() -> str:
    cands = [settings.nvcc(), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise KernelUnavailable("nvcc not found (set CUDA_HOME or QUICK_NVCC); the GPU kernels are compiled at first use")


def nvcc_available() -> bool:
    """Whether :func:`find_nvcc` finds a compiler (the kernels' availability checks)."""
    try:
        find_nvcc()
    except KernelUnavailable:
        return False
    return True


def arch_for_device(device: torch.device | int | None = None, arch_specific: bool = False) -> str:
    """``sm_XY`` of a device; ``sm_90a`` where Hopper-only instructions (wgmma, setmaxnreg) are needed."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if arch_specific and major >= 9 else "")


def _gencode(arch: str) -> str:
    num = arch.removeprefix("sm_")
    return f"-gencode=arch=compute_{num},code={arch}"


@dataclass(frozen=True)
class CompileResult:
    cubin: Path
    log: str

    @property
    def spills(self) -> int:
        """Total spill bytes reported by ptxas (-Xptxas -v), 0 when clean."""
        pairs = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", self.log)
        return sum(int(a) + int(b) for a, b in pairs)


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


_NVCC_VERSION: dict[str, str] = {}


def _nvcc_version(nvcc: str) -> str:
    if nvcc not in _NVCC_VERSION:
        _NVCC_VERSION[nvcc] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return _NVCC_VERSION[nvcc]


def compile_cubin(
    source: str, arch: str, defines: dict[str, object] | None = None, force: bool = False
) -> CompileResult:
    """Compile ``csrc/<source>`` for ``arch`` with ``-D`` defines into a cached cubin (verbose ptxas log kept)."""
    nvcc = find_nvcc()
    defs = sorted((defines or {}).items())
    flags = [
        "-cubin",
        "-O3",
        "-std=c++17",
        "-lineinfo",
        "-Xptxas",
        "-v",
        _gencode(arch),
        f"-I{CSRC}",
        *[f"-D{k}={v}" for k, v in defs],
    ]
    key = hashlib.sha256("\n".join([_sources_digest(), source, " ".join(flags), _nvcc_version(nvcc)]).encode())
    stem = f"{Path(source).stem}-{arch}-{key.hexdigest()[:20]}"
    out, log_path = cache_dir() / f"{stem}.cubin", cache_dir() / f"{stem}.log"
    if out.exists() and log_path.exists() and not force:
        return CompileResult(out, log_path.read_text())
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp_out = Path(tmp) / "k.cubin"
        proc = subprocess.run([nvcc, *flags, "-o", str(tmp_out), str(CSRC / source)], capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise KernelUnavailable(f"nvcc failed for {source} ({arch}, {dict(defs)}):\n{log[-4000:]}")
        log_path.write_text(log)
        os.replace(tmp_out, out)  # atomic: concurrent processes never see a half-written cubin
    return CompileResult(out, log)


def compile_many(jobs: Iterable[tuple[str, str, dict]], workers: int | None = None) -> list[CompileResult]:
    """Compile several (source, arch, defines) variants in parallel (nvcc is single-threaded)."""
    jobs = list(jobs)
    with ThreadPoolExecutor(max_workers=workers or max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        return list(ex.map(lambda j: compile_cubin(*j), jobs))


# ---------------------------------------------------------------- driver API through ctypes

_CUDA: ctypes.CDLL | None = None
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _driver() -> ctypes.CDLL:
    global _CUDA
    if _CUDA is None:
        try:
            _CUDA = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise KernelUnavailable(f"CUDA driver library not found: {e}") from None
    return _CUDA


def check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise CudaDriverError(f"{what} failed: {name.value.decode() if name.value else result}")


def _ensure_context(device: int) -> None:
    """Make the primary context of ``device`` current (torch uses it too) before driver calls."""
    torch.cuda.init()
    with torch.cuda.device(device):
        ctx = ctypes.c_void_p()
        check(_driver().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            check(_driver().cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
            check(_driver().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            check(_driver().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


# ---- programmatic dependent launch (PDL, sm_90): cuLaunchKernelEx with one launch attribute

CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute`` (cuda.h: the id, 4 bytes of padding, a 64-byte value union): 72 bytes."""

    _fields_ = [("id", ctypes.c_uint), ("_pad", ctypes.c_uint), ("value", ctypes.c_int), ("_rest", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig`` (cuda.h): grid, block, dynamic shared memory, stream, attributes; 56 bytes."""

    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("smem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


def pdl_enabled(device: torch.device | int | None = None) -> bool:
    """Whether the decode-path kernels launch as programmatic dependent launches: sm_90 or newer, and the ``pdl``
    fusion on (:func:`quick.settings.fusions`)."""
    if not settings.fusion_enabled("pdl"):
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_config(grid: Sequence[int], block: Sequence[int], smem: int) -> tuple[LaunchConfig, LaunchAttribute]:
    """A launch config whose kernel may start before the previous kernel on the stream has finished (programmatic
    stream serialization): it runs up to its ``griddepcontrol.wait`` once every CTA of the previous kernel has
    executed ``griddepcontrol.launch_dependents`` or exited. Returns the attribute too: it must outlive the config."""
    attr = LaunchAttribute(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 0, 1)
    cfg = LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, None, ctypes.pointer(attr), 1)
    return cfg, attr


def raw_launch(fn, grid, block, smem: int, stream: int, params, pdl: tuple | None = None) -> int:
    """One launch of function ``fn`` (3-tuples ``grid`` / ``block``, a stream handle, a built parameter block):
    ``cuLaunchKernel``, or ``cuLaunchKernelEx`` with ``pdl``'s config (:func:`pdl_config`). Returns the CUresult."""
    if pdl is not None:
        cfg = pdl[0]
        cfg.stream = stream
        return _driver().cuLaunchKernelEx(ctypes.byref(cfg), fn, params, None)
    return _driver().cuLaunchKernel(fn, *grid, *block, smem, ctypes.c_void_p(stream), params, None)


class CudaKernel:
    """One ``extern "C" __global__`` function of a loaded cubin on one device."""

    def __init__(self, cubin: Path, name: str, device: int) -> None:
        self.name, self.device = name, device
        _ensure_context(device)
        self._module = ctypes.c_void_p()
        data = cubin.read_bytes()
        check(_driver().cuModuleLoadData(ctypes.byref(self._module), data), f"cuModuleLoadData({cubin.name})")
        self._fn = ctypes.c_void_p()
        check(_driver().cuModuleGetFunction(ctypes.byref(self._fn), self._module, name.encode()), f"get {name}")
        self._max_smem = 48 * 1024

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        if nbytes > self._max_smem:
            check(
                _driver().cuFuncSetAttribute(self._fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes),
                f"cuFuncSetAttribute({self.name}, smem={nbytes})",
            )
            self._max_smem = nbytes

    def __call__(
        self,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[object],
        smem: int = 0,
        stream: torch.cuda.Stream | None = None,
        pdl: bool = False,
    ) -> None:
        """Launch; tensors pass as device pointers, Python ints as int32, ctypes values as themselves. ``pdl``: a
        programmatic dependent launch (:func:`pdl_config`; the kernel must wait before it reads what earlier
        kernels wrote)."""
        holders = []
        for a in args:
            if isinstance(a, torch.Tensor):
                holders.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, bool):
                holders.append(ctypes.c_int(int(a)))
            elif isinstance(a, int):
                holders.append(ctypes.c_int(a))
            elif isinstance(a, float):
                holders.append(ctypes.c_float(a))
            else:
                holders.append(a)  # a ctypes object (c_int64, a by-value struct such as a TMA descriptor)
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        self.set_max_dynamic_smem(smem)
        s = stream if stream is not None else torch.cuda.current_stream(self.device)
        g = (*grid, 1, 1)[:3]
        b = (*block, 1, 1)[:3]
        res = raw_launch(self._fn, g, b, smem, s.cuda_stream, params, pdl_config(g, b, smem) if pdl else None)
        check(res, f"launch {self.name} grid={g} block={b} smem={smem}{' (PDL)' if pdl else ''}")


_KERNELS: dict[tuple, CudaKernel] = {}


def load_kernel(
    source: str, name: str, defines: dict[str, object] | None = None, device: int | None = None, arch: str | None = None
) -> CudaKernel:
    """Compile (once, cached on disk) and load (once per process and device) a kernel function."""
    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device")
    device = torch.cuda.current_device() if device is None else device
    arch = arch or arch_for_device(device)
    key = (source, name, tuple(sorted((defines or {}).items())), device, arch)
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = CudaKernel(compile_cubin(source, arch, defines).cubin, name, device)
            _KERNELS[key] = k
    return k


def out_buffer(
    out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device, error: type[Exception]
) -> torch.Tensor:
    """A new ``[m, n]`` output, or the caller's ``out`` once it is checked: every kernel stores 16-byte vectors."""
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    if (
        tuple(out.shape) != (m, n)
        or out.dtype != dtype
        or out.device != torch.device(device)
        or not out.is_contiguous()
        or (out.numel() and out.data_ptr() % 16)
    ):
        raise error(f"out must be a contiguous, 16-byte aligned [{m}, {n}] {dtype} tensor on {device}")
    return out
