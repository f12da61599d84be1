"""What this machine can run: device, bf16, flash-attention, paged optimizers. One place for hardware facts."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from llm_mcp.memory import proc_kib_field


@dataclass(frozen=True)
class Hardware:
    has_cuda: bool
    device: str  # "cuda:0" or "cpu"
    bf16_supported: bool
    has_flash_attn: bool

    @property
    def name(self) -> str:
        return torch.cuda.get_device_name(0) if self.has_cuda else "cpu"


@lru_cache(maxsize=1)
def detect() -> Hardware:
    has_cuda = torch.cuda.is_available()
    return Hardware(
        has_cuda=has_cuda,
        device="cuda:0" if has_cuda else "cpu",
        bf16_supported=torch.cuda.is_bf16_supported() if has_cuda else True,  # CPU autocast supports bf16
        has_flash_attn=has_cuda and importlib.util.find_spec("flash_attn") is not None,
    )


@lru_cache(maxsize=1)
def cpu_bf16_instructions() -> bool | None:
    """Whether this CPU has bf16 matmul instructions, from its flags (they do not change under load, as a timing
    does): AVX512-BF16 or AMX-BF16 on x86, the BF16 feature on Arm, as Linux lists them; torch's own x86 checks
    where /proc/cpuinfo cannot be read; None when neither tells."""
    flags = _cpuinfo_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return None


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):  # x86 names them flags, Arm features
                    return set(value.split())
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """How many times longer a bf16 matmul takes than the same float32 one on this CPU (measured once per process):
    about 1 or less where the CPU has bf16 instructions, many times more where oneDNN emulates them. Other work on
    the machine only ever slows a round down, so the best of several rounds is taken."""
    import time

    a32, b32 = torch.randn(256, 256), torch.randn(256, 256)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    a16 @ b16, a32 @ b32  # the first calls pick and cache the kernels

    def fastest(a: torch.Tensor, b: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return min(fastest(a16, b16) / fastest(a32, b32) for _ in range(3))


def torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator counter, or this process's resident high-water mark (Linux clear_refs;
    elsewhere the peak keeps counting from the process start)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated (CUDA), or this process's peak resident memory since reset_peak_memory (VmHWM).
    Not ru_maxrss: Linux carries it across fork + exec, so a worker would report its parent's peak when larger."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = proc_kib_field("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_freed_memory() -> bool:
    """Hand the memory glibc's heap keeps after frees back to the OS (malloc_trim). On CPU the activations of a
    step are freed into that heap and stay resident; trimming after each step lowers the peak RSS and costs speed,
    since the next step faults the pages in again (docs/benchmarks.md). False where the C library has no
    malloc_trim. Called after every step: the library is looked up once."""
    try:
        _libc().malloc_trim(0)  # returns whether anything was released; either way the call worked
    except (OSError, AttributeError):
        return False
    return True


# glibc's mallopt parameters and its starting values: blocks of 128 KiB or more are mmap'd and unmapped again when
# freed, and free memory over 128 KiB at the heap's top goes back to the OS (the mmap threshold then adapts).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_START_THRESHOLD = 128 * 1024
_REUSE_LIMIT = 1 << 30  # blocks up to 1 GiB come from, and go back to, the heap while training
_reuse_lock = threading.Lock()
_reuse_users = 0  # trainings running with reuse_freed_memory (the server runs several at once)


def can_release_freed_memory() -> bool:
    """Whether release_freed_memory can hand memory back: the C library has malloc_trim (glibc)."""
    try:
        return hasattr(_libc(), "malloc_trim")
    except OSError:
        return False


def can_reuse_freed_memory() -> bool:
    """Whether freed_memory_reused can set anything: the C library is glibc (it has mallopt)."""
    try:
        return hasattr(_libc(), "mallopt")
    except OSError:
        return False


@contextmanager
def freed_memory_reused() -> Iterator[bool]:
    """While it is open, glibc keeps the memory a training step frees in the process's heap for the next step,
    instead of handing each large block back to the OS and taking page faults on every page when the next step
    allocates it again. On CPU a step allocates and frees its activations (MiBs each) every step, and
    faulting those pages in again is kernel time. The cost: blocks of each batch length then share one heap and
    fragment it, raising the peak (docs/benchmarks.md), so training_config reuse_freed_memory is opt-in. When the last user leaves, glibc's starting thresholds come
    back and the free memory goes back to the OS (malloc_trim). Yields whether it applied (glibc only)."""
    global _reuse_users
    if not can_reuse_freed_memory():
        yield False
        return
    mallopt = _libc().mallopt
    with _reuse_lock:
        applied = _reuse_users > 0 or (mallopt(_M_MMAP_THRESHOLD, _REUSE_LIMIT) == 1
                                       and mallopt(_M_TRIM_THRESHOLD, _REUSE_LIMIT) == 1)
        _reuse_users += applied
    try:
        yield applied
    finally:
        with _reuse_lock:
            _reuse_users -= applied
            if applied and _reuse_users == 0:
                mallopt(_M_MMAP_THRESHOLD, _GLIBC_START_THRESHOLD)
                mallopt(_M_TRIM_THRESHOLD, _GLIBC_START_THRESHOLD)
                release_freed_memory()
