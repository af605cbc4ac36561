"""nnU-Net building blocks (``Generic_UNet`` of nnU-Net v1, as used by UniSeg and CDPDNet).

``ConvNormAct`` is nnU-Net's ``ConvDropoutNormNonlin`` without the dropout (the reference uses p=0,
so no dropout layer exists): Conv3d (bias) -> InstanceNorm3d (affine) -> LeakyReLU(0.01).

``InstanceNorm3d`` here is ``nn.InstanceNorm3d`` that keeps a channels-last input channels-last (the
CPU layout, see :func:`cdpdnet.device.memory_format`): PyTorch's instance norm copies such an input to
the contiguous layout and back, which took 27 % of a ``paper`` forward on the CPU; ``group_norm`` with
one channel per group is the same normalisation and has a channels-last kernel (2x32x96^3: 83 ms
instead of 486 ms here). Its single-pass variance costs precision when a channel's mean is large
against its spread (max abs error 1.2e-3 on unit-variance outputs for mean/sd = 1/3, against 6e-7),
which is why contiguous inputs (CUDA) keep the exact kernel.
"""

from __future__ import annotations

from collections.abc import Sequence


import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "InstanceNorm3d", "StackedConvLayers", "init_he", "he_init_"]


def _pad(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) // 2 for k in kernel)


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters and state dict) whose output keeps a channels-last input's layout.

    A bf16 or fp16 input (a convolution's output under autocast) is normalised in float32 and the output
    stays float32, as autocast does for ``group_norm`` on CUDA: on the CPU, ``group_norm``'s backward in
    bf16 took 0.67 s of a 1.3 s ``lite-wide`` training step, against 0.18 s in float32
    (``docs/benchmarks.md``, "bf16 autocast on the CPU"). On CUDA too, so the activation between a norm
    and the next convolution is float32 there (more memory than bf16; not measured on a GPU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        if (x.dim() == 5 and not self.track_running_stats and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last_3d)):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


class ConvNormAct(nn.Sequential):
    """``[B, Cin, *S] -> [B, Cout, *S/stride]``: Conv3d -> InstanceNorm3d -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = (3, 3, 3),
                 stride: Sequence[int] | int = 1, negative_slope: float = 1e-2, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, tuple(kernel), stride, _pad(kernel), bias=True)
        self.instnorm = InstanceNorm3d(out_channels, eps=eps, affine=True)
        self.lrelu = nn.LeakyReLU(negative_slope, inplace=True)


class StackedConvLayers(nn.Sequential):
    """``n`` ConvNormAct; the first one maps ``in -> out`` and carries the stride (convolutional pooling).

    ``hidden_channels`` (default ``out_channels``) gives the width of all but the last conv, which is
    how UniSeg's ``StackedFusionConvLayers`` (331 -> 82 -> 82 -> 11) is built.
    """

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2, kernel: Sequence[int] = (3, 3, 3),
                 first_stride: Sequence[int] | int = 1, hidden_channels: int | None = None):
        hidden = out_channels if hidden_channels is None else hidden_channels
        widths = [in_channels] + [hidden] * (num_convs - 1) + [out_channels]
        super().__init__(*[
            ConvNormAct(widths[i], widths[i + 1], kernel, first_stride if i == 0 else 1) for i in range(num_convs)
        ])


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``: kaiming-normal conv weights (a=neg_slope), zero bias."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def he_init_(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        m.apply(init_he)


