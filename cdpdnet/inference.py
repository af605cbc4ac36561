"""Inference: a CT file (or array) in, a ``uint8`` label map in the input's own space out.

Steps (each timed): load and validate -> RAS, preset spacing, HU window, body crop -> MONAI sliding
window (Gaussian, configurable overlap) over the requested channels only -> threshold on logits
(``sigmoid(z) > t``  <=>  ``z > logit(t)``) -> post-processing on ``uint8`` masks one class at a
time -> per ROI, its probability map (restricted to the kept components) resampled trilinearly
onto the input grid (orientation, spacing, crop undone) and thresholded there -> one merged
``uint8`` label map (lesions painted after organs) -> write.

With ``subgrids`` > 1 (``infer.subgrids``) the volume is read on that many grids at the preset's
spacing, shifted by half a voxel; each is segmented and post-processed on its own, and each ROI's
threshold applies to the mean of their probabilities on the input grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from .device import memory_format, use_bf16
from .factory import LoadedModel, model_from_checkpoint
from .imageio import load_image, save_label_map, validate_image
from .postprocess import DEFAULT_RULES, merge_order, postprocess_masks
from .preprocessing import body_crop, left_right_axis, preprocess_transforms
from .taxonomy import NUM_CLASSES, ROIS, roi

__all__ = ["Segmenter", "Segmentation", "required_channels"]


# half-voxel shifts (in voxels of the preset's spacing) of the grids read for ``subgrids`` = 1, 2, 4, 8
SUBGRID_SHIFTS = {
    1: [(0, 0, 0)],
    2: [(0, 0, 0), (1, 1, 1)],
    4: [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)],
    8: [tuple(s) for s in np.ndindex(2, 2, 2)],
}


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class Segmentation:
    label: np.ndarray  # uint8 [X, Y, Z] on the input grid
    affine: np.ndarray  # the input's affine (RAS mm)
    rois: list[int]  # ROI label values that were predicted
    timings: dict[str, float] = field(default_factory=dict)
    model_space_shape: tuple = ()

    def present(self) -> list[int]:
        return [int(v) for v in np.unique(self.label) if v]


def required_channels(rois: Iterable[int]) -> list[int]:
    """The ROIs to predict so that post-processing of ``rois`` has what it needs (hosts, pairs)."""
    need = set(rois)
    for r in list(need):
        info = ROIS[r - 1]
        need.update(roi(h).index for h in info.hosts)
        if info.pair:
            need.add(roi(info.pair).index)
        rule = DEFAULT_RULES.get(r)
        if rule is not None:
            for v in dict(rule.params).values():
                if isinstance(v, int) and 1 <= v <= NUM_CLASSES:
                    need.add(v)
    return sorted(need)


class Segmenter:
    """Keeps one model warm and segments volumes with it.

    Args:
        model: a checkpoint path or a :class:`~cdpdnet.factory.LoadedModel`.
        device: ``"cpu"``, ``"cuda"``, ...
        overlap, sw_batch_size, threshold: override the preset's ``infer`` settings.
        lesion_threshold: the threshold of the lesion channels (tumours, cyst); default the preset's
            ``infer.lesion_threshold``, else ``threshold``.
        roi_thresholds: ``{ROI name or label value: threshold}`` for single ROIs, above both; default
            the preset's ``infer.roi_thresholds`` (``{}`` turns it off). An ROI without an entry keeps
            ``lesion_threshold`` or ``threshold``.
        postprocess: apply the post-processing rules.
        lesion_mirror: ``"mean"`` or ``"max"`` to run the network a second time on the volume mirrored
            left-right and combine the lesion channels' probabilities of the two passes (their mean, or
            the larger); ``"off"`` for one pass. Default the preset's ``infer.lesion_mirror``, else off.
            A tumour or cyst is the same lesion on either side of the body, so a lesion channel that
            learned one side better than the other (``train.lesion_mirror_prob``) is read both ways;
            organ channels keep the single pass (a mirrored torso has its liver on the left). It doubles
            the network time. On every lesion it did not pay on the CPU benchmark (docs/benchmarks.md,
            "The lung tumour learned on one side only"); ``lite-wide`` uses ``"max"`` on the lung
            tumour alone ("The lung tumour read on the mirrored volume too").
        subgrids: how many model grids to read the volume on: 1 (the default), 2, 4 or 8. Besides the
            usual grid at the preset's spacing, grids shifted by half a voxel (2: along all three axes;
            4: along two of them, each pair; 8: every combination); default the preset's
            ``infer.subgrids``. Each grid is segmented and post-processed on its own, and the
            probabilities of the ROIs they keep are averaged on the input grid before the threshold.
            At a coarse spacing a thin structure shows or vanishes depending on where the grid's
            points fall; shifted grids read it between those points. The network and the resampling
            back to the input grid take about ``subgrids`` times as long; the image is resampled once,
            to half the spacing, and every grid is every second voxel of that
            (``preprocess_transforms(subdivide=2)``).
        lesion_mirror_rois: the lesion ROIs (names or label values) that get the mirrored pass; default
            the preset's ``infer.lesion_mirror_rois``, else every lesion. A lesion of a symmetric host
            (the lung tumour) is the one a mirrored body does not mislead.
    """

    def __init__(self, model: str | Path | LoadedModel, device: str | torch.device = "cpu", overlap: float | None = None,
                 sw_batch_size: int | None = None, threshold: float | None = None, postprocess: bool = True,
                 amp: bool | None = None, lesion_threshold: float | None = None,
                 roi_thresholds: Mapping[str | int, float] | None = None, lesion_mirror: str | None = None,
                 lesion_mirror_rois: Sequence[str | int] | None = None, subgrids: int | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else model_from_checkpoint(model, device)
        self.device = torch.device(device)
        self.loaded.model.to(self.device).eval()
        self.layout = memory_format(self.device)
        self.loaded.model.net.to(memory_format=self.layout)
        cfg = dict(self.loaded.preset.infer)
        self.overlap = float(cfg.get("overlap", 0.5) if overlap is None else overlap)
        self.sw_batch_size = int(cfg.get("sw_batch_size", 2) if sw_batch_size is None else sw_batch_size)
        self.threshold = float(cfg.get("threshold", 0.5) if threshold is None else threshold)
        lt = cfg.get("lesion_threshold", self.threshold) if lesion_threshold is None else lesion_threshold
        self.lesion_threshold = float(self.threshold if lt is None else lt)
        per_roi = (cfg.get("roi_thresholds") or {}) if roi_thresholds is None else roi_thresholds
        self.roi_thresholds = {roi(k).index: float(t) for k, t in dict(per_roi).items()}
        checks = [("threshold", self.threshold), ("lesion_threshold", self.lesion_threshold)]
        checks += [(f"roi_thresholds[{ROIS[c - 1].name!r}]", t) for c, t in self.roi_thresholds.items()]
        for name, t in checks:
            if not 0.0 < t < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {t}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        self.lesion_mirror = str(cfg.get("lesion_mirror") or "off") if lesion_mirror is None else lesion_mirror
        if self.lesion_mirror not in ("off", "mean", "max"):
            raise ValueError(f"lesion_mirror must be 'off', 'mean' or 'max', got {self.lesion_mirror!r}")
        self.mirror_axis = (left_right_axis(self.loaded.preset.preprocess.get("orientation", "RAS"))
                            if self.lesion_mirror != "off" else None)
        mirror_rois = cfg.get("lesion_mirror_rois") if lesion_mirror_rois is None else lesion_mirror_rois
        self.mirror_rois = {r.index for r in ROIS if r.is_lesion} if mirror_rois is None else {roi(r).index for r in mirror_rois}
        organs = sorted(ROIS[c - 1].name for c in self.mirror_rois if not ROIS[c - 1].is_lesion)
        if organs:
            raise ValueError(f"lesion_mirror_rois must name lesions (tumours, cyst), got organs {organs}")
        self.mode = cfg.get("mode", "gaussian")
        self.sigma_scale = float(cfg.get("sigma_scale", 0.125))
        self.do_postprocess = postprocess
        self.amp = use_bf16(self.device, bool(cfg.get("cpu_bf16", False))) if amp is None else amp
        self.preprocess = preprocess_transforms(self.loaded.preset.preprocess)
        self.subgrids = int(cfg.get("subgrids", 1) if subgrids is None else subgrids)
        if self.subgrids not in SUBGRID_SHIFTS:
            raise ValueError(f"subgrids must be one of {sorted(SUBGRID_SHIFTS)}, got {self.subgrids}")
        self._fine = (preprocess_transforms(self.loaded.preset.preprocess, crop=False, subdivide=2)
                      if self.subgrids > 1 else None)
        self._crop = (body_crop() if self.subgrids > 1 and self.preset.preprocess.get("crop_foreground", True)
                      else None)

    @property
    def preset(self):
        return self.loaded.preset

    # ------------------------------------------------------------------------------------------
    def _resolve_rois(self, rois: Sequence[int | str] | None) -> list[int]:
        if rois is None or len(rois) == 0:
            return list(range(1, NUM_CLASSES + 1))
        return sorted({roi(r).index for r in rois})

    def threshold_of(self, c: int) -> float:
        """The sigmoid threshold of ROI ``c`` (label value): its own from ``roi_thresholds``, else
        ``lesion_threshold`` for lesions and ``threshold`` for organs."""
        if c in self.roi_thresholds:
            return self.roi_thresholds[c]
        return self.lesion_threshold if ROIS[c - 1].is_lesion else self.threshold

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor, channels: Sequence[int], task_id: int = -1) -> torch.Tensor:
        """Sliding-window logits ``[1, len(channels), *x.shape[2:]]`` (float32) for a pre-processed ``x``."""
        model = self.loaded.model
        tid = torch.tensor([task_id], device=self.device)

        def window(volume: torch.Tensor, wanted: Sequence[int]) -> torch.Tensor:  # logits of the channels wanted
            idx = torch.as_tensor([c - 1 for c in wanted], device=self.device)

            def predictor(patch: torch.Tensor) -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = model(patch.contiguous(memory_format=self.layout), tid.expand(patch.shape[0]))
                return out.index_select(1, idx).float()

            return sliding_window_inference(
                volume.to(self.device), tuple(self.preset.patch_size), self.sw_batch_size, predictor,
                overlap=self.overlap, mode=self.mode, sigma_scale=self.sigma_scale, padding_mode="constant", cval=0.0,
            )

        logits = window(x, channels)
        lesions = [i for i, c in enumerate(channels) if c in self.mirror_rois]
        if self.lesion_mirror != "off" and lesions:
            dim = 2 + self.mirror_axis
            mirrored = window(torch.flip(x, [dim]), [channels[i] for i in lesions]).flip(dim)
            here = logits[:, lesions]
            if self.lesion_mirror == "max":
                logits[:, lesions] = torch.maximum(here, mirrored)
            else:  # the mean of the two probabilities, as a logit
                logits[:, lesions] = torch.logit((torch.sigmoid(here) + torch.sigmoid(mirrored)) / 2, eps=1e-6)
        return logits

    def segment(self, image, rois: Sequence[int | str] | None = None, task: str | int | None = None,
                output: str | Path | None = None, affine: np.ndarray | None = None) -> Segmentation:
        """Segment ``image`` (a path, a DICOM folder, a ``MetaTensor [1,X,Y,Z]`` or a numpy ``[X,Y,Z]`` with ``affine``).

        ``rois`` selects ROIs (names, synonyms or label values; default all 32); ``task`` the source
        dataset whose task prompt to use (default: the mean prompt, for data of unknown origin).
        """
        t = {"start": time.perf_counter()}
        wanted = self._resolve_rois(rois)
        task_id = self.loaded.task_id(task)
        img = self._as_metatensor(image, affine)
        orig_affine = np.asarray(img.affine, dtype=np.float64)
        orig_shape = tuple(img.shape[1:])
        t["load"] = time.perf_counter()

        grids = self.model_grids(img)
        t["preprocess"] = time.perf_counter()

        channels = required_channels(wanted)
        spacing = [float(v) for v in self.preset.preprocess["spacing"]]
        axcodes = self.preset.preprocess.get("orientation", "RAS")
        read, spent = [], {"network": 0.0, "postprocess": 0.0}
        for x in grids:  # one grid at a time: its logits, masks and affine are all that is kept
            t0 = time.perf_counter()
            logits = self.predict_logits(x[None], channels, task_id)[0]
            t1 = time.perf_counter()
            masks = {c: (logits[i] > _logit(self.threshold_of(c))).cpu().numpy().astype(np.uint8)
                     for i, c in enumerate(channels)}
            if self.do_postprocess:
                def confidence(c: int, logits=logits) -> np.ndarray:  # ranks components: probability above the threshold
                    p = torch.sigmoid(logits[channels.index(c)].float())
                    return (p - self.threshold_of(c)).clamp_min(0).cpu().numpy()

                masks = postprocess_masks(masks, spacing=spacing, axcodes=axcodes, weights=confidence)
            read.append((logits, masks, np.asarray(x.affine, dtype=np.float64)))
            spent["network"] += t1 - t0
            spent["postprocess"] += time.perf_counter() - t1
        t["network"] = t["preprocess"] + spent["network"]
        t["postprocess"] = t["network"] + spent["postprocess"]

        out = np.zeros(orig_shape, dtype=np.uint8)
        for c in merge_order(wanted):
            thr = self.threshold_of(c)
            parts = [self._soft_on_input_grid(logits[channels.index(c)], masks[c], affine, orig_affine, orig_shape, thr)
                     for logits, masks, affine in read]
            mask = self._mean_above(parts, len(read), thr)
            if mask is not None:
                out[mask[0]][mask[1]] = c
        del read
        t["resample"] = time.perf_counter()
        if output is not None:
            save_label_map(out, orig_affine, output)
        t["write"] = time.perf_counter()
        names = ["load", "preprocess", "network", "postprocess", "resample", "write"]
        prev, timings = t["start"], {}
        for n in names:
            timings[n] = t[n] - prev
            prev = t[n]
        timings["total"] = t["write"] - t["start"]
        return Segmentation(out, orig_affine, wanted, timings, tuple(grids[0].shape[1:]))

    def model_grids(self, img: MetaTensor) -> list[MetaTensor]:
        """``img`` pre-processed onto the model grids: the preset's grid first, then the half-voxel
        shifted ones of ``subgrids`` (each cropped to the body on its own)."""
        if self.subgrids == 1:
            return [self.preprocess({"image": img})["image"]]
        fine = self._fine({"image": img})["image"]  # every grid's points, at half the spacing
        a = np.asarray(fine.affine, dtype=np.float64)
        grids = []
        for shift in SUBGRID_SHIFTS[self.subgrids]:
            step = np.diag([2.0, 2.0, 2.0, 1.0])
            step[:3, 3] = shift
            sub = MetaTensor(fine.as_tensor()[:, shift[0]::2, shift[1]::2, shift[2]::2].contiguous(),
                             affine=torch.as_tensor(a @ step), meta={k: v for k, v in fine.meta.items() if k != "affine"})
            grids.append(self._crop({"image": sub})["image"] if self._crop is not None else sub)
        return grids

    def _soft_on_input_grid(self, logit: torch.Tensor, kept: np.ndarray, model_affine: np.ndarray,
                            orig_affine: np.ndarray, orig_shape: tuple,
                            threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """One ROI from a model grid to the input grid: ``(box start, box end, probabilities in the box)``.

        The probability map is resampled trilinearly (not the binary mask with nearest neighbours),
        so a 4.5 mm model draws smooth boundaries on a 3 mm or 0.8 mm input. Post-processing is kept:
        voxels it removed get probability 0 and voxels below the threshold keep theirs, so the
        interpolation shapes the kept components' borders and cannot create new foreground
        elsewhere. Only the bounding box of the kept mask (plus a 2-voxel margin) is resampled, one
        ROI at a time: memory stays at one box of float32.
        """
        idx = np.nonzero(kept)
        if idx[0].size == 0:
            return None
        lo = [max(int(i.min()) - 2, 0) for i in idx]
        hi = [min(int(i.max()) + 3, n) for i, n in zip(idx, kept.shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        p = torch.sigmoid(logit[box].float())
        keep = torch.from_numpy(kept[box].astype(bool)).to(p.device)
        soft = torch.where(keep, p, torch.where(p <= threshold, p, torch.zeros_like(p)))
        # the box's corners (voxel edges) in input voxel coordinates -> the input-grid box to fill
        to_input = np.linalg.solve(orig_affine, model_affine)
        corners = np.array([[a - 0.5 if k else b - 0.5 for (a, b), k in zip(zip(lo, hi), bits)]
                            for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
        pts = corners @ to_input[:3, :3].T + to_input[:3, 3]
        in_lo = np.maximum(np.floor(pts.min(0)).astype(int), 0)
        in_hi = np.minimum(np.ceil(pts.max(0)).astype(int) + 1, orig_shape)
        if np.any(in_hi <= in_lo):
            return None
        shift = np.eye(4)
        shift[:3, 3] = lo
        src = MetaTensor(soft[None], affine=torch.as_tensor(model_affine @ shift))
        shift[:3, 3] = in_lo
        res = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(orig_affine @ shift), spatial_size=tuple(int(v) for v in in_hi - in_lo))
        return in_lo, in_hi, res[0].cpu().numpy()

    @staticmethod
    def _mean_above(parts, n: int, threshold: float) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The mean of ``n`` grids' probabilities (``parts`` from :meth:`_soft_on_input_grid`; a grid
        that kept nothing, or a voxel outside its box, counts 0) above ``threshold``:
        ``(box in the input grid, bool mask in that box)``."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1 and n == 1:
            lo, hi, soft = parts[0]
            return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), soft > threshold
        lo = np.min([p[0] for p in parts], axis=0)
        hi = np.max([p[1] for p in parts], axis=0)
        total = np.zeros(tuple(hi - lo), dtype=np.float32)
        for a, b, soft in parts:
            total[tuple(slice(int(i - o), int(j - o)) for i, j, o in zip(a, b, lo))] += soft
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), total > threshold * n

    @staticmethod
    def _as_metatensor(image, affine):
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, MetaTensor):
            return validate_image(image if image.dim() == 4 else image[None])
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"image array must be 3D [X, Y, Z], got shape {arr.shape}")
        return validate_image(MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(
            np.eye(4) if affine is None else affine, dtype=torch.float64)))
