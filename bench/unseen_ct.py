#!/usr/bin/env python
"""How a model does on real chest CTs it never saw, which have no organ labels.

For each image: the model's label map (the full inference path, as the app serves it) against both
lungs by threshold (:mod:`cdpdnet.threshold_lungs`, a classical reference, not a manual label):

* Dice of the right lung, the left lung, and of both lungs taken together (so a side swap shows);
* millilitres of the reference lungs that the model gives to any other ROI (say, the colon), with
  the largest of those claims;
* the volume of every ROI the model predicts, to spot organs where a chest CT has none.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/unseen_ct.py MODEL.pt data/demo/images/totalseg_aorta_report_ct.nii.gz \\
        data/demo/images/pyradiomics_lung1.nii.gz [--json out.json] [--roi-thresholds FILE.json]

Prints a markdown table. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdpdnet.metrics import dice  # noqa: E402
from cdpdnet.taxonomy import ROIS, roi  # noqa: E402

LUNGS = (roi("lung_right").index, roi("lung_left").index)


def score(seg, path: str) -> dict:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from cdpdnet.imageio import load_image
    from cdpdnet.threshold_lungs import threshold_lung_masks

    img = load_image(path)
    t0 = time.perf_counter()
    res = seg.segment(img)
    seconds = time.perf_counter() - t0
    ras = Orientation("RAS")
    ct = ras(img)
    hu = np.asarray(ct[0])
    label = np.asarray(ras(MetaTensor(torch.from_numpy(res.label)[None], affine=img.affine))[0])
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(ct.affine)[:3, :3], axis=0))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    masks = threshold_lung_masks(hu, spacing)
    if len(masks) != 2:
        raise SystemExit(f"{path}: the threshold reference found {len(masks)} lungs, not 2: not a chest CT?")
    # RAS voxel order: the index of axis 0 grows towards the patient's right
    right, left = sorted(masks, key=lambda m: -np.argwhere(m)[:, 0].mean())
    ref = right | left
    claims = {ROIS[v - 1].name: round(n * voxel_ml, 1)
              for v, n in enumerate(np.bincount(label[ref], minlength=33)) if v and v not in LUNGS
              and ROIS[v - 1].name != "lung_tumor" and n}
    volumes = {ROIS[v - 1].name: round(n * voxel_ml, 1) for v, n in enumerate(np.bincount(label.ravel(), minlength=33)) if v and n}
    return {
        "image": Path(path).name.split(".")[0],
        "seconds": round(seconds, 1),
        "reference_ml": {"lung_right": round(float(right.sum()) * voxel_ml), "lung_left": round(float(left.sum()) * voxel_ml)},
        "dice": {"lung_right": round(dice(label == LUNGS[0], right), 3), "lung_left": round(dice(label == LUNGS[1], left), 3),
                 "both_lungs": round(dice(np.isin(label, LUNGS), ref), 3)},
        "lung_claimed_by_others_ml": round(sum(claims.values()), 1),
        "claims_ml": dict(sorted(claims.items(), key=lambda kv: -kv[1])),
        "volumes_ml": volumes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a CDPDNet checkpoint (.pt)")
    ap.add_argument("images", nargs="+", help="chest CTs (NIfTI, NRRD, DICOM folder)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--roi-thresholds", metavar="JSON",
                    help="a JSON file {ROI name: threshold} instead of the checkpoint preset's infer.roi_thresholds "
                         "(a file holding {} turns them off)")
    a = ap.parse_args(argv)

    from cdpdnet.inference import Segmenter

    seg = Segmenter(a.model, roi_thresholds=json.loads(Path(a.roi_thresholds).read_text()) if a.roi_thresholds else None)
    rows = [score(seg, p) for p in a.images]
    print(f"model: {a.model}\n")
    print("| image | Dice right lung | Dice left lung | Dice both lungs | lung (ml) given to other ROIs | largest claims (ml) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k} {v:g}" for k, v in list(r["claims_ml"].items())[:3]) or "none"
        d = r["dice"]
        print(f"| {r['image']} | {d['lung_right']:.2f} | {d['lung_left']:.2f} | {d['both_lungs']:.2f} | "
              f"{r['lung_claimed_by_others_ml']:g} of {sum(r['reference_ml'].values())} | {top} |")
    for r in rows:
        print(f"\n{r['image']} ({r['seconds']} s): predicted volumes (ml): "
              + ", ".join(f"{k} {v:g}" for k, v in sorted(r["volumes_ml"].items(), key=lambda kv: -kv[1])))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
