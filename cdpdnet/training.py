"""Partial-label training of CDPDNet (reference section 4), on CPU, one GPU or many (``torchrun``).

* samples: image + ROI-valued label + the set of annotated ROIs (:mod:`cdpdnet.data`);
* uniform sampling over source datasets; per volume ``num_samples`` crops (``train.crop``): the
  reference's positive/negative crops around annotated foreground, or label-class crops weighted
  ``tumor_ratios`` (background, organ, lesion) for sources that annotate lesions; or class-balanced
  crops centred on an annotated ROI drawn uniformly; optional zoom (the reference's, for chosen
  sources), random rotation and scaling, rot90, contrast scaling and intensity shift;
* loss: BCE + Dice over the (sample, annotated ROI) pairs only (:class:`cdpdnet.loss.PartialLabelLoss`),
  or the naive baseline that treats unannotated ROIs as background;
* AdamW, linear warm-up + cosine schedule stepped once per epoch at its start (as the reference),
  or annealed over a time budget (``schedule="budget"``);
* bf16 autocast on CUDA, channels-last 3D convolutions on the CPU; DDP under ``torchrun`` where only rank 0 logs and writes;
* atomic checkpoints every epoch (``last.pt``: resumable) and the published model (``model.pt``);
* a progress bar, a JSON-lines metrics log, a stop flag and a time budget.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    ClassesToIndicesd,
    Flipd,
    LoadImaged,
    EnsureChannelFirstd,
    MapLabelValued,
    RandCropByLabelClassesd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)

from .checkpoint import load_checkpoint, save_checkpoint
from .device import keep_freed_memory, memory_format, use_bf16
from .data import PartialLabelToChannelsd, PartialSample, RemapLabelValuesd, UniformSourceDataset, roi_source_counts, source_rois
from .factory import LoadedModel, build_model, checkpoint_payload, model_from_checkpoint
from .loss import DeepSupervisionLoss, NaiveBackgroundLoss, PartialLabelLoss
from .preprocessing import left_right_axis, preprocess_transforms
from .preset import Preset, load_preset
from .taxonomy import NUM_CLASSES, ROIS, may_overlap, roi

__all__ = ["TrainConfig", "Trainer", "train", "warmup_cosine_lr", "loss_from_preset", "exclusion_matrix"]

LESIONS = np.array([0] + [1 if r.is_lesion else 0 for r in ROIS], dtype=np.uint8)
LESION_CHANNELS = LESIONS[1:]  # the same, by channel
# channel -> the channel of its left/right partner (itself where it has none): a mirrored crop's labels
SIDE_SWAP = np.array([roi(r.pair).index - 1 if r.pair else r.index - 1 for r in ROIS], dtype=np.int64)


def exclusion_matrix() -> torch.Tensor:
    """``[C, C]``: 1 where a voxel of ROI ``d`` cannot be ROI ``c`` (:func:`cdpdnet.taxonomy.may_overlap`), the
    known negatives that ``train.exclusion_weight`` adds to the partial-label loss."""
    return torch.tensor([[0.0 if may_overlap(c.index, d.index) else 1.0 for d in ROIS] for c in ROIS])


def _number(t: dict, key: str, default: float, ok, rule: str) -> float:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise ValueError(f"train.{key} must be {rule}, got {v!r}")
    return float(v)


def _contrast_factors(t: dict) -> tuple[float, float]:
    """``train.contrast_fixed_mean``: f is drawn from ``[lo, hi]`` (or ``[-v, v]`` for a number v); intensities
    scale about the crop's mean by 1 + f, so f must stay above -1 (a factor of 0 or less would flatten or
    invert the crop)."""
    v = t.get("contrast_fixed_mean", 0.0)
    pair = ((-v, v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            else tuple(v) if isinstance(v, (list, tuple)) and len(v) == 2 else None)
    if (pair is None or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in pair)
            or not -1 < pair[0] <= pair[1]):
        raise ValueError("train.contrast_fixed_mean must be a number v in [0, 1) (f in [-v, v]) or a pair [lo, hi] "
                         f"with -1 < lo <= hi, got {v!r}")
    return float(pair[0]), float(pair[1])


def _roi_numbers(t: dict, key: str, ok, rule: str) -> dict[int, float]:
    """``train[key]``, a mapping ``{ROI name or synonym: number}``, as ``{label value: number}``. A number
    that fails ``ok`` is refused (``ValueError`` naming the key, the ROI and ``rule``); an unknown name
    raises :class:`~cdpdnet.taxonomy.UnknownROIError` with the closest names."""
    m = t.get(key) or {}
    if not isinstance(m, dict):
        raise ValueError(f"train.{key} must be a mapping {{ROI name: number}}, got {m!r}")
    out = {}
    for name, v in m.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(f"train.{key}[{name!r}] must be {rule}, got {v!r}")
        out[roi(name).index] = float(v)
    return out


def _channels(t: dict, key: str) -> torch.Tensor | None:
    """``"all"`` (None: every channel) or ``"lesions"`` (a bool mask of the lesion channels)."""
    v = t.get(key, "all")
    if v not in ("all", "lesions"):
        raise ValueError(f"train.{key} must be 'all' or 'lesions', got {v!r}")
    return torch.as_tensor(LESION_CHANNELS > 0) if v == "lesions" else None


def loss_from_preset(t: dict, naive: bool = False) -> PartialLabelLoss:
    """The loss of a preset's ``train`` section: the reference's BCE + Dice over the annotated pairs, with
    the options ``log_dice``, ``focal_gamma`` / ``focal_on``, ``bce_pos_fraction`` / ``bce_pos_on`` /
    ``bce_pos_fraction_lesions`` (the lesion channels' own fraction, default ``bce_pos_fraction``) /
    ``bce_pos_fraction_rois`` (``{ROI name: fraction}`` for single ROIs, above both and above
    ``bce_pos_on``) and
    ``exclusion_weight``, ``unannotated_weight`` (the naive baseline's background targets for the unannotated
    channels, BCE only, at that weight), ``unannotated_cap`` (that term's bound where a channel predicts much of the
    crop) and ``roi_loss_weights`` (``{ROI name: weight}``, the weight of that ROI's
    pairs in the BCE and Dice means) (all off by default; :class:`cdpdnet.loss.PartialLabelLoss`). ``naive``: the
    baseline that takes unannotated ROIs as background (no exclusion term: every channel is supervised)."""
    log_dice = t.get("log_dice", False)
    if not isinstance(log_dice, bool):
        raise ValueError(f"train.log_dice must be true or false, got {log_dice!r}")
    pos_fraction: float | torch.Tensor = _number(t, "bce_pos_fraction", 0.0, lambda v: 0 <= v < 1,
                                                 "a number in [0, 1) (0 = plain BCE)")
    if t.get("bce_pos_fraction_lesions") is not None:
        lesions = _number(t, "bce_pos_fraction_lesions", 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)")
        pos_fraction = torch.where(torch.as_tensor(LESION_CHANNELS > 0), lesions, pos_fraction)
    pos_channels = _channels(t, "bce_pos_on")
    per_roi = _roi_numbers(t, "bce_pos_fraction_rois", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if per_roi:
        pos_fraction = torch.as_tensor(pos_fraction, dtype=torch.float32).expand(NUM_CLASSES).clone()
        for index, f in per_roi.items():
            pos_fraction[index - 1] = f
            if pos_channels is not None:  # a named ROI is weighted even where bce_pos_on leaves it out
                pos_channels[index - 1] = True
    pair = _roi_numbers(t, "roi_loss_weights", lambda v: v > 0, "a weight > 0")
    pair_weights = None
    if pair:
        pair_weights = torch.ones(NUM_CLASSES)
        for index, w in pair.items():
            pair_weights[index - 1] = w
    kw = dict(log_dice=log_dice, pair_weights=pair_weights,
              focal_gamma=_number(t, "focal_gamma", 0.0, lambda v: v >= 0, "a number >= 0 (0 = plain BCE)"),
              focal_channels=_channels(t, "focal_on"),
              pos_fraction=pos_fraction,
              pos_channels=pos_channels)
    excl = _number(t, "exclusion_weight", 0.0, lambda v: v >= 0, "a number >= 0 (0 = off)")
    weak = _number(t, "unannotated_weight", 0.0, lambda v: v >= 0, "a number >= 0 (0 = off)")
    cap = _number(t, "unannotated_cap", 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = no cap)")
    if naive:
        return NaiveBackgroundLoss(**kw)
    return PartialLabelLoss(**kw, exclusion=exclusion_matrix() if excl else None, exclusion_weight=excl,
                            unannotated_weight=weak, unannotated_cap=cap)


@dataclass
class TrainConfig:
    """Run settings; ``None`` fields take the preset's ``train`` values."""

    out_dir: str = "runs/cdpdnet"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    batch_size: int | None = None
    num_samples: int | None = None
    device: str = "auto"
    amp: bool | None = None  # default: bf16 autocast on CUDA, and on CPUs with bf16 when the preset asks
    seed: int = 0
    loss: str = "partial"  # or "naive": unannotated ROIs as background (baseline)
    text_encoder: str | None = None  # default: the preset's
    init_checkpoint: str | None = None  # fine-tune from this model
    resume: bool = False  # continue from out_dir/last.pt
    max_minutes: float | None = None  # time budget; stops cleanly after the running iteration
    val_every: int = 0  # epochs between validations (0 = never)
    progress: bool = True
    threads: int | None = None
    # CPU: glibc keeps freed memory for the next step (cdpdnet.device.keep_freed_memory; process-wide)
    keep_freed_memory: bool = True
    # "reference": warm-up then cosine to 0 at the last epoch (the published recipe, for long runs);
    # "finetune": cosine from the first epoch, no warm-up, floor at 10 % (short rounds on a served model)
    # "budget": warm-up (first 2 %) and cosine to 0 over the time budget ``max_minutes``, set every
    # iteration (a CPU run of N minutes ends annealed whatever its speed)
    schedule: str = "reference"


@dataclass
class EpochStats:
    epoch: int
    loss: float
    bce: float
    dice_loss: float
    lr: float
    seconds: float
    iterations: int
    val_dice: float | None = None
    val_per_roi: dict = field(default_factory=dict)


def _device(name: str) -> torch.device:
    if name == "auto":
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine_lr(step: int, base_lr: float, warmup: int, total: int, start_lr: float = 0.0,
                     eta_min: float = 0.0) -> float:
    """``LinearWarmupCosineAnnealingLR`` (pl_bolts, used by the reference) as a pure function of the step."""
    if warmup > 1 and step < warmup:
        return start_lr + step * (base_lr - start_lr) / (warmup - 1)
    if step >= total or total <= warmup:
        return eta_min if step >= total else base_lr
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


class _Distributed:
    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                torch.cuda.set_device(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float, device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _CaseCache:
    """Deterministic part of the pipeline (load, remap, RAS, spacing, HU window, body crop), done once."""

    def __init__(self, preset: Preset):
        self.load = LoadImaged(["image", "label"], image_only=True)
        self.channel = EnsureChannelFirstd(["image", "label"])
        self.remap = RemapLabelValuesd("label")
        self.pre = preprocess_transforms(preset.preprocess, keys=("image",), label_keys=("label",))
        self.pad = SpatialPadd(["image", "label"], preset.patch_size)
        # per-ROI voxel indices, computed once per case, for the class-balanced crop policy
        self.indices = (ClassesToIndicesd("label", num_classes=NUM_CLASSES + 1, indices_postfix="_indices")
                        if crop_policy(preset) == "classes" else None)
        self.cache: dict[str, dict] = {}

    def __call__(self, d: dict) -> dict:
        key = d["image"] + "|" + str(d.get("label"))
        if key not in self.cache:
            x = self.pad(self.pre(self.remap(self.channel(self.load(dict(d))))))
            lab = np.asarray(x["label"]).astype(np.uint8)
            x["label"] = x["label"].to(torch.uint8) if torch.is_tensor(x["label"]) else lab
            # three-class map for label-class crops: 0 background, 1 annotated organ, 2 annotated lesion
            x["classes"] = torch.from_numpy(np.where(lab > 0, 1 + LESIONS[lab], 0).astype(np.uint8))
            x["image"] = x["image"].float()
            if self.indices is not None:
                x = self.indices(x)
            self.cache[key] = {k: v for k, v in x.items() if k in ("image", "label", "classes", "label_indices")}
        out = dict(d)
        out.update(self.cache[key])
        return out


def lesion_mirror_axis(preset: Preset) -> int:
    """The spatial axis that ``train.lesion_mirror_prob`` mirrors: left-right in the preset's orientation.

    Not in the reference. With probability ``lesion_mirror_prob`` a crop of a case that annotates a
    lesion is mirrored left-right and keeps only its lesion ROIs annotated: a mirrored torso has its
    liver on the wrong side, so no organ channel may learn from it, while a tumour or cyst is what it is
    on either side. Without it, a lesion channel can learn the side of the body it has mostly seen: on
    the CPU benchmark one seed's lung-tumour channel fired on nodules in the left lung only, and on the
    same volumes mirrored, on the right-lung nodules only (docs/benchmarks.md).

    ``train.lesion_mirror_labels`` says what a mirrored crop keeps annotated: ``"lesions"`` (the
    default, as above) or ``"swap_sides"``, every ROI the case annotates, with each left/right pair's
    labels swapped, so that the mirrored crop is a correctly labelled body with its organs on the other
    side (a right kidney is the kidney on the patient's right, whichever side the liver is on)."""
    try:
        return left_right_axis(preset.preprocess.get("orientation", "RAS"))
    except ValueError as e:
        raise ValueError(f"train.lesion_mirror_prob: preprocess.{e}") from None


def crop_policy(preset: Preset) -> str:
    """``train.crop`` of a preset: ``"posneg"`` (the reference's pos/neg and lesion-class crops) or
    ``"classes"`` (class-balanced: each crop centred on a voxel of an annotated ROI drawn uniformly,
    or on background with weight ``train.background_ratio``; lesion ROIs weigh ``train.lesion_ratio``,
    default 1, and ``train.roi_crop_weights`` (``{ROI name: factor}``) multiplies single ROIs' weights;
    ``train.crop_roi_weighting`` ``"rarity"`` divides each ROI's weight by the number of sources that
    annotate it, see :class:`_RandomCrops`)."""
    policy = preset.train.get("crop", "posneg")
    if policy not in ("posneg", "classes"):
        raise ValueError(f"unknown crop policy train.crop={policy!r}: use 'posneg' or 'classes'")
    weighting = preset.train.get("crop_roi_weighting", "uniform")
    if weighting not in CROP_ROI_WEIGHTING:
        raise ValueError(f"train.crop_roi_weighting must be one of {CROP_ROI_WEIGHTING}, got {weighting!r}")
    if weighting != "uniform" and policy != "classes":
        raise ValueError(f"train.crop_roi_weighting={weighting!r} weights the class-balanced crops: "
                         f"set train.crop to 'classes' (it is {policy!r})")
    return policy


CROP_ROI_WEIGHTING = ("uniform", "rarity")


class _RandomCrops:
    """Per volume: ``num_samples`` crops (see :func:`crop_policy`), augmentation, targets.

    ``roi_sources`` (``{ROI value: number of sources annotating it}``) is needed for
    ``train.crop_roi_weighting: "rarity"`` (not in the reference; ``"uniform"`` by default): a class-balanced
    crop is then centred on an annotated ROI with a weight divided by that number, so that within a source
    the ROIs few sources annotate (the pelvic and bowel ROIs of the reference's key 07, the prostate of
    key 09) get the crops its liver and kidneys, which ten sources annotate, would have had. The weights
    are rescaled per case to their unweighted sum, so the share of background crops stays as set.
    """

    def __init__(self, preset: Preset, num_samples: int, seed: int, roi_sources: dict[int, int] | None = None):
        t = preset.train
        patch = preset.patch_size
        keys = ["image", "label"]
        self.policy = crop_policy(preset)
        self.background_ratio = float(t.get("background_ratio", 1.0))
        self.roi_weights = np.array([float(t.get("lesion_ratio", 1.0)) if r.is_lesion else 1.0 for r in ROIS])
        for index, factor in _roi_numbers(t, "roi_crop_weights", lambda v: v >= 0, "a weight >= 0").items():
            self.roi_weights[index - 1] *= factor
        self.roi_rarity = None
        if t.get("crop_roi_weighting", "uniform") == "rarity":
            if not roi_sources:
                raise ValueError("train.crop_roi_weighting='rarity' needs the number of sources annotating each ROI")
            self.roi_rarity = np.array([1.0 / roi_sources.get(v, 1) for v in range(1, NUM_CLASSES + 1)])
        self.balanced = RandCropByLabelClassesd(keys, "label", patch, ratios=[1.0] * (NUM_CLASSES + 1),
                                                num_classes=NUM_CLASSES + 1, num_samples=num_samples,
                                                indices_key="label_indices", allow_smaller=True, warn=False)
        self.posneg = RandCropByPosNegLabeld(keys, "label", patch, pos=t.get("pos", 2), neg=t.get("neg", 1),
                                             num_samples=num_samples, image_key="image", image_threshold=0,
                                             allow_smaller=True)
        self.by_class = RandCropByLabelClassesd(keys, "classes", patch, ratios=t.get("tumor_ratios", [1, 1, 5]),
                                                num_classes=3, num_samples=num_samples, allow_smaller=True,
                                                warn=False)
        # the reference's RandZoomd (MSD keys only): here on the crop, which keeps its centre voxel
        zoom = t.get("zoom_range", [1.3, 1.5])
        self.zoom = RandZoomd(keys, prob=t.get("zoom_prob", 0.0), min_zoom=zoom[0], max_zoom=zoom[1],
                              mode=("area", "nearest"), keep_size=True)
        self.zoom_sources = None if t.get("zoom_sources") is None else set(t["zoom_sources"])
        # rotation (radians about each axis) and isotropic scaling, for unseen patients and scanners
        scale = float(t.get("affine_scale", 0.0))
        self.affine = RandAffined(keys, prob=t.get("affine_prob", 0.0), rotate_range=t.get("affine_rotate", [0.0, 0.0, 0.0]),
                                  scale_range=[scale] * 3, mode=("bilinear", "nearest"), padding_mode="border")
        self.rot = RandRotate90d(keys, prob=t.get("rot90_prob", 0.1), max_k=3)
        self.contrast = RandScaleIntensityd("image", factors=t.get("scale_intensity", 0.0),
                                            prob=t.get("scale_intensity_prob", 0.0))
        self.shift = RandShiftIntensityd("image", offsets=t.get("shift_intensity", 0.1),
                                         prob=t.get("shift_intensity_prob", 0.2))
        # nnU-Net's contrast augmentation: v -> (v - mean) (1 + f) + mean, clipped to the crop's range, so
        # every tissue difference (a vessel against its liver) scales by 1 + f and the mean stays
        self.fixed_mean = RandScaleIntensityFixedMeand("image", factors=_contrast_factors(t), fixed_mean=True, preserve_range=True,
                                                       prob=_number(t, "contrast_fixed_mean_prob", 0.0, lambda v: 0 <= v <= 1,
                                                                    "a probability in [0, 1]"))
        # lesion crops mirrored left-right, every non-lesion channel unknown there (see lesion_mirror_axis)
        self.mirror_prob = _number(t, "lesion_mirror_prob", 0.0, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
        self.mirror = Flipd(keys, spatial_axis=lesion_mirror_axis(preset)) if self.mirror_prob > 0 else None
        self.mirror_rng = np.random.RandomState(seed)
        self.mirror_labels = t.get("lesion_mirror_labels", "lesions")
        if self.mirror_labels not in ("lesions", "swap_sides"):
            raise ValueError(f"train.lesion_mirror_labels must be 'lesions' or 'swap_sides', got {self.mirror_labels!r}")
        swapped = np.flatnonzero(SIDE_SWAP != np.arange(NUM_CLASSES))
        self.swap_sides = (MapLabelValued("label", orig_labels=(swapped + 1).tolist(), target_labels=(SIDE_SWAP[swapped] + 1).tolist())
                           if self.mirror is not None and self.mirror_labels == "swap_sides" else None)
        self.to_channels = PartialLabelToChannelsd("label", "annotated", "target")
        self.pad = SpatialPadd(keys, patch)
        for tr in (self.posneg, self.by_class, self.balanced, self.zoom, self.affine, self.rot, self.contrast, self.fixed_mean,
                   self.shift):
            tr.set_random_state(seed)

    def augment(self, c: dict, source: str | None) -> dict:
        """Spatial then intensity augmentation of one padded crop ``{"image", "label"}``."""
        if self.zoom.prob > 0 and (self.zoom_sources is None or source in self.zoom_sources):
            c = self.zoom(c)
        if self.affine.prob > 0:
            c = self.affine(c)
        c = self.contrast(self.rot(c))
        if self.fixed_mean.prob > 0:
            c = self.fixed_mean(c)
        return self.shift(c)

    def __call__(self, d: dict) -> list[dict]:
        annotated = np.asarray(d["annotated"])
        lesions = any(ROIS[v - 1].is_lesion for v in np.flatnonzero(annotated) + 1)
        if self.policy == "classes":
            # ROIs without voxels in this case get no crops (MONAI drops empty classes from the ratios)
            weights = annotated * self.roi_weights
            rare = None if self.roi_rarity is None else weights * self.roi_rarity
            if rare is not None and rare.sum() > 0:
                weights = rare * (weights.sum() / rare.sum())
            self.balanced.cropper.ratios = [self.background_ratio] + [float(w) for w in weights]
            crops = self.balanced({k: d[k] for k in ("image", "label", "label_indices")})
        elif lesions:
            crops = self.by_class({k: d[k] for k in ("image", "label", "classes")})
        else:
            crops = self.posneg({k: d[k] for k in ("image", "label")})
        out = []
        for c in crops:
            c = self.augment(self.pad({"image": c["image"], "label": c["label"]}), d.get("source"))
            c["annotated"] = d["annotated"]
            if lesions and self.mirror is not None and self.mirror_rng.rand() < self.mirror_prob:
                c = self.mirror(c)
                if self.swap_sides is None:
                    c["annotated"] = np.asarray(d["annotated"]) * LESION_CHANNELS
                else:  # the partner of each side takes its label and its annotated flag
                    c = self.swap_sides(c)
                    c["annotated"] = np.asarray(d["annotated"])[SIDE_SWAP]
            c = self.to_channels(c)
            out.append({"image": torch.as_tensor(c["image"]).float(), "target": torch.as_tensor(np.asarray(c["target"])),
                        "annotated": torch.as_tensor(np.asarray(c["annotated"])), "task_id": d["task_id"]})
        return out


def _collate(items: list[list[dict]]) -> dict[str, torch.Tensor]:
    flat = [c for crops in items for c in crops]
    return {
        "image": torch.stack([c["image"].as_tensor() if hasattr(c["image"], "as_tensor") else c["image"] for c in flat]),
        "target": torch.stack([torch.as_tensor(c["target"]).to(torch.uint8) for c in flat]),
        "annotated": torch.stack([c["annotated"].to(torch.float32) for c in flat]),
        "task_id": torch.tensor([c["task_id"] for c in flat], dtype=torch.long),
    }


class Trainer:
    """Train or fine-tune one model. ``run()`` returns the final summary dict.

    Args:
        samples: training samples; ``validation`` optional validation samples (fully or partially labelled).
        preset: preset name/path/object (ignored for the network when ``cfg.init_checkpoint`` is given).
        cfg: :class:`TrainConfig`.
        on_epoch: callback ``(EpochStats) -> None`` (rank 0), e.g. to report progress to a server.
        should_stop: callable returning True to stop after the running iteration.
    """

    def __init__(self, samples: Sequence[PartialSample], preset: Preset | str = "lite", cfg: TrainConfig | None = None,
                 validation: Sequence[PartialSample] = (), on_epoch: Callable[[EpochStats], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, sources: dict[str, Sequence[int]] | None = None):
        if not samples:
            raise ValueError("no training samples")
        unlabelled = [s.image for s in samples if s.label is None or not s.annotated]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} training samples have no label or no annotated ROI, e.g. {unlabelled[0]}")
        self.cfg = cfg or TrainConfig()
        self.samples = list(samples)
        self.validation = list(validation)
        self.on_epoch = on_epoch
        self.should_stop = should_stop or (lambda: False)
        self.device = _device(self.cfg.device)
        self.dist = _Distributed(self.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(self.cfg.seed + self.dist.rank)
        self.out = Path(self.cfg.out_dir)

        init = load_checkpoint(self.cfg.init_checkpoint) if self.cfg.init_checkpoint else None
        self.preset = load_preset(init["preset"]) if init else (preset if isinstance(preset, Preset) else load_preset(preset))
        t = self.preset.train
        self.epochs = int(self.cfg.epochs or t["epochs"])
        self.iters = int(self.cfg.iterations_per_epoch or t.get("iterations_per_epoch") or len(self.samples))
        self.batch_size = int(self.cfg.batch_size or t.get("batch_size", 1))
        self.num_samples = int(self.cfg.num_samples or t.get("num_samples", 2))

        # one task per source dataset that has training samples (its ROIs: declared, else seen)
        declared = dict(sources or {})
        source_rois: dict[str, tuple[int, ...]] = {}
        for s in self.samples:
            seen = set(source_rois.get(s.source, declared.get(s.source, ()))) | set(s.annotated)
            source_rois[s.source] = tuple(sorted(seen))
        if init is not None:
            self.loaded = model_from_checkpoint(init, self.device)
            self.tasks = self.loaded.tasks
            self.text = self.loaded.text
        else:
            self.tasks = [{"name": n, "rois": [int(r) for r in rs]} for n, rs in source_rois.items()]
            self.text = self._embed_text()
            model = build_model(self.preset, num_tasks=len(self.tasks))
            model.net.set_text_embeddings(self.text.pop("organ_embeddings"), self.text.pop("task_embeddings"))
            self.loaded = LoadedModel(model, self.preset, {"tasks": self.tasks, "text": self.text})
        self.model = self.loaded.model.to(self.device)
        self.layout = memory_format(self.device)
        self.model.net.to(memory_format=self.layout)
        self.task_index = {t["name"]: i for i, t in enumerate(self.tasks)}

        params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=float(self.cfg.lr or t["lr"]),
                                           weight_decay=float(self.cfg.weight_decay if self.cfg.weight_decay is not None
                                                              else t["weight_decay"]))
        self.base_lr = float(self.cfg.lr or t["lr"])
        self.warmup = int(self.cfg.warmup_epochs if self.cfg.warmup_epochs is not None else t["warmup_epochs"])
        if self.cfg.schedule not in ("reference", "finetune", "budget"):
            raise ValueError(f"unknown schedule {self.cfg.schedule!r}: use 'reference', 'finetune' or 'budget'")
        if self.cfg.schedule == "budget" and not self.cfg.max_minutes:
            raise ValueError("schedule 'budget' needs a time budget (max_minutes)")
        self.loss_fn = loss_from_preset(t, naive=self.cfg.loss == "naive")
        # train.roi_loss_weights_decay: the ROI weights fall linearly to 1 over this fraction of the run
        self.pair_weight_decay = _number(t, "roi_loss_weights_decay", 0.0, lambda v: 0 <= v <= 1,
                                         "a fraction of the run in [0, 1] (0 = the weights stay)")
        self._pair_weights0 = self.loss_fn.pair_weights
        if self.pair_weight_decay and self._pair_weights0 is None:
            raise ValueError("train.roi_loss_weights_decay needs train.roi_loss_weights (the weights it lowers to 1)")
        self.deep_supervision = int(self.preset.network.deep_supervision)
        if self.deep_supervision:
            self.loss_fn = DeepSupervisionLoss(self.loss_fn)
        self.amp = use_bf16(self.device, t.get("cpu_bf16", False)) if self.cfg.amp is None else bool(self.cfg.amp)
        self.start_epoch = 0
        self.best: float | None = None
        if self.cfg.resume and (self.out / "last.pt").is_file():
            self._resume(load_checkpoint(self.out / "last.pt"))
        self.net = self.model.net
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.preset.network.reference_dead_modules)

    # ------------------------------------------------------------------------------------------
    def _embed_text(self) -> dict:
        from .text import build_text_encoder, compute_prompt_embeddings

        enc = build_text_encoder(self.cfg.text_encoder or self.preset.text["encoder"])
        emb = compute_prompt_embeddings(enc, tasks=[(t["name"], t["rois"]) for t in self.tasks])
        norm = self.preset.text.get("row_norm")
        if norm:  # put normalised embeddings (MiniLM) on the published CLIP tables' scale, so psi starts alike
            for key in ("organ_embeddings", "task_embeddings"):
                emb[key] = emb[key] * (float(norm) / emb[key].norm(dim=1, keepdim=True).clamp_min(1e-6))
            emb["row_norm"] = float(norm)
        if emb["dim"] != self.preset.network.text_dim:
            raise ValueError(f"text encoder {emb['encoder']} gives {emb['dim']}-d embeddings but the preset's network "
                             f"expects text_dim={self.preset.network.text_dim}")
        return emb

    def _resume(self, ck: dict) -> None:
        self.model.net.load_state_dict(ck["state_dict"])
        if "optimizer" in ck:
            self.optimizer.load_state_dict(ck["optimizer"])
        self.start_epoch = int(ck.get("epoch", -1)) + 1
        self.best = ck.get("best_metric")

    def _dataset(self) -> UniformSourceDataset:
        cache = _CaseCache(self.preset)
        crops = _RandomCrops(self.preset, self.num_samples, self.cfg.seed + 1000 * self.dist.rank,
                             roi_sources=dict(roi_source_counts(source_rois(self.samples))))
        index = self.task_index

        def transform(d: dict) -> list[dict]:
            x = cache(d)
            x["task_id"] = index.get(d["source"], -1)
            return crops(x)

        transform.crops = crops  # type: ignore[attr-defined]  # the crop sampler, for inspection
        return UniformSourceDataset(self.samples, transform, length=self.iters * self.batch_size,
                                    seed=self.cfg.seed + 7919 * self.dist.rank,
                                    source_weights=self.preset.train.get("source_weights") or None,
                                    sampling=self.preset.train.get("source_sampling", "uniform"))

    def _payload(self, epoch: int, with_optimizer: bool, metrics: dict) -> dict:
        text = {k: v for k, v in self.text.items() if not torch.is_tensor(v)}
        extra: dict[str, Any] = {"epoch": epoch, "metrics": metrics, "best_metric": self.best,
                                 "train_config": asdict(self.cfg)}
        if with_optimizer:
            extra["optimizer"] = self.optimizer.state_dict()
        return checkpoint_payload(self.model, self.preset, self.tasks, text, **extra)

    def _validate(self) -> tuple[float | None, dict]:
        if not self.validation:
            return None, {}
        from .imageio import load_image
        from .inference import Segmenter
        from .metrics import dice

        self.model.eval()
        seg = Segmenter(self.loaded, device=self.device)
        per_roi: dict[str, list[float]] = {}
        for s in self.validation:
            res = seg.segment(s.image, rois=list(s.annotated), task=s.source if s.source in self.task_index else None)
            gt = np.asarray(load_image(s.label, "label")[0]).round().astype(np.int64)
            if s.label_values:
                lut = np.zeros(max(max(s.label_values), int(gt.max())) + 1, dtype=np.int64)
                for k, v in s.label_values.items():
                    lut[k] = v
                gt = lut[gt]
            for v in s.annotated:
                d = dice(res.label == v, gt == v)
                if not math.isnan(d):
                    per_roi.setdefault(ROIS[v - 1].name, []).append(d)
        self.model.train()
        means = {k: float(np.mean(v)) for k, v in per_roi.items()}
        return (float(np.mean(list(means.values()))) if means else None), means

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, main = self.cfg, self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        ds = self._dataset()
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=0,
                                             collate_fn=_collate)
        log = (self.out / "metrics.jsonl") if main else None
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        stopped, history = None, []
        self.model.train()
        for epoch in range(self.start_epoch, self.epochs):
            # reference: the scheduler is stepped once per epoch, at the start of the epoch
            lr = self._lr_for(epoch)
            ds.set_epoch(epoch)
            t0, sums, n = time.monotonic(), np.zeros(3), 0
            bar = None
            if main and cfg.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.iters, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)
            for batch in loader:
                if cfg.schedule == "budget":
                    lr = self._budget_lr(deadline)
                if self.pair_weight_decay:
                    self.decay_pair_weights(self._budget_done(deadline) if cfg.schedule == "budget"
                                            else (epoch * self.iters + n) / (self.epochs * self.iters))
                loss = self._step(batch)
                comp = self.loss_fn.components()
                sums += (loss, comp.get("bce", 0.0), comp.get("dice", 0.0))
                n += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums[0] / n:.3f}", lr=f"{lr:.1e}")
                if self.should_stop():
                    stopped = "stop requested"
                elif deadline and time.monotonic() > deadline:
                    stopped = f"time budget of {cfg.max_minutes} min reached"
                if stopped:
                    break
            if bar is not None:
                bar.close()
            means = [self.dist.mean(float(v) / max(n, 1), self.device) for v in sums]
            stats = EpochStats(epoch, means[0], means[1], means[2], lr, time.monotonic() - t0, n)
            if main and cfg.val_every and (epoch + 1) % cfg.val_every == 0 or (main and epoch == self.epochs - 1
                                                                             and cfg.val_every):
                stats.val_dice, stats.val_per_roi = self._validate()
            history.append(stats)
            if main:
                self._save_epoch(epoch, stats)
                with open(log, "a") as f:
                    f.write(json.dumps(asdict(stats)) + "\n")
                if self.on_epoch:
                    self.on_epoch(stats)
            if stopped:
                break
        summary = self._finish(history, stopped)
        self.dist.close()
        return summary

    def decay_pair_weights(self, done: float) -> None:
        """``train.roi_loss_weights`` at the fraction ``done`` of the run: linearly from the preset's values
        to 1 by ``train.roi_loss_weights_decay`` (a heavy weight that forms a rare ROI's features early
        then leaves the shared features to the others)."""
        if not self.pair_weight_decay or self._pair_weights0 is None:
            return
        left = max(0.0, 1.0 - max(done, 0.0) / self.pair_weight_decay)
        loss = self.loss_fn.loss if isinstance(self.loss_fn, DeepSupervisionLoss) else self.loss_fn
        loss.pair_weights = 1.0 + (self._pair_weights0 - 1.0) * left

    def _budget_done(self, deadline: float) -> float:
        """The fraction of the time budget spent, in [0, 1]."""
        return min(max(1.0 - (deadline - time.monotonic()) / (self.cfg.max_minutes * 60), 0.0), 1.0)

    def _budget_lr(self, deadline: float) -> float:
        permille = int(1000 * self._budget_done(deadline))
        lr = warmup_cosine_lr(permille, self.base_lr, 20, 1000, start_lr=0.1 * self.base_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _lr_for(self, epoch: int) -> float:
        if self.cfg.schedule == "finetune":  # the last epoch of a short round must not run at lr 0
            lr = warmup_cosine_lr(epoch, self.base_lr, 0, self.epochs, eta_min=0.1 * self.base_lr)
        else:  # the reference steps its scheduler at the start of each epoch: epoch e uses the value at e + 1
            lr = warmup_cosine_lr(epoch + 1, self.base_lr, self.warmup, self.epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _step(self, batch: dict) -> float:
        x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        target = batch["target"].to(self.device, non_blocking=True)
        annotated = batch["annotated"].to(self.device)
        task = batch["task_id"].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                feats = self.model.dino(x)
            if self.deep_supervision:
                logits, aux = self.net(x, feats, task, aux=True)
            else:
                logits, aux = self.net(x, feats, task), None
        if aux is None:
            loss = self.loss_fn(logits.float(), target, annotated)
        else:
            loss = self.loss_fn(logits.float(), [a.float() for a in aux], target, annotated)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _save_epoch(self, epoch: int, stats: EpochStats) -> None:
        metrics = {"loss": stats.loss, "val_dice": stats.val_dice}
        save_checkpoint(self.out / "last.pt", self._payload(epoch, True, metrics))
        if stats.val_dice is not None and (self.best is None or stats.val_dice > self.best):
            self.best = stats.val_dice
            save_checkpoint(self.out / "best.pt", self._payload(epoch, False, metrics))

    def _finish(self, history: list[EpochStats], stopped: str | None) -> dict:
        summary = {"epochs_done": (history[-1].epoch + 1) if history else self.start_epoch, "epochs": self.epochs,
                   "stopped": stopped, "best_metric": self.best,
                   "last_loss": history[-1].loss if history else None, "out_dir": str(self.out),
                   "seconds": float(sum(h.seconds for h in history))}
        if self.dist.main and history:
            model_path = self.out / "model.pt"
            best = self.out / "best.pt"
            if best.is_file():  # the best validated epoch is the published model
                save_checkpoint(model_path, load_checkpoint(best))
            else:
                save_checkpoint(model_path, self._payload(history[-1].epoch, False, {"loss": history[-1].loss}))
            summary["model"] = str(model_path)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(samples: Sequence[PartialSample], preset: Preset | str = "lite", **kwargs) -> dict:
    """Convenience wrapper: ``train(samples, "lite", out_dir=..., epochs=...)``."""
    validation = kwargs.pop("validation", ())
    on_epoch = kwargs.pop("on_epoch", None)
    should_stop = kwargs.pop("should_stop", None)
    return Trainer(samples, preset, TrainConfig(**kwargs), validation, on_epoch, should_stop).run()
