"""3D shifted-window cross-attention fusion of CNN and DINO features (the reference's "LWCA").

One Swin-style stage of ``depth`` blocks (window 3^3, shift 0 then ``window // 2``), where the
**queries come from the DINO stream and keys/values from the CNN stream**, with one ``qkv`` Linear
and one ``norm1`` shared by both streams; the residual carries the CNN stream and the DINO stream
is not updated between blocks; a final LayerNorm closes the stage (reference section 1.5).

Windowing, shift masks and the relative position bias reuse MONAI's Swin-UNETR implementation
(``monai.networks.nets.swin_unetr``). Input and output are channel-first ``[B, C, D, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import (
    WindowAttention,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)
from torch import nn

__all__ = ["CrossWindowAttention", "CrossSwinBlock", "WindowCrossAttentionFusion"]


class CrossWindowAttention(WindowAttention):
    """Window attention with ``q`` from ``y`` (DINO) and ``k, v`` from ``x`` (CNN).

    ``x, y: [B*nW, N, C]`` window tokens, ``mask: [nW, N, N]`` or None -> ``[B*nW, N, C]``.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, n, c = x.shape
        h = self.num_heads
        wq, _, _ = self.qkv.weight.chunk(3, dim=0)
        bq = bk = bv = None
        if self.qkv.bias is not None:
            bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(y, wq, bq)
        k, v = F.linear(x, self.qkv.weight[c:], None if bk is None else torch.cat([bk, bv])).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, n, h, c // h).transpose(1, 2) for t in (q, k, v))
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        bias = bias.reshape(n, n, -1).permute(2, 0, 1).to(q.dtype)  # [h, n, n]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(q.dtype))  # [nW, h, n, n]
            bias = bias.repeat(b // nw, 1, 1, 1)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossSwinBlock(nn.Module):
    """``x = x + DropPath(attn(norm1(x), norm1(y)))``, ``x = x + DropPath(mlp(norm2(x)))`` on ``[B, D, H, W, C]``."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], shift: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossWindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = get_window_size((d, h, w), self.window, self.shift)
        pads = [(window[i] - s % window[i]) % window[i] for i, s in enumerate((d, h, w))]
        xs, ys = self.norm1(x), self.norm1(y)
        if any(pads):
            xs = F.pad(xs, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
            ys = F.pad(ys, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        dims = xs.shape[:4]
        mask = None
        if any(s > 0 for s in shift):
            roll = tuple(-s for s in shift)
            xs, ys = torch.roll(xs, roll, (1, 2, 3)), torch.roll(ys, roll, (1, 2, 3))
            mask = compute_mask(dims[1:], window, shift, x.device)
        out = self.attn(window_partition(xs, window), window_partition(ys, window), mask)
        out = window_reverse(out, window, dims)
        if any(s > 0 for s in shift):
            out = torch.roll(out, shift, (1, 2, 3))
        # crop every padded axis (the reference only checked two of three; bug 15)
        out = out[:, :d, :h, :w, :].contiguous()
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class WindowCrossAttentionFusion(nn.Module):
    """CNN ``x`` and DINO ``y`` ``[B, C, D, H, W]`` -> fused ``[B, C, D, H, W]`` (replaces ``x``).

    ``drop_path`` is the list of per-block rates (reference: ``linspace(0, 0.3, 10)[:2]``).
    ``unused_norms`` re-creates the reference's never-used ``norm1..norm3`` (checkpoint parity only).
    """

    def __init__(self, dim: int, num_heads: int = 4, window: int = 3, depth: int = 2, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_path: Sequence[float] = (0.0, 0.0), unused_norms: bool = False):
        super().__init__()
        win = (window,) * 3
        self.blocks = nn.ModuleList([
            CrossSwinBlock(dim, num_heads, win, (0, 0, 0) if i % 2 == 0 else (window // 2,) * 3, mlp_ratio,
                           qkv_bias, float(drop_path[i]) if i < len(drop_path) else 0.0)
            for i in range(depth)
        ])
        self.norm0 = nn.LayerNorm(dim)
        if unused_norms:
            self.unused = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        y = y.permute(0, 2, 3, 4, 1)
        for blk in self.blocks:
            x = blk(x, y)
        return self.norm0(x).permute(0, 4, 1, 2, 3).contiguous()
