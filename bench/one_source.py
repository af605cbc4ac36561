"""Can one ROI be learned from its own source, and what stops it? (not a test)

Trains a preset for a few minutes on the cases of ONE source dataset of a phantom dataset (or any
``dataset.json`` with sources), with that source's annotations as they are, with some ROIs taken out
of them (``--drop``), or with only some kept (``--keep``), then reports, on the dataset's held-out
cases, the logit of ``--roi``'s channel inside the ROI and inside its host organs around it (the
lung around a lung nodule), and the channels that score highest inside the ROI. A channel whose
logit inside the ROI stays below the one in its host has not learned to tell the two apart.

This is how the lung tumour was found to be starved by the other pairs of its samples rather than
by its crops (docs/benchmarks.md, 2026-11-30, night)::

    HF_HUB_OFFLINE=1 python bench/one_source.py DATASET --roi lung_tumor --keep lung_tumor --out runs/os-alone
    HF_HUB_OFFLINE=1 python bench/one_source.py DATASET --roi lung_tumor --out runs/os-all
    HF_HUB_OFFLINE=1 python bench/one_source.py DATASET --roi lung_tumor --drop lung_right lung_left --out runs/os-nolungs
    HF_HUB_OFFLINE=1 python bench/one_source.py DATASET --roi lung_tumor --preset bench/presets/lite-wide-ltw10.json --out runs/os-w10

``DATASET`` e.g. ``runs/bench-learning/phantoms/dataset.json``; ``--source`` defaults to the first
source that annotates ``--roi``. The held-out cases (DATASET's test split, or ``--test-data``'s) must
be fully labelled (the phantoms' are).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a dataset.json with sources and a fully labelled test split")
    ap.add_argument("--roi", required=True, help="the ROI to report on (a name or synonym)")
    ap.add_argument("--source", help="the source dataset to train on (default: the first that annotates --roi)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--drop", nargs="+", default=[], metavar="ROI", help="take these ROIs out of the annotations")
    group.add_argument("--keep", nargs="+", metavar="ROI", help="annotate only these ROIs")
    ap.add_argument("--preset", default="lite-wide")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=3, help="held-out cases to report on")
    ap.add_argument("--test-data", help="report on the test split of this dataset.json instead (e.g. fresh phantoms)")
    ap.add_argument("--out", required=True, help="training output folder")
    a = ap.parse_args()

    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from cdpdnet.data import load_datalist
    from cdpdnet.inference import Segmenter
    from cdpdnet.preprocessing import preprocess_transforms
    from cdpdnet.taxonomy import ROIS, UnknownROIError, roi
    from cdpdnet.training import TrainConfig, Trainer

    try:
        target = roi(a.roi)
        named = [roi(n).index for n in (a.keep or a.drop)]
    except UnknownROIError as e:
        raise SystemExit(str(e)) from None
    dl = load_datalist(a.dataset)
    source = a.source or next((s for s, v in dl.sources.items() if target.index in v), None)
    if source is None or source not in dl.sources:
        raise SystemExit(f"no source of {a.dataset} annotates {target.name} (sources: {', '.join(dl.sources)})")
    samples = [s for s in dl.training if s.source == source]
    annotated = tuple(dl.sources[source])
    foreign = [ROIS[v - 1].name for v in named if v not in annotated]
    if foreign:
        raise SystemExit(f"{source} does not annotate {', '.join(foreign)}")
    if a.keep:
        annotated = tuple(named)
    elif a.drop:
        annotated = tuple(v for v in annotated if v not in set(named))
    samples = [dataclasses.replace(s, annotated=annotated) for s in samples]
    print(f"training {a.preset} for {a.minutes:g} min on {len(samples)} cases of {source}, annotated: "
          + ", ".join(ROIS[v - 1].name for v in annotated), flush=True)
    cfg = TrainConfig(out_dir=a.out, epochs=1000, iterations_per_epoch=20, max_minutes=a.minutes, progress=False,
                      seed=a.seed, schedule="budget")
    model = Trainer(samples, a.preset, cfg, sources={source: list(annotated)}).run()["model"]

    seg = Segmenter(model, roi_thresholds={}, postprocess=False)
    load = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                    preprocess_transforms(seg.preset.preprocess, keys=("image",), label_keys=("label",))])
    c = target.index - 1
    hosts = [roi(h).index for h in target.hosts]
    test = load_datalist(a.test_data).test if a.test_data else dl.test
    for case in test[: a.cases]:
        x = load({"image": case.image, "label": case.label})
        lab = np.asarray(x["label"][0]).astype(int)
        inside = lab == target.index
        if not inside.any():
            print(f"{case.image}: no {target.name} voxels on the model grid")
            continue
        logits = seg.predict_logits(x["image"][None], list(range(1, len(ROIS) + 1)))[0].numpy()
        at = logits[:, inside].mean(1)
        top = ", ".join(f"{ROIS[k].name} {at[k]:+.1f}" for k in np.argsort(-at)[:4])
        line = f"{case.image}: {int(inside.sum())} voxels; {target.name} logit inside {at[c]:+.2f} (max {logits[c][inside].max():+.2f})"
        if hosts:
            host = np.isin(lab, hosts)
            line += f", in its host organs {logits[c][host].mean():+.2f} (max {logits[c][host].max():+.2f})"
        print(line + f"; highest inside: {top}", flush=True)


if __name__ == "__main__":
    main()
