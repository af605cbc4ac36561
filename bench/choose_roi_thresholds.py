"""Choose a sigmoid threshold per ROI from rescored benchmark runs (for ``infer.roi_thresholds``).

Each run folder must hold ``results-rescored-t{T}{SUFFIX}.json`` for every threshold ``T`` of the grid
(``bench/learning_phantoms.py --out RUN --rescore --threshold T [--test-data ...]``). With several
``--suffix`` values, each run on each test set is one case. For each ROI the threshold with the highest
Dice, averaged over the cases, replaces the default only when it gains at least ``--min-gain`` on that
average and does not lose on any case by more than ``--max-loss``, so that a threshold is chosen for what
several models share, not for one model's accident. Choose on one set of runs and test cases, then check
the result on others (``--roi-thresholds`` of ``bench/learning_phantoms.py --rescore``).

    python bench/choose_roi_thresholds.py runs/bench-ps24-s0 runs/bench-ps24-s1 runs/bench-ps24-s2 \\
        --grid 0.2 0.25 0.3 0.4 0.5 0.6 --default 0.4 --out bench/roi-thresholds.json
    python bench/choose_roi_thresholds.py runs/bench-fast-s0 runs/bench-fast-s1 runs/bench-fast-s4 \\
        --grid 0.2 0.25 0.3 0.35 0.4 0.5 --suffix=-rtEMPTY-phantoms-val --suffix=-rtEMPTY-phantoms-val2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def per_run_dice(run: Path, threshold: float, suffix: str, loss: str) -> dict[str, float]:
    """``{ROI name: mean Dice over the run's test cases}`` at one rescored threshold."""
    f = run / f"results-rescored-t{threshold:g}{suffix}.json"
    if not f.is_file():
        raise SystemExit(f"{f} not found: run bench/learning_phantoms.py --out {run} --rescore --threshold {threshold:g}")
    res = json.loads(f.read_text())["results"][loss]
    return {k: float(np.nanmean(v)) for k, v in res.items() if not k.startswith("_")}


def choose(table: dict[float, list[dict[str, float]]], default: float, min_gain: float,
           max_loss: float) -> tuple[dict[str, float], list[tuple]]:
    """``table[threshold][case][roi]`` (a case: one run on one test set) -> (``{roi: threshold}`` for the ROIs
    that move, rows for a report)."""
    names = list(table[default][0])
    chosen, rows = {}, []
    for name in names:
        base = np.array([r[name] for r in table[default]])
        best_t, best_gain = default, 0.0
        for t, runs in sorted(table.items()):
            d = np.array([r[name] for r in runs]) - base
            if np.isnan(d).any():
                continue
            if d.mean() >= min_gain and d.min() >= -max_loss and d.mean() > best_gain:
                best_t, best_gain = t, float(d.mean())
        if best_t != default:
            chosen[name] = best_t
        rows.append((name, float(np.nanmean(base)), best_t, best_gain))
    return chosen, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="benchmark run folders (bench/learning_phantoms.py --out)")
    ap.add_argument("--grid", type=float, nargs="+", required=True, help="the rescored thresholds to choose from")
    ap.add_argument("--default", type=float, default=0.4, help="the preset's threshold (must be in the grid)")
    ap.add_argument("--suffix", action="append", default=None,
                    help="test-set suffix of the result files, e.g. --suffix=-phantoms-val (repeatable: each run "
                         "on each set is one case; default: the run's own held-out set)")
    ap.add_argument("--loss", default="partial")
    ap.add_argument("--min-gain", type=float, default=0.01, help="mean Dice gain needed to move an ROI")
    ap.add_argument("--max-loss", type=float, default=0.02, help="largest Dice loss allowed on any one case")
    ap.add_argument("--out", help="write {ROI: threshold} here (JSON)")
    a = ap.parse_args()
    if a.default not in a.grid:
        raise SystemExit(f"--default {a.default} is not in --grid {a.grid}")
    runs = [Path(r) for r in a.runs]
    suffixes = a.suffix or [""]
    table = {t: [per_run_dice(r, t, sfx, a.loss) for r in runs for sfx in suffixes] for t in a.grid}
    chosen, rows = choose(table, a.default, a.min_gain, a.max_loss)
    print("| ROI | Dice at the default | chosen threshold | mean gain |\n|---|---|---|---|")
    for name, base, t, gain in rows:
        if name in chosen:
            print(f"| {name} | {base:.3f} | {t:g} | +{gain:.3f} |")
    print(f"\n{len(chosen)} of {len(rows)} ROIs move from {a.default:g}")
    if a.out:
        Path(a.out).write_text(json.dumps(chosen, indent=1) + "\n")
        print("written", a.out)


if __name__ == "__main__":
    main()
