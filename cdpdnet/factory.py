"""One factory for CDPDNet models: from a preset, or from a checkpoint (open_clip style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .networks import CDPDNet, CDPDNetModel
from .preset import Preset, load_preset

__all__ = ["build_network", "build_model", "model_from_checkpoint", "LoadedModel", "checkpoint_payload"]


def build_network(preset: Preset | str, num_tasks: int | None = None) -> CDPDNet:
    """The trainable network alone (no DINO weights needed: e.g. to count parameters)."""
    p = preset if isinstance(preset, Preset) else load_preset(preset)
    cfg = p.network
    if num_tasks is not None:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "num_tasks": int(num_tasks)})
    return CDPDNet(cfg)


def build_model(preset: Preset | str, num_tasks: int | None = None, dino: Any = None) -> CDPDNetModel:
    """A full model (frozen DINO + CDPDNet). ``dino`` overrides the preset's DINO weights spec, or is a
    ready ``Dinov2Model``."""
    from .dino_weights import load_dino

    p = preset if isinstance(preset, Preset) else load_preset(preset)
    cfg = p.network
    if num_tasks is not None:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "num_tasks": int(num_tasks)})
    if dino is None or isinstance(dino, str):
        dino = load_dino(dino or p.dino["weights"], num_layers=p.dino.get("num_layers"))
    return CDPDNetModel(cfg, dino, slice_batch=p.dino.get("slice_batch"))


class LoadedModel:
    """A model restored from a checkpoint, with what inference needs to know about it."""

    def __init__(self, model: CDPDNetModel, preset: Preset, ckpt: dict):
        self.model = model
        self.preset = preset
        self.tasks: list[dict] = list(ckpt["tasks"])
        self.text: dict = dict(ckpt.get("text", {}))
        self.version: str = str(ckpt.get("model_version", ""))
        self.metrics: dict = dict(ckpt.get("metrics", {}))
        self.epoch = ckpt.get("epoch")

    def task_id(self, task: str | int | None) -> int:
        """Task index by source name or index; ``None``/``"mean"`` -> -1 (mean of all task prompts)."""
        if task is None or task == "mean" or task == -1:
            return -1
        if isinstance(task, int) or str(task).lstrip("-").isdigit():
            i = int(task)
            if not -1 <= i < len(self.tasks):
                raise ValueError(f"task {i} out of range 0..{len(self.tasks) - 1}")
            return i
        names = [t["name"] for t in self.tasks]
        if task not in names:
            raise ValueError(f"unknown source dataset {task!r}; this model knows {names} (or 'mean')")
        return names.index(task)


def checkpoint_payload(model: CDPDNetModel, preset: Preset, tasks: list[dict], text: dict,
                       include_dino: bool = True, **extra: Any) -> dict:
    payload = {
        "preset": preset.to_dict(),
        "tasks": tasks,
        "text": text,
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "dino_config": model.dino.dino.config.to_dict(),
    }
    if include_dino:
        payload["dino_state_dict"] = {k: v.detach().cpu() for k, v in model.dino.dino.state_dict().items()}
    payload.update(extra)
    return payload


def model_from_checkpoint(path: str | Path | dict, device: str | torch.device = "cpu", dino: Any = None) -> LoadedModel:
    """Restore a model; DINO comes from the checkpoint's own weights, else from its preset's spec."""
    ckpt = path if isinstance(path, dict) else load_checkpoint(path)
    where = "checkpoint" if isinstance(path, dict) else str(path)
    try:
        preset = load_preset(ckpt["preset"])
        num_tasks = len(ckpt["tasks"])
        if dino is None and "dino_state_dict" in ckpt:
            from transformers import Dinov2Config, Dinov2Model

            dino = Dinov2Model(Dinov2Config.from_dict(ckpt["dino_config"]))
            dino.load_state_dict(ckpt["dino_state_dict"])
        model = build_model(preset, num_tasks=num_tasks, dino=dino)
        missing, unexpected = model.net.load_state_dict(ckpt["state_dict"], strict=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where} does not match its preset: {type(e).__name__}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    return LoadedModel(model, preset, ckpt)
