"""Inference benchmark (not a test): one auto-segmentation, file on disk to written label map.

For every input and runner it reports the time of each stage (load, preprocess, DINO, CNN,
sliding-window overhead, post-process, resample back, write), the peak resident memory of the
process during each stage, and the achieved GFLOP/s of the DINO and CNN stages against the
machine's measured fp32 matmul and 3D-convolution peaks. Runners:

* ``lite`` and ``paper``: CDPDNet through :class:`cdpdnet.inference.Segmenter`, all 32 ROIs.
  ``lite`` uses ``--lite-model`` (default: the newest demo model in the cache, as the demo server
  does), ``paper`` random weights with a random ViT-B/14 (the cost does not depend on the weights).
* ``segresnet`` and ``swinunetr``: the networks behind MONAI Label's radiology app (its
  ``segmentation`` config: SegResNet 32 filters, 96^3 windows at 1.5 mm, overlap 0.4; SwinUNETR
  feature size 48), run as that app runs them: RAS, resample to ``--peer-spacing``, HU window, MONAI
  sliding window (Gaussian), softmax + argmax, back to the input grid (nearest), write. Random weights.

Each run is a child process of its own, so memory peaks do not mix. Inputs: the demo CTs
(``data/demo/images``) and a synthetic 512x512x300 abdomen at 0.8 x 0.8 x 1.5 mm (a phantom made at
1.5 mm and interpolated; written once under ``--out``). Usage::

    HF_HUB_OFFLINE=1 python bench/inference.py --out runs/bench-infer
    HF_HUB_OFFLINE=1 python bench/inference.py --inputs synthetic --runners lite paper --paper-windows 4
    HF_HUB_OFFLINE=1 python bench/inference.py --inputs synthetic --runners paper --paper-windows 0 --device cuda

``--paper-windows N`` times the paper preset on its first N windows only and scales the network
stages by the window count (stated in the table), because a full ``paper`` run takes tens of
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ["load", "preprocess", "dino", "cnn", "sw_overhead", "postprocess", "resample", "write"]
SYNTH_SHAPE, SYNTH_SPACING = (512, 512, 300), (0.8, 0.8, 1.5)


# ---------------------------------------------------------------------------------------------
# measurement helpers (used in the child processes)

class RSSSampler:
    """Samples the process's resident memory every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.005):
        import psutil

        self.proc, self.period, self.samples = psutil.Process(), period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> float:
        """Peak RSS in GiB between ``t0`` and ``t1`` (the sample just before ``t0`` included)."""
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        before = [r for t, r in self.samples if t < t0]
        if before:
            vals.append(before[-1])
        return max(vals, default=0) / 2**30


class Timer:
    """Accumulates the wall time of a module's forward calls (and the batch sizes it saw)."""

    def __init__(self, module):
        self.seconds, self.items, self._t = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, mod, args):
        _sync()
        self._t = time.perf_counter()
        self.items += int(args[0].shape[0])

    def _post(self, mod, args, out):
        _sync()
        self.seconds += time.perf_counter() - self._t


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def machine_peak() -> dict:
    """Measured fp32 GFLOP/s of this CPU: the best of 3 trials of a 4096^2 matmul and of a 3D convolution
    (64 -> 64 channels, 3^3 kernel, 48^3 voxels, channels-last as the model runs)."""
    import torch

    def best(fn, flops, reps=3, trials=3):
        fn()
        rates = []
        for _ in range(trials):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            rates.append(flops * reps / (time.perf_counter() - t) / 1e9)
        return max(rates)

    with torch.no_grad():
        a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
        mm = best(lambda: a @ b, 2 * 4096**3)
        conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(memory_format=torch.channels_last_3d)
        x = torch.randn(1, 64, 48, 48, 48).to(memory_format=torch.channels_last_3d)
        cv = best(lambda: conv(x), 2 * 64 * 64 * 27 * 48**3)
    return {"matmul_gflops": mm, "conv3d_gflops": cv, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# runners (child processes)

def _cdpdnet_model(preset: str, lite_model: str | None):
    import torch

    from cdpdnet.factory import LoadedModel, build_model, model_from_checkpoint
    from cdpdnet.preset import load_preset

    if preset == "lite" and lite_model:
        return model_from_checkpoint(lite_model), Path(lite_model).name
    p = load_preset(preset)
    torch.manual_seed(0)
    dino = "random:base" if preset == "paper" else None
    model = build_model(p, num_tasks=1, dino=dino)
    model.net.set_text_embeddings(torch.randn(32, p.network.text_dim), torch.randn(1, p.network.text_dim))
    return LoadedModel(model.eval(), p, {"tasks": [{"name": "bench", "rois": []}], "text": {}}), "random weights"


def run_cdpdnet(image: str, preset: str, out_label: str, lite_model: str | None, max_windows: int | None,
                device: str = "cpu") -> dict:
    import torch

    from cdpdnet.inference import Segmenter

    t = time.perf_counter()
    loaded, weights = _cdpdnet_model(preset, lite_model)
    seg = Segmenter(loaded, device=device)
    model_load = time.perf_counter() - t
    model = seg.loaded.model
    whole, dino = Timer(model), Timer(model.dino)
    calls = {"n": 0, "channels": None}
    if max_windows:  # time the first N windows, count the rest (see the module docstring)
        import cdpdnet.inference as inf

        swi = inf.sliding_window_inference

        def capped(inputs, roi_size, sw_batch_size, predictor, **kw):
            def limited(patch):
                calls["n"] += patch.shape[0]
                if calls["n"] > max_windows and calls["channels"] is not None:
                    return patch.new_zeros(patch.shape[0], calls["channels"], *patch.shape[2:])
                out = predictor(patch)
                calls["channels"] = out.shape[1]
                return out

            return swi(inputs, roi_size, sw_batch_size, limited, **kw)

        inf.sliding_window_inference = capped
    with RSSSampler() as mem:
        t0 = time.perf_counter()
        res = seg.segment(image, output=out_label)
    bounds, acc = {}, t0
    for k in ["load", "preprocess", "network", "postprocess", "resample", "write"]:
        bounds[k] = (acc, acc + res.timings[k])
        acc += res.timings[k]
    windows = calls["n"] if max_windows else whole.items
    timed = whole.items
    scale = windows / max(timed, 1)
    st = {k: res.timings[k] for k in ["load", "preprocess", "postprocess", "resample", "write"]}
    st["dino"] = dino.seconds * scale
    st["cnn"] = (whole.seconds - dino.seconds) * scale
    st["sw_overhead"] = max(res.timings["network"] - whole.seconds, 0.0)
    x = torch.zeros(1, seg.preset.network.in_channels, *seg.preset.patch_size, device=device)
    with torch.no_grad():
        f_all = flops_of(lambda: model(x, torch.tensor([-1], device=device)))
        f_dino = flops_of(lambda: model.dino(x))
    peaks = {k: mem.peak(*bounds[k]) for k in bounds}
    return {
        "weights": weights, "model_load_s": model_load, "stages": st, "total_s": sum(st.values()),
        "peak_gib": max(peaks.values()), "stage_peak_gib": peaks, "windows": windows, "windows_timed": timed,
        "model_grid": list(res.model_space_shape), "gflop_window": {"dino": f_dino / 1e9, "cnn": (f_all - f_dino) / 1e9},
        "gflops": {"dino": f_dino * windows / 1e9 / max(st["dino"], 1e-9),
                   "cnn": (f_all - f_dino) * windows / 1e9 / max(st["cnn"], 1e-9)},
        "rois_found": len(res.present()),
    }


def _peer_network(name: str, out_channels: int):
    from monai.networks.nets import SegResNet, SwinUNETR

    if name == "segresnet":  # MONAI Label radiology app, lib/configs/segmentation.py
        return SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=32,
                         blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)
    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=48, spatial_dims=3)


def run_peer(image: str, name: str, out_label: str, spacing: float, max_windows: int | None,
             device: str = "cpu") -> dict:
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Orientation, ScaleIntensityRange, SpatialResample, Spacing

    from cdpdnet.imageio import load_image, save_label_map

    net = _peer_network(name, 33).to(device).eval()  # 32 ROIs + background, softmax
    roi, calls = (96, 96, 96), {"n": 0, "timed": 0, "s": 0.0}

    def predictor(p):
        calls["n"] += p.shape[0]
        if max_windows and calls["timed"] >= max_windows:  # the cap rounds up to a whole batch
            return p.new_zeros(p.shape[0], 33, *p.shape[2:])
        _sync()
        t = time.perf_counter()
        out = net(p)
        _sync()
        calls["s"] += time.perf_counter() - t
        calls["timed"] += p.shape[0]
        return out

    st = {}
    with RSSSampler() as mem, torch.no_grad():
        marks = [time.perf_counter()]
        img = load_image(image)
        affine, shape = np.asarray(img.affine, dtype=np.float64), tuple(img.shape[1:])
        marks.append(time.perf_counter())
        x = ScaleIntensityRange(-175, 250, 0.0, 1.0, clip=True)(Spacing((spacing,) * 3, mode="bilinear")(
            Orientation("RAS")(img)))
        marks.append(time.perf_counter())
        logits = sliding_window_inference(x[None].to(device), roi, 2, predictor, overlap=0.4, mode="gaussian")
        marks.append(time.perf_counter())
        lab = torch.softmax(logits[0], 0).argmax(0, keepdim=True).to(torch.uint8).cpu()
        del logits
        marks.append(time.perf_counter())
        lab = MetaTensor(lab, affine=x.affine)
        back = SpatialResample(mode="nearest", dtype=torch.float32)(lab.float(), dst_affine=torch.as_tensor(affine),
                                                                     spatial_size=shape)
        marks.append(time.perf_counter())
        save_label_map(back[0].numpy().astype(np.uint8), affine, out_label)
        marks.append(time.perf_counter())
    names = ["load", "preprocess", "network", "postprocess", "resample", "write"]
    for i, n in enumerate(names):
        st[n] = marks[i + 1] - marks[i]
    scale = calls["n"] / max(calls["timed"], 1)
    st["cnn"] = calls["s"] * scale
    st["sw_overhead"] = max(st.pop("network") - calls["s"], 0.0)
    st["dino"] = 0.0
    xw = torch.zeros(1, 1, *roi, device=device)
    with torch.no_grad():
        f = flops_of(lambda: net(xw))
    peaks = {n: mem.peak(marks[i], marks[i + 1]) for i, n in enumerate(names)}
    return {"weights": "random weights", "stages": st, "total_s": sum(st.values()), "peak_gib": max(peaks.values()),
            "stage_peak_gib": peaks, "windows": calls["n"], "windows_timed": calls["timed"],
            "model_grid": list(x.shape[1:]), "gflop_window": {"dino": 0.0, "cnn": f / 1e9},
            "gflops": {"dino": 0.0, "cnn": f * calls["n"] / 1e9 / max(st["cnn"], 1e-9)}}


def child(spec: dict) -> dict:
    import torch

    torch.set_grad_enabled(False)
    if spec["runner"] in ("lite", "paper"):
        return run_cdpdnet(spec["image"], spec["runner"], spec["out_label"], spec.get("lite_model"),
                           spec.get("max_windows"), spec.get("device", "cpu"))
    return run_peer(spec["image"], spec["runner"], spec["out_label"], spec["peer_spacing"], spec.get("max_windows"),
                    spec.get("device", "cpu"))


# ---------------------------------------------------------------------------------------------
# parent

def synthetic_input(out: Path) -> Path:
    """A 512x512x300 abdomen at 0.8 x 0.8 x 1.5 mm: a 1.5 mm phantom interpolated in-plane, int16 HU."""
    import numpy as np
    from scipy import ndimage

    from cdpdnet.imageio import save_volume
    from cdpdnet.phantoms import make_phantom

    path = out / "synthetic_512x512x300.nii.gz"
    if path.is_file():
        return path
    fov = tuple(n * s for n, s in zip(SYNTH_SHAPE, SYNTH_SPACING))
    ph = make_phantom(7, spacing=(1.5, 1.5, 1.5), fov_mm=fov, pose=False)
    zoom = [n / s for n, s in zip(SYNTH_SHAPE, ph.image.shape)]
    img = ndimage.zoom(ph.image.astype(np.float32), zoom, order=1)
    affine = ph.affine.copy()
    affine[:3, :3] = np.diag(SYNTH_SPACING)
    affine[:3, 3] = ph.affine[:3, 3] - 0.5 * (np.array([1.5] * 3) - np.array(SYNTH_SPACING))
    save_volume(np.round(img).astype(np.int16), affine, path, dtype=np.int16)
    return path


def newest_demo_model() -> str | None:
    cache = Path(os.environ.get("CDPDNET_CACHE", Path.home() / ".cache" / "cdpdnet")) / "models"
    found = sorted(cache.glob("demo-lite-*.pt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def _voxels(path: Path) -> str:
    import nibabel as nib

    img = nib.load(str(path))
    zooms = "x".join(f"{z:g}" for z in img.header.get_zooms()[:3])
    return f"{'x'.join(map(str, img.shape[:3]))} at {zooms} mm"


def report(results: list[dict], peak: dict, cmd: str) -> str:
    lines = [f"Machine peak (fp32, {peak['threads']} threads): matmul {peak['matmul_gflops']:.0f} GFLOP/s, "
             f"3D convolution {peak['conv3d_gflops']:.0f} GFLOP/s.", "",
             "| input | runner | total s | " + " | ".join(STAGES) + " | peak GiB | windows | DINO GFLOP/s | "
             "CNN GFLOP/s | x lite |", "|---|---|" + "---|" * (len(STAGES) + 6)]
    lite_total = {r["input"]: r["total_s"] for r in results if r["runner"] == "lite" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['input']} | {r['runner']} | failed: {r['error'][:80]} |")
            continue
        st = r["stages"]
        ratio = r["total_s"] / lite_total[r["input"]] if r["input"] in lite_total else float("nan")
        win = f"{r['windows']}" + (f" ({r['windows_timed']} timed)" if r["windows_timed"] < r["windows"] else "")
        g = r["gflops"]
        lines.append(f"| {r['input']} | {r['runner']} | **{r['total_s']:.1f}** | "
                     + " | ".join(f"{st[s]:.2f}" for s in STAGES)
                     + f" | {r['peak_gib']:.2f} | {win} | {g['dino']:.0f} | {g['cnn']:.0f} | {ratio:.1f} |")
    lines += ["", f"Command: `{cmd}`"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-infer")
    ap.add_argument("--inputs", nargs="+", default=["demo", "synthetic"],
                    help="'demo' (every CT in data/demo/images), 'synthetic', or image paths")
    ap.add_argument("--runners", nargs="+", default=["lite", "paper", "segresnet", "swinunetr"],
                    choices=["lite", "paper", "segresnet", "swinunetr"])
    ap.add_argument("--lite-model", default=None, help="lite checkpoint (default: newest cached demo model)")
    ap.add_argument("--peer-spacing", type=float, default=1.5, help="spacing of the MONAI peers (mm)")
    ap.add_argument("--paper-windows", type=int, default=4, help="windows timed for 'paper' (0: all)")
    ap.add_argument("--peer-windows", type=int, default=0, help="windows timed for the peers (0: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU path; memory is then the host's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, Path]] = []
    for i in a.inputs:
        if i == "demo":
            images += [(p.name.replace(".nii.gz", ""), p) for p in sorted((REPO / "data/demo/images").glob("*.nii.gz"))]
        elif i == "synthetic":
            images.append(("synthetic 512x512x300", synthetic_input(out)))
        else:
            images.append((Path(i).name, Path(i)))
    lite_model = a.lite_model or newest_demo_model()
    print(f"lite model: {lite_model or 'random weights (no demo model cached)'}", flush=True)
    peak = machine_peak()
    print(json.dumps(peak), flush=True)
    results = []
    for name, path in images:
        desc = _voxels(path)
        for runner in a.runners:
            cap = a.paper_windows if runner == "paper" else (a.peer_windows if runner in ("segresnet", "swinunetr") else 0)
            spec = {"image": str(path), "runner": runner, "device": a.device, "lite_model": lite_model, "peer_spacing": a.peer_spacing,
                    "max_windows": cap or None, "out_label": str(out / f"{path.name.split('.')[0]}-{runner}.nii.gz")}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            r.update(input=name, runner=runner, input_desc=desc)
            results.append(r)
            print(f"{name} ({desc}) {runner}: {json.dumps(r)[:400]} [{time.perf_counter() - t:.0f} s wall]",
                  flush=True)
            (out / "results.json").write_text(json.dumps({"machine": peak, "results": results}, indent=2))
    cmd = "HF_HUB_OFFLINE=1 python bench/inference.py " + " ".join(sys.argv[1:])
    md = report(results, peak, cmd)
    (out / "report.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
