"""Device capabilities shared by training and inference."""

from __future__ import annotations

import torch

__all__ = ["use_bf16"]


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
