"""Evaluation metrics (reference section 7) done properly, plus the reference's variants.

* :func:`dice` -- ``2|P∩G| / (|P|+|G|)``; NaN when both are empty.
* :func:`dice_reference` -- the reference's ``2TP / (|P|+|G|+1)`` (bug 8; 0 when both empty).
* :func:`hd95_mm` -- symmetric 95th-percentile Hausdorff distance in **millimetres**, computed on
  surface voxels (mask XOR its 6-connected erosion), the definition of MONAI's
  ``monai.metrics.utils.get_edge_surface_distance``; HD95 = max of the two directed 95th
  percentiles, i.e. what ``monai.metrics.compute_hausdorff_distance(percentile=95)`` returns
  (computed with scipy by default, see :func:`surface_distances`).
  Both empty -> NaN; exactly one empty -> ``inf`` (``one_empty``).
* :func:`hd95_reference` -- the reference's number (``medpy.metric.hd95`` with unit spacing): the
  95th percentile of the *pooled* distances of both directions, in **voxels**, 999 when the
  prediction is empty, NaN when the ground truth is empty (the reference skips such cases).
  Note that the reference also computed it on raw logits > 0.5 before post-processing (bug 7);
  which mask is passed is the caller's choice.
* :func:`nsd` -- normalised surface Dice at ``tolerance_mm`` (MONAI ``compute_surface_dice``
  definition, voxel counting): both empty -> NaN; one empty -> 0.

Before any distance transform the pair is cropped to its union bounding box plus a margin, so the
cost scales with the object, not with the volume.

:func:`evaluate_case`, :func:`summarise` and :func:`render_markdown` turn these into per-case,
per-ROI and per-dataset tables (case-weighted like the reference, and plain means of dataset means).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

from .taxonomy import ROI_BY_NAME, ROIS, roi

__all__ = [
    "dice",
    "dice_reference",
    "surface_distances",
    "hd95_mm",
    "hd95_reference",
    "nsd",
    "roi_mask",
    "evaluate_case",
    "summarise",
    "render_markdown",
    "METRICS",
]

METRICS = ("dice", "dice_ref", "hd95", "nsd")
REFERENCE_EMPTY_HD = 999.0


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Standard Dice ``2|P∩G| / (|P|+|G|)``; NaN when both masks are empty."""
    pred, gt = _check_pair(pred, gt)
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if denom == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & gt)) / denom


def dice_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference's Dice ``2TP / (|P|+|G|+1)`` (biased low for small structures)."""
    pred, gt = _check_pair(pred, gt)
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt)) + 1
    return 2.0 * int(np.count_nonzero(pred & gt)) / denom


def _crop_pair(pred: np.ndarray, gt: np.ndarray, margin: int = 1):
    """Crop both masks to the bounding box of their union, plus ``margin`` voxels of zero padding."""
    union_axes = []
    for axis in range(pred.ndim):
        other = tuple(a for a in range(pred.ndim) if a != axis)
        idx = np.flatnonzero(np.any(pred, axis=other) | np.any(gt, axis=other))
        if idx.size == 0:
            return None
        union_axes.append(slice(int(idx[0]), int(idx[-1]) + 1))
    box = tuple(union_axes)
    pad = [(margin, margin)] * pred.ndim
    return np.pad(pred[box], pad), np.pad(gt[box], pad)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask XOR its erosion by the 6-connected cross (MONAI's and medpy's choice)."""
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], use_monai: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the surface of ``gt``, and back.

    Both masks must be non-empty. The pair is first cropped to its union bounding box (+1 voxel of
    zero padding). The default computes exactly what MONAI's ``get_edge_surface_distance`` does
    (surface = mask XOR 6-connected erosion, Euclidean distance transform with ``sampling=spacing``)
    directly with scipy, because importing MONAI costs ~10-20 s of CPU; ``use_monai=True`` calls
    MONAI itself (the tests check that both agree).
    """
    pred, gt = _check_pair(pred, gt)
    if not (pred.any() and gt.any()):
        raise ValueError("surface_distances needs two non-empty masks")
    p, g = _crop_pair(pred, gt)
    spacing = [float(s) for s in spacing]
    if use_monai:
        import torch
        from monai.metrics.utils import get_edge_surface_distance

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, (d_pg, d_gp), _ = get_edge_surface_distance(
                torch.from_numpy(p), torch.from_numpy(g), spacing=spacing, symmetric=True
            )
        return d_pg.numpy().astype(np.float64), d_gp.numpy().astype(np.float64)
    ep, eg = _edges(p), _edges(g)
    d_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    return d_pg, d_gp


def _empty_case(pred: np.ndarray, gt: np.ndarray, both: float, one: float) -> float | None:
    p, g = bool(pred.any()), bool(gt.any())
    if not p and not g:
        return both
    if not p or not g:
        return one
    return None


def _hd_from(distances: tuple[np.ndarray, np.ndarray], percentile: float) -> float:
    return float(max(np.percentile(d, percentile) for d in distances))


def _nsd_from(distances: tuple[np.ndarray, np.ndarray], tolerance_mm: float) -> float:
    d_pg, d_gp = distances
    return float((np.count_nonzero(d_pg <= tolerance_mm) + np.count_nonzero(d_gp <= tolerance_mm)) / (d_pg.size + d_gp.size))


def hd95_mm(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    percentile: float = 95.0,
    one_empty: float = math.inf,
) -> float:
    """Symmetric ``percentile`` Hausdorff distance in mm (max of the two directed percentiles).

    Both masks empty -> NaN; exactly one empty -> ``one_empty`` (default ``inf``).
    """
    pred, gt = _check_pair(pred, gt)
    special = _empty_case(pred, gt, math.nan, one_empty)
    if special is not None:
        return special
    return _hd_from(surface_distances(pred, gt, spacing), percentile)


def hd95_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference's HD95: ``medpy.metric.hd95(pred, gt, voxelspacing=(1,1,1))``.

    Pooled 95th percentile of both directions' surface distances in voxel units; 999 when ``pred``
    is empty and ``gt`` is not; NaN when ``gt`` is empty (the reference does not evaluate those).
    """
    pred, gt = _check_pair(pred, gt)
    if not gt.any():
        return math.nan
    if not pred.any():
        return REFERENCE_EMPTY_HD
    d_pg, d_gp = surface_distances(pred, gt, (1.0,) * pred.ndim)
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), tolerance_mm: float = 1.5) -> float:
    """Normalised surface Dice: the fraction of both surfaces within ``tolerance_mm`` of the other.

    Both empty -> NaN; exactly one empty -> 0.
    """
    pred, gt = _check_pair(pred, gt)
    special = _empty_case(pred, gt, math.nan, 0.0)
    if special is not None:
        return special
    return _nsd_from(surface_distances(pred, gt, spacing), tolerance_mm)


# ---------------------------------------------------------------------------------------------
# Per-case evaluation


def _assigned_lesion_voxels(label: np.ndarray, organ: int) -> np.ndarray:
    """Voxels of lesions hosted by ``organ`` in a label map. A lesion with one host goes to it; a
    lesion component with several hosts (kidney tumour, lung tumour, ...) goes to the host that
    touches it most (26-neighbourhood)."""
    name = ROIS[organ - 1].name
    out = np.zeros(label.shape, dtype=bool)
    for lesion in (r for r in ROIS if name in r.hosts):
        mask = label == lesion.index
        if not mask.any():
            continue
        hosts = [ROI_BY_NAME[h].index for h in lesion.hosts]
        if len(hosts) == 1:
            out |= mask
            continue
        labels = cc3d.connected_components(mask, connectivity=26)
        for comp_id, box in enumerate(cc3d.statistics(labels)["bounding_boxes"]):
            if comp_id == 0 or box is None:
                continue
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            comp = labels[box] == comp_id
            ring = ndimage.binary_dilation(comp, structure=np.ones((3,) * label.ndim, bool))
            touch = [int(np.count_nonzero(label[box][ring] == h)) for h in hosts]
            if max(touch) > 0 and hosts[int(np.argmax(touch))] == organ:
                out[box] |= comp
    return out


def roi_mask(source: np.ndarray | Mapping[int, np.ndarray], roi_value: int, organs_include_lesions: bool = True) -> np.ndarray:
    """The binary mask of one ROI from a label map or a ``{label value: mask}`` dict.

    For a label map and ``organs_include_lesions`` the organ mask also holds the lesions it hosts
    (the reference's organ channels include tumours, so does a model's liver channel). A dict is
    used as is; a missing key is an empty mask.
    """
    if isinstance(source, Mapping):
        if roi_value in source:
            return _as_bool(source[roi_value])
        shape = np.shape(next(iter(source.values()))) if source else ()
        return np.zeros(shape, dtype=bool)
    label = np.asarray(source)
    mask = label == roi_value
    if organs_include_lesions and not ROIS[roi_value - 1].is_lesion:
        mask |= _assigned_lesion_voxels(label, roi_value)
    return mask


def evaluate_case(
    pred_label: np.ndarray | Mapping[int, np.ndarray],
    gt_label: np.ndarray | Mapping[int, np.ndarray],
    spacing: Sequence[float],
    rois: Iterable[int | str],
    nsd_tolerance_mm: float = 1.5,
    skip_empty_gt: bool = True,
    organs_include_lesions: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of one case: ``{roi name: {"dice", "dice_ref", "hd95", "nsd"}}``.

    ``rois`` are the ROIs annotated in this ground truth (label values or names); others are not
    evaluated (partial labels). With ``skip_empty_gt`` (the reference's rule) an ROI whose ground
    truth is empty is left out. ``hd95`` is in mm (:func:`hd95_mm`), ``nsd`` at ``nsd_tolerance_mm``.
    Surface distances are computed once per ROI.
    """
    out: dict[str, dict[str, float]] = {}
    for r in (roi(x) for x in rois):
        p = roi_mask(pred_label, r.index, organs_include_lesions)
        g = roi_mask(gt_label, r.index, organs_include_lesions)
        p, g = _check_pair(p, g)
        if skip_empty_gt and not g.any():
            continue
        rec = {"dice": dice(p, g), "dice_ref": dice_reference(p, g)}
        special = _empty_case(p, g, math.nan, math.inf)
        if special is None:
            dist = surface_distances(p, g, spacing)
            rec["hd95"], rec["nsd"] = _hd_from(dist, 95.0), _nsd_from(dist, nsd_tolerance_mm)
        else:
            rec["hd95"], rec["nsd"] = special, (math.nan if math.isnan(special) else 0.0)
        out[r.name] = rec
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation and reporting


def _mean(values: Sequence[float]) -> float:
    """Mean ignoring NaN (``inf`` propagates); NaN when nothing is left."""
    v = [x for x in values if not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else math.nan


def _roi_order(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda n: ROI_BY_NAME[n].index if n in ROI_BY_NAME else 10**6)


def summarise(records: Iterable[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Aggregate per-case results.

    ``records``: ``{"case": id, "dataset": key, "results": evaluate_case(...)}``. Returns plain dicts:

    * ``per_dataset[ds][roi][metric]`` -- mean over the cases of a dataset (plus ``n``);
    * ``per_roi[roi][metric]`` -- mean over all cases, i.e. case-weighted across datasets, as the
      reference (``ave_organ_dice``); ``per_roi_dataset_mean[roi][metric]`` -- plain mean of the
      per-dataset means (each dataset counts once);
    * ``mean[metric]`` -- mean over ROIs of ``per_roi`` (the reference's headline number) and
      ``mean_dataset_weighted[metric]`` of ``per_roi_dataset_mean``;
    * ``per_dataset_mean[ds][metric]`` -- mean over the ROIs of each dataset.

    NaN values are ignored in means, ``inf`` (an HD95 with an empty mask) propagates.
    """
    cases: dict[str, dict[str, dict[str, list[float]]]] = {}
    for rec in records:
        ds = str(rec.get("dataset", "all"))
        for name, vals in rec["results"].items():
            slot = cases.setdefault(ds, {}).setdefault(name, {m: [] for m in metrics})
            for m in metrics:
                slot[m].append(float(vals.get(m, math.nan)))

    per_dataset = {
        ds: {name: {**{m: _mean(v[m]) for m in metrics}, "n": len(v[metrics[0]])} for name, v in _sorted_rois(d).items()}
        for ds, d in sorted(cases.items())
    }
    names = _roi_order(n for d in cases.values() for n in d)
    per_roi, per_roi_ds = {}, {}
    for name in names:
        holders = [d[name] for d in cases.values() if name in d]
        per_roi[name] = {**{m: _mean([x for h in holders for x in h[m]]) for m in metrics},
                         "n": sum(len(h[metrics[0]]) for h in holders)}
        ds_means = [per_dataset[ds][name] for ds in per_dataset if name in per_dataset[ds]]
        per_roi_ds[name] = {**{m: _mean([x[m] for x in ds_means]) for m in metrics}, "n_datasets": len(ds_means)}
    return {
        "per_dataset": per_dataset,
        "per_dataset_mean": {ds: {m: _mean([v[m] for v in d.values()]) for m in metrics} for ds, d in per_dataset.items()},
        "per_roi": per_roi,
        "per_roi_dataset_mean": per_roi_ds,
        "mean": {m: _mean([v[m] for v in per_roi.values()]) for m in metrics},
        "mean_dataset_weighted": {m: _mean([v[m] for v in per_roi_ds.values()]) for m in metrics},
    }


def _sorted_rois(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with its ROI-name keys in label order."""
    return {k: d[k] for k in _roi_order(d)}


def _fmt(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{100 * value:.2f}" if metric in ("dice", "dice_ref", "nsd") else f"{value:.2f}"


def render_markdown(summary: Mapping[str, Any], metrics: Sequence[str] = METRICS, matrix_metric: str = "dice") -> str:
    """Markdown report of :func:`summarise`: a per-ROI table (Dice/NSD in %, HD95 in mm) and an
    ROI x dataset table of ``matrix_metric``."""
    head = {"dice": "Dice %", "dice_ref": "Dice (ref) %", "hd95": "HD95 mm", "nsd": "NSD %"}
    cols = [head.get(m, m) for m in metrics]
    lines = ["| ROI | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for name, v in summary["per_roi"].items():
        lines.append(f"| {name} | {v['n']} | " + " | ".join(_fmt(m, v[m]) for m in metrics) + " |")
    for key, label in (("mean", "**mean (case-weighted)**"), ("mean_dataset_weighted", "**mean (dataset-weighted)**")):
        lines.append(f"| {label} | | " + " | ".join(_fmt(m, summary[key][m]) for m in metrics) + " |")
    datasets = list(summary["per_dataset"])
    lines += ["", f"{head.get(matrix_metric, matrix_metric)} by dataset:", "",
              "| ROI | " + " | ".join(datasets) + " | all |", "|---|" + "---:|" * (len(datasets) + 1)]
    for name, v in summary["per_roi"].items():
        cells = [_fmt(matrix_metric, summary["per_dataset"][ds][name][matrix_metric]) if name in summary["per_dataset"][ds]
                 else "" for ds in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(matrix_metric, v[matrix_metric])} |")
    lines.append("| **mean** | " + " | ".join(_fmt(matrix_metric, summary["per_dataset_mean"][ds][matrix_metric]) for ds in datasets)
                 + f" | {_fmt(matrix_metric, summary['mean'][matrix_metric])} |")
    return "\n".join(lines) + "\n"
