"""Device capabilities shared by training and inference."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

__all__ = ["use_bf16", "memory_format", "keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_done: bool | None = None


def use_bf16(device: torch.device, on_cpu: bool) -> bool:
    """bf16 autocast: always on CUDA; on the CPU when asked and the CPU has native bf16 (AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu" and on_cpu:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def memory_format(device: torch.device) -> torch.memory_format:
    """Layout for the 3D convolutions: channels-last on the CPU (oneDNN's native layout; a lite training
    step measured 1.26 s -> 0.99 s on 2 cores, ``docs/benchmarks.md``), the default elsewhere."""
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep the memory a CPU training step frees, for the next step to reuse.

    A `lite-wide` step allocates and frees activations and gradients of up to 19 MB (its float32 logits). glibc
    serves blocks above its (dynamic) mmap threshold with ``mmap`` and returns them at ``free``, and it
    trims the heap's top beyond its trim threshold, so each step faults the same memory in again. With
    blocks up to ``mmap_threshold`` taken from the heap and the heap kept up to ``trim_threshold`` of
    free memory, a step reuses the last one's pages: 0.41-0.48 -> 0.38-0.44 s per step on 2 cores, and
    +20 % steps in 6 minutes of real training (docs/benchmarks.md, "A faster training step"). Setting either alone is slower than
    glibc's default (a fixed trim threshold switches the dynamic mmap threshold off: 0.88-0.95 s).

    Process-wide and not undone: the process keeps up to ``trim_threshold`` of freed memory for its life.
    Idempotent. Returns whether it applied (False where the C library is not glibc, e.g. macOS or musl).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("no glibc mallopt here: freed memory is handled by the C library's defaults")
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    return _done
