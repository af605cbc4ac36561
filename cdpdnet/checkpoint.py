"""Checkpoints: one self-contained file per model version, written atomically.

A checkpoint holds the preset, the task list, the text prompts (their embeddings are buffers of the
network state), the trainable CDPDNet state, the frozen DINO config and weights (so inference needs
neither a hub nor a text encoder), and, for resuming, optimiser/scheduler state and the epoch.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_write_bytes", "FORMAT"]

FORMAT = "cdpdnet-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable CDPDNet checkpoint (corrupt, truncated, foreign, or incompatible)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; published files are readable like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise ``payload`` (plus format tags) with ``torch.save`` and write it atomically."""
    data = {"format": FORMAT, "format_version": VERSION, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    buf = io.BytesIO()
    torch.save(data, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; any problem becomes one :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive; truncated or foreign file?)")
        data = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt zip, unpickling refused, ...
        raise CheckpointError(f"{path} could not be read as a checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a CDPDNet checkpoint (found {keys}); "
                              f"make one with 'python -m cdpdnet train' or 'python -m cdpdnet init'")
    if int(data.get("format_version", 0)) > VERSION:
        raise CheckpointError(f"{path} has format version {data['format_version']}, newer than this code ({VERSION})")
    for key in ("preset", "state_dict", "tasks"):
        if key not in data:
            raise CheckpointError(f"{path} is missing '{key}'")
    _check_fits_preset(path, data)
    return data


def _check_fits_preset(path: Path, data: dict[str, Any]) -> None:
    """The weights must be those of the network the checkpoint's own preset builds (names and shapes).

    Cheap: the network is built on the ``meta`` device (no memory, about 50 ms). Catches a preset this
    code cannot build (another code version) and weights of another preset or architecture, before a
    file is published or served.
    """
    from .factory import build_network
    from .preset import load_preset

    if not isinstance(data["tasks"], list) or not isinstance(data["state_dict"], dict):
        raise CheckpointError(f"{path} is not a CDPDNet checkpoint: 'tasks' must be a list and 'state_dict' a dict")
    try:
        preset = load_preset(data["preset"])
        with torch.device("meta"):
            net = build_network(preset, num_tasks=len(data["tasks"]))
    except Exception as e:  # noqa: BLE001 - any failure means: not usable by this code
        raise CheckpointError(f"{path} has a preset this code cannot use (incompatible preset or code version): "
                              f"{type(e).__name__}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in data["state_dict"].items() if isinstance(v, torch.Tensor)}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in data["state_dict"] if k not in expected or k not in got]
    shapes = [f"{k} {list(got[k])} vs {list(expected[k])}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs preset), e.g. {shapes[:2]}")
        raise CheckpointError(f"{path}: its state_dict does not fit its preset '{preset.name}' ({'; '.join(parts)}); "
                              "weights of an incompatible preset or network?")
