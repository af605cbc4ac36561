"""``CDPDNetModel``: the frozen DINOv2 slice encoder and the trainable CDPDNet, as one module."""

from __future__ import annotations

import torch
from torch import nn

from .cdpdnet import CDPDNet
from .config import NetworkConfig
from .dino_branch import DinoSliceEncoder

__all__ = ["CDPDNetModel"]


class CDPDNetModel(nn.Module):
    """``forward(x [B, 1, *P] in [0, 1], task_id [B] long) -> logits [B, num_classes, *P]``.

    ``trainable_parameters()`` excludes the frozen DINO (what the optimiser gets).
    """

    def __init__(self, cfg: NetworkConfig, dino: nn.Module, slice_batch: int | None = None,
                 dino_autocast: torch.dtype | None = None):
        super().__init__()
        if int(dino.config.hidden_size) != cfg.dino_dim:
            raise ValueError(f"DINO hidden size {dino.config.hidden_size} != network dino_dim {cfg.dino_dim}")
        self.cfg = cfg
        self.net = CDPDNet(cfg)
        self.dino = DinoSliceEncoder(dino, cfg.dino_layers, cfg.dino_group, slice_batch, dino_autocast)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int | None = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input [B, {self.cfg.in_channels}, X, Y, Z], got {tuple(x.shape)}")
        div = self.cfg.divisor()
        if any(s % d for s, d in zip(x.shape[2:], div)):
            raise ValueError(f"patch size {tuple(x.shape[2:])} must be divisible by {div}")
        if task_id is None:
            task_id = -1
        if not torch.is_tensor(task_id):
            task_id = torch.tensor([int(task_id)], device=x.device)
        return self.net(x, self.dino(x), task_id)

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]
