"""Pre-processing shared by training and inference (reference section 4, steps 3-7).

Orientation to RAS, resampling to the preset spacing, HU window ``[hu_min, hu_max]`` scaled to
``[0, 1]`` and clipped, cropping to the body (voxels above the window's lower end).

A preset may add input channels with ``extra_windows`` (a list of ``[hu_min, hu_max]``): each is the
same image under another window (e.g. ``[-1000, 250]``, where lungs differ from the air around the
body, which the soft-tissue window maps to the same 0). Channel 0 stays the main window: it is the
one DINO sees and the one the body crop is computed on. The network's ``in_channels`` must be
``1 + len(extra_windows)``.

``anti_alias`` (default off) low-pass filters each image before it is resampled to a coarser
spacing, as scikit-image's ``resize(anti_aliasing=True)`` does: a Gaussian of ``(factor - 1) / 2``
source voxels on each axis whose spacing grows by ``factor`` > 1 (none on the others). Without it the
resampling reads the image at the new grid's points only: a 3 mm volume brought to 6 mm keeps one
voxel in eight with its full noise, and a structure thinner than the new spacing shows or vanishes
depending on where the grid falls. Label maps are never filtered. ``anti_alias: "main"`` filters the
main window only and leaves the ``extra_windows`` channels unfiltered.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)
from scipy import ndimage

__all__ = ["preprocess_transforms", "body_crop", "foreground", "AntiAliasd", "anti_alias_sigma"]


def foreground(x):
    """Body voxels: above the window's lower end (the reference's ``image > 0`` after scaling)."""
    return x > 0


def _window(keys, lo, hi) -> ScaleIntensityRanged:
    return ScaleIntensityRanged(list(keys), a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)


def anti_alias_sigma(spacing, target) -> list[float]:
    """Per-axis Gaussian sigma, in source voxels, before resampling from ``spacing`` to ``target`` (mm):
    ``(target / spacing - 1) / 2`` where the spacing grows, 0 where it stays or shrinks."""
    return [max(0.0, (float(t) / float(s) - 1.0) / 2.0) for s, t in zip(spacing, target)]


class AntiAliasd(MapTransform):
    """Gaussian low-pass of channel-first images before down-sampling to ``pixdim`` (mm per axis).

    Reads each image's spacing from its affine (``MetaTensor.pixdim``, in the array's axis order, so put
    it after :class:`~monai.transforms.Orientationd`); filters with SciPy (``mode="nearest"``: no dark
    rim from zero padding) and keeps the metadata. Images already at or below ``pixdim`` pass unchanged.
    """

    def __init__(self, keys, pixdim, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.pixdim = [float(v) for v in pixdim]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise TypeError(f"AntiAliasd needs a MetaTensor for {key!r} (its spacing), got {type(img).__name__}")
            sigma = anti_alias_sigma(img.pixdim.tolist(), self.pixdim)
            if not any(sigma):
                continue
            arr = img.detach().cpu().numpy().astype(np.float32, copy=False)
            out = np.stack([ndimage.gaussian_filter(c, sigma=sigma, mode="nearest") for c in arr])
            d[key] = MetaTensor(torch.from_numpy(out), meta=img.meta, applied_operations=img.applied_operations)
        return d


def preprocess_transforms(pp: dict, keys=("image",), label_keys=(), crop: bool | None = None,
                          subdivide: int = 1) -> Compose:
    """MONAI dictionary transforms for a preset's ``preprocess`` settings.

    ``keys`` are images (bilinear), ``label_keys`` label maps (nearest); all must be channel-first.
    ``subdivide`` > 1 resamples to ``spacing / subdivide`` instead (the anti-aliasing stays that of
    ``spacing``): the grid then holds ``subdivide ** 3`` interleaved grids at ``spacing``, the first of
    which (every ``subdivide``-th voxel from the first) samples exactly the points that ``subdivide=1``
    samples. Inference reads shifted grids from it (``infer.subgrids``); crop those one by one.
    """
    if int(subdivide) < 1:
        raise ValueError(f"subdivide must be a positive integer, got {subdivide}")
    all_keys = list(keys) + list(label_keys)
    aa = pp.get("anti_alias", False)
    extra = [(float(lo), float(hi)) for lo, hi in (pp.get("extra_windows") or [])]
    window_names = [[f"{k}_window{j + 1}" for k in keys] for j in range(len(extra))]
    # "main": the extra windows are copied before the filter and resampled unfiltered
    early = aa == "main" and bool(extra)
    ts = [Orientationd(all_keys, axcodes=pp.get("orientation", "RAS"))]
    if early:
        ts += [CopyItemsd(list(keys), names=names) for names in window_names]
    if aa:
        ts.append(AntiAliasd(list(keys), pp["spacing"]))
    images = list(keys) + ([n for names in window_names for n in names] if early else [])
    ts.append(Spacingd(images + list(label_keys), pixdim=tuple(float(v) / int(subdivide) for v in pp["spacing"]),
                       mode=["bilinear"] * len(images) + ["nearest"] * len(label_keys)))
    for names, (lo, hi) in zip(window_names, extra):
        ts += ([] if early else [CopyItemsd(list(keys), names=names)]) + [_window(names, lo, hi)]
    ts.append(_window(keys, pp["hu_min"], pp["hu_max"]))
    for i, k in enumerate(keys if extra else ()):
        parts = [k] + [names[i] for names in window_names]
        ts += [ConcatItemsd(parts, k), DeleteItemsd(parts[1:])]
    if pp.get("crop_foreground", True) if crop is None else crop:
        ts.append(body_crop(all_keys))
    return Compose(ts)


def body_crop(keys=("image",)) -> CropForegroundd:
    """Crop to the body: the box of :func:`foreground` in the first key's channel 0 (the main window)."""
    keys = list(keys)
    return CropForegroundd(keys, source_key=keys[0], select_fn=foreground, channel_indices=0, allow_smaller=True)


def left_right_axis(orientation: str = "RAS") -> int:
    """The spatial axis of an ``orientation`` (axis codes such as ``"RAS"``) that runs left-right: the
    one that left-right mirroring (``train.lesion_mirror_prob``, ``infer.lesion_mirror``) flips."""
    codes = str(orientation).upper()
    for axis, code in enumerate(codes):
        if code in "LR":
            return axis
    raise ValueError(f"orientation {codes!r} has no left-right axis (L or R)")
