"""The Dice a perfect model could reach at a coarser spacing (not a test; no model involved).

Each ROI of the fully labelled held-out phantoms is averaged down to the model's grid (the fraction
of each coarse voxel it covers: a perfect probability map), resampled back trilinearly onto the
label's grid, thresholded at 0.5 (or each ``--threshold``) and scored against the label. This is the ceiling that the
resolution alone puts on the learning benchmark, whatever the network learns. Usage::

    python bench/resolution_ceiling.py runs/bench-learning/phantoms/dataset.json --spacing 6 [--threshold 0.5 0.3]

``--roi NAME`` adds that ROI's ceiling to each line (e.g. a thin vessel at a lower threshold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a phantom dataset.json (its test split is scored)")
    ap.add_argument("--spacing", type=float, nargs="+", default=[6.0], help="model spacings in mm to try")
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.5], help="thresholds to try (default 0.5)")
    ap.add_argument("--roi", action="append", default=[], help="also print this ROI's ceiling (repeatable)")
    a = ap.parse_args()

    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cdpdnet.metrics import dice
    from cdpdnet.taxonomy import ROIS, roi

    root = Path(a.dataset).parent
    test = json.loads(Path(a.dataset).read_text())["test"]
    labels = [nib.load(root / t["label"]) for t in test]
    for name in a.roi:
        roi(name)  # an unknown name fails here, before the work
    for spacing, threshold in ((s, t) for s in a.spacing for t in a.threshold):
        per = {r.name: [] for r in ROIS}
        for img in labels:
            lab = np.asarray(img.dataobj).astype(np.int64)
            size = [max(1, round(n * s / spacing)) for n, s in zip(lab.shape, img.header.get_zooms()[:3])]
            for r in ROIS:
                m = torch.from_numpy(lab == r.index).float()[None, None]
                if m.sum() == 0:
                    continue
                coarse = F.interpolate(m, size=size, mode="area")
                back = F.interpolate(coarse, size=lab.shape, mode="trilinear", align_corners=False)
                per[r.name].append(dice(back[0, 0].numpy() > threshold, lab == r.index))
        mean = {k: float(np.mean(v)) for k, v in per.items() if v}
        organs = [v for k, v in mean.items() if not roi(k).is_lesion]
        lesions = [v for k, v in mean.items() if roi(k).is_lesion]
        low = ", ".join(f"{k} {v:.2f}" for k, v in sorted(mean.items(), key=lambda kv: kv[1])[:5])
        extra = "".join(f"; {roi(n).name} {mean[roi(n).name]:.2f}" for n in a.roi)
        print(f"{spacing:g} mm, threshold {threshold:g}: mean {np.mean(list(mean.values())):.3f}, organs {np.mean(organs):.3f}, "
              f"lesions {np.mean(lesions):.3f}, ROIs >= 0.70: {sum(v >= 0.7 for v in mean.values())}/{len(mean)}; "
              f"lowest: {low}{extra}")


if __name__ == "__main__":
    main()
