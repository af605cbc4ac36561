"""The text alignment function psi of CDPDNet (``clipdino.py: Alignment``): FiLM from text.

``gamma``/``beta`` are linear maps of the *flattened* set of projected text embeddings ``[N, P]``
(all N classes, or all T tasks) to the feature channels, as in the reference:

    psi(F, E) = gamma(vec(E)) * F + beta(vec(E))        F: [B, C, *S], E: [N, P]

There is no ``1 + gamma`` and no residual (reference section 1.6); the weights are Xavier-uniform.
Because E is a fixed buffer, psi is a learned per-channel affine map parameterised through the text.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TextFiLM"]


class TextFiLM(nn.Module):
    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.gamma = nn.Linear(text_dim, channels)
        self.beta = nn.Linear(text_dim, channels)
        nn.init.xavier_uniform_(self.gamma.weight)
        nn.init.xavier_uniform_(self.beta.weight)

    def forward(self, feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``feature [B, C, *S]``, ``text [N, P]`` with ``N * P == text_dim`` -> ``[B, C, *S]``."""
        flat = text.reshape(1, -1).to(feature.dtype)
        shape = (1, -1) + (1,) * (feature.dim() - 2)
        return self.gamma(flat).view(shape) * feature + self.beta(flat).view(shape)
