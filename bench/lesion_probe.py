"""Why a model misses lesions (not a test): per lesion ROI, on the model's own grid.

For each case of a dataset split: the lesion's voxels on the model grid, the channel's highest
probability inside the lesion and outside it, the Dice at the checkpoint's threshold there (before
post-processing and resampling) and the Dice of the final label map (what a user gets). A channel
whose highest probability inside its lesions stays near 0 has not learned to detect them; one that
fires but scores low on the final map loses them later (threshold, post-processing, overlaps). The
network runs twice per case (once for the probabilities, once on the full inference path for the
final map): a diagnostic, about 3 s per phantom. Usage::

    python bench/lesion_probe.py runs/bench-learning/partial/model.pt runs/bench-learning/phantoms/dataset.json
    python bench/lesion_probe.py MODEL DATASET --split training --source phantom_pelvis_chest  # cases it trained on
    python bench/lesion_probe.py MODEL DATASET --rois adrenal_gland_right  # any ROI, organs too
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--split", choices=["test", "training"], default="test")
    ap.add_argument("--source", help="only the cases of this source dataset")
    ap.add_argument("--rois", nargs="+", metavar="NAME",
                    help="these ROIs (names or synonyms; organs too) instead of the annotated lesions")
    a = ap.parse_args()

    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from cdpdnet.data import load_datalist
    from cdpdnet.imageio import load_image
    from cdpdnet.inference import Segmenter
    from cdpdnet.metrics import dice
    from cdpdnet.taxonomy import ROIS, roi

    seg = Segmenter(a.model)
    dl = load_datalist(a.dataset)
    cases = [s for s in getattr(dl, a.split) if a.source is None or s.source == a.source]
    chosen = {roi(n).index for n in a.rois} if a.rois else None
    print("| case | ROI | voxels (model grid) | max p inside | max p outside | Dice model grid | Dice final |")
    print("|---|---|---|---|---|---|---|")
    for s in cases:
        x = seg.preprocess({"image": load_image(s.image)})["image"]
        prob = torch.sigmoid(seg.predict_logits(x[None], list(range(1, 33)))[0]).numpy()
        gt = load_image(s.label, "label")
        on_grid = SpatialResample(mode="nearest")(MetaTensor(torch.as_tensor(np.asarray(gt)).float(), affine=gt.affine),
                                                  dst_affine=x.affine, spatial_size=x.shape[1:])[0].numpy().round()
        final = seg.segment(s.image).label
        full = np.asarray(gt[0]).round()
        for r in ROIS:
            m = on_grid == r.index
            wanted = r.index in chosen if chosen else r.is_lesion
            if not wanted or r.index not in s.annotated or not m.any():
                continue
            p = prob[r.index - 1]
            t = seg.threshold_of(r.index)
            print(f"| {os.path.basename(s.image).split('.')[0]} | {r.name} | {int(m.sum())} | {p[m].max():.2f} | "
                  f"{p[~m].max():.2f} | {dice(p > t, m):.2f} | {dice(final == r.index, full == r.index):.2f} |")


if __name__ == "__main__":
    main()
