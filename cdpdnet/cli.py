"""``python -m cdpdnet``: train, segment and evaluate CDPDNet from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EPILOG = """\
examples:
  python -m cdpdnet phantoms data/phantoms                      # synthetic partially labelled CTs
  python -m cdpdnet train --data data/phantoms/dataset.json --preset lite-wide --out runs/lite-wide
  python -m cdpdnet infer --model runs/lite-wide/model.pt --input ct.nii.gz --output ct_seg.nii.gz
  python -m cdpdnet infer --model runs/lite-wide/model.pt --input ct.nii.gz --output seg.nii.gz --rois liver,"liver tumour"
  python -m cdpdnet evaluate --model runs/lite-wide/model.pt --data data/phantoms/dataset.json --split test
  python -m cdpdnet map-labels "Kidney_R" "IVC" "gall bladder" --embed
  python -m cdpdnet presets
"""


def _csv(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_phantoms(a) -> int:
    from .phantoms import write_phantom_dataset

    path = write_phantom_dataset(a.out, n_per_source=a.per_source, n_heldout=a.heldout,
                                 spacing=(a.spacing,) * 3, seed=a.seed, sources=a.sources,
                                 scan_protocols=a.scan_protocols)
    print(f"wrote {path}")
    return 0


def cmd_train(a) -> int:
    from .data import load_datalist
    from .training import TrainConfig, Trainer

    dl = load_datalist(a.data)
    print(dl.report())
    cfg = TrainConfig(out_dir=a.out, epochs=a.epochs, iterations_per_epoch=a.iterations, lr=a.lr, device=a.device,
                      seed=a.seed, loss=a.loss, text_encoder=a.text_encoder, init_checkpoint=a.init, resume=a.resume,
                      max_minutes=a.max_minutes, val_every=a.val_every, threads=a.threads, schedule=a.schedule)
    validation = dl.validation if a.val_every else []
    summary = Trainer(dl.training, a.preset, cfg, validation=validation, sources=dl.sources).run()
    print(json.dumps(summary, indent=2))
    return 0


def _roi_thresholds(items: list[str] | None) -> dict[str, float]:
    """``["celiac_trunk=0.25", ...]`` -> ``{"celiac_trunk": 0.25}`` (empty when not given)."""
    out = {}
    for item in items or ():
        name, _, value = item.rpartition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = None
        if not name.strip() or threshold is None:
            raise ValueError(f"--roi-threshold takes NAME=VALUE (e.g. celiac_trunk=0.25), got {item!r}")
        out[name.strip()] = threshold
    return out


def infer_roi_thresholds(preset_map: dict | None, items: list[str] | None, keep_preset: bool = True) -> dict[int, float]:
    """The per-ROI thresholds of ``cdpdnet infer``: the preset's ``infer.roi_thresholds`` (unless
    ``keep_preset`` is false), each ``--roi-threshold NAME=VALUE`` set over it. Keys are label values, so
    that a synonym on the command line replaces the preset's entry for the same ROI."""
    from .taxonomy import roi

    merged = {roi(k).index: float(t) for k, t in dict(preset_map or {}).items()} if keep_preset else {}
    merged.update({roi(k).index: t for k, t in _roi_thresholds(items).items()})
    return merged


def cmd_infer(a) -> int:
    from .factory import model_from_checkpoint
    from .inference import Segmenter

    loaded = model_from_checkpoint(a.model, a.device)
    per_roi = infer_roi_thresholds(loaded.preset.infer.get("roi_thresholds"), a.roi_threshold, not a.no_roi_thresholds)
    seg = Segmenter(loaded, device=a.device, overlap=a.overlap, threshold=a.threshold,
                    lesion_threshold=a.lesion_threshold, roi_thresholds=per_roi, postprocess=not a.no_postprocess,
                    lesion_mirror=a.lesion_mirror, subgrids=a.subgrids)
    inputs = [Path(p) for p in a.input]
    out = Path(a.output)
    if len(inputs) > 1 and out.suffix:
        raise SystemExit("--output must be a folder when several inputs are given")
    for p in inputs:
        target = out if out.suffix else out / (p.name.split(".")[0] + "_seg.nii.gz")
        res = seg.segment(p, rois=_csv(a.rois), task=a.task, output=target)
        times = " ".join(f"{k}={v:.2f}s" for k, v in res.timings.items())
        print(f"{p} -> {target}: {len(res.present())} ROIs present; {times}")
    return 0


def cmd_evaluate(a) -> int:
    import numpy as np

    from .data import load_datalist
    from .imageio import load_image
    from .metrics import evaluate_case, render_markdown, summarise

    dl = load_datalist(a.data)
    samples = getattr(dl, a.split)
    if not samples:
        raise SystemExit(f"the datalist has no '{a.split}' cases")
    seg = None
    if a.model:
        from .inference import Segmenter

        seg = Segmenter(a.model, device=a.device)
    records = []
    for s in samples:
        gt_img = load_image(s.label, "label")
        gt = np.asarray(gt_img[0]).round().astype(np.uint8)
        if seg is not None:
            pred = seg.segment(s.image, rois=list(s.annotated)).label
        else:
            pred_path = Path(a.pred) / (Path(s.image).name.split(".")[0] + "_seg.nii.gz")
            pred = np.asarray(load_image(pred_path, "prediction")[0]).round().astype(np.uint8)
        spacing = np.sqrt((np.asarray(gt_img.affine)[:3, :3] ** 2).sum(0))
        records.append({"case": s.name, "dataset": s.source,
                        "results": evaluate_case(pred, gt, spacing, list(s.annotated))})
        print(f"{s.name}: done", file=sys.stderr)
    summary = summarise(records)
    md = render_markdown(summary)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out).with_suffix(".json").write_text(json.dumps(summary, indent=2, default=float))
    return 0


def cmd_map_labels(a) -> int:
    from .taxonomy import map_label_names

    names = {i + 1: n for i, n in enumerate(a.names)}
    embed = None
    if a.embed:
        from .text import build_text_encoder

        embed = build_text_encoder("minilm").encode
    print(map_label_names(names, embed=embed).report())
    return 0


def cmd_presets(a) -> int:
    from .factory import build_network
    from .preset import available_presets, load_preset

    for name in available_presets():
        p = load_preset(name)
        n = sum(x.numel() for x in build_network(p).parameters())
        print(f"{name:6s} {n / 1e6:7.2f}M trainable  patch {p.patch_size} at {p.preprocess['spacing']} mm  "
              f"DINO {p.dino['weights']}  text {p.text['encoder']}\n       {p.description}")
    return 0


def cmd_info(a) -> int:
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(a.model)
    info = {k: ck.get(k) for k in ("saved_at", "model_version", "epoch", "metrics")}
    info["preset"] = ck["preset"]["name"]
    info["tasks"] = [t["name"] for t in ck["tasks"]]
    info["text_encoder"] = ck.get("text", {}).get("encoder")
    print(json.dumps(info, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cdpdnet", description=(
        "CDPDNet: text-guided segmentation of 32 abdominal organs and tumours in CT, trained on partially "
        "labelled datasets. Checkpoints are self-contained (.pt): they carry the preset, text embeddings and DINO."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantoms", help="write synthetic partially labelled CT phantoms (MSD-style dataset.json)")
    s.add_argument("out", help="output folder")
    s.add_argument("--per-source", type=int, default=4, help="training cases per virtual source dataset (default 4)")
    s.add_argument("--heldout", type=int, default=3, help="fully labelled held-out cases (default 3)")
    s.add_argument("--spacing", type=float, default=3.0, help="isotropic voxel size in mm (default 3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sources", choices=("phantom", "reference"), default="phantom",
                   help="which ROIs each virtual source annotates: phantom (5 sources, the default) or reference "
                        "(16, one per sampling key of the published CDPDNet training data; 17 ROIs annotated by one)")
    s.add_argument("--scan-protocols", action="store_true",
                   help="render each source with its own scan protocol (noise, blur, contrast), as real datasets "
                        "differ, and each held-out case like one source in turn; default: every case alike")
    s.set_defaults(func=cmd_phantoms)

    s = sub.add_parser("train", help="train or fine-tune on a (partially labelled) datalist")
    s.add_argument("--data", required=True, help="dataset.json (ours or Medical Segmentation Decathlon) or a folder")
    s.add_argument("--preset", default="lite-wide", help="lite-wide (CPU, the default), lite (CPU, the first one), paper (GPU), tiny (tests) or a preset JSON")
    s.add_argument("--out", required=True, help="run folder: last.pt (resumable), model.pt, metrics.jsonl")
    s.add_argument("--epochs", type=int, help="default: the preset's")
    s.add_argument("--iterations", type=int, help="iterations per epoch (default: the preset's)")
    s.add_argument("--lr", type=float)
    s.add_argument("--init", help="fine-tune from this checkpoint")
    s.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    s.add_argument("--loss", choices=["partial", "naive"], default="partial",
                   help="partial: only annotated ROIs are supervised (CDPDNet); naive: unannotated = background")
    s.add_argument("--text-encoder", help="minilm (default offline), clip:/path.pt, precomputed:/file.pt")
    s.add_argument("--max-minutes", type=float, help="stop cleanly after this much training time")
    s.add_argument("--schedule", choices=["reference", "finetune", "budget"], default="reference",
                   help="learning-rate schedule: the published warm-up + cosine over the epochs (reference), "
                        "cosine with a 10%% floor (finetune), or warm-up + cosine over --max-minutes (budget)")
    s.add_argument("--val-every", type=int, default=0, help="validate every N epochs on the validation split")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (multi-GPU: run under torchrun)")
    s.add_argument("--threads", type=int, help="CPU threads")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("infer", help="segment CT volumes (NIfTI, NRRD, DICOM folder) into label maps")
    s.add_argument("--model", required=True, help="checkpoint .pt")
    s.add_argument("--input", required=True, nargs="+", help="image file(s) or DICOM folder(s)")
    s.add_argument("--output", required=True, help="output file (one input) or folder")
    s.add_argument("--rois", help="comma-separated ROI names/synonyms/values (default: all 32)")
    s.add_argument("--task", help="source dataset whose task prompt to use (default: mean prompt)")
    s.add_argument("--overlap", type=float, help="sliding-window overlap (default: the preset's)")
    s.add_argument("--threshold", type=float, help="sigmoid threshold (default: the preset's, 0.5 if it has none)")
    s.add_argument("--lesion-threshold", type=float,
                   help="sigmoid threshold of the tumour and cyst channels (default: the preset's, else --threshold)")
    s.add_argument("--roi-threshold", action="append", metavar="NAME=VALUE",
                   help="threshold of one ROI, above the two others (repeatable); set over the preset's "
                        "infer.roi_thresholds, whose other entries stay")
    s.add_argument("--no-roi-thresholds", action="store_true",
                   help="ignore the preset's infer.roi_thresholds (only --roi-threshold entries apply)")
    s.add_argument("--lesion-mirror", choices=("off", "mean", "max"),
                   help="a second pass on the volume mirrored left-right for the preset's infer.lesion_mirror_rois "
                        "(lite-wide: the lung tumour, 'max'); 'off' saves that pass (default: the preset's)")
    s.add_argument("--subgrids", type=int, choices=(1, 2, 4, 8),
                   help="read the volume on this many model grids, shifted by half a voxel, and average their "
                        "probabilities: finer borders for that many times the network time (default: the preset's)")
    s.add_argument("--no-postprocess", action="store_true", help="skip connected-component post-processing")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("evaluate", help="Dice, HD95 (mm) and NSD per ROI and source dataset")
    s.add_argument("--data", required=True, help="dataset.json with labels")
    s.add_argument("--split", default="test", choices=["training", "validation", "test"])
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="run this checkpoint on the split")
    g.add_argument("--pred", help="folder of predictions named <image>_seg.nii.gz")
    s.add_argument("--out", help="write the Markdown report here (and .json beside it)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("map-labels", help="map foreign label names onto the 32 ROIs")
    s.add_argument("names", nargs="+")
    s.add_argument("--embed", action="store_true", help="also use MiniLM text similarity for what synonyms miss")
    s.set_defaults(func=cmd_map_labels)

    s = sub.add_parser("presets", help="list the presets with their parameter counts")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("info", help="show what a checkpoint holds")
    s.add_argument("--model", required=True)
    s.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .imageio import InvalidImageError
    from .taxonomy import UnknownROIError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CheckpointError, InvalidImageError, UnknownROIError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
