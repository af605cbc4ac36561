"""Reading and writing volumes, with the checks that turn bad input into one clear error.

Images are read with MONAI's ``LoadImage`` (NIfTI, NRRD, MHA, DICOM series folders, ...) into a
channel-first ``MetaTensor [1, X, Y, Z]`` whose ``affine`` maps voxels to RAS world millimetres.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["InvalidImageError", "load_image", "validate_image", "save_volume", "save_label_map", "atomic_path",
           "MAX_VOXELS"]

MAX_VOXELS = 1024 * 1024 * 1024  # refuse volumes above 1 Gvoxel (a 1024^3 CT)
MIN_SIZE = 4


class InvalidImageError(ValueError):
    """The input is not a usable 3D CT volume; the message says why."""


def load_image(path: str | Path, what: str = "image"):
    """``path`` (file or DICOM folder) -> validated ``MetaTensor [1, X, Y, Z]`` float32 with RAS affine."""
    from monai.transforms import LoadImage

    path = Path(path)
    if not path.exists():
        raise InvalidImageError(f"{what} {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise InvalidImageError(f"{what} {path} is an empty file")
    if path.is_file():  # header sanity before any reader sizes a buffer from it
        from .fileheaders import inspect_volume_file

        inspect_volume_file(path, f"{what} {path.name}")
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InvalidImageError(f"{what} {path.name} could not be read as an image ({msg[:300]})") from None
    return validate_image(img, f"{what} {path.name}")


def validate_image(img, what: str = "image"):
    """Check dimensionality, size, spacing and values; squeeze a trailing singleton 4th dimension."""
    shape = tuple(img.shape)
    if img.dim() == 5 and shape[-1] == 1:  # [1, X, Y, Z, 1]
        img = img[..., 0]
        shape = tuple(img.shape)
    if img.dim() != 4:
        raise InvalidImageError(f"{what} has {img.dim() - 1} dimensions {shape[1:]}; a 3D CT volume is needed")
    if shape[0] != 1:
        raise InvalidImageError(f"{what} has {shape[0]} channels or time points; a single 3D CT volume is needed")
    spatial = shape[1:]
    if min(spatial) < MIN_SIZE:
        raise InvalidImageError(f"{what} is {spatial} voxels: at least {MIN_SIZE} per axis are needed (2D image?)")
    if int(np.prod(spatial)) > MAX_VOXELS:
        raise InvalidImageError(f"{what} has {int(np.prod(spatial)):,} voxels, above the limit of {MAX_VOXELS:,}")
    affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidImageError(f"{what} has an invalid (singular or non-finite) affine")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if (spacing < 0.05).any() or (spacing > 50).any():
        raise InvalidImageError(f"{what} has voxel spacing {tuple(np.round(spacing, 4))} mm, outside 0.05..50 mm")
    t = torch.as_tensor(img)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise InvalidImageError(f"{what} contains {bad:,} NaN or infinite voxels")
    if float(t.max()) == float(t.min()):
        raise InvalidImageError(f"{what} is constant ({float(t.min())}): nothing to segment")
    return img


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, with the
    permissions of a normally created file; on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_volume(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=None) -> Path:
    """Write a 3D volume atomically: NIfTI via nibabel (q/sform from ``affine``, mm units), other
    formats (NRRD, MHA, ...) via SimpleITK with the RAS affine converted to ITK's LPS."""
    path = Path(path)
    arr = np.asarray(array if dtype is None else np.asarray(array, dtype=dtype))
    affine = np.asarray(affine, dtype=np.float64)
    with atomic_path(path) as tmp:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            nii = nib.Nifti1Image(arr, affine)
            nii.set_qform(affine, code=1)
            nii.set_sform(affine, code=1)
            nii.header.set_xyzt_units("mm")
            nib.save(nii, tmp)
        else:
            import SimpleITK as sitk

            lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
            spacing = np.sqrt((lps ** 2).sum(0))
            img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
            img.SetSpacing(spacing.tolist())
            img.SetDirection((lps / spacing).flatten().tolist())
            img.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
            sitk.WriteImage(img, tmp, useCompression=True)
    return path


def save_label_map(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a ``uint8`` label map atomically (see :func:`save_volume`)."""
    return save_volume(label, affine, path, dtype=np.uint8)
