"""Network hyper-parameters as data (see ``cdpdnet/presets/*.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["NetworkConfig"]


@dataclass
class NetworkConfig:
    """Everything that fixes the shape of a :class:`~cdpdnet.networks.cdpdnet.CDPDNet`.

    Defaults are the reference's (``train.py``'s ``CDPDNet(...)`` call, reference section 1.1).
    """

    in_channels: int = 1
    num_classes: int = 32
    num_tasks: int = 11
    base_features: int = 32
    max_features: int = 320
    feature_multiplier: int = 2
    pool_strides: list = field(default_factory=lambda: [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    conv_kernels: list = field(default_factory=lambda: [[1, 3, 3]] + [[3, 3, 3]] * 5)
    convs_per_stage: int = 2
    fusion_stages: list = field(default_factory=lambda: [2, 3, 4])
    dino_layers: list = field(default_factory=lambda: [-3, -2, -1])
    dino_dim: int = 768
    dino_group: int = 14
    attn_heads: int = 4
    attn_window: int = 3
    attn_depth: int = 2
    attn_mlp_ratio: float = 4.0
    attn_qkv_bias: bool = False
    attn_drop_path: float = 0.3
    attn_drop_path_blocks: int = 10
    text_dim: int = 512
    text_proj_dim: int = 256
    reference_dead_modules: bool = False
    head_bias: float | None = None  # None: no bias (reference); a value: a bias initialised to this prior logit
    # None: the reference's linear 1x1x1 head; a width: a 1x1x1 ConvNormAct of that width before it, so a
    # narrow last stage (CPU presets) separates 32 overlapping classes non-linearly
    head_hidden: int | None = None
    # True: the head (head_hidden and the class conv) runs in float32 outside autocast, so that bf16
    # training (train.cpu_bf16, CUDA) rounds neither the last features nor the 32 logits' gradients
    # (the final head only: deep-supervision heads stay under autocast)
    head_float32: bool = False
    # nnU-Net's deep supervision (not in the reference): this many decoder outputs above the last one
    # (the next coarser scales) get their own 1x1x1 heads, supervised in training only (0: off)
    deep_supervision: int = 0
    # "reference": every decoder stage uses conv_kernels[-(u + 1)], nnU-Net v1's indexing quirk that the
    # reference inherits (all decoder convs 3x3x3); "mirror": each decoder stage uses its encoder stage's
    # kernel, as nnU-Net v2 (dynamic_network_architectures' UNetDecoder) does, so a 1x3x3 first stage
    # gets a 1x3x3 last decoder stage, a third of the full-resolution convolutions' cost
    decoder_kernels: str = "reference"

    @property
    def num_pool(self) -> int:
        return len(self.pool_strides)

    def widths(self) -> list[int]:
        """Channels of stages ``0..num_pool`` (the last is the bottleneck)."""
        return [min(self.base_features * self.feature_multiplier ** d, self.max_features) for d in range(self.num_pool + 1)]

    def decoder_kernel(self, u: int) -> list:
        """The kernel of decoder stage ``u`` (0 next to the bottleneck, ``num_pool - 1`` at full resolution)."""
        return self.conv_kernels[-(u + 1)] if self.decoder_kernels == "reference" else self.conv_kernels[self.num_pool - 1 - u]

    def divisor(self) -> tuple[int, int, int]:
        """A patch size must be a multiple of this, per axis."""
        out = [1, 1, 1]
        for s in self.pool_strides:
            out = [o * k for o, k in zip(out, s)]
        return tuple(out)

    def validate(self) -> None:
        if len(self.conv_kernels) != self.num_pool + 1:
            raise ValueError(f"conv_kernels needs {self.num_pool + 1} entries, got {len(self.conv_kernels)}")
        if len(self.dino_layers) != len(self.fusion_stages):
            raise ValueError("dino_layers and fusion_stages must have the same length")
        if any(not 1 <= s < self.num_pool for s in self.fusion_stages):
            raise ValueError(f"fusion_stages must lie in 1..{self.num_pool - 1}")
        w = self.widths()
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(f"head_hidden must be a positive width or null, got {self.head_hidden}")
        if not 0 <= int(self.deep_supervision) < self.num_pool:
            raise ValueError(f"deep_supervision must lie in 0..{self.num_pool - 1} (decoder outputs above the last), "
                             f"got {self.deep_supervision}")
        if self.decoder_kernels not in ("reference", "mirror"):
            raise ValueError(f"decoder_kernels must be 'reference' or 'mirror', got {self.decoder_kernels!r}")
        if any(w[s] % self.attn_heads for s in self.fusion_stages):
            raise ValueError("fusion stage widths must be divisible by attn_heads")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network settings: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg
