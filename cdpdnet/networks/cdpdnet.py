"""CDPDNet: nnU-Net encoder/decoder fused with frozen DINOv2 features and CLIP-style text guidance.

Wu et al., "CDPDNet: Integrating Text Guidance with Hybrid Vision Encoders for Medical Image
Segmentation" (arXiv 2505.18958). Faithful to the published code (``docs/reference-deviations.md``
lists every deliberate difference), shapes for the ``paper`` preset (B = batch):

=========================  ==========================================  =========================
step                       module                                      output
=========================  ==========================================  =========================
input                      CT patch in [0, 1]                          ``[B, 1, 96, 96, 96]``
encoder stage 0..4         StackedConvLayers (stride in first conv)    32@96^3 ... 320@12x6x6
fusion at stages 2, 3, 4   WindowCrossAttentionFusion(CNN, Adaptor(DINO hidden state))
bottleneck                 StackedConvLayers                           ``[B, 320, 6, 3, 3]``
psi_organ                  TextFiLM(bottleneck, organ text)
TTPG                       TaskPromptGenerator -> one channel per sample, concatenated: 321 channels
decoder u = 0..4           ConvT -> cat(psi(skip)) -> StackedConvLayers  ... ``[B, 32, 96^3]``
head                       [ConvNormAct 1x1x1] Conv3d 1x1x1, no bias   ``[B, 32, 96, 96, 96]`` logits
=========================  ==========================================  =========================

The network is multi-label: apply a sigmoid per channel; channel ``c`` is ROI label value ``c+1``.
The bracketed ConvNormAct exists only with ``head_hidden`` set (CPU presets; null in ``paper``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvNormAct, StackedConvLayers, he_init_
from .config import NetworkConfig
from .cross_attention import WindowCrossAttentionFusion
from .dino_branch import DinoAdaptor
from .film import TextFiLM

__all__ = ["CDPDNet", "TaskPromptGenerator"]


class TaskPromptGenerator(nn.Module):
    """Text-based Task Prompt Generation (TTPG, reference section 1.7).

    ``x [B, Cb, *S]`` (bottleneck after psi_organ), ``task_text [T, P]``, ``task_id [B]`` ->
    ``[B, 1, *S]``: the prompt channel of each sample's task (a per-sample gather; the reference used
    ``task_id[0]`` for the whole batch, bug 5). ``task_id < 0`` means "unknown source dataset": the
    mean of the T task channels is used (documented choice for unseen data).
    """

    def __init__(self, channels: int, num_tasks: int, proj_dim: int, convs: int = 2, fusion_convs: int = 3):
        super().__init__()
        self.num_tasks = num_tasks
        self.intermedia_conv = StackedConvLayers(channels, num_tasks, convs)
        self.prompt_film = TextFiLM(num_tasks, num_tasks * proj_dim)
        fused = channels + num_tasks
        self.fusion_layer = StackedConvLayers(fused, num_tasks, fusion_convs, hidden_channels=fused // 4)

    def forward(self, x: torch.Tensor, task_text: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_film(self.intermedia_conv(x), task_text)
        dynamic = self.fusion_layer(torch.cat([x, prompt], 1))  # [B, T, *S]
        task_id = task_id.to(x.device).long().view(-1)
        if task_id.numel() == 1 and x.shape[0] > 1:
            task_id = task_id.expand(x.shape[0])
        if task_id.numel() != x.shape[0]:
            raise ValueError(f"task_id has {task_id.numel()} entries for a batch of {x.shape[0]}")
        checkable = task_id.device.type != "meta"  # shape tracing on the meta device has no values
        if checkable and int(task_id.max()) >= self.num_tasks:
            raise ValueError(f"task_id {int(task_id.max())} out of range: the model has {self.num_tasks} tasks")
        known = task_id.clamp(min=0)
        idx = known.view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *dynamic.shape[2:])
        picked = torch.gather(dynamic, 1, idx)
        if not checkable or bool((task_id < 0).any()):
            mean = dynamic.mean(1, keepdim=True)
            picked = torch.where((task_id < 0).view(-1, 1, *([1] * (x.dim() - 2))), mean, picked)
        return picked


class CDPDNet(nn.Module):
    """The trainable CDPDNet. DINO features are computed outside (``CDPDNetModel`` holds the frozen ViT).

    ``forward(x [B,1,*P], dino_feats: list of [B, Cd, X', gy, gz] (one per fusion stage),
    task_id [B] long)`` -> logits ``[B, num_classes, *P]``. ``P`` must be divisible by the product of
    the strides per axis (16, 32, 32 for the paper preset). With ``aux=True`` (training with
    ``cfg.deep_supervision = k > 0``) it returns ``(logits, [k logits of the next coarser decoder
    outputs, finest first: [B, num_classes, *P / stride]])``.

    Buffers ``organ_embedding [num_classes, text_dim]`` and ``task_embedding [num_tasks, text_dim]``
    hold the precomputed text embeddings (saved in checkpoints, never trained).
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        kernels, strides, n = cfg.conv_kernels, cfg.pool_strides, cfg.num_pool
        self.stem = StackedConvLayers(cfg.in_channels, widths[0], cfg.convs_per_stage, kernels[0])
        if cfg.reference_dead_modules:  # UniSeg's first convs for 2- and 4-channel inputs, never used
            pad = tuple((k - 1) // 2 for k in kernels[0])
            self.unused_input_convs = nn.ModuleList([nn.Conv3d(c, widths[0], kernels[0], 1, pad) for c in (2, 4)])
        self.encoder = nn.ModuleList([
            StackedConvLayers(widths[d - 1], widths[d], cfg.convs_per_stage, kernels[d], strides[d - 1])
            for d in range(1, n + 1)
        ])  # stages 1..n-1 and the bottleneck (index n-1)
        up_in = [widths[n] + 1] + [widths[n - u] for u in range(1, n)]
        self.upsample = nn.ModuleList([
            nn.ConvTranspose3d(up_in[u], widths[n - 1 - u], strides[n - 1 - u], strides[n - 1 - u], bias=False)
            for u in range(n)
        ])
        self.decoder = nn.ModuleList([
            StackedConvLayers(2 * widths[n - 1 - u], widths[n - 1 - u], cfg.convs_per_stage, cfg.decoder_kernel(u))
            for u in range(n)
        ])
        heads = [widths[n - 1 - u] for u in range(n)] if cfg.reference_dead_modules else [widths[0]]
        # optional non-linear head (CPU presets): [B, widths[0], *P] -> [B, head_hidden, *P] before the 1x1x1 conv
        self.head_hidden = (ConvNormAct(widths[0], cfg.head_hidden, (1, 1, 1)) if cfg.head_hidden else nn.Identity())
        heads[-1] = cfg.head_hidden or heads[-1]
        self.seg_outputs = nn.ModuleList([nn.Conv3d(c, cfg.num_classes, 1, bias=False) for c in heads])
        self.ttpg = TaskPromptGenerator(widths[n], cfg.num_tasks, cfg.text_proj_dim)
        he_init_([self.head_hidden, self.stem, getattr(self, "unused_input_convs", nn.Identity()), self.encoder, self.upsample, self.decoder, self.seg_outputs, self.ttpg.intermedia_conv,
                  self.ttpg.fusion_layer])
        # deep supervision: heads on the decoder outputs u = n-1-ds .. n-2 (the scales just above the last)
        self.aux_stages = tuple(range(n - 1 - cfg.deep_supervision, n - 1))
        self.aux_outputs = nn.ModuleList([nn.Conv3d(widths[n - 1 - u], cfg.num_classes, 1, bias=False)
                                          for u in self.aux_stages])
        he_init_([self.aux_outputs])
        if cfg.head_bias is not None:
            # a prior-logit bias (RetinaNet-style): starts near "mostly background", which short CPU runs need
            for head in (self.seg_outputs[-1], *self.aux_outputs):
                head.bias = nn.Parameter(torch.full((cfg.num_classes,), float(cfg.head_bias)))

        # DINO adaptors and cross-attention at the fusion stages (plus the reference's unused stage 1 pair)
        fusion = list(cfg.fusion_stages)
        built = ([1] if cfg.reference_dead_modules else []) + fusion
        nb = max(cfg.attn_drop_path_blocks - 1, 1)  # reference: linspace(0, 0.3, 10)[:depth]
        dp = [cfg.attn_drop_path * i / nb for i in range(cfg.attn_depth)]
        self.adaptors = nn.ModuleDict({str(s): DinoAdaptor(cfg.dino_dim, widths[s], cfg.dino_group) for s in built})
        self.cross_attention = nn.ModuleDict({
            str(s): WindowCrossAttentionFusion(widths[s], cfg.attn_heads, cfg.attn_window, cfg.attn_depth,
                                               cfg.attn_mlp_ratio, cfg.attn_qkv_bias, dp,
                                               unused_norms=cfg.reference_dead_modules)
            for s in built
        })
        self.fusion_stages = tuple(fusion)

        # text: fixed embeddings, projections, and the FiLM alignments psi
        self.register_buffer("organ_embedding", torch.zeros(cfg.num_classes, cfg.text_dim))
        self.register_buffer("task_embedding", torch.zeros(cfg.num_tasks, cfg.text_dim))
        self.text_to_vision = nn.Linear(cfg.text_dim, cfg.text_proj_dim)
        self.task_to_vision = nn.Linear(cfg.text_dim, cfg.text_proj_dim)
        organ_text_dim = cfg.num_classes * cfg.text_proj_dim
        self.skip_films = nn.ModuleList([TextFiLM(widths[d], organ_text_dim) for d in range(n)])
        # the reference shares the last skip's psi with the bottleneck (both 320 channels)
        self.bottleneck_film = (None if widths[n] == widths[n - 1]
                                else TextFiLM(widths[n], organ_text_dim))

    # ------------------------------------------------------------------------------------------
    def set_text_embeddings(self, organ: torch.Tensor, task: torch.Tensor) -> None:
        """Copy precomputed text embeddings ``[num_classes, D]`` and ``[num_tasks, D]`` into the buffers."""
        for name, value in (("organ_embedding", organ), ("task_embedding", task)):
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{name} must have shape {tuple(buf.shape)}, got {tuple(value.shape)}")
            buf.copy_(value.to(buf.dtype))

    def _film_bottleneck(self, x: torch.Tensor, organ: torch.Tensor) -> torch.Tensor:
        film = self.bottleneck_film if self.bottleneck_film is not None else self.skip_films[-1]
        return film(x, organ)

    def forward(self, x: torch.Tensor, dino_feats: Sequence[torch.Tensor], task_id: torch.Tensor,
                aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if len(dino_feats) != len(self.fusion_stages):
            raise ValueError(f"expected {len(self.fusion_stages)} DINO feature maps, got {len(dino_feats)}")
        organ = F.relu(self.text_to_vision(self.organ_embedding))  # [N, P]
        task = F.relu(self.task_to_vision(self.task_embedding))  # [T, P]
        dino = dict(zip(self.fusion_stages, dino_feats))

        skips = []
        x = self.stem(x)
        skips.append(x)
        n = self.cfg.num_pool
        for d in range(1, n + 1):
            x = self.encoder[d - 1](x)
            if d in dino:
                y = self.adaptors[str(d)](dino[d], x.shape[2:])
                x = self.cross_attention[str(d)](x, y)
            if d < n:
                skips.append(x)

        x = self._film_bottleneck(x, organ)
        x = torch.cat([x, self.ttpg(x, task, task_id)], 1)
        extra = []
        for u in range(n):
            skip = skips[-(u + 1)]
            x = self.upsample[u](x)
            x = self.decoder[u](torch.cat([x, self.skip_films[-(u + 1)](skip, organ)], 1))
            if aux and u in self.aux_stages:
                extra.append(self.aux_outputs[self.aux_stages.index(u)](x))
        if self.cfg.head_float32:
            with torch.autocast(x.device.type, enabled=False):
                out = self.seg_outputs[-1](self.head_hidden(x.float()))
        else:
            out = self.seg_outputs[-1](self.head_hidden(x))
        return (out, extra[::-1]) if aux else out
