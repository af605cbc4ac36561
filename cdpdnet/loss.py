"""Partial-label segmentation loss (reference section 3: ``utils/loss.py``, ``loss = BCE + Dice``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PartialLabelLoss", "NaiveBackgroundLoss", "DeepSupervisionLoss", "softplus"]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (keeps autograd), so the loss carries no metadata."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, y)`` as contiguous float32 ``[B, C, V]``. Contiguous first: the network's channels-last 3D
    logits would make every element-wise op of the loss take a strided path (0.14-0.18 s instead of
    0.07 s forward + backward per `lite-wide` step on 2 cores)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    z = _plain(logits).float().contiguous().flatten(2)
    return z, _plain(target).to(dtype=z.dtype).contiguous().flatten(2)


class _Softplus(torch.autograd.Function):
    r""":math:`\log(1 + e^z)` as :math:`\max(z, 0) + \log(1 + e^{-|z|})`, with ``log`` where
    ``F.softplus`` uses ``log1p``; the backward pass is :math:`\sigma(z)`.

    On the CPU ``log1p`` (and with it ``F.softplus``, ``F.logsigmoid`` and
    ``F.binary_cross_entropy_with_logits``) runs without SIMD: 27-39 ms for the 2x32x48x32x48 logits
    of a `lite-wide` step on 2 cores, against 4 ms for ``log`` (measured with torch 2.14;
    docs/benchmarks.md, "A faster training step"). ``log(1 + e)`` rounds a term below 6e-8 to 0, an
    absolute error of at most 6e-8 per voxel in a loss that is a mean over voxels; the gradient is exact.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z.abs().neg_().exp_().add_(1.0).log_().add_(z.clamp_min(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * torch.sigmoid(z)


def softplus(z: torch.Tensor) -> torch.Tensor:
    """``F.softplus(z)`` without ``log1p`` (:class:`_Softplus`): the loss's per-voxel term."""
    return _Softplus.apply(z)


class PartialLabelLoss(nn.Module):
    r"""BCE-with-logits + soft Dice over the annotated (sample, channel) pairs only.

    With :math:`p = \sigma(z)`, binary targets :math:`y` and the annotated pairs
    :math:`S = \{(b, c) : \mathrm{annotated}[b, c] = 1\}`:

    .. math::

        L_\mathrm{BCE} = \frac{1}{|S|} \sum_{(b,c) \in S} \operatorname{mean}_v
            \mathrm{BCEWithLogits}(z_{bcv}, y_{bcv})

        L_\mathrm{Dice} = \frac{1}{|S|} \sum_{(b,c) \in S} \Bigl[ 1 -
            \frac{2 \sum_v p_{bcv} y_{bcv}}{\sum_v p_{bcv} + \sum_v y_{bcv} + s} \Bigr]

        L = w_\mathrm{bce} L_\mathrm{BCE} + w_\mathrm{dice} L_\mathrm{Dice}

    Per sample and per channel over the whole crop; the smoothing :math:`s = 1` is in the
    denominator only and :math:`p` is not squared.

    ``log_dice=True`` (off in the reference and by default) replaces the Dice term of every pair
    whose target is not empty by :math:`-\ln \frac{2 \sum_v p y + s}{\sum_v p + \sum_v y + s}`
    (the exponential logarithmic loss of Wong et al., MICCAI 2018, with :math:`\gamma = 1`). Its
    gradient is the Dice gradient divided by the pair's Dice, so a small structure that the
    network still misses (Dice near 0, probabilities near the prior, where the sigmoid's slope
    cancels the plain Dice's pull) keeps a strong pull, and a well segmented organ (Dice near 1)
    sees almost the plain loss. Pairs with an empty target keep the plain term (1, no gradient).

    ``focal_gamma`` > 0 (0, plain BCE, in the reference and by default) replaces the BCE by the
    focal loss of Lin et al. (ICCV 2017, torchvision's ``sigmoid_focal_loss``, no alpha): each
    voxel's BCE is scaled by :math:`(1 - p_t)^\gamma`, so negatives the network already gets right
    (p near 0) stop pushing their channel down, while a missed positive keeps its full pull.
    ``focal_channels`` (a bool ``[C]``, default all) limits it to some channels (e.g. the lesions);
    the others keep the plain BCE. Unannotated channels are UNKNOWN: their terms
    are computed with the rest (static shapes, no host sync, unlike the reference's per-sample
    gather) but removed with ``torch.where`` before the sums, so they get exactly zero gradient and
    the value equals the reference's gather on the annotated pairs. With nothing annotated the
    loss is a zero connected to the graph.

    ``pos_fraction`` = :math:`f` > 0 (0 in the reference and by default) weights the BCE of a pair's
    positive voxels by :math:`w = \max(1, f (N - Y) / Y)` (:math:`Y` positives among :math:`N`
    voxels; still divided by :math:`N`), so that the positives of every pair whose target is not
    empty weigh at least :math:`f` times its negatives. Large structures (:math:`Y/N \geq f/(1+f)`)
    keep the plain BCE. A small or thin one trapped at a low probability keeps a pull of
    :math:`w (1 - p) / N` per missed voxel, which the sigmoid's slope does not cancel (BCE on logits),
    while the negatives' push, :math:`p / N` per voxel, fades as :math:`p` falls. ``pos_channels``
    (a bool ``[C]``, default all) limits it to some channels (e.g. the lesions): the others get
    :math:`f = 0`. ``pos_fraction`` may also be a sequence or tensor ``[C]``: one :math:`f` per channel
    (e.g. more for the lesions).

    ``exclusion`` (a ``[C, C]`` 0/1 matrix, ``exclusion[c, d] = 1`` when a voxel of ROI ``d`` cannot be
    ROI ``c``; none in the reference and by default) adds what the annotated ROIs say about the
    unannotated channels: a voxel inside an annotated ROI ``d`` is a known negative of every
    unannotated channel ``c`` it excludes (the exclusion loss idea of Shi et al., "Marginal loss and
    exclusion loss for partially supervised multi-organ segmentation", MedIA 2021, here as a BCE
    towards 0 on those voxels only). With :math:`k_{bcv} = \min(1, \sum_d \mathrm{exclusion}[c, d]\,
    a_{bd}\, y_{bdv})` (a fraction for a down-sampled target) and :math:`U` the unannotated pairs
    with some :math:`k > 0`:

    .. math::

        L_\mathrm{excl} = \frac{1}{|U|} \sum_{(b,c) \in U} \operatorname{mean}_v
            k_{bcv} \log(1 + e^{z_{bcv}}),
        \qquad L \mathrel{+}= w_\mathrm{excl} L_\mathrm{excl}

    Everywhere else an unannotated channel stays unknown (no gradient): the background of a
    partially labelled image is not a negative, a voxel of a labelled organ is.

    ``pair_weights`` (a ``[C]`` tensor of positive numbers, none in the reference and by default)
    weighs every pair of channel ``c`` by :math:`w_c` in both sums, which become weighted means
    (:math:`\sum_S w_c \ell_{bc} / \sum_S w_c`): a ROI that few crops show and whose pair is one of
    the ~15 annotated in a sample (the lung tumour) then gets more of the shared features'
    gradient, with its own balance of positives and negatives unchanged.

    ``unannotated_weight`` = :math:`\lambda` > 0 (0 in the reference and by default) takes the naive
    baseline's targets for the unannotated channels at a small weight: every unannotated pair gets the BCE
    towards its target as given (0 from :class:`cdpdnet.data.PartialLabelToChannelsd`) over its whole crop
    (no Dice term), averaged over those pairs,
    :math:`L \mathrel{+}= \lambda \frac{1}{|\bar S|} \sum_{(b,c) \notin S} \operatorname{mean}_v
    \log(1 + e^{z_{bcv}})`. Most of those voxels are true negatives (an ROI fills a small part of a crop),
    which the masked loss never shows its channel; the few false ones (the ROI itself, present but not
    annotated) are outweighed by the annotating sources' positives when :math:`\lambda` is small, where the
    naive baseline (:math:`\lambda = 1`, in the same mean as the annotated pairs) can lose a large ROI.

    ``unannotated_cap`` = :math:`\rho` > 0 (0, no cap, by default; used only with :math:`\lambda` > 0) bounds
    that push where the channel predicts much of the crop: an unannotated pair whose mean probability
    :math:`\bar p_{bc}` exceeds :math:`\rho` has its term scaled by :math:`\rho / \bar p_{bc}` (no gradient through
    the factor), so it pushes no harder in total than on a prediction filling :math:`\rho` of the crop. The
    ROI itself, present but not annotated, then weighs per voxel :math:`\propto \rho / \bar p` instead of 1. A
    large ROI (a phantom's lung fills 3-4 % of a `lite-wide` crop of 288x192x288 mm, its liver 6 %, its colon
    5 %), whose annotating samples pull each voxel by only ~1/N (its Dice pull ~1/(2Y) is weak where Y is
    large, and ``pos_fraction`` leaves it unweighted), keeps its positives, while a small ROI's, a lesion's or
    a sparse stray prediction's voxels get the full push.

    ``treat_unannotated_as_background=True`` gives the naive baseline: all channels supervised,
    an unannotated channel's target taken as given (0 everywhere from
    :class:`cdpdnet.data.PartialLabelToChannelsd`).

    ``forward(logits [B,C,...], target [B,C,...] (0/1, any dtype), annotated [B,C] (bool/0-1) or None)``;
    ``annotated=None`` means all channels. The last call's terms are in :meth:`components`.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 treat_unannotated_as_background: bool = False, log_dice: bool = False,
                 focal_gamma: float = 0.0, focal_channels: torch.Tensor | None = None,
                 pos_fraction: float | Sequence[float] | torch.Tensor = 0.0, pos_channels: torch.Tensor | None = None,
                 exclusion: torch.Tensor | None = None, exclusion_weight: float = 1.0,
                 pair_weights: torch.Tensor | Sequence[float] | None = None, unannotated_weight: float = 0.0,
                 unannotated_cap: float = 0.0) -> None:
        super().__init__()
        if not float(unannotated_weight) >= 0:
            raise ValueError(f"unannotated_weight must be >= 0, got {unannotated_weight!r}")
        if not 0 <= float(unannotated_cap) <= 1:
            raise ValueError(f"unannotated_cap must be in [0, 1] (0 = no cap), got {unannotated_cap!r}")
        if float(unannotated_cap) > 0 and not float(unannotated_weight) > 0:
            raise ValueError(f"unannotated_cap ({unannotated_cap}) bounds the weak term of unannotated_weight, which is 0 "
                             "(off): set unannotated_weight > 0 too, or leave the cap at 0")
        self.unannotated_weight = float(unannotated_weight)
        self.unannotated_cap = float(unannotated_cap)
        self.log_dice = bool(log_dice)
        if pair_weights is not None:
            pair_weights = torch.as_tensor(pair_weights, dtype=torch.float32)
            if pair_weights.ndim != 1 or not bool((pair_weights > 0).all()):
                raise ValueError(f"pair_weights must be one positive number per channel, got {pair_weights!r}")
        self.pair_weights = pair_weights
        if exclusion is not None:
            exclusion = torch.as_tensor(exclusion, dtype=torch.float32)
            if exclusion.ndim != 2 or exclusion.shape[0] != exclusion.shape[1]:
                raise ValueError(f"exclusion must be a square [C, C] matrix, got {tuple(exclusion.shape)}")
        if not float(exclusion_weight) >= 0:
            raise ValueError(f"exclusion_weight must be >= 0, got {exclusion_weight!r}")
        self.exclusion = exclusion
        self.exclusion_weight = float(exclusion_weight)
        fractions = torch.as_tensor(pos_fraction, dtype=torch.float32)
        if fractions.ndim > 1 or not bool(((fractions >= 0) & (fractions < 1)).all()):
            raise ValueError(f"pos_fraction must be in [0, 1) (a number, or one per channel), got {pos_fraction!r}")
        self.pos_channels = None if pos_channels is None else torch.as_tensor(pos_channels, dtype=torch.bool)
        if self.pos_channels is not None:  # a channel left out has fraction 0 (weight 1: the plain BCE)
            fractions = torch.where(self.pos_channels, fractions, torch.zeros(()))
        self.pos_fraction: float | torch.Tensor = float(pos_fraction) if fractions.ndim == 0 else fractions
        self._pos_weighted = bool((fractions > 0).any())
        if not float(focal_gamma) >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma!r}")
        self.focal_gamma = float(focal_gamma)
        self.focal_channels = None if focal_channels is None else torch.as_tensor(focal_channels, dtype=torch.bool)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.treat_unannotated_as_background = bool(treat_unannotated_as_background)
        self._last: dict[str, torch.Tensor] = {}

    def per_pair(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked ``(bce [B,C], dice [B,C])`` of every (sample, channel) pair, in float32."""
        bce, dice, _ = self._per_pair(*_flat(logits, target))
        return bce, dice

    def _per_pair(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bce [B,C], dice [B,C], sum of the probabilities [B,C])``."""
        focal = torch.zeros(z.shape[1], dtype=torch.bool) if self.focal_gamma == 0 else (
            torch.ones(z.shape[1], dtype=torch.bool) if self.focal_channels is None else self.focal_channels)
        bce = z.new_empty(z.shape[:2])
        for chosen, is_focal in ((focal.nonzero().flatten(), True), ((~focal).nonzero().flatten(), False)):
            if chosen.numel() == 0:
                continue
            if chosen.numel() == z.shape[1]:  # one kind for every channel: no copies (the default path)
                zc, yc, chosen = z, y, None
            else:
                chosen = chosen.to(z.device)
                zc, yc = z.index_select(1, chosen), y.index_select(1, chosen)
            if is_focal:  # each channel's BCE is computed once, with the term its channel uses
                from torchvision.ops import sigmoid_focal_loss

                term = sigmoid_focal_loss(zc, yc, alpha=-1, gamma=self.focal_gamma, reduction="none")
            else:
                term = softplus(zc) - zc * yc  # F.binary_cross_entropy_with_logits, without its log1p
            if self._pos_weighted:  # positives up-weighted where they are few (see the class docstring)
                n_pos = yc.sum(-1, keepdim=True)
                f = self._pos_fraction_of(z.shape[1], chosen, z.device)
                w = (f * (yc.shape[-1] - n_pos) / n_pos.clamp_min(1.0)).clamp_min(1.0)
                term = term * (1.0 + (w - 1.0) * yc)
            bce = term.mean(-1) if chosen is None else bce.index_copy(1, chosen, term.mean(-1))
        p = torch.sigmoid(z)
        inter = (p * y).sum(-1)
        p_sum = p.sum(-1)
        denom = p_sum + y.sum(-1) + self.smooth
        dice = 1.0 - 2.0 * inter / denom
        if self.log_dice:
            log_term = -torch.log((2.0 * inter + self.smooth) / denom)
            dice = torch.where(y.sum(-1) > 0, log_term, dice)
        return bce, dice, p_sum

    def _pos_fraction_of(self, C: int, chosen: torch.Tensor | None, device) -> float | torch.Tensor:
        """``pos_fraction`` for the channels computed (all ``C``, or ``chosen``), shaped to broadcast on ``[B, C, 1]``."""
        f = self.pos_fraction
        if not torch.is_tensor(f):
            return f
        if f.shape != (C,):
            raise ValueError(f"pos_fraction has {f.shape[0]} values but the logits have {C} channels")
        f = f.to(device)
        return (f if chosen is None else f[chosen]).view(1, -1, 1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        B, C = logits.shape[:2]
        if annotated is None or self.treat_unannotated_as_background:
            mask = torch.ones(B, C, dtype=torch.bool, device=logits.device)
        else:
            mask = torch.as_tensor(annotated, device=logits.device)
            if mask.shape != (B, C):
                raise ValueError(f"annotated must be [B, C] = {(B, C)}, got {tuple(mask.shape)}")
            mask = mask.bool() if mask.dtype == torch.bool else mask != 0
        z, y = _flat(logits, target)
        bce, dice, p_sum = self._per_pair(z, y)
        zero = bce.new_zeros(())
        if self.pair_weights is None:
            weight = mask.to(bce.dtype)
        else:
            if self.pair_weights.shape != (C,):
                raise ValueError(f"pair_weights has {self.pair_weights.shape[0]} values but the logits have {C} channels")
            weight = torch.where(mask, self.pair_weights.to(bce.device)[None, :], zero)
        n = weight.sum().clamp_min(1e-12)  # nothing annotated: 0 / n = 0, still connected to the graph
        bce_m = torch.where(mask, bce * weight, zero).sum() / n
        dice_m = torch.where(mask, dice * weight, zero).sum() / n
        loss = self.bce_weight * bce_m + self.dice_weight * dice_m
        self._last = {"bce": bce_m.detach(), "dice": dice_m.detach(), "pairs": mask.sum().detach()}
        if self.exclusion is not None and self.exclusion_weight > 0 and not bool(mask.all()):
            self._check_exclusion(C)
            excl = self._exclusion(z, y, mask)
            loss = loss + self.exclusion_weight * excl
            self._last["exclusion"] = excl.detach()
        if self.unannotated_weight > 0 and not bool(mask.all()):
            unannotated = ~mask  # their targets are 0 (PartialLabelToChannelsd): the BCE towards background
            term = bce
            if self.unannotated_cap > 0:  # rho / mean p where the channel predicts more than rho of the crop
                share = (p_sum.detach() / z.shape[-1]).clamp_min(self.unannotated_cap)
                term = bce * (self.unannotated_cap / share)
            weak = torch.where(unannotated, term, zero).sum() / unannotated.sum().to(bce.dtype)
            loss = loss + self.unannotated_weight * weak
            self._last["unannotated"] = weak.detach()
        return loss

    def exclusion_term(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        r""":math:`L_\mathrm{excl}` (class docstring): BCE towards 0 of the unannotated channels on the voxels
        of the annotated ROIs they exclude; ``annotated`` a bool ``[B, C]``."""
        self._check_exclusion(logits.shape[1])
        return self._exclusion(*_flat(logits, target), annotated)

    def _check_exclusion(self, C: int) -> None:
        if self.exclusion.shape != (C, C):
            raise ValueError(f"exclusion is {tuple(self.exclusion.shape)} but the logits have {C} channels")

    def _exclusion(self, z: torch.Tensor, y: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        y = y * annotated[:, :, None].to(z.dtype)
        known = torch.einsum("cd,bdv->bcv", self.exclusion.to(z), y).clamp_(max=1.0)  # [B, C, V], no grad
        pairs = ~annotated & (known.amax(-1) > 0)
        term = (softplus(z) * known).mean(-1)
        return torch.where(pairs, term, term.new_zeros(())).sum() / pairs.sum().clamp_min(1).to(term.dtype)

    def components(self) -> dict[str, float]:
        """``{"bce", "dice", "pairs"}`` (and ``"exclusion"`` when that term is on) of the last call, as Python numbers (syncs the device)."""
        out = {k: float(v) for k, v in self._last.items()}
        if "pairs" in out:
            out["pairs"] = int(out["pairs"])
        return out

    @property
    def last_components(self) -> dict[str, float]:
        return self.components()


class NaiveBackgroundLoss(PartialLabelLoss):
    """Naive baseline: every channel supervised, unannotated ROIs taken as background."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 log_dice: bool = False, focal_gamma: float = 0.0, focal_channels: torch.Tensor | None = None,
                 pos_fraction: float | Sequence[float] | torch.Tensor = 0.0,
                 pos_channels: torch.Tensor | None = None,
                 pair_weights: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__(bce_weight, dice_weight, smooth, treat_unannotated_as_background=True, log_dice=log_dice,
                         focal_gamma=focal_gamma, focal_channels=focal_channels, pos_fraction=pos_fraction,
                         pos_channels=pos_channels, pair_weights=pair_weights)


class DeepSupervisionLoss(nn.Module):
    """A loss over the full-resolution logits and coarser ones (nnU-Net's deep supervision).

    ``forward(logits, aux [k tensors, finest first], target, annotated)``: ``loss(logits, target,
    annotated)`` plus each coarser output against the target averaged down to its grid (fractions,
    so a lesion smaller than a coarse voxel stays in the target), weighted ``2^-i`` (MONAI's
    ``DeepSupervisionLoss`` ``weight_mode="exp"``) and normalised to sum 1. MONAI's class is not used
    because it resizes the target with nearest neighbours and passes no annotated mask.
    :meth:`components` reports the full-resolution terms.
    """

    def __init__(self, loss: PartialLabelLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, aux, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        weights = [0.5 ** i for i in range(len(aux) + 1)]
        total = sum(weights)
        y = _plain(target).float()
        out = sum(w * self.loss(a, F.adaptive_avg_pool3d(y, a.shape[2:]), annotated)
                  for w, a in zip(weights[1:], aux)) if aux else 0.0
        return (out + weights[0] * self.loss(logits, target, annotated)) / total

    def components(self) -> dict[str, float]:
        return self.loss.components()
