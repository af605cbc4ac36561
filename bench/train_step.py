"""Step-time benchmark (not a test): seconds per training step of a preset, split into DINO, forward and
backward + AdamW, on random input. Usage::

    HF_HUB_OFFLINE=1 python bench/train_step.py --preset lite --batch 2
    HF_HUB_OFFLINE=1 python bench/train_step.py --preset lite --override '{"preprocess": {"spacing": [3, 3, 3]}}'

``--layout contiguous`` measures without the channels-last layout the trainer uses on the CPU;
``--malloc default`` without the allocator setting it applies there (``cdpdnet.device.keep_freed_memory``);
``--precision fp32|bf16`` forces the autocast the trainer would choose (``preset``: bf16 where the preset's
``train.cpu_bf16`` asks and the CPU has native bf16, ``cdpdnet.device.use_bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--override", default="{}", help="JSON merged into the preset (e.g. a patch_size)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--layout", choices=["auto", "contiguous"], default="auto")
    ap.add_argument("--malloc", choices=["kept", "default"], default="kept",
                    help="kept: glibc keeps freed memory for the next step, as the trainer sets it on the CPU")
    ap.add_argument("--precision", choices=["preset", "fp32", "bf16"], default="preset",
                    help="autocast of DINO and the network (the loss runs in float32, as in the trainer)")
    a = ap.parse_args()

    import numpy as np
    import torch

    from cdpdnet.device import keep_freed_memory, memory_format, use_bf16
    from cdpdnet.factory import build_model
    from cdpdnet.preset import load_preset
    from cdpdnet.training import loss_from_preset

    if a.malloc == "kept":
        keep_freed_memory()
    torch.manual_seed(0)
    preset = load_preset(a.preset, json.loads(a.override))
    model = build_model(preset, num_tasks=5)
    layout = memory_format(torch.device("cpu")) if a.layout == "auto" else torch.contiguous_format
    net = model.net.to(memory_format=layout)
    bf16 = (use_bf16(torch.device("cpu"), preset.train.get("cpu_bf16", False)) if a.precision == "preset"
            else a.precision == "bf16")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = loss_from_preset(preset.train)  # the preset's loss, as the trainer builds it
    x = torch.rand(a.batch, preset.network.in_channels, *preset.patch_size).contiguous(memory_format=layout)
    target = (torch.rand(a.batch, preset.network.num_classes, *preset.patch_size) > 0.9).to(torch.uint8)
    # two sources' worth of annotation: half the channels unknown (what the exclusion term works on)
    annotated = torch.arange(preset.network.num_classes).repeat(a.batch, 1) % 2 == torch.arange(a.batch)[:, None] % 2
    task = torch.zeros(a.batch, dtype=torch.long)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                feats = model.dino(x)
            t1 = time.perf_counter()
            logits = net(x, feats, task)
        t2 = time.perf_counter()
        loss = loss_fn(logits.float(), target, annotated)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for _ in range(2):
        step()
    dino, fwd, bwd = np.mean([step() for _ in range(a.steps)], axis=0)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"{preset.name} patch {preset.patch_size} batch {a.batch} layout {a.layout} malloc {a.malloc} {'bf16' if bf16 else 'fp32'} threads {torch.get_num_threads()}: "
          f"DINO {dino:.3f} s, forward {fwd:.3f} s, loss + backward + AdamW {bwd:.3f} s, "
          f"total {dino + fwd + bwd:.3f} s per step; {params:.2f} M trainable parameters")


if __name__ == "__main__":
    main()
