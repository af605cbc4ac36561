"""Presets as data: ``cdpdnet/presets/<name>.json`` (or any JSON file with the same fields).

A preset fixes the network (:class:`~cdpdnet.networks.config.NetworkConfig`), the DINO weights,
the text encoder, pre-processing (orientation, spacing, HU window), the patch size, the training
recipe and the inference settings. ``paper`` is the published configuration, ``lite`` the
CPU-sized one, ``tiny`` a plumbing-test model. All share one code path.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .networks.config import NetworkConfig

__all__ = ["Preset", "load_preset", "available_presets"]


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cdpdnet.presets").iterdir() if p.name.endswith(".json"))


def _deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


@dataclass
class Preset:
    name: str
    network: NetworkConfig
    dino: dict
    text: dict
    preprocess: dict
    patch_size: list
    train: dict
    infer: dict
    description: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        required = ("name", "network", "dino", "text", "preprocess", "patch_size", "train", "infer")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"preset is missing {missing}")
        net = NetworkConfig.from_dict(d["network"])
        patch = [int(v) for v in d["patch_size"]]
        div = net.divisor()
        if len(patch) != 3 or any(p % q for p, q in zip(patch, div)):
            raise ValueError(f"patch_size {patch} must be 3 values divisible by {div}")
        if patch[0] < net.dino_group:
            raise ValueError(f"patch_size[0]={patch[0]} must be at least dino_group={net.dino_group}")
        anti_alias = d["preprocess"].get("anti_alias", False)
        if not (isinstance(anti_alias, bool) or anti_alias == "main"):  # cdpdnet/preprocessing.py
            raise ValueError(f"preprocess.anti_alias must be true, false or \"main\", got {anti_alias!r}")
        channels = 1 + len(d["preprocess"].get("extra_windows") or [])  # cdpdnet/preprocessing.py
        if net.in_channels != channels:
            raise ValueError(f"network.in_channels={net.in_channels} but the preprocessing gives {channels} channels "
                             f"(1 + {channels - 1} extra_windows)")
        return cls(d["name"], net, dict(d["dino"]), dict(d["text"]), dict(d["preprocess"]), patch,
                   dict(d["train"]), dict(d["infer"]), d.get("description", ""), copy.deepcopy(d))

    def to_dict(self) -> dict:
        """The preset as plain data, a copy: changing it leaves the preset as it was."""
        return copy.deepcopy({"name": self.name, "description": self.description, "network": self.network.to_dict(),
                              "dino": self.dino, "text": self.text, "preprocess": self.preprocess,
                              "patch_size": self.patch_size, "train": self.train, "infer": self.infer})


def _raw_preset(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict:
    """A preset's JSON as a dict, with ``"inherits_from"`` resolved (as nnU-Net plans do): a preset
    name or a JSON path (relative to the inheriting file) whose settings the file updates, nested."""
    p = Path(str(name_or_path))
    if p.suffix == ".json" and p.is_file():
        d, here = json.loads(p.read_text()), p.parent
    elif str(name_or_path) in available_presets():
        d, here = json.loads(resources.files("cdpdnet.presets").joinpath(f"{name_or_path}.json").read_text()), None
    else:
        raise ValueError(f"unknown preset {str(name_or_path)!r}: use one of {available_presets()} or a JSON file")
    base = d.pop("inherits_from", None)
    if base is None:
        return d
    if here is not None and Path(str(base)).suffix == ".json":
        base = here / str(base)
    seen = seen + (str(name_or_path),)
    if str(base) in seen:
        raise ValueError(f"preset {str(name_or_path)!r}: circular inherits_from {list(seen) + [str(base)]}")
    return _deep_update(_raw_preset(base, seen), d)


def load_preset(name_or_path: str | Path | dict, overrides: dict[str, Any] | None = None) -> Preset:
    """A preset by name (``paper``, ``lite``, ``tiny``), JSON path or dict, with nested ``overrides``.

    A preset file may start from another with ``"inherits_from"`` and state only what differs."""
    d = name_or_path if isinstance(name_or_path, dict) else _raw_preset(name_or_path)
    return Preset.from_dict(_deep_update(d, overrides or {}))
