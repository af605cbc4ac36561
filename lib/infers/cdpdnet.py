"""The two infer tasks on one warm CDPDNet model.

* ``cdpdnet`` (type ``segmentation``): all 32 ROIs, for 3D Slicer and OHIF auto-segmentation.
* ``cdpdnet_prompt`` (type ``vista3d``, what OHIF's MONAI Label panel sends class and point prompts
  to): a subset of ROIs from ``label_prompt`` (label values or names) and/or a free-text prompt
  ``text`` (also ``prompt``; comma-separated names, synonyms or descriptions), and foreground /
  background clicks ``points`` ``[[x, y, z], ...]`` (voxel indices of the image) with
  ``point_labels`` ``[1, 0, ...]`` (also accepted: ``foreground`` / ``background`` point lists).
  With clicks, the sliding window runs only on a box around them (``point_margin_mm``, default
  half the largest patch extent, on every side), predicted components touched by a foreground
  click are kept, those touched by a background click dropped (foreground wins).

Both: the label map is ``uint8`` in the image's own voxel grid and affine (the core Segmenter
resamples back), written as ``result_extension`` (``.nii.gz`` default, ``.nii``, ``.nrrd``,
``.mha``). **Fill-in mode** (``fill_in``, default true): when the image has a final label in the
datastore, the ROIs annotated in it (label info ``annotated``, else its values) are not predicted;
the proposals for the missing ROIs are merged into the existing label map, whose non-zero voxels
are never changed. The result json lists ``proposed_rois`` (predicted), ``present_rois``,
``fill_in`` (what was kept) and ``model_version``.

Requests are the task ``config`` merged with the client's ``params``; the app adds
``cdpdnet_existing`` (the final label's path and annotated ROI values) and ``image_id``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from monailabel.interfaces.tasks.infer_v2 import InferTask

from cdpdnet.checkpoint import CheckpointError
from cdpdnet.taxonomy import NUM_CLASSES

from ..errors import bad_request, not_found, server_error, unprocessable
from ..model_store import SEGMENTERS, ModelStore, resolve_device
from ..rois import parse_rois, read_label_array, roi_names
from .text_prompt import resolve_text_prompt

logger = logging.getLogger(__name__)

__all__ = ["CDPDNetInfer", "CDPDNetPromptInfer", "EXTENSIONS"]

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
MAX_MARGIN_MM = 10000.0
ALL_ROIS = list(range(1, NUM_CLASSES + 1))


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)



def result_dir() -> str:
    """The server's own folder for result files (0700, one per process, made again if a cleaner removed it).

    MONAI Label sends a result under its file name and deletes the file after the response. A client on
    the same machine (MONAILabelClient, by default) writes what it receives to ``<temp dir>/<that name>``:
    were the server's file in the temp dir itself, the server's clean-up could delete the client's copy.
    """
    global _RESULT_DIR
    if _RESULT_DIR is None or not os.path.isdir(_RESULT_DIR):
        _RESULT_DIR = tempfile.mkdtemp(prefix="cdpdnet_results_")
    return _RESULT_DIR


_RESULT_DIR: str | None = None

class _CDPDNetInferBase(InferTask):
    TYPE = "segmentation"
    DESCRIPTION = ""

    def __init__(self, store: ModelStore, labels: dict[str, int], device: str = "cpu", text_threshold: float = 0.65,
                 config: dict | None = None, name: str = "cdpdnet", subgrids: int | None = None):
        base = {"fill_in": True, "result_extension": ".nii.gz"}
        base.update(config or {})
        super().__init__(type=self.TYPE, labels=dict(labels), dimension=3, description=self.DESCRIPTION, config=base)
        self.name = name
        self.store = store
        self.device = device
        self.text_threshold = float(text_threshold)
        self.segmenter_kwargs = {} if subgrids is None else {"subgrids": int(subgrids)}  # None: the model's preset

    # -- InferTask API ---------------------------------------------------------------------
    def is_valid(self) -> bool:
        return self.store.published.is_file()

    def get_path(self, validate: bool = True):
        p = self.store.published
        return str(p) if (p.is_file() or not validate) else None

    def info(self) -> dict[str, Any]:
        info = super().info()
        cur = self.store.current()
        info["model_version"] = cur.get("version", "")
        info["preset"] = cur.get("preset", "")
        return info

    # -- request parsing (overridden by the prompt task) -------------------------------------
    def requested_rois(self, req: dict) -> tuple[list[int], dict]:
        return list(ALL_ROIS), {}

    def clicks(self, req: dict, shape: tuple[int, ...]) -> tuple[list, list]:
        return [], []

    # -- main -------------------------------------------------------------------------------
    def __call__(self, request: dict, callbacks=None):
        from cdpdnet.imageio import InvalidImageError, load_image, save_label_map

        t0 = time.perf_counter()
        req = dict(self._config)
        req.update(request or {})
        image = req.get("image")
        if not isinstance(image, str) or not image or not os.path.exists(image):
            raise not_found(f"image {req.get('image_id') or image!r} is not in the datastore (unknown image id)")
        ext = str(req.get("result_extension") or ".nii.gz")
        ext = ext if ext.startswith(".") else "." + ext
        if ext not in EXTENSIONS:
            raise bad_request(f"result_extension {ext!r} is not supported; use one of {', '.join(EXTENSIONS)}")
        dtype = str(req.get("result_dtype") or "uint8").lower()
        if dtype not in ("uint8", "uint16", "int16", "int32", "float32"):
            raise bad_request(f"result_dtype {dtype!r} is not supported (uint8 is the default)")
        if not self.is_valid():
            raise not_found(f"no model file {self.store.published}: publish one (train, or place "
                            f"{self.store.pretrained.name} in {self.store.dir} and restart)")

        rois, prompt_info = self.requested_rois(req)
        try:
            img = load_image(image)
        except InvalidImageError as e:
            msg = str(e)
            if not req.get("image_id"):  # an upload: the name of its temporary copy means nothing to the client
                msg = msg.replace(f"image {os.path.basename(image)}", "the uploaded image")
            raise unprocessable(msg) from None
        shape = tuple(int(s) for s in img.shape[1:])
        fg, bg = self.clicks(req, shape)
        _margin_mm(req.get("point_margin_mm"))  # 400 for a bad one, also when no box is segmented (nothing to do)

        # fill-in mode: an existing final label keeps its annotated ROIs, only the others are proposed
        existing = req.get("cdpdnet_existing") or None
        fill = {"active": False}
        ex_arr = None
        if existing and _truthy(req.get("fill_in", True)):
            try:
                arr, _ = read_label_array(existing["path"])
                if tuple(arr.shape) != shape:
                    raise ValueError(f"its shape {tuple(arr.shape)} differs from the image's {shape}")
                ex_arr = np.asarray(arr).round().clip(0, 255).astype(np.uint8)
                annotated = [int(v) for v in existing.get("annotated", [])]
                fill = {"active": True, "annotated_rois": roi_names(annotated), "from": existing.get("from", "")}
            except (ValueError, KeyError) as e:
                logger.warning(f"fill-in skipped for {image}: the final label cannot be used ({e})")
                fill = {"active": False, "skipped": f"the final label cannot be used: {e}"}
        annotated_set = {int(v) for v in existing.get("annotated", [])} if fill["active"] else set()
        to_predict = [r for r in rois if r not in annotated_set]

        try:
            entry = SEGMENTERS.get(self.store.published, resolve_device(_device(req.get("device") or self.device)),
                                   **self.segmenter_kwargs)
        except CheckpointError as e:
            raise server_error(f"the served model cannot be loaded: {e}") from None
        seg = entry.segmenter
        version = seg.loaded.version or self.store.current_version()
        t_load = time.perf_counter()
        timings: dict[str, float] = {}
        region = None
        with entry.lock:
            if not to_predict:
                label = np.zeros(shape, dtype=np.uint8)
            elif fg or bg:
                label, region, timings = self._segment_region(seg, img, to_predict, fg + bg, req)
            else:
                res = seg.segment(img, rois=to_predict)
                label, timings = res.label, dict(res.timings)
        t_net = time.perf_counter()

        points_info = None
        if fg or bg:
            label, points_info = _filter_components(label, fg, bg)
            points_info["region"] = region
        if ex_arr is not None:
            out = ex_arr.copy()
            free = (out == 0) & (label > 0)
            out[free] = label[free]
            label = out
        t_post = time.perf_counter()

        fd, path = tempfile.mkstemp(prefix="cdpdnet_", suffix=ext, dir=result_dir())
        os.close(fd)
        affine = np.asarray(img.affine, dtype=np.float64)
        save_label_map(label, affine, path)
        if dtype != "uint8" and ext in (".nii.gz", ".nii"):
            import nibabel as nib

            nii = nib.load(path)
            nib.save(nib.Nifti1Image(np.asarray(nii.dataobj).astype(dtype), affine, nii.header), path)
        t_end = time.perf_counter()

        present = [int(v) for v in np.unique(label) if v]
        proposed_present = [v for v in present if v in to_predict]
        result = {
            "label_names": dict(self.labels),
            "model": self.name,
            "model_version": version,
            "requested_rois": roi_names(rois),
            "proposed_rois": roi_names(to_predict),
            "proposed_present_rois": roi_names(proposed_present),
            "present_rois": roi_names(present),
            "fill_in": {k: v for k, v in fill.items()},
            "shape": list(shape),
            "latencies": {
                "pre": round(t_load - t0, 4),
                "infer": round(t_net - t_load, 4),
                "invert": round(timings.get("resample", 0.0), 4),
                "post": round(t_post - t_net, 4),
                "write": round(t_end - t_post, 4),
                "total": round(t_end - t0, 4),
                "transform": None,
            },
            "timings": {k: round(float(v), 4) for k, v in timings.items()},
        }
        if prompt_info:
            result["prompt"] = prompt_info
        if points_info is not None:
            result["points"] = points_info
        logger.info(f"{self.name} {req.get('image_id') or os.path.basename(image)}: model {version}, "
                    f"{len(to_predict)} ROIs proposed, {len(present)} present, fill-in {fill['active']}, "
                    f"{result['latencies']['total']:.2f}s")
        return path, result

    def _segment_region(self, seg, img, rois: list[int], clicks: list, req: dict):
        """Segment a box around the clicks only; returns the full-size label and the box."""
        import torch
        from monai.data import MetaTensor

        from cdpdnet.imageio import InvalidImageError

        affine = np.asarray(img.affine, dtype=np.float64)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        margin_mm = _margin_mm(req.get("point_margin_mm"))
        if margin_mm is None:
            pre_sp = [float(s) for s in seg.preset.preprocess["spacing"]]
            margin_mm = _margin_mm(0.5 * max(p * s for p, s in zip(seg.preset.patch_size, pre_sp)))
        pts = np.asarray(clicks, dtype=np.int64)
        shape = np.asarray(img.shape[1:], dtype=np.int64)
        mv = np.ceil(margin_mm / spacing).astype(np.int64)
        lo = np.maximum(pts.min(0) - mv, 0)
        hi = np.minimum(pts.max(0) + mv + 1, shape)
        crop = img[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        shift = np.eye(4)
        shift[:3, 3] = lo
        sub = MetaTensor(torch.as_tensor(np.asarray(crop), dtype=torch.float32), affine=torch.as_tensor(affine @ shift))
        label = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
        timings: dict[str, float] = {}
        try:
            res = seg.segment(sub, rois=rois)
            label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = res.label
            timings = dict(res.timings)
        except InvalidImageError as e:  # e.g. a constant (all-air) box
            logger.info(f"nothing to segment around the clicks: {e}")
        return label, {"lo": lo.tolist(), "hi": hi.tolist(), "margin_mm": margin_mm.tolist()}, timings


def _filter_components(label: np.ndarray, fg: list, bg: list) -> tuple[np.ndarray, dict]:
    """Keep the connected components (per ROI) that a foreground click touches (its voxel or a
    26-neighbour); drop those a background click touches. With foreground clicks every untouched
    component goes; a component touched by both is kept."""
    from scipy import ndimage

    out = np.zeros_like(label)
    kept = dropped = 0
    structure = np.ones((3, 3, 3), dtype=bool)
    shape = label.shape

    def touched(comp: np.ndarray, pts) -> set[int]:
        ids: set[int] = set()
        for p in pts:
            sl = tuple(slice(max(int(c) - 1, 0), min(int(c) + 2, s)) for c, s in zip(p, shape))
            ids.update(int(i) for i in np.unique(comp[sl]) if i)
        return ids

    fg_hits = 0
    for v in [int(x) for x in np.unique(label) if x]:
        comp, n = ndimage.label(label == v, structure=structure)
        keep_ids = touched(comp, fg)
        drop_ids = touched(comp, bg) - keep_ids
        fg_hits += len(keep_ids)
        ids = keep_ids if fg else set(range(1, n + 1)) - drop_ids
        if ids:
            out[np.isin(comp, sorted(ids))] = v
        kept += len(ids)
        dropped += n - len(ids)
    info = {"foreground": [list(map(int, p)) for p in fg], "background": [list(map(int, p)) for p in bg],
            "components_kept": kept, "components_dropped": dropped}
    if fg and not fg_hits:
        info["note"] = "no predicted component at the foreground clicks"
    return out, info


class CDPDNetInfer(_CDPDNetInferBase):
    TYPE = "segmentation"
    DESCRIPTION = ("CDPDNet universal CT segmentation of 32 organs and tumours (all ROIs). Fill-in mode: on an "
                   "image with a saved partial label only the missing ROIs are proposed and merged with it.")


class CDPDNetPromptInfer(_CDPDNetInferBase):
    TYPE = "vista3d"
    DESCRIPTION = ("CDPDNet with prompts: label_prompt (ROI values or names), text (free-text ROI names, "
                   "comma-separated), points + point_labels (1 foreground / 0 background clicks, voxel indices).")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._config.update({"text": ""})

    def requested_rois(self, req: dict) -> tuple[list[int], dict]:
        info: dict[str, Any] = {}
        values: set[int] = set()
        lp = req.get("label_prompt")
        if lp not in (None, "", []):
            got = parse_rois(lp, "label_prompt")
            values.update(got)
            info["label_prompt"] = roi_names(got)
        text = req.get("text") or req.get("prompt")
        if text not in (None, "", []):
            got, report = resolve_text_prompt(text, _threshold(req.get("text_threshold"), self.text_threshold))
            values.update(got)
            info["text"] = report
        if not values:
            return list(ALL_ROIS), info
        return sorted(values), info

    def clicks(self, req: dict, shape: tuple[int, ...]) -> tuple[list, list]:
        fg: list = []
        bg: list = []
        pts = req.get("points")
        if pts not in (None, "", []):
            pts = _as_points(pts, "points", shape)
            labels = req.get("point_labels")
            if labels in (None, "", []):
                labels = [1] * len(pts)
            if not isinstance(labels, (list, tuple)) or len(labels) != len(pts):
                raise bad_request(f"point_labels must be a list with one 0/1 entry per point ({len(pts)} points), "
                                  f"got {labels!r}")
            for p, lab in zip(pts, labels):
                if isinstance(lab, bool) or lab not in (0, 1, 0.0, 1.0, "0", "1"):
                    raise bad_request(f"point_labels entries must be 1 (foreground) or 0 (background), got {lab!r}")
                (fg if int(lab) == 1 else bg).append(p)
        for key, dest in (("foreground", fg), ("background", bg)):
            extra = req.get(key)
            if extra not in (None, "", []):
                dest.extend(_as_points(extra, key, shape))
        return fg, bg


def _margin_mm(margin: Any) -> np.ndarray | None:
    """``point_margin_mm`` (a number or 3) as 3 floats in 0..MAX_MARGIN_MM, ``None`` when absent; 400 otherwise."""
    if margin is None:
        return None
    try:
        margin_mm = np.broadcast_to(np.asarray(margin, dtype=np.float64), (3,))
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"point_margin_mm must be a number or 3 numbers, got {margin!r}") from None
    if not np.isfinite(margin_mm).all() or (margin_mm < 0).any() or (margin_mm > MAX_MARGIN_MM).any():
        raise bad_request(f"point_margin_mm must be in 0..{MAX_MARGIN_MM:g} mm, got {margin!r}")
    return margin_mm


def _threshold(value: Any, default: float) -> float:
    if value in (None, ""):
        return float(default)
    try:
        t = float(value)
    except (TypeError, ValueError, OverflowError):
        t = math.nan
    if isinstance(value, bool) or not 0.0 <= t <= 1.0:
        raise bad_request(f"text_threshold must be a number in 0..1 (a cosine similarity), got {value!r}")
    return t


def _device(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (an existing GPU); 400 for anything else."""
    import re

    import torch

    name = value.strip().lower() if isinstance(value, str) else None
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d{1,3}))?", name or "")
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise bad_request(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    if m.group(2) is not None and torch.cuda.is_available() and int(m.group(2)) >= torch.cuda.device_count():
        raise bad_request(f"device {name!r}: this server has {torch.cuda.device_count()} GPU(s)")
    return name


def _as_points(value: Any, what: str, shape: tuple[int, ...]) -> list[list[int]]:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(f"'{what}' must be a list of [x, y, z] voxel indices, got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise bad_request(f"'{what}' must be a list of [x, y, z] voxel indices, got {value!r}")
    out = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or len(p) != 3
                or any(isinstance(c, bool) or not isinstance(c, (int, float))
                       or (isinstance(c, float) and not math.isfinite(c)) for c in p)):
            raise bad_request(f"'{what}': each point must be [x, y, z] voxel indices (3 numbers), got {p!r}")
        q = [int(round(c)) for c in p]
        if any(c < 0 or c >= s for c, s in zip(q, shape)):
            raise unprocessable(f"'{what}': point {list(p)} lies outside the image (voxel shape {list(shape)})")
        out.append(q)
    return out
