"""Pre-processing shared by training and inference (reference section 4, steps 3-7).

Orientation to RAS, resampling to the preset spacing, HU window ``[hu_min, hu_max]`` scaled to
``[0, 1]`` and clipped, cropping to the body (voxels above the window's lower end).
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    CropForegroundd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = ["preprocess_transforms", "foreground"]


def foreground(x):
    """Body voxels: above the window's lower end (the reference's ``image > 0`` after scaling)."""
    return x > 0


def preprocess_transforms(pp: dict, keys=("image",), label_keys=(), crop: bool | None = None) -> Compose:
    """MONAI dictionary transforms for a preset's ``preprocess`` settings.

    ``keys`` are images (bilinear), ``label_keys`` label maps (nearest); all must be channel-first.
    """
    all_keys = list(keys) + list(label_keys)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    ts = [
        Orientationd(all_keys, axcodes=pp.get("orientation", "RAS")),
        Spacingd(all_keys, pixdim=tuple(pp["spacing"]), mode=modes),
        ScaleIntensityRanged(list(keys), a_min=pp["hu_min"], a_max=pp["hu_max"], b_min=0.0, b_max=1.0, clip=True),
    ]
    if pp.get("crop_foreground", True) if crop is None else crop:
        ts.append(CropForegroundd(all_keys, source_key=keys[0], select_fn=foreground, allow_smaller=True))
    return Compose(ts)
