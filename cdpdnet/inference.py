"""Inference: a CT file (or array) in, a ``uint8`` label map in the input's own space out.

Steps (each timed): load and validate -> RAS, preset spacing, HU window, body crop -> MONAI sliding
window (Gaussian, configurable overlap) over the requested channels only -> threshold on logits
(``sigmoid(z) > t``  <=>  ``z > logit(t)``) -> post-processing on ``uint8`` masks one class at a
time -> one merged ``uint8`` label map -> nearest resampling of that label map back onto the input
grid (orientation, spacing, crop undone) -> write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from .device import use_bf16
from .factory import LoadedModel, model_from_checkpoint
from .imageio import load_image, save_label_map, validate_image
from .postprocess import DEFAULT_RULES, merge_to_label_map, postprocess_masks
from .preprocessing import preprocess_transforms
from .taxonomy import NUM_CLASSES, ROIS, roi

__all__ = ["Segmenter", "Segmentation", "required_channels"]


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
        postprocess: apply the post-processing rules.
    """

    def __init__(self, model: str | Path | LoadedModel, device: str | torch.device = "cpu", overlap: float | None = None,
                 sw_batch_size: int | None = None, threshold: float | None = None, postprocess: bool = True,
                 amp: bool | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else model_from_checkpoint(model, device)
        self.device = torch.device(device)
        self.loaded.model.to(self.device).eval()
        cfg = dict(self.loaded.preset.infer)
        self.overlap = float(cfg.get("overlap", 0.5) if overlap is None else overlap)
        self.sw_batch_size = int(cfg.get("sw_batch_size", 2) if sw_batch_size is None else sw_batch_size)
        self.threshold = float(cfg.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        self.mode = cfg.get("mode", "gaussian")
        self.sigma_scale = float(cfg.get("sigma_scale", 0.125))
        self.do_postprocess = postprocess
        self.amp = use_bf16(self.device, bool(cfg.get("cpu_bf16", False))) if amp is None else amp
        self.preprocess = preprocess_transforms(self.loaded.preset.preprocess)

    @property
    def preset(self):
        return self.loaded.preset

    # ------------------------------------------------------------------------------------------
    def _resolve_rois(self, rois: Sequence[int | str] | None) -> list[int]:
        if rois is None or len(rois) == 0:
            return list(range(1, NUM_CLASSES + 1))
        return sorted({roi(r).index for r in rois})

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor, channels: Sequence[int], task_id: int = -1,
                       roi_center: Sequence[int] | None = None) -> torch.Tensor:
        """Sliding-window logits ``[1, len(channels), *x.shape[2:]]`` (float32) for a pre-processed ``x``."""
        model = self.loaded.model
        idx = torch.as_tensor([c - 1 for c in channels], device=self.device)
        tid = torch.tensor([task_id], device=self.device)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = model(patch, tid.expand(patch.shape[0]))
            return out.index_select(1, idx).float()

        return sliding_window_inference(
            x.to(self.device), tuple(self.preset.patch_size), self.sw_batch_size, predictor, overlap=self.overlap,
            mode=self.mode, sigma_scale=self.sigma_scale, padding_mode="constant", cval=0.0,
        )

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

        data = self.preprocess({"image": img})
        x = data["image"]
        t["preprocess"] = time.perf_counter()

        channels = required_channels(wanted)
        logits = self.predict_logits(x[None], channels, task_id)[0]
        t["network"] = time.perf_counter()

        cut = math.log(self.threshold / (1.0 - self.threshold))
        masks = {c: (logits[i] > cut).cpu().numpy().astype(np.uint8) for i, c in enumerate(channels)}
        del logits
        if self.do_postprocess:
            spacing = [float(s) for s in self.preset.preprocess["spacing"]]
            masks = postprocess_masks(masks, spacing=spacing, axcodes=self.preset.preprocess.get("orientation", "RAS"))
        label = merge_to_label_map({c: masks[c] for c in wanted}, x.shape[1:])
        t["postprocess"] = time.perf_counter()

        model_space = MetaTensor(torch.from_numpy(label)[None], affine=x.affine)
        back = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            model_space.float(), dst_affine=torch.as_tensor(orig_affine), spatial_size=orig_shape)
        out = np.asarray(back[0].round().numpy(), dtype=np.uint8)
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
        return Segmentation(out, orig_affine, wanted, timings, tuple(label.shape))

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
