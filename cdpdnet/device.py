"""Device capabilities shared by training and inference."""

from __future__ import annotations

import torch

__all__ = ["use_bf16", "memory_format"]


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
