"""Next-sample strategies fed by the ``cdpdnet_uncertainty`` scoring method.

* ``cdpdnet_uncertainty``: the unlabelled image (no final label) with the highest TTA disagreement.
* ``cdpdnet_missing_rois``: for every image that still misses ROIs (unlabelled, or a partial label
  whose info does not list them), the mean disagreement over the missing ROIs that the model
  predicts in it; the highest goes first. The response names the ROIs to fill in
  (``fill_in_rois``: missing and predicted, most uncertain first), all ``missing_rois`` and the
  ``annotated_rois``. With ``labelled_only`` only partially labelled images are candidates.

Images without a score yet rank after scored ones (by the number of missing ROIs, then id) and the
response says ``"scored": false``; the scores come from ``POST /scoring/cdpdnet_uncertainty``
(MONAI Label also runs it in the background after next-sample and training when auto-scoring is on).
"""

from __future__ import annotations

import logging

from monailabel.interfaces.tasks.strategy import Strategy

from cdpdnet.taxonomy import NUM_CLASSES, ROIS

from ..datastore import sync_datastore
from ..rois import final_label_annotation, roi_names

logger = logging.getLogger(__name__)

__all__ = ["TTAUncertainty", "MissingROIUncertainty"]

INFO_KEY = "cdpdnet_uncertainty"
NOT_SCORED = "no uncertainty score yet: run POST /scoring/cdpdnet_uncertainty"


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


class TTAUncertainty(Strategy):
    def __init__(self):
        super().__init__("Unlabelled image with the highest CDPDNet test-time-augmentation disagreement")

    def __call__(self, request, datastore):
        sync_datastore(datastore)
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        ranked = []
        for image_id in images:
            sc = (datastore.get_image_info(image_id) or {}).get(INFO_KEY) or {}
            ranked.append((sc.get("score") is not None, float(sc.get("score") or 0.0), image_id, sc))
        ranked.sort(key=lambda t: (not t[0], -t[1], t[2]))
        has, score, image_id, sc = ranked[0]
        out = {"id": image_id, "strategy": "cdpdnet_uncertainty", "scored": has,
               "score": score if has else None, "score_model_version": sc.get("model_version")}
        if not has:
            out["note"] = NOT_SCORED
        logger.info(f"cdpdnet_uncertainty: selected {image_id} (score {out['score']})")
        return out


class MissingROIUncertainty(Strategy):
    def __init__(self):
        super().__init__("Image whose still-missing ROIs the model is least sure about; tells which ROIs to fill in")

    def __call__(self, request, datastore):
        sync_datastore(datastore)
        labelled_only = _truthy((request or {}).get("labelled_only", False))
        cands = []
        for image_id in sorted(datastore.list_images()):
            ann = final_label_annotation(datastore, image_id)
            if labelled_only and ann is None:
                continue
            annotated = set(ann["annotated"]) if ann else set()
            missing = [v for v in range(1, NUM_CLASSES + 1) if v not in annotated]
            if not missing:
                continue
            sc = (datastore.get_image_info(image_id) or {}).get(INFO_KEY) or {}
            per = sc.get("rois") if isinstance(sc.get("rois"), dict) else None
            if per is not None:
                fill = [v for v in missing if ROIS[v - 1].name in per]
                fill.sort(key=lambda v: -float(per[ROIS[v - 1].name]))
                score = sum(float(per[ROIS[v - 1].name]) for v in fill) / len(fill) if fill else 0.0
            else:
                fill, score = [], None
            cands.append({"image_id": image_id, "score": score, "missing": missing, "fill": fill,
                          "annotated": sorted(annotated), "labelled": ann is not None, "sc": sc})
        if not cands:
            return None
        cands.sort(key=lambda c: (c["score"] is None, -(c["score"] or 0.0), -len(c["missing"]), c["image_id"]))
        c = cands[0]
        out = {
            "id": c["image_id"],
            "strategy": "cdpdnet_missing_rois",
            "scored": c["score"] is not None,
            "score": c["score"],
            "score_model_version": c["sc"].get("model_version"),
            "labelled": c["labelled"],
            "annotated_rois": roi_names(c["annotated"]),
            "missing_rois": roi_names(c["missing"]),
            "fill_in_rois": [ROIS[v - 1].name for v in c["fill"]],
        }
        if c["score"] is None:
            out["note"] = NOT_SCORED
        logger.info(f"cdpdnet_missing_rois: selected {c['image_id']} (score {c['score']}; fill in {out['fill_in_rois']})")
        return out
