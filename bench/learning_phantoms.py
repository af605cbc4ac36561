"""Learning benchmark (not a test): train ``lite-wide`` on partially labelled phantoms on the CPU, twice.

1. CDPDNet's partial-label loss (only annotated ROIs supervised);
2. the naive baseline: the same model and budget, unannotated ROIs treated as background.

Both are evaluated on fully labelled held-out phantoms (Dice per ROI); a Markdown table is printed
and written to ``--out``. Each virtual source's phantoms are rendered with its own scan protocol, and
held-out phantom i like source i, so that, as with real source datasets, an image tells which source
it resembles (``--no-scan-protocols``: every source rendered alike, the benchmark before 2026-12-05).
Usage::

    HF_HUB_OFFLINE=1 python bench/learning_phantoms.py --minutes 20 --out runs/bench-learning
    HF_HUB_OFFLINE=1 python bench/learning_phantoms.py --out runs/bench-learning --rescore  # no training:
        # score the models in --out again (after a post-processing change): report-rescored.md

The learning rate follows the ``budget`` schedule: warm-up, then cosine to 0 at the end of the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cdpdnet.phantoms import SOURCE_SETS  # noqa: E402 (the --sources choices; numpy and scipy, no torch)


def evaluate(model_path: str, samples, threshold: float | None = None, **infer) -> dict[str, list[float]]:
    import numpy as np

    from cdpdnet.imageio import load_image
    from cdpdnet.inference import Segmenter
    from cdpdnet.metrics import dice
    from cdpdnet.taxonomy import ROIS

    seg = Segmenter(model_path, threshold=threshold, **infer)
    per: dict[str, list[float]] = {r.name: [] for r in ROIS}
    times = []
    for s in samples:
        res = seg.segment(s.image)
        times.append(res.timings["total"])
        gt = np.asarray(load_image(s.label, "label")[0]).round().astype(np.uint8)
        for r in ROIS:
            per[r.name].append(dice(res.label == r.index, gt == r.index))
    per["_seconds_per_case"] = [float(np.mean(times))]
    return per


def _iterations(run: Path) -> int:
    """Iterations actually run (the last epoch is cut short by the budget), from the metrics log."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(x)["iterations"] for x in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-learning")
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per model")
    ap.add_argument("--per-source", type=int, default=48,
                    help="training phantoms per virtual source (default 48; 8 before 2026-11-30, see docs/benchmarks.md)")
    ap.add_argument("--heldout", type=int, default=5,
                    help="fully labelled held-out phantoms (default 5: with scan protocols, one scanned like each of "
                         "the 5 sources; 3 before 2026-12-05)")
    ap.add_argument("--sources", choices=sorted(SOURCE_SETS), default="phantom",
                    help="which ROIs each virtual source annotates, when this writes the phantoms: phantom (5 sources, "
                         "the default) or reference (the 16 sampling keys of the published training data)")
    ap.add_argument("--scan-protocols", action=argparse.BooleanOptionalAction, default=True,
                    help="when this writes the phantoms: each source rendered with its own scan protocol "
                         "(cdpdnet.phantoms.SCAN_PROTOCOLS), so an image tells which source it resembles, as real "
                         "source datasets do (the default since 2026-12-05; --no-scan-protocols renders every source "
                         "alike, as before; with --sources reference the 5 protocols cycle over the 16 sources, a "
                         "combination not measured yet)")
    ap.add_argument("--phantoms", metavar="DIR",
                    help="train and score on the phantom dataset already in DIR (an earlier run's OUT/phantoms, or "
                         "`python -m cdpdnet phantoms DIR`) instead of writing a new one; --per-source and --heldout "
                         "are then not used (the defaults write the same phantoms each time, which takes about 5 minutes)")
    ap.add_argument("--epochs", type=int, default=1000, help="upper bound; the time budget ends training first")
    ap.add_argument("--iterations", type=int, default=40, help="iterations per epoch (logging granularity)")
    ap.add_argument("--only", choices=["partial", "naive"], help="train just one of the two")
    ap.add_argument("--preset", default="lite-wide",
                    help="preset name or JSON file (default lite-wide, the CPU default; lite before 2026-11-30)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (initialisation, sampling, crops)")
    ap.add_argument("--rescore", action="store_true",
                    help="do not train: evaluate the models already in --out on its held-out phantoms again")
    ap.add_argument("--threshold", type=float, help="with --rescore: this threshold instead of the checkpoint preset's")
    ap.add_argument("--overlap", type=float,
                    help="with --rescore: this sliding-window overlap instead of the checkpoint preset's")
    ap.add_argument("--lesion-threshold", type=float,
                    help="with --rescore: this threshold for the lesion channels instead of the checkpoint preset's")
    ap.add_argument("--roi-thresholds", metavar="JSON",
                    help="with --rescore: a JSON file {ROI name: threshold} (e.g. from bench/choose_roi_thresholds.py) "
                         "instead of the checkpoint preset's infer.roi_thresholds")
    ap.add_argument("--lesion-mirror", choices=("off", "mean", "max"),
                    help="with --rescore: infer.lesion_mirror instead of the checkpoint preset's (a second, "
                         "left-right-mirrored pass for the lesion channels)")
    ap.add_argument("--lesion-mirror-rois", metavar="ROI,ROI",
                    help="with --lesion-mirror: only these lesion channels get the mirrored pass (default every lesion)")
    ap.add_argument("--subgrids", type=int, choices=(1, 2, 4, 8),
                    help="with --rescore: infer.subgrids instead of the checkpoint preset's (grids shifted by half a voxel, "
                         "their probabilities averaged)")
    ap.add_argument("--test-data", help="with --rescore: the test split of this dataset.json instead of --out's phantoms "
                                        "(e.g. fresh held-out phantoms: python -m cdpdnet phantoms DIR --per-source 0 "
                                        "--heldout 4 --seed 7)")
    a = ap.parse_args()

    from cdpdnet.data import load_datalist
    from cdpdnet.phantoms import write_phantom_dataset
    from cdpdnet.training import TrainConfig, Trainer

    out = Path(a.out)
    if a.rescore:
        if not (out / "results.json").is_file():
            raise SystemExit(f"--rescore: {out / 'results.json'} not found (train into --out first)")
        meta = json.loads((out / "results.json").read_text())["meta"]
        test_json = Path(a.test_data or out / "phantoms" / "dataset.json")
        dl = load_datalist(test_json)
        infer = {"lesion_threshold": a.lesion_threshold, "overlap": a.overlap, "lesion_mirror": a.lesion_mirror,
                 "lesion_mirror_rois": a.lesion_mirror_rois.split(",") if a.lesion_mirror_rois else None,
                 "subgrids": a.subgrids,
                 "roi_thresholds": json.loads(Path(a.roi_thresholds).read_text()) if a.roi_thresholds else None}
        results = {loss: evaluate(str(out / loss / "model.pt"), dl.test, a.threshold, **infer) for loss in meta
                   if a.only is None or loss == a.only}
        meta = {loss: meta[loss] for loss in results}
        tag = ("-rescored" + (f"-t{a.threshold:g}" if a.threshold else "")
               + (f"-lt{a.lesion_threshold:g}" if a.lesion_threshold else "")
               + (f"-ov{a.overlap:g}" if a.overlap is not None else "")
               + (f"-rt{Path(a.roi_thresholds).stem}" if a.roi_thresholds else "")
               + (f"-lm{a.lesion_mirror}" if a.lesion_mirror else "")
               + ("-" + a.lesion_mirror_rois.replace(",", "+") if a.lesion_mirror_rois else "")
               + (f"-sg{a.subgrids}" if a.subgrids else "")
               + ("-" + Path(a.test_data).parent.name if a.test_data else ""))
        _report(out, results, meta, _training_sources(load_datalist(out / "phantoms" / "dataset.json")),
                suffix=tag, scanned_like=_scanned_like(test_json))  # the training run's own report stays
        return
    if a.phantoms:
        data = Path(a.phantoms) / "dataset.json"
        if not data.is_file():
            raise SystemExit(f"--phantoms: {data} not found (a folder written by an earlier run or `cdpdnet phantoms`)")
        out.mkdir(parents=True, exist_ok=True)
        link = out / "phantoms"  # --rescore finds the held-out phantoms there
        if not link.exists():
            link.symlink_to(Path(a.phantoms).resolve(), target_is_directory=True)
        elif link.resolve() != Path(a.phantoms).resolve():
            raise SystemExit(f"--phantoms: {link} already holds other phantoms; --rescore would score on those. "
                             "Use a new --out.")
    else:
        data = write_phantom_dataset(out / "phantoms", n_per_source=a.per_source, n_heldout=a.heldout, spacing=(3, 3, 3),
                                     sources=a.sources, scan_protocols=a.scan_protocols)
    dl = load_datalist(data)
    results, meta = {}, {}
    for loss in (["partial", "naive"] if a.only is None else [a.only]):
        t0 = time.time()
        cfg = TrainConfig(out_dir=str(out / loss), epochs=a.epochs, iterations_per_epoch=a.iterations, loss=loss,
                          max_minutes=a.minutes, progress=False, seed=a.seed, lr=a.lr, schedule="budget")
        summary = Trainer(dl.training, a.preset, cfg, sources=_training_sources(dl)).run()
        meta[loss] = {"train_seconds": time.time() - t0, "epochs_done": summary["epochs_done"],
                      "iterations": _iterations(out / loss), "last_loss": summary["last_loss"]}
        results[loss] = evaluate(summary["model"], dl.test)
        print(loss, json.dumps(meta[loss]), flush=True)
    _report(out, results, meta, _training_sources(dl), scanned_like=_scanned_like(data))


def _training_sources(dl) -> dict[str, tuple[int, ...]]:
    """The virtual sources of a phantom dataset that annotate its training cases: ``{name: ROI label values}``."""
    from cdpdnet.phantoms import FULL_SOURCE

    return {k: v for k, v in dl.sources.items() if k != FULL_SOURCE}


def _scanned_like(dataset_json: Path) -> list[str | None]:
    """For each held-out case, the source whose scan protocol rendered it (``--scan-protocols``), else None."""
    return [c.get("scanned_like") for c in json.loads(Path(dataset_json).read_text()).get("test", [])]


def _report(out: Path, results: dict, meta: dict, sources: dict[str, tuple[int, ...]], suffix: str = "",
            scanned_like: list[str | None] | None = None) -> None:
    import numpy as np

    from cdpdnet.taxonomy import ROIS

    # how many of the training data's sources annotate each ROI (1: what most sites leave unlabelled)
    n_sources = {r.name: sum(r.index in v for v in sources.values()) for r in ROIS}
    cols = list(results)
    lines = ["| ROI | sources labelling it | " + " | ".join(f"Dice {c}" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    means = {c: [] for c in cols}
    for r in ROIS:
        vals = []
        for c in cols:
            v = float(np.nanmean(results[c][r.name]))
            means[c].append(v)
            vals.append(f"{v:.3f}")
        lines.append(f"| {r.name} | {n_sources[r.name]} | " + " | ".join(vals) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{np.nanmean(means[c]):.3f}**" for c in cols) + " |")
    lines.append("| min | | " + " | ".join(f"{np.nanmin(means[c]):.3f}" for c in cols) + " |")
    # the goal per model: ROIs at 0.70 or more, and the ROIs one source labels against the others
    lines.append("| ROIs >= 0.70 | | " + " | ".join(f"{sum(v >= 0.7 for v in means[c])}" for c in cols) + " |")
    one = [n_sources[r.name] == 1 for r in ROIS]
    for label, keep in ((f"mean, the {sum(one)} ROIs one source labels", True),
                        (f"mean, the {len(one) - sum(one)} others", False)):
        lines.append(f"| {label} | | " + " | ".join(
            f"{np.nanmean([v for v, o in zip(means[c], one) if o == keep]):.3f}" for c in cols) + " |")
    # phantoms scanned like one source each: the ROIs that source labels against those it leaves unlabelled, which a
    # model that learnt to tell the sources apart may have learnt to leave out
    like = scanned_like or []
    n_cases = len(results[cols[0]][ROIS[0].name])
    if any(like) and len(like) == n_cases and all(s in sources for s in like):
        for label, keep in (("mean over each case, the ROIs the source it is scanned like labels", True),
                            ("mean over each case, the ROIs that source leaves unlabelled", False)):
            vals = {c: [results[c][r.name][i] for i in range(n_cases) for r in ROIS
                        if (r.index in sources[like[i]]) == keep] for c in cols}
            lines.append(f"| {label} | | " + " | ".join(f"{np.nanmean(vals[c]):.3f}" for c in cols) + " |")
    table = "\n".join(lines)
    info = "\n".join(f"- {c}: {meta[c]['iterations']} iterations ({meta[c]['epochs_done']} epochs) in "
                     f"{meta[c]['train_seconds'] / 60:.1f} min; inference {results[c]['_seconds_per_case'][0]:.1f} s "
                     f"per held-out phantom" for c in cols)
    report = f"{table}\n\n{info}\n"
    print(report)
    (out / f"report{suffix}.md").write_text(report)
    (out / f"results{suffix}.json").write_text(json.dumps({"results": results, "meta": meta}, indent=2, default=float))


if __name__ == "__main__":
    main()
