"""Pre-processing shared by training and inference (reference section 4, steps 3-7).

Orientation to RAS, resampling to the preset spacing, HU window ``[hu_min, hu_max]`` scaled to
``[0, 1]`` and clipped, cropping to the body (voxels above the window's lower end).

A preset may add input channels with ``extra_windows`` (a list of ``[hu_min, hu_max]``): each is the
same image under another window (e.g. ``[-1000, 250]``, where lungs differ from the air around the
body, which the soft-tissue window maps to the same 0). Channel 0 stays the main window: it is the
one DINO sees and the one the body crop is computed on. The network's ``in_channels`` must be
``1 + len(extra_windows)``.
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = ["preprocess_transforms", "foreground"]


def foreground(x):
    """Body voxels: above the window's lower end (the reference's ``image > 0`` after scaling)."""
    return x > 0


def _window(keys, lo, hi) -> ScaleIntensityRanged:
    return ScaleIntensityRanged(list(keys), a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)


def preprocess_transforms(pp: dict, keys=("image",), label_keys=(), crop: bool | None = None) -> Compose:
    """MONAI dictionary transforms for a preset's ``preprocess`` settings.

    ``keys`` are images (bilinear), ``label_keys`` label maps (nearest); all must be channel-first.
    """
    all_keys = list(keys) + list(label_keys)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    ts = [
        Orientationd(all_keys, axcodes=pp.get("orientation", "RAS")),
        Spacingd(all_keys, pixdim=tuple(pp["spacing"]), mode=modes),
    ]
    extra = [(float(lo), float(hi)) for lo, hi in (pp.get("extra_windows") or [])]
    for j, (lo, hi) in enumerate(extra):
        names = [f"{k}_window{j + 1}" for k in keys]
        ts += [CopyItemsd(list(keys), names=names), _window(names, lo, hi)]
    ts.append(_window(keys, pp["hu_min"], pp["hu_max"]))
    for k in keys if extra else ():
        parts = [k] + [f"{k}_window{j + 1}" for j in range(len(extra))]
        ts += [ConcatItemsd(parts, k), DeleteItemsd(parts[1:])]
    if pp.get("crop_foreground", True) if crop is None else crop:
        ts.append(CropForegroundd(all_keys, source_key=keys[0], select_fn=foreground, channel_indices=0,
                                  allow_smaller=True))
    return Compose(ts)


def left_right_axis(orientation: str = "RAS") -> int:
    """The spatial axis of an ``orientation`` (axis codes such as ``"RAS"``) that runs left-right: the
    one that left-right mirroring (``train.lesion_mirror_prob``, ``infer.lesion_mirror``) flips."""
    codes = str(orientation).upper()
    for axis, code in enumerate(codes):
        if code in "LR":
            return axis
    raise ValueError(f"orientation {codes!r} has no left-right axis (L or R)")
