"""Both lungs of a CT by the classical threshold recipe.

A reference label for chest CTs that come without organ labels: the demo data labels the lungs of a
chest CT with it (``scripts/fetch_demo_data.py``), and ``bench/unseen_ct.py`` scores a model's lungs
against it on CTs the model never saw. It is not a substitute for a manual label (see
:func:`threshold_lung_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import ndimage as ndi

__all__ = ["LUNG_THRESHOLD_HU", "threshold_lung_masks"]


LUNG_THRESHOLD_HU = -400.0


def threshold_lung_masks(hu: np.ndarray, spacing: Sequence[float], threshold: float = LUNG_THRESHOLD_HU,
                         erode_mm: float = 4.0, min_ml: float = 100.0) -> list[np.ndarray]:
    """Both lungs of a CT by the classical recipe, largest first (0, 1 or 2 boolean masks).

    Air below ``threshold`` HU whose 3D component does not touch the in-plane border of the volume (the
    air around the body) is split into lungs by an in-plane erosion of ``erode_mm`` (it cuts the bronchi,
    which join the lungs to each other and to the trachea). The two largest eroded components of at least
    ``min_ml`` are grown back into the air within ``2.5 * erode_mm``, and each axial slice's holes (the
    vessels) are filled. ``hu`` is ``[in-plane, in-plane, slice]`` and ``spacing`` in the same order. Which mask
    is the right lung is the caller's to decide from the affine. Not a substitute for a manual label:
    it misses dense lung (consolidation, effusion) and keeps the main bronchi near the hila.
    """
    spacing = tuple(float(s) for s in spacing)
    air = np.asarray(hu) < threshold
    lab = cc3d.connected_components(air, connectivity=6)
    frame = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel()]))
    inside = air & ~np.isin(lab, frame)
    r = [max(1, int(round(erode_mm / s))) for s in spacing[:2]]
    eroded = ndi.binary_erosion(inside, structure=np.ones((2 * r[0] + 1, 2 * r[1] + 1, 1), bool))
    parts = cc3d.connected_components(eroded, connectivity=6)
    counts = np.bincount(parts.ravel())[1:]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    seeds = [int(i) + 1 for i in np.argsort(counts)[::-1][:2] if counts[i] * voxel_ml >= min_ml]
    if not seeds:
        return []
    seed_map = np.zeros(parts.shape, np.uint8)
    for k, s in enumerate(seeds):
        seed_map[parts == s] = k + 1
    dist, nearest = ndi.distance_transform_edt(seed_map == 0, sampling=spacing, return_indices=True)
    grown = np.where(inside & (dist <= 2.5 * erode_mm), seed_map[tuple(nearest)], 0)
    return [np.stack([ndi.binary_fill_holes(grown[..., z] == k + 1) for z in range(grown.shape[-1])], axis=-1)
            for k in range(len(seeds))]
