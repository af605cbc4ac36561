#!/usr/bin/env python
"""Make the demo model: train the ``lite-wide`` preset on the demo datalist (real CTs + phantoms) on the CPU.

The result is cached outside git (``${CDPDNET_CACHE:-~/.cache/cdpdnet}/models/``) under a key made
of the datalist, the resolved preset less its inference settings, and the training code, so a second
run reuses it at once. The preset's ``infer`` section (thresholds, overlap) does not change what is
trained: a cached model whose stored ``infer`` differs from the preset's gets the preset's, without
training again. ``--install PATH``
copies it (atomically) to where the app looks for a pretrained model. Training time is set by
``--minutes`` (default 20 on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def cache_key(datalist: Path, preset: str, minutes: float) -> str:
    """The datalist, the resolved preset (without its description and its ``infer`` section: a changed
    description, inference setting or another preset's edit does not retrain) and the code that training
    runs."""
    import json

    from cdpdnet.preset import load_preset

    settings = load_preset(preset).to_dict()
    settings.pop("description")
    settings.pop("infer", None)
    h = hashlib.sha256()
    h.update(datalist.read_bytes())
    h.update(f"{minutes}|{json.dumps(settings, sort_keys=True)}".encode())
    for sub in ("networks", "training.py", "data", "loss.py", "phantoms.py"):
        p = REPO / "cdpdnet" / sub
        for f in sorted(p.rglob("*.py") if p.is_dir() else [p]):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def refresh_inference_settings(model: Path, preset: str) -> bool:
    """Give the checkpoint ``model`` the preset's current ``infer`` section and description (atomically);
    True if they differed. Training did not depend on either (see :func:`cache_key`)."""
    from cdpdnet.checkpoint import load_checkpoint, save_checkpoint
    from cdpdnet.preset import load_preset

    now = load_preset(preset).to_dict()
    ckpt = load_checkpoint(model)
    stored = ckpt["preset"]
    if stored.get("infer") == now["infer"] and stored.get("description") == now["description"]:
        return False
    ckpt["preset"] = {**stored, "infer": now["infer"], "description": now["description"]}
    for tag in ("format", "format_version", "saved_at"):  # save_checkpoint writes these afresh
        ckpt.pop(tag, None)
    save_checkpoint(model, ckpt)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", default="data/demo/datalist.json")
    ap.add_argument("--preset", default="lite-wide", help="a preset name or JSON file (default lite-wide)")
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget (default 20)")
    ap.add_argument("--install", help="copy the model here (e.g. apps/cdpdnet/model/pretrained_cdpdnet.pt)")
    ap.add_argument("--force", action="store_true", help="train again even if a cached model exists")
    a = ap.parse_args()

    from cdpdnet.checkpoint import atomic_write_bytes
    from cdpdnet.data import load_datalist
    from cdpdnet.training import TrainConfig, Trainer

    datalist = Path(a.datalist)
    if not datalist.is_file():
        print(f"error: {datalist} not found: run scripts/fetch_demo_data.py first", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("CDPDNET_CACHE", Path.home() / ".cache" / "cdpdnet")) / "models"
    key = cache_key(datalist, a.preset, a.minutes)
    name = Path(a.preset).stem if Path(a.preset).suffix == ".json" else a.preset
    model = cache / f"demo-{name}-{key}.pt"
    if model.is_file() and not a.force:
        print(f"demo model: reusing {model}")
        if refresh_inference_settings(model, a.preset):
            print("demo model: inference settings updated to the preset's (no training needed)")
    else:
        dl = load_datalist(datalist)
        print(dl.report())
        run = cache / f"run-{name}-{key}"
        t0 = time.time()
        print(f"demo model: training '{a.preset}' for up to {a.minutes:g} min on {len(dl.training)} cases "
              f"from {len({c.source for c in dl.training})} sources ...", flush=True)
        cfg = TrainConfig(out_dir=str(run), epochs=100000, iterations_per_epoch=20, max_minutes=a.minutes,
                          progress=sys.stderr.isatty(), schedule="budget")  # annealed when the budget ends
        summary = Trainer(dl.training, a.preset, cfg, sources=dl.sources).run()
        atomic_write_bytes(model, Path(summary["model"]).read_bytes())
        shutil.rmtree(run, ignore_errors=True)
        print(f"demo model: {summary['epochs_done']} epochs in {(time.time() - t0) / 60:.1f} min -> {model}")
    if a.install:
        atomic_write_bytes(a.install, model.read_bytes())
        print(f"demo model: installed as {a.install}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
