"""The frozen DINOv2 branch: per-slice 2D features, and the 3D adaptors that bring them to CNN stages.

Reference section 1.3/1.4. DINOv2 runs on 2D slices taken along the first spatial axis (X; sagittal
slices under RAS), each resized in-plane to the next multiple of the patch size *above* the patch
size (96 -> 98: the reference always adds one patch), replicated to 3 channels, with no ImageNet
normalisation. The hidden states of the chosen layers (pre-LayerNorm, CLS dropped) are returned as
``[B, Cd, X', gy, gz]``.

Deliberate, exact optimisation: the adaptor's depthwise ``(g,1,1)``/stride ``g`` conv only reads the
first ``floor(X / g) * g`` slices, so only those are run through DINO (the reference computes and
discards the rest: 12 of 96 slices). The in-plane resize is done as bilinear 2D, which equals the
reference's trilinear resize because the slice axis keeps its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DinoSliceEncoder", "DinoAdaptor", "dino_input_size"]


def dino_input_size(size: int, patch: int) -> int:
    """Reference rule: ``(size // patch + 1) * patch`` (always one patch more than fits)."""
    return (size // patch + 1) * patch


class DinoSliceEncoder(nn.Module):
    """Frozen DINOv2 on slices along axis 0.

    Args:
        dino: a ``transformers.Dinov2Model`` (frozen here: ``eval()``, no grad).
        layers: indices into ``hidden_states`` (``(-3, -2, -1)`` in the reference).
        group: slices per adaptor group (the adaptor's stride); only ``floor(X/group)*group`` slices run.
        slice_batch: slices per DINO forward (bounds memory); ``None`` = all at once.
        autocast_dtype: e.g. ``torch.bfloat16`` to run DINO under autocast (GPU, or CPU with AMX).

    ``forward(x [B, 1, X, Y, Z] in [0,1])`` -> list of ``[B, Cd, floor(X/g)*g, gy, gz]``,
    with ``gy = dino_input_size(Y, p) / p``.
    """

    def __init__(self, dino: nn.Module, layers: Sequence[int] = (-3, -2, -1), group: int = 14,
                 slice_batch: int | None = None, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.dino = dino
        self.dino.requires_grad_(False)
        self.dino.eval()
        self.layers = tuple(layers)
        self.group = group
        self.slice_batch = slice_batch
        self.autocast_dtype = autocast_dtype
        self.patch = int(dino.config.patch_size)
        self.dim = int(dino.config.hidden_size)

    def train(self, mode: bool = True):  # DINO stays in eval mode
        super().train(mode)
        self.dino.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, sx, sy, sz = x.shape
        used = (sx // self.group) * self.group
        if used == 0:
            raise ValueError(f"patch axis 0 has {sx} slices, fewer than the adaptor group of {self.group}")
        gy, gz = dino_input_size(sy, self.patch), dino_input_size(sz, self.patch)
        slices = x[:, 0, :used].reshape(b * used, 1, sy, sz)
        slices = F.interpolate(slices.float(), size=(gy, gz), mode="bilinear", align_corners=False)
        step = self.slice_batch or slices.shape[0]
        outs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        dev_type = x.device.type
        for s in range(0, slices.shape[0], step):
            chunk = slices[s:s + step].expand(-1, 3, -1, -1)
            ctx = torch.autocast(dev_type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
            with ctx:  # without its own dtype, DINO follows the caller's autocast
                hs = self.dino(pixel_values=chunk, output_hidden_states=True).hidden_states
            for i, layer in enumerate(self.layers):
                outs[i].append(hs[layer][:, 1:].float())
        feats = []
        ny, nz = gy // self.patch, gz // self.patch
        for parts in outs:
            t = torch.cat(parts, 0).view(b, used, ny, nz, self.dim)
            feats.append(t.permute(0, 4, 1, 2, 3).contiguous())
        return feats


class DinoAdaptor(nn.Module):
    """``[B, Cd, X', gy, gz]`` -> ``[B, C, *target]``.

    Depthwise ``(g,1,1)`` stride ``g`` conv (collapses each group of g slices), Conv3^3 -> BatchNorm ->
    ReLU, then trilinear resize (``align_corners=True``) to the CNN stage grid (reference 1.4).
    """

    def __init__(self, dino_dim: int, channels: int, group: int = 14):
        super().__init__()
        self.slice_conv = nn.Conv3d(dino_dim, dino_dim, (group, 1, 1), (group, 1, 1), groups=dino_dim)
        self.conv = nn.Conv3d(dino_dim, channels, 3, padding=1)
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, feat: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
        y = self.act(self.norm(self.conv(self.slice_conv(feat))))
        if tuple(y.shape[2:]) != tuple(target):
            y = F.interpolate(y, size=tuple(target), mode="trilinear", align_corners=True)
        return y
