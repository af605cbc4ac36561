"""Per-ROI Dice of one benchmark model pooled over several held-out phantom sets.

``bench/learning_phantoms.py`` scores its own 3 held-out phantoms (``results.json``) and, with
``--rescore --test-data D``, other sets (``results-rescored-<tag><set>.json``). With three phantoms a
single faint structure decides an ROI's mean; pooled over every set scored, each ROI's Dice is the
mean over all held-out phantoms that contain it (11 with the two fresh sets of docs/benchmarks.md).

    python bench/pool_heldout.py runs/bench-s0 runs/bench-s1 --sets phantoms-val phantoms-val2
    python bench/pool_heldout.py runs/bench-s0 --sets phantoms-val phantoms-val2 --tag rthv03-

``--tag`` picks the rescoring (``rthv03-`` for ``--roi-thresholds hv03.json``: the own set's file is
then ``results-rescored-rthv03.json``); without it, the files scored with the checkpoint's thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def result_files(run: Path, sets: list[str], tag: str = "") -> list[Path]:
    """The own set's results file and one per rescored set, for the rescoring ``tag``."""
    own = run / (f"results-rescored-{tag.rstrip('-')}.json" if tag else "results.json")
    return [own] + [run / f"results-rescored-{tag}{s}.json" for s in sets]


def pooled_dice(files: list[Path], loss: str = "partial") -> tuple[dict[str, float], int]:
    """``({ROI: mean Dice over every phantom of every file that contains it}, phantom count)``."""
    pool: dict[str, list[float]] = {}
    for f in files:
        res = json.loads(f.read_text())["results"][loss]
        for name, values in res.items():
            if not name.startswith("_"):
                pool.setdefault(name, []).extend(float(v) for v in values)
    if not pool:
        raise ValueError(f"no per-ROI results under {loss!r} in {', '.join(map(str, files))}")
    return {k: float(np.nanmean(v)) for k, v in pool.items()}, max(len(v) for v in pool.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="benchmark run folders (bench/learning_phantoms.py --out)")
    ap.add_argument("--sets", nargs="*", default=[], help="rescored set names (the --test-data folder names)")
    ap.add_argument("--tag", default="", help="rescoring tag before the set name, e.g. rthv03-")
    ap.add_argument("--loss", default="partial", help="which model of the run (partial or naive)")
    ap.add_argument("--goal", type=float, default=0.70, help="the per-ROI floor to count against (0.70)")
    a = ap.parse_args(argv)
    for run in a.runs:
        files = result_files(run, a.sets, a.tag)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            print(f"error: {', '.join(missing)} not found (run bench/learning_phantoms.py --out {run} --rescore ...)",
                  file=sys.stderr)
            return 2
        means, n = pooled_dice(files, a.loss)
        low = sorted((m, k) for k, m in means.items())[:3]
        print(f"{run.name}: {n} phantoms, mean Dice {np.mean(list(means.values())):.3f}, "
              f"ROIs >= {a.goal:.2f}: {sum(m >= a.goal for m in means.values())}/{len(means)}, lowest "
              + ", ".join(f"{k} {m:.3f}" for m, k in low))
    return 0


if __name__ == "__main__":
    sys.exit(main())
