"""Scoring method ``cdpdnet_uncertainty``: test-time-augmentation disagreement per image and ROI.

For each image that still misses ROIs (unlabelled, or partially labelled), the served model predicts
all 32 ROIs on the pre-processed volume and on its flips along each of the three axes (flipped
back). For ROI ``r`` the disagreement is ``1 - |voxels all passes predict| / |voxels any pass
predicts|`` (0: the passes agree exactly); ROIs that no pass predicts are not scored. The image
score is the mean disagreement over the predicted ROIs.

Results go into the image info (``GET /datastore/image/info``) under ``cdpdnet_uncertainty``:
``{"score", "rois": {name: disagreement}, "voxels": {name: voxels in the un-flipped pass},
"model_version", "ts", "seconds"}``. An image already scored with the served model version is
skipped (``force`` re-scores), so the method is cheap to run after every next-sample or training,
as MONAI Label's auto-scoring does. It runs as a MONAI Label scoring task (a background
subprocess, ``POST /scoring/cdpdnet_uncertainty``), never in the interactive infer path.

Request params: ``images`` (ids; default all images with missing ROIs), ``max_images`` (0 = all),
``force``, ``device``, ``threads`` (CPU threads of the subprocess; default half the cores).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from monailabel.interfaces.tasks.scoring import ScoringMethod

from cdpdnet.taxonomy import NUM_CLASSES, ROIS

from ..datastore import sync_datastore
from ..model_store import SEGMENTERS, ModelStore, resolve_device
from ..rois import final_label_annotation
from ..runtime import background_threads, in_background_task

logger = logging.getLogger(__name__)

__all__ = ["TTAUncertaintyScoring", "tta_uncertainty", "INFO_KEY"]

INFO_KEY = "cdpdnet_uncertainty"
FLIPS = ((), (0,), (1,), (2,))


def tta_uncertainty(seg, image, flips=FLIPS, min_voxels: int = 1) -> dict:
    """TTA disagreement of one image (a path or a ``MetaTensor [1, X, Y, Z]``) under a Segmenter."""
    import torch

    from cdpdnet.imageio import load_image

    img = load_image(image) if isinstance(image, str) else image
    x = seg.preprocess({"image": img})["image"][None]
    channels = list(range(1, NUM_CLASSES + 1))
    cut = math.log(seg.threshold / (1.0 - seg.threshold))
    union = inter = first = None
    for axes in flips:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        logits = seg.predict_logits(xi, channels)
        if dims:
            logits = torch.flip(logits, dims)
        m = (logits[0] > cut).cpu()
        del logits
        if union is None:
            union, inter, first = m.clone(), m.clone(), m
        else:
            union |= m
            inter &= m
    u = union.flatten(1).sum(1).numpy()
    i = inter.flatten(1).sum(1).numpy()
    f = first.flatten(1).sum(1).numpy()
    rois = {ROIS[c].name: float(1.0 - i[c] / u[c]) for c in range(NUM_CLASSES) if u[c] >= min_voxels}
    voxels = {ROIS[c].name: int(f[c]) for c in range(NUM_CLASSES) if f[c] > 0}
    score = float(np.mean(list(rois.values()))) if rois else 0.0
    return {"score": score, "rois": rois, "voxels": voxels, "passes": len(flips)}


class TTAUncertaintyScoring(ScoringMethod):
    def __init__(self, store: ModelStore, device: str = "cpu"):
        super().__init__("CDPDNet test-time-augmentation (flips) disagreement per image and ROI, for the "
                         "cdpdnet_uncertainty and cdpdnet_missing_rois strategies")
        self.store = store
        self.device = device

    def __call__(self, request, datastore):
        t0 = time.time()
        request = request or {}
        sync_datastore(datastore)
        if not self.store.published.is_file():
            return {"method": INFO_KEY, "scored": [], "note": "no model to score with"}
        device = resolve_device(str(request.get("device") or self.device))
        if device == "cpu" and in_background_task():
            import torch

            torch.set_num_threads(int(request.get("threads") or background_threads()))
        entry = SEGMENTERS.get(self.store.published, device)
        seg = entry.segmenter
        version = seg.loaded.version or self.store.current_version()
        force = str(request.get("force", "false")).lower() in ("1", "true", "yes")
        max_images = int(request.get("max_images") or 0)

        images = request.get("images")
        if not images:
            images = []
            for image_id in sorted(datastore.list_images()):
                ann = final_label_annotation(datastore, image_id)
                if ann is None or len(ann["annotated"]) < NUM_CLASSES:
                    images.append(image_id)
        scored, skipped, failed = [], 0, {}
        for image_id in images:
            if max_images and len(scored) >= max_images:
                break
            info = datastore.get_image_info(image_id) or {}
            prev = info.get(INFO_KEY) or {}
            if not force and prev.get("model_version") == version:
                skipped += 1
                continue
            uri = datastore.get_image_uri(image_id)
            t = time.time()
            try:
                with entry.lock:
                    res = tta_uncertainty(seg, uri)
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the others
                logger.warning(f"uncertainty scoring failed for {image_id}: {e}")
                failed[image_id] = str(e)[:300]
                continue
            res.update({"model_version": version, "ts": int(time.time()), "seconds": round(time.time() - t, 2)})
            datastore.update_image_info(image_id, {INFO_KEY: res})
            scored.append(image_id)
            logger.info(f"{INFO_KEY}: {image_id} score {res['score']:.4f} ({len(res['rois'])} ROIs predicted)")
        return {"method": INFO_KEY, "model_version": version, "scored": scored, "skipped": skipped,
                "failed": failed, "seconds": round(time.time() - t0, 2)}
